"""A proxied request leaves no reference cycle behind: its objects go when it ends.

What a request builds (its request and response objects, the connection machine's
exchange, the upstream exchange, the task that answers it) must be freed by reference
counting when the request ends. Left in a cycle, each request's objects wait for the
cyclic collector, whose passes grow with the garbage and stop the event loop for
milliseconds under load: every client in flight waits for them (a p99 of tens of ms at
a few thousand requests per second). The data plane runs here in the test's own
process, so the collector's findings can be read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from fileproxy.app import create_app
from fileproxy.settings import Settings
from tests.conftest import clean_env

SMALL = bytes(range(256)) * 4  # one piece: the head goes with the body
LARGE = bytes(range(256)) * 1024  # 256 KiB: streamed in pieces


def _backend() -> web.Application:
    async def small(request: web.Request) -> web.Response:
        return web.Response(body=SMALL)

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(LARGE)
        await response.prepare(request)
        for start in range(0, len(LARGE), 64 * 1024):
            await response.write(LARGE[start : start + 64 * 1024])
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        return web.Response(body=b"%d" % len(await request.read()))

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/large", large)
    app.router.add_post("/upload", upload)
    return app


@contextlib.asynccontextmanager
async def _in_process_proxy(upstream_port: int) -> AsyncIterator[int]:
    env = clean_env(
        FILEPROXY_UPSTREAM=f"http://127.0.0.1:{upstream_port}",
        FILEPROXY_ACCESS_LOG="on",
        FILEPROXY_LOG_DIR="",
    )
    runner = web.AppRunner(create_app(Settings.from_env(env)), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def _garbage_kept() -> Iterator[list[object]]:
    """What the cyclic collector finds unreachable meanwhile, kept for inspection."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bytes:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


async def test_requests_on_a_keep_alive_connection_leave_no_cycle_to_collect(
    start_backend,
) -> None:
    backend = await start_backend(_backend())
    async with _in_process_proxy(backend.port) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # the first requests open the upstream connection, warm the caches
            assert await _exchange(reader, writer, b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
            rounds = 40
            with _garbage_kept() as garbage:
                for _ in range(rounds):
                    got = await _exchange(reader, writer, b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
                    assert got == SMALL
                    got = await _exchange(reader, writer, b"GET /large HTTP/1.1\r\nHost: a\r\n\r\n")
                    assert got == LARGE
                    body = b"x" * 10_000
                    got = await _exchange(
                        reader,
                        writer,
                        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b"
                        % (len(body), body),
                    )
                    assert got == b"10000"
                await asyncio.sleep(0.1)  # every task of those requests has ended
                gc.collect()
                ours = collections.Counter(
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for o in garbage
                    if type(o).__module__.startswith("fileproxy.")
                )
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    # 120 requests: a one-off cycle may be left (a connection that ended), none per request
    assert sum(ours.values()) <= 5, ours.most_common(10)


async def test_connections_that_end_leave_no_cycle_to_collect(start_backend) -> None:
    """A client without keep-alive (ab without -k, a health checker) opens a connection
    per request: the connection's objects must go with it too."""
    backend = await start_backend(_backend())
    async with _in_process_proxy(backend.port) as port:
        rounds = 40
        with _garbage_kept() as garbage:
            for _ in range(rounds):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                request = b"GET /small HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                assert await _exchange(reader, writer, request) == SMALL
                assert await reader.read() == b""  # the proxy closed: its side is done
                writer.close()
                await writer.wait_closed()
            await asyncio.sleep(0.1)
            gc.collect()
            ours = collections.Counter(
                f"{type(o).__module__}.{type(o).__qualname__}"
                for o in garbage
                if type(o).__module__.startswith("fileproxy.")
            )
    assert sum(ours.values()) <= 5, ours.most_common(10)


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.enable()
    yield
    if not enabled:
        gc.disable()
