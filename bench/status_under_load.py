"""How fast /stats and /health answer while fileproxy relays many large downloads.

nginx (1 worker, static) serves a 1 MiB file; ``fileproxy serve`` (one process,
default settings, access log to /dev/null) relays it to ``wrk -t1 -c64`` while
two probe threads send ``GET /stats`` and ``GET /health`` every --interval-ms,
each on a new connection (as a load balancer's health checker does), and time
connect() to last byte. Prints, per contender and run, the wrk req/s and MB/s
and the p50/p90/p99/max latency of each endpoint, then the medians over runs.
When the daemon reports its event-loop lag in /health (``event_loop.lag_ms``),
the largest value seen during the load is printed too.

    .venv/bin/python -m bench.status_under_load [--runs 3] [--duration 10]
        [--connections 64] [--size-kib 1024] [--ref DIR] [--no-probe]

``--ref DIR`` adds the contender ``ref``: the same daemon run from another source
tree (``git archive <commit> | tar -x -C DIR``), alternated run by run with this
tree's, against the same backend: an A/B measurement of a change. ``--no-probe``
runs wrk alone (throughput without the probes' share of the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.health_probe import percentile
from bench.procs import free_port, wait_port
from bench.run import clean_env, nginx_conf

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def fetch(port: int, path: str, timeout: float = 10.0) -> tuple[float, bytes]:
    """(ms from connect() to the last byte, body) of one GET on a new connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(request.encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    elapsed = (time.perf_counter() - started) * 1000
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{path}: {head[:60]!r}")
    return elapsed, body


@dataclass
class Probe:
    """GET `path` every `interval` s on a new connection until stopped; latencies in ms."""

    port: int
    path: str
    interval: float
    samples: list[float] = field(default_factory=list)
    failures: int = 0
    lag_ms: list[float] = field(default_factory=list)  # event_loop.lag_ms seen in /health

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                elapsed, body = fetch(self.port, self.path)
                self.samples.append(elapsed)
                if self.path == "/health":
                    lag = json.loads(body).get("event_loop", {}).get("lag_ms")
                    if lag is not None:
                        self.lag_ms.append(float(lag))
            except (OSError, RuntimeError, ValueError):
                self.failures += 1
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - began)))

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def summary(self) -> dict[str, float | int | None]:
        values = sorted(self.samples)
        return {
            "count": len(values),
            "failures": self.failures,
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "max": values[-1] if values else None,
            "lag_max": max(self.lag_ms) if self.lag_ms else None,
        }


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wrk(port: int, path: str, connections: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if rps is None:
        raise SystemExit(f"wrk printed no Requests/sec:\n{out}")
    return {
        "rps": float(rps.group(1)),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(0) if errors else "",  # type: ignore[dict-item]
    }


def start_daemon(tree: Path, port: int, backend_port: int, log: Path) -> subprocess.Popen[bytes]:
    env = clean_env(
        {
            "FILEPROXY_BIND": f"127.0.0.1:{port}",
            "FILEPROXY_UPSTREAM": f"http://127.0.0.1:{backend_port}",
            "FILEPROXY_CACHE": "off",  # the relay: nginx proxy_pass has no cache either
            "FILEPROXY_DRAIN_DELAY": "0",
            "PYTHONPATH": str(tree),
        }
    )
    with open(log, "ab") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "fileproxy", "serve"],
            env=env,
            cwd=tree,
            stdout=subprocess.DEVNULL,  # the access log
            stderr=err,
        )
    wait_port(port)
    return daemon


def one_run(
    tree: Path, backend_port: int, args: argparse.Namespace, log: Path
) -> dict[str, object]:
    port = free_port()
    daemon = start_daemon(tree, port, backend_port, log)
    try:
        # warm up: the pool, the classifier's first estimate, the allocator
        wrk(port, "/big.bin", args.connections, 2)
        interval = args.interval_ms / 1000
        cpu_before = cpu_seconds(daemon.pid)
        if args.no_probe:
            load = wrk(port, "/big.bin", args.connections, args.duration)
            stats = health = {}
        else:
            with (
                Probe(port, "/stats", interval) as stats_probe,
                Probe(port, "/health", interval) as health_probe,
            ):
                load = wrk(port, "/big.bin", args.connections, args.duration)
            stats, health = stats_probe.summary(), health_probe.summary()
        cpu = cpu_seconds(daemon.pid) - cpu_before
        # idle, after the load: what the endpoints cost alone
        idle = sorted(fetch(port, "/stats")[0] for _ in range(20))
    finally:
        daemon.terminate()
        daemon.wait(15)
    size = args.size_kib * 1024
    return {
        "rps": load["rps"],
        "MB/s": load["rps"] * size / 1e6,
        # the daemon's CPU per GiB relayed (includes the probes' share, which is small)
        "cpu_s_per_gib": cpu / (load["rps"] * args.duration * size / 2**30),
        "non_2xx": load["non_2xx"],
        "stats": stats,
        "health": health,
        "stats_idle_p50": percentile(idle, 50),
    }


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--size-kib", type=int, default=1024)
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--ref", type=Path, help="another source tree, alternated with this one")
    parser.add_argument("--no-probe", action="store_true", help="wrk alone, no probes")
    args = parser.parse_args()
    for program in ("wrk", "nginx"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            raise SystemExit(f"{program} is required: apt-get install -y {program}")
    trees = {"this": ROOT}
    if args.ref is not None:
        if not (args.ref / "fileproxy" / "__init__.py").exists():
            raise SystemExit(f"--ref {args.ref}: no fileproxy package there")
        trees["ref"] = args.ref.resolve()
    results: dict[str, list[dict[str, object]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="fileproxy-status-load-") as tmp:
        root = Path(tmp)
        www = root / "www"
        www.mkdir()
        (www / "big.bin").write_bytes(os.urandom(args.size_kib * 1024))
        backend_port = free_port()
        conf = nginx_conf(
            root, "backend", f"server {{ listen 127.0.0.1:{backend_port}; root {www}; }}", 1
        )
        nginx = subprocess.Popen(
            [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(root)]
        )
        try:
            wait_port(backend_port)
            for run in range(args.runs):
                order = list(trees) if run % 2 == 0 else list(reversed(trees))
                for name in order:
                    result = one_run(trees[name], backend_port, args, root / f"{name}.log")
                    results[name].append(result)
                    print(f"run {run + 1} {name}: {json.dumps(result)}", flush=True)
        finally:
            nginx.terminate()
            nginx.wait(15)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "")
    print(
        f"\n# /stats and /health under {args.connections} concurrent {args.size_kib} KiB "
        f"downloads: nginx -> fileproxy serve -> wrk -t1 -c{args.connections} "
        f"-d{args.duration}s, probes every {args.interval_ms:g} ms"
    )
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, {cpu}, "
        f"kernel {platform.release()}; median over {args.runs} runs"
    )
    print(
        "| tree | req/s | MB/s | CPU s/GiB | /stats p50 / p90 / p99 / max ms | "
        "/health p50 / p90 / p99 / max ms | loop lag max ms | /stats idle p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def med(rows: list[dict[str, object]], *keys: str) -> float | None:
        values = []
        for row in rows:
            value: object = row
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                values.append(float(value))
        return statistics.median(values) if values else None

    for name, rows in results.items():
        cells = [name, fmt(med(rows, "rps")), fmt(med(rows, "MB/s"))]
        cells.append(f"{med(rows, 'cpu_s_per_gib') or 0:.2f}")
        for endpoint in ("stats", "health"):
            cells.append(
                " / ".join(fmt(med(rows, endpoint, q)) for q in ("p50", "p90", "p99", "max"))
            )
        cells += [fmt(med(rows, "health", "lag_max")), fmt(med(rows, "stats_idle_p50"))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
