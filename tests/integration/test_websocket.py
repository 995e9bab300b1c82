"""WebSockets through fileproxy: tunnelled after the backend's 101, as nginx tunnels them.

Both ends are real WebSocket implementations nobody here wrote: aiohttp's
``ClientSession.ws_connect`` as the client, an aiohttp ``WebSocketResponse`` as the
backend. Messages pass both ways, a close started by either side reaches the other,
a tunnel silent for FILEPROXY_READ_TIMEOUT is closed, a graceful stop closes tunnels
at once, and each tunnel has its access line (status 101, cause, bytes each way).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.conftest import Process
from tests.integration.test_deployment import start_nginx

BIG = bytes(range(256)) * 4096  # 1 MiB: more than every buffer on the way


@dataclass
class WebSocketBackend:
    """/ws greets, echoes text, reverses binary, closes with 4000 on "close"; it records
    how each of its sockets ended."""

    closed: list[int | None] = field(default_factory=list)
    open_now: int = 0

    def app(self) -> web.Application:
        async def ws_handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(max_msg_size=4 * len(BIG))
            await ws.prepare(request)
            self.open_now += 1
            try:
                await ws.send_str("welcome")
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT:
                        if msg.data == "close":
                            await ws.close(code=4000, message=b"bye")
                            break
                        await ws.send_str(f"echo:{msg.data}")
                    elif msg.type == WSMsgType.BINARY:
                        await ws.send_bytes(msg.data[::-1])
            finally:
                self.open_now -= 1
                self.closed.append(ws.close_code)
            return ws

        app = web.Application()
        app.router.add_get("/ws", ws_handler)
        return app


async def until(check: Any, timeout: float, what: str, proxy: Process) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s:\n{proxy.log_text()[-3000:]}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def ws_session():
    async with aiohttp.ClientSession() as session:
        yield session


async def open_tunnel(session: aiohttp.ClientSession, proxy: Process) -> Any:
    ws = await session.ws_connect(
        f"{proxy.url}/ws", max_msg_size=4 * len(BIG), timeout=aiohttp.ClientWSTimeout(ws_close=10)
    )
    greeting = await ws.receive(timeout=10)
    assert (greeting.type, greeting.data) == (WSMsgType.TEXT, "welcome")
    return ws


async def in_flight(session: aiohttp.ClientSession, proxy: Process) -> tuple[int, dict[str, int]]:
    """Requests in flight, and the tunnels (open, total), from /stats."""
    async with session.get(f"{proxy.url}/stats") as resp:
        stats = await resp.json()
    return int(stats["performance_optimizer"]["metrics"]["in_flight"]), stats["tunnels"]


async def test_messages_pass_both_ways_and_the_clients_close_reaches_the_backend(
    start_backend, start_proxy, ws_session
):
    backend = WebSocketBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_ACCESS_LOG="on")
    ws = await open_tunnel(ws_session, proxy)
    assert ws.get_extra_info("peername") is not None
    await ws.send_str("hello")
    reply = await ws.receive(timeout=10)
    assert (reply.type, reply.data) == (WSMsgType.TEXT, "echo:hello")
    await ws.send_bytes(BIG)
    reply = await ws.receive(timeout=20)
    assert reply.type == WSMsgType.BINARY and reply.data == BIG[::-1]
    # the tunnel counts while open
    assert await in_flight(ws_session, proxy) == (1, {"open": 1, "total": 1})
    await ws.close()  # the close handshake passes through both ways
    assert ws.close_code == 1000
    await until(lambda: backend.closed == [1000], 10, "the backend seeing the close", proxy)
    line = await until(lambda: proxy.access_line("/ws"), 10, "the tunnel's access line", proxy)
    assert (line["status"], line["upstream_status"], line["cause"]) == (101, 101, "ok"), line
    assert line["bytes_in"] > len(BIG) and line["bytes_out"] > len(BIG), line
    assert await in_flight(ws_session, proxy) == (0, {"open": 0, "total": 1})


async def test_the_backends_close_reaches_the_client(start_backend, start_proxy, ws_session):
    backend = WebSocketBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_ACCESS_LOG="on")
    ws = await open_tunnel(ws_session, proxy)
    await ws.send_str("close")
    msg = await ws.receive(timeout=10)
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4000, "bye")
    await ws.close()
    line = await until(lambda: proxy.access_line("/ws"), 10, "the tunnel's access line", proxy)
    assert (line["status"], line["cause"]) == (101, "ok"), line
    # the backend's close was answered: the client's close frame (1000) came back to it
    assert backend.closed == [1000]


async def test_a_silent_tunnel_is_closed_after_the_idle_timeout(
    start_backend, start_proxy, ws_session
):
    backend = WebSocketBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_READ_TIMEOUT="2", FILEPROXY_ACCESS_LOG="on")
    ws = await open_tunnel(ws_session, proxy)
    await ws.send_str("once")
    assert (await ws.receive(timeout=10)).data == "echo:once"
    silent_since = time.monotonic()
    msg = await ws.receive(timeout=30)  # nobody says anything: the proxy closes the tunnel
    silent_for = time.monotonic() - silent_since
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED), msg
    assert 1.5 < silent_for < 20, silent_for
    await until(lambda: backend.open_now == 0, 10, "the backend's side closed", proxy)
    line = await until(lambda: proxy.access_line("/ws"), 10, "the tunnel's access line", proxy)
    assert (line["status"], line["cause"]) == (101, "idle_timeout"), line
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0, line
    await ws.close()


@pytest.mark.slow
async def test_a_graceful_stop_closes_tunnels_at_once(start_backend, start_proxy, ws_session):
    backend = WebSocketBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(
        server.url,
        FILEPROXY_GRACEFUL_TIMEOUT="60",  # a drain that waited for the tunnel would take this
        FILEPROXY_DRAIN_DELAY="0",
        FILEPROXY_ACCESS_LOG="on",
    )
    ws = await open_tunnel(ws_session, proxy)
    await ws.send_str("before the stop")
    assert (await ws.receive(timeout=10)).data == "echo:before the stop"
    stopped_at = time.monotonic()
    os.kill(proxy.pid, signal.SIGTERM)
    msg = await ws.receive(timeout=30)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED), msg
    assert await asyncio.to_thread(proxy.popen.wait, 30) == 0, proxy.log_text()
    assert time.monotonic() - stopped_at < 20  # far from the 60 s graceful timeout
    await until(lambda: backend.open_now == 0, 10, "the backend's side closed", proxy)
    line = proxy.access_line("/ws")
    assert line is not None and line["status"] == 101, proxy.log_text()
    assert line["cause"] == "shutdown", line  # closed by the stop, not by either side
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0, line
    assert "closing tunnels" in proxy.log_text()
    assert "Traceback" not in proxy.log_text()
    await ws.close()


async def test_a_websocket_through_the_shipped_nginx_site(
    start_backend, start_proxy, ws_session, tmp_dir
):
    """client -> nginx (conf/nginx/fileproxy.conf) -> fileproxy -> backend, all real."""
    backend = WebSocketBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_ACCESS_LOG="on")
    nginx = start_nginx(tmp_dir / "nginx", f"127.0.0.1:{proxy.port}")
    try:
        ws = await open_tunnel(ws_session, nginx)
        await ws.send_str("via nginx")
        assert (await ws.receive(timeout=10)).data == "echo:via nginx"
        await ws.close()
        assert ws.close_code == 1000
        await until(lambda: backend.closed == [1000], 10, "the backend seeing the close", proxy)
        line = await until(lambda: proxy.access_line("/ws"), 10, "the access line", proxy)
        assert (line["status"], line["cause"]) == (101, "ok"), line
        # the keepalive connections from nginx still serve plain requests
        async with ws_session.get(f"{nginx.url}/health") as resp:
            assert resp.status == 200
    finally:
        nginx.stop()


async def test_a_client_that_resets_ends_the_tunnel_and_frees_it(
    start_backend, start_proxy, ws_session
):
    """The client's RST cancels the handler mid-tunnel: the upstream side is closed and
    the tunnel counted and logged as the client's abort."""
    backend = WebSocketBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url, FILEPROXY_ACCESS_LOG="on")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head  # RFC 6455
    greeting = await asyncio.wait_for(reader.readexactly(2 + len("welcome")), 10)
    assert greeting == b"\x81\x07welcome"  # an unmasked text frame, as the backend sent it
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST
    await until(lambda: backend.open_now == 0, 10, "the backend's side closed", proxy)
    line = await until(lambda: proxy.access_line("/ws"), 10, "the tunnel's access line", proxy)
    assert (line["status"], line["cause"]) == (101, "client_abort"), line
    assert line["bytes_out"] == len(greeting), line
    assert await in_flight(ws_session, proxy) == (0, {"open": 0, "total": 1})
