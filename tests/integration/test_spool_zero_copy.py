"""Spooled bodies go to slow clients by sendfile (http.zero_copy), for real: ``fileproxy
serve`` in front of a static nginx, clients that read slowly (curl --limit-rate, raw
sockets with a small receive window). Every test also asserts that the file's bytes went
by sendfile (``/health`` ``spool.sendfile_bytes``): none of them passes on the copy path.
See test_spool.py for why ``FILEPROXY_SO_SNDBUF`` is small here."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from bench.slow_clients import slow_get
from tests.conftest import Process, require_binary
from tests.integration.test_spool import (
    MIB,
    WAN_SNDBUF,
    StaticBackend,
    _slow_downloads,
    assert_byte_exact,
    spool_report,
    static_backend,
)
from tests.reliability.test_send_timeout import assert_cut

__all__ = ["static_backend"]  # the fixture, used by name


def _socket_inode(local_port: int, remote_port: int) -> str:
    """The inode of the loopback TCP socket with these ports (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
            if int(local, 16) == local_port and int(remote, 16) == remote_port:
                return fields[9]
    raise AssertionError(f"no socket {local_port} -> {remote_port}")


def _fd_targets(pid: int) -> list[str]:
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
    return targets


async def _until(what: Callable[[dict], bool], proxy: Process, timeout: float = 20) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while not what(report := await spool_report(proxy.url)):
        assert time.monotonic() < deadline, report
        await asyncio.sleep(0.1)
    return report


async def test_a_slow_curl_gets_every_byte_of_a_spooled_body_by_sendfile(
    static_backend: StaticBackend, start_proxy: Callable[..., Process], tmp_dir: Path
) -> None:
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    out = tmp_dir / "out.bin"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            require_binary("curl"),
            "-sS",
            "--limit-rate",
            "800k",
            "-o",
            str(out),
            "-w",
            "%{http_code} %{size_download}",
            f"{proxy.url}/file-4m.bin",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == f"200 {4 * MIB}", (done.stdout, done.stderr)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == static_backend.sha256("file-4m.bin")
    report = await spool_report(proxy.url)
    assert report["responses_spooled"] == 1, report
    # the file's bytes went by sendfile, none by read + write
    assert report["sendfile_bytes"] >= MIB and report["copied_file_bytes"] == 0, report
    assert report["files"] == 0 and report["bytes_on_disk"] == 0, report
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as resp:
        metrics = await resp.text()
    sent = re.search(
        r'fileproxy_spool_file_sent_bytes_total\{[^}]*how="sendfile"[^}]*\} (\S+)', metrics
    )
    assert sent and float(sent.group(1)) == report["sendfile_bytes"], metrics


async def _slow_read_all(port: int, request: bytes, rate: float, deadline_s: float) -> bytes:
    """Send ``request`` (pipelined requests), then read at ``rate`` bytes/s to EOF."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    data = bytearray()
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline_s):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, request)
            while got := await loop.sock_recv(sock, 16384):
                data += got
                ahead = len(data) / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    finally:
        sock.close()
    return bytes(data)


def _responses(stream: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each Content-Length response in ``stream``."""
    found = []
    while stream:
        head, sep, rest = stream.partition(b"\r\n\r\n")
        assert sep, stream[:200]
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        found.append((head, rest[:length]))
        assert len(rest) >= length, (head, len(rest), length)
        stream = rest[length:]
    return found


async def test_a_pipelined_request_after_a_zero_copy_response_is_answered(
    static_backend: StaticBackend, start_proxy: Callable[..., Process]
) -> None:
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    request = (
        b"GET /file-4m.bin HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /file-2m.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    stream = await _slow_read_all(proxy.port, request, rate=1_000_000, deadline_s=60)
    (head1, body1), (head2, body2) = _responses(stream)
    assert head1.startswith(b"HTTP/1.1 200") and head2.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(body1).hexdigest() == static_backend.sha256("file-4m.bin")
    assert hashlib.sha256(body2).hexdigest() == static_backend.sha256("file-2m.bin")
    report = await spool_report(proxy.url)
    assert report["responses_spooled"] >= 1 and report["sendfile_bytes"] >= MIB, report


async def test_a_client_gone_mid_file_frees_the_spool_and_the_socket(
    static_backend: StaticBackend, start_proxy: Callable[..., Process]
) -> None:
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    pid = proxy.popen.pid
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
    await loop.sock_sendall(sock, b"GET /file-4m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    received = 0
    while received < MIB:  # ~1 MB/s
        received += len(await asyncio.wait_for(loop.sock_recv(sock, 16384), 10))
        await asyncio.sleep(0.016)
    report = await _until(lambda r: r["sendfile_bytes"] > 0, proxy)
    assert report["active"] == 1, report
    # the proxy's side of this connection: its socket, and its dup while sendfile runs
    inode = f"socket:[{_socket_inode(proxy.port, sock.getsockname()[1])}]"
    assert inode in _fd_targets(pid)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset mid-file
    report = await _until(
        lambda r: r["active"] == 0 and r["files"] == 0 and r["bytes_on_disk"] == 0, proxy
    )
    assert report["bytes_in_memory"] == 0, report
    deadline = time.monotonic() + 10  # no descriptor of that socket is left open
    while inode in _fd_targets(pid):
        assert time.monotonic() < deadline, _fd_targets(pid)
        await asyncio.sleep(0.1)
    # and the proxy goes on serving
    results = await _slow_downloads(proxy.port, "/file-2m.bin", 1, rate=2_000_000)
    assert_byte_exact(results, static_backend.sha256("file-2m.bin"))


def _spool_file_fd(pid: int, spool_dir: Path) -> int:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith(str(spool_dir)):
            found.append(int(name))
    assert len(found) == 1, found
    return found[0]


async def test_a_spool_file_shortened_under_the_reader_aborts_the_client(
    static_backend: StaticBackend, start_proxy: Callable[..., Process], tmp_dir: Path
) -> None:
    """Never a short body that looks complete: the client sees its connection end
    before the Content-Length."""
    spool_dir = tmp_dir / "spool"
    spool_dir.mkdir()
    proxy = start_proxy(
        static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF, FILEPROXY_SPOOL_DIR=str(spool_dir)
    )
    download = asyncio.ensure_future(
        slow_get(proxy.port, "/file-4m.bin", rate=300_000, rcvbuf=16384, deadline_s=40)
    )
    # the whole body is in the spool (the upstream went back to its pool), some was sent
    await _until(lambda r: r["upstream_released_early"] == 1 and r["sendfile_bytes"] > 0, proxy)
    fd = _spool_file_fd(proxy.popen.pid, spool_dir)
    with open(f"/proc/{proxy.popen.pid}/fd/{fd}", "r+b") as spool_file:
        spool_file.truncate(0)
    result = await download
    assert result.status == 200 and result.length == 4 * MIB, result
    assert not result.complete and result.error and result.received < 4 * MIB, result
    await _until(lambda r: r["active"] == 0 and r["files"] == 0, proxy)


@pytest.mark.slow
async def test_graceful_drain_lets_zero_copy_responses_finish(
    static_backend: StaticBackend, start_proxy: Callable[..., Process]
) -> None:
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    downloads = asyncio.ensure_future(_slow_downloads(proxy.port, "/file-4m.bin", 3, rate=600_000))
    await _until(lambda r: r["active"] == 3 and r["sendfile_bytes"] > 0, proxy)
    proxy.popen.send_signal(signal.SIGTERM)
    results = await downloads
    assert await asyncio.to_thread(proxy.popen.wait, 60) == 0
    assert_byte_exact(results, static_backend.sha256("file-4m.bin"))


@pytest.mark.slow
async def test_slow_clients_progress_while_a_fast_one_takes_its_file(
    start_proxy: Callable[..., Process], static_backend: StaticBackend
) -> None:
    """One client that stalls until its response spilled, then reads a 64 MiB file as fast
    as it can (by sendfile, 2 MiB a turn of the loop), beside 20 slow clients: every one
    gets every byte, the slow ones served while the fast one is (tests/unit/test_zero_copy
    counts the loop's turns between pieces)."""
    big = os.urandom(64 * MIB)
    (static_backend.directory.parent / "www" / "file-64m.bin").write_bytes(big)
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    loop = asyncio.get_running_loop()
    slow_done: list[float] = []

    async def fast() -> tuple[bytes, float]:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
            await loop.sock_sendall(
                sock, b"GET /file-64m.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            await _until(lambda r: r["bytes_on_disk"] >= 8 * MIB, proxy, timeout=60)
            started = time.monotonic()
            data = bytearray()
            while got := await loop.sock_recv(sock, 1 << 20):
                data += got
            return bytes(data), started
        finally:
            sock.close()

    async def slow() -> None:
        result = await slow_get(
            proxy.port, "/file-4m.bin", rate=100_000, rcvbuf=16384, deadline_s=120
        )
        slow_done.append(time.monotonic())
        assert_byte_exact([result], static_backend.sha256("file-4m.bin"))

    slows = asyncio.gather(*(slow() for _ in range(20)))
    stream, fast_started = await fast()
    await slows
    head, _, body = stream.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
    assert min(slow_done) > fast_started  # they were being served while it was
    report = await spool_report(proxy.url)
    assert report["responses_spooled"] >= 21 and report["sendfile_bytes"] >= 60 * MIB, report


async def test_a_client_that_stops_reading_mid_file_is_cut_at_the_send_timeout(
    static_backend: StaticBackend, start_proxy: Callable[..., Process]
) -> None:
    """Its bytes wait in the kernel, not in the transport: sendfile's own watch aborts it
    after FILEPROXY_SEND_TIMEOUT, the access line says send_timeout, the spool is freed."""
    proxy = start_proxy(
        static_backend.url,
        FILEPROXY_SO_SNDBUF=WAN_SNDBUF,
        FILEPROXY_SEND_TIMEOUT="2",
        FILEPROXY_ACCESS_LOG="on",
    )
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        await loop.sock_sendall(sock, b"GET /file-4m.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < MIB:  # ~1 MB/s, then nothing
            received += len(await asyncio.wait_for(loop.sock_recv(sock, 16384), 10))
            await asyncio.sleep(0.016)
        await _until(lambda r: r["sendfile_bytes"] > 0, proxy)
        stopped = time.monotonic()
        deadline = stopped + 30
        while (line := proxy.access_line("/file-4m.bin")) is None:
            assert time.monotonic() < deadline, proxy.log_text()[-3000:]
            await asyncio.sleep(0.2)
        assert time.monotonic() - stopped > 1.0
        assert line["cause"] == "send_timeout" and 0 < line["bytes_out"] < 4 * MIB, line
        await _until(lambda r: r["active"] == 0 and r["files"] == 0, proxy)
        sock.setblocking(True)
        await asyncio.to_thread(assert_cut, sock)
    finally:
        sock.close()
