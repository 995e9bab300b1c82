"""Upstream faults not covered in tests/integration/test_failures.py.

That module proves: refused connection, reset or close before headers, a garbage
status line and enormous headers (502 JSON), headers too slow (504 JSON), a
stall mid-body and a body shorter than its Content-Length (client read breaks),
each followed by no leaked upstream connection. Here: a backend that accepts and
never answers, a reset in the middle of a body, and all faults at once, after
which the upstream pool is back to its baseline.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import aiohttp
import pytest

from tests.integration.test_failures import (  # noqa: F401 (raw_backend is a fixture)
    OK_RESPONSE,
    assert_error_json,
    raw_backend,
    upstream_connections,
    wait_for_eof,
    wait_no_upstream_in_use,
)


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await wait_for_eof(reader, 30)  # reads the request, says nothing, until the proxy hangs up


async def _reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 200_000)
    await writer.drain()
    await asyncio.sleep(0.2)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST


async def test_backend_that_never_answers_is_504_and_releases_the_connection(
    start_proxy,
    client,
    raw_backend,  # noqa: F811
):
    backend = await raw_backend(_never_answer)
    proxy = start_proxy(backend.url, HTTP_TOTAL_TIMEOUT="1")
    started = time.monotonic()
    async with client.get(f"{proxy.url}/silent") as resp:
        await assert_error_json(resp, 504)
    assert time.monotonic() - started < 4
    await wait_no_upstream_in_use(client, proxy)
    async with client.get(f"{proxy.url}/ok") as resp:
        assert resp.status == 200 and await resp.read() == b"ok"


async def test_reset_mid_body_breaks_the_client_read(start_proxy, client, raw_backend):  # noqa: F811
    backend = await raw_backend(_reset_mid_body)
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/big") as resp:
        assert resp.status == 200 and resp.content_length == 1_000_000
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await resp.read()  # never a clean, complete-looking body
    await wait_no_upstream_in_use(client, proxy)


async def test_pool_returns_to_baseline_after_a_burst_of_faults(start_proxy, client):
    async def mixed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await fault(head.split(b" ", 2)[1], reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def fault(
        kind: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if kind == b"/never":
            await wait_for_eof(reader, 30)
        elif kind == b"/reset":
            await _reset_mid_body(reader, writer)
        elif kind == b"/garbage":
            writer.write(b"NOT HTTP\r\n\r\n")
            await writer.drain()
            writer.close()
        elif kind == b"/short":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            await writer.drain()
            writer.close()
        else:
            writer.write(OK_RESPONSE)
            await writer.drain()
            writer.close()

    server = await asyncio.start_server(mixed, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = start_proxy(
        f"http://127.0.0.1:{port}", HTTP_TOTAL_TIMEOUT="1", FILEPROXY_OPTIMIZER="off"
    )
    baseline = await upstream_connections(client, proxy)

    async def one(path: str) -> str:
        try:
            async with client.get(f"{proxy.url}{path}") as resp:
                await resp.read()
                return f"{resp.status}"
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            return "cut"

    paths = ["/never", "/reset", "/garbage", "/short", "/fine"] * 8
    outcomes = await asyncio.gather(*(one(p) for p in paths))
    by_path = dict(zip(paths, outcomes, strict=False))
    assert by_path["/never"] == "504" and by_path["/garbage"] == "502"
    assert by_path["/reset"] == "cut" and by_path["/short"] == "cut"
    await wait_no_upstream_in_use(client, proxy)
    after = await upstream_connections(client, proxy)
    assert after["in_use"] == baseline["in_use"] == 0, (baseline, after)
    server.close()


async def test_pooled_connection_closed_by_the_backend_is_retried_for_a_get(
    start_proxy,
    client,
    raw_backend,  # noqa: F811
):
    """A kept-alive upstream connection the backend closes as it is reused: a GET is
    sent again on a new connection (as aiohttp's client does for idempotent methods),
    the client sees 200, never a 502."""
    dropped = []

    async def answer_then_drop_the_next(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # kept alive
        await writer.drain()
        dropped.append(await reader.readuntil(b"\r\n\r\n"))  # the next request: no answer

    backend = await raw_backend(answer_then_drop_the_next)
    proxy = start_proxy(backend.url)
    for path in ("/first", "/second"):
        async with client.get(f"{proxy.url}{path}") as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.read() == b"ok"
    assert [head.split(b" ", 2)[1] for head in dropped] == [b"/second"]
    assert backend.hits == 2  # connections: /first (then /second, dropped); /second again
