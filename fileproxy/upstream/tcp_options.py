"""TCP socket options from the settings: applied, read back, and what the kernel refused.

Applied to the listening socket (Linux copies them to accepted sockets) and to
every upstream socket (the connector's socket factory). SO_SNDBUF/SO_RCVBUF are
left to the kernel's autotuning unless set: a fixed size disables it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from fileproxy.settings import Settings

# Linux values, for Pythons built without the constants.
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


class SockOpts(Protocol):
    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...
    def getsockopt(self, level: int, optname: int, /) -> int: ...


@dataclass(frozen=True)
class SocketOption:
    name: str
    level: int
    optname: int
    value: int


def socket_options(settings: Settings) -> tuple[SocketOption, ...]:
    """The options the settings ask for, in the order they are applied."""
    tcp, sol = socket.IPPROTO_TCP, socket.SOL_SOCKET
    wanted = [
        SocketOption("TCP_NODELAY", tcp, socket.TCP_NODELAY, int(settings.tcp_nodelay)),
        SocketOption("SO_KEEPALIVE", sol, socket.SO_KEEPALIVE, int(settings.so_keepalive)),
    ]
    if settings.so_keepalive:
        wanted += [
            SocketOption("TCP_KEEPIDLE", tcp, socket.TCP_KEEPIDLE, settings.tcp_keepidle),
            SocketOption("TCP_KEEPINTVL", tcp, socket.TCP_KEEPINTVL, settings.tcp_keepintvl),
            SocketOption("TCP_KEEPCNT", tcp, socket.TCP_KEEPCNT, settings.tcp_keepcnt),
        ]
    optional = [
        ("TCP_QUICKACK", tcp, TCP_QUICKACK, int(settings.tcp_quickack)),
        ("TCP_USER_TIMEOUT", tcp, TCP_USER_TIMEOUT, settings.tcp_user_timeout_ms),
        ("SO_SNDBUF", sol, socket.SO_SNDBUF, settings.so_sndbuf),
        ("SO_RCVBUF", sol, socket.SO_RCVBUF, settings.so_rcvbuf),
        ("TCP_NOTSENT_LOWAT", tcp, TCP_NOTSENT_LOWAT, settings.tcp_notsent_lowat),
    ]
    wanted += [SocketOption(*option) for option in optional if option[3]]
    return tuple(wanted)


def apply(sock: SockOpts, options: tuple[SocketOption, ...]) -> list[str]:
    """Set each option; return the names the kernel refused."""
    refused = []
    for option in options:
        try:
            sock.setsockopt(option.level, option.optname, option.value)
        except OSError:
            refused.append(option.name)
    return refused


def read_back(sock: SockOpts, options: tuple[SocketOption, ...]) -> dict[str, int | None]:
    """What the socket reports for each option (the kernel doubles buffer sizes)."""
    values: dict[str, int | None] = {}
    for option in options:
        try:
            values[option.name] = sock.getsockopt(option.level, option.optname)
        except OSError:
            values[option.name] = None
    return values


@dataclass
class ListenSockets:
    """What applying the options to the listening sockets gave (None: not applied yet)."""

    refused: list[str] | None = None


def apply_to_listeners(
    sockets: list[socket.socket], settings: Settings, state: ListenSockets
) -> None:
    """Options on listening TCP sockets, which accepted sockets inherit (Linux)."""
    options = socket_options(settings)
    refused: set[str] = set()
    for sock in sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refused.update(apply(sock, options))
    state.refused = sorted(refused)
