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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.netem import SERVER_IP, Scenario
from bench.procs import PeakMemory, group_cpu_seconds, group_memory

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SSE_PORT = 8090
MIB = 1 << 20

STAIR_STEPS = (16, 32, 64, 128, 256, 512, 1024, 2048)
STAIR_ERROR_RATE = 0.05
STAIR_P99_MS = 250.0
STAIR_RSS_MIB = 256.0
STAIR_DROP = 0.9
SOAK_FRACTION = 0.8
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
        base = Plan(2, 60, (32, 256), 4.0, 100, 1000, 2, 5.0, 3.0, 5000)
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


def _p(w: dict[str, Any], key: str) -> float | None:
    lat = w.get("latency_us") or {}
    return lat[key] / 1000 if lat.get(key) is not None else None


# -- staircase ---------------------------------------------------------------------


def staircase(bench: Any, scenario: Scenario, key: str, step_s: int) -> dict[str, Any]:
    """Connections doubled step by step, 1 KiB, until a stop condition; the knee."""
    start_rss = group_memory(bench.pgid(key))["rss"] / MIB
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    below = 0
    stop = None
    for conns in STAIR_STEPS:
        result = bench.measure(scenario, bench.workload("small", "/1k.bin", conns, step_s), key,
                               False)  # fmt: skip
        w = result.get("wrk")
        step: dict[str, Any] = {
            "connections": conns,
            "cpu_s": result["cpu_s"],
            "peak_rss_mib": result["memory"]["peak_mib"],
        }
        steps.append(step)
        bench.wait_quiet(bench.port(key), 3)
        if not w:
            step["error"] = result.get("error", "")[-300:]
            stop = "wrk failed"
            break
        done = int(w["requests"])
        errors = int(w["errors_total"])
        step.update(
            requests_per_s=float(w["requests_per_s"]),
            requests=done,
            errors=errors,
            errors_by_kind=w["errors"],
            error_rate=errors / max(done + errors, 1),
            p50_ms=_p(w, "p50"),
            p99_ms=_p(w, "p99"),
        )
        reasons = []
        if step["error_rate"] > STAIR_ERROR_RATE:
            reasons.append(f"error rate {step['error_rate']:.1%} > {STAIR_ERROR_RATE:.0%}")
        if step["p99_ms"] is None or step["p99_ms"] > STAIR_P99_MS:
            reasons.append(f"p99 {step['p99_ms']} ms > {STAIR_P99_MS:g} ms")
        if step["peak_rss_mib"] > start_rss + STAIR_RSS_MIB:
            reasons.append(
                f"RSS {step['peak_rss_mib']:.0f} MiB > start {start_rss:.0f} + {STAIR_RSS_MIB:g}"
            )
        if best is not None and step["requests_per_s"] < STAIR_DROP * best["requests_per_s"]:
            below += 1
            if below >= 2:
                reasons.append(f"throughput < {STAIR_DROP}x the best for 2 steps")
        else:
            below = 0
        if reasons:
            stop = "; ".join(reasons)
            step["stop"] = stop
            break
        if best is None or step["requests_per_s"] > best["requests_per_s"]:
            best = step
    return {
        "contender": key,
        "step_s": step_s,
        "start_rss_mib": round(start_rss, 1),
        "steps": steps,
        "knee": None
        if best is None
        else {
            "connections": best["connections"],
            "requests_per_s": best["requests_per_s"],
            "p99_ms": best["p99_ms"],
        },
        "stopped_at": steps[-1]["connections"] if stop else None,
        "stop": stop or f"no stop condition up to {STAIR_STEPS[-1]} connections",
    }


def paced_soak(
    bench: Any, scenario: Scenario, key: str, knee: dict[str, Any], seconds: int
) -> dict[str, Any]:
    """Paced 1 KiB load at SOAK_FRACTION of the knee's throughput for `seconds`.

    wrk's delay() has 1 ms resolution, so the connection count is chosen for a
    mean think time of ~25 ms or more: C = max(64, target x 0.025).
    """
    target = SOAK_FRACTION * knee["requests_per_s"]
    conns = min(4096, max(64, math.ceil(target * 0.025)))
    mean_ms = max(1.0, conns * 1000 / target)
    workload = bench.workload("paced", "/1k.bin", conns, seconds, (f"{mean_ms:.3f}", "1"))
    with PeakMemory(bench.pgid(key), period=1.0) as memory:
        result = bench.measure(scenario, workload, key, False)
    w = result.get("wrk") or {}
    return {
        "contender": key,
        "seconds": seconds,
        "knee_requests_per_s": knee["requests_per_s"],
        "target_requests_per_s": round(target, 1),
        "connections": conns,
        "mean_think_ms": round(mean_ms, 3),
        "requests_per_s": w.get("requests_per_s"),
        "of_knee": round(w["requests_per_s"] / knee["requests_per_s"], 3) if w else None,
        "requests": w.get("requests"),
        "errors": w.get("errors"),
        "errors_total": w.get("errors_total"),
        "p50_ms": _p(w, "p50"),
        "p99_ms": _p(w, "p99"),
        "p99_9_ms": _p(w, "p99_9"),
        "max_ms": _p(w, "max"),
        "memory": memory.result(),
        "cpu_s": result["cpu_s"],
        "error": result.get("error"),
    }


# -- SSE ---------------------------------------------------------------------------


def start_sse_backend(bench: Any) -> None:
    argv = [
        PYTHON, "-m", "gunicorn", "bench.sse_backend:app",
        "-k", "aiohttp.GunicornUVLoopWebWorker", "-w", "2",
        "-b", f"0.0.0.0:{SSE_PORT}", "--backlog", "4096",
        "--graceful-timeout", "1", "--log-level", "warning", "--no-control-socket",
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


def sse_streams(bench: Any, key: str, streams: int, seconds: float, interval_ms: int) -> dict:
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
        "baseline": sample(),
        "samples": [],
    }
    client = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, cwd=REPO,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
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
            out["samples"].append(info)
            print(f"    sse soak {key}: {json.dumps(info)}", flush=True)
            client.stdin.write("go\n")
            client.stdin.flush()
        client.wait(60)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(10)
    if client.returncode:
        out["error"] = (client.stderr.read() if client.stderr else "")[-800:]
    out.update(soak_verdict(out))
    return out


def soak_verdict(out: dict[str, Any]) -> dict[str, Any]:
    """RSS per stream per cycle, and RSS after close across cycles."""
    base = out["baseline"]["rss_mib"]
    per_cycle = []
    for cycle in range(1, out["cycles"] + 1):
        got = {s["phase"]: s for s in out["samples"] if s.get("cycle") == cycle}
        if "opened" not in got:
            continue
        ok = got["opened"]["ok"]
        opened = got["opened"]["memory"]["rss_mib"]
        closed = got.get("closed", {}).get("memory", {}).get("rss_mib")
        per_cycle.append(
            {
                "cycle": cycle,
                "ok": ok,
                "errors": got["opened"].get("errors"),
                "open_s": got["opened"].get("open_s"),
                "rss_opened_mib": opened,
                "pss_opened_mib": got["opened"]["memory"]["pss_mib"],
                "rss_held_mib": got.get("held", {}).get("memory", {}).get("rss_mib"),
                "rss_closed_mib": closed,
                "kib_per_stream": round((opened - base) * 1024 / ok, 1) if ok else None,
                "kib_per_stream_pss": round(
                    (got["opened"]["memory"]["pss_mib"] - out["baseline"]["pss_mib"]) * 1024 / ok,
                    1,
                )
                if ok
                else None,
            }
        )
    closed = [c["rss_closed_mib"] for c in per_cycle if c["rss_closed_mib"] is not None]
    return {
        "per_cycle": per_cycle,
        "closed_rise_mib": round(closed[-1] - closed[0], 1) if len(closed) > 1 else None,
        "closed_steps_mib": [round(b - a, 1) for a, b in itertools.pairwise(closed)],
    }


# -- the whole phase -----------------------------------------------------------------


def run_extras(
    bench: Any, scenario: Scenario, options: Any, contenders: list[str], backend_port: int
) -> dict[str, Any]:
    """Every selected extra workload, in the clean scenario; proxies restored after."""
    p = plan(options.full, options.scale, options.extra.get("soak_streams"))
    selected = [w for w in ("stair", "soak", "sse", "sse_soak") if w in options.workloads]
    out: dict[str, Any] = {"plan": p.__dict__, "selected": selected}
    proxies = [k for k in contenders if k != "direct"]

    def stamp(text: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)

    if "stair" in selected or "soak" in selected:
        # fresh proxies: no pool or optimizer state from the table's rows
        restart_in_front_of(bench, proxies, backend_port)
        out["stair"] = {}
        soak_keys = [k for k in SOAK_CONTENDERS if k in contenders] if "soak" in selected else []
        stair_keys = contenders if "stair" in selected else soak_keys
        for key in stair_keys:
            stamp(f"staircase {key} ({p.stair_step_s} s steps)")
            result = staircase(bench, scenario, key, p.stair_step_s)
            out["stair"][key] = result
            for step in result["steps"]:
                print(f"    c={step['connections']:5d} {step.get('requests_per_s', 0):9.0f} req/s "
                      f"p99 {step.get('p99_ms')} ms errors {step.get('errors')} "
                      f"rss {step['peak_rss_mib']} MiB {step.get('stop', '')}",
                      flush=True)  # fmt: skip
            stamp(f"  knee {result['knee']}; stop: {result['stop']}")
        if soak_keys:
            out["soak"] = {}
            for key in soak_keys:
                knee = out["stair"][key]["knee"]
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
                result = sse_soak(bench, "fp_on", p)
                result["env"] = env
                out["sse_soak"] = result
                stamp(f"  per cycle {result['per_cycle']}; closed rise "
                      f"{result['closed_rise_mib']} MiB")  # fmt: skip
        finally:
            bench.stop("sse")
    # back in front of the static backend for the next scenarios
    restart_in_front_of(bench, proxies, backend_port)
    return out
