"""The seed's three network scenarios, measured with wrk, side by side.

    sudo .venv/bin/python -m bench.run                 # about 30 minutes
    sudo BENCH_FULL=1 .venv/bin/python -m bench.run    # 3x longer runs, 64 MiB files, soaks
    .venv/bin/python -m bench.run --scenarios normal --workloads small --duration-scale 0.4
    .venv/bin/python -m bench.run --workloads range,stair,sse,sse_soak --duration-scale 0.2
    .venv/bin/python -m bench.run --scenarios poor --workloads small --fp-env FILEPROXY_X=off

Besides the per-scenario table (1 KiB, 1 MiB, Range requests) the clean link
carries the extra workloads of bench/extras.py: the staircase (knee per
contender), the paced staircase and soak, SSE streams and the SSE soak.

Needs root (network namespaces, tc, iptables), wrk, nginx, curl, ping, ethtool,
iptables and, on kernels without netem, the ``netfilterqueue`` package
(``pip install -e '.[bench]'``; builds against Debian's libnetfilter-queue-dev).

Setup (see bench/netem.py): a client and a server network namespace joined by
a veth pair. The server namespace runs the backend (nginx, static files of
1 KiB, 1 MiB and 64 MiB) and every contender, each with 2 worker processes:

- ``direct``: wrk straight to the backend nginx (the limit);
- ``nginx``: nginx ``proxy_pass`` (upstream keepalive, buffering on, 16 x 64k);
- ``before``: the seed's plain aiohttp proxy with its original values
  (bench/baseline_proxy.py, gunicorn + aiohttp.GunicornWebWorker);
- ``fp_off``: fileproxy, ``FILEPROXY_OPTIMIZER=off``;
- ``fp_on``: fileproxy, optimizer on
  (both ``gunicorn -c gunicorn.conf.py``, FILEPROXY_WORKERS=2, access log off).

The proxies reach the backend over the server namespace's loopback; the
impaired link is the one between wrk and the contender. wrk runs in the
client namespace. For each scenario the emulation is verified first (RTT,
rate, loss counters), then every workload is measured for every contender in
the order A B C D E E D C B A (drift on a shared machine cancels out), and
the two runs of each contender are averaged.

The ``many`` workload (poor and very poor links; issue 14: slow clients must never
hold upstream connections): N downloads of one file start at once from
bench/many_clients.py in the client namespace (one asyncio process, each client
``bench.slow_clients.slow_get`` on its own connection, SO_RCVBUF 32 KiB, reading
the body as it arrives). The link is the scenario's one shaped link, shared by
every client: the emulation has tbf on each veth end and no per-flow shaping (no
netem, fq or htb classes per flow here), so "each client on its own impaired path"
is not available; the N flows divide the link. Per contender, one run each in the
order of ``--contenders`` (A B C D E: one pass takes ~8 min per scenario, two
would not fit): completed byte-exact / started, errors by kind (status_504, reset,
short_body, timeout, no_head, ...), time to first byte p50 / p99, wall time, and
the contender's upstream connections, sampled with ``ss -tnp`` in the server
namespace every ~0.2 s and kept only when owned by the contender's processes
(idle pooled connections of the other contenders do not count): the most
ESTABLISHED at once, and the most / mean "busy" ones (bytes waiting between the
backend and the proxy: the proxy reads its upstream only as fast as a client
takes the body).

Sizing (``MANY``; ``MANY_NOTE`` says the same in the report): the client count
should exceed the proxies' upstream pools (fileproxy 2 workers x 50 per host =
100; "before" 2 x 30 = 60), each response should exceed what the client side
absorbs while a proxy without a spool keeps its upstream (the proxy's send buffer,
autotuned from tcp_wmem 4K/16K/4M, 110-165 KB seen in ss on the very poor link;
BUFFER_SIZE 128 KiB of transport buffer; the client's 32 KiB SO_RCVBUF: ~300 KiB,
plus the proxy's upstream read buffer before the rest shows as busy: >= 768 KiB),
and the 5 contenders should take ~8 min per scenario (~480 s x the link rate):

- poor, 10 Mbit/s (~9.3 Mbit/s of goodput measured with 20 flows): 110 x 1 MiB =
  115 MB = ~92 s of link time per contender. Condition (2) is NOT met there: the
  proxies' send buffers autotune to ~2 MiB on this link (ss: 2,080,512 bytes on
  every client socket 15 s into a run), so any proxy hands a 1 MiB body to the
  kernel at once; meeting it needs > 2-4 MiB per response (tcp_wmem max 4 MiB):
  110 x 4 MiB = ~370 s per contender, 31 min for five;
- very poor, 1 Mbit/s: more than 100 clients x >= 768 KiB = >= 79 MB = ~660 s per
  contender (55 min for five): by default 8 x 768 KiB = 6.3 MB = ~50 s, fewer
  clients than any pool (the spool and the connections held are measured, the wait
  for a pool slot is not), and few enough that the flows' smallest windows (BBR
  keeps >= 4 packets each) fit the link's ~50 packets (bandwidth-delay product +
  tbf queue);
- on the poor link 110 flows x 4 packets exceed its ~215 (130 + the tbf queue's
  85): the shared link stays overloaded, losses put flows into exponential
  retransmission back-off, and some starve for a minute or more whoever serves
  them. With ``Connection: close`` (the first run, 2026-12-04 15:42) every server
  closed right after handing the body to its kernel; the orphaned socket gets
  tcp_orphan_retries (8) instead of tcp_retries2 (15) and was aborted
  (TcpExtTCPAbortOnTimeout) without a RST the client saw, which then waited for its
  deadline (2x the link's time for everything, at least 120 s): ``timeout`` in every
  row, direct included. The requests are keep-alive since (the client closes),
  which did not remove the timeouts (2026-12-04-1618: direct 11, nginx 12,
  fileproxy 9 of 110): starved flows outlast a 2x deadline whoever serves them;
- BENCH_FULL=1: the issue's 300 x 4 MiB on the poor link (~1,000 s per contender)
  and 110 x 1 MiB on the very poor one (~920 s per contender): ~2.7 h more;
  ``--many CLIENTS:KIB`` sets both links' figures. The run that pins upstreams in
  ~12 min per contender: ``--scenarios poor --workloads many --many 105:4096``
  (2026-12-04-1717: "before" completed 0 of 105, 45 x 504 and 60 bodies cut;
  fileproxy 93, nginx 98, direct 95, only the link's timeouts).

Output: a markdown table (printed, and ``bench/results/<date>.md``), the raw
figures (``.json``) and a chart (``.png``, when matplotlib is importable).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import extras as extra_workloads
from bench.netem import (
    SCENARIOS,
    SERVER_IP,
    Process,
    Scenario,
    Testbed,
    netem_available,
    write_file,
)
from bench.procs import PeakMemory, group_cpu_seconds, group_pids, host_busy_seconds
from bench.records import (
    BACKEND_PORT,
    CONTENDERS,
    FILEPROXY_KEYS,
    LABELS,
    WORKERS,
    WRK_TIMEOUT_S,
    LongDownload,
    ManyRun,
    ManyWorkload,
    RangeCheck,
    Report,
    RunResult,
    ScenarioResult,
    WorkloadResult,
    WrkStats,
)
from bench.report import NOTES, aggregate, aggregate_many, rerender, write_report

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
LONG_DOWNLOAD_BYTES = 8 << 20  # ~80 s on the very poor link: longer than the seed's 45 s total


@dataclass(frozen=True)
class Workload:
    key: str  # small | file | file64 | range
    path: str
    connections: int
    duration_s: int
    script_args: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return WORKLOAD_LABELS[self.key]


RANGE_MAX_LEN = 256 * 1024  # a Range request asks for 1 B .. 256 KiB of the 64 MiB file
WORKLOAD_LABELS = {
    "small": "1 KiB",
    "file": "1 MiB",
    "file64": "64 MiB",
    "range": "Range <=256 KiB of 64 MiB",
    "paced": "1 KiB paced",
}
# the wrk workloads of the per-scenario table, and the extra ones (bench/extras.py,
# on the clean link); "soak" and "stair_rate" run by default only with BENCH_FULL=1
TABLE_WORKLOADS = ("small", "file", "range", "many")
EXTRA_WORKLOADS = ("stair", "sse", "sse_soak", "soak", "stair_rate")


def workloads_for(scenario: str, full: bool, scale: float) -> list[Workload]:
    """Connections: the seed's 1000 / 500 / 100 for small responses; 16 / 4 / 2 for files.

    1 MiB files need few connections on slow links (NOTES.md: at 16 connections
    a 1 MiB file did not finish within 10 s on the poor link).
    """
    factor = (3.0 if full else 1.0) * scale
    table: dict[str, list[tuple[str, str, int, float]]] = {
        "clean": [("file", "/1m.bin", 16, 5)],
        "normal": [("small", "/1k.bin", 1000, 5), ("file", "/1m.bin", 16, 5)],
        "poor": [("small", "/1k.bin", 500, 8), ("file", "/1m.bin", 4, 10)],
        "very_poor": [("small", "/1k.bin", 100, 10), ("file", "/1m.bin", 2, 10)],
    }
    # wrk takes whole seconds
    rows = [Workload(k, p, c, max(1, round(d * factor))) for k, p, c, d in table[scenario]]
    if full and scenario in ("clean", "normal"):
        rows.append(Workload("file64", "/64m.bin", 4, max(1, round(15 * scale))))
    # random byte ranges of the 64 MiB file (each response checked: 206, Content-Range,
    # length); 2 s runs by default, on the normal link too with BENCH_FULL=1
    if scenario == "clean" or (full and scenario == "normal"):
        rows.append(Workload("range", "/64m.bin", 16, max(1, round(2 * factor))))
    return rows


@dataclass(frozen=True)
class ManySpec:
    """The ``many`` workload of a scenario: `clients` downloads of `size` bytes at once."""

    clients: int
    size: int
    rcvbuf: int = 32 * 1024  # each client's SO_RCVBUF
    # keep-alive requests: with Connection: close every server closes once the last bytes
    # are in its kernel buffer, and an orphaned socket gets tcp_orphan_retries (8), not
    # tcp_retries2 (15): on the overloaded shared link starved flows were aborted unseen
    keep_alive: bool = True

    def expected_s(self, scenario: Scenario) -> float:
        """Seconds the shared link needs for every byte at its nominal rate."""
        return self.clients * self.size * 8 / (scenario.rate_mbit * 1e6)

    def deadline_s(self, scenario: Scenario) -> float:
        """Each client's deadline: 2x the link's time for everything, at least 120 s.

        A client whose connection the server dropped without a RST the client saw
        (nginx's send_timeout, 60 s, then the kernel's orphan retries) waits for it.
        """
        return round(max(120.0, 2 * self.expected_s(scenario)))


MIB = 1 << 20
# see MANY_NOTE: 8 min per scenario for the 5 contenders by default; the figures
# (300 x 4 MiB, ~100 x 1 MiB) with BENCH_FULL=1
MANY = {"poor": ManySpec(110, MIB), "very_poor": ManySpec(8, 768 * 1024)}
MANY_FULL = {"poor": ManySpec(300, 4 * MIB), "very_poor": ManySpec(110, MIB)}
MANY_NOTE = (
    "Sizing (bench/run.py MANY): (1) more clients than the proxies' upstream pools: "
    'fileproxy 2 workers x HTTP_CONNECTOR_LIMIT_PER_HOST 50 = 100, "before" 2 x 30 = 60 (a '
    "request waits for a slot within the connect timeout, 15 s / 8 s, then 504 / 500); (2) "
    "a response larger than what the client side absorbs while a proxy without a spool "
    "keeps its upstream: the proxy's socket send buffer (autotuned from tcp_wmem 4K/16K/4M;"
    " 110-165 KB in ss on the very poor link), its transport buffer (BUFFER_SIZE 128 KiB; "
    "asyncio's 64 KiB for \"before\") and the client's SO_RCVBUF (32 KiB): ~300 KiB; and for "
    "the rest to show as busy, more than the proxy's upstream read buffer (BUFFER_SIZE) on "
    "top: >= 768 KiB; (3) the 5 contenders within ~8 min per scenario: ~480 s x the link's "
    "rate. Poor link, 10 Mbit/s (9.3 measured with 20 flows): 110 x 1 MiB = 115 MB = ~92 s "
    "of link time per contender; but there the send buffers autotune much larger (ss: "
    "2,080,512 bytes on every client socket of fileproxy 15 s into the run, 0.5-1 MB unsent"
    " in each), so a 1 MiB response fits the kernel whatever the proxy and condition (2) is"
    " not met: it would need > 2-4 MiB per response (tcp_wmem's maximum is 4 MiB), 110 x 4 "
    "MiB = ~370 s per contender, 31 min for five. Very poor link, 1 Mbit/s: (1) and (2) "
    "together need >= 101 x 768 KiB = 79 MB = ~660 s per contender (55 min for five), so by"
    " default 8 x 768 KiB = 6.3 MB = ~50 s: fewer clients than any pool (the spool and the "
    "upstream connections held are measured, the wait for a pool slot is not), and few "
    "enough that the flows' smallest windows (BBR keeps >= 4 packets each) fit the link's "
    "~50 packets (bandwidth-delay product + tbf queue). On the poor link 110 flows x 4 "
    "packets exceed its ~215 (130 + the tbf queue's 85): the link stays overloaded, losses "
    "put flows in exponential retransmission back-off and some starve for a minute or more "
    "whoever serves them (see the direct row). BENCH_FULL=1: the issue's 300 x 4 MiB on the"
    " poor link (~1,000 s per contender) and 110 x 1 MiB on the very poor one (~920 s)."
)


# -- processes -------------------------------------------------------------------


def nginx_conf(root: Path, name: str, body: str, workers: int = WORKERS) -> Path:
    temp = root / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    conf = root / f"{name}.conf"
    conf.write_text(
        f"""daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {root}/{name}.pid;
error_log {root}/{name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{body}
}}
"""
    )
    return conf


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment without any fileproxy setting, plus `extra`."""
    prefixes = ("FILEPROXY_", "HTTP_", "REDIS_", "BASELINE_")
    names = {"STREAM_CHUNK_SIZE", "BUFFER_SIZE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
    env.update(extra)
    return env


class Bench:
    def __init__(self, bed: Testbed, root: Path, fp_env: dict[str, str] | None = None) -> None:
        self.bed = bed
        self.root = root
        self.fp_env = fp_env or {}  # --fp-env: settings of every fileproxy contender
        self.www = root / "www"
        self.running: dict[str, Process] = {}
        self.nginx = shutil.which("nginx") or "/usr/sbin/nginx"

    def prepare_files(self) -> None:
        self.www.mkdir(exist_ok=True)
        write_file(self.www / "1k.bin", 1024)
        write_file(self.www / "1m.bin", 1 << 20)
        write_file(self.www / "64m.bin", 64 << 20)
        write_file(self.www / "long.bin", LONG_DOWNLOAD_BYTES)

    # contenders

    def start_backend(self) -> None:
        conf = nginx_conf(
            self.root,
            "backend",
            f"    server {{ listen {BACKEND_PORT} backlog=4096; root {self.www}; }}",
        )
        self.running["direct"] = self.bed.spawn(
            self.bed.server_ns, "backend", [self.nginx, "-c", str(conf), "-p", str(self.root)]
        )

    def start(
        self, key: str, backend_port: int = BACKEND_PORT, env_extra: dict[str, str] | None = None
    ) -> None:
        """Start a contender in front of `backend_port` (the SSE workloads use another backend).

        `env_extra`: settings added to a fileproxy contender's environment (the SSE
        soak raises the upstream pool limits); the rows say so.
        """
        contender = next(c for c in CONTENDERS if c.key == key)
        ns = self.bed.server_ns
        port = contender.port
        upstream = f"http://127.0.0.1:{backend_port}"
        if key == "direct":
            return
        if key == "nginx":
            conf = nginx_conf(
                self.root,
                "nginx-proxy",
                f"""    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
        }}
    }}""",
            )
            argv = [self.nginx, "-c", str(conf), "-p", str(self.root)]
            self.running[key] = self.bed.spawn(ns, "nginx-proxy", argv)
        elif key == "before":
            argv = [
                PYTHON, "-m", "gunicorn", "bench.baseline_proxy:app",
                "-k", "aiohttp.GunicornWebWorker", "-w", str(WORKERS),
                "-b", f"0.0.0.0:{port}", "--backlog", "2048",
                "--graceful-timeout", "3", "--log-level", "warning", "--no-control-socket",
            ]  # fmt: skip
            env = clean_env({"BASELINE_UPSTREAM": upstream})
            self.running[key] = self.bed.spawn(ns, "before", argv, env=env)
        else:
            env = clean_env(
                {
                    "FILEPROXY_BIND": f"0.0.0.0:{port}",
                    "FILEPROXY_UPSTREAM": upstream,
                    "FILEPROXY_CACHE": "off",  # the relay: nginx proxy_pass has no cache either
                    "FILEPROXY_WORKERS": str(WORKERS),
                    "FILEPROXY_ACCESS_LOG": "off",
                    "FILEPROXY_OPTIMIZER": "on" if key == "fp_on" else "off",
                    "FILEPROXY_DRAIN_DELAY": "0",
                    "FILEPROXY_GRACEFUL_TIMEOUT": "3",
                    "FILEPROXY_LOG_LEVEL": "warning",
                    **self.fp_env,
                    **(env_extra or {}),
                }
            )
            argv = [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
            self.running[key] = self.bed.spawn(ns, key, argv, env=env)

    def stop(self, key: str) -> None:
        process = self.running.pop(key, None)
        if process is not None:
            self.bed.stop(process)

    def pgid(self, key: str) -> int:
        return self.running[key].pid

    @staticmethod
    def port(key: str) -> int:
        return next(c.port for c in CONTENDERS if c.key == key)

    @staticmethod
    def workload(
        key: str, path: str, connections: int, duration_s: int, script_args: tuple[str, ...] = ()
    ) -> Workload:
        return Workload(key, path, connections, max(1, duration_s), script_args)

    def wait_ready(self, keys: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        pending = list(keys)
        while pending:
            for key in list(pending):
                process = self.running.get(key)
                if process is not None and process.popen.poll() is not None:
                    log = process.log.read_text()[-3000:] if process.log else ""
                    raise RuntimeError(f"{key} exited at start:\n{log}")
                port = next(c.port for c in CONTENDERS if c.key == key)
                code = self.bed.sh(
                    self.bed.server_ns, "curl", "-s", "-o", "/dev/null", "-m", "2",
                    "-w", "%{http_code}", f"http://127.0.0.1:{port}/1k.bin",
                    check=False,
                )  # fmt: skip
                if code.strip() == "200":
                    pending.remove(key)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:g} s: {', '.join(pending)}")
            if pending:
                time.sleep(0.2)

    def check_bytes(self, keys: list[str]) -> dict[str, bool]:
        """Each contender relays 1 MiB byte-exact (run on the clean link)."""
        want = subprocess.run(
            ["sha256sum", str(self.www / "1m.bin")], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        result = {}
        for key in keys:
            port = next(c.port for c in CONTENDERS if c.key == key)
            out = self.bed.sh(
                self.bed.client_ns, "sh", "-c",
                f"curl -sS --fail -m 20 http://{SERVER_IP}:{port}/1m.bin | sha256sum",
                check=False,
            )  # fmt: skip
            result[key] = out.split()[:1] == [want]
        return result

    def long_download(self, key: str, size: int) -> LongDownload:
        """One download of `size` bytes through a contender, checked byte for byte.

        On the very poor link it lasts longer than the seed's 45 s *total*
        timeout, which the "before" proxy still has.
        """
        port = next(c.port for c in CONTENDERS if c.key == key)
        want = subprocess.run(
            ["sha256sum", str(self.www / "long.bin")], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        target = self.root / f"long-{key}.bin"
        started = time.monotonic()
        out = self.bed.sh(
            self.bed.client_ns, "curl", "-sS", "-o", str(target), "--max-time", "400",
            "-w", "%{http_code} %{size_download} %{exitcode}",
            f"http://{SERVER_IP}:{port}/long.bin", check=False, timeout=460,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        fields = out.split()
        got = ""
        if target.exists():
            got = subprocess.run(
                ["sha256sum", str(target)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
            target.unlink()
        return LongDownload(
            contender=key,
            size=size,
            status=fields[0] if fields else None,
            bytes=int(fields[1]) if len(fields) > 1 else 0,
            curl_exit=int(fields[2]) if len(fields) > 2 else None,
            seconds=round(elapsed, 1),
            byte_exact=got == want,
        )

    def established(self, port: int) -> int:
        out = self.bed.sh(
            self.bed.server_ns, "ss", "-Htn", "state", "established",
            f"( sport = :{port} ) and dst {SERVER_IP.rsplit('.', 1)[0]}.1",
            check=False,
        )  # fmt: skip
        return len([line for line in out.splitlines() if line.strip()])

    def wait_quiet(self, port: int, timeout: float) -> int:
        """Wait until no client connection to `port` is established; those left after."""
        deadline = time.monotonic() + timeout
        while (left := self.established(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def fileproxy_stats(self, key: str) -> dict[str, Any]:
        port = next(c.port for c in CONTENDERS if c.key == key)
        out = self.bed.sh(
            self.bed.server_ns, PYTHON, "-m", "bench.health_probe", "--port", str(port),
            "--collect-stats", check=False,
        )  # fmt: skip
        try:
            data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            return data
        except (ValueError, IndexError):
            return {"error": out[-500:]}

    # measuring

    def measure(self, scenario: Scenario, workload: Workload, key: str, health: bool) -> RunResult:
        contender = next(c for c in CONTENDERS if c.key == key)
        threads = min(2, workload.connections)
        url = f"http://{SERVER_IP}:{contender.port}{workload.path}"
        script, script_args = "wrk_report.lua", []
        if workload.key == "range":
            script = "wrk_range.lua"
            size = (self.www / workload.path.lstrip("/")).stat().st_size
            script_args = ["--", str(size), str(RANGE_MAX_LEN), str(len(self.running))]
        elif workload.key == "paced":
            script, script_args = "wrk_paced.lua", ["--", *workload.script_args]
        argv = self.bed.ns_argv(
            self.bed.client_ns,
            [
                "wrk", f"-t{threads}", f"-c{workload.connections}", f"-d{workload.duration_s}s",
                "--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(BENCH / script), url, *script_args,
            ],
        )  # fmt: skip
        groups = {
            "contender": self.running[key].pid,
            "backend": self.running["direct"].pid,
        }
        if self.bed.delayer is not None:
            groups["delayer"] = self.bed.delayer.pid
        cpu_before = {name: group_cpu_seconds(pgid) for name, pgid in groups.items()}
        wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_before = host_busy_seconds()
        loadavg = Path("/proc/loadavg").read_text().split()[0]
        probe = None
        if health:
            probe = subprocess.Popen(
                self.bed.ns_argv(
                    self.bed.server_ns,
                    [PYTHON, "-m", "bench.health_probe", "--port", str(contender.port),
                     "--path", health_path(key, workload),
                     "--count", "200", "--interval-ms", "10", "--delay", "1.0"],
                ),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            )  # fmt: skip
        started = time.monotonic()
        memory_group = self.running["direct" if key == "direct" else key].pid
        with PeakMemory(memory_group) as memory:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=workload.duration_s + 60, check=False
            )
        elapsed = time.monotonic() - started
        busy = host_busy_seconds() - busy_before
        wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = {
            name: round(group_cpu_seconds(pgid) - cpu_before[name], 2)
            for name, pgid in groups.items()
        }
        cpu["wrk"] = round(
            (wrk_after.ru_utime - wrk_before.ru_utime) + (wrk_after.ru_stime - wrk_before.ru_stime),
            2,
        )
        known = sum(v for k, v in cpu.items() if not (k == "backend" and key == "direct"))
        # everything else: other users of the machine, and kernel network work (softirq)
        # not charged to any of our processes
        cpu["other"] = round(max(busy - known, 0.0), 2)
        result = RunResult(
            contender=key,
            scenario=scenario.name,
            workload=workload.key,
            connections=workload.connections,
            elapsed_s=round(elapsed, 2),
            loadavg_1m_before=float(loadavg),
            cpu_s=cpu,
            # the contender's processes (direct: the backend nginx), RSS summed, MiB
            memory=memory.result(),
        )
        found = re.search(r"^RANGE_JSON (.*)$", done.stdout, re.MULTILINE)
        if found:
            result.range = RangeCheck.from_json(json.loads(found.group(1)))
        match = re.search(r"^WRK_JSON (.*)$", done.stdout, re.MULTILINE)
        if match is None:
            result.error = (done.stdout + done.stderr)[-1000:]
        else:
            result.wrk = WrkStats.from_json(json.loads(match.group(1)))
        if probe is not None:
            try:
                out, _ = probe.communicate(timeout=60)
                result.health = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
                probe.kill()
                probe.wait()
                result.health = {"error": str(exc)}
        return result

    def many_file(self, size: int) -> tuple[str, str]:
        """The ``many`` workload's file of `size` bytes: its path and SHA-256."""
        target = self.www / f"many-{size}.bin"
        if not target.exists():
            write_file(target, size)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        return f"/{target.name}", digest

    def upstream_held(self, key: str) -> tuple[int, int]:
        """The contender's ESTABLISHED connections to the backend, and how many of them
        are busy: bytes wait between the backend and the proxy (the proxy side's Recv-Q
        or the backend side's Send-Q > 0: the proxy is not reading its upstream as fast as
        the backend sends, i.e. a client holds it back).

        ``ss -tnp`` in the server namespace; a connection counts only when its proxy-side
        socket belongs to one of the contender's processes: idle pooled connections of the
        others are not counted. A held connection whose rest of the body already sits in
        the proxy's own read buffer (BUFFER_SIZE) shows as established, not as busy.
        """
        pids = {str(pid) for pid in group_pids(self.running[key].pid)}
        out = self.bed.sh(
            self.bed.server_ns, "ss", "-tnpH", "state", "established",
            f"( sport = :{BACKEND_PORT} or dport = :{BACKEND_PORT} )", check=False,
        )  # fmt: skip
        backend_sendq: dict[str, int] = {}  # the proxy's port -> backend side Send-Q
        proxy_side: list[tuple[str, int]] = []  # (the proxy's port, Recv-Q) of ours
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 4 or not (fields[0].isdigit() and fields[1].isdigit()):
                continue
            local, peer = fields[2], fields[3]
            if local.endswith(f":{BACKEND_PORT}"):
                backend_sendq[peer.rsplit(":", 1)[1]] = int(fields[1])
            elif set(re.findall(r"pid=(\d+)", line)) & pids:
                proxy_side.append((local.rsplit(":", 1)[1], int(fields[0])))
        busy = sum(1 for port, recvq in proxy_side if recvq > 0 or backend_sendq.get(port, 0) > 0)
        return len(proxy_side), busy

    def measure_many(
        self, scenario: Scenario, key: str, spec: ManySpec, path: str, sha256: str
    ) -> ManyRun:
        """``spec.clients`` downloads at once from the client namespace (bench.many_clients)
        while ``ss`` samples the contender's upstream connections every ~0.2 s."""
        port = self.port(key)
        deadline = spec.deadline_s(scenario)
        argv = self.bed.ns_argv(
            self.bed.client_ns,
            [
                PYTHON, "-m", "bench.many_clients", "--host", SERVER_IP, "--port", str(port),
                "--path", path, "--clients", str(spec.clients), "--sha256", sha256,
                "--rcvbuf", str(spec.rcvbuf), "--deadline", f"{deadline:g}",
                *(["--keep-alive"] if spec.keep_alive else []),
            ],
        )  # fmt: skip
        upstream: dict[str, Any] | None = None
        stop = threading.Event()
        samples: list[list[float]] = []
        if key != "direct":
            upstream = {"baseline": self.upstream_held(key)[0], "samples": samples}
        group = self.running[key].pid
        cpu_before = group_cpu_seconds(group)
        busy_before = host_busy_seconds()
        loadavg = float(Path("/proc/loadavg").read_text().split()[0])
        started = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                held, busy = self.upstream_held(key)
                samples.append([round(time.monotonic() - started, 2), held, busy])
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        if upstream is not None:
            sampler.start()
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=deadline + 60, check=False, cwd=REPO
            )
            output, error = done.stdout, None if done.returncode == 0 else done.stderr[-1000:]
        except subprocess.TimeoutExpired as exc:
            output, error = "", f"client process not done after {deadline + 60:g} s: {exc}"
        wall = time.monotonic() - started
        stop.set()
        if sampler.is_alive():
            sampler.join(10)
        cpu = round(group_cpu_seconds(group) - cpu_before, 2)
        busy = host_busy_seconds() - busy_before
        clients: list[list[Any]] = []
        try:
            data = json.loads(output.strip().splitlines()[-1])
            clients, wall = data["clients"], data["wall_s"]
        except (ValueError, IndexError, KeyError) as exc:
            error = error or f"no JSON from the clients ({exc}): {output[-500:]}"
        name = "backend" if key == "direct" else "contender"
        return ManyRun(
            contender=key,
            scenario=scenario.name,
            started=spec.clients,
            size=spec.size,
            rcvbuf=spec.rcvbuf,
            wall_s=round(wall, 2),
            loadavg_1m_before=loadavg,
            cpu_s={name: cpu, "machine": round(busy, 2)},
            clients=clients,
            upstream=upstream,
            error=error,
        )


def health_path(key: str, workload: Workload) -> str:
    """What the health probe asks for: fileproxy's /health; of nginx, which has none,
    the workload's own small file, as a floor: the same probe, the same saturation."""
    return "/health" if key in FILEPROXY_KEYS else workload.path


def environment(method: str) -> dict[str, Any]:
    def version(argv: list[str], pattern: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        found = re.search(pattern, done.stdout + done.stderr)
        return found.group(1) if found else "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0.0
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    os_name = "?"
    with contextlib.suppress(OSError):
        found = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())
        os_name = found.group(1) if found else "?"
    import aiohttp
    import gunicorn

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "os": os_name,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "gunicorn": gunicorn.__version__,
        "uvloop": uv,
        "nginx": version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": version(["wrk", "-v"], r"wrk (\S+)"),
        "congestion_control": Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip(),
        "method": method,
        "method_detail": (
            "tc netem on both veth ends"
            if method == "netem"
            else "no netem qdisc on this kernel: tbf for rate on both veth ends, iptables "
            "statistic random DROP on each side's INPUT for loss, NFQUEUE userspace delayer "
            "(bench/delayer.py, FIFO per flow) on the client namespace's OUTPUT and INPUT "
            "for delay and jitter"
        ),
    }


def collect_stats(bench: Bench, key: str) -> dict[str, Any]:
    raw = bench.fileproxy_stats(key)
    if "error" in raw:
        return raw
    workers = raw.get("workers", {})
    out: dict[str, Any] = {
        "workers": len(workers),
        "total_requests": 0,
        "total_errors": 0,
        "client_aborts": 0,
        "rejected_total": 0,
        "enforcing": [],
        "quality_levels": [],
    }
    for data in workers.values():
        metrics = data["performance_optimizer"]["metrics"]
        out["total_requests"] += metrics.get("total_requests", 0)
        out["total_errors"] += metrics.get("total_errors", 0)
        out["client_aborts"] += metrics.get("client_aborts", 0)
        out["quality_levels"].append(data["performance_optimizer"].get("quality_level"))
        for upstream in data.get("upstreams", {}).values():
            limiter = upstream.get("limiter") or {}
            out["rejected_total"] += limiter.get("rejected_total", 0)
            if limiter:
                out["enforcing"].append(limiter.get("enforcing"))
    out["raw"] = raw
    return out


@dataclass
class Options:
    scenarios: list[str]
    workloads: list[str]
    contenders: list[str]
    full: bool
    scale: float
    out_dir: Path
    chart: bool = True
    long_download: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    fp_env: dict[str, str] = field(default_factory=dict)
    many: ManySpec | None = None  # --many: the same clients x size on both links


def run(options: Options) -> Report:
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="fpb-"))
    bed = Testbed(workdir=root / "logs")
    (root / "logs").mkdir()
    bench = Bench(bed, root, options.fp_env)
    report = Report(full=options.full, notes=NOTES)
    proxies = [k for k in options.contenders if k != "direct"]
    try:
        print(f"setting up namespaces {bed.client_ns} / {bed.server_ns} in {root}", flush=True)
        bed.setup()
        report.environment = environment(bed.method)
        bench.prepare_files()
        bench.start_backend()
        for key in proxies:
            bench.start(key)
        bench.wait_ready(["direct", *proxies])
        report.byte_exact_1mib = bench.check_bytes(options.contenders)
        print(f"byte-exact 1 MiB through each contender: {report.byte_exact_1mib}", flush=True)
        for name in options.scenarios:
            scenario = SCENARIOS[name]
            print(f"\n== {scenario.title}: {scenario.describe()} "
                  f"[{(time.monotonic() - started) / 60:.1f} min]", flush=True)  # fmt: skip
            scenario_started = time.monotonic()
            # fresh proxies per scenario: no pool or optimizer state carried over
            python_proxies = [k for k in proxies if k != "nginx"]
            for key in python_proxies:
                bench.stop(key)
            bed.apply(scenario)
            for key in python_proxies:
                bench.start(key)
            bench.wait_ready(python_proxies)
            ready_s = time.monotonic() - scenario_started
            verification = bed.verify(BACKEND_PORT, f"http://{SERVER_IP}:{BACKEND_PORT}/64m.bin")
            verification["setup_s"] = round(ready_s, 1)
            verification["verify_s"] = round(time.monotonic() - scenario_started - ready_s, 1)
            scen = ScenarioResult(
                name=name,
                title=scenario.title,
                describe=scenario.describe(),
                config=asdict(scenario),
                verification=verification,
            )
            for workload in workloads_for(name, options.full, options.scale):
                if workload.key not in options.workloads and not (
                    workload.key == "file64" and "file" in options.workloads
                ):
                    continue
                order = options.contenders + options.contenders[::-1]
                runs: dict[str, list[RunResult]] = {k: [] for k in options.contenders}
                for key in order:
                    health = (
                        key in (*FILEPROXY_KEYS, "nginx")
                        and name == "normal"
                        and workload.key == "small"
                    )
                    result = bench.measure(scenario, workload, key, health)
                    runs[key].append(result)
                    w = result.wrk
                    if w:
                        p99 = (w.latency_us or {}).get("p99")
                        summary = (
                            f"{w.requests_per_s:.0f} req/s, {w.bytes_per_s / 1e6:.2f} MB/s, "
                            f"p99 {'-' if p99 is None else f'{p99 / 1000:.1f}'} ms, "
                            f"errors {w.errors_total}"
                        )
                    else:
                        summary = f"FAILED: {(result.error or '')[:200]}"
                    if result.health is not None:
                        summary += f"; /health {result.health}"
                    print(
                        f"  {workload.label} c={workload.connections} {key:7s} {summary}",
                        flush=True,
                    )
                    port = next(c.port for c in CONTENDERS if c.key == key)
                    quiet_started = time.monotonic()
                    # connections of the last run still open on the server side (a lost RST
                    # on a lossy link leaves some for a while): wait a little, then go on
                    result.lingering = bench.wait_quiet(port, 3)
                    result.quiet_wait_s = round(time.monotonic() - quiet_started, 2)
                probe_mbit = verification["rate_probe"]["goodput_mbit"]
                rows = {
                    k: aggregate(runs[k], scenario, workload.key, probe_mbit)
                    for k in options.contenders
                }
                scen.workloads.append(
                    WorkloadResult(
                        key=workload.key,
                        label=workload.label,
                        path=workload.path,
                        connections=workload.connections,
                        duration_s=workload.duration_s,
                        rows=rows,
                        runs=runs,
                    )
                )
            spec = (MANY_FULL if options.full else MANY).get(name)
            if spec is not None and options.many is not None:
                spec = options.many
            if "many" in options.workloads and spec is not None:
                scen.many = run_many(bench, scenario, options.contenders, spec)
            if name == "very_poor" and options.long_download:
                scen.long_download = []
                for key in [k for k in options.contenders if k != "direct"]:
                    print(f"  long download, {LONG_DOWNLOAD_BYTES >> 20} MiB through {key} ...",
                          flush=True)  # fmt: skip
                    outcome = bench.long_download(key, LONG_DOWNLOAD_BYTES)
                    print(f"    {outcome}", flush=True)
                    scen.long_download.append(outcome)
            scen.fileproxy_stats = {
                k: collect_stats(bench, k) for k in proxies if k in FILEPROXY_KEYS
            }
            if name == "clean" and any(w in EXTRA_WORKLOADS for w in options.workloads):
                report.extras = extra_workloads.run_extras(
                    bench, scenario, options, options.contenders, BACKEND_PORT
                )
                report.extras["run_time_s"] = round(time.monotonic() - scenario_started, 1)
            scen.counters_after = bed.counters()
            delayer = bed.delayer
            bed.clear()
            scen.delayer = bed.delayer_stats(delayer) if delayer is not None else None
            report.scenarios.append(scen)
    finally:
        bed.teardown()
        shutil.rmtree(root, ignore_errors=True)
    report.run_time_s = round(time.monotonic() - started, 1)
    return report


def run_many(
    bench: Bench, scenario: Scenario, contenders: list[str], spec: ManySpec
) -> ManyWorkload:
    """The ``many`` workload of one scenario: one run per contender, in the given order."""
    path, sha256 = bench.many_file(spec.size)
    runs: dict[str, list[ManyRun]] = {k: [] for k in contenders}
    print(f"  many: {spec.clients} x {spec.size / 1024:g} KiB at once "
          f"(the link needs {spec.expected_s(scenario):.0f} s for it)", flush=True)  # fmt: skip
    for key in contenders:
        result = bench.measure_many(scenario, key, spec, path, sha256)
        runs[key].append(result)
        row = aggregate_many([result])
        print(
            f"  many {key:7s} {row.completed}/{row.started} ok, errors {row.errors or 0}, "
            f"ttfb p50/p99 {row.ttfb_p50_s}/{row.ttfb_p99_s} s, wall {row.wall_s} s, "
            f"upstream max {row.upstream_max} (baseline {row.upstream_baseline}), "
            f"busy max/mean {row.busy_max}/{row.busy_mean}"
            + (f"; FAILED: {result.error[:200]}" if result.error else ""),
            flush=True,
        )
        bench.wait_quiet(bench.port(key), 10)
    return ManyWorkload(
        clients=spec.clients,
        size=spec.size,
        rcvbuf=spec.rcvbuf,
        order=list(contenders),
        runs=runs,
        rows={k: aggregate_many(v) for k, v in runs.items()},
        note=MANY_NOTE,
        deadline_s=spec.deadline_s(scenario),
        keep_alive=spec.keep_alive,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="clean,normal,poor,very_poor")
    parser.add_argument(
        "--workloads",
        default=None,
        help="any of " + ",".join(TABLE_WORKLOADS + EXTRA_WORKLOADS) + " (default: all but "
        "soak and stair_rate; with BENCH_FULL=1 all); the extra ones run on the clean link",
    )
    parser.add_argument(
        "--soak-streams", type=int, default=None,
        help="streams of the SSE soak (default 1000; 10000 with BENCH_FULL=1)",
    )  # fmt: skip
    parser.add_argument("--contenders", default=",".join(c.key for c in CONTENDERS))
    parser.add_argument(
        "--duration-scale", type=float, default=1.0, help="multiply every run's duration"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--long-download",
        action="store_true",
        help="on the very poor link, download 8 MiB (~80 s) through each proxy, byte-exact "
        "(on by default with BENCH_FULL=1)",
    )
    parser.add_argument(
        "--many", metavar="CLIENTS:KIB", default=None,
        help="the many workload's clients and file size on the poor and very poor links "
        "(default: 110:1024 and 16:768; BENCH_FULL=1: 300:4096 and 110:1024)",
    )  # fmt: skip
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rebuild .md/.png from a stored .json"
    )
    parser.add_argument(
        "--fp-env", action="append", default=[], metavar="NAME=VALUE",
        help="a setting for every fileproxy contender (repeatable), to A/B one setting",
    )  # fmt: skip
    args = parser.parse_args()
    if args.render:
        rerender(args.render, not args.no_chart)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench.run needs root (network namespaces, tc, iptables)")
    missing = [p for p in ("wrk", "nginx", "curl", "ping", "ethtool", "iptables", "tc", "ss")
               if shutil.which(p) is None]  # fmt: skip
    if missing:
        raise SystemExit(
            f"missing programs: {' '.join(missing)}; on Debian: apt-get install -y wrk nginx "
            "curl iputils-ping ethtool iptables iproute2"
        )
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        if not netem_available():
            raise SystemExit(
                "this kernel has no netem qdisc and the NFQUEUE delayer needs the netfilterqueue "
                "package: apt-get install -y gcc libnetfilter-queue-dev && "
                ".venv/bin/pip install -e '.[bench]'"
            ) from None
    full = os.environ.get("BENCH_FULL", "") not in ("", "0")
    default_workloads = [*TABLE_WORKLOADS, *EXTRA_WORKLOADS]
    if not full:
        default_workloads.remove("soak")
        default_workloads.remove("stair_rate")
    workloads = args.workloads.split(",") if args.workloads else default_workloads
    if not all(item.split("=", 1)[0] and "=" in item for item in args.fp_env):
        raise SystemExit(f"--fp-env takes NAME=VALUE, got {args.fp_env}")
    options = Options(
        scenarios=[s for s in args.scenarios.split(",") if s],
        workloads=[w for w in workloads if w],
        contenders=[c for c in args.contenders.split(",") if c],
        full=full,
        scale=args.duration_scale,
        out_dir=args.out_dir,
        chart=not args.no_chart,
        long_download=args.long_download or full,
        extra={"soak_streams": args.soak_streams},
        fp_env=dict(item.split("=", 1) for item in args.fp_env),
    )
    if args.many:
        clients, _, kib = args.many.partition(":")
        options.many = ManySpec(int(clients), int(kib) * 1024)
    unknown = set(options.scenarios) - set(SCENARIOS)
    unknown |= set(options.contenders) - set(LABELS)
    unknown |= set(options.workloads) - set(TABLE_WORKLOADS + EXTRA_WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown: {', '.join(sorted(unknown))}")
    if "clean" not in options.scenarios and set(options.workloads) & set(EXTRA_WORKLOADS):
        options.scenarios.insert(0, "clean")  # the extra workloads run on the clean link
    if "direct" not in options.contenders:
        options.contenders.insert(0, "direct")  # the backend is always there

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    report = run(options)
    report.command = ("BENCH_FULL=1 " if full else "") + " ".join(
        ["python -m bench.run", *sys.argv[1:]]
    )
    options.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    write_report(report, options.out_dir / stamp, options.chart)


if __name__ == "__main__":
    main()
