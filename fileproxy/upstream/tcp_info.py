"""Reading TCP_INFO from a socket: the one getsockopt; parsing it is pure (adaptive.tcp_info)."""

from __future__ import annotations

import socket
from typing import Protocol

from fileproxy.adaptive.tcp_info import TCP_INFO_BUFFER, TcpInfo, parse_tcp_info


class SupportsGetsockopt(Protocol):
    """A socket, or asyncio's ``TransportSocket`` from ``get_extra_info("socket")``."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def read_tcp_info(sock: SupportsGetsockopt) -> TcpInfo | None:
    """TCP_INFO of a connected TCP socket; ``None`` if the platform or socket cannot."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    try:
        buf = sock.getsockopt(socket.IPPROTO_TCP, option, TCP_INFO_BUFFER)
    except OSError:
        return None
    return parse_tcp_info(buf)
