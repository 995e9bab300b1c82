"""Slow and abusive clients against the real daemon: slowloris and connection floods.

The slow reader of a large file (memory bounded, upstream paused by backpressure)
is proven in tests/integration/test_streaming.py.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from tests.reliability.rawhttp import (
    RecordingBackend,
    assert_json_error,
    exchange,
    parse_response,
)

H = b"Host: fileproxy.test\r\n"
NORMAL = b"GET /normal HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


async def test_slowloris_connections_get_408_while_normal_requests_pass(start_backend, start_proxy):
    backend = RecordingBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_HEADER_TIMEOUT="2")
    conns = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(300)]
    for _, writer in conns:
        writer.write(b"GET /slow HTTP/1.1\r\n")
    started = time.monotonic()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        # one header byte every second, never the end of the head
        for byte in b"X-Slow: aaaaaaaaaaaaaaaaaaaa":
            await asyncio.sleep(1)
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                return

    tricklers = [asyncio.create_task(trickle(w)) for _, w in conns]
    # a normal request meanwhile is served promptly
    for _ in range(3):
        t0 = time.monotonic()
        resp = parse_response(await exchange(proxy.port, NORMAL, timeout=5))
        assert resp.status == 200 and time.monotonic() - t0 < 1.5
        await asyncio.sleep(0.3)
    # every slow connection gets 408 JSON and is closed, after ~2 s not ~75 s (keep-alive)
    results = await asyncio.gather(*(_read_all(r, 10) for r, _ in conns))
    elapsed = time.monotonic() - started
    for task in tricklers:
        task.cancel()
    for _, writer in conns:
        writer.close()
    assert elapsed < 8, elapsed
    for raw in results:
        body = assert_json_error(parse_response(raw), 408)
        assert body["error"] == "request_timeout"
    assert [path for _, path, _ in backend.seen] == ["/normal"] * 3


async def test_silent_connection_is_closed_without_a_response(start_backend, start_proxy):
    backend = RecordingBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_HEADER_TIMEOUT="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    t0 = time.monotonic()
    assert await _read_all(reader, 5) == b""  # closed quietly, as nginx does
    assert time.monotonic() - t0 < 4
    writer.close()


async def test_idle_keepalive_connection_is_not_cut_by_the_head_timeout(start_backend, start_proxy):
    """The head timeout starts at a request's first byte; idle time is keep-alive's."""
    backend = RecordingBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_HEADER_TIMEOUT="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for _ in range(2):
        writer.write(b"GET /again HTTP/1.1\r\n" + H + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readexactly(len(b"backend ok")), 5)
        await asyncio.sleep(2)  # idle longer than the head timeout
    writer.close()
    assert len(backend.seen) == 2


async def test_connections_beyond_the_limit_get_503_and_the_daemon_recovers(
    start_backend, start_proxy
):
    backend = RecordingBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_MAX_CONNECTIONS="20", FILEPROXY_HEADER_TIMEOUT="30")
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(20)]
    await asyncio.sleep(0.3)
    # the flood: every connection beyond 20 gets a JSON 503 (or is refused), never the backend
    flood = await asyncio.gather(
        *(exchange(proxy.port, b"GET /flood HTTP/1.1\r\n" + H + b"\r\n") for _ in range(50))
    )
    answered = [parse_response(raw) for raw in flood if raw]
    assert answered, "no over-limit connection got an answer"
    for resp in answered:
        assert_json_error(resp, 503)
        assert resp.headers["retry-after"] == "1"
    assert all(path != "/flood" for _, path, _ in backend.seen)
    # the held connections are still served
    reader, writer = held[0]
    writer.write(b"GET /held HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert parse_response(await _read_all(reader, 5)).status == 200
    # and once they go, new connections are served again
    for _, w in held:
        w.close()
    await asyncio.sleep(0.5)
    resp = parse_response(await exchange(proxy.port, NORMAL))
    assert resp.status == 200
    assert [path for _, path, _ in backend.seen] == ["/held", "/normal"]


async def test_a_stalled_request_body_gets_408_and_the_upstream_request_is_cut(
    start_backend, start_proxy
):
    seen: list[int] = []

    async def upload(request: web.Request) -> web.Response:
        received = 0
        try:
            async for chunk in request.content.iter_any():
                received += len(chunk)
        finally:
            seen.append(received)
        return web.Response(text="stored")

    app = web.Application()
    app.router.add_post("/upload", upload)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url, FILEPROXY_BODY_TIMEOUT="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000
    )
    await writer.drain()  # then silence: 99,000 bytes never come
    started = time.monotonic()
    # the answer comes at once; the connection then lingers a little for the rest of the
    # body (so the client reads the 408 rather than a reset), as nginx's lingering close
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    elapsed = time.monotonic() - started
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await asyncio.wait_for(reader.readexactly(length), timeout=5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"] == "request_timeout"
    assert 0.5 < elapsed < 6  # after FILEPROXY_BODY_TIMEOUT, not the keep-alive timeout
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert seen and seen[0] < 100000  # the upstream never got a complete body
