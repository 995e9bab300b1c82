"""The pooled HTTP client that talks to the upstream, built from the settings."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.client import IDEMPOTENT_METHODS
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import EMPTY_BODY_METHODS, TimeoutHandle
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

from . import tcp_options
from .adaptive import TcpInfo, read_tcp_info
from .settings import Settings

# Headers aiohttp would invent that the real client never sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

ConnectObserver = Callable[[float, float], None]  # (now, connect seconds)

# The aiohttp releases whose ClientSession._request the bodyless path below was
# checked against (it uses the session's internals, which a patch release may
# change); any other version, newer patch releases included, takes
# session.request(): slower, never wrong.
LEAN_PATH_VERSIONS = frozenset({"3.14.5"})


class TimedConnector(aiohttp.TCPConnector):
    """A TCPConnector that reports how long each new connection took to open.

    A connect is about one network round trip. Timed here rather than with an
    aiohttp ``TraceConfig``: a trace config makes the client build and send a dozen
    signals on every request, pooled or not; this costs nothing on a reused
    connection.
    """

    def __init__(self, *, on_connect: ConnectObserver | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_connect = on_connect

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        started = time.monotonic()
        protocol = await super()._create_connection(req, traces, timeout)
        if self._on_connect is not None:
            now = time.monotonic()
            self._on_connect(now, now - started)
        return protocol


def upstream_name(upstream: URL) -> str:
    """How the upstream is named in /stats, metrics and the shared store's keys."""
    return f"{upstream.host}:{upstream.port}"


class UpstreamClient:
    """One pooled session to the configured upstream; ``url_for`` maps a raw request target."""

    def __init__(self, settings: Settings, on_connect: ConnectObserver | None = None) -> None:
        upstream = settings.upstream
        self.origin = upstream.origin()
        self.name = upstream_name(upstream)
        self.last_response_at: float | None = None  # wall clock of the last response headers
        self.last_failure_at: float | None = None
        self.last_failure: str | None = None
        self._prefix = upstream.raw_path.rstrip("/")
        self.authorization = (
            aiohttp.BasicAuth(upstream.user or "", upstream.password or "").encode()
            if upstream.user is not None or upstream.password is not None
            else None
        )
        self.socket_options = tcp_options.socket_options(settings)
        self.refused_options: set[str] = set()
        connector = TimedConnector(
            on_connect=on_connect,
            limit=settings.connector_limit,
            limit_per_host=settings.connector_limit_per_host,
            keepalive_timeout=settings.keepalive_timeout,
            use_dns_cache=settings.dns_cache_ttl > 0,
            ttl_dns_cache=settings.dns_cache_ttl or None,
            socket_factory=self._new_socket,
        )
        self.connector = connector
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,  # a download that keeps moving is never cut
                connect=None,  # waiting for a pool slot is bounded by the headers timeout
                sock_connect=settings.connect_timeout,
                sock_read=settings.read_timeout,  # idle time between two reads
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=settings.buffer_size,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,
        )
        self._lean = aiohttp.__version__ in LEAN_PATH_VERSIONS

    def _new_socket(self, addr_info: Any) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(family=family, type=type_, proto=proto)
        self.refused_options.update(tcp_options.apply(sock, self.socket_options))
        return sock

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        data: Any,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """Send a request upstream and return once its response headers arrived.

        Redirects are never followed. A request without a body (most of them: GET,
        HEAD) takes ``_send_bodyless``, which skips ``ClientSession.request``'s
        generality; with a body, or on an aiohttp version it was not written
        against, ``session.request`` itself.
        """
        if data is not None or not self._lean:
            return await self.session.request(
                method, url, headers=headers, data=data, allow_redirects=False, timeout=timeout
            )
        return await self._send_bodyless(method, url, headers, timeout)

    async def _send_bodyless(
        self, method: str, url: URL, headers: CIMultiDict[str], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """``ClientSession._request`` of aiohttp 3.14 for this session and no body.

        The same steps in the same order, without what this session never uses
        (cookies: a DummyCookieJar; auth, proxies, netrc: trust_env=False; traces,
        client middlewares, redirects, raise_for_status, a total timeout; default
        headers): connect (pool), send, read the response head, and one retry on a
        new connection when a pooled connection turned out closed (idempotent
        methods, as aiohttp does). Errors are aiohttp's own, as from
        ``session.request``.
        """
        session = self.session
        if session.closed:
            raise RuntimeError("Session is closed")
        method = method.upper()
        loop = session._loop
        tm = TimeoutHandle(loop, timeout.total, ceil_threshold=timeout.ceil_threshold)
        handle = tm.start()
        retry = session._retry_connection and method in IDEMPOTENT_METHODS
        req: aiohttp.ClientRequest | None = None
        resp: aiohttp.ClientResponse | None = None
        try:
            with tm.timer() as timer:
                while True:
                    req = session._request_class(
                        method,
                        url,
                        headers=headers,
                        skip_auto_headers=session._skip_auto_headers,
                        data=None,
                        version=session._version,
                        loop=loop,
                        response_class=session._response_class,
                        timer=timer,
                        session=session,
                        ssl=True,
                        traces=[],
                        trust_env=False,
                    )
                    try:
                        resp = await self._connect_and_send(req, timer, timeout)
                    except (
                        aiohttp.ConnectionTimeoutError,
                        aiohttp.ClientConnectorError,
                        aiohttp.ClientConnectorCertificateError,
                        aiohttp.ClientConnectorSSLError,
                    ):
                        raise
                    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                        if not retry:
                            raise
                        retry = False
                        continue
                    except aiohttp.ClientError:
                        raise
                    except OSError as exc:
                        if exc.errno is None and isinstance(exc, TimeoutError):
                            raise
                        raise aiohttp.ClientOSError(*exc.args) from exc
                    break
            if req._body is not None:
                await req._body.close()
            if handle is not None:
                if resp.connection is not None:
                    resp.connection.add_callback(handle.cancel)
                else:
                    handle.cancel()
            return resp
        except BaseException:
            tm.close()
            if handle:
                handle.cancel()
            if resp is not None:
                resp.close()
            if req is not None and req._body is not None:
                await req._body.close()
            raise

    async def _connect_and_send(
        self, req: aiohttp.ClientRequest, timer: Any, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        session = self.session
        try:
            conn = await self.connector.connect(req, traces=[], timeout=timeout)
        except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError on 3.11+
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {req.url}") from exc
        assert conn.protocol is not None
        conn.protocol.set_response_params(
            timer=timer,
            skip_payload=req.method in EMPTY_BODY_METHODS,
            read_until_eof=True,
            auto_decompress=session._auto_decompress,
            read_timeout=timeout.sock_read,
            read_bufsize=session._read_bufsize,
            timeout_ceil_threshold=self.connector._timeout_ceil_threshold,
            max_line_size=session._max_line_size,
            max_field_size=session._max_field_size,
            max_headers=session._max_headers,
        )
        try:
            resp = await req.send(conn)
            try:
                await resp.start(conn)
            except BaseException:
                resp.close()
                raise
        except BaseException:
            conn.close()
            raise
        return resp

    def url_for(self, raw_target: str) -> URL:
        """The upstream URL for a raw origin-form target, byte for byte (no decoding)."""
        return URL(f"{self.origin}{self._prefix}{raw_target}", encoded=True)

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
        acquired = len(self.connector._acquired)
        idle = sum(len(conns) for conns in self.connector._conns.values())
        return {"in_use": acquired, "idle": idle}

    def idle_socket_options(self) -> dict[str, int | None] | None:
        """The options read back from a pooled upstream socket, if one is idle."""
        for conns in self.connector._conns.values():
            for protocol, _ in conns:
                sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
                if sock is not None:
                    return tcp_options.read_back(sock, self.socket_options)
        return None

    async def close(self) -> None:
        await self.session.close()


def response_tcp_info(response: aiohttp.ClientResponse) -> TcpInfo | None:
    """TCP_INFO of the upstream socket that carried ``response``."""
    connection = response.connection
    transport = connection.transport if connection is not None else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    return read_tcp_info(sock) if sock is not None else None
