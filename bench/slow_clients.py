"""Many slow clients downloading one file at once: who frees the upstream, who times out.

Each client is an asyncio raw socket with a small SO_RCVBUF that reads its
response at a fixed pace in userspace (no root, no tc: loopback only), so the
proxy in front of it sees a client that drains ~``--rate`` bytes/s through a
small window. Contenders, each in front of the same static nginx backend:

- ``spool_on``: fileproxy (``gunicorn -c gunicorn.conf.py``, 2 workers, defaults);
- ``spool_off``: the same with ``FILEPROXY_SPOOL=off`` (today's backpressure);
- ``nginx``: nginx ``proxy_pass`` with its defaults (``proxy_buffering on``:
  memory buffers, then a temp file up to 1 GiB per response), 2 workers.

On loopback the kernel grows a socket's send buffer to ``tcp_wmem``'s maximum (4 MiB
here) at once: the proxies' client sockets would swallow a whole 4 MiB file each, and
300 of them push the kernel into TCP memory pressure (drops, retransmit back-off),
which then is what gets measured. On the emulated WAN links of ``bench.run`` the
send buffers grew to 2-4 MiB too (its ``many`` workload): a proxy hands the kernel the
first few MiB of any response, and the spool is for the rest of files larger than
that. A small send buffer makes a 4 MiB file stand for such a file here: ``--sndbuf``
(default 32 KiB: ``FILEPROXY_SO_SNDBUF`` for fileproxy, ``listen ... sndbuf=`` for
nginx).

Reported per contender: completed byte-exact / started, errors (status, short
body, reset), time to first byte p50 / p99 (connect to the status line), the most
upstream connections held at once (``ss``, sampled every 0.2 s), when the backend
had sent its last byte (its access log) against when the clients finished, and
the largest event-loop lag fileproxy reported in /health meanwhile, the proxy's RSS
(all its processes, sampled) and, for fileproxy, the spooled MiB sent by sendfile and
the pieces it read into the page cache on a thread first. ``--drop-caches`` (root)
syncs and drops the page cache every second meanwhile: the spooled bytes are then read
back from the disk, and the loop lag says whether that ever blocks the event loop.

    .venv/bin/python -m bench.slow_clients [--clients 300] [--size-mib 4] [--rate 100000]
        [--rcvbuf 16384] [--contenders spool_on,spool_off,nginx] [--deadline 120]
        [--drop-caches] [--fp-env NAME=VALUE ...]

``slow_get`` and ``static_backend_conf`` are used by
tests/integration/test_spool.py; ``slow_get`` is also the client of bench.many_clients
(the ``many`` workload of bench.run, on the impaired links).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
PIECE = 16 * 1024  # bytes a client reads at once


@dataclass
class Download:
    status: int = 0
    ttfb_s: float | None = None  # connect start to the first response byte
    done_s: float | None = None  # connect start to the last body byte
    length: int | None = None
    received: int = 0
    sha256: str = ""
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.length is not None and self.received == self.length


async def slow_get(
    port: int,
    path: str,
    *,
    rate: float | None,
    rcvbuf: int,
    deadline_s: float,
    host: str = "127.0.0.1",
    headers: str = "",
    close: bool = True,
) -> Download:
    """GET ``path`` on a fresh connection, reading the body at ``rate`` bytes/s.

    ``rate`` None: read as fast as the connection delivers (bench.many_clients: the
    impaired link paces the client). ``close`` False: no ``Connection: close`` (a
    keep-alive request); the client closes once it has the whole body, so the server
    never closes a connection with unsent bytes in its kernel buffer.
    """
    loop = asyncio.get_running_loop()
    result = Download()
    started = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        async with asyncio.timeout(deadline_s):
            await loop.sock_connect(sock, (host, port))
            connection = "Connection: close\r\n" if close else ""
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}{connection}\r\n"
            await loop.sock_sendall(sock, request.encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = await loop.sock_recv(sock, PIECE)
                if not data:
                    result.error = "closed before the response head"
                    return result
                if result.ttfb_s is None:
                    result.ttfb_s = time.monotonic() - started
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            result.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    result.length = int(value.strip())
            digest = hashlib.sha256(body)
            result.received = len(body)
            body_started = time.monotonic()
            while result.length is None or result.received < result.length:
                data = await loop.sock_recv(sock, PIECE)
                if not data:
                    break
                digest.update(data)
                result.received += len(data)
                if rate is None:
                    continue
                ahead = body_started + result.received / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            result.sha256 = digest.hexdigest()
            result.done_s = time.monotonic() - started
            if result.length is not None and result.received < result.length:
                result.error = f"short body: {result.received} of {result.length}"
    except TimeoutError:
        result.error = f"not done after {deadline_s:g} s ({result.received} bytes)"
    except OSError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    return result


def static_backend_conf(directory: Path, port: int, www: Path, workers: int = 1) -> Path:
    """nginx serving ``www`` on ``port``; its access log says when each response was sent."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "backend.conf"
    conf.write_text(
        f"""daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes {workers};
worker_rlimit_nofile 8192;
pid {directory}/backend.pid;
error_log {directory}/backend-error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format sent '$msec $status $bytes_sent $request_time';
    access_log {directory}/backend-access.log sent;
    sendfile on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{ listen 127.0.0.1:{port} backlog=4096; root {www}; }}
}}
"""
    )
    return conf


def backend_last_sent(directory: Path) -> float | None:
    """Wall-clock time the backend finished its last response (its access log)."""
    path = directory / "backend-access.log"
    times = [float(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]
    return max(times) if times else None


def established_to(port: int) -> int:
    """Established TCP connections whose remote end is 127.0.0.1:``port`` (``ss``)."""
    ss = shutil.which("ss") or "/usr/sbin/ss"
    out = subprocess.run(
        [ss, "-tnH", "state", "established", "dst", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- the standalone comparison ------------------------------------------------------


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FILEPROXY_", "HTTP_", "REDIS_"))
        and k not in ("STREAM_CHUNK_SIZE", "BUFFER_SIZE")
    }
    env.update(extra)
    return env


def _proxy_nginx_conf(directory: Path, port: int, backend: int, sndbuf: int) -> Path:
    conf = directory / "proxy.conf"
    conf.write_text(
        f"""daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 2;
worker_rlimit_nofile 8192;
pid {directory}/proxy.pid;
error_log {directory}/proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {directory}/pbody;
    proxy_temp_path {directory}/ptemp;
    fastcgi_temp_path {directory}/pfastcgi;
    uwsgi_temp_path {directory}/puwsgi;
    scgi_temp_path {directory}/pscgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096 sndbuf={sndbuf};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )
    return conf


@dataclass
class Row:
    contender: str
    clients: int
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttfb_p50_s: float = 0.0
    ttfb_p99_s: float = 0.0
    clients_done_s: float = 0.0
    backend_done_s: float | None = None
    max_upstream_connections: int = 0
    max_loop_lag_ms: float | None = None
    spooled: int | None = None
    max_rss_mib: float = 0.0  # the proxy's processes together, sampled
    sendfile_mib: float | None = None  # spooled bytes sent by sendfile (fileproxy)
    cold_pieces: int | None = None  # sendfile pieces read into the page cache first


def _tree_rss_mib(pid: int) -> float:
    """RSS of ``pid`` and its children (gunicorn's workers, nginx's), MiB."""
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(child) for child in children]
    total = 0
    for one in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def _drop_caches() -> None:
    """Write dirty pages back, then drop the clean page cache (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


async def _sample(
    port: int,
    backend: int,
    stop: asyncio.Event,
    row: Row,
    fileproxy: bool,
    proxy_pid: int = 0,
    drop_caches: bool = False,
) -> None:
    dropped = 0.0
    while not stop.is_set():
        count = await asyncio.to_thread(established_to, backend)
        row.max_upstream_connections = max(row.max_upstream_connections, count)
        if proxy_pid:
            row.max_rss_mib = max(row.max_rss_mib, _tree_rss_mib(proxy_pid))
        if drop_caches and time.monotonic() - dropped > 1.0:
            dropped = time.monotonic()
            await asyncio.to_thread(_drop_caches)
        if fileproxy:
            try:
                health = await asyncio.to_thread(_health, port)
                lag = float(health["event_loop"]["lag_max_ms"])
                row.max_loop_lag_ms = max(row.max_loop_lag_ms or 0.0, lag)
            except (OSError, KeyError, ValueError):
                pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


def _health(port: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


async def measure(
    name: str,
    port: int,
    backend: int,
    backend_dir: Path,
    args: argparse.Namespace,
    sha: str,
    proxy_pid: int = 0,
) -> Row:
    row = Row(name, args.clients)
    (backend_dir / "backend-access.log").write_text("")
    os.kill(int((backend_dir / "backend.pid").read_text()), 10)  # SIGUSR1: reopen the log
    await asyncio.sleep(0.3)
    stop = asyncio.Event()
    sampler = asyncio.create_task(
        _sample(port, backend, stop, row, name.startswith("spool"), proxy_pid, args.drop_caches)
    )
    wall0, started = time.time(), time.monotonic()
    results = await asyncio.gather(
        *(
            slow_get(
                port,
                f"/file-{args.size_mib}m.bin",
                rate=args.rate,
                rcvbuf=args.rcvbuf,
                deadline_s=args.deadline,
            )
            for _ in range(args.clients)
        )
    )
    row.clients_done_s = time.monotonic() - started
    stop.set()
    await sampler
    for result in results:
        if result.complete and result.status == 200 and result.sha256 == sha:
            row.completed += 1
        else:
            why = result.error or (f"status {result.status}" if result.status != 200 else "bytes")
            key = why.split(":")[0].split(" (")[0][:40]
            row.errors[key] = row.errors.get(key, 0) + 1
    ttfbs = [r.ttfb_s for r in results if r.ttfb_s is not None]
    row.ttfb_p50_s = round(statistics.median(ttfbs), 3) if ttfbs else float("nan")
    row.ttfb_p99_s = round(percentile(ttfbs, 99), 3) if ttfbs else float("nan")
    last = backend_last_sent(backend_dir)
    row.backend_done_s = round(last - wall0, 2) if last is not None else None
    row.clients_done_s = round(row.clients_done_s, 2)
    if name.startswith("spool"):
        per_worker: dict[int, dict] = {}  # type: ignore[type-arg]
        for _ in range(12):  # each answer is one worker's: ask until both answered
            with contextlib.suppress(OSError):
                health = await asyncio.to_thread(_health, port)
                per_worker[health["pid"]] = health["spool"]
        row.spooled = sum(spool["responses_spooled"] for spool in per_worker.values())
        if all("sendfile_bytes" in spool for spool in per_worker.values()):
            sent = sum(spool["sendfile_bytes"] for spool in per_worker.values())
            row.sendfile_mib = round(sent / (1 << 20), 1)
            row.cold_pieces = sum(spool["sendfile_cold_pieces"] for spool in per_worker.values())
    row.max_rss_mib = round(row.max_rss_mib, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--size-mib", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100_000)
    parser.add_argument("--rcvbuf", type=int, default=16384)
    parser.add_argument("--deadline", type=float, default=120)
    parser.add_argument(
        "--sndbuf",
        type=int,
        default=32768,
        help="SO_SNDBUF of the proxies' client sockets (see the module docstring)",
    )
    parser.add_argument("--contenders", default="spool_on,spool_off,nginx")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="sync and drop the page cache every second meanwhile (root): spooled bytes "
        "are read back from the disk, not from memory",
    )
    parser.add_argument(
        "--fp-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every fileproxy contender (repeatable), e.g. FILEPROXY_CACHE=off",
    )
    args = parser.parse_args()
    fp_env = dict(item.split("=", 1) for item in args.fp_env)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    venv_bin = Path(sys.executable).parent
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-slow-clients-") as tmp:
        root = Path(tmp)
        www = root / "www"
        www.mkdir()
        body = os.urandom(args.size_mib << 20)
        (www / f"file-{args.size_mib}m.bin").write_bytes(body)
        sha = hashlib.sha256(body).hexdigest()
        backend = free_port()
        bdir = root / "backend"
        conf = static_backend_conf(bdir, backend, www)
        back = subprocess.Popen([nginx, "-c", str(conf), "-p", str(bdir)])
        try:
            wait_port(backend, timeout=30)
            for name in args.contenders.split(","):
                port = free_port()
                if name == "nginx":
                    pconf = _proxy_nginx_conf(bdir, port, backend, args.sndbuf)
                    argv = [nginx, "-c", str(pconf), "-p", str(bdir)]
                    env = _clean_env({})
                else:
                    argv = [str(venv_bin / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
                    env = _clean_env(
                        {
                            "FILEPROXY_BIND": f"127.0.0.1:{port}",
                            "FILEPROXY_UPSTREAM": f"http://127.0.0.1:{backend}",
                            "FILEPROXY_WORKERS": "2",
                            "FILEPROXY_ACCESS_LOG": "off",
                            "FILEPROXY_LOG_LEVEL": "warning",
                            "FILEPROXY_DRAIN_DELAY": "0",
                            "FILEPROXY_GRACEFUL_TIMEOUT": "3",
                            "FILEPROXY_SPOOL": "on" if name == "spool_on" else "off",
                            "FILEPROXY_SO_SNDBUF": str(args.sndbuf),
                            # a cache of its own, empty, as nginx starts: the default
                            # directory is shared by every run (another run's object of
                            # this path, other bytes, would be revalidated by each client)
                            "FILEPROXY_CACHE_DIR": str(root / f"cache-{name}"),
                            **fp_env,
                        }
                    )
                proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
                try:
                    wait_port(port, timeout=30)
                    time.sleep(2)  # every worker up
                    row = asyncio.run(measure(name, port, backend, bdir, args, sha, proc.pid))
                finally:
                    proc.terminate()
                    proc.wait(30)
                rows.append(row)
                print(json.dumps(row.__dict__), flush=True)
        finally:
            back.terminate()
            back.wait(10)
    print()
    dropping = ", page cache dropped every second" if args.drop_caches else ""
    print(
        f"{args.clients} clients x {args.size_mib} MiB at {args.rate / 1000:g} KB/s, "
        f"SO_RCVBUF {args.rcvbuf}{dropping}; "
        f"{platform.node()} ({os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print()
    print(
        "| contender | completed | errors | first byte p50 / p99 | upstream conns (max) "
        "| backend done | clients done | loop lag max | spooled | RSS max | sendfile MiB "
        "(cold pieces) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
        lag = f"{r.max_loop_lag_ms:.0f} ms" if r.max_loop_lag_ms is not None else "-"
        print(
            f"| {r.contender} | {r.completed}/{r.clients} | {errors} "
            f"| {r.ttfb_p50_s:.2f} / {r.ttfb_p99_s:.2f} s | {r.max_upstream_connections} "
            f"| {r.backend_done_s} s | {r.clients_done_s} s | {lag} "
            f"| {r.spooled if r.spooled is not None else '-'} | {r.max_rss_mib:.0f} MiB "
            f"| {r.sendfile_mib if r.sendfile_mib is not None else '-'}"
            f"{f' ({r.cold_pieces})' if r.cold_pieces is not None else ''} |"
        )


if __name__ == "__main__":
    main()
