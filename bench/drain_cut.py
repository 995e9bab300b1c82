"""Does a download in flight at a reload / stop reach the client whole?

A client slower than the proxy (small SO_RCVBUF, paced reads) downloads a file of
the sample upstream through fileproxy; a signal goes to the proxy's main process
(gunicorn's master or `fileproxy serve`) ``--at`` seconds into the body. The
response must finish during the drain, every byte of it, then a clean FIN.
Prints one JSON line per run: bytes expected / received, whether the SHA-256
matches, how the connection ended (``eof``, ``reset``, ``timeout``), and what the
proxy's access line said. ``--stall S``: the client stops reading for S seconds once
the proxy has logged the response (its handler is done, the last bytes may still be
buffered): the exiting worker must wait for them.

    .venv/bin/python -m bench.drain_cut --server gunicorn --signal HUP
    .venv/bin/python -m bench.drain_cut --server serve --signal TERM --runs 3
    .venv/bin/python -m bench.drain_cut --server gunicorn --signal TERM --stall 2

No root; every process on an ephemeral 127.0.0.1 port, stopped by its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import free_port
from fileproxy.sample_upstream import FILES, file_bytes

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MIB = 1024 * 1024


@dataclass
class Download:
    expected: int  # Content-Length
    received: int  # body bytes that arrived
    sha256: str
    end: str  # "eof" (FIN), "reset", "timeout"
    signalled_at: float | None  # seconds into the body
    finished_at: float  # seconds into the body

    @property
    def complete(self) -> bool:
        return self.end == "eof" and self.received == self.expected


def paced_download(
    port: int,
    path: str,
    rate: float,
    *,
    rcvbuf: int = 64 * 1024,
    at: float | None = None,
    on_at: Callable[[], None] | None = None,
    stall_when: Callable[[], bool] | None = None,
    stall_s: float = 0.0,
    timeout: float = 60.0,
) -> Download:
    """GET ``path`` reading the body at ``rate`` bytes/s with a ``rcvbuf`` receive buffer;
    ``on_at()`` runs once, ``at`` seconds into the body. After that, once
    ``stall_when()`` (asked every 50 ms) is true, reading stops for ``stall_s`` seconds
    once, then goes on at ``rate``: a client that stalls just as the server is done."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connect: it sets the window (0: the kernel's autotuning)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10.0)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before the response head: {head!r}")
            head += data
        head, _, body = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split()[1] != "200":
            raise ConnectionError(f"unexpected response: {lines[0]}")
        length = next(
            int(v)
            for k, _, v in (x.partition(":") for x in lines[1:])
            if k.lower() == "content-length"
        )
        digest = hashlib.sha256(body)
        received = len(body)
        started = time.monotonic()
        paced_from, paced_bytes = started, received  # the pace restarts after the stall
        signalled_at = None
        stalled = stall_when is None
        asked_at = 0.0
        end = "eof"
        while True:
            now = time.monotonic()
            if on_at is not None and signalled_at is None and now - started >= (at or 0.0):
                signalled_at = now - started
                on_at()
            if not stalled and signalled_at is not None and now - asked_at >= 0.05:
                asked_at = now
                if stall_when is not None and stall_when():
                    stalled = True
                    time.sleep(stall_s)
                    paced_from, paced_bytes = time.monotonic(), received
            ahead = paced_from + (received - paced_bytes) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            if time.monotonic() - started > timeout:
                end = "timeout"
                break
            try:
                data = sock.recv(16 * 1024)
            except ConnectionResetError:
                end = "reset"
                break
            except TimeoutError:
                end = "timeout"
                break
            if not data:
                break
            digest.update(data)
            received += len(data)
        return Download(
            length, received, digest.hexdigest(), end, signalled_at, time.monotonic() - started
        )
    finally:
        sock.close()


def expected_sha256(name: str) -> str:
    digest = hashlib.sha256()
    for block in file_bytes(name):
        digest.update(block)
    return digest.hexdigest()


def access_line(log: Path, path: str) -> dict[str, Any] | None:
    """The JSON access line of ``path`` (one request of it per run), once written."""
    marker = f'"path":"{path}"'
    for raw in log.read_text(errors="replace").splitlines():
        if marker in raw:
            line: dict[str, Any] = json.loads(raw)
            return line
    return None


def wait_for_port(port: int, popen: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"exited with {popen.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def wait_for_log(log: Path, text: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not logged {count} times")
        time.sleep(0.05)


def stop(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


def one_run(args: argparse.Namespace, tmp: Path, upstream_port: int, sha: str) -> dict[str, object]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FILEPROXY_")},
        "FILEPROXY_BIND": f"127.0.0.1:{port}",
        "FILEPROXY_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
        "FILEPROXY_CACHE": "off",  # the relay: nginx proxy_pass has no cache either
        "FILEPROXY_WORKERS": "2",
        "FILEPROXY_DRAIN_DELAY": str(args.drain_delay),
        "FILEPROXY_GRACEFUL_TIMEOUT": "60",
        "FILEPROXY_LOG_FORMAT": "json",
        "BUFFER_SIZE": str(args.buffer_size),
        "FILEPROXY_SO_SNDBUF": str(args.sndbuf),
    }
    if args.server == "gunicorn":
        cmd = [str(VENV_BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
    else:
        cmd = [sys.executable, "-m", "fileproxy", "serve"]
    log = tmp / f"{args.server}-{port}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, popen)
        if args.server == "gunicorn":
            wait_for_log(log, "fileproxy worker started", 2)
        sig = getattr(signal, f"SIG{args.signal}")
        path = f"/files/{args.file}"
        result = paced_download(
            port,
            path,
            args.rate * MIB,
            at=args.at,
            on_at=lambda: popen.send_signal(sig),
            stall_when=(lambda: access_line(log, path) is not None) if args.stall else None,
            stall_s=args.stall,
        )
        line = access_line(log, path)
    finally:
        stop(popen)
    return {
        "server": args.server,
        "signal": args.signal,
        **asdict(result),
        "missing": result.expected - result.received,
        "logged": None if line is None else {k: line.get(k) for k in ("cause", "bytes_out")},
        "sha256_ok": result.sha256 == sha,
        "complete": result.complete,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("gunicorn", "serve"), default="gunicorn")
    parser.add_argument("--signal", choices=("HUP", "TERM"), default="HUP")
    parser.add_argument("--file", choices=sorted(FILES), default="64m.bin")
    parser.add_argument("--rate", type=float, default=16.0, help="client read rate, MiB/s")
    parser.add_argument(
        "--rcvbuf", type=int, default=64 * 1024, help="client SO_RCVBUF (0: autotuned)"
    )
    parser.add_argument("--at", type=float, default=1.5, help="signal this many s into the body")
    parser.add_argument(
        "--stall",
        type=float,
        default=0.0,
        help="stop reading this long once the proxy logged the response (0: never)",
    )
    parser.add_argument(
        "--buffer-size",
        type=int,
        default=131072,
        help="BUFFER_SIZE: the client transport's high-water mark (default 128 KiB)",
    )
    parser.add_argument(
        "--sndbuf", type=int, default=0, help="FILEPROXY_SO_SNDBUF (0: autotuned, the default)"
    )
    parser.add_argument("--drain-delay", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--logs", help="keep the proxy's logs in this directory")
    args = parser.parse_args()
    if args.server == "serve" and args.signal == "HUP":
        parser.error("fileproxy serve has no reload: use --signal TERM")
    sha = expected_sha256(args.file)
    upstream_port = free_port()
    with tempfile.TemporaryDirectory(prefix="drain-cut-") as tmp_dir:
        tmp = args.logs or tmp_dir
        upstream_cmd = [
            sys.executable,
            "-m",
            "fileproxy",
            "sample-upstream",
            "--bind",
            f"127.0.0.1:{upstream_port}",
        ]
        upstream = subprocess.Popen(
            upstream_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            wait_for_port(upstream_port, upstream)
            for _ in range(args.runs):
                print(json.dumps(one_run(args, Path(tmp), upstream_port, sha)), flush=True)
        finally:
            stop(upstream)


if __name__ == "__main__":
    main()
