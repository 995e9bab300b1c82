"""A client that stops reading is timed out (FILEPROXY_SEND_TIMEOUT, nginx's send_timeout).

The client here is a raw socket with a tiny receive buffer that asks for a large body
and never reads a byte: its TCP window closes, every write to it waits, and without a
send timeout it holds the handler, its sockets, the spool file and (in the plain relay)
an upstream connection for ever. With ``FILEPROXY_SEND_TIMEOUT=2`` the proxy aborts it,
says so in the access line, and every resource is given back.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Process

MIB = 1024 * 1024
BODY = 64 * MIB  # far more than every buffer between the proxy and the client holds
PIECE = b"x" * (256 * 1024)


def large_backend() -> web.Application:
    """/stream: a body without Content-Length (the plain relay, never spooled);
    /long: one with it (a slow client's rest goes to the spool)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        for _ in range(BODY // len(PIECE)):
            await response.write(PIECE)
        await response.write_eof()
        return response

    async def long(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.content_length = BODY
        await response.prepare(request)
        for _ in range(BODY // len(PIECE)):
            await response.write(PIECE)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/long", long)
    return app


def stalled_client(port: int, path: str) -> socket.socket:
    """Asks for ``path`` with a 4 KiB receive buffer, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: fileproxy.test\r\n\r\n".encode())
    return sock


async def get_json(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with client.get(url) as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def until(check: Any, timeout: float, what: str, proxy: Process) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s:\n{proxy.log_text()[-3000:]}")
        await asyncio.sleep(0.25)


def assert_cut(sock: socket.socket) -> None:
    """The client sees its connection end (a reset, or EOF after what was sent): never
    hang. What it got is less than the body."""
    sock.settimeout(10)
    received = 0
    try:
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    assert received < BODY


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "spool"),
    [("/stream", "on"), ("/long", "on")],
    ids=["plain-relay", "spooled"],
)
async def test_a_client_that_stops_reading_is_aborted_and_everything_is_freed(
    start_backend, start_proxy, client, path, spool
):
    backend = await start_backend(large_backend())
    proxy = start_proxy(
        backend.url,
        FILEPROXY_SEND_TIMEOUT="2",
        FILEPROXY_SPOOL=spool,
        FILEPROXY_READ_TIMEOUT="600",  # the upstream is never the one that is slow here
        FILEPROXY_ACCESS_LOG="on",
    )
    sock = await asyncio.to_thread(stalled_client, proxy.port, path)
    try:
        started = time.monotonic()

        async def busy() -> bool:
            stats = await get_json(client, f"{proxy.url}/stats")
            return stats["performance_optimizer"]["metrics"]["in_flight"] == 1

        await until(busy, 10, "the request in flight", proxy)
        if path == "/long":  # the stalled client's rest went to the spool

            async def spooled() -> bool:
                health = await get_json(client, f"{proxy.url}/health")
                return health["spool"]["active"] == 1 and health["spool"]["files"] == 1

            await until(spooled, 20, "the response spooled", proxy)

        async def logged() -> dict[str, Any] | None:
            return proxy.access_line(path)

        # aborted after about the send timeout, not never
        line = await until(logged, 30, "the access line of the stalled request", proxy)
        elapsed = time.monotonic() - started
        assert line["cause"] == "send_timeout", line
        assert line["status"] == 200 and 0 < line["bytes_out"] < BODY, line
        assert elapsed > 1.5, elapsed

        async def freed() -> bool:
            stats = await get_json(client, f"{proxy.url}/stats")
            health = await get_json(client, f"{proxy.url}/health")
            metrics = stats["performance_optimizer"]["metrics"]
            spool_report = health["spool"]
            return (
                metrics["in_flight"] == 0
                and health["upstream"]["connections"]["in_use"] == 0
                and spool_report["active"] == 0
                and spool_report["files"] == 0
                and spool_report["bytes_on_disk"] == 0
                and spool_report["bytes_in_memory"] == 0
            )

        await until(freed, 10, "every resource freed", proxy)
        await asyncio.to_thread(assert_cut, sock)
        assert "Traceback" not in proxy.log_text()
    finally:
        sock.close()
