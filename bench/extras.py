"""Issue 7's workloads beyond the per-scenario wrk table, all on the clean link.

Called by bench.run inside the clean scenario (after its table rows); each
returns plain JSON-able figures that bench.run stores and renders.

- ``stair``: staircase of connections (1 KiB, wrk) per contender until a stop
  condition fires: error rate > 5%, p99 over a bound, RSS over the start +
  256 MiB, or throughput below 0.9x the best for two steps in a row. The knee
  is the step of highest throughput before the stop.
- ``soak``: paced load (wrk, exponential think time) at 80% of the knee's
  throughput through fileproxy (optimizer on) for 5 minutes (BENCH_FULL=1).
- ``sse``: N concurrent server-sent-event streams (bench/sse_backend.py behind
  each contender, bench/sse_client.py in the client namespace): time to first
  event, events/s delivered, delivery delay, errors, peak RSS.
- ``sse_soak``: thousands of streams through fileproxy (2 workers), opened and
  closed in identical cycles; RSS (and PSS) of fileproxy's processes at each
  step: RSS per stream and whether RSS after close rises across cycles.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.netem import SERVER_IP, Scenario
from bench.procs import PeakMemory, group_cpu_seconds, group_memory
from bench.records import (
    Judgement,
    RateStaircase,
    RunResult,
    SoakCycle,
    SoakVerdict,
    Staircase,
    StairStep,
)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SSE_PORT = 8090
SSE_BACKEND = "aiohttp, 2 forked uvloop worker processes, SO_REUSEPORT, backlog 4096"
# what the runs before 2026-11-30 01:23 UTC used (their .json has no "sse_backend")
SSE_BACKEND_BEFORE = (
    "aiohttp under gunicorn -k aiohttp.GunicornUVLoopWebWorker -w 2, whose listener "
    "has aiohttp's default backlog of 128"
)
MIB = 1 << 20

STAIR_STEPS = (16, 32, 64, 128, 256, 512, 1024, 2048)
STAIR_ERROR_RATE = 0.05
STAIR_P99_MS = 250.0
STAIR_RSS_MIB = 256.0
STAIR_DROP = 0.9
SOAK_FRACTION = 0.8
RATE_STEPS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # x the knee of the connection staircase
PACED_SHORT = 0.8  # the paced staircase stops when achieved < this x offered
SOAK_CONTENDERS = ("fp_on",)


@dataclass(frozen=True)
class Plan:
    """Durations and sizes: the default run keeps them short (the whole bench < 15 min)."""

    stair_step_s: int
    soak_s: int
    sse_streams: tuple[int, ...]
    sse_s: float
    sse_interval_ms: int
    soak_streams: int
    soak_cycles: int
    soak_hold_s: float
    soak_settle_s: float
    soak_interval_ms: int


def plan(full: bool, scale: float, soak_streams: int | None = None) -> Plan:
    if full:
        base = Plan(5, 300, (32, 256, 1024), 15.0, 100, 10_000, 3, 30.0, 10.0, 5000)
    else:
        base = Plan(1, 60, (32, 256), 3.0, 100, 1000, 2, 5.0, 3.0, 5000)
    return Plan(
        stair_step_s=max(1, round(base.stair_step_s * scale)),
        soak_s=max(5, round(base.soak_s * scale)),
        sse_streams=base.sse_streams,
        sse_s=max(2.0, base.sse_s * scale),
        sse_interval_ms=base.sse_interval_ms,
        soak_streams=soak_streams or base.soak_streams,
        soak_cycles=base.soak_cycles,
        soak_hold_s=max(2.0, base.soak_hold_s * scale),
        soak_settle_s=base.soak_settle_s,
        soak_interval_ms=base.soak_interval_ms,
    )


# -- staircase ---------------------------------------------------------------------


def judge(step: StairStep, start_rss: float, best: StairStep | None, below: int) -> Judgement:
    """The stop conditions that fire at a measured `step` (and the new `below`).

    `below` counts the steps in a row under STAIR_DROP x the best step's req/s.
    """
    reasons = []
    if step.error_rate > STAIR_ERROR_RATE:
        reasons.append(f"error rate {step.error_rate:.1%} > {STAIR_ERROR_RATE:.0%}")
    if step.p99_ms is None or step.p99_ms > STAIR_P99_MS:
        p99 = "-" if step.p99_ms is None else f"{step.p99_ms:.0f}"
        reasons.append(f"p99 {p99} ms > {STAIR_P99_MS:g} ms")
    if step.peak_rss_mib > start_rss + STAIR_RSS_MIB:
        reasons.append(
            f"RSS {step.peak_rss_mib:.0f} MiB > start {start_rss:.0f} + {STAIR_RSS_MIB:g}"
        )
    if best is not None and (step.requests_per_s or 0.0) < STAIR_DROP * (
        best.requests_per_s or 0.0
    ):
        below += 1
        if below >= 2:
            reasons.append(f"throughput < {STAIR_DROP}x the best for 2 steps")
    else:
        below = 0
    return Judgement(reasons, below)


def rate_staircase(
    bench: Any, scenario: Scenario, key: str, knee_rps: float, step_s: int
) -> RateStaircase:
    """Paced 1 KiB load at RATE_STEPS x the knee's req/s, fixed connections; same stops.

    C = max(32, 2% of the highest rate, at most 2,048) connections, so the mean
    think time (C / rate) stays >= ~13 ms at the top step (wrk's delay() counts
    whole ms). Offered = the rate asked for; achieved = what wrk completed (the
    response time adds to each connection's cycle, so achieved runs a little
    under offered even below the knee). One more stop condition here: achieved
    < PACED_SHORT x offered (the contender no longer keeps up).
    """
    conns = min(2048, max(32, math.ceil(knee_rps * RATE_STEPS[-1] * 0.02)))
    start_rss = group_memory(bench.pgid(key))["rss"] / MIB
    steps: list[StairStep] = []
    best: StairStep | None = None
    below = 0
    stop = None
    for i, fraction in enumerate(RATE_STEPS):
        offered = fraction * knee_rps
        mean_ms = conns * 1000 / offered
        workload = bench.workload("paced", "/1k.bin", conns, step_s, (f"{mean_ms:.3f}", str(i)))
        result: RunResult = bench.measure(scenario, workload, key, False)
        bench.wait_quiet(bench.port(key), 3)
        w = result.wrk
        step = StairStep(
            fraction=fraction,
            offered_per_s=round(offered, 1),
            mean_think_ms=round(mean_ms, 3),
            peak_rss_mib=result.peak_mib,
        )
        steps.append(step)
        if not w:
            step.error = (result.error or "")[-300:]
            stop = "wrk failed"
            break
        errors = int(w.errors_total)
        step.requests_per_s = float(w.requests_per_s)
        step.errors = errors
        step.error_rate = errors / max(int(w.requests) + errors, 1)
        step.p50_ms = w.latency_ms("p50")
        step.p99_ms = w.latency_ms("p99")
        reasons, below = judge(step, start_rss, best, below)
        if step.requests_per_s < PACED_SHORT * offered:
            reasons.append(f"achieved < {PACED_SHORT}x offered")
        if reasons:
            stop = "; ".join(reasons)
            step.stop = stop
            break
        if best is None or step.requests_per_s > (best.requests_per_s or 0.0):
            best = step
    return RateStaircase(
        contender=key,
        connections=conns,
        step_s=step_s,
        knee_requests_per_s=knee_rps,
        steps=steps,
        best=None
        if best is None
        else {
            "offered_per_s": best.offered_per_s,
            "requests_per_s": best.requests_per_s,
            "p99_ms": best.p99_ms,
        },
        stop=stop or f"no stop condition up to {RATE_STEPS[-1]}x the knee",
    )


def staircase(bench: Any, scenario: Scenario, key: str, step_s: int) -> Staircase:
    """Connections doubled step by step, 1 KiB, until a stop condition; the knee."""
    start_rss = group_memory(bench.pgid(key))["rss"] / MIB
    steps: list[StairStep] = []
    best: StairStep | None = None
    below = 0
    stop = None
    for conns in STAIR_STEPS:
        result: RunResult = bench.measure(
            scenario, bench.workload("small", "/1k.bin", conns, step_s), key, False
        )
        w = result.wrk
        step = StairStep(connections=conns, cpu_s=result.cpu_s, peak_rss_mib=result.peak_mib)
        steps.append(step)
        bench.wait_quiet(bench.port(key), 3)
        if not w:
            step.error = (result.error or "")[-300:]
            stop = "wrk failed"
            break
        done = int(w.requests)
        errors = int(w.errors_total)
        step.requests_per_s = float(w.requests_per_s)
        step.requests = done
        step.errors = errors
        step.errors_by_kind = w.errors
        step.error_rate = errors / max(done + errors, 1)
        step.p50_ms = w.latency_ms("p50")
        step.p99_ms = w.latency_ms("p99")
        reasons, below = judge(step, start_rss, best, below)
        if reasons:
            stop = "; ".join(reasons)
            step.stop = stop
            break
        if best is None or step.requests_per_s > (best.requests_per_s or 0.0):
            best = step
    return Staircase(
        contender=key,
        step_s=step_s,
        start_rss_mib=round(start_rss, 1),
        steps=steps,
        knee=None
        if best is None
        else {
            "connections": best.connections,
            "requests_per_s": best.requests_per_s,
            "p99_ms": best.p99_ms,
        },
        stopped_at=steps[-1].connections if stop else None,
        stop=stop or f"no stop condition up to {STAIR_STEPS[-1]} connections",
    )


def paced_soak(
    bench: Any, scenario: Scenario, key: str, knee: dict[str, Any], seconds: int
) -> dict[str, Any]:
    """Paced 1 KiB load at SOAK_FRACTION of the knee's throughput for `seconds`.

    Each of C connections waits an exponential think time of mean T before each
    request, so the rate is C / (T + response time). C = max(32, target x 0.02)
    (T ~20 ms, the same as the paced staircase: wrk's delay() has 1 ms resolution;
    more connections cost fileproxy throughput, see the staircase). A calibration
    run (5 s) measures the response time at that load; T is then set to
    C / target - response time.
    """
    target = SOAK_FRACTION * knee["requests_per_s"]
    conns = min(4096, max(32, math.ceil(target * 0.02)))
    mean_ms = max(1.0, conns * 1000 / target)
    calibration = bench.measure(
        scenario,
        bench.workload("paced", "/1k.bin", conns, 5, (f"{mean_ms:.3f}", "2")),
        key,
        False,
    )
    cw = calibration.wrk
    cw_rps = cw.requests_per_s if cw else None
    calibrated = {"mean_think_ms": round(mean_ms, 3), "requests_per_s": cw_rps}
    if cw_rps:
        response_ms = max(0.0, conns * 1000 / cw_rps - mean_ms)
        mean_ms = max(1.0, conns * 1000 / target - response_ms)
        calibrated["response_ms"] = round(response_ms, 3)
    bench.wait_quiet(bench.port(key), 3)
    workload = bench.workload("paced", "/1k.bin", conns, seconds, (f"{mean_ms:.3f}", "1"))
    result: RunResult = bench.measure(scenario, workload, key, False)
    w = result.wrk
    return {
        "contender": key,
        "seconds": seconds,
        "knee_requests_per_s": knee["requests_per_s"],
        "target_requests_per_s": round(target, 1),
        "connections": conns,
        "mean_think_ms": round(mean_ms, 3),
        "calibration": calibrated,
        "requests_per_s": w.requests_per_s if w else None,
        "of_knee": round(w.requests_per_s / knee["requests_per_s"], 3) if w else None,
        "requests": w.requests if w else None,
        "errors": w.errors if w else None,
        "errors_total": w.errors_total if w else None,
        "p50_ms": w.latency_ms("p50") if w else None,
        "p99_ms": w.latency_ms("p99") if w else None,
        "p99_9_ms": w.latency_ms("p99_9") if w else None,
        "max_ms": w.latency_ms("max") if w else None,
        "memory": result.memory,
        "cpu_s": result.cpu_s,
        "error": result.error,
    }


# -- SSE ---------------------------------------------------------------------------


def start_sse_backend(bench: Any) -> None:
    argv = [
        PYTHON, "-m", "bench.sse_backend", "--bind", f"0.0.0.0:{SSE_PORT}", "--workers", "2",
        "--backlog", "4096",
    ]  # fmt: skip
    bench.running["sse"] = bench.bed.spawn(bench.bed.server_ns, "sse-backend", argv)
    deadline = time.monotonic() + 30
    while True:
        code = bench.bed.sh(
            bench.bed.server_ns, "curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}",
            f"http://127.0.0.1:{SSE_PORT}/", check=False,
        )  # fmt: skip
        if code.strip() == "200":
            return
        if time.monotonic() > deadline or bench.running["sse"].popen.poll() is not None:
            raise RuntimeError("the SSE backend did not start")
        time.sleep(0.2)


def restart_in_front_of(
    bench: Any, keys: list[str], backend_port: int, env_extra: dict[str, str] | None = None
) -> None:
    """Restart the proxies `keys` (fresh processes) in front of `backend_port`."""
    proxies = [k for k in keys if k != "direct"]
    for key in proxies:
        bench.stop(key)
    for key in proxies:
        bench.start(key, backend_port=backend_port, env_extra=env_extra)
    bench.wait_ready(proxies)


def sse_url(key: str, bench: Any, interval_ms: int) -> str:
    port = SSE_PORT if key == "direct" else bench.port(key)
    return f"http://{SERVER_IP}:{port}/sse?interval_ms={interval_ms}"


def sse_streams(
    bench: Any, key: str, streams: int, seconds: float, interval_ms: int
) -> dict[str, Any]:
    """One SSE row: `streams` concurrent streams through `key` for `seconds` each.

    The client runs in the client namespace, across the veth pair; "direct"
    means the SSE backend itself.
    """
    group = bench.pgid("sse" if key == "direct" else key)
    argv = bench.bed.ns_argv(bench.bed.client_ns, [
        PYTHON, "-m", "bench.sse_client", "streams", "--url", sse_url(key, bench, interval_ms),
        "--streams", str(streams), "--duration", f"{seconds:g}", "--interval-ms",
        str(interval_ms), "--timeout", "10",
    ])  # fmt: skip
    cpu_before = group_cpu_seconds(group)
    started = time.monotonic()
    with PeakMemory(group) as memory:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 90, check=False, cwd=REPO,
        )  # fmt: skip
    elapsed = time.monotonic() - started
    row: dict[str, Any] = {
        "contender": key,
        "streams": streams,
        "seconds": seconds,
        "interval_ms": interval_ms,
        "memory": memory.result(),
        "cpu_pct": round((group_cpu_seconds(group) - cpu_before) / elapsed * 100, 1),
    }
    found = re.search(r"^SSE_JSON (.*)$", done.stdout, re.MULTILINE)
    if found:
        row["client"] = json.loads(found.group(1))
    else:
        row["error"] = (done.stdout + done.stderr)[-800:]
    bench.wait_quiet(SSE_PORT if key == "direct" else bench.port(key), 3)
    return row


def sse_soak(bench: Any, key: str, p: Plan) -> dict[str, Any]:
    """Open `p.soak_streams` streams through `key`, hold, close; `p.soak_cycles` times.

    Memory (RSS and PSS summed over the contender's processes, and per process)
    is read at the start, once every stream has its first event (+1 s), at the
    end of the hold, and `p.soak_settle_s` after closing.
    """
    group = bench.pgid(key)
    backend = bench.pgid("sse")

    def sample() -> dict[str, Any]:
        fp = group_memory(group, pss=True)
        be = group_memory(backend)
        return {
            "rss_mib": round(fp["rss"] / MIB, 1),
            "pss_mib": round(fp["pss"] / MIB, 1),
            "per_process_rss_mib": [round(x / MIB, 1) for x in fp["per_process"]],
            "backend_rss_mib": round(be["rss"] / MIB, 1),
        }

    argv = bench.bed.ns_argv(bench.bed.client_ns, [
        PYTHON, "-m", "bench.sse_client", "soak", "--url",
        sse_url(key, bench, p.soak_interval_ms), "--streams", str(p.soak_streams),
        "--cycles", str(p.soak_cycles), "--hold", f"{p.soak_hold_s:g}", "--timeout", "30",
        "--ramp-per-s", "2000",
    ])  # fmt: skip
    out: dict[str, Any] = {
        "contender": key,
        "streams": p.soak_streams,
        "cycles": p.soak_cycles,
        "hold_s": p.soak_hold_s,
        "settle_s": p.soak_settle_s,
        "interval_ms": p.soak_interval_ms,
        "baseline": {**sample(), "netstat": listen_counters(bench)},
        "samples": [],
    }
    client = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, cwd=REPO,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    queues = AcceptQueues(bench)
    queues.start()
    try:
        for line in client.stdout:
            if line.startswith("SSE_JSON "):
                out["client"] = json.loads(line[len("SSE_JSON ") :])
                continue
            if not line.startswith("PHASE "):
                continue
            info = json.loads(line[len("PHASE ") :])
            if info["phase"] == "opened":
                time.sleep(1.0)
            elif info["phase"] == "closed":
                time.sleep(p.soak_settle_s)
            info["memory"] = sample()
            info["established"] = bench.established(bench.port(key))
            info["upstream_established"] = upstream_connections(bench)
            info["netstat"] = listen_counters(bench)
            info["accept_queue_max"] = queues.take()
            out["samples"].append(info)
            print(f"    sse soak {key}: {json.dumps(info)}", flush=True)
            client.stdin.write("go\n")
            client.stdin.flush()
        client.wait(60)
    finally:
        queues.stop()
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
    if client.returncode:
        out["error"] = (client.stderr.read() if client.stderr else "")[-800:]
    out.update(soak_verdict(out).to_json())
    return out


class AcceptQueues(threading.Thread):
    """The longest accept queue (ss Recv-Q) of each listener of the server namespace.

    Polled every 0.1 s; ``take()`` returns the maxima since the last call, by port
    ("port/backlog": queue), so an overflow can be put on fileproxy or the backend.
    """

    def __init__(self, bench: Any) -> None:
        super().__init__(daemon=True)
        self.bench = bench
        self.maxima: dict[str, int] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            text = self.bench.bed.sh(self.bench.bed.server_ns, "ss", "-Hltn", check=False)
            for line in text.splitlines():
                fields = line.split()
                if len(fields) < 4 or not fields[1].isdigit():
                    continue
                name = f"{fields[3].rsplit(':', 1)[-1]}/{fields[2]}"
                with self.lock:
                    self.maxima[name] = max(self.maxima.get(name, 0), int(fields[1]))

    def take(self) -> dict[str, int]:
        with self.lock:
            out, self.maxima = self.maxima, {}
        return {k: v for k, v in sorted(out.items()) if v}

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def upstream_connections(bench: Any) -> int:
    """TCP connections to the SSE backend in the server namespace, by state (proxy side)."""
    text = bench.bed.sh(
        bench.bed.server_ns, "ss", "-Htn", "state", "established", f"( dport = :{SSE_PORT} )",
        check=False,
    )  # fmt: skip
    return len([line for line in text.splitlines() if line.strip()])


def listen_counters(bench: Any) -> dict[str, int]:
    """The server namespace's accept-queue overflows and drops (/proc/net/netstat)."""
    text = bench.bed.sh(bench.bed.server_ns, "cat", "/proc/net/netstat", check=False)
    lines = text.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            for name in (
                "ListenOverflows",
                "ListenDrops",
                "TCPReqQFullDrop",
                "TCPTimeWaitOverflow",
            ):
                if name in table:
                    out[name] = int(table[name])
    return out


def soak_verdict(out: dict[str, Any]) -> SoakVerdict:
    """RSS per stream per cycle, and RSS after close across cycles."""
    base = out["baseline"]["rss_mib"]
    before = base  # RSS just before the cycle opened its streams
    per_cycle = []
    for cycle in range(1, out["cycles"] + 1):
        got = {s["phase"]: s for s in out["samples"] if s.get("cycle") == cycle}
        if "opened" not in got:
            continue
        ok = got["opened"]["ok"]
        opened = got["opened"]["memory"]["rss_mib"]
        closed = got.get("closed", {}).get("memory", {}).get("rss_mib")
        per_cycle.append(
            SoakCycle(
                cycle=cycle,
                ok=ok,
                errors=got["opened"].get("errors"),
                open_s=got["opened"].get("open_s"),
                rss_opened_mib=opened,
                pss_opened_mib=got["opened"]["memory"]["pss_mib"],
                rss_held_mib=got.get("held", {}).get("memory", {}).get("rss_mib"),
                rss_closed_mib=closed,
                kib_per_stream=round((opened - base) * 1024 / ok, 1) if ok else None,
                kib_per_stream_cycle=round((opened - before) * 1024 / ok, 1) if ok else None,
                kib_per_stream_pss=round(
                    (got["opened"]["memory"]["pss_mib"] - out["baseline"]["pss_mib"]) * 1024 / ok,
                    1,
                )
                if ok
                else None,
            )
        )
        if closed is not None:
            before = closed
    closed = [c.rss_closed_mib for c in per_cycle if c.rss_closed_mib is not None]
    return SoakVerdict(
        per_cycle=per_cycle,
        closed_rise_mib=round(closed[-1] - closed[0], 1) if len(closed) > 1 else None,
        closed_steps_mib=[round(b - a, 1) for a, b in itertools.pairwise(closed)],
    )


# -- the whole phase -----------------------------------------------------------------


def run_extras(
    bench: Any, scenario: Scenario, options: Any, contenders: list[str], backend_port: int
) -> dict[str, Any]:
    """Every selected extra workload, in the clean scenario; proxies restored after."""
    p = plan(options.full, options.scale, options.extra.get("soak_streams"))
    selected = [
        w for w in ("stair", "stair_rate", "soak", "sse", "sse_soak") if w in options.workloads
    ]
    out: dict[str, Any] = {"plan": p.__dict__, "selected": selected}
    proxies = [k for k in contenders if k != "direct"]

    def stamp(text: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)

    if {"stair", "stair_rate", "soak"} & set(selected):
        # fresh proxies: no pool or optimizer state from the table's rows
        restart_in_front_of(bench, proxies, backend_port)
        stairs: dict[str, Staircase] = {}
        out["stair"] = stairs
        soak_keys = [k for k in SOAK_CONTENDERS if k in contenders] if "soak" in selected else []
        stair_keys = contenders if {"stair", "stair_rate"} & set(selected) else soak_keys
        for key in stair_keys:
            stamp(f"staircase {key} ({p.stair_step_s} s steps)")
            result = staircase(bench, scenario, key, p.stair_step_s)
            stairs[key] = result
            for step in result.steps:
                print(f"    c={step.connections or 0:5d} {step.requests_per_s or 0:9.0f} req/s "
                      f"p99 {step.p99_ms} ms errors {step.errors} "
                      f"rss {step.peak_rss_mib} MiB {step.stop or ''}",
                      flush=True)  # fmt: skip
            stamp(f"  knee {result.knee}; stop: {result.stop}")
        if "stair_rate" in selected:
            out["stair_rate"] = {}
            for key in stair_keys:
                knee = stairs[key].knee
                if not knee:
                    continue
                restart_in_front_of(bench, [key], backend_port)
                stamp(f"paced staircase {key}: {RATE_STEPS} x {knee['requests_per_s']:.0f} req/s")
                r = rate_staircase(bench, scenario, key, knee["requests_per_s"], p.stair_step_s)
                out["stair_rate"][key] = r
                for st in r.steps:
                    print(f"    {st.fraction}x offered {st.offered_per_s or 0:9.0f} achieved "
                          f"{st.requests_per_s or 0:9.0f} p99 {st.p99_ms} ms errors "
                          f"{st.errors} {st.stop or ''}", flush=True)  # fmt: skip
        if soak_keys:
            out["soak"] = {}
            for key in soak_keys:
                knee = stairs[key].knee
                if not knee:
                    out["soak"][key] = {"error": "no knee"}
                    continue
                stamp(f"soak {key}: {p.soak_s} s at {SOAK_FRACTION:.0%} of the knee")
                out["soak"][key] = paced_soak(bench, scenario, key, knee, p.soak_s)
                s = out["soak"][key]
                stamp(f"  {s['requests_per_s']} req/s ({s['of_knee']} of knee), errors "
                      f"{s['errors_total']}, p99 {s['p99_ms']} ms, RSS {s['memory']}")  # fmt: skip
    if "sse" in selected or "sse_soak" in selected:
        start_sse_backend(bench)
        out["sse_backend"] = SSE_BACKEND
        try:
            if "sse" in selected:
                restart_in_front_of(bench, proxies, SSE_PORT)
                out["sse"] = []
                for streams in p.sse_streams:
                    for key in contenders:
                        stamp(f"sse {key}: {streams} streams, {p.sse_s:g} s")
                        row = sse_streams(bench, key, streams, p.sse_s, p.sse_interval_ms)
                        out["sse"].append(row)
                        c = row.get("client", {})
                        stamp(f"  ok {c.get('ok')}/{streams}, errors {c.get('errors')}, ttfe "
                              f"{c.get('ttfe_ms')}, {c.get('events_per_s')} ev/s "
                              f"({c.get('delivered_fraction')}), delay {c.get('delay_ms')}, "
                              f"rss {row['memory']}, cpu {row['cpu_pct']}%")  # fmt: skip
            if "sse_soak" in selected and "fp_on" in contenders:
                # the pools must hold every stream: fileproxy's defaults (200 / 50 per
                # host per worker) would queue all but 100 of them
                limit = str(p.soak_streams + 100)
                env = {"HTTP_CONNECTOR_LIMIT": limit, "HTTP_CONNECTOR_LIMIT_PER_HOST": "0"}
                restart_in_front_of(bench, ["fp_on"], SSE_PORT, env)
                stamp(f"sse soak fp_on: {p.soak_streams} streams x {p.soak_cycles} cycles")
                soak = sse_soak(bench, "fp_on", p)
                soak["env"] = env
                out["sse_soak"] = soak
                stamp(f"  per cycle {soak['per_cycle']}; closed rise "
                      f"{soak['closed_rise_mib']} MiB")  # fmt: skip
        finally:
            bench.stop("sse")
    # back in front of the static backend for the next scenarios
    restart_in_front_of(bench, proxies, backend_port)
    return out
