"""The small-response hot path on loopback: req/s and CPU per request, one worker each.

No namespaces, no root needed: every process listens on an ephemeral 127.0.0.1
port. The backend is nginx (1 worker) serving a 1 KiB static file; the
contenders, each with one worker process, are

- ``direct``: wrk straight to the backend (the limit),
- ``nginx``: nginx ``proxy_pass`` with upstream keepalive, 1 worker,
- ``before``: the seed's plain aiohttp proxy (``bench/baseline_proxy.py``) under
  ``gunicorn -k aiohttp.GunicornUVLoopWebWorker -w 1``,
- ``fp_off`` / ``fp_on``: fileproxy (``gunicorn -c gunicorn.conf.py``,
  ``FILEPROXY_WORKERS=1``), optimizer off / on, access log off (as bench.run),
- ``fp_log``: fileproxy, optimizer on, access log on (JSON lines to a file),
- ``fp_redis``: fileproxy, optimizer on, shared state in a redis-server the bench
  starts (loopback, a password): the 100 ms ticks and 1 s reports, no Redis call
  per request while the limit is not enforced,
- ``fp_redis_limit``: the same with ``FILEPROXY_LIMIT_ENFORCE=always`` at a limit of
  1,000,000 req/s that never refuses: one Lua script (the fleet's GCRA) per request,
- ``aiohttp``: not a proxy: an aiohttp server answering 1 KiB from memory (same
  gunicorn worker class as "before"), the ceiling of any proxy built on
  aiohttp's server in one process.

Every contender is measured with ``wrk -t1 -c32 -d5s`` (by default) in rounds,
the order reversed every other round (A B C C B A A B C ...) so drift on a
shared machine spreads over all of them; the table gives the median req/s of
the runs, the min-max, the median p50/p99 and the CPU the contender's processes
used per request (utime + stime of its process group over the run / requests).
wrk itself and the backend share the 2 cores with the contender.

    .venv/bin/python -m bench.hot_path [--runs 3] [--duration 5] [--connections 32] [--size 1k|1m]
                                       [--contenders direct,nginx,before,fp_off,fp_on]
                                       [--ref DIR] [--access-log] [--health]

``--ref DIR`` adds the contender ``ref``: fileproxy (optimizer on) run from another
source tree, e.g. ``git archive`` of an earlier commit unpacked in DIR, for an
A/B measurement of a change alternated with the same backend.

``--time-access-log`` starts every contender that logs through
``bench/access_log_timer.py``, which times fileproxy's access-log path inside the
worker, and adds its CPU per line (and its share of the contender's CPU per
request) to the table: the cost of the log without the noise of comparing two
req/s figures.

``--health`` also samples ``GET /health`` of fp_on while wrk saturates it (new
connection each, 10 ms apart) and prints p50/p99/max.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from bench.procs import free_port, group_cpu_seconds
from bench.run import clean_env, nginx_conf

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PYTHON = sys.executable
LABELS = {
    "direct": "direct (nginx static)",
    "nginx": "nginx proxy_pass",
    "before": 'seed "before"',
    "fp_off": "fileproxy, optimizer off",
    "fp_on": "fileproxy, optimizer on",
    "fp_log": "fileproxy, optimizer on, access log on",
    "fp_redis": "fileproxy, optimizer on, shared state in Redis",
    "fp_redis_limit": "fileproxy, Redis, limit enforced (a Lua call per request)",
    "ref": "fileproxy at --ref, optimizer on",
    "aiohttp": "aiohttp server alone, 1 KiB from memory",
}
DEFAULT_CONTENDERS = "direct,nginx,before,fp_off,fp_on"


async def _hello(request: web.Request) -> web.Response:
    return web.Response(body=HELLO_BODY, content_type="application/octet-stream")


HELLO_BODY = b"x" * 1024
# the files the backend serves; ``--size`` picks the one wrk asks for
SIZES = {"1k": 1024, "1m": 1024 * 1024}
SIZE_LABELS = {"1k": "1 KiB", "1m": "1 MiB"}
hello_app = web.Application()  # the "aiohttp" contender: gunicorn bench.hot_path:hello_app
hello_app.router.add_get("/{tail:.*}", _hello)


@dataclass
class Contender:
    key: str
    port: int
    popen: subprocess.Popen[bytes] | None = None
    runs: list[dict[str, float]] = field(default_factory=list)


class Bench:
    def __init__(
        self,
        root: Path,
        ref: Path | None = None,
        access_log: bool = False,
        time_access_log: bool = False,
    ) -> None:
        self.root = root
        self.ref = ref
        self.access_log = access_log  # on for every fileproxy contender, not only fp_log
        self.time_access_log = time_access_log  # see bench/access_log_timer.py
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.backend_port = free_port()
        (root / "www").mkdir()
        for name, size in SIZES.items():
            (root / "www" / f"{name}.bin").write_bytes(os.urandom(size))
        self.backend = self._spawn("backend", [self.nginx, "-c", str(self._backend_conf())])
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_url = ""

    def _start_redis(self) -> str:
        """A redis-server of the bench's own (free port, password), started once."""
        if self.redis is None:
            server = shutil.which("redis-server")
            if server is None:
                raise SystemExit("redis-server is required: apt-get install -y redis-server")
            port, password = free_port(), os.urandom(8).hex()
            argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass",
                    password, "--save", "", "--appendonly", "no",
                    "--dir", str(self.root)]  # fmt: skip
            self.redis = self._spawn("redis", argv)
            self.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
        return self.redis_url

    def _backend_conf(self) -> Path:
        body = f"    server {{ listen 127.0.0.1:{self.backend_port}; root {self.root}/www; }}"
        return nginx_conf(self.root, "backend", body, workers=1)

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            argv,
            cwd=self.ref if name == "ref" and self.ref is not None else REPO,
            env=env or clean_env({}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: CPU accounting, clean stop
        )

    def start(self, key: str) -> Contender:
        if key == "direct":
            return Contender(key, self.backend_port, self.backend)
        port = free_port()
        upstream = f"http://127.0.0.1:{self.backend_port}"
        if key == "nginx":
            body = f"""    upstream backend {{
        server 127.0.0.1:{self.backend_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}"""
            conf = nginx_conf(self.root, "nginx-proxy", body, workers=1)
            popen = self._spawn(key, [self.nginx, "-c", str(conf)])
        elif key in ("before", "aiohttp"):
            app = "bench.baseline_proxy:app" if key == "before" else "bench.hot_path:hello_app"
            argv = [
                PYTHON, "-m", "gunicorn", app,
                "-k", "aiohttp.GunicornUVLoopWebWorker", "-w", "1",
                "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--no-control-socket",
            ]  # fmt: skip
            popen = self._spawn(key, argv, clean_env({"BASELINE_UPSTREAM": upstream}))
        else:
            logged = key == "fp_log" or self.access_log
            env = clean_env(
                {
                    "FILEPROXY_BIND": f"127.0.0.1:{port}",
                    "FILEPROXY_UPSTREAM": upstream,
                    "FILEPROXY_CACHE": "off",  # the relay: nginx proxy_pass has no cache either
                    "FILEPROXY_WORKERS": "1",
                    "FILEPROXY_ACCESS_LOG": "on" if logged else "off",
                    "FILEPROXY_LOG_DIR": str(self.root / key) if logged else "",
                    "FILEPROXY_OPTIMIZER": "off" if key == "fp_off" else "on",
                    "FILEPROXY_DRAIN_DELAY": "0",
                    "FILEPROXY_GRACEFUL_TIMEOUT": "3",
                    "FILEPROXY_LOG_LEVEL": "warning",
                }
            )
            if key in ("fp_redis", "fp_redis_limit"):
                env["REDIS_URL"] = self._start_redis()
                # one fleet per contender: with one prefix the two would share (and
                # fight over) one limiter, as two deployments with different settings
                # on one Redis would
                env["FILEPROXY_REDIS_PREFIX"] = f"{key}:"
            if key == "fp_redis_limit":
                for name in ("MIN", "INITIAL", "MAX"):
                    env[f"FILEPROXY_LIMIT_{name}"] = "1000000"
                env["FILEPROXY_LIMIT_ENFORCE"] = "always"
            if key == "ref":
                assert self.ref is not None
                env["PYTHONPATH"] = str(self.ref)  # its fileproxy, not the installed one
            argv = [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
            if logged and self.time_access_log:
                timings = self.timer_dir(key)
                timings.mkdir()
                env["ACCESS_LOG_TIMER_DIR"] = str(timings)
                argv[1:3] = [str(BENCH / "access_log_timer.py")]
            popen = self._spawn(key, argv, env)
        return Contender(key, port, popen)

    def timer_dir(self, key: str) -> Path:
        return self.root / f"{key}-access-log-timer"

    def access_log_cost(self, key: str) -> tuple[int, float] | None:
        """(lines, µs per line) the timed access log of ``key`` measured, if it did."""
        directory = self.timer_dir(key)
        if not directory.is_dir():
            return None
        lines, seconds = 0, 0.0
        for path in directory.glob("*.json"):
            figures = json.loads(path.read_text())
            lines, seconds = lines + figures["lines"], seconds + figures["seconds"]
        return (lines, seconds / lines * 1e6) if lines else None

    def wait_ready(self, contender: Contender, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if contender.popen is not None and contender.popen.poll() is not None:
                log = (self.root / f"{contender.key}.log").read_text()[-3000:]
                raise RuntimeError(f"{contender.key} exited at start:\n{log}")
            try:
                if get(contender.port, "/1k.bin")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{contender.key} not ready within {timeout} s")
            time.sleep(0.2)

    def stop(self, popen: subprocess.Popen[bytes] | None) -> None:
        if popen is None or popen.poll() is not None:
            return
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, float]:
    """(status, ms) of one GET on a new connection (Connection: close)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    elapsed = (time.perf_counter() - started) * 1000
    head = b"".join(chunks)[:16]
    return (int(head.split()[1]) if head.startswith(b"HTTP/") else 0), elapsed


def wrk(port: int, connections: int, duration: int, size: str = "1k") -> dict[str, float]:
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "-s", str(REPO / "bench" / "wrk_report.lua"), f"http://127.0.0.1:{port}/{size}.bin",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    latency = data["latency_us"] or {}
    return {
        "rps": data["requests_per_s"],
        "requests": data["requests"],
        "errors": data["errors_total"],
        "p50_ms": (latency.get("p50") or 0) / 1000,
        "p99_ms": (latency.get("p99") or 0) / 1000,
    }


def health_probe(port: int, stop: threading.Event, out: list[float]) -> None:
    time.sleep(1.0)  # let wrk reach its steady state
    while not stop.is_set():
        try:
            status, ms = get(port, "/health", timeout=10)
            if status == 200:
                out.append(ms)
        except OSError:
            pass
        time.sleep(0.01)


def measure(
    bench: Bench,
    contender: Contender,
    connections: int,
    duration: int,
    health: bool,
    size: str = "1k",
) -> None:
    pgid = contender.popen.pid if contender.popen is not None else 0
    samples: list[float] = []
    stop = threading.Event()
    prober = None
    if health:
        prober = threading.Thread(target=health_probe, args=(contender.port, stop, samples))
        prober.start()
    cpu0 = group_cpu_seconds(pgid)
    result = wrk(contender.port, connections, duration, size)
    cpu1 = group_cpu_seconds(pgid)
    stop.set()
    if prober is not None:
        prober.join()
    result["cpu_us_per_req"] = (cpu1 - cpu0) / max(1.0, result["requests"]) * 1e6
    result["cpu_pct"] = (cpu1 - cpu0) / duration * 100
    mib = max(1.0, result["requests"]) * SIZES[size] / (1024 * 1024)
    result["cpu_us_per_mib"] = (cpu1 - cpu0) / mib * 1e6
    if samples:
        samples.sort()
        result["health_p50_ms"] = samples[len(samples) // 2]
        result["health_p99_ms"] = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        result["health_max_ms"] = samples[-1]
        result["health_n"] = len(samples)
    contender.runs.append(result)
    print(
        f"  {contender.key:7} {result['rps']:9.0f} req/s  p99 {result['p99_ms']:6.2f} ms  "
        f"cpu {result['cpu_us_per_req']:6.1f} us/req  errors {result['errors']:.0f}",
        file=sys.stderr,
        flush=True,
    )


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def table(contenders: list[Contender], args: argparse.Namespace) -> str:
    import aiohttp

    med = {c.key: statistics.median(r["rps"] for r in c.runs) for c in contenders}
    lines = [
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; commit {git_commit()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}",
        f"- `wrk -t1 -c{args.connections} -d{args.duration}s` on 127.0.0.1, "
        f"{SIZE_LABELS[args.size]} static file "
        f"from nginx (1 worker); one worker per contender; {args.runs} runs each, alternating",
        "",
        "| contender | req/s (median) | min-max | p50 ms | p99 ms | CPU us/req | CPU us/MiB "
        "| CPU % | vs before | vs nginx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in contenders:
        runs = c.runs
        rps = [r["rps"] for r in runs]
        vs_before = f"{med[c.key] / med['before']:.2f}x" if "before" in med else "-"
        vs_nginx = f"{med[c.key] / med['nginx']:.2f}x" if "nginx" in med else "-"
        lines.append(
            f"| {LABELS[c.key]} | {med[c.key]:,.0f} | {min(rps):,.0f}-{max(rps):,.0f} "
            f"| {statistics.median(r['p50_ms'] for r in runs):.2f} "
            f"| {statistics.median(r['p99_ms'] for r in runs):.2f} "
            f"| {statistics.median(r['cpu_us_per_req'] for r in runs):.0f} "
            f"| {statistics.median(r['cpu_us_per_mib'] for r in runs):,.0f} "
            f"| {statistics.median(r['cpu_pct'] for r in runs):.0f} "
            f"| {vs_before} | {vs_nginx} |"
        )
    health = [r for c in contenders for r in c.runs if "health_p99_ms" in r]
    if health:
        lines.append("")
        for c in contenders:
            for r in c.runs:
                if "health_p99_ms" in r:
                    lines.append(
                        f"- /health of {c.key} under load: {r['health_n']:.0f} samples, "
                        f"p50 {r['health_p50_ms']:.2f} ms, p99 {r['health_p99_ms']:.2f} ms, "
                        f"max {r['health_max_ms']:.2f} ms"
                    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS)
    parser.add_argument("--ref", type=Path, help="source tree of fileproxy for contender ref")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="access log on (stdout and FILEPROXY_LOG_DIR) for every fileproxy contender",
    )
    parser.add_argument(
        "--time-access-log",
        action="store_true",
        help="time the access log inside each logging contender (bench/access_log_timer.py)",
    )
    parser.add_argument("--health", action="store_true", help="probe /health of fp_on under load")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="1k", help="the static file wrk asks for"
    )
    args = parser.parse_args()
    keys = [k for k in args.contenders.split(",") if k]
    if args.ref is not None and "ref" not in keys:
        keys.append("ref")
    if "ref" in keys and args.ref is None:
        parser.error("contender ref needs --ref DIR")
    unknown = set(keys) - set(LABELS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    for program in ("wrk", "nginx"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            sys.exit(f"missing {program}: apt-get install -y {program}")
    with tempfile.TemporaryDirectory(prefix="fileproxy-hot-path-") as tmp:
        bench = Bench(
            Path(tmp),
            args.ref.resolve() if args.ref else None,
            args.access_log,
            args.time_access_log,
        )
        contenders: list[Contender] = []
        try:
            time.sleep(0.3)
            for key in keys:
                contenders.append(bench.start(key))
            for contender in contenders:
                bench.wait_ready(contender)
            for contender in contenders:  # warm up: pools, caches, the JIT-less interpreter
                wrk(contender.port, args.connections, 1, args.size)
            for round_ in range(args.runs):
                order = contenders if round_ % 2 == 0 else contenders[::-1]
                print(f"round {round_ + 1}/{args.runs}", file=sys.stderr, flush=True)
                for contender in order:
                    probe = args.health and contender.key == "fp_on"
                    measure(bench, contender, args.connections, args.duration, probe, args.size)
        finally:
            for contender in contenders:
                if contender.key != "direct":
                    bench.stop(contender.popen)
            bench.stop(bench.backend)
            bench.stop(bench.redis)
        costs = {c.key: bench.access_log_cost(c.key) for c in contenders}
    print(table(contenders, args))
    for contender in contenders:
        cost = costs[contender.key]
        if cost is not None:
            lines, per_line = cost
            cpu = statistics.median(r["cpu_us_per_req"] for r in contender.runs)
            print(
                f"- access log of {contender.key}, timed in its worker: {per_line:.2f} µs per "
                f"line over {lines:,} lines, {per_line / cpu * 100:.1f}% of its {cpu:.0f} µs "
                "of CPU per request"
            )


if __name__ == "__main__":
    main()
