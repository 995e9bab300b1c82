"""Signals with downloads in flight, for real: curl clients, gunicorn or `fileproxy serve`.

- SIGTERM to gunicorn's master while downloads still run past the graceful timeout:
  each worker cuts what remains itself (an access line per cut download, with its
  cause and the bytes sent), removes its spool directory and exits, before the
  master's own graceful timeout would SIGKILL it.
- SIGHUP to `fileproxy serve` (logrotate's ``postrotate kill -HUP``): nothing is
  cut, the log files are reopened.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fileproxy.delivery.spool import PRIVATE_DIR_PREFIX
from fileproxy.sample_upstream import FILES, file_bytes
from tests.conftest import Process, require_binary
from tests.integration.test_deployment import WORKERS, start_gunicorn

MIB = 1024 * 1024


def access_lines(text: str, path: str) -> list[dict[str, Any]]:
    return [
        json.loads(raw)
        for raw in text.splitlines()
        if raw.startswith("{") and '"fileproxy.access"' in raw and f'"path":"{path}"' in raw
    ]


def start_curl(url: str, rate: str, output: Path) -> subprocess.Popen[str]:
    """A rate-limited download; ``%{size_download}`` on stdout at the end."""
    args = [
        require_binary("curl"), "-s", "-S", "--limit-rate", rate, "--max-time", "120",
        "-o", str(output), "-w", "%{size_download}", url,
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_receiving(clients: list[tuple[subprocess.Popen[str], Path]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(out.exists() and out.stat().st_size > 0 for _, out in clients):
        assert time.monotonic() < deadline, "the downloads did not start"
        assert all(curl.poll() is None for curl, _ in clients), "a download ended early"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["stop", "reload"])
def test_gunicorn_cuts_the_downloads_left_logs_each_and_removes_its_spool(
    sample_upstream: Process, tmp_dir: Path, sig: signal.Signals
):
    """4 clients at 1 MiB/s of 64 MiB, then SIGTERM (a stop) or HUP (a reload, whose
    old workers get SIGTERM) after about 2 s: at drain (2 s) + graceful (5 s) each
    worker cuts them itself, logs each (cause ``shutdown``, the bytes sent), removes
    its spool directory and exits; gunicorn's master does not SIGKILL it first."""
    spool_parent = tmp_dir / "tmp"  # the private spool directories are made in TMPDIR
    spool_parent.mkdir()
    gunicorn = start_gunicorn(
        tmp_dir,
        sample_upstream.url,
        FILEPROXY_DRAIN_DELAY="2",
        FILEPROXY_GRACEFUL_TIMEOUT="5",
        TMPDIR=str(spool_parent),
    )
    old_workers = re.findall(r"Booting worker with pid: (\d+)", gunicorn.log_text())
    assert len(old_workers) == WORKERS
    name = "64m.bin"
    clients = []
    try:
        for k in range(4):
            out = tmp_dir / f"download-{k}"
            clients.append((start_curl(f"{gunicorn.url}/files/{name}", "1M", out), out))
        wait_until_receiving(clients, timeout=30)
        time.sleep(1.0)
        assert list(spool_parent.glob(f"{PRIVATE_DIR_PREFIX}*")), "the workers have no spool"
        gunicorn.popen.send_signal(sig)
        if sig == signal.SIGTERM:
            assert gunicorn.popen.wait(60) == 0, gunicorn.log_text()
        else:
            gunicorn.wait_for_log("Worker exiting (pid:", count=WORKERS, timeout=60)
        received = []
        for curl, _ in clients:
            stdout, stderr = curl.communicate(timeout=60)
            # cut: 18 (partial file) or 56 (reset), never 0 with a short body
            assert curl.returncode in (18, 56), (curl.returncode, stderr)
            received.append(int(stdout))
        log = gunicorn.log_text()
        if sig == signal.SIGHUP:  # the new workers serve on
            assert gunicorn.popen.poll() is None, log
    finally:
        for curl, _ in clients:
            if curl.poll() is None:
                curl.kill()
                curl.wait(10)
        gunicorn.stop()
    assert all(0 < got < FILES[name] for got in received), received
    lines = access_lines(log, f"/files/{name}")
    assert len(lines) == 4, log
    for line in lines:
        assert line["cause"] == "shutdown", line
        assert line["status"] == 200 and 0 < line["response_bytes"] < FILES[name], line
        assert line["response_bytes"] == line["bytes_out"]
    # what the clients got was sent (a reset may discard some the kernel still held)
    assert sum(received) <= sum(line["bytes_out"] for line in lines), (received, lines)
    for pid in old_workers:
        assert f"Worker exiting (pid: {pid})" in log, log
        assert list(spool_parent.glob(f"{PRIVATE_DIR_PREFIX}{pid}-*")) == []
    assert "WORKER TIMEOUT" not in log and "SIGKILL" not in log and "Traceback" not in log, log


@pytest.mark.slow
def test_serve_sighup_cuts_nothing_and_reopens_the_log_files(
    sample_upstream: Process, start_proxy, tmp_dir: Path
):
    """logrotate's ``postrotate kill -HUP``: the files are moved, then HUP. The download
    in flight ends whole, the log files are created again at once, and the lines after
    the HUP go to the new files."""
    log_dir = tmp_dir / "logs"
    spool_parent = tmp_dir / "tmp"
    spool_parent.mkdir()
    proxy = start_proxy(
        sample_upstream.url, FILEPROXY_LOG_DIR=str(log_dir), TMPDIR=str(spool_parent)
    )
    name = "64m.bin"
    out = tmp_dir / "download"
    curl = start_curl(f"{proxy.url}/files/{name}", "8M", out)  # about 8 s
    try:
        wait_until_receiving([(curl, out)], timeout=30)
        time.sleep(1.0)
        for log_name in ("access.log", "error.log"):
            (log_dir / log_name).rename(log_dir / f"{log_name}.1")
        proxy.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while not ((log_dir / "access.log").exists() and (log_dir / "error.log").exists()):
            assert proxy.popen.poll() is None, proxy.log_text()
            assert time.monotonic() < deadline, "the log files were not reopened"
            time.sleep(0.05)
        stdout, stderr = curl.communicate(timeout=90)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait(10)
    assert curl.returncode == 0, (stderr, proxy.log_text())
    assert int(stdout) == FILES[name]
    digest = hashlib.sha256()
    for block in file_bytes(name):
        digest.update(block)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest.hexdigest()
    assert proxy.popen.poll() is None, proxy.log_text()
    # the download's line (written after the HUP) is in the new access.log
    deadline = time.monotonic() + 15
    while not access_lines((log_dir / "access.log").read_text(), f"/files/{name}"):
        assert time.monotonic() < deadline, proxy.log_text()
        time.sleep(0.1)
    (line,) = access_lines((log_dir / "access.log").read_text(), f"/files/{name}")
    assert line["cause"] == "ok" and line["bytes_out"] == FILES[name], line
    assert "log files reopened" in (log_dir / "error.log").read_text()
    assert "Traceback" not in proxy.log_text()


async def test_a_stream_cut_at_the_graceful_timeout_is_reset_not_ended(start_backend, start_proxy):
    """A response whose body ends at the connection's end (an HTTP/1.0 client, a stream
    without length) and is still running at the graceful timeout: the cut resets the
    client's connection, since a FIN would make the cut body look complete."""

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no length: chunked to the proxy
        await response.prepare(request)
        while True:
            await response.write(b"s" * 1024)
            await asyncio.sleep(0.05)

    app = web.Application()
    app.router.add_get("/stream", endless)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url, FILEPROXY_GRACEFUL_TIMEOUT="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /stream HTTP/1.0\r\nHost: localhost\r\n\r\n")
        received = await reader.read(65536)
        assert received.startswith(b"HTTP/1.") and b" 200 " in received.split(b"\r\n")[0]
        proxy.popen.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):  # never a clean end of the connection
            async with asyncio.timeout(30):
                while piece := await reader.read(65536):
                    received += piece
            pytest.fail(f"the connection ended with a FIN after {len(received)} bytes")
    finally:
        writer.close()
    assert await asyncio.to_thread(proxy.popen.wait, 30) == 0, proxy.log_text()
    line = next(line for line in access_lines(proxy.log_text(), "/stream"))
    assert (line["status"], line["cause"]) == (200, "shutdown"), line
