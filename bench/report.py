"""bench.run's report: the rows from the raw runs, the markdown, the JSON and the charts.

Pure except for the files it writes: ``aggregate`` turns one contender's runs
into its table row, ``markdown`` renders a whole ``Report`` (and
``extras_markdown`` the sections of bench/extras.py's workloads),
``write_report`` writes bench/results/<stamp>.md / .json / .png, and
``rerender`` rebuilds them from a stored .json
(``python -m bench.run --render X.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.extras import (
    PACED_SHORT,
    RATE_STEPS,
    SSE_BACKEND_BEFORE,
    STAIR_DROP,
    STAIR_ERROR_RATE,
    STAIR_P99_MS,
    STAIR_RSS_MIB,
    STAIR_STEPS,
    soak_verdict,
)
from bench.netem import SCENARIOS, Scenario
from bench.records import (
    CONTENDERS,
    FILEPROXY_KEYS,
    LABELS,
    LINK_BOUND,
    PROBE_BOUND,
    WORKERS,
    WRK_TIMEOUT_S,
    ManyRow,
    ManyRun,
    ManyWorkload,
    RangeCheck,
    RateStaircase,
    Report,
    Row,
    RunResult,
    Staircase,
    WrkStats,
    to_jsonable,
)

# -- the table ------------------------------------------------------------------------


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(
    runs: list[RunResult], scenario: Scenario, workload_key: str, probe_mbit: float | None
) -> Row:
    """Mean of one contender's runs (two: one per direction of the alternation).

    Link-bound: goodput >= LINK_BOUND x the nominal rate, or >= PROBE_BOUND x what the
    rate probe measured (on the 1 Gbit/s link the NFQUEUE delayer caps the
    emulated link below its nominal rate). Not judged for the normal link's 1 KiB
    row (CPU-bound there) nor on an unshaped link.
    """
    ok: list[WrkStats] = [r.wrk for r in runs if r.wrk is not None]
    lat = [w.latency_us for w in ok if w.latency_us]
    errors: dict[str, int] = {}
    for w in ok:
        for kind, count in w.errors.items():
            errors[kind] = errors.get(kind, 0) + int(count)
    ranges: list[RangeCheck] = [r.range for r in runs if r.range is not None]
    for check in ranges:
        # Range responses that were not 206, or whose Content-Range / length were wrong
        for kind in ("not_206", "bad_range", "bad_length"):
            errors[kind] = errors.get(kind, 0) + int(getattr(check, kind))
    rps = [float(w.requests_per_s) for w in ok]
    bps = [float(w.bytes_per_s) for w in ok]
    mean_rps = mean(rps)
    p_ms = {
        p: mean([x[p] / 1000 for x in lat]) if lat else None for p in ("p50", "p90", "p99", "p99_9")
    }
    utilisation = link_bound = None
    if (workload_key != "small" or scenario.name != "normal") and bps and scenario.rate_mbit:
        goodput_mbit = sum(bps) / len(bps) * 8 / 1e6
        utilisation = goodput_mbit / scenario.rate_mbit
        link_bound = utilisation >= LINK_BOUND or (
            probe_mbit is not None and goodput_mbit >= PROBE_BOUND * probe_mbit
        )
    cpu: dict[str, float] = {}
    for r in runs:
        for name, seconds in r.cpu_s.items():
            cpu[name] = cpu.get(name, 0.0) + seconds
    total_s = sum(w.duration_s for w in ok) or 1.0
    peaks = [r.memory["peak_mib"] for r in runs if r.memory is not None]
    return Row(
        runs=len(runs),
        failed_runs=len(runs) - len(ok),
        requests=sum(int(w.requests) for w in ok),
        requests_per_s=mean_rps,
        bytes_per_s=mean(bps),
        spread=(max(rps) - min(rps)) / mean_rps if len(rps) > 1 and mean_rps else None,
        errors=errors,
        errors_total=sum(errors.values()),
        p50_ms=p_ms["p50"],
        p90_ms=p_ms["p90"],
        p99_ms=p_ms["p99"],
        p99_9_ms=p_ms["p99_9"],
        utilisation=utilisation,
        link_bound=link_bound,
        cpu_pct={name: round(s / total_s * 100, 1) for name, s in cpu.items()},
        health=[r.health for r in runs if r.health is not None],
        peak_rss_mib=max(peaks) if peaks else None,
        range_good=sum(x.good for x in ranges) if ranges else None,
    )


def nearest_rank(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None without values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def aggregate_many(runs: list[ManyRun]) -> ManyRow:
    """One contender's ``many`` runs: completion, errors by kind, TTFB, upstream held.

    A client that printed nothing (its process failed) counts as started and not
    completed, under ``no_result``. Upstream figures: the most ESTABLISHED connections
    of the contender to the backend in any sample, the most of them busy (bytes waiting
    between the backend and the proxy), and that count's mean over every sample; None
    for direct.
    """
    started = sum(r.started for r in runs)
    completed = 0
    errors: dict[str, int] = {}
    ttfb: list[float] = []
    done: list[float] = []
    for r in runs:
        for kind, _status, first, last, _bytes in r.clients:
            if first is not None:
                ttfb.append(float(first))
            if kind == "ok":
                completed += 1
                if last is not None:
                    done.append(float(last))
            else:
                errors[kind] = errors.get(kind, 0) + 1
        missing = r.started - len(r.clients)
        if missing > 0:
            errors["no_result"] = errors.get("no_result", 0) + missing
    ups = [r.upstream for r in runs if r.upstream is not None]
    samples = [s for u in ups for s in u["samples"]]
    cpu = sum(r.cpu_s.get("contender", r.cpu_s.get("backend", 0.0)) for r in runs)
    wall = sum(r.wall_s for r in runs)

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    return ManyRow(
        runs=len(runs),
        started=started,
        completed=completed,
        errors=dict(sorted(errors.items())),
        ttfb_p50_s=rounded(nearest_rank(ttfb, 50), 3),
        ttfb_p99_s=rounded(nearest_rank(ttfb, 99), 3),
        done_p50_s=rounded(nearest_rank(done, 50), 1),
        wall_s=max((r.wall_s for r in runs), default=0.0),
        upstream_baseline=max(u["baseline"] for u in ups) if ups else None,
        upstream_max=max((int(s[1]) for s in samples), default=0) if ups else None,
        busy_max=max((int(s[2]) for s in samples), default=0) if ups else None,
        busy_mean=round(sum(s[2] for s in samples) / len(samples), 1) if samples else None,
        cpu_pct=round(cpu / wall * 100, 1) if wall else None,
    )


def many_markdown(scen_title: str, many: ManyWorkload) -> list[str]:
    """The ``many`` section of a scenario: one row per contender."""
    size = many.size / 1024
    size_text = f"{size / 1024:g} MiB" if size >= 1024 else f"{size:g} KiB"
    lines = [
        f"### {scen_title}: {many.clients} concurrent downloads of {size_text} (`many`)",
        "",
        f"bench/many_clients.py in the client namespace starts {many.clients} downloads at "
        f"once, each on its own connection with SO_RCVBUF {many.rcvbuf // 1024} KiB, the body "
        "read as it arrives, "
        + (
            "keep-alive requests (the client closes after the body)"
            if many.keep_alive
            else "requests with `Connection: close` (the server closes after the body)"
        )
        + "; all share the scenario's one shaped link (tbf on each veth end: no "
        "per-flow shaping here). One run per contender, in the order "
        f"{' '.join(many.order)}. completed = status 200 with every byte and the right "
        "SHA-256; timeout = not complete within each client's deadline"
        + (f" ({many.deadline_s:g} s)" if many.deadline_s else "")
        + ". TTFB = from before connect() to the first response byte. Upstream = the "
        "contender's ESTABLISHED connections to the backend (`ss -tnp`, its own processes "
        "only; every ~0.2 s): the most at once (and before the run; idle pooled ones count), and "
        "how many of them were busy, at most and on average: bytes waiting between the backend "
        "and the proxy (proxy-side Recv-Q or backend-side Send-Q > 0: the proxy did not read "
        "its upstream as fast as the backend sent, i.e. a client held it). A connection held "
        "while the rest of its body sits in the proxy's own read buffer counts as held, not "
        "busy. CPU = the contender's processes (direct: the backend), "
        "% of one core over the run.",
        "",
    ]
    if many.note:
        lines += [many.note, ""]
    lines += [
        "| contender | completed | errors | TTFB p50 / p99 s | done p50 s | wall s "
        "| upstream held max (before) | busy max / mean | CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in many.rows.items():
        errs = ", ".join(f"{k} {n}" for k, n in row.errors.items()) or "0"
        failed = [r.error for r in many.runs.get(key, []) if r.error]
        if failed:
            errs += f"; client process: {failed[0][-80:]!r}"
        held = "-" if row.upstream_max is None else f"{row.upstream_max} ({row.upstream_baseline})"
        busy = "-" if row.busy_max is None else f"{row.busy_max} / {fmt(row.busy_mean, 1)}"
        lines.append(
            f"| {LABELS.get(key, key)} | {row.completed}/{row.started} ({row.ratio:.0%}) "
            f"| {errs} | {fmt(row.ttfb_p50_s, 2)} / {fmt(row.ttfb_p99_s, 2)} "
            f"| {fmt(row.done_p50_s, 1)} | {fmt(row.wall_s, 1)} | {held} | {busy} "
            f"| {fmt(row.cpu_pct, 0)} |"
        )
    lines.append("")
    return lines


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def throughput(row: Row, workload_key: str) -> float | None:
    """req/s for the 1 KiB rows, bytes/s for the file rows."""
    value = row.requests_per_s if workload_key == "small" else row.bytes_per_s
    return float(value) if value is not None else None


def load_text(report: Report) -> str:
    loads = [
        r.loadavg_1m_before
        for scen in report.scenarios
        for wl in scen.workloads
        for runs in wl.runs.values()
        for r in runs
    ]
    loads += [
        r.loadavg_1m_before
        for scen in report.scenarios
        if scen.many is not None
        for runs in scen.many.runs.values()
        for r in runs
    ]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "unknown"


def markdown(report: Report) -> str:
    env = report.environment
    lines = [
        f"# fileproxy benchmark, {env['date']}",
        "",
        f"- command: `{report.command or 'not recorded'}`",
        f"- machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; "
        f"kernel {env['kernel']}; {env['os']}",
        f"- impairment: {env['method']} ({env['method_detail']})",
        f"- software: nginx {env['nginx']}, wrk {env['wrk']}, Python {env['python']}, "
        f"aiohttp {env['aiohttp']}, gunicorn {env['gunicorn']}, uvloop {env['uvloop']}; "
        f"TCP congestion control {env['congestion_control']}",
        f"- every proxy has {WORKERS} worker processes; backend nginx {WORKERS} workers, "
        "static files; wrk in the client namespace, `--timeout "
        f"{WRK_TIMEOUT_S}s`; order A B C D E E D C B A, mean of the 2 runs",
        f"- machine load (1-min load average before each run): {load_text(report)}; "
        "the CPU column shows how much of it was not ours",
        f"- run time {report.run_time_s / 60:.1f} min" + (" (BENCH_FULL=1)" if report.full else ""),
        "",
        "Throughput is req/s for 1 KiB rows and MB/s for file rows; ratios compare "
        'throughput and p99 with the seed\'s "before" proxy and with nginx proxy_pass, '
        "measured in the same run. p99 ratio < 1 is better. util = goodput (HTTP bytes "
        f"received) / nominal link rate; **LB** = link-bound (util >= {LINK_BOUND:.2f}, or "
        f"goodput >= {PROBE_BOUND:.2f}x the verified rate probe): the link, not the proxy, "
        "sets the "
        "throughput there. Range rows: MB/s of 206 bodies; not_206 / bad_range / bad_length in "
        "the errors column are responses wrk did not count as errors but bench/wrk_range.lua "
        "found wrong. Peak RSS = the contender's processes (direct: the backend nginx), RSS "
        "summed, the highest of samples every 0.25 s during its runs. CPU = % of one core "
        "during the "
        "contender's runs: its processes (direct: the backend nginx) / the NFQUEUE delayer / "
        "everything else on the machine (other users, kernel network work not charged to a "
        "process); this VM is shared, so a high 'other' marks a disturbed row.",
        "",
    ]
    for scen in report.scenarios:
        v = scen.verification
        lines.append(f"## {scen.title}: {scen.describe}")
        lines.append("")
        if v:
            ping, conn, rate, drops = v["ping"], v["tcp_connect"], v["rate_probe"], v["drops"]
            lines.append(
                f"Emulation measured: ping {ping.get('min_ms')}/{ping.get('avg_ms')}/"
                f"{ping.get('max_ms')} ms (min/avg/max), TCP connect median "
                f"{conn['median_ms']} ms (max {conn['max_ms']}), rate probe "
                f"{rate['goodput_mbit']} Mbit/s"
                + (f" = {rate['of_nominal']:.2f}x nominal" if rate.get("of_nominal") else "")
                + " (one download, slow start left out), drops "
                + ", ".join(
                    f"{side} {d['dropped']}/{d['arrived']} ({d['drop_pct']}%)"
                    for side, d in drops.items()
                )
                + "; checks: "
                + ", ".join(f"{k} {'ok' if ok else 'OFF'}" for k, ok in v["checks"].items())
                + "."
            )
            lines.append("")
        if scen.workloads:
            lines.append(
                "| workload | conns | contender | throughput | p50 ms | p99 ms | p99.9 ms "
                "| errors | util | thr vs before | thr vs nginx | p99 vs before | p99 vs nginx "
                "| CPU % contender / delayer / other | peak RSS MiB |"
            )
            lines.append("|" + "---|" * 15)
        else:
            lines.append("(no table workloads selected in this run)")
        for wl in scen.workloads:
            rows = wl.rows
            before, anchor = rows.get("before"), rows.get("nginx")
            for key, row in rows.items():
                thr = throughput(row, wl.key)
                thr_text = (
                    f"{fmt(thr)} req/s"
                    if wl.key == "small"
                    else f"{fmt(thr / 1e6 if thr is not None else None, 2)} MB/s"
                )
                util = row.utilisation
                util_text = "-" if util is None else f"{util:.2f}"
                if row.link_bound:
                    util_text += " **LB**"
                errs = row.errors_total
                err_text = (
                    "0"
                    if not errs
                    else f"{errs} ("
                    + ", ".join(f"{k} {n}" for k, n in row.errors.items() if n)
                    + ")"
                )
                if row.failed_runs:
                    err_text += f", {row.failed_runs} run(s) failed"
                pct = row.cpu_pct
                cpu = (
                    f"{fmt(pct.get('backend' if key == 'direct' else 'contender'))} / "
                    f"{fmt(pct.get('delayer'))} / {fmt(pct.get('other'))}"
                )
                lines.append(
                    f"| {wl.label} | {wl.connections} | {LABELS[key]} | {thr_text} "
                    f"| {fmt(row.p50_ms, 1)} | {fmt(row.p99_ms, 1)} "
                    f"| {fmt(row.p99_9_ms, 1)} | {err_text} | {util_text} "
                    f"| {ratio(thr, throughput(before, wl.key) if before else None)} "
                    f"| {ratio(thr, throughput(anchor, wl.key) if anchor else None)} "
                    f"| {ratio(row.p99_ms, before.p99_ms if before else None)} "
                    f"| {ratio(row.p99_ms, anchor.p99_ms if anchor else None)} "
                    f"| {cpu} | {fmt(row.peak_rss_mib, 1)} |"
                )
        lines.append("")
        extras = []
        for wl in scen.workloads:
            for key, row in wl.rows.items():
                for h in row.health:
                    if "p50_ms" in h:
                        probe = (
                            f"`/health` of {LABELS[key]}"
                            if key in FILEPROXY_KEYS
                            else f"`GET {wl.path}` of {LABELS[key]} (the probe's floor here)"
                        )
                        extras.append(
                            f"- {probe} during its {wl.label} run "
                            f"({wl.connections} connections): p50 {h['p50_ms']} ms, "
                            f"p99 {h['p99_ms']} ms, max {h['max_ms']} ms, "
                            f"{h['ok']}/{h['count']} ok (new connection each, server namespace "
                            "loopback)"
                        )
        for key, stats in scen.fileproxy_stats.items():
            if "error" in stats:
                extras.append(f"- `/stats` of {LABELS[key]}: unavailable ({stats['error'][:80]})")
                continue
            extras.append(
                f"- `/stats` of {LABELS[key]} after the scenario (both workers): "
                f"requests {stats['total_requests']}, errors {stats['total_errors']}, "
                f"client aborts {stats['client_aborts']}, rejected_total "
                f"{stats['rejected_total']}, limiter enforcing {stats['enforcing'] or 'n/a'}, "
                + (
                    f"quality levels {stats['quality_levels']}"
                    if any(stats["quality_levels"])
                    else "no quality level (optimizer off)"
                )
            )
        for item in scen.long_download or []:
            verdict = "byte-exact" if item.byte_exact else "NOT complete"
            extras.append(
                f"- long download of {item.size >> 20} MiB through {LABELS[item.contender]}: "
                f"{verdict}, {item.bytes} bytes in {item.seconds} s, HTTP {item.status}, "
                f"curl exit {item.curl_exit}"
            )
        delayer = scen.delayer
        if delayer:
            extras.append(
                f"- delayer: {delayer['packets']} packets, mean delay {delayer['mean_delay_ms']} "
                f"ms (FIFO per flow), late by {delayer['mean_late_ms']} ms on average, "
                f"max backlog {delayer['max_backlog']}, {delayer['cpu_s']} CPU s"
            )
        if extras:
            lines.extend([*extras, ""])
        if scen.many is not None:
            lines.extend(many_markdown(scen.title, scen.many))
    if report.extras:
        lines.extend(extras_markdown(report.extras, LABELS))
    lines.extend(report.notes)
    return "\n".join(lines) + "\n"


def chart(report: Report, path: Path) -> bool:
    """Throughput (normalised to "before") and p99 of every table row; False: none drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        return False
    cases = [(s, w) for s in report.scenarios for w in s.workloads]
    if not cases:
        return False
    width = max(3.2 * len(cases), 11.0)
    fig, axes = plt.subplots(2, len(cases), figsize=(width, 7.0), squeeze=False)
    colour = {"direct": "#7f7f7f", "nginx": "#2ca02c", "before": "#d62728",
              "fp_off": "#9ecae1", "fp_on": "#1f77b4"}  # fmt: skip
    for col, (scen, wl) in enumerate(cases):
        keys = list(wl.rows)
        rows = [wl.rows[k] for k in keys]
        before = wl.rows.get("before")
        base = throughput(before, wl.key) if before else None
        values = [throughput(r, wl.key) or 0.0 for r in rows]
        norm = [v / base if base else 0.0 for v in values]
        top, bottom = axes[0][col], axes[1][col]
        bars = top.bar(range(len(keys)), norm, color=[colour[k] for k in keys])
        top.axhline(1.0, color="black", linewidth=0.8)
        top.set_title(f"{scen.title}\n{wl.label}, {wl.connections} conns", fontsize=9)
        top.set_xticks([])
        for bar, value in zip(bars, values, strict=True):
            if wl.key == "small":
                text = f"{value:,.0f}"
            else:
                text = f"{value / 1e6:.1f}" if value >= 10e6 else f"{value / 1e6:.2f}"
            top.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=7)  # fmt: skip
        p99 = [r.p99_ms for r in rows]
        bars = bottom.bar(range(len(keys)), [v or 0.0 for v in p99],
                          color=[colour[k] for k in keys])  # fmt: skip
        bottom.set_xticks([])
        bottom.set_ylim(bottom=0)
        if not any(p99):
            bottom.text(0.5, 0.5, "no response completed\nwithin a run", ha="center",
                        va="center", transform=bottom.transAxes, fontsize=8)  # fmt: skip
            bottom.set_yticks([])
        for bar, ms in zip(bars, p99, strict=True):
            if ms:
                bottom.annotate(f"{ms:,.0f}", (bar.get_x() + bar.get_width() / 2,
                                                  bar.get_height()),
                                ha="center", va="bottom", fontsize=7)  # fmt: skip
        if col == 0:
            top.set_ylabel('throughput / "before"\n(labels: req/s or MB/s)')
            bottom.set_ylabel("p99 latency, ms")
    shown = [c for c in CONTENDERS if c.key in cases[0][1].rows]
    handles = [Rectangle((0, 0), 1, 1, color=colour[c.key]) for c in shown]
    fig.legend(handles, [c.label for c in shown], loc="lower center", ncol=5, fontsize=9)
    env = report.environment
    fig.suptitle(
        f"fileproxy bench {env['date']} — {env['cores']} cores, kernel {env['kernel']}, "
        f"{env['method']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTES = [
    "Scaling to 2 cores: the seed's connection counts are kept (1000 / 500 / 100 for 1 KiB); "
    "wrk, the backend, the contender and the NFQUEUE delayer share the 2 cores, so the "
    "normal-scenario rows measure CPU cost per request on this machine, not network limits. "
    "File rows use 16 / 4 / 2 connections (a 1 MiB file at 16 connections does not finish "
    "within 10 s on the poor link). Each run lasts 5-10 s (x3 with BENCH_FULL=1).",
    "",
    "Without netem the 10 ms of the normal link come from the NFQUEUE delayer, a Python "
    "process that forwards ~110k packets/s on one core: the normal link carries at most "
    "~750-850 Mbit/s (its rate probe says how much), so normal 1 MiB rows are bound by the "
    "emulation, and at 30-40k req/s the delayer takes a large share of the 2 cores. The "
    '"clean" scenario (not one of the seed\'s: the bare veth pair, no delay, shaping or '
    "loss) shows what each proxy relays on its own.",
    "",
    "The proxies reach the backend over the server namespace's loopback: the impaired link "
    "is the client side. fileproxy's network-quality classifier watches its *upstream* "
    "(time to headers, TCP_INFO of upstream sockets), so here its level reflects a loopback "
    "upstream and the proxy's own load (slow time to headers when its event loop is "
    "saturated), never the client link: the scenarios cannot judge the classifier.",
    "",
    "On the poor and very poor links wrk counts every byte read, also of responses the run "
    "ended in the middle of, so goodput (and util) is meaningful even where few 1 MiB "
    "responses complete within a run; latency percentiles there come from few samples.",
]


# -- files ----------------------------------------------------------------------------


def rerender(path: Path, with_chart: bool) -> None:
    """Recompute the rows of a stored .json from its raw runs; rewrite .md (and .png)."""
    report = Report.from_json(json.loads(path.read_text()))
    report.notes = NOTES
    for scen in report.scenarios:
        scenario = SCENARIOS[scen.name]
        rate = (scen.verification or {}).get("rate_probe", {})
        probe = rate.get("goodput_mbit")
        if probe is not None and "of_nominal" not in rate:
            rate["of_nominal"] = (
                round(probe / scenario.rate_mbit, 3) if scenario.rate_mbit else None
            )
        for wl in scen.workloads:
            wl.rows = {k: aggregate(runs, scenario, wl.key, probe) for k, runs in wl.runs.items()}
        if scen.many is not None:
            scen.many.rows = {k: aggregate_many(runs) for k, runs in scen.many.runs.items()}
    soak = (report.extras or {}).get("sse_soak")
    if soak:
        soak.update(soak_verdict(soak).to_json())
    write_report(report, path.with_suffix(""), with_chart)


def report_json(report: Report) -> str:
    """The .json of a run: the report's records and the raw figures, as stored since 2026-11."""
    return json.dumps(report.to_json(), indent=1, default=to_jsonable)


def write_report(report: Report, stem: Path, with_chart: bool) -> None:
    text = markdown(report)
    md_path, png_path = stem.with_suffix(".md"), stem.with_suffix(".png")
    extra_png = stem.with_name(stem.name + "-extras.png")
    if with_chart and chart(report, png_path):
        text += f"\n![benchmark chart]({png_path.name})\n"
    elif with_chart:
        print("no table chart: no table rows, or matplotlib is missing (pip install -e '.[bench]')")
    if with_chart and report.extras:
        env = report.environment
        title = (
            f"fileproxy bench {env['date']}, extra workloads — {env['cpu']}, {env['cores']} "
            f"cores, kernel {env['kernel']}"
        )
        if extras_chart(report.extras, extra_png, LABELS, title):
            text += f"\n![extra workloads]({extra_png.name})\n"
    md_path.write_text(text)
    stem.with_suffix(".json").write_text(report_json(report))
    print("\n" + text)
    print(f"wrote {md_path}, {stem.with_suffix('.json')}" + (
        f", {png_path}" if png_path.exists() else ""))  # fmt: skip


# -- the extra workloads (bench/extras.py) ---------------------------------------------


def cpu_text(cpu_s: dict[str, float], seconds: float) -> str:
    """CPU seconds as % of one core: the contender / wrk / the rest of the machine."""
    return " / ".join(
        f"{cpu_s.get(k, 0) / max(seconds, 1e-9) * 100:.0f}" for k in ("contender", "wrk", "other")
    )


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}" if digits else f"{value:,.0f}"
    return str(value)


def extras_markdown(ex: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The sections of the extra workloads (appended to bench.run's report)."""
    p = ex["plan"]
    lines: list[str] = []
    stair: dict[str, Staircase] = ex.get("stair") or {}
    if stair:
        keys = list(stair)
        lines += [
            f"## Staircase (clean link, 1 KiB, wrk -t2, {p['stair_step_s']} s per step)",
            "",
            "Connections doubled from 16 to 2,048, each contender on its own (fresh processes, "
            f"the steps in a row). Stop at error rate > {STAIR_ERROR_RATE:.0%}, p99 > "
            f"{STAIR_P99_MS:g} ms, peak RSS > start + {STAIR_RSS_MIB:g} MiB, or throughput < "
            f"{STAIR_DROP}x the best for two steps in a row. Knee = the step of highest "
            "throughput before the stop. Short steps on a shared 2-core machine (wrk and the "
            "contender share the cores) make single steps noisy: read the knee as a region.",
            "",
            "| contender | knee: conns | knee: req/s | knee: p99 ms | stopped at | why "
            "| RSS start -> peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in keys:
            r = stair[key]
            knee = r.knee or {}
            peak = max((st.peak_rss_mib for st in r.steps), default=None)
            lines.append(
                f"| {labels.get(key, key)} | {_f(knee.get('connections'), 0)} "
                f"| {_f(knee.get('requests_per_s'), 0)} | {_f(knee.get('p99_ms'))} "
                f"| {_f(r.stopped_at, 0)} | {r.stop} | {_f(r.start_rss_mib)} -> "
                f"{_f(peak)} |"
            )
        lines += [
            "",
            "Every step (req/s, p99 ms, errors); a blank cell: the staircase had stopped.",
            "",
            "| conns | " + " | ".join(labels.get(k, k) for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for conns in STAIR_STEPS:
            cells = []
            for key in keys:
                st = next((x for x in stair[key].steps if x.connections == conns), None)
                if st is None:
                    cells.append("")
                elif not st.measured:
                    cells.append("wrk failed")
                else:
                    mark = " **stop**" if st.stop else ""
                    cells.append(
                        f"{_f(st.requests_per_s, 0)} / {_f(st.p99_ms)} / {st.errors}{mark}"
                    )
            lines.append(f"| {conns} | " + " | ".join(cells) + " |")
        lines.append("")
    rate: dict[str, RateStaircase] = ex.get("stair_rate") or {}
    if rate:
        lines += [
            f"## Paced staircase (clean link, 1 KiB, {p['stair_step_s']} s per step)",
            "",
            "Fixed connections per contender, each waiting an exponential think time before "
            "each request (bench/wrk_paced.lua), the offered rate stepped through "
            + ", ".join(f"{f:g}" for f in RATE_STEPS)
            + " x the knee of the connection staircase; same stop conditions, plus achieved < "
            f"{PACED_SHORT}x offered. Cells: achieved req/s / p99 ms / errors.",
            "",
            "| contender | conns | "
            + " | ".join(f"{f:g}x" for f in RATE_STEPS)
            + " | best achieved | stop |",
            "|---|---|" + "---|" * (len(RATE_STEPS) + 2),
        ]
        for key, rs in rate.items():
            cells = []
            for f in RATE_STEPS:
                st = next((x for x in rs.steps if x.fraction == f), None)
                if st is None:
                    cells.append("")
                elif not st.measured:
                    cells.append("wrk failed")
                else:
                    cells.append(
                        f"{_f(st.requests_per_s, 0)} / {_f(st.p99_ms)} / {st.errors}"
                        + (" **stop**" if st.stop else "")
                    )
            best = rs.best or {}
            lines.append(
                f"| {labels.get(key, key)} | {rs.connections} | "
                + " | ".join(cells)
                + f" | {_f(best.get('requests_per_s'), 0)} | {rs.stop} |"
            )
        lines.append("")
    soak = ex.get("soak") or {}
    if soak:
        lines += [
            "## Soak at 80% of the knee (clean link, 1 KiB, paced)",
            "",
            "wrk with bench/wrk_paced.lua: before each request a connection waits an "
            "exponentially distributed think time (mean = connections / target rate), so the "
            "offered load is about the target, not a closed loop. Zero errors expected. "
            "CPU: % of one core (2 cores = 200%): fileproxy's processes / wrk / everything else "
            "(other users of this shared machine, and kernel network work not charged to a "
            "process); when the three add up to ~200% the machine, not only the contender, "
            "set the rate that was reached.",
            "",
            "| contender | seconds | knee req/s | target | achieved (of knee) | conns "
            "| errors | p50 / p99 / p99.9 / max ms | RSS start / peak / end MiB "
            "| CPU % contender / wrk / other |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in soak.items():
            if "error" in r and r.get("requests_per_s") is None:
                lines.append(f"| {labels.get(key, key)} | failed: {r['error']} |||||||")
                continue
            m = r["memory"]
            errs = r["errors_total"]
            err_text = str(errs) + (
                " (" + ", ".join(f"{k} {v}" for k, v in (r["errors"] or {}).items() if v) + ")"
                if errs
                else ""
            )
            lines.append(
                f"| {labels.get(key, key)} | {r['seconds']} | {_f(r['knee_requests_per_s'], 0)} "
                f"| {_f(r['target_requests_per_s'], 0)} | {_f(r['requests_per_s'], 0)} "
                f"({_f(r['of_knee'], 2)}) | {r['connections']} | {err_text} "
                f"| {_f(r['p50_ms'])} / {_f(r['p99_ms'])} / {_f(r['p99_9_ms'])} / "
                f"{_f(r['max_ms'])} | {m['start_mib']} / {m['peak_mib']} / {m['end_mib']} "
                f"| {cpu_text(r['cpu_s'], r['seconds'])} |"
            )
        lines.append("")
    sse = ex.get("sse") or []
    sse_labels = {**labels, "direct": "direct (SSE backend)"}
    if sse:
        lines += [
            f"## SSE streams (clean link, one event every {p['sse_interval_ms']} ms per stream)",
            "",
            f"bench/sse_backend.py ({ex.get('sse_backend', SSE_BACKEND_BEFORE)}) "
            "behind each contender (direct: "
            "the SSE backend itself); bench/sse_client.py in the client namespace opens the "
            "streams at once (2,000/s) and keeps each open for "
            f"{_f(p['sse_s'])} s from its own start. ttfe = time to first event from before "
            "connect(); delivered = events received / events the backend's schedule promised; "
            "delay = receive time - the backend's timestamp in the event. nginx proxy_pass "
            "relays each event at once (the backend sends X-Accel-Buffering: no). Peak RSS and "
            "CPU: the contender's processes (direct: the SSE backend).",
            "",
            "| streams | contender | ok | errors | ttfe p50 / p99 / max ms | events/s "
            "| delivered | delay p50 / p99 ms | CPU % | RSS start -> peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in sse:
            c = row.get("client")
            if not c:
                lines.append(
                    f"| {row['streams']} | {sse_labels.get(row['contender'], row['contender'])} "
                    f"| failed: {row.get('error', '')[-120:]!r} ||||||||"
                )
                continue
            t, d, m = c["ttfe_ms"], c["delay_ms"], row["memory"]
            errs = c["errors_total"]
            err_text = str(errs) + (
                " (" + ", ".join(f"{k} {v}" for k, v in c["errors"].items()) + ")" if errs else ""
            )
            lines.append(
                f"| {row['streams']} | {sse_labels.get(row['contender'], row['contender'])} "
                f"| {c['ok']}/{c['streams']} | {err_text} | {_f(t['p50'])} / {_f(t['p99'])} / "
                f"{_f(t['max'])} | {_f(c['events_per_s'], 0)} | {_f(c['delivered_fraction'], 3)} "
                f"| {_f(d['p50'])} / {_f(d['p99'])} | {_f(row['cpu_pct'], 0)} "
                f"| {m['start_mib']} -> {m['peak_mib']} |"
            )
        lines.append("")
    soak_sse = ex.get("sse_soak")
    if soak_sse:
        s = soak_sse
        env = ", ".join(f"{k}={v}" for k, v in s.get("env", {}).items())
        base = s["baseline"]
        lines += [
            f"## SSE soak: {s['streams']:,} streams through {labels.get(s['contender'])}, "
            f"{s['cycles']} identical cycles",
            "",
            f"Each cycle opens {s['streams']:,} streams (2,000/s; one event every "
            f"{s['interval_ms'] / 1000:g} s), waits for every first event, holds "
            f"{s['hold_s']:g} s, closes them all and waits {s['settle_s']:g} s. Memory = "
            "fileproxy's processes (gunicorn master + 2 workers) summed: RSS (pages shared "
            "by the forked workers counted in each) and PSS (shared pages divided). Started "
            f"with {env} (fileproxy's default pools, 200 / 50 per host per worker, would "
            "queue all but 100 streams: see the SSE streams rows). Listen overflows = the "
            "server namespace's TcpExt ListenOverflows during the opening; the last column "
            "puts them on a listener: its longest accept queue (ss Recv-Q, polled every "
            "0.1 s) and its backlog (2048, gunicorn.conf.py's; runs before 2026-11-30 02:00 "
            "UTC had 128: aiohttp's gunicorn worker listened again with aiohttp's default); "
            "a full queue drops the SYN, which the client sends again after 1, 3, 7, 15 s "
            "...). The SSE backend: "
            f"{ex.get('sse_backend', SSE_BACKEND_BEFORE)}. Baseline before the first "
            f"cycle: RSS {base['rss_mib']} MiB, PSS {base['pss_mib']} MiB, per process "
            f"{base['per_process_rss_mib']} MiB; the SSE backend {base['backend_rss_mib']} MiB.",
            "",
            "| cycle | streams ok | errors | open s | listen overflows | RSS open "
            "| RSS end of hold | RSS after close | KiB per stream (RSS) | KiB per stream (PSS) "
            "| KiB per stream over the RSS before the cycle | per process RSS when open "
            "| longest accept queue while opening (port/backlog: queue) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        previous = s["baseline"].get("netstat", {})
        for c in s["per_cycle"]:
            opened = next(
                x for x in s["samples"] if x["phase"] == "opened" and x["cycle"] == c["cycle"]
            )
            counters = opened.get("netstat", {})
            overflows = (
                counters["ListenOverflows"] - previous.get("ListenOverflows", 0)
                if "ListenOverflows" in counters
                else None
            )
            previous = counters or previous
            lines.append(
                f"| {c['cycle']} | {c['ok']:,} | {c['errors'] or 0} | {c['open_s']} "
                f"| {_f(overflows, 0)} | {c['rss_opened_mib']} | {c['rss_held_mib']} "
                f"| {c['rss_closed_mib']} "
                f"| {c['kib_per_stream']} | {c['kib_per_stream_pss']} "
                f"| {c.get('kib_per_stream_cycle', '-')} "
                f"| {opened['memory']['per_process_rss_mib']} "
                f"| {opened.get('accept_queue_max', '-')} |"
            )
        per_stream = [c["kib_per_stream"] for c in s["per_cycle"] if c["kib_per_stream"]]
        lines += [
            "",
            f"- RSS per open stream (over the baseline): {', '.join(map(str, per_stream))} KiB "
            f"by cycle; the issue's target is <= 30 KiB with 10,000 streams over 2 workers.",
            f"- RSS after close, change from each cycle to the next: "
            f"{s['closed_steps_mib']} MiB (first to last {s['closed_rise_mib']} MiB). A leak "
            "shows as a rise on every identical cycle; memory kept after the first cycle and "
            "reused is the allocator, not a leak. Each worker keeps its own high-water mark, "
            "and the kernel spreads the streams over the workers differently in each cycle "
            "(per process RSS), so the sum can rise until every worker has had its largest "
            "share: judge by the trend over several cycles.",
        ]
        if s.get("error"):
            lines.append(f"- the client ended with an error: {s['error'][-300:]!r}")
        lines.append("")
    return lines


def extras_chart(ex: dict[str, Any], path: Path, labels: dict[str, str], title: str) -> bool:
    """Staircase (req/s and p99 by connections), SSE time to first event, SSE soak RSS."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    stair: dict[str, Staircase] = ex.get("stair") or {}
    sse, soak = ex.get("sse") or [], ex.get("sse_soak")
    rate: dict[str, RateStaircase] = ex.get("stair_rate") or {}
    if not (stair or sse or soak):
        return False
    colour = {"direct": "#7f7f7f", "nginx": "#2ca02c", "before": "#d62728",
              "fp_off": "#9ecae1", "fp_on": "#1f77b4"}  # fmt: skip
    rows = 3 if rate else 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.25 * rows), squeeze=False)
    (a_rps, a_p99), (a_sse, a_soak) = axes[0], axes[1]
    if rate:
        a_ach, a_rp99 = axes[2]
        for key, rs in rate.items():
            steps = [st for st in rs.steps if st.measured]
            xs = [st.offered_per_s for st in steps]
            kw = {"color": colour.get(key), "label": labels.get(key, key)}
            a_ach.plot(xs, [st.requests_per_s for st in steps], "o-", **kw)
            a_rp99.plot(xs, [st.p99_ms or 0 for st in steps], "o-", **kw)
        top = max((st.offered_per_s or 0 for rs in rate.values() for st in rs.steps), default=1)
        a_ach.plot([0, top], [0, top], color="black", linewidth=0.8, linestyle=":")
        for ax, name in ((a_ach, "achieved req/s (dotted: = offered)"), (a_rp99, "p99 ms")):
            ax.set_xscale("log")
            ax.set_xlabel("offered req/s (paced, exponential think time)")
            ax.set_ylabel(name)
            ax.set_title(f"paced staircase, 1 KiB, clean link: {name}", fontsize=9)
            ax.legend(fontsize=7)
        a_ach.set_yscale("log")
        a_rp99.set_yscale("log")
        a_rp99.axhline(STAIR_P99_MS, color="black", linewidth=0.8, linestyle="--")
    for key, r in stair.items():
        steps = [st for st in r.steps if st.measured]
        xs = [st.connections for st in steps]
        a_rps.plot(xs, [st.requests_per_s for st in steps], "o-", color=colour.get(key),
                   label=labels.get(key, key))  # fmt: skip
        a_p99.plot(xs, [st.p99_ms or 0 for st in steps], "o-", color=colour.get(key),
                   label=labels.get(key, key))  # fmt: skip
        if r.knee:
            a_rps.plot([r.knee["connections"]], [r.knee["requests_per_s"]], "k*",
                       markersize=12)  # fmt: skip
    for ax, name in ((a_rps, "req/s (* = knee)"), (a_p99, "p99 ms")):
        if not stair:
            ax.set_axis_off()
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections")
        ax.set_ylabel(name)
        ax.set_title(f"staircase, 1 KiB, clean link: {name}", fontsize=9)
        ax.legend(fontsize=7)
    if stair:
        a_p99.axhline(STAIR_P99_MS, color="black", linewidth=0.8, linestyle="--")
        a_p99.set_yscale("log")
    if sse:
        sizes = sorted({row["streams"] for row in sse})
        keys = list(dict.fromkeys(row["contender"] for row in sse))
        width = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            values = []
            for n in sizes:
                row = next((x for x in sse if x["contender"] == key and x["streams"] == n), None)
                c = (row or {}).get("client") or {}
                values.append((c.get("ttfe_ms") or {}).get("p99") or 0)
            xs = [j + i * width for j in range(len(sizes))]
            label = "direct (SSE backend)" if key == "direct" else labels.get(key, key)
            a_sse.bar(xs, values, width, color=colour.get(key), label=label)
        a_sse.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(sizes))])
        a_sse.set_xticklabels([f"{n} streams" for n in sizes])
        a_sse.set_yscale("log")
        a_sse.set_ylabel("time to first event, p99 ms")
        a_sse.set_title("SSE streams: time to first event (p99)", fontsize=9)
        a_sse.legend(fontsize=7)
    else:
        a_sse.set_axis_off()
    if soak:
        xs, rss, pss, names = (
            [0],
            [soak["baseline"]["rss_mib"]],
            [soak["baseline"]["pss_mib"]],
            ["start"],
        )
        for sample in soak["samples"]:
            xs.append(len(xs))
            rss.append(sample["memory"]["rss_mib"])
            pss.append(sample["memory"]["pss_mib"])
            names.append(f"{sample['cycle']}:{sample['phase']}")
        a_soak.plot(xs, rss, "o-", label="RSS, summed", color="#1f77b4")
        a_soak.plot(xs, pss, "s--", label="PSS, summed", color="#9ecae1")
        a_soak.set_xticks(xs)
        a_soak.set_xticklabels(names, rotation=45, fontsize=7, ha="right")
        a_soak.set_ylabel("MiB")
        a_soak.set_title(
            f"SSE soak: {soak['streams']:,} streams x {soak['cycles']} cycles, "
            f"{labels.get(soak['contender'])}",
            fontsize=9,
        )
        a_soak.legend(fontsize=7)
    else:
        a_soak.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
