"""Upstream failures and client disconnects, against the real daemon.

Before response headers a failure must be a JSON 502/504 ``{error, detail, request_id}``;
after them the client connection must break so a short body never looks complete.
Either way the daemon keeps serving, counts the failure in /stats and leaks no
upstream connection (/health ``upstream.connections.in_use`` back to 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Process, free_port, get_json

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

Misbehave = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class RawBackend:
    """A raw TCP backend: ``GET /ok`` gets a proper 200, any other request ``misbehave``."""

    def __init__(self, misbehave: Misbehave) -> None:
        self.misbehave = misbehave
        self.server: asyncio.Server | None = None
        self.port = 0
        self.hits = 0  # requests that were answered by `misbehave`
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0, sock: socket.socket | None = None) -> RawBackend:
        if sock is not None:
            self.server = await asyncio.start_server(self._handle, sock=sock)
        else:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            if target == b"/ok":
                writer.write(OK_RESPONSE)
                await writer.drain()
            else:
                self.hits += 1
                await self.misbehave(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[..., Awaitable[RawBackend]]]:
    started: list[RawBackend] = []

    async def start(
        misbehave: Misbehave, port: int = 0, sock: socket.socket | None = None
    ) -> RawBackend:
        backend = RawBackend(misbehave)
        started.append(backend)
        return await backend.start(port, sock)

    yield start
    for backend in started:
        await backend.stop()


async def wait_for_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> None:
    """Keep the connection open until the proxy closes it (or the timeout)."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass


async def metrics_of(client: aiohttp.ClientSession, proxy: Process) -> dict[str, Any]:
    return (await get_json(client, f"{proxy.url}/stats"))["performance_optimizer"]["metrics"]


async def upstream_connections(client: aiohttp.ClientSession, proxy: Process) -> dict[str, int]:
    return (await get_json(client, f"{proxy.url}/health"))["upstream"]["connections"]


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> float:
    """Poll ``check`` until it is true; return the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def wait_no_upstream_in_use(client: aiohttp.ClientSession, proxy: Process) -> float:
    async def released() -> bool:
        return (await upstream_connections(client, proxy))["in_use"] == 0

    return await wait_until(released, "upstream connections.in_use back to 0")


async def assert_error_json(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    body_text = await resp.text()
    assert resp.status == status, body_text
    assert resp.content_type == "application/json", resp.headers
    body = json.loads(body_text)
    assert set(body) == {"error", "detail", "request_id"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert body["request_id"] == resp.headers["X-Request-ID"], (body, resp.headers)
    return body


async def assert_keeps_serving(
    client: aiohttp.ClientSession, proxy: Process, *, failures: int
) -> None:
    """No leaked upstream connection, a normal request gets 200, /stats counted the failures."""
    await wait_no_upstream_in_use(client, proxy)
    async with client.get(f"{proxy.url}/ok") as resp:
        assert resp.status == 200
        assert await resp.read() == b"ok"
    metrics = await metrics_of(client, proxy)
    assert metrics["total_requests"] == failures + 1, metrics
    assert metrics["total_errors"] == failures, metrics
    assert metrics["error_rate"] == pytest.approx(failures / (failures + 1)), metrics
    await wait_no_upstream_in_use(client, proxy)


def with_ok_route(app: web.Application) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    app.router.add_get("/ok", ok)
    return app


# --------------------------------------------------------------------------------------------
# failures before the response headers: JSON 502 / 504
# --------------------------------------------------------------------------------------------


async def test_connection_refused_is_502_json(start_proxy, client, raw_backend):
    port = free_port()  # nobody listens here
    proxy = start_proxy(f"http://127.0.0.1:{port}")

    async with client.get(f"{proxy.url}/files/a.bin") as resp:
        body = await assert_error_json(resp, 502)
    assert body["detail"] == "cannot connect to upstream (ECONNREFUSED)"
    assert str(port) not in str(body)  # the upstream's address is not shown to clients

    # the upstream comes back: the same daemon serves again
    await raw_backend(wait_for_eof, port=port)
    await assert_keeps_serving(client, proxy, failures=1)


async def _close_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    writer.transport.abort()


async def _garbage_status_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HELLO\r\n\r\n")
    await writer.drain()
    await wait_for_eof(reader)


async def _enormous_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nX-Big: "
        + b"a" * 100_000
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    await writer.drain()
    await wait_for_eof(reader)


@pytest.mark.parametrize(
    "misbehave",
    [_close_after_request, _reset_after_request, _garbage_status_line, _enormous_header],
    ids=["close", "reset", "garbage-status", "100k-header"],
)
async def test_upstream_failing_before_headers_is_502_json(
    start_proxy, client, raw_backend, misbehave
):
    backend = await raw_backend(misbehave)
    proxy = start_proxy(backend.url)

    async with client.get(f"{proxy.url}/files/a.bin") as resp:
        await assert_error_json(resp, 502)
    assert backend.hits >= 1

    await assert_keeps_serving(client, proxy, failures=1)


async def test_upstream_slower_than_headers_timeout_is_504_json(start_backend, start_proxy, client):
    handler_ended = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(5)
            return web.Response(body=b"too late")
        finally:
            handler_ended.set()

    app = web.Application()
    app.router.add_get("/slow", slow)
    backend = await start_backend(with_ok_route(app))
    proxy = start_proxy(backend.url, HTTP_TOTAL_TIMEOUT="0.5")

    started = time.monotonic()
    async with client.get(f"{proxy.url}/slow") as resp:
        await assert_error_json(resp, 504)
    elapsed = time.monotonic() - started
    assert elapsed < 3.5, f"504 took {elapsed:.2f}s with HTTP_TOTAL_TIMEOUT=0.5"

    # the proxy dropped the upstream connection, so the backend's handler was cancelled
    await asyncio.wait_for(handler_ended.wait(), 5)
    await assert_keeps_serving(client, proxy, failures=1)


def _fill_accept_queue(listener: socket.socket) -> list[socket.socket]:
    """Connect until the listener's accept queue is full, so that further SYNs are dropped."""
    address = listener.getsockname()
    fillers: list[socket.socket] = []
    for _ in range(64):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(address)
        except TimeoutError:
            return fillers  # the queue is full: a new connect hangs
        finally:
            probe.close()
        fillers.append(probe)
    for filler in fillers:
        filler.close()
    pytest.fail("could not fill the accept queue: the kernel keeps accepting connections")


async def test_connect_timeout_is_504_json(start_proxy, client, raw_backend):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = _fill_accept_queue(listener)
    try:
        proxy = start_proxy(
            f"http://127.0.0.1:{listener.getsockname()[1]}", HTTP_CONNECT_TIMEOUT="0.5"
        )
        started = time.monotonic()
        async with client.get(f"{proxy.url}/files/a.bin") as resp:
            await assert_error_json(resp, 504)
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"504 took {elapsed:.2f}s with HTTP_CONNECT_TIMEOUT=0.5"
    finally:
        for filler in fillers:
            filler.close()

    # the upstream starts accepting: the daemon serves again
    backend = await raw_backend(wait_for_eof, sock=listener)
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", backend.port), 10)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"ok")
    writer.close()
    await assert_keeps_serving(client, proxy, failures=1)


# --------------------------------------------------------------------------------------------
# timeouts once the body flows
# --------------------------------------------------------------------------------------------


async def test_headers_timeout_never_cuts_a_body_that_keeps_moving(
    start_backend, start_proxy, client
):
    pieces = [bytes([65 + i]) * 4096 for i in range(12)]
    body = b"".join(pieces)

    async def dribble(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(body)
        await resp.prepare(request)
        for piece in pieces:
            await asyncio.sleep(0.25)  # ~3 s in all, three times HTTP_TOTAL_TIMEOUT
            await resp.write(piece)
        return resp

    app = web.Application()
    app.router.add_get("/dribble", dribble)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url, HTTP_TOTAL_TIMEOUT="1")

    started = time.monotonic()
    async with client.get(f"{proxy.url}/dribble") as resp:
        assert resp.status == 200
        received = await resp.read()
    assert time.monotonic() - started > 2.5  # it really outlived the headers timeout
    assert received == body
    metrics = await metrics_of(client, proxy)
    assert metrics["total_errors"] == 0, metrics
    await wait_no_upstream_in_use(client, proxy)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_idle_upstream_mid_body_breaks_the_client_read(
    start_backend, start_proxy, client, framing
):
    handler_ended = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        try:
            resp = web.StreamResponse()
            if framing == "content-length":
                resp.content_length = 100_000
            await resp.prepare(request)
            await resp.write(b"x" * 10_000)
            await asyncio.sleep(10)
            await resp.write(b"x" * 90_000)
            return resp
        finally:
            handler_ended.set()

    app = web.Application()
    app.router.add_get("/stall", stall)
    backend = await start_backend(with_ok_route(app))
    proxy = start_proxy(backend.url, FILEPROXY_READ_TIMEOUT="0.5")

    started = time.monotonic()
    async with client.get(f"{proxy.url}/stall") as resp:
        assert resp.status == 200
        if framing == "content-length":
            assert resp.content_length == 100_000
        else:
            assert resp.content_length is None
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await resp.read()  # never a clean end of the body
    elapsed = time.monotonic() - started
    assert elapsed < 6, f"the client read failed only after {elapsed:.2f}s (backend stalls 10s)"

    await asyncio.wait_for(handler_ended.wait(), 5)  # the upstream connection was dropped
    await assert_keeps_serving(client, proxy, failures=1)


async def test_upstream_body_shorter_than_content_length_breaks_the_client_read(
    start_proxy, client, raw_backend
):
    async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"y" * 50_000)
        await writer.drain()
        writer.close()

    backend = await raw_backend(short_body)
    proxy = start_proxy(backend.url)

    async with client.get(f"{proxy.url}/files/short.bin") as resp:
        assert resp.status == 200
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await resp.read()  # not a clean 50000-byte body

    await assert_keeps_serving(client, proxy, failures=1)


async def test_upstream_failing_mid_body_resets_a_client_whose_body_ends_at_close(
    start_proxy, raw_backend
):
    """An HTTP/1.0 client of a response without Content-Length (a stream, chunked from the
    upstream) has only the connection's end to tell where the body ends: an upstream that
    fails mid-body must reset it (RST), since a FIN would make the short body complete."""

    async def cut_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"%x\r\n" % 50_000 + b"z" * 50_000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)  # the client has the head and the first chunk
        writer.close()  # no last chunk: the body broke off

    backend = await raw_backend(cut_stream)
    proxy = start_proxy(backend.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /stream HTTP/1.0\r\nHost: localhost\r\n\r\n")
        received = b""
        with pytest.raises(ConnectionResetError):  # never a clean end of the connection
            async with asyncio.timeout(10):
                while piece := await reader.read(65536):
                    received += piece
            pytest.fail(f"the connection ended with a FIN after {len(received)} bytes")
        assert received.startswith(b"HTTP/1.") and b" 200 " in received.split(b"\r\n")[0]
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------
# clients that go away
# --------------------------------------------------------------------------------------------


def _log_lines(proxy: Process) -> list[dict[str, Any]]:
    lines = []
    for raw in proxy.log_text().splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            if isinstance(line, dict):
                lines.append(line)
    return lines


async def _assert_disconnect_accounted(
    client: aiohttp.ClientSession, proxy: Process, request_id: str, aborts_before: int
) -> None:
    """client_aborts +1, one log line about the disconnect, no traceback, nothing leaked."""
    await wait_no_upstream_in_use(client, proxy)

    async def counted() -> bool:
        return (await metrics_of(client, proxy))["client_aborts"] == aborts_before + 1

    await wait_until(counted, "/stats client_aborts increased by 1")

    def disconnect_lines() -> list[dict[str, Any]]:
        return [
            line
            for line in _log_lines(proxy)
            if line.get("request_id") == request_id and "disconnect" in str(line.get("msg")).lower()
        ]

    async def logged() -> bool:
        return bool(disconnect_lines())

    await wait_until(logged, "a log line about the client disconnect")
    await asyncio.sleep(1)  # room for a duplicate line to show up
    assert len(disconnect_lines()) == 1, disconnect_lines()
    for line in _log_lines(proxy):
        if line.get("request_id") == request_id:
            assert line.get("level") not in ("warning", "error", "critical"), line
    assert "Traceback" not in proxy.log_text()
    metrics = await metrics_of(client, proxy)
    assert metrics["client_aborts"] == aborts_before + 1, metrics
    assert metrics["in_flight"] == 0, metrics


async def test_client_disconnect_mid_stream_releases_the_upstream(
    start_backend, start_proxy, client
):
    ended: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 1 << 40
        await resp.prepare(request)
        how = "completed"
        try:
            while True:
                await resp.write(b"z" * 65536)
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        except ConnectionError:
            how = "write failed"
            return resp
        finally:
            if not ended.done():
                ended.set_result((how, time.monotonic()))

    app = web.Application()
    app.router.add_get("/endless", endless)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)
    aborts_before = (await metrics_of(client, proxy))["client_aborts"]

    request_id = "disconnect-test-1"
    resp = await client.get(f"{proxy.url}/endless", headers={"X-Request-ID": request_id})
    assert resp.status == 200
    read = 0
    while read < 1 << 20:
        read += len(await resp.content.read(65536))
    resp.close()  # drop the connection mid-body
    closed_at = time.monotonic()

    how, when = await asyncio.wait_for(ended, 10)
    assert how in ("cancelled", "write failed")
    assert when - closed_at < 5, f"the upstream noticed only {when - closed_at:.2f}s later"
    await _assert_disconnect_accounted(client, proxy, request_id, aborts_before)


async def test_client_disconnect_from_a_large_download(sample_upstream, start_proxy, client):
    proxy = start_proxy(sample_upstream.url)
    aborts_before = (await metrics_of(client, proxy))["client_aborts"]

    request_id = "disconnect-test-256m"
    resp = await client.get(f"{proxy.url}/files/256m.bin", headers={"X-Request-ID": request_id})
    assert resp.status == 200
    assert resp.content_length == 256 * 1024 * 1024
    read = 0
    while read < 4 << 20:
        read += len(await resp.content.read(65536))
        await asyncio.sleep(0.001)  # a slow reader
    resp.close()

    await _assert_disconnect_accounted(client, proxy, request_id, aborts_before)
    async with client.get(f"{proxy.url}/files/hello.txt") as again:
        assert again.status == 200
        assert await again.read() == b"Hello from the fileproxy sample upstream!\n"


async def test_client_disconnect_from_an_idle_sse_stream_releases_the_upstream(
    start_backend, start_proxy, client
):
    cancelled_at: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def idle_sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": connected\n\n")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled_at.set_result(time.monotonic())
            raise
        return resp

    app = web.Application()
    app.router.add_get("/events", idle_sse)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)  # default FILEPROXY_READ_TIMEOUT: 60 s
    aborts_before = (await metrics_of(client, proxy))["client_aborts"]

    request_id = "disconnect-test-sse"
    resp = await client.get(f"{proxy.url}/events", headers={"X-Request-ID": request_id})
    assert resp.status == 200
    assert await asyncio.wait_for(resp.content.readline(), 10) == b": connected\n"
    assert (await upstream_connections(client, proxy))["in_use"] == 1
    resp.close()
    closed_at = time.monotonic()

    when = await asyncio.wait_for(cancelled_at, 10)
    assert when - closed_at < 5, f"the upstream was released only {when - closed_at:.2f}s later"
    await _assert_disconnect_accounted(client, proxy, request_id, aborts_before)


# --------------------------------------------------------------------------------------------
# a pooled connection the backend closes while the next request is on its way
# --------------------------------------------------------------------------------------------


class DelayingLink:
    """A TCP relay in front of a backend: what the proxy sends arrives ``delay`` seconds
    later, what the backend sends (its FIN too) at once. A link with latency, where a
    backend's keep-alive timer can fire while a request is on its way to it."""

    def __init__(self, backend_port: int, delay: float) -> None:
        self.backend_port, self.delay = backend_port, delay
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DelayingLink:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        backend_r, backend_w = await asyncio.open_connection("127.0.0.1", self.backend_port)
        loop = asyncio.get_running_loop()

        on_the_way: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while data := await client_r.read(65536):
                on_the_way.put_nowait((loop.time() + self.delay, data))
            on_the_way.put_nowait((loop.time() + self.delay, b""))

        async def deliver() -> None:  # each piece ``delay`` after it arrived, in order
            while True:
                due, data = await on_the_way.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                backend_w.write(data)
            backend_w.close()

        async def downstream() -> None:  # at once; the backend's close closes the client's
            while data := await backend_r.read(65536):
                client_w.write(data)
            client_w.close()

        try:
            await asyncio.gather(receive(), deliver(), downstream())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            client_w.close()
            backend_w.close()
            self.tasks.discard(task)


@pytest.mark.slow
async def test_a_post_does_not_meet_a_pooled_connection_the_backend_is_closing(start_proxy, client):
    """The backend (aiohttp, keep-alive 2 s as gunicorn's default) closes its idle
    connection while the proxy's next POST is on the link (0.6 s on the way): on that
    pooled connection the POST would be lost, and a proxy must not send it again
    (RFC 9112 9.3.1): a 502. A request that cannot be retried reuses only a connection
    idle less than a second, else gets a new one; back-to-back POSTs and GETs reuse."""

    carried_by: list[tuple[str, object]] = []  # (method, the backend's peer: a connection)

    async def echo(request: web.Request) -> web.Response:
        assert request.transport is not None
        carried_by.append((request.method, request.transport.get_extra_info("peername")))
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, keepalive_timeout=2.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend_port = runner.addresses[0][1]
    try:
        async with DelayingLink(backend_port, delay=0.6) as link:
            proxy = start_proxy(link.url)
            for n in range(2):
                async with client.post(f"{proxy.url}/form", data=b"x=%d" % n) as resp:
                    assert resp.status == 200, await resp.text()
                    assert await resp.read() == b"x=%d" % n
                # sent 1.6 s after the answer: it reaches the backend at 2.2 s, after its
                # keep-alive timer (2 s) closed the connection it was pooled on
                await asyncio.sleep(1.6)
            for path in ("/form", "/again"):  # back to back: the same connection
                async with client.post(f"{proxy.url}{path}", data=b"last") as resp:
                    assert resp.status == 200, await resp.text()
            for _ in range(2):
                async with client.get(f"{proxy.url}/file") as resp:
                    assert resp.status == 200
    finally:
        await runner.cleanup()
    posts = [peer for method, peer in carried_by if method == "POST"]
    gets = [peer for method, peer in carried_by if method == "GET"]
    assert len(posts) == 4 and len(set(posts[:3])) == 3, carried_by  # spaced: one each
    assert posts[3] == posts[2], carried_by  # back to back: reused
    assert gets == [posts[3]] * 2, carried_by
