"""Cache answers go to clients by sendfile from the cache file (http.zero_copy), for real:
``fileproxy serve`` with the cache on, in front of a static nginx (files with ETag and
Last-Modified: stored, revalidated on each use, the body from the cache file), clients
that read slowly. Every test asserts that the bytes went by sendfile (``/stats``
``cache.sendfile_bytes``): none of them passes on the copy path."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.conftest import Process, get_json
from tests.integration.test_spool import MIB, WAN_SNDBUF, StaticBackend, static_backend
from tests.integration.test_spool_zero_copy import _responses, _slow_read_all

__all__ = ["static_backend"]  # the fixture, used by name


async def cache_report(proxy: Process) -> dict:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session:
        return (await get_json(session, f"{proxy.url}/stats"))["cache"]  # type: ignore[no-any-return]


def cached_proxy(
    start_proxy: Callable[..., Process], backend: StaticBackend, tmp_dir: Path
) -> Process:
    # a small send buffer, as a client far away has (see test_spool.py): the kernel
    # holds a few KiB of the answer, not the whole file
    return start_proxy(
        backend.url,
        FILEPROXY_CACHE="on",
        FILEPROXY_CACHE_DIR=str(tmp_dir / "cache"),
        FILEPROXY_SO_SNDBUF=WAN_SNDBUF,
    )


async def fill(proxy: Process, name: str) -> None:
    """The object stored whole (a first GET read to its end)."""
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/{name}") as resp:
        assert resp.status == 200
        await resp.read()
        assert "stored" in resp.headers.get("Cache-Status", ""), resp.headers


async def test_a_pipelined_request_after_a_cache_answer_by_sendfile_is_answered(
    static_backend: StaticBackend, start_proxy: Callable[..., Process], tmp_dir: Path
) -> None:
    proxy = cached_proxy(start_proxy, static_backend, tmp_dir)
    await fill(proxy, "file-4m.bin")
    await fill(proxy, "file-2m.bin")
    before = (await cache_report(proxy))["sendfile_bytes"]
    request = (
        b"GET /file-4m.bin HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /file-2m.bin HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /file-2m.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=100-199\r\n\r\n"
        b"GET /file-2m.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    stream = await _slow_read_all(proxy.port, request, rate=4_000_000, deadline_s=60)
    # the HEAD's head says the length and has no body: split it off by hand
    first_head, _, rest = stream.partition(b"\r\n\r\n")
    first_body, rest = rest[: 4 * MIB], rest[4 * MIB :]
    head_of_head, _, rest = rest.partition(b"\r\n\r\n")
    (range_head, range_body), (last_head, last_body) = _responses(rest)
    files = static_backend.files
    assert first_head.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(first_body).digest() == hashlib.sha256(files["file-4m.bin"]).digest()
    assert head_of_head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 2097152" in head_of_head, head_of_head
    assert range_head.startswith(b"HTTP/1.1 206"), range_head
    assert range_body == files["file-2m.bin"][100:200]
    assert last_head.startswith(b"HTTP/1.1 200")
    assert last_body == files["file-2m.bin"]
    for head in (first_head, last_head):
        assert b"Cache-Status: fileproxy; " in head, head
    report = await cache_report(proxy)
    assert report["sendfile_bytes"] - before >= 6 * MIB, report


async def test_a_client_gone_mid_file_frees_its_reader_and_the_next_one_is_served(
    static_backend: StaticBackend, start_proxy: Callable[..., Process], tmp_dir: Path
) -> None:
    proxy = cached_proxy(start_proxy, static_backend, tmp_dir)
    await fill(proxy, "file-4m.bin")
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
    await loop.sock_sendall(sock, b"GET /file-4m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    received = 0
    while received < MIB:
        received += len(await asyncio.wait_for(loop.sock_recv(sock, 16384), 10))
        await asyncio.sleep(0.005)
    assert (await cache_report(proxy))["readers_open"] == 1
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset mid-file
    deadline = time.monotonic() + 10
    while (report := await cache_report(proxy))["readers_open"] != 0:
        assert time.monotonic() < deadline, report
        await asyncio.sleep(0.1)
    assert report["sendfile_bytes"] > 0, report
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/file-4m.bin") as resp:
        assert await resp.read() == static_backend.files["file-4m.bin"]
    assert "Traceback" not in proxy.log_text()


async def test_several_ranges_of_a_stored_object_are_the_backends_multipart_answer(
    static_backend: StaticBackend, start_proxy: Callable[..., Process], tmp_dir: Path
) -> None:
    proxy = cached_proxy(start_proxy, static_backend, tmp_dir)
    await fill(proxy, "file-2m.bin")
    async with aiohttp.ClientSession() as session:
        ranges = {"Range": "bytes=0-9,100-199"}
        async with session.get(f"{proxy.url}/file-2m.bin", headers=ranges) as resp:
            body = await resp.read()
            assert resp.status == 206, resp.status
            assert resp.headers["Content-Type"].startswith("multipart/byteranges"), resp.headers
            assert "detail=multi-range" in resp.headers["Cache-Status"], resp.headers
    data = static_backend.files["file-2m.bin"]
    assert data[:10] in body and data[100:200] in body and len(body) < 4096


async def test_a_cache_file_cut_under_a_reader_aborts_it_never_a_short_body_that_ends(
    static_backend: StaticBackend, start_proxy: Callable[..., Process], tmp_dir: Path
) -> None:
    proxy = cached_proxy(start_proxy, static_backend, tmp_dir)
    await fill(proxy, "file-4m.bin")
    bodies = list((tmp_dir / "cache").rglob("*.body"))
    assert len(bodies) == 1, bodies
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
    await loop.sock_sendall(sock, b"GET /file-4m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    data = bytearray()
    while len(data) < MIB:
        data += await asyncio.wait_for(loop.sock_recv(sock, 16384), 10)
        await asyncio.sleep(0.005)
    with open(bodies[0], "r+b") as body:
        body.truncate(2 * MIB)  # the file shrinks under the reader (a disk fault, an operator)
    try:
        async with asyncio.timeout(30):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
    except ConnectionResetError:
        pass  # an abort: what matters is that the body is short
    finally:
        sock.close()
    head, _, body_bytes = bytes(data).partition(b"\r\n\r\n")
    assert b"Content-Length: 4194304" in head
    assert len(body_bytes) < 4 * MIB, "the cut body reached the client as if complete"
    assert body_bytes == static_backend.files["file-4m.bin"][: len(body_bytes)]
