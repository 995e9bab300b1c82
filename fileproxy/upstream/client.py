"""The HTTP/1.1 client that talks to the upstream over a pool of keep-alive connections.

One request is one write of its head (and its body, streamed after it), then the
connection's protocol (``upstream.protocol``: our own ``asyncio.Protocol`` with llhttp)
reads the answer: its head parsed, its body handed on as received. Nothing here
follows redirects, decodes bodies, keeps cookies or adds headers the client did
not send, besides ``Host`` and the framing. aiohttp's client protocol and session did
this before (2026-12-07); the session's per-request object graph took a fifth to a
third of the proxy's CPU per small request, its protocol's parser a CIMultiDict, a URL
and a StreamReader per message more (``bench.hot_path``, ``bench.parsers``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from fileproxy.adaptive import TcpInfo
from fileproxy.http import connection as http1
from fileproxy.settings import ReplicaSpec, Settings
from fileproxy.upstream import tcp_options, tls
from fileproxy.upstream.pool import ConnectionPool, ConnectObserver
from fileproxy.upstream.protocol import MAX_HEADER_BYTES as MAX_HEADER_BYTES
from fileproxy.upstream.protocol import ResponseBody, UpstreamProtocol
from fileproxy.upstream.tcp_info import read_tcp_info

# Methods a request may be retried with when a pooled connection turned out closed
# before it answered (RFC 9110 9.2.2), as aiohttp and nginx do.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # TRACE: 405
# A request that cannot be sent again (a POST, one whose body streamed) reuses a pooled
# connection only if it was given back less than this many seconds ago; else it gets a new
# one. An upstream closes an idle connection when its keep-alive timer fires (gunicorn's
# default: 2 s, the shortest in common use); a request already on its way on that
# connection is lost with it, and only a request that can be retried may be sent again.
# Squid opens a new connection for every such request (server_pconn_for_nonretriable);
# a connection idle under a second is far from any keep-alive timer, and reusing it keeps
# a stream of POSTs from paying a connect each (measured: about half the requests/s).
RISKY_REUSE_IDLE_S = 1.0
# Without a body these still say so (Content-Length: 0), as aiohttp's client does.
_BODYLESS_BY_NATURE = frozenset({"GET", "HEAD", "OPTIONS"})


def upstream_name(upstream: URL) -> str:
    """How the upstream is named in /stats, metrics and the shared store's keys."""
    return f"{upstream.host}:{upstream.port}"


def upstream_prefixes(scheme: str, host: str, port: int, path: str) -> tuple[str, ...]:
    """How a Location may name the upstream base URL: lower-case scheme and host, the
    port written or (when it is the scheme's default) left out, the path without its
    trailing slash."""
    scheme, host, path = scheme.lower(), host.lower(), path.rstrip("/")
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    prefixes = [f"{scheme}://{host}:{port}{path}"]
    if port == {"http": 80, "https": 443}.get(scheme):
        prefixes.append(f"{scheme}://{host}{path}")
    return tuple(prefixes)


class UpstreamResponse:
    """The head of an upstream response and its body (``content``) as it arrives.

    Owns its connection until ``release`` (back to the pool when the body was read
    to its end) or ``close`` (never reused); after either, both are no-ops.
    ``sent_at``: when the upstream had the whole request (monotonic: its head written,
    and its body when the body was sent before the answer came): the try's time to the
    response head starts there, not at the pool wait, the connect or the upload.
    """

    __slots__ = (
        "_body_writer", "_pool", "_protocol", "content", "headers", "raw_headers", "reason",
        "sent_at", "status", "version",
    )  # fmt: skip

    def __init__(
        self,
        pool: ConnectionPool,
        protocol: UpstreamProtocol,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: ResponseBody,
        body_writer: asyncio.Task[float | None] | None,
        raw_headers: tuple[tuple[bytes, bytes], ...] = (),
        sent_at: float = 0.0,
        version: tuple[int, int] = (1, 1),
    ) -> None:
        self._pool, self._protocol, self._body_writer = pool, protocol, body_writer
        self.status, self.reason, self.headers, self.content = status, reason, headers, content
        # the fields as received, one per field of ``headers`` and in the same order (names
        # and values as bytes; ``headers`` decodes them, bytes not UTF-8 as surrogates)
        self.raw_headers = raw_headers
        self.sent_at = sent_at
        self.version = version

    def tcp_info(self) -> TcpInfo | None:
        """TCP_INFO of the upstream socket that carries this response."""
        transport = self._protocol.transport if self._protocol is not None else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        return read_tcp_info(sock) if sock is not None else None

    def release(self) -> None:
        writer = self._body_writer
        body_sent = writer is None or (writer.done() and not writer.cancelled())
        self._give_back(body_sent and self.content.is_eof())

    def close(self) -> None:
        self._give_back(False)

    def detach(self) -> Any:
        """The connection after a ``101``, out of the pool (a tunnel holds no pool slot):
        the caller owns it and closes it; ``release`` and ``close`` no longer touch it.

        An ``UpstreamProtocol``, typed ``Any`` for fileproxy/delivery/tunnel.py, which
        wraps it in aiohttp's ``StreamReader`` (typed for aiohttp's own protocols; ours
        has what it calls: ``pause_reading``, ``resume_reading``, ``connected``)."""
        protocol, self._protocol = self._protocol, None  # type: ignore[assignment]
        assert protocol is not None, "released or closed already"
        self._pool.detach(protocol)
        return protocol

    def take_over(self, other: UpstreamResponse) -> None:
        """Carry on with ``other``'s connection (a download resumed from a replica): this
        response's own connection is closed; ``release`` and ``close`` then act on
        ``other``'s, and ``other`` becomes an empty shell. The head stays this one's."""
        self.close()
        self._pool, self._protocol, self._body_writer = other._pool, other._protocol, None
        other._protocol = None  # type: ignore[assignment]

    def _give_back(self, reusable: bool) -> None:
        protocol, self._protocol = self._protocol, None  # type: ignore[assignment]
        if protocol is None:
            return
        if self._body_writer is not None and not self._body_writer.done():
            self._body_writer.cancel()
            reusable = False
        self._pool.release(protocol, reusable)


class UpstreamClient:
    """Requests to the configured upstream; ``send`` takes a raw origin-form target."""

    def __init__(
        self,
        settings: Settings,
        on_connect: ConnectObserver | None = None,
        replica: ReplicaSpec | None = None,
    ) -> None:
        """``replica``: which of FILEPROXY_UPSTREAM's replicas (default: the first)."""
        upstream = settings.upstream if replica is None else replica.url
        self.origin = upstream.origin()
        self.name = upstream_name(upstream)
        self.last_response_at: float | None = None  # wall clock of the last response headers
        self.last_failure_at: float | None = None
        self.last_failure: str | None = None
        self._prefix = upstream.raw_path.rstrip("/")
        # the upstream's base URL as a Location may name it (see headers.Redirect)
        self.redirect_prefixes = upstream_prefixes(
            upstream.scheme, upstream.host or "", upstream.port or 80, upstream.raw_path
        )
        self._host_header = upstream.host_port_subcomponent or ""
        self.authorization = (
            aiohttp.BasicAuth(upstream.user or "", upstream.password or "").encode()
            if upstream.user is not None or upstream.password is not None
            else None
        )
        self.socket_options = tcp_options.socket_options(settings)
        self.refused_options: set[str] = set()
        self.read_bufsize = settings.buffer_size
        limits = [n for n in (settings.connector_limit, settings.connector_limit_per_host) if n]
        self.pool = ConnectionPool(
            upstream.host or "",
            upstream.port or 80,
            limit=min(limits) if limits else 0,
            keepalive_timeout=settings.keepalive_timeout,
            dns_ttl=settings.dns_cache_ttl,
            new_socket=self._new_socket,
            on_connect=on_connect,
            tls=tls.client_context(settings) if upstream.scheme == "https" else None,
        )

    def _new_socket(self, addr_info: Any) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(family=family, type=type_, proto=proto)
        self.refused_options.update(tcp_options.apply(sock, self.socket_options))
        return sock

    async def send(
        self,
        method: str,
        raw_target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        """Send a request upstream and return once its response headers arrived.

        ``headers`` (the proxy's own copy) gets Host and the framing. The body, if
        any, streams after the head, chunked unless ``headers`` has a Content-Length;
        the idle-read timeout starts once it was sent. A request without a body and
        with an idempotent method is sent once more, on another connection, when a
        pooled connection turned out closed before answering. Any other request (a POST,
        one with a body) can never be sent again (RFC 9112 9.3.1), so it takes a pooled
        connection only if that one was idle less than ``RISKY_REUSE_IDLE_S``, else a new
        one: see there.
        """
        target = f"{self._prefix}{raw_target}"
        headers["Host"] = self._host_header
        chunked = body is not None and "Content-Length" not in headers
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        elif body is None and method not in _BODYLESS_BY_NATURE:
            headers["Content-Length"] = "0"
        start_line = f"{method} {target} HTTP/1.1".encode("utf-8", "surrogateescape")
        head = http1.encode_head(start_line, http1.encode_fields(headers.items()))
        retry = body is None and method in IDEMPOTENT_METHODS
        pool = self.pool
        while True:
            protocol, reused = await pool.acquire(
                connect_timeout, idle_at_most=None if retry else RISKY_REUSE_IDLE_S
            )
            try:
                return await self._exchange(protocol, method, head, body, chunked, read_timeout)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                pool.release(protocol, False)
                if not (retry and reused):
                    raise
                retry = False
            except BaseException:
                pool.release(protocol, False)
                raise

    async def _exchange(
        self,
        protocol: UpstreamProtocol,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        read_timeout: float | None,
    ) -> UpstreamResponse:
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise aiohttp.ServerDisconnectedError()
        protocol.expect_response(
            head_only=method == "HEAD", read_timeout=read_timeout, bufsize=self.read_bufsize
        )
        sent_at = time.monotonic()
        transport.write(head)
        writer = None
        if body is None:
            protocol.start_read_timeout()
        else:
            writer = asyncio.create_task(_write_body(protocol, body, chunked))
        try:
            answer, content = await protocol.read_head()  # 1xx skipped; a 101 is final
        except BaseException:
            if writer is not None:
                writer.cancel()
            raise
        if (
            writer is not None
            and writer.done()
            and not writer.cancelled()
            and not writer.exception()
        ):
            # the upstream's time to answer starts when it had the whole request: an
            # upload's own time is the client's link, not the replica's latency
            sent_at = writer.result() or sent_at
        return UpstreamResponse(
            self.pool,
            protocol,
            answer.status,
            answer.reason,
            answer.headers,
            content,
            writer,
            answer.raw_headers,
            sent_at,
            answer.version,
        )

    def mark_response(self, now: float) -> None:
        self.last_response_at = now

    def mark_failure(self, now: float, error: str) -> None:
        self.last_failure_at, self.last_failure = now, error

    async def probe(self, timeout: float) -> bool:
        """Whether a TCP connection to the upstream opens within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(self.origin.host, self.origin.port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    def pool_size(self) -> dict[str, int]:
        """Open upstream connections: in use and idle in the pool."""
        return {"in_use": self.pool.in_use, "idle": self.pool.idle}

    def idle_socket_options(self) -> dict[str, int | None] | None:
        """The options read back from a pooled upstream socket, if one is idle."""
        for protocol in self.pool.idle_protocols():
            transport = protocol.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                return tcp_options.read_back(sock, self.socket_options)
        return None

    async def close(self) -> None:
        self.pool.close()


async def _write_body(
    protocol: UpstreamProtocol, body: AsyncIterator[bytes], chunked: bool
) -> float | None:
    """Stream a request body after its head; a failure fails the response read.

    As aiohttp's client did: the error is set on the protocol (its connection is
    then never reused), and the idle-read timeout starts only once the whole body
    was sent, so a long upload is not cut while the upstream waits for it. Returns
    when (monotonic) the last byte was handed over, None when the body failed.
    """
    transport = protocol.transport
    assert transport is not None
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await protocol.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")
    except OSError as exc:
        failure = aiohttp.ClientOSError(exc.errno, "cannot write the request body")
        protocol.set_exception(failure, exc)
        return None
    except Exception as exc:
        protocol.set_exception(
            aiohttp.ClientConnectionError(f"request body failed: {type(exc).__name__}"), exc
        )
        return None
    protocol.start_read_timeout()
    return time.monotonic()
