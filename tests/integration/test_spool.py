"""Slow clients never hold upstream connections: the spool (issue 14), for real.

Backends are a real nginx serving static files (bench.slow_clients.static_backend_conf)
or an aiohttp app written here; clients are asyncio raw sockets with a small
SO_RCVBUF reading at a fixed pace (bench.slow_clients.slow_get).

On loopback the kernel grows a socket's send buffer to tcp_wmem's maximum (4 MiB
here) at once, so the proxy's client socket alone would swallow a multi-MiB file
and nothing would ever wait for the client (300 such sockets push the kernel into
TCP memory pressure instead). A WAN client's send buffer stays near its
bandwidth-delay product: ``FILEPROXY_SO_SNDBUF=32768`` stands for that here; every
other setting is at its default unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bench.slow_clients import (
    Download,
    backend_last_sent,
    established_to,
    percentile,
    slow_get,
    static_backend_conf,
)
from tests.conftest import Process, free_port, get_json, rss_bytes, wait_for_port
from tests.integration.test_deployment import GRACEFUL_TIMEOUT, nginx_binary, start_gunicorn

MIB = 1 << 20
WAN_SNDBUF = "32768"


class StaticBackend:
    def __init__(self, process: Process, directory: Path, files: dict[str, bytes]) -> None:
        self.process, self.directory, self.files = process, directory, files

    @property
    def url(self) -> str:
        return self.process.url

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


@pytest.fixture
def static_backend(tmp_dir: Path) -> Iterator[StaticBackend]:
    """nginx (1 worker) serving /file-4m.bin and /file-2m.bin (random bytes)."""
    www = tmp_dir / "www"
    www.mkdir()
    files = {"file-4m.bin": os.urandom(4 * MIB), "file-2m.bin": os.urandom(2 * MIB)}
    for name, body in files.items():
        (www / name).write_bytes(body)
    port = free_port()
    directory = tmp_dir / "backend"
    conf = static_backend_conf(directory, port, www)
    log = directory / "stdout.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [nginx_binary(), "-c", str(conf), "-p", str(directory)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    process = Process(popen, port, log)
    try:
        wait_for_port(port, process=popen)
        yield StaticBackend(process, directory, files)
    finally:
        process.stop()


async def spool_report(url: str) -> dict:  # type: ignore[type-arg]
    async with aiohttp.ClientSession() as session:
        return (await get_json(session, f"{url}/health"))["spool"]  # type: ignore[no-any-return]


def assert_byte_exact(results: list[Download], sha: str, status: int = 200) -> None:
    bad = [r for r in results if not (r.complete and r.status == status and r.sha256 == sha)]
    assert not bad, f"{len(bad)} of {len(results)} not byte-exact, e.g. {bad[:3]}"


# --------------------------------------------------------------------------------------------
# Done when 1: 300 slow clients through gunicorn
# --------------------------------------------------------------------------------------------


def _tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_bytes(pid)
    return total


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_300_slow_clients_complete_without_pinning_upstream_connections(
    static_backend: StaticBackend, tmp_dir: Path
) -> None:
    gunicorn = start_gunicorn(
        tmp_dir,
        static_backend.url,
        FILEPROXY_SO_SNDBUF=WAN_SNDBUF,
        FILEPROXY_SPOOL_DIR=str(tmp_dir),
        FILEPROXY_ACCESS_LOG="off",
    )
    try:
        pids = [gunicorn.pid, *_worker_pids(gunicorn)]
        rss_before = _tree_rss(pids)
        upstream_limit = 2 * 50  # 2 workers x HTTP_CONNECTOR_LIMIT_PER_HOST
        held: list[int] = []
        rss: list[int] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                held.append(await asyncio.to_thread(established_to, static_backend.process.port))
                rss.append(_tree_rss(pids))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)

        sampler = asyncio.create_task(sample())
        wall0, started = time.time(), time.monotonic()
        results = await asyncio.gather(
            *(
                slow_get(gunicorn.port, "/file-4m.bin", rate=100_000, rcvbuf=16384, deadline_s=80)
                for _ in range(300)
            )
        )
        clients_done = time.monotonic() - started
        stop.set()
        await sampler
    finally:
        gunicorn.stop(timeout=GRACEFUL_TIMEOUT + 10)

    assert_byte_exact(results, static_backend.sha256("file-4m.bin"))
    ttfb = [r.ttfb_s for r in results if r.ttfb_s is not None]
    # issue 14 asks p99 < 2 s: bench.slow_clients measures 1.5 s on this machine; the
    # bound here is generous for a shared 2-core box (on main: 504s / >60 s waits)
    assert percentile(ttfb, 99) < 3.0, f"first byte p99 {percentile(ttfb, 99):.2f} s"
    assert max(held) <= upstream_limit, max(held)
    backend_done = backend_last_sent(static_backend.directory)
    assert backend_done is not None
    # the backend sent everything long before the clients had it all
    assert backend_done - wall0 < clients_done / 3, (backend_done - wall0, clients_done)
    growth = max(rss) - rss_before
    assert growth < 160 * MIB, f"gunicorn tree RSS grew {growth / MIB:.0f} MiB"


def _worker_pids(gunicorn: Process) -> list[int]:
    return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", gunicorn.log_text())]


# --------------------------------------------------------------------------------------------
# Done when 2: every fallback still delivers every byte
# --------------------------------------------------------------------------------------------


async def _slow_downloads(
    port: int, path: str, count: int, rate: float = 400_000, headers: str = ""
) -> list[Download]:
    return await asyncio.gather(
        *(
            slow_get(port, path, rate=rate, rcvbuf=16384, deadline_s=40, headers=headers)
            for _ in range(count)
        )
    )


@pytest.fixture
def read_only_dir(tmp_dir: Path) -> Iterator[Path]:
    """A directory nobody can create files in: a read-only tmpfs (root), else mode 0555."""
    path = tmp_dir / "read-only"
    path.mkdir()
    if os.geteuid() == 0:
        mount = shutil.which("mount") or "/usr/bin/mount"
        done = subprocess.run(
            [mount, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
        )
        assert done.returncode == 0, f"cannot mount a read-only tmpfs: {done.stderr!r}"
        try:
            yield path
        finally:
            subprocess.run([shutil.which("umount") or "/usr/bin/umount", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("read_only", "read_only"),
        ("FILEPROXY_SPOOL_MAX_TOTAL=3145728", "max_total"),
        ("FILEPROXY_SPOOL_MAX_FILE=1048576", "max_file"),
    ],
)
async def test_every_fallback_still_delivers_every_byte(
    static_backend: StaticBackend,
    start_proxy: Callable[..., Process],
    request: pytest.FixtureRequest,
    setting: str,
    reason: str,
) -> None:
    env = {"FILEPROXY_SO_SNDBUF": WAN_SNDBUF}
    if setting == "read_only":
        env["FILEPROXY_SPOOL_DIR"] = str(request.getfixturevalue("read_only_dir"))
    else:
        name, _, value = setting.partition("=")
        env[name] = value
    proxy = start_proxy(static_backend.url, **env)
    results = await _slow_downloads(proxy.port, "/file-2m.bin", 8)
    assert_byte_exact(results, static_backend.sha256("file-2m.bin"))
    report = await spool_report(proxy.url)
    assert report["responses_spooled"] >= 1, report
    assert report["fallbacks"][reason] >= 1, report
    assert report["bytes_on_disk"] == 0 and report["files"] == 0, report


# --------------------------------------------------------------------------------------------
# edges
# --------------------------------------------------------------------------------------------


async def test_range_206_passes_through_spooled(
    static_backend: StaticBackend, start_proxy: Callable[..., Process]
) -> None:
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    first, last = 1000, 3 * MIB + 999
    results = await _slow_downloads(
        proxy.port, "/file-4m.bin", 2, headers=f"Range: bytes={first}-{last}\r\n"
    )
    expected = hashlib.sha256(static_backend.files["file-4m.bin"][first : last + 1]).hexdigest()
    assert_byte_exact(results, expected, status=206)
    assert (await spool_report(proxy.url))["responses_spooled"] == 2


async def test_fast_clients_never_touch_the_spool(
    static_backend: StaticBackend, start_proxy: Callable[..., Process]
) -> None:
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    results = await _slow_downloads(proxy.port, "/file-4m.bin", 4, rate=1e12)
    assert_byte_exact(results, static_backend.sha256("file-4m.bin"))
    assert (await spool_report(proxy.url))["responses_spooled"] == 0


async def test_spool_off_is_todays_backpressure(
    static_backend: StaticBackend, start_proxy: Callable[..., Process]
) -> None:
    proxy = start_proxy(static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF, FILEPROXY_SPOOL="off")
    results = await _slow_downloads(proxy.port, "/file-2m.bin", 2)
    assert_byte_exact(results, static_backend.sha256("file-2m.bin"))
    report = await spool_report(proxy.url)
    assert report["enabled"] is False and report["responses_spooled"] == 0


async def test_client_abort_mid_spool_frees_it_and_stops_the_upstream(
    start_backend, start_proxy: Callable[..., Process]
) -> None:
    """A slow upstream (the body trickles in) so the filler is still reading when the
    client leaves: the spool is freed at once and the upstream connection closed."""
    upstream_gone = asyncio.Event()
    piece = b"x" * 65536

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 64 * MIB
        await resp.prepare(request)
        try:
            for _ in range(1024):
                await resp.write(piece)
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            upstream_gone.set()
            raise
        return resp

    app = web.Application()
    app.router.add_get("/trickle", trickle)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connect: the window
    sock.connect(("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    writer.write(b"GET /trickle HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    deadline = time.monotonic() + 20
    while (report := await spool_report(proxy.url))["bytes_on_disk"] < MIB:
        assert time.monotonic() < deadline, str(report)
        await asyncio.sleep(0.2)
    assert report["active"] == 1 and report["files"] == 1
    writer.transport.abort()
    await asyncio.wait_for(upstream_gone.wait(), 10)
    deadline = time.monotonic() + 5
    while (report := await spool_report(proxy.url))["files"] or report["bytes_on_disk"]:
        assert time.monotonic() < deadline, report
        await asyncio.sleep(0.1)
    assert report["active"] == 0 and report["bytes_in_memory"] == 0


async def test_upstream_failing_mid_spool_ends_in_an_abort_not_a_short_body(
    start_backend, start_proxy: Callable[..., Process]
) -> None:
    sent = 3 * MIB

    async def broken(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 4 * MIB
        await resp.prepare(request)
        for _ in range(sent // 65536):
            await resp.write(b"y" * 65536)
        assert request.transport is not None
        request.transport.abort()  # 1 MiB short of its Content-Length
        return resp

    app = web.Application()
    app.router.add_get("/broken", broken)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    results = await _slow_downloads(proxy.port, "/broken", 2)
    for result in results:
        assert result.status == 200 and result.length == 4 * MIB
        # what reached the proxy (an upstream abort drops what its kernel still held) ...
        assert 2 * MIB <= result.received < sent + 1, result
        assert not result.complete and result.error, result  # ... then an abort
    report = await spool_report(proxy.url)
    assert report["responses_spooled"] == 2 and report["files"] == 0, report


@pytest.mark.slow
async def test_graceful_drain_lets_spooled_responses_finish(
    static_backend: StaticBackend, tmp_dir: Path
) -> None:
    gunicorn = start_gunicorn(tmp_dir, static_backend.url, FILEPROXY_SO_SNDBUF=WAN_SNDBUF)
    try:
        downloads = asyncio.ensure_future(
            _slow_downloads(gunicorn.port, "/file-4m.bin", 4, rate=500_000)
        )
        await asyncio.sleep(1.5)  # spilled by now; the clients need ~8 s
        gunicorn.popen.send_signal(signal.SIGTERM)
        results = await downloads
        assert gunicorn.popen.wait(GRACEFUL_TIMEOUT) == 0
    finally:
        gunicorn.stop(timeout=GRACEFUL_TIMEOUT + 10)
    assert_byte_exact(results, static_backend.sha256("file-4m.bin"))
