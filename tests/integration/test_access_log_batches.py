"""The buffered access log against the real daemon: batches, and no line lost.

- ``fileproxy serve`` writes its access lines to stdout in batches (stdout is a
  SOCK_SEQPACKET socket here, so every write arrives as one message): far fewer
  writes than lines, each of whole lines; a SIGTERM right after the requests
  still writes every line, to stdout and to ``access.log``.
- gunicorn (2 workers): after a reload (HUP) and a stop (TERM) every request has
  its line, exactly once; ``access.log`` moved away by logrotate is reopened.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

from tests.conftest import ROOT, Process, clean_env, free_port, wait_for_port

PIPE_BUF = 4096


def access_ids(text: str) -> list[str]:
    ids = []
    for raw in text.splitlines():
        record = json.loads(raw)  # every line whole JSON
        assert record["logger"] == "fileproxy.access", record
        ids.append(record["request_id"])
    return ids


async def send_requests(url: str, prefix: str, count: int) -> None:
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            headers = {"X-Request-ID": f"{prefix}-{i}"}
            async with session.get(f"{url}/files/hello.txt", headers=headers) as resp:
                assert resp.status == 200
                await resp.read()

        await asyncio.gather(*(one(i) for i in range(count)))


async def test_serve_batches_its_writes_and_writes_every_line_at_stop(sample_upstream, tmp_dir):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    messages: list[bytes] = []

    def receive() -> None:
        while message := ours.recv(1 << 20):
            messages.append(message)

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    port = free_port()
    log_dir = tmp_dir / "logs"
    env = clean_env(
        FILEPROXY_BIND=f"127.0.0.1:{port}",
        FILEPROXY_UPSTREAM=sample_upstream.url,
        FILEPROXY_LOG_FORMAT="json",
        FILEPROXY_DRAIN_DELAY="0",
        FILEPROXY_LOG_DIR=str(log_dir),
    )
    with open(tmp_dir / "serve.stderr", "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, "-m", "fileproxy", "serve"],
            env=env,
            stdout=theirs.fileno(),
            stderr=err,
            cwd=ROOT,
        )
    theirs.close()
    try:
        wait_for_port(port, process=popen)
        count = 400
        await send_requests(f"http://127.0.0.1:{port}", "serve", count)
        popen.send_signal(signal.SIGTERM)  # at once: lines are still in the buffer
        assert popen.wait(30) == 0, (tmp_dir / "serve.stderr").read_text()
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(5)
    reader.join(10)
    ours.close()

    stdout = b"".join(messages).decode()
    expected = {f"serve-{i}" for i in range(count)}
    ids = access_ids(stdout)
    assert sorted(ids) == sorted(expected), (len(ids), count)
    assert (log_dir / "access.log").read_text() == stdout
    # batches: many lines per write, never a line cut between two writes
    assert len(messages) <= count // 5, f"{len(messages)} writes for {count} lines"
    for message in messages:
        assert message.endswith(b"\n")
        assert len(message) <= PIPE_BUF or message.count(b"\n") == 1


def _gunicorn(tmp: Path, upstream: str, log_dir: Path) -> tuple[Process, Path, Path]:
    port = free_port()
    env = clean_env(
        FILEPROXY_BIND=f"127.0.0.1:{port}",
        FILEPROXY_UPSTREAM=upstream,
        FILEPROXY_WORKERS="2",
        FILEPROXY_DRAIN_DELAY="0",
        FILEPROXY_GRACEFUL_TIMEOUT="5",
        FILEPROXY_LOG_FORMAT="json",
        FILEPROXY_LOG_DIR=str(log_dir),
    )
    stdout, stderr = tmp / "gunicorn.stdout", tmp / "gunicorn.stderr"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
            env=env,
            stdout=out,
            stderr=err,
            cwd=ROOT,
        )
    process = Process(popen, port, stderr, env)
    try:
        wait_for_port(port, timeout=60, process=popen)
        process.wait_for_log("fileproxy worker started", count=2, timeout=60)
    except Exception:
        process.stop()
        raise
    return process, stdout, stderr


def _workers(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", log)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie until gunicorn reaps it: gone as far as writing goes
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


async def test_gunicorn_reload_and_stop_lose_no_line_and_rotation_reopens(sample_upstream, tmp_dir):
    log_dir = tmp_dir / "logs"
    gunicorn, stdout, _ = _gunicorn(tmp_dir, sample_upstream.url, log_dir)
    try:
        first = 300
        await send_requests(gunicorn.url, "before-hup", first)
        old = _workers(gunicorn.log_text())
        assert len(old) == 2
        os.kill(gunicorn.pid, signal.SIGHUP)  # = systemctl reload: old workers drain, exit
        gunicorn.wait_for_log("Booting worker with pid", count=4, timeout=60)
        gunicorn.wait_for_log("fileproxy worker started", count=4, timeout=60)
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in old):
            assert time.monotonic() < deadline, "the old workers did not exit"
            await asyncio.sleep(0.1)
        # every line of the old workers is out, though less than a second passed
        assert sorted(access_ids(stdout.read_text())) == sorted(
            f"before-hup-{i}" for i in range(first)
        )

        # logrotate moves the file; the new workers' lines go to a new one
        (log_dir / "access.log").rename(log_dir / "access.log.1")
        second = 300
        await send_requests(gunicorn.url, "after-hup", second)
        assert gunicorn.stop(timeout=30) == 0, gunicorn.log_text()
    finally:
        gunicorn.stop()

    expected = {f"before-hup-{i}" for i in range(first)} | {f"after-hup-{i}" for i in range(second)}
    ids = access_ids(stdout.read_text())
    assert len(ids) == len(expected) and set(ids) == expected, (len(ids), len(expected))
    rotated = access_ids((log_dir / "access.log.1").read_text())
    assert sorted(rotated) == sorted(f"before-hup-{i}" for i in range(first))
    current = access_ids((log_dir / "access.log").read_text())
    assert sorted(current) == sorted(f"after-hup-{i}" for i in range(second))
