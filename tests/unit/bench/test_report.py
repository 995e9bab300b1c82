"""bench/'s pure parts: the staircase's stop conditions, a row from its runs, the SSE
soak's verdict, and the report rendered from a small fixed set of records.

No wrk, nginx, network or root: records built here, and one stored run of
bench/results/ rendered again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.extras import STAIR_P99_MS, judge, soak_verdict
from bench.netem import SCENARIOS
from bench.records import (
    ManyRun,
    ManyWorkload,
    RangeCheck,
    RateStaircase,
    Report,
    RunResult,
    ScenarioResult,
    Staircase,
    StairStep,
    WorkloadResult,
    WrkStats,
)
from bench.report import (
    NOTES,
    aggregate,
    aggregate_many,
    many_markdown,
    markdown,
    nearest_rank,
    report_json,
    rerender,
)

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"


def wrk(rps: float, bps: float, p99_ms: float, duration_s: float = 5.0, **errors: int) -> WrkStats:
    kinds = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0, **errors}
    lat = {"p50": p99_ms * 500, "p90": p99_ms * 800, "p99": p99_ms * 1000, "p99_9": p99_ms * 1500}
    return WrkStats(
        requests=round(rps * duration_s),
        duration_s=duration_s,
        requests_per_s=rps,
        bytes=round(bps * duration_s),
        bytes_per_s=bps,
        latency_us=lat,
        errors=kinds,
        errors_total=sum(kinds.values()),
    )


def run(key: str, w: WrkStats | None, peak_mib: float = 50.0, **kw: object) -> RunResult:
    return RunResult(
        contender=key,
        scenario="poor",
        workload="file",
        connections=4,
        elapsed_s=5.1,
        loadavg_1m_before=1.5,
        cpu_s={"contender": 1.0, "other": 0.5},
        memory={"start_mib": 40.0, "peak_mib": peak_mib, "end_mib": 45.0},
        wrk=w,
        error=None if w else "wrk: connection refused",
        **kw,  # type: ignore[arg-type]
    )


# -- judge: the staircase's stop conditions ------------------------------------------


def step(rps: float, p99_ms: float | None = 10.0, error_rate: float = 0.0, rss: float = 60.0):
    return StairStep(
        connections=64, peak_rss_mib=rss, requests_per_s=rps, error_rate=error_rate, p99_ms=p99_ms
    )


def test_judge_no_stop_on_a_good_step():
    assert judge(step(1000), start_rss=50.0, best=None, below=0) == ([], 0)


def test_judge_each_stop_condition():
    reasons, _ = judge(step(1000, error_rate=0.06), 50.0, None, 0)
    assert reasons == ["error rate 6.0% > 5%"]
    reasons, _ = judge(step(1000, p99_ms=STAIR_P99_MS + 1), 50.0, None, 0)
    assert reasons == ["p99 251 ms > 250 ms"]
    reasons, _ = judge(step(1000, p99_ms=None), 50.0, None, 0)  # no response completed
    assert reasons == ["p99 - ms > 250 ms"]
    reasons, _ = judge(step(1000, rss=307.0), 50.0, None, 0)
    assert reasons == ["RSS 307 MiB > start 50 + 256"]
    assert judge(step(1000, rss=306.0), 50.0, None, 0).reasons == []


def test_judge_throughput_drop_needs_two_steps_in_a_row():
    best = step(1000)
    first = judge(step(899), 50.0, best, below=0)
    assert first == ([], 1)
    second = judge(step(850), 50.0, best, below=first.below)
    assert second == (["throughput < 0.9x the best for 2 steps"], 2)
    # a step back at >= 0.9x the best resets the count
    assert judge(step(900), 50.0, best, below=1) == ([], 0)


# -- aggregate: one contender's runs -> its row ----------------------------------------


def test_aggregate_means_spread_latency_cpu_memory():
    runs = [
        run("fp_on", wrk(100, 0.5e6, 20.0), peak_mib=50),
        run("fp_on", wrk(300, 0.75e6, 40.0), peak_mib=70),
    ]
    row = aggregate(runs, SCENARIOS["poor"], "file", probe_mbit=None)
    assert (row.runs, row.failed_runs, row.requests) == (2, 0, 2000)
    assert row.requests_per_s == 200
    assert row.bytes_per_s == 0.625e6
    assert row.spread == 1.0  # (300 - 100) / 200
    assert (row.p50_ms, row.p99_ms, row.p99_9_ms) == (15.0, 30.0, 45.0)
    # goodput 5 Mbit/s on the poor link's 10 Mbit/s
    assert row.utilisation == 0.5
    assert row.link_bound is False
    assert row.cpu_pct == {"contender": 20.0, "other": 10.0}  # 2 s / 10 s of wrk time
    assert row.peak_rss_mib == 70
    assert row.errors_total == 0 and row.range_good is None and row.health == []


def test_aggregate_link_bound_by_the_rate_probe():
    runs = [run("direct", wrk(10, 0.625e6, 5.0))]
    # 5 Mbit/s is 0.5x nominal but >= 0.85x a probe of 5.5 Mbit/s
    assert aggregate(runs, SCENARIOS["poor"], "file", probe_mbit=5.5).link_bound is True
    assert aggregate(runs, SCENARIOS["poor"], "file", probe_mbit=6.0).link_bound is False
    # the normal link's 1 KiB row is CPU-bound: no util, no LB (and none in the JSON)
    row = aggregate(runs, SCENARIOS["normal"], "small", probe_mbit=900.0)
    assert row.utilisation is None and row.link_bound is None
    assert "utilisation" not in row.to_json() and "link_bound" not in row.to_json()
    # an unshaped link has no rate to judge against
    assert aggregate(runs, SCENARIOS["clean"], "file", probe_mbit=None).utilisation is None


def test_aggregate_failed_run_errors_ranges_and_health():
    ok = run(
        "fp_on",
        wrk(200, 1e6, 10.0, timeout=3, status=1),
        range=RangeCheck(good=990, not_206=2, bad_length=0, bad_range=1),
        health={"count": 200, "ok": 200, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0},
    )
    failed = run("fp_on", None)
    row = aggregate([ok, failed], SCENARIOS["poor"], "range", probe_mbit=None)
    assert (row.runs, row.failed_runs, row.requests) == (2, 1, 1000)
    assert row.spread is None  # one successful run
    assert row.errors == {
        "connect": 0, "read": 0, "write": 0, "timeout": 3, "status": 1,
        "not_206": 2, "bad_range": 1, "bad_length": 0,
    }  # fmt: skip
    assert row.errors_total == 7
    assert row.range_good == 990
    assert row.health == [ok.health]


def test_aggregate_without_a_completed_run():
    row = aggregate([run("before", None)], SCENARIOS["very_poor"], "file", probe_mbit=None)
    assert row.requests_per_s is None and row.p99_ms is None and row.utilisation is None
    assert row.failed_runs == 1
    assert row.cpu_pct == {"contender": 100.0, "other": 50.0}  # over 1 s when no wrk time


# -- the SSE soak's verdict ------------------------------------------------------------


def test_soak_verdict_rss_per_stream_and_after_close():
    def sample(cycle: int, phase: str, rss: float, pss: float = 0.0, **kw: object) -> dict:
        return {"cycle": cycle, "phase": phase, "memory": {"rss_mib": rss, "pss_mib": pss}, **kw}

    out = {
        "cycles": 3,
        "baseline": {"rss_mib": 100.0, "pss_mib": 60.0},
        "samples": [
            sample(1, "opened", 120.0, 70.0, ok=1024, errors=0, open_s=0.6),
            sample(1, "held", 121.0),
            sample(1, "closed", 110.0),
            sample(2, "opened", 125.0, 72.0, ok=1024, errors=0, open_s=0.5),
            sample(2, "closed", 111.0),
            sample(3, "opened", 126.0, 73.0, ok=0, errors=1024, open_s=9.0),
            sample(3, "closed", 113.5),
        ],
    }
    verdict = soak_verdict(out)
    first, second, third = verdict.per_cycle
    assert first.kib_per_stream == 20.0  # (120 - 100) MiB over 1,024 streams
    assert first.kib_per_stream_cycle == 20.0
    assert first.kib_per_stream_pss == 10.0
    assert (first.rss_held_mib, second.rss_held_mib) == (121.0, None)
    assert second.kib_per_stream == 25.0
    assert second.kib_per_stream_cycle == 15.0  # over the 110 MiB left after cycle 1
    assert third.kib_per_stream is None and third.errors == 1024  # no stream opened
    assert verdict.closed_steps_mib == [1.0, 2.5]
    assert verdict.closed_rise_mib == 3.5


# -- rendering ------------------------------------------------------------------------

ENVIRONMENT = {
    "date": "2026-12-24 10:00 UTC", "kernel": "6.1.0", "os": "Debian 12", "cpu": "Test CPU",
    "cores": 2, "memory_gib": 7.8, "python": "3.11.2", "aiohttp": "3.14.5",
    "gunicorn": "23.0.0", "uvloop": "0.21.0", "nginx": "1.22.1", "wrk": "4.2.0",
    "congestion_control": "cubic", "method": "netem", "method_detail": "tc netem on both veth ends",
}  # fmt: skip


def small_report() -> Report:
    scenario = SCENARIOS["normal"]
    figures = {  # req/s, p99 ms
        "direct": (20000.0, 5.0),
        "nginx": (10000.0, 10.0),
        "before": (2500.0, 40.0),
        "fp_on": (5000.0, 20.0),
    }
    runs = {
        k: [run(k, wrk(rps, rps * 1024, p99)) for _ in range(2)]
        for k, (rps, p99) in figures.items()
    }
    rows = {k: aggregate(r, scenario, "small", probe_mbit=800.0) for k, r in runs.items()}
    workload = WorkloadResult("small", "1 KiB", "/1k.bin", 1000, 5, rows, runs)
    scen = ScenarioResult(
        name="normal",
        title="normal",
        describe=scenario.describe(),
        config={},
        verification={},
        workloads=[workload],
        fileproxy_stats={"fp_on": {"error": "connection refused"}},
    )
    return Report(
        full=False,
        notes=NOTES,
        scenarios=[scen],
        environment=ENVIRONMENT,
        byte_exact_1mib={k: True for k in figures},
        run_time_s=90.0,
        command="python -m bench.run --scenarios normal --workloads small",
    )


def test_markdown_of_a_small_report():
    text = markdown(small_report())
    lines = text.splitlines()
    assert lines[0] == "# fileproxy benchmark, 2026-12-24 10:00 UTC"
    assert "- command: `python -m bench.run --scenarios normal --workloads small`" in lines
    assert "- machine load (1-min load average before each run): 1.5 to 1.5; " in text
    assert "- run time 1.5 min" in lines
    assert "## normal: RTT 10 ms, 1000 Mbit/s, 0% loss each way" in lines
    header = lines.index(
        "| workload | conns | contender | throughput | p50 ms | p99 ms | p99.9 ms | errors "
        "| util | thr vs before | thr vs nginx | p99 vs before | p99 vs nginx "
        "| CPU % contender / delayer / other | peak RSS MiB |"
    )
    assert lines[header + 1] == "|" + "---|" * 15
    assert lines[header + 2 : header + 6] == [
        "| 1 KiB | 1000 | direct (nginx static) | 20,000 req/s | 2.5 | 5.0 | 7.5 | 0 | - "
        "| 8.00x | 2.00x | 0.12x | 0.50x | - / - / 10 | 50.0 |",
        "| 1 KiB | 1000 | nginx proxy_pass | 10,000 req/s | 5.0 | 10.0 | 15.0 | 0 | - "
        "| 4.00x | 1.00x | 0.25x | 1.00x | 20 / - / 10 | 50.0 |",
        '| 1 KiB | 1000 | seed "before" | 2,500 req/s | 20.0 | 40.0 | 60.0 | 0 | - '
        "| 1.00x | 0.25x | 1.00x | 4.00x | 20 / - / 10 | 50.0 |",
        "| 1 KiB | 1000 | fileproxy, optimizer on | 5,000 req/s | 10.0 | 20.0 | 30.0 | 0 | - "
        "| 2.00x | 0.50x | 0.50x | 2.00x | 20 / - / 10 | 50.0 |",
    ]
    assert "- `/stats` of fileproxy, optimizer on: unavailable (connection refused)" in lines
    assert text.endswith("\n".join(NOTES) + "\n")


def test_report_json_round_trip_and_rerender(tmp_path):
    report = small_report()
    stored = json.loads(report_json(report))
    assert Report.from_json(stored).to_json() == stored
    assert list(stored) == ["full", "scenarios", "notes", "environment", "byte_exact_1mib",
                            "run_time_s", "command"]  # fmt: skip
    run_json = stored["scenarios"][0]["workloads"][0]["runs"]["fp_on"][0]
    assert "range" not in run_json and "error" not in run_json and "health" not in run_json
    # --render: the rows recomputed from the stored runs, the same markdown
    path = tmp_path / "run.json"
    path.write_text(json.dumps(stored))
    rerender(path, with_chart=False)
    assert (tmp_path / "run.md").read_text() == markdown(report)
    assert json.loads((tmp_path / "run.json").read_text()) == stored


def test_staircase_records_round_trip():
    stair = {
        "contender": "fp_on", "step_s": 1, "start_rss_mib": 80.0,
        "steps": [
            {"connections": 16, "cpu_s": {"contender": 0.9}, "peak_rss_mib": 81.0,
             "requests_per_s": 7000.0, "requests": 7000, "errors": 0, "errors_by_kind": {},
             "error_rate": 0.0, "p50_ms": 2.0, "p99_ms": None},
            {"connections": 32, "cpu_s": {"contender": 0.1}, "peak_rss_mib": 82.0,
             "error": "wrk: boom"},
        ],
        "knee": {"connections": 16, "requests_per_s": 7000.0, "p99_ms": None},
        "stopped_at": 32, "stop": "wrk failed",
    }  # fmt: skip
    assert Staircase.from_json(stair).to_json() == stair
    assert list(Staircase.from_json(stair).to_json()["steps"][0]) == list(stair["steps"][0])
    rate = {
        "contender": "fp_on", "connections": 32, "step_s": 1, "knee_requests_per_s": 7000.0,
        "steps": [{"fraction": 0.25, "offered_per_s": 1750.0, "mean_think_ms": 18.286,
                   "peak_rss_mib": 81.0, "requests_per_s": 1700.0, "errors": 0,
                   "error_rate": 0.0, "p50_ms": 1.0, "p99_ms": 3.0, "stop": "x"}],
        "best": None, "stop": "x",
    }  # fmt: skip
    assert RateStaircase.from_json(rate).to_json() == rate
    assert list(RateStaircase.from_json(rate).to_json()["steps"][0]) == list(rate["steps"][0])


@pytest.mark.parametrize(
    "stem", ["2026-12-02-0314", "2026-12-02-0323", "2026-12-04-1607", "2026-12-04-1618"]
)
def test_stored_run_renders_as_committed(tmp_path, stem):
    """--render of a stored run (table, staircase, SSE, SSE soak, many) gives its committed .md."""
    path = tmp_path / f"{stem}.json"
    path.write_text((RESULTS / f"{stem}.json").read_text())
    rerender(path, with_chart=False)
    # a run written with its chart links it at the end (not drawn here)
    committed = (
        (RESULTS / f"{stem}.md").read_text().replace(f"\n![benchmark chart]({stem}.png)\n", "")
    )
    assert (tmp_path / f"{stem}.md").read_text() == committed


# -- the many workload --------------------------------------------------------------------


def many_run(key: str, clients: list[list[object]], samples: list[list[float]] | None,
             started: int | None = None, error: str | None = None) -> ManyRun:  # fmt: skip
    return ManyRun(
        contender=key,
        scenario="poor",
        started=len(clients) if started is None else started,
        size=1 << 20,
        rcvbuf=32768,
        wall_s=100.0,
        loadavg_1m_before=1.2,
        cpu_s={"backend" if key == "direct" else "contender": 20.0, "machine": 90.0},
        clients=clients,  # type: ignore[arg-type]
        upstream=None if samples is None else {"baseline": 2, "samples": samples},
        error=error,
    )


def test_nearest_rank():
    assert nearest_rank([], 50) is None
    assert nearest_rank([3.0, 1.0, 2.0], 50) == 2.0
    assert nearest_rank([float(x) for x in range(1, 101)], 99) == 99.0
    assert nearest_rank([5.0], 99) == 5.0


def test_aggregate_many_completion_errors_ttfb_upstream():
    ok = ["ok", 200, 0.5, 90.0, 1 << 20]
    clients = [
        ok, ok, ok,
        ["status_504", 504, 15.2, 15.3, 160],
        ["short_body", 200, 0.4, 45.0, 700_000],
        ["reset", 0, None, None, 0],
    ]  # fmt: skip
    samples = [[0.0, 2, 0], [0.2, 60, 58], [0.4, 60, 60], [0.6, 40, 10]]
    row = aggregate_many([many_run("before", clients, samples, started=7)])
    assert (row.runs, row.started, row.completed) == (1, 7, 3)
    # by kind, sorted; the client the process never reported on counts as no_result
    assert row.errors == {"no_result": 1, "reset": 1, "short_body": 1, "status_504": 1}
    assert list(row.errors) == sorted(row.errors)
    assert row.ratio == pytest.approx(3 / 7)
    # TTFB over every client that got a first byte (also failed ones), done over completed
    assert row.ttfb_p50_s == 0.5 and row.ttfb_p99_s == 15.2
    assert row.done_p50_s == 90.0
    assert (row.upstream_baseline, row.upstream_max, row.busy_max) == (2, 60, 60)
    assert row.busy_mean == pytest.approx(32.0)
    assert row.cpu_pct == pytest.approx(20.0)
    # direct has no upstream: no upstream figures
    direct = aggregate_many([many_run("direct", [ok, ok], None)])
    assert (direct.completed, direct.errors, direct.upstream_max, direct.busy_max) == (
        2, {}, None, None,
    )  # fmt: skip
    assert direct.cpu_pct == pytest.approx(20.0)


def many_workload() -> ManyWorkload:
    ok = ["ok", 200, 0.5, 90.0, 1 << 20]
    runs = {
        "direct": [many_run("direct", [ok, ok], None)],
        "nginx": [many_run("nginx", [ok, ok], [[0.1, 2, 0], [0.3, 4, 1]])],
        "fp_off": [many_run("fp_off", [ok, ["status_504", 504, 15.0, 15.1, 100]], [[0.1, 3, 2]])],
        "fp_on": [many_run("fp_on", [], [], started=2, error="Traceback: boom")],
    }
    return ManyWorkload(
        clients=2, size=768 * 1024, rcvbuf=32768, order=list(runs), runs=runs,
        rows={k: aggregate_many(v) for k, v in runs.items()}, note="Sizing: small.",
    )  # fmt: skip


def test_many_markdown_rows():
    lines = many_markdown("poor", many_workload())
    assert lines[0] == "### poor: 2 concurrent downloads of 768 KiB (`many`)"
    assert "One run per contender, in the order direct nginx fp_off fp_on." in lines[2]
    assert "Sizing: small." in lines
    header = lines.index(
        "| contender | completed | errors | TTFB p50 / p99 s | done p50 s | wall s "
        "| upstream held max (before) | busy max / mean | CPU % |"
    )
    assert lines[header + 2 : header + 6] == [
        "| direct (nginx static) | 2/2 (100%) | 0 | 0.50 / 0.50 | 90.0 | 100.0 | - | - | 20 |",
        "| nginx proxy_pass | 2/2 (100%) | 0 | 0.50 / 0.50 | 90.0 | 100.0 | 4 (2) | 1 / 0.5 | 20 |",
        "| fileproxy, optimizer off | 1/2 (50%) | status_504 1 | 0.50 / 15.00 | 90.0 | 100.0 "
        "| 3 (2) | 2 / 2.0 | 20 |",
        "| fileproxy, optimizer on | 0/2 (0%) | no_result 2; client process: 'Traceback: boom' "
        "| - / - | - | 100.0 | 0 (2) | 0 / - | 20 |",
    ]
    assert lines[-1] == ""
    assert (
        lines[0].replace("768 KiB", "1 MiB")
        == many_markdown("poor", ManyWorkload(2, 1 << 20, 32768, [], {}, {}))[0]
    )


def test_many_in_the_report_round_trip_and_rerender(tmp_path):
    report = small_report()
    report.scenarios[0].many = many_workload()
    text = markdown(report)
    assert "### normal: 2 concurrent downloads of 768 KiB (`many`)" in text
    # the many section follows the scenario's table and bullets, before the notes
    assert text.index("`/stats` of fileproxy") < text.index("(`many`)") < text.index(NOTES[0])
    stored = json.loads(report_json(report))
    assert list(stored["scenarios"][0])[-1] == "many"
    assert Report.from_json(stored).to_json() == stored
    path = tmp_path / "run.json"
    path.write_text(json.dumps(stored))
    rerender(path, with_chart=False)
    assert (tmp_path / "run.md").read_text() == text
    # a scenario without the many workload keeps the JSON it always had
    assert "many" not in json.loads(report_json(small_report()))["scenarios"][0]
