"""A stop or reload lets downloads in flight end whole, then the process exits; and
`fileproxy serve` says in one line why it cannot listen.

The drain: a response is finished when its last byte is in the kernel, not when its
handler returned. With a client slower than the proxy, the handler returns while up
to ``BUFFER_SIZE`` bytes still sit in the transport's write buffer; aiohttp's runner
cleanup did not wait for them and the process exited, so a download logged
``cause: ok`` with every byte out ended short at the client (issue 12, item 2).

The clients here read at a pace (16 MiB/s, 64 KiB SO_RCVBUF) and stop reading for a
moment once the proxy has logged the response: the exiting process must still be
there when they resume. ``BUFFER_SIZE`` is raised to 4 MiB so that the bytes still
buffered when the handler returns are MiBs every time; with the default 128 KiB
they are 0 to 128 KiB depending on where the last write fell (the same cut, but only
sometimes: bench/drain_cut.py shows both).
"""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.drain_cut import Download, paced_download
from fileproxy.sample_upstream import FILES, file_bytes
from tests.conftest import ROOT, Process, clean_env, free_port, wait_for_port
from tests.integration.test_deployment import start_gunicorn

MIB = 1024 * 1024
BUFFERED = {"BUFFER_SIZE": str(4 * MIB)}


@functools.cache
def sha256_of(name: str) -> str:
    digest = hashlib.sha256()
    for block in file_bytes(name):
        digest.update(block)
    return digest.hexdigest()


def download_across(
    process: Process, sig: signal.Signals, name: str, rate_mib: float, at: float, stall_s: float
) -> Download:
    path = f"/files/{name}"
    return paced_download(
        process.port,
        path,
        rate_mib * MIB,
        rcvbuf=64 * 1024,
        at=at,
        on_at=lambda: process.popen.send_signal(sig),
        stall_when=lambda: process.access_line(path) is not None,
        stall_s=stall_s,
        timeout=45,
    )


def assert_whole(result: Download, name: str, process: Process) -> None:
    assert result.signalled_at is not None
    assert (result.received, result.end) == (FILES[name], "eof"), (result, process.log_text())
    assert result.sha256 == sha256_of(name)
    line = process.access_line(f"/files/{name}")
    assert line is not None and line["cause"] == "ok" and line["bytes_out"] == FILES[name]
    assert "Traceback" not in process.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["stop", "reload"])
def test_gunicorn_drain_sends_the_last_buffered_bytes(sample_upstream, tmp_dir: Path, sig):
    gunicorn = start_gunicorn(tmp_dir, sample_upstream.url, **BUFFERED)  # 2 workers, drain 1 s
    try:
        # about 4 s: at the signal 48 MiB are still to come, the response ends in the drain
        result = download_across(gunicorn, sig, "64m.bin", 16, at=1.0, stall_s=1.5)
        assert_whole(result, "64m.bin", gunicorn)
        if sig == signal.SIGTERM:
            assert gunicorn.popen.wait(30) == 0, gunicorn.log_text()
        else:  # the reload's new workers serve
            gunicorn.wait_for_log("fileproxy worker started", count=4, timeout=30)
            assert gunicorn.popen.poll() is None
    finally:
        gunicorn.stop()


@pytest.mark.slow
def test_serve_drain_sends_the_last_buffered_bytes(sample_upstream, start_proxy):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_DRAIN_DELAY="1", **BUFFERED)
    result = download_across(proxy, signal.SIGTERM, "64m.bin", 16, at=1.0, stall_s=1.5)
    assert_whole(result, "64m.bin", proxy)
    assert proxy.popen.wait(30) == 0, proxy.log_text()


@pytest.mark.slow
def test_drain_is_bounded_by_the_graceful_timeout_then_resets(sample_upstream, start_proxy):
    """A client that stops reading for good: the process still exits at the graceful
    timeout, and the client sees a reset, not an end that looks like the body's."""
    # The relay's path, where a handler returns with its tail still in the transport's
    # buffer. A spooled response's handler itself waits for its tail to reach the kernel
    # (delivery.spool), so with the spool on this client would hold no unsent bytes.
    proxy = start_proxy(
        sample_upstream.url,
        FILEPROXY_DRAIN_DELAY="0",
        FILEPROXY_GRACEFUL_TIMEOUT="3",
        FILEPROXY_SPOOL="off",
        **BUFFERED,
    )
    path = "/files/16m.bin"
    exited: list[float] = []

    def stop_reading_until_exit() -> bool:
        if proxy.access_line(path) is None:
            return False
        proxy.popen.wait(30)
        exited.append(time.monotonic())
        return True

    signalled: list[float] = []

    def term() -> None:
        signalled.append(time.monotonic())
        proxy.popen.send_signal(signal.SIGTERM)

    result = paced_download(
        proxy.port, path, 8 * MIB, at=0.5, on_at=term, stall_when=stop_reading_until_exit
    )
    assert exited and proxy.popen.returncode == 0, proxy.log_text()
    # the graceful timeout counts from the listener's close (at SIGTERM: no drain delay)
    assert 2.5 < exited[0] - signalled[0] < 15, proxy.log_text()
    assert result.end == "reset" and result.received < FILES["16m.bin"], result
    assert "aborting connections with unsent bytes" in proxy.log_text()


# --------------------------------------------------------------------------------------------
# `fileproxy serve` cannot listen: one line, exit code 2
# --------------------------------------------------------------------------------------------


def serve_once(bind: str, tmp_dir: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env(FILEPROXY_BIND=bind, FILEPROXY_UPSTREAM="http://127.0.0.1:9")
    return subprocess.run(
        [sys.executable, "-m", "fileproxy", "serve"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_dir: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_once(f"127.0.0.1:{port}", tmp_dir)
    assert done.returncode == 2, done
    assert done.stderr == f"fileproxy: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert "Traceback" not in done.stdout + done.stderr


def test_serve_on_a_socket_path_it_cannot_bind_says_so_in_one_line(tmp_dir: Path):
    path = tmp_dir / "no-such-dir" / "fileproxy.sock"
    done = serve_once(f"unix:{path}", tmp_dir)
    assert done.returncode == 2, done
    assert done.stderr == f"fileproxy: cannot listen on unix:{path}: no such file or directory\n"
    assert "Traceback" not in done.stdout + done.stderr


# --------------------------------------------------------------------------------------------
# `fileproxy serve` listens on sockets of its own (aiohttp's public SockSite)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_listens_with_its_backlog_and_on_a_reused_unix_path(sample_upstream, tmp_dir):
    """TCP: backlog 1024, the socket options applied (``listen_refused`` a list, never
    None). Unix: a socket file left by an earlier run is replaced, requests are served."""
    ss = "/usr/sbin/ss" if Path("/usr/sbin/ss").exists() else "ss"
    port = free_port()
    env = clean_env(
        FILEPROXY_BIND=f"127.0.0.1:{port}",
        FILEPROXY_UPSTREAM=sample_upstream.url,
        FILEPROXY_TCP_KEEPIDLE="77",
    )
    args = [sys.executable, "-m", "fileproxy", "serve"]
    tcp = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=tcp)
        listen = subprocess.run(
            [ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert int(listen[2]) == 1024  # Send-Q of a listener is its backlog
        health = http_get_json(("127.0.0.1", port), "/health")
        assert health["tcp"]["listen_refused"] == []
        assert health["tcp"]["client_socket"]["TCP_KEEPIDLE"] == 77  # inherited from the listener
    finally:
        tcp.terminate()
        tcp.wait(30)

    path = tmp_dir / "fileproxy.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # a socket file nobody listens on any more
    env = clean_env(FILEPROXY_BIND=f"unix:{path}", FILEPROXY_UPSTREAM=sample_upstream.url)
    unix = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                health = http_get_json(str(path), "/health")
                break
            except OSError:
                assert unix.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert health["tcp"]["listen_refused"] == []
    finally:
        unix.terminate()
        unix.wait(30)


def http_get_json(address: tuple[str, int] | str, path: str) -> dict[str, Any]:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: fileproxy\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    result: dict[str, Any] = json.loads(body)
    return result
