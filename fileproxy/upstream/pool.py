"""Keep-alive connections to the one upstream: open, lend, take back, expire.

The pool hands out connections of our own protocol (``upstream.protocol``: the
llhttp response parser, the idle-read timeout, read flow control) on sockets made
by the caller's factory (the TCP options). It replaces aiohttp's ``TCPConnector``,
whose per-request bookkeeping (a ``Connection`` wrapper, callbacks, per-key
dictionaries, a ``ClientRequest`` to key on) is more than a proxy in front of one
origin needs. Its semantics are the connector's, which the seed's settings name:

- at most ``limit`` connections in use or opening at once (0: no limit);
  requests beyond wait for a free one in arrival order (FIFO), for as long as
  the caller bounds the wait;
- a connection given back whole waits ``keepalive_timeout`` seconds in the pool
  for the next request, the most recently used first;
- the upstream's address is resolved once per ``dns_ttl`` seconds (0: on every
  new connection; an IP address is never resolved).

Errors are aiohttp's own (``ClientConnectorError``, ``ConnectionTimeoutError``, and
for TLS ``ClientConnectorCertificateError`` and ``ClientConnectorSSLError``, as its
connector raises them), which ``errors.classify`` maps to statuses.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from fileproxy.upstream.aiohttp_client import connection_key
from fileproxy.upstream.protocol import UpstreamProtocol

SocketFactory = Callable[[Any], socket.socket]  # getaddrinfo's 5-tuple -> socket
ConnectObserver = Callable[[float, float], None]  # (now, connect seconds)
AddrInfo = tuple[Any, ...]
# what ``acquire`` raises when no connection could be made (TLS failures are subclasses):
# the request never left, whoever asked (a try, a resume's ask)
CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


class ConnectionPool:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        keepalive_timeout: float,
        dns_ttl: float,
        new_socket: SocketFactory,
        on_connect: ConnectObserver | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.key = connection_key(host, port, tls)
        self._tls = tls
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._dns_ttl = dns_ttl
        self._new_socket = new_socket
        self._on_connect = on_connect
        self._numeric = _is_ip_address(host)
        self._addresses: list[AddrInfo] = []
        self._addresses_expire = 0.0
        self._busy = 0  # slots taken: connections lent out or being opened
        self._lent: set[UpstreamProtocol] = set()
        self._idle: list[tuple[UpstreamProtocol, float]] = []  # (protocol, given back at)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def waiting(self) -> int:
        """Requests waiting for a connection (the pool is at its limit)."""
        return len(self._waiters)

    @property
    def in_use(self) -> int:
        return len(self._lent)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def idle_protocols(self) -> list[UpstreamProtocol]:
        return [protocol for protocol, _ in self._idle]

    async def acquire(
        self, connect_timeout: float | None, *, idle_at_most: float | None = None
    ) -> tuple[UpstreamProtocol, bool]:
        """A connection for one request, and whether it was reused from the pool.

        Waits (FIFO) while ``limit`` slots are taken; the caller bounds that wait.
        ``idle_at_most``: reuse only a connection given back less than that many seconds
        ago, else open a new one (the idle ones stay for other requests).
        """
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        if self._limit and self._busy >= self._limit:
            await self._wait_for_slot()  # returns holding the slot a release handed over
        else:
            self._busy += 1
        try:
            protocol = self._take_idle(time.monotonic(), idle_at_most)
            reused = protocol is not None
            if protocol is None:
                protocol = await self._connect(connect_timeout)
        except BaseException:
            self._busy -= 1
            self._wake_next()
            raise
        self._lent.add(protocol)
        return protocol, reused

    def release(self, protocol: UpstreamProtocol, reusable: bool) -> None:
        """Take a lent connection back: pooled if ``reusable`` and sound, else closed."""
        if protocol not in self._lent:
            return
        self._lent.discard(protocol)
        self._busy -= 1
        if reusable and not self._closed and protocol.is_connected() and not protocol.should_close:
            self._idle.append((protocol, time.monotonic()))
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(
                    self._keepalive, self._expire_idle
                )
        else:
            protocol.close()
        self._wake_next()

    def detach(self, protocol: UpstreamProtocol) -> None:
        """A lent connection leaves the pool for good (a tunnel): its slot is free, the
        connection is the caller's to close."""
        if protocol not in self._lent:
            return
        self._lent.discard(protocol)
        self._busy -= 1
        self._wake_next()

    def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for protocol, _ in self._idle:
            protocol.close()
        self._idle.clear()
        for protocol in self._lent:
            protocol.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the upstream pool is closed"))

    # --- slots ---------------------------------------------------------------------

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._busy -= 1  # handed a slot, then cancelled: it goes to the next
                self._wake_next()
            elif waiter in self._waiters:
                # cancelled while waiting (the awaited future is cancelled with the task):
                # it no longer waits, nor counts in ``waiting``
                self._waiters.remove(waiter)
            raise

    def _wake_next(self) -> None:
        """Hand free slots to the longest waiting requests (the slot is theirs at once)."""
        while self._waiters and (not self._limit or self._busy < self._limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy += 1
                waiter.set_result(None)

    # --- idle connections --------------------------------------------------------

    def _reusable(self, protocol: UpstreamProtocol, since: float, now: float) -> bool:
        """An idle connection still open and given back less than keepalive_timeout ago."""
        return now - since < self._keepalive and protocol.is_connected()

    def _take_idle(self, now: float, idle_at_most: float | None = None) -> UpstreamProtocol | None:
        """The most recently given back connection still reusable, if it has not been idle
        ``idle_at_most`` seconds (the others, given back before it, have been idle longer)."""
        idle = self._idle
        while idle:
            protocol, since = idle[-1]
            if not self._reusable(protocol, since, now):
                idle.pop()
                protocol.close()
            elif idle_at_most is not None and now - since >= idle_at_most:
                return None
            else:
                idle.pop()
                return protocol
        return None

    def _expire_idle(self) -> None:
        self._sweep = None
        now = time.monotonic()
        keep = []
        for protocol, since in self._idle:
            if self._reusable(protocol, since, now):
                keep.append((protocol, since))
            else:
                protocol.close()
        self._idle = keep
        if keep:
            oldest = keep[0][1]
            self._sweep = asyncio.get_running_loop().call_later(
                max(0.0, oldest + self._keepalive - now), self._expire_idle
            )

    # --- new connections ---------------------------------------------------------

    async def _connect(self, timeout: float | None) -> UpstreamProtocol:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                last_error: OSError | None = None
                for info in await self._resolve():
                    try:
                        protocol = await self._open(loop, info)
                        break
                    except OSError as exc:
                        last_error = exc
                else:
                    raise last_error or OSError(f"no address for {self.host}")
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(
                f"Connection timeout to host {self.host}:{self.port}"
            ) from exc
        except ssl.CertificateError as exc:  # the certificate did not verify (errno 1: EPERM)
            raise aiohttp.ClientConnectorCertificateError(self.key, exc) from exc
        except ssl.SSLError as exc:  # any other TLS failure (e.g. https to a plain-HTTP port)
            raise aiohttp.ClientConnectorSSLError(self.key, exc) from exc
        except OSError as exc:
            raise aiohttp.ClientConnectorError(self.key, exc) from exc
        if self._on_connect is not None:
            now = time.monotonic()
            self._on_connect(now, now - started)
        return protocol

    async def _open(self, loop: asyncio.AbstractEventLoop, info: AddrInfo) -> UpstreamProtocol:
        sock = self._new_socket(info)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, info[4])
            _, protocol = await loop.create_connection(
                lambda: UpstreamProtocol(loop),
                sock=sock,
                ssl=self._tls,
                server_hostname=self.host if self._tls is not None else None,
            )
        except BaseException:
            sock.close()
            raise
        return protocol

    async def _resolve(self) -> list[AddrInfo]:
        if self._numeric:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (self.host, self.port))]
        now = time.monotonic()
        if self._addresses and now < self._addresses_expire:
            return self._addresses
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )
        if self._dns_ttl > 0:
            self._addresses, self._addresses_expire = list(infos), now + self._dns_ttl
        return list(infos)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
