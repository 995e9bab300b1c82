"""WebSocket tunnels: after the upstream's ``101 Switching Protocols``, bytes both ways.

nginx tunnels a WebSocket when configured as its documentation says
(``proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header
Connection "upgrade"``); fileproxy does the same for a request with ``Upgrade:
websocket`` (``headers.websocket_upgrade``): it goes upstream with its Upgrade, and a
``101`` answer joins the two connections into one tunnel:

- bytes are relayed as they arrive, never parsed; each side is paused while the other
  cannot take more (aiohttp's StreamReader flow control on both connections);
- an end is passed on: the client's FIN half-closes the upstream connection, whose
  rest still reaches the client; the upstream's end ends the tunnel (its last bytes
  go out, then the client's connection closes);
- silence both ways for ``FILEPROXY_READ_TIMEOUT`` closes it (cause ``idle_timeout``),
  as nginx's proxy_read_timeout closes a silent WebSocket (ping frames keep one
  open); a client that takes none of its bytes is aborted by the edge's send timeout;
- a graceful stop closes every tunnel when the drain begins (``Tunnels.end_all``, the
  app's on_shutdown; cause ``shutdown``), so it never waits out the graceful timeout;
- the upstream connection leaves the pool at the ``101``: tunnels never hold one of
  HTTP_CONNECTOR_LIMIT's slots, and each closes its own.

A tunnel is one proxied request: counted in /stats while open and after, with one
access line at its end: status 101, ``bytes_in``/``bytes_out`` the bytes relayed each
way, and its cause (``ok``, ``idle_timeout``, ``client_abort``, ``upstream_error``,
``send_timeout``, ``shutdown``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from fileproxy.exchange import CLIENT_ABORT, IDLE_TIMEOUT, OK, SHUTDOWN, UPSTREAM_ERROR, Exchange
from fileproxy.http import errors
from fileproxy.http.data_plane import ClientRequest, ClientResponse
from fileproxy.http.headers import tunnel_response_headers, websocket_upgrade
from fileproxy.upstream.client import UpstreamResponse
from fileproxy.upstream.protocol import UpstreamProtocol as ResponseHandler
from fileproxy.upstream.protocol import take_upgraded, wait_writable

log = logging.getLogger("fileproxy.tunnel")

# a side is paused once this much (x2, aiohttp's StreamReader rule) waits for the other
TUNNEL_BUFFER = 64 * 1024


def wanted(request: ClientRequest) -> bool:
    """Whether ``request`` asks for a WebSocket this proxy tunnels: HTTP/1.1, and the
    parser stopped at its head (what follows on the connection is not HTTP)."""
    return (
        request.version == aiohttp.HttpVersion11
        and websocket_upgrade(request.method, request.headers)
        and request.protocol.upgraded
    )


class Tunnels:
    """A worker's open tunnels, closed when a graceful stop begins."""

    def __init__(self) -> None:
        self.open: set[_Tunnel] = set()
        self.total = 0

    async def end_all(self, app: web.Application) -> None:
        """The app's on_shutdown: the listeners are closed, the drain begins."""
        if self.open:
            log.info("draining: closing tunnels", extra={"tunnels": len(self.open)})
        for tunnel in list(self.open):
            tunnel.end(SHUTDOWN)


class _Tunnel:
    __slots__ = ("cause", "ended", "last_active")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ended: asyncio.Future[None] = loop.create_future()
        self.cause = OK
        self.last_active = loop.time()

    def end(self, cause: str) -> None:
        if not self.ended.done():
            self.cause = cause
            self.ended.set_result(None)


class _Inflow:
    """One side's bytes, as its protocol hands them on after an upgrade, into the
    reader of the pump towards the other side."""

    __slots__ = ("reader",)

    def __init__(self, reader: aiohttp.StreamReader) -> None:
        self.reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if data and not self.reader.is_eof():
            self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()

    def set_exception(self, exc: BaseException, exc_cause: Any = None) -> None:
        self.reader.set_exception(exc)


async def relay(
    request: ClientRequest,
    exchange: Exchange,
    upstream_resp: UpstreamResponse,
    asked: bool,
    tunnels: Tunnels,
    idle_timeout: float,
) -> ClientResponse | web.Response:
    """The upstream answered ``101``: tunnel until either side ends (or a 502 when the
    request never asked to switch protocols)."""
    exchange.upstream_status = upstream_resp.status
    if not asked:
        failure = errors.Failure(502, "upstream_bad_response", "upstream switched protocols")
        exchange.cause, exchange.error = failure.cause, failure.error
        return errors.error_response(failure, exchange.request_id)
    protocol = request.protocol
    loop = asyncio.get_running_loop()
    connection = upstream_resp.detach()
    try:
        from_upstream = aiohttp.StreamReader(connection, TUNNEL_BUFFER, loop=loop)
        take_upgraded(connection, _Inflow(from_upstream), from_upstream)
        response = ClientResponse(101, upstream_resp.reason)
        tunnel_response_headers(upstream_resp.headers, exchange.request_id, response.headers)
        protocol.send_switch(request, response)
        exchange.status_sent = 101
        from_client = aiohttp.StreamReader(protocol, TUNNEL_BUFFER, loop=loop)  # type: ignore[arg-type]
        protocol.tunnel_to(_Inflow(from_client))
        tunnel = _Tunnel(loop)
        tunnels.open.add(tunnel)
        tunnels.total += 1
        try:
            await _run(
                tunnel, exchange, from_client, connection, from_upstream, request, idle_timeout
            )
        finally:
            tunnels.open.discard(tunnel)
        exchange.cause = tunnel.cause
        return response
    finally:
        connection.close()


async def _run(
    tunnel: _Tunnel,
    exchange: Exchange,
    from_client: aiohttp.StreamReader,
    connection: ResponseHandler,
    from_upstream: aiohttp.StreamReader,
    request: ClientRequest,
    idle_timeout: float,
) -> None:
    loop = asyncio.get_running_loop()
    pumps = (
        asyncio.create_task(_to_upstream(tunnel, exchange, from_client, connection)),
        asyncio.create_task(_to_client(tunnel, exchange, from_upstream, request)),
    )
    try:
        while not tunnel.ended.done():
            idle_left = tunnel.last_active + idle_timeout - loop.time()
            if idle_left <= 0:
                tunnel.end(IDLE_TIMEOUT)
                break
            await asyncio.wait((tunnel.ended,), timeout=idle_left)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.wait(pumps)
    for pump in pumps:
        if not pump.cancelled() and (exc := pump.exception()) is not None:
            raise exc


async def _to_upstream(
    tunnel: _Tunnel,
    exchange: Exchange,
    from_client: aiohttp.StreamReader,
    connection: ResponseHandler,
) -> None:
    loop = asyncio.get_running_loop()
    transport = connection.transport
    try:
        while data := await from_client.readany():
            if transport is None or transport.is_closing():
                raise aiohttp.ServerDisconnectedError()
            transport.write(data)
            exchange.bytes_in += len(data)
            tunnel.last_active = loop.time()
            await wait_writable(connection)
        # the client's FIN: passed on, and the upstream's rest still comes (unless the
        # upstream closed meanwhile: then the other pump ends the tunnel)
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
    except (aiohttp.ClientError, OSError):
        tunnel.end(UPSTREAM_ERROR)


async def _to_client(
    tunnel: _Tunnel,
    exchange: Exchange,
    from_upstream: aiohttp.StreamReader,
    request: ClientRequest,
) -> None:
    protocol = request.protocol
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await from_upstream.readany()
        except (aiohttp.ClientError, OSError):
            tunnel.end(UPSTREAM_ERROR)
            return
        if not data:
            tunnel.end(OK)  # the upstream closed: so does the tunnel
            return
        try:
            await protocol.send_tunnelled(data)
        except ConnectionError:
            tunnel.end(CLIENT_ABORT)
            return
        exchange.bytes_out += len(data)
        tunnel.last_active = loop.time()
