"""The cache side by side with nginx ``proxy_cache``: one worker each, in front of one backend.

No root needed for the first three workloads: every process listens on an ephemeral
127.0.0.1 port. The backend is ``tests/cache_backend.py`` in a process of its own (aiohttp;
ETag, Range with If-Range, ``Cache-Control: max-age=3600`` on every object), which paces
its large objects at ``--rate`` MB/s per request and counts the body bytes it sends (asked
over a pipe, so the counts are live). Contenders, each started fresh with an empty cache
for the herd and the cold Range:

- ``nginx``: nginx (1 worker) ``proxy_pass`` with ``proxy_cache`` (``proxy_cache_lock on``,
  its default 5 s lock timeout and age, ``proxy_cache_valid 200 10m``, cache on disk,
  upstream keepalive, ``sendfile on``);
- ``nginx_slice``: the same with the slice module (``slice 4m``, the slice in the cache
  key): nginx's own answer to a Range far into a cold object (cold Range only);
- ``fileproxy``: ``gunicorn -c gunicorn.conf.py``, ``FILEPROXY_WORKERS=1``, access log
  off, ``FILEPROXY_CACHE=on``, the cache directory on disk (the temp dir's filesystem).

Workloads (``--workloads``):

- ``herd``: ``--herd`` clients ask at once for one cold ``--herd-mib`` MiB object: backend
  bytes (x the object) and requests, first body byte p50/p99/max over the clients (from
  before connect), when the last one finished, every body checked by SHA-256; then 5 more
  GETs, which should reach no backend;
- ``range``: ``Range`` of 1 MiB ending 1 MiB before the end of a cold ``--range-mib`` MiB
  object: time to the whole 206, bytes checked, backend bytes when it was done and once
  the backend has been quiet for 2 s (what a fill that goes on after the client cost);
- ``poor`` (root): the backend behind a ``bench.netem`` link (``--link-scenario``,
  default poor: 10 Mbit/s, 100-200 ms RTT, 1.5% loss each way), the proxies and the
  clients on the near side; per contender, fresh (``nginx``, ``fileproxy`` and ``fp_off``,
  fileproxy with the cache off: today's relay): ``--link-clients`` cold downloads of one
  ``--link-mib`` MiB object at once, then ``--link-repeats`` one after the other with
  curl: backend requests and body bytes (its access log), bytes over the link
  (iptables), statuses, SHA-256, first byte and completion;
- ``hits``: a stored 1 KiB and a stored 1 MiB object, ``wrk -t1 -c16 -d5s`` per run,
  ``--runs`` rounds alternating (A B, B A, ...): median req/s, MiB/s, p99 and the CPU
  the contender's process group used per request; the backend must send nothing meanwhile;
  ``--profile`` records the fileproxy worker with py-spy during one more run per size and
  prints where its time goes (``.venv/bin/pip install py-spy``).

    .venv/bin/python -m bench.cache [--workloads herd,range,hits,poor]
        [--contenders nginx,fileproxy] [--range-contenders nginx,nginx_slice,fileproxy]
        [--rate 16] [--herd 40] [--herd-mib 64] [--range-mib 256] [--runs 5] [--duration 5]
        [--connections 16] [--repeat 1] [--profile] [--ref DIR] [--out FILE.md]
        [--link-scenario poor] [--link-mib 8] [--link-clients 4] [--link-repeats 3]

``--ref DIR`` adds the contender ``ref``: fileproxy run from another source tree (e.g.
``git archive COMMIT | tar -x -C DIR``, or a patched copy) for an A/B of a change.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cache_service import BackendProcess
from bench.hot_path import cpu_model, git_commit
from bench.procs import free_port, group_cpu_seconds, group_pids, wait_port
from bench.run import clean_env, nginx_conf

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FRESH = {"Cache-Control": "max-age=3600"}
HIT_PATHS = {"1k": "/1k.bin", "1m": "/1m.bin"}
HIT_SIZES = {"1k": 1024, "1m": MIB}
LABELS = {
    "nginx": "nginx proxy_cache",
    "nginx_slice": "nginx proxy_cache + slice 4m",
    "fileproxy": "fileproxy cache",
    "ref": "fileproxy cache at --ref",
    "fp_off": "fileproxy, cache off (relay)",
}


def objects(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    rate = args.rate * 1e6
    return {
        "/herd.bin": {"seed": 1, "length": args.herd_mib * MIB, "rate": rate, "headers": FRESH},
        "/far.bin": {"seed": 2, "length": args.range_mib * MIB, "rate": rate, "headers": FRESH},
        "/1k.bin": {"seed": 3, "length": 1024, "headers": FRESH},
        "/1m.bin": {"seed": 4, "length": MIB, "headers": FRESH},
    }


# -- the contenders ---------------------------------------------------------------------


@dataclass
class Contender:
    key: str
    port: int
    popen: subprocess.Popen[bytes]
    cache_dir: Path
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    process: Any = None  # bench.netem.Process when started in a namespace


class Lab:
    def __init__(self, root: Path, backend_port: int, ref: Path | None = None) -> None:
        self.root = root
        self.ref = ref  # the source tree of contender "ref"
        self.backend_port = backend_port
        self.upstream_host = "127.0.0.1"
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.started = 0

    def _command(self, key: str) -> tuple[str, int, Path, list[str], dict[str, str]]:
        """(name, port, cache dir, argv, environment) of a fresh contender."""
        self.started += 1
        name = f"{key}-{self.started}"
        port = free_port()
        cache_dir = self.root / f"{name}-cache"
        cache_dir.mkdir()
        if key.startswith("nginx"):
            argv = [self.nginx, "-c", str(self._nginx_conf(name, port, cache_dir, key))]
            return name, port, cache_dir, argv, clean_env({})
        argv = [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
        env = clean_env(
            {
                "FILEPROXY_BIND": f"127.0.0.1:{port}",
                "FILEPROXY_UPSTREAM": f"http://{self.upstream_host}:{self.backend_port}",
                "FILEPROXY_WORKERS": "1",
                "FILEPROXY_ACCESS_LOG": "off",
                "FILEPROXY_CACHE": "off" if key == "fp_off" else "on",
                "FILEPROXY_CACHE_DIR": str(cache_dir),
                "FILEPROXY_DRAIN_DELAY": "0",
                "FILEPROXY_GRACEFUL_TIMEOUT": "3",
                "FILEPROXY_LOG_LEVEL": "warning",
            }
        )
        if key == "ref":
            assert self.ref is not None
            env["PYTHONPATH"] = str(self.ref)  # its fileproxy, not the installed one
        return name, port, cache_dir, argv, env

    def start(self, key: str) -> Contender:
        name, port, cache_dir, argv, env = self._command(key)
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        popen = subprocess.Popen(
            argv,
            cwd=self.ref if key == "ref" else ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        contender = Contender(key, port, popen, cache_dir)
        self._wait_ready(contender, name)
        return contender

    def start_in(self, bed: Any, key: str) -> Contender:
        """A fresh contender in the client namespace of ``bed`` (bench.netem.Testbed)."""
        name, port, cache_dir, argv, env = self._command(key)
        process = bed.spawn(bed.client_ns, name, argv, env=env)
        contender = Contender(key, port, process.popen, cache_dir, process=process)
        path = "/not-there" if key.startswith("nginx") else "/health"
        deadline = time.monotonic() + 30
        while True:
            url = f"http://127.0.0.1:{port}{path}"
            argv = ["curl", "-s", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}", url]
            code = bed.sh(bed.client_ns, *argv, check=False)
            if code.strip() in ("200", "404"):
                return contender
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start: {process.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def _nginx_conf(self, name: str, port: int, cache_dir: Path, key: str) -> Path:
        slice_lines = ""
        cache_key = "$scheme$proxy_host$request_uri"
        if key == "nginx_slice":
            slice_lines = "slice 4m;\n            proxy_set_header Range $slice_range;\n"
            cache_key += "$slice_range"
        zone = name.replace("-", "_")
        body = f"""    proxy_cache_path {cache_dir} levels=1:2 keys_zone={zone}:16m
                     max_size=8g inactive=60m use_temp_path=off;
    upstream backend {{
        server {self.upstream_host}:{self.backend_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {slice_lines}proxy_cache {zone};
            proxy_cache_key {cache_key};
            proxy_cache_lock on;
            proxy_cache_valid 200 206 10m;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}"""
        return nginx_conf(self.root, name, body, workers=1)

    def _wait_ready(self, contender: Contender, name: str, timeout: float = 30) -> None:
        wait_port(contender.port, timeout)
        path = "/not-there" if contender.key.startswith("nginx") else "/health"
        deadline = time.monotonic() + timeout
        while True:
            if contender.popen.poll() is not None:
                log = (self.root / f"{name}.log").read_text()[-3000:]
                raise SystemExit(f"{name} exited at start:\n{log}")
            got = asyncio.run(fetch(contender.port, path, keep=False, deadline_s=5))
            if got.status in (200, 404):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not ready within {timeout} s: {got}")
            time.sleep(0.2)

    @staticmethod
    def stop(contender: Contender) -> None:
        if contender.popen.poll() is None:
            os.killpg(contender.popen.pid, signal.SIGTERM)
            try:
                contender.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(contender.popen.pid, signal.SIGKILL)
                contender.popen.wait()
        shutil.rmtree(contender.cache_dir, ignore_errors=True)


# -- a client that times the first body byte and hashes the body ---------------------------


@dataclass
class Got:
    status: int = 0
    head_s: float | None = None  # from before connect to the end of the response head
    first_s: float | None = None  # ... to the first body byte
    done_s: float | None = None  # ... to the last body byte
    length: int | None = None
    received: int = 0
    sha256: str = ""
    body: bytes = b""
    cache: str = ""  # Cache-Status (fileproxy) or X-Cache-Status (nginx)
    error: str | None = None


async def fetch(
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    keep: bool = False,
    deadline_s: float = 120,
) -> Got:
    """GET ``path`` on a new connection (``Connection: close``), the body read as it comes."""
    got = Got()
    began = time.monotonic()
    digest = hashlib.sha256()
    kept: list[bytes] = []
    writer = None
    try:
        async with asyncio.timeout(deadline_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            got.head_s = time.monotonic() - began
            lines = head.decode("latin-1").split("\r\n")
            got.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    got.length = int(value)
                elif name in ("cache-status", "x-cache-status"):
                    got.cache = value.strip()
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                if got.first_s is None:
                    got.first_s = time.monotonic() - began
                got.received += len(data)
                digest.update(data)
                if keep:
                    kept.append(data)
            got.done_s = time.monotonic() - began
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        got.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    got.sha256 = digest.hexdigest()
    got.body = b"".join(kept)
    if got.error is None and got.length is not None and got.received != got.length:
        got.error = f"short body: {got.received} of {got.length}"
    return got


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def quiet_sent(backend: BackendProcess, path: str, quiet_s: float, limit_s: float) -> int:
    """The backend's body bytes for ``path`` once they stopped growing for ``quiet_s``."""
    deadline = time.monotonic() + limit_s
    last, since = backend.sent().get(path, 0), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = backend.sent().get(path, 0)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


# -- the workloads ----------------------------------------------------------------------------


def herd(lab: Lab, backend: BackendProcess, key: str, args: argparse.Namespace) -> dict[str, Any]:
    from tests.cache_backend import object_bytes

    size = args.herd_mib * MIB
    expected = hashlib.sha256(object_bytes(1, size)).hexdigest()
    contender = lab.start(key)
    try:
        before = backend.sent().get("/herd.bin", 0)

        async def all_at_once() -> list[Got]:
            return await asyncio.gather(
                *(fetch(contender.port, "/herd.bin", deadline_s=300) for _ in range(args.herd))
            )

        gots = asyncio.run(all_at_once())
        at_done = backend.sent().get("/herd.bin", 0) - before
        sent = quiet_sent(backend, "/herd.bin", 2.0, 60) - before

        async def later() -> list[Got]:
            return [await fetch(contender.port, "/herd.bin", deadline_s=60) for _ in range(5)]

        again = asyncio.run(later())
        after = backend.sent().get("/herd.bin", 0) - before - sent
    finally:
        lab.stop(contender)
    good = [g for g in gots if g.error is None and g.status == 200 and g.sha256 == expected]
    firsts = [g.first_s for g in gots if g.first_s is not None]
    dones = [g.done_s for g in gots if g.done_s is not None]
    return {
        "clients": args.herd,
        "byte_exact": len(good),
        "errors": sorted({g.error or f"status {g.status}" for g in gots if g not in good}),
        "backend_x_at_done": round(at_done / size, 3),
        "backend_x": round(sent / size, 3),
        "first_byte_p50_s": round(pct(firsts, 0.5), 3) if firsts else None,
        "first_byte_p99_s": round(pct(firsts, 0.99), 3) if firsts else None,
        "first_byte_max_s": round(max(firsts), 3) if firsts else None,
        "last_done_s": round(max(dones), 2) if dones else None,
        "object_at_rate_s": round(size / (args.rate * 1e6), 2),
        "again_ok": sum(1 for g in again if g.error is None and g.sha256 == expected),
        "again_backend_bytes": after,
        "again_cache": sorted({g.cache for g in again}),
    }


def cold_range(
    lab: Lab, backend: BackendProcess, key: str, args: argparse.Namespace
) -> dict[str, Any]:
    from tests.cache_backend import object_bytes

    size = args.range_mib * MIB
    first, last = size - 2 * MIB, size - MIB - 1
    expected = object_bytes(2, size)[first : last + 1]
    contender = lab.start(key)
    try:
        before = backend.sent().get("/far.bin", 0)
        got = asyncio.run(
            fetch(contender.port, "/far.bin", [("Range", f"bytes={first}-{last}")], keep=True)
        )
        at_done = backend.sent().get("/far.bin", 0) - before
        sent = quiet_sent(backend, "/far.bin", 2.0, size / (args.rate * 1e6) + 30) - before
    finally:
        lab.stop(contender)
    return {
        "object_mib": args.range_mib,
        "range": f"bytes={first}-{last}",
        "status": got.status,
        "exact": got.error is None and got.body == expected,
        "error": got.error,
        "first_byte_s": round(got.first_s, 3) if got.first_s is not None else None,
        "done_s": round(got.done_s, 3) if got.done_s is not None else None,
        "backend_mib_at_done": round(at_done / MIB, 1),
        "backend_mib": round(sent / MIB, 1),
        "object_at_rate_s": round(size / (args.rate * 1e6), 2),
    }


def wrk(port: int, path: str, connections: int, duration: float) -> dict[str, float]:
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
        "-s", str(ROOT / "bench" / "wrk_report.lua"), f"http://127.0.0.1:{port}{path}",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    latency = data["latency_us"] or {}
    return {
        "rps": data["requests_per_s"],
        "requests": data["requests"],
        "bytes_per_s": data["bytes_per_s"],
        "errors": data["errors_total"],
        "p50_ms": (latency.get("p50") or 0) / 1000,
        "p99_ms": (latency.get("p99") or 0) / 1000,
    }


def hit_run(contender: Contender, size: str, args: argparse.Namespace) -> None:
    pgid = contender.popen.pid
    cpu0 = group_cpu_seconds(pgid)
    result = wrk(contender.port, HIT_PATHS[size], args.connections, args.duration)
    cpu1 = group_cpu_seconds(pgid)
    result["cpu_us_per_req"] = (cpu1 - cpu0) / max(1.0, result["requests"]) * 1e6
    result["cpu_pct"] = (cpu1 - cpu0) / args.duration * 100
    result["mib_per_s"] = result["rps"] * HIT_SIZES[size] / MIB
    contender.runs.setdefault(size, []).append(result)
    print(
        f"  {size} {contender.key:9} {result['rps']:9.0f} req/s {result['mib_per_s']:8.1f} MiB/s"
        f"  p99 {result['p99_ms']:6.2f} ms  cpu {result['cpu_us_per_req']:7.1f} us/req"
        f"  errors {result['errors']:.0f}",
        file=sys.stderr,
        flush=True,
    )


def hits(
    lab: Lab, backend: BackendProcess, keys: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    contenders = [lab.start(key) for key in keys]
    profile: str | None = None
    try:
        warm: dict[str, list[str]] = {}
        for contender in contenders:
            for path in HIT_PATHS.values():
                gots = [asyncio.run(fetch(contender.port, path)) for _ in range(3)]
                warm[f"{contender.key} {path}"] = [g.cache for g in gots]
        before = dict(backend.sent())
        for size in args.sizes:
            for contender in contenders:  # warm-up: connections, page cache
                wrk(contender.port, HIT_PATHS[size], args.connections, 1)
            for round_ in range(args.runs):
                order = contenders if round_ % 2 == 0 else contenders[::-1]
                print(f"hits {size} round {round_ + 1}/{args.runs}", file=sys.stderr, flush=True)
                for contender in order:
                    hit_run(contender, size, args)
        after = dict(backend.sent())
        if args.profile:
            profile = "\n\n".join(
                f"{LABELS[c.key]}: {py_spy(c, size, args)}"
                for c in contenders
                if not c.key.startswith("nginx")
                for size in args.sizes
            )
    finally:
        for contender in contenders:
            lab.stop(contender)
    out: dict[str, Any] = {
        "warm_cache_status": warm,
        "backend_bytes_during": {p: after.get(p, 0) - before.get(p, 0) for p in HIT_PATHS.values()},
        "runs": {c.key: c.runs for c in contenders},
    }
    if profile is not None:
        out["profile"] = profile
    return out


def py_spy(contender: Contender, size: str, args: argparse.Namespace) -> str:
    """Where the fileproxy worker's time goes during a hit run (py-spy, own frames)."""
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(spy).exists():
        return "py-spy not installed (.venv/bin/pip install py-spy)"
    workers = [p for p in group_pids(contender.popen.pid) if p != contender.popen.pid]
    raw = Path(tempfile.mkstemp(suffix=".txt")[1])
    seconds = max(3, int(args.duration))
    argv = [spy, "record", "--pid", str(workers[0]), "--duration", str(seconds), "--rate", "250",
            "--format", "raw", "--nonblocking", "--output", str(raw)]  # fmt: skip
    spy_run = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    wrk(contender.port, HIT_PATHS[size], args.connections, seconds)
    spy_run.wait(60)
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        # the first frame of fileproxy's own code from the leaf up: which of our parts
        for frame in reversed(frames):
            if "fileproxy/" in frame:
                name = "in fileproxy: " + frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1]
                own[name] = own.get(name, 0) + int(count)
                break
    raw.unlink()
    if not total:
        return "py-spy recorded nothing (ptrace not allowed?)"
    lines = [f"py-spy, {total} samples of the worker during a {size} hit run:", "", "self time:"]
    leaves = sorted(((n, c) for n, c in own.items() if not n.startswith("in fileproxy")),
                    key=lambda x: -x[1])  # fmt: skip
    lines += [f"- {c / total * 100:5.1f}% {n}" for n, c in leaves[:15]]
    lines += ["", "innermost fileproxy frame of each sample:"]
    parts = sorted(((n, c) for n, c in own.items() if n.startswith("in fileproxy")),
                   key=lambda x: -x[1])  # fmt: skip
    lines += [
        f"- {c / total * 100:5.1f}% {n.removeprefix('in fileproxy: ')}" for n, c in parts[:15]
    ]
    return "\n".join(lines)


# -- the poor link: the backend on the far side of an impaired link ----------------------------


def poor_link_ready(scenario: str) -> str | None:
    """Why the poor-link workload cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the poor-link workload builds network namespaces: run it as root"
    for program in ("ip", "tc", "iptables", "curl", "ethtool"):
        if shutil.which(program) is None:
            return f"missing {program}: apt-get install -y iproute2 iptables curl ethtool"
    from bench.netem import netem_available

    if scenario != "clean" and not netem_available():
        try:
            import netfilterqueue  # noqa: F401  - the delayer's, on kernels without netem
        except ImportError:
            return (
                "this kernel has no netem; the delayer needs netfilterqueue: apt-get install -y "
                "libnetfilter-queue-dev gcc python3-dev && .venv/bin/pip install -e '.[bench]'"
            )
    return None


def poor_link(keys: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Per contender, fresh: ``--link-clients`` cold downloads at once, then ``--link-repeats``
    one after the other, of one ``--link-mib`` MiB object from an nginx static backend behind
    the impaired link (client namespace: clients and proxies; server namespace: the
    backend): the backend's body bytes (its access log) and the link's bytes toward the
    proxy (iptables), each download's status, SHA-256, first byte and completion."""
    from bench.netem import SCENARIOS, SERVER_IP, Testbed, write_file

    scenario = SCENARIOS[args.link_scenario]
    bed = Testbed()
    out: dict[str, Any] = {"scenario": scenario.describe(), "contenders": {}}
    try:
        bed.setup()
        out["method"] = bed.method
        www = bed.workdir / "www"
        www.mkdir()
        size = args.link_mib * MIB
        write_file(www / "obj.bin", size)
        want = hashlib.sha256((www / "obj.bin").read_bytes()).hexdigest()
        access = bed.workdir / "backend-access.log"
        backend_body = f"""    log_format bytes '$request_uri $status $body_bytes_sent';
    access_log {access} bytes;
    server {{
        listen {SERVER_IP}:8080;
        root {www};
        add_header Cache-Control "max-age=3600";
    }}"""
        conf = nginx_conf(bed.workdir, "backend", backend_body, 1)
        conf.write_text(conf.read_text().replace("    access_log off;\n", "", 1))  # ours instead
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        bed.spawn(bed.server_ns, "backend", [nginx, "-c", str(conf)])
        time.sleep(0.5)
        bed.apply(scenario)
        lab = Lab(bed.workdir, 8080)
        lab.upstream_host = SERVER_IP
        for key in keys:
            print(f"poor link: {key}", file=sys.stderr, flush=True)
            out["contenders"][key] = link_runs(bed, lab, key, size, want, access, args)
        out["counters"] = bed.counters()
        bed.clear()
    finally:
        bed.teardown()
    return out


def link_bytes(bed: Any) -> int:
    """Bytes that arrived in the client namespace from the link (iptables' counting rule)."""
    text = bed.sh(bed.client_ns, "iptables", "-w", "-L", "INPUT", "-n", "-v", "-x")
    for line in text.splitlines():
        if "fpb-count" in line:
            return int(line.split()[1])
    return 0


def backend_bytes(access: Path) -> tuple[int, int]:
    """(requests, body bytes) the backend logged so far."""
    if not access.exists():
        return 0, 0
    lines = [x.split() for x in access.read_text().splitlines() if x.startswith("/obj.bin")]
    return len(lines), sum(int(x[2]) for x in lines)


def link_runs(
    bed: Any, lab: Lab, key: str, size: int, want: str, access: Path, args: argparse.Namespace
) -> dict[str, Any]:
    contender = lab.start_in(bed, key)
    url = f"http://127.0.0.1:{contender.port}/obj.bin"
    deadline = args.link_deadline
    fmt = "%{http_code} %{time_starttransfer} %{time_total} %{size_download} %{exitcode}"
    rounds: list[dict[str, Any]] = []
    try:
        plan = [("cold, at once", args.link_clients)] + [
            (f"repeat {n}", 1) for n in range(1, args.link_repeats + 1)
        ]
        for label, clients in plan:
            requests0, body0 = backend_bytes(access)
            link0 = link_bytes(bed)
            files = [bed.workdir / f"{key}-{len(rounds)}-{i}.bin" for i in range(clients)]
            script = " ".join(
                f"curl -s -m {deadline} -o {f} -w '{fmt}\\n' {url} > {f}.w &" for f in files
            )
            began = time.monotonic()
            bed.sh(bed.client_ns, "sh", "-c", script + " wait", check=False, timeout=deadline + 30)
            elapsed = time.monotonic() - began
            downloads = []
            for f in files:
                fields = Path(f"{f}.w").read_text().split() if Path(f"{f}.w").exists() else []
                digest = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else ""
                downloads.append(
                    {
                        "status": fields[0] if fields else None,
                        "first_byte_s": float(fields[1]) if len(fields) > 1 else None,
                        "total_s": float(fields[2]) if len(fields) > 2 else None,
                        "bytes": int(fields[3]) if len(fields) > 3 else 0,
                        "exact": digest == want,
                    }
                )
                f.unlink(missing_ok=True)
                Path(f"{f}.w").unlink(missing_ok=True)
            time.sleep(1.0)  # the backend logs a request when it ends
            requests1, body1 = backend_bytes(access)
            rounds.append(
                {
                    "label": label,
                    "clients": clients,
                    "exact": sum(d["exact"] for d in downloads),
                    "statuses": sorted({str(d["status"]) for d in downloads}),
                    "first_byte_max_s": max((d["first_byte_s"] or 0) for d in downloads),
                    "done_max_s": max((d["total_s"] or 0) for d in downloads),
                    "wall_s": round(elapsed, 2),
                    "backend_requests": requests1 - requests0,
                    "backend_mib": round((body1 - body0) / MIB, 2),
                    "link_mib": round((link_bytes(bed) - link0) / MIB, 2),
                }
            )
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    finally:
        bed.stop(contender.process)
        shutil.rmtree(contender.cache_dir, ignore_errors=True)
    return {"rounds": rounds}


# -- the report -------------------------------------------------------------------------------


def report(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    import aiohttp

    lines = [
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; commit {git_commit()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"{nginx_version()}; load average at the start {results['load_start']}, "
        f"at the end {os.getloadavg()[0]:.2f}",
    ]
    if any(w in results for w in ("herd", "range", "hits")):
        lines.append(
            "- backend: tests/cache_backend.py (aiohttp), `Cache-Control: max-age=3600`, ETag; "
            f"large objects paced at {args.rate:g} MB/s per request"
        )
    herds = results.get("herd")
    if herds:
        lines += [
            "",
            f"### The herd: {args.herd} clients of one cold {args.herd_mib} MiB object "
            f"({herds[0]['result']['object_at_rate_s']} s at the backend's pace)",
            "",
            "| contender | run | byte-exact | backend x object (at the end / settled) "
            "| first byte p50 s | p99 s | max s | last done s | 5 GETs after: backend bytes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in herds:
            r = row["result"]
            lines.append(
                f"| {LABELS[row['key']]} | {row['run']} | {r['byte_exact']}/{r['clients']} "
                f"| {r['backend_x_at_done']:.2f} / {r['backend_x']:.2f} "
                f"| {r['first_byte_p50_s']} | {r['first_byte_p99_s']} | {r['first_byte_max_s']} "
                f"| {r['last_done_s']} | {r['again_backend_bytes']:,} ({r['again_ok']}/5 exact) |"
            )
    ranges = results.get("range")
    if ranges:
        r0 = ranges[0]["result"]
        lines += [
            "",
            f"### The cold far Range: `{r0['range']}` of a cold {args.range_mib} MiB object "
            f"({r0['object_at_rate_s']} s at the backend's pace)",
            "",
            "| contender | run | status | exact | first byte s | done s "
            "| backend MiB at done | backend MiB settled |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for row in ranges:
            r = row["result"]
            lines.append(
                f"| {LABELS[row['key']]} | {row['run']} | {r['status']} "
                f"| {'yes' if r['exact'] else 'NO ' + str(r['error'])} | {r['first_byte_s']} "
                f"| {r['done_s']} | {r['backend_mib_at_done']} | {r['backend_mib']} |"
            )
    hit = results.get("hits")
    if hit:
        runs = hit["runs"]
        lines += [
            "",
            f"### Hits: `wrk -t1 -c{args.connections} -d{args.duration:g}s`, one worker each, "
            f"{args.runs} runs alternating, medians (min-max)",
            "",
            "| object | contender | req/s | MiB/s | p99 ms | CPU µs/req | CPU % | errors "
            "| vs nginx (req/s) | vs nginx (CPU/req) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for size in args.sizes:
            med = {k: statistics.median(r["rps"] for r in v[size]) for k, v in runs.items()}
            cpu = {
                k: statistics.median(r["cpu_us_per_req"] for r in v[size]) for k, v in runs.items()
            }
            for key, by_size in runs.items():
                rs = by_size[size]
                rps = [r["rps"] for r in rs]
                mibs = [r["mib_per_s"] for r in rs]
                ratio = f"{med[key] / med['nginx']:.2f}x" if "nginx" in med else "-"
                cpu_ratio = f"{cpu[key] / cpu['nginx']:.2f}x" if "nginx" in cpu else "-"
                lines.append(
                    f"| {size.upper()[:-1]} {'KiB' if size == '1k' else 'MiB'} | {LABELS[key]} "
                    f"| {med[key]:,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
                    f"| {statistics.median(mibs):,.1f} ({min(mibs):,.1f}-{max(mibs):,.1f}) "
                    f"| {statistics.median(r['p99_ms'] for r in rs):.2f} "
                    f"| {cpu[key]:.1f} "
                    f"| {statistics.median(r['cpu_pct'] for r in rs):.0f} "
                    f"| {sum(r['errors'] for r in rs):.0f} | {ratio} | {cpu_ratio} |"
                )
        lines += [
            "",
            f"- backend body bytes during the hit runs: {hit['backend_bytes_during']}",
            f"- cache status of 3 GETs each before the runs: {hit['warm_cache_status']}",
        ]
        if "profile" in hit:
            lines += ["", hit["profile"]]
    poor = results.get("poor")
    if poor:
        lines += [
            "",
            f"### The poor link: the backend behind {args.link_scenario} "
            f"({poor['scenario']}; {poor['method']}), one {args.link_mib} MiB object",
            "",
            "Clients and proxies in one namespace, the backend (nginx static, "
            "`Cache-Control: max-age=3600`) in the other; per contender, fresh: "
            f"{args.link_clients} cold downloads at once, then {args.link_repeats} one "
            "after the other (curl).",
            "",
            "| contender | downloads | byte-exact | statuses | first byte max s | done max s "
            "| backend requests | backend MiB | link MiB |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for key, data in poor["contenders"].items():
            for r in data["rounds"]:
                lines.append(
                    f"| {LABELS[key]} | {r['label']} ({r['clients']}) "
                    f"| {r['exact']}/{r['clients']} | {' '.join(r['statuses'])} "
                    f"| {r['first_byte_max_s']:.2f} | {r['done_max_s']:.2f} "
                    f"| {r['backend_requests']} | {r['backend_mib']} | {r['link_mib']} |"
                )
        lines += ["", f"- link counters at the end: {poor.get('counters')}"]
    return "\n".join(lines)


def nginx_version() -> str:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
    return out.removeprefix("nginx version: ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workloads", default="herd,range,hits,poor")
    parser.add_argument("--contenders", default="nginx,fileproxy")
    parser.add_argument("--range-contenders", default="nginx,nginx_slice,fileproxy")
    parser.add_argument("--rate", type=float, default=16.0, help="backend pace, MB/s")
    parser.add_argument("--herd", type=int, default=40)
    parser.add_argument("--herd-mib", type=int, default=64)
    parser.add_argument("--range-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="runs of herd and range each")
    parser.add_argument("--runs", type=int, default=5, help="rounds of hits")
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sizes", default="1k,1m")
    parser.add_argument("--profile", action="store_true", help="py-spy the 1 KiB hits")
    parser.add_argument("--link-contenders", default="nginx,fileproxy,fp_off")
    parser.add_argument("--link-scenario", default="poor", help="a scenario of bench.netem")
    parser.add_argument("--link-mib", type=int, default=8)
    parser.add_argument("--link-clients", type=int, default=4)
    parser.add_argument("--link-repeats", type=int, default=3)
    parser.add_argument("--link-deadline", type=int, default=300, help="seconds per download")
    parser.add_argument("--ref", type=Path, help="source tree of fileproxy for contender ref")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.sizes = [s for s in args.sizes.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    keys = [k for k in args.contenders.split(",") if k]
    range_keys = [k for k in args.range_contenders.split(",") if k]
    link_keys = [k for k in args.link_contenders.split(",") if k]
    if "poor" in workloads:
        why = poor_link_ready(args.link_scenario)
        if why is not None:
            sys.exit(why)
    if args.ref is not None and "ref" not in keys:
        keys.append("ref")
    if "ref" in keys and args.ref is None:
        parser.error("contender ref needs --ref DIR")
    for program in ("wrk", "nginx"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            sys.exit(f"missing {program}: apt-get install -y {program}")
    command = "python -m bench.cache " + " ".join(sys.argv[1:])
    results: dict[str, Any] = {"load_start": f"{os.getloadavg()[0]:.2f}"}
    with tempfile.TemporaryDirectory(prefix="fileproxy-cache-bench-", dir="/var/tmp") as tmp:
        backend = BackendProcess(objects(args))
        lab = Lab(Path(tmp), backend.port, args.ref.resolve() if args.ref else None)
        try:
            for run in range(1, args.repeat + 1):
                order = keys if run % 2 else keys[::-1]
                if "herd" in workloads:
                    for key in order:
                        print(f"herd run {run}: {key}", file=sys.stderr, flush=True)
                        row = {"key": key, "run": run, "result": herd(lab, backend, key, args)}
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        results.setdefault("herd", []).append(row)
                if "range" in workloads:
                    for key in range_keys if run % 2 else range_keys[::-1]:
                        print(f"range run {run}: {key}", file=sys.stderr, flush=True)
                        row = {
                            "key": key,
                            "run": run,
                            "result": cold_range(lab, backend, key, args),
                        }
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        results.setdefault("range", []).append(row)
            if "hits" in workloads:
                results["hits"] = hits(lab, backend, keys, args)
            if "poor" in workloads:
                results["poor"] = poor_link(link_keys, args)
        finally:
            backend.stop()
    text = report(results, args, command)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
