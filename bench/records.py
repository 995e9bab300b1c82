"""Typed result records of bench.run, and the fixed setup its report describes.

Each record is what one step of the harness produces (a wrk run, a contender's
row of the table, a staircase step, ...). ``to_json()`` gives the exact JSON
shape bench/results/*.json has always had (same keys, same order, optional
keys left out when absent), ``from_json()`` reads it back, so
``python -m bench.run --render X.json`` rebuilds a stored run's report from
its raw figures. Figures the harness passes through without reading (netem's
verification, /health samples, /stats, memory samples) stay plain JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

JSON = dict[str, Any]

# -- the fixed setup (read by the measurement and by the report) -------------------

WORKERS = 2
BACKEND_PORT = 8080
WRK_TIMEOUT_S = 30
LINK_BOUND = 0.80  # goodput / link rate at or above which a row is marked link-bound
PROBE_BOUND = 0.85  # ... or goodput / the verified rate probe (the emulation may cap below nominal)


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    port: int


CONTENDERS = (
    Contender("direct", "direct (nginx static)", BACKEND_PORT),
    Contender("nginx", "nginx proxy_pass", 8081),
    Contender("before", 'seed "before"', 8082),
    Contender("fp_off", "fileproxy, optimizer off", 8083),
    Contender("fp_on", "fileproxy, optimizer on", 8084),
)
FILEPROXY_KEYS = ("fp_off", "fp_on")
LABELS = {c.key: c.label for c in CONTENDERS}


def _put(out: JSON, key: str, value: Any) -> None:
    """Set `key` only when there is a value (the key is absent in the JSON otherwise)."""
    if value is not None:
        out[key] = value


def to_jsonable(value: Any) -> Any:
    """``json.dumps(default=...)``: a record as its JSON; anything else as str (as before)."""
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    return str(value)


# -- one wrk run, one measurement ----------------------------------------------------


@dataclass
class WrkStats:
    """What bench/wrk_report.lua prints (WRK_JSON); latencies in microseconds."""

    requests: int
    duration_s: float
    requests_per_s: float
    bytes: int
    bytes_per_s: float
    latency_us: dict[str, float] | None  # mean stdev min max p50 p90 p99 p99_9; None: none done
    errors: dict[str, int]  # connect read write timeout status
    errors_total: int

    @classmethod
    def from_json(cls, d: JSON) -> WrkStats:
        return cls(
            requests=d["requests"],
            duration_s=d["duration_s"],
            requests_per_s=d["requests_per_s"],
            bytes=d["bytes"],
            bytes_per_s=d["bytes_per_s"],
            latency_us=d["latency_us"],
            errors=d["errors"],
            errors_total=d["errors_total"],
        )

    def to_json(self) -> JSON:
        return {
            "requests": self.requests,
            "duration_s": self.duration_s,
            "requests_per_s": self.requests_per_s,
            "bytes": self.bytes,
            "bytes_per_s": self.bytes_per_s,
            "latency_us": self.latency_us,
            "errors": self.errors,
            "errors_total": self.errors_total,
        }

    def latency_ms(self, key: str) -> float | None:
        """A latency figure (p50, p99, max, ...) in ms; None when wrk has none."""
        lat = self.latency_us or {}
        value = lat.get(key)
        return value / 1000 if value is not None else None


@dataclass
class RangeCheck:
    """What bench/wrk_range.lua found (RANGE_JSON): good and wrong Range responses."""

    good: int
    not_206: int
    bad_length: int
    bad_range: int

    @classmethod
    def from_json(cls, d: JSON) -> RangeCheck:
        return cls(d["good"], d["not_206"], d["bad_length"], d["bad_range"])

    def to_json(self) -> JSON:
        return {
            "good": self.good,
            "not_206": self.not_206,
            "bad_length": self.bad_length,
            "bad_range": self.bad_range,
        }


@dataclass
class RunResult:
    """One wrk run of one workload through one contender (``Bench.measure``)."""

    contender: str
    scenario: str
    workload: str
    connections: int
    elapsed_s: float
    loadavg_1m_before: float
    cpu_s: dict[str, float]  # contender backend [delayer] wrk other
    # the contender's processes (direct: the backend nginx), RSS summed, MiB:
    # start_mib peak_mib end_mib (runs before 2026-11-30 have none)
    memory: dict[str, float] | None = None
    range: RangeCheck | None = None
    error: str | None = None  # wrk printed no WRK_JSON: its output's tail
    wrk: WrkStats | None = None
    health: JSON | None = None  # bench.health_probe's summary during the run
    lingering: int | None = None  # server-side connections still open after the run
    quiet_wait_s: float | None = None

    @property
    def peak_mib(self) -> float:
        return (self.memory or {})["peak_mib"]

    @classmethod
    def from_json(cls, d: JSON) -> RunResult:
        return cls(
            contender=d["contender"],
            scenario=d["scenario"],
            workload=d["workload"],
            connections=d["connections"],
            elapsed_s=d["elapsed_s"],
            loadavg_1m_before=d["loadavg_1m_before"],
            cpu_s=d["cpu_s"],
            memory=d.get("memory"),
            range=RangeCheck.from_json(d["range"]) if "range" in d else None,
            error=d.get("error"),
            wrk=WrkStats.from_json(d["wrk"]) if "wrk" in d else None,
            health=d.get("health"),
            lingering=d.get("lingering"),
            quiet_wait_s=d.get("quiet_wait_s"),
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "contender": self.contender,
            "scenario": self.scenario,
            "workload": self.workload,
            "connections": self.connections,
            "elapsed_s": self.elapsed_s,
            "loadavg_1m_before": self.loadavg_1m_before,
            "cpu_s": self.cpu_s,
        }
        _put(out, "memory", self.memory)
        _put(out, "range", self.range.to_json() if self.range else None)
        _put(out, "error", self.error)
        _put(out, "wrk", self.wrk.to_json() if self.wrk else None)
        _put(out, "health", self.health)
        _put(out, "lingering", self.lingering)
        _put(out, "quiet_wait_s", self.quiet_wait_s)
        return out


# -- the table: one row per contender and workload ------------------------------------


@dataclass
class Row:
    """The mean of one contender's runs of one workload (``report.aggregate``)."""

    runs: int
    failed_runs: int
    requests: int
    requests_per_s: float | None
    bytes_per_s: float | None
    spread: float | None  # (max - min) / mean of req/s over the runs
    errors: dict[str, int]
    errors_total: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p99_9_ms: float | None
    cpu_pct: dict[str, float]
    peak_rss_mib: float | None = None  # runs before 2026-11-30 have no memory figures
    # only where a link rate is judged (not the normal link's 1 KiB row)
    utilisation: float | None = None
    link_bound: bool | None = None
    health: list[JSON] = field(default_factory=list)
    range_good: int | None = None

    @classmethod
    def from_json(cls, d: JSON) -> Row:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_json(self) -> JSON:
        out: JSON = {
            "runs": self.runs,
            "failed_runs": self.failed_runs,
            "requests": self.requests,
            "requests_per_s": self.requests_per_s,
            "bytes_per_s": self.bytes_per_s,
            "spread": self.spread,
            "errors": self.errors,
            "errors_total": self.errors_total,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "p99_9_ms": self.p99_9_ms,
        }
        _put(out, "utilisation", self.utilisation)
        _put(out, "link_bound", self.link_bound)
        out["cpu_pct"] = self.cpu_pct
        if self.health:
            out["health"] = self.health
        out["peak_rss_mib"] = self.peak_rss_mib
        _put(out, "range_good", self.range_good)
        return out


@dataclass
class WorkloadResult:
    """One workload of a scenario: every contender's runs and its row."""

    key: str
    label: str
    path: str | None  # runs before 2026-11-30 01:26 did not record it
    connections: int
    duration_s: int
    rows: dict[str, Row]
    runs: dict[str, list[RunResult]]

    @classmethod
    def from_json(cls, d: JSON) -> WorkloadResult:
        return cls(
            key=d["key"],
            label=d["label"],
            path=d.get("path"),
            connections=d["connections"],
            duration_s=d["duration_s"],
            rows={k: Row.from_json(r) for k, r in d["rows"].items()},
            runs={k: [RunResult.from_json(r) for r in v] for k, v in d["runs"].items()},
        )

    def to_json(self) -> JSON:
        out: JSON = {"key": self.key, "label": self.label}
        _put(out, "path", self.path)
        out.update(
            connections=self.connections,
            duration_s=self.duration_s,
            rows={k: row.to_json() for k, row in self.rows.items()},
            runs={k: [r.to_json() for r in runs] for k, runs in self.runs.items()},
        )
        return out


@dataclass
class LongDownload:
    """One download of `size` bytes through a contender on the very poor link."""

    contender: str
    size: int
    status: str | None
    bytes: int
    curl_exit: int | None
    seconds: float
    byte_exact: bool

    @classmethod
    def from_json(cls, d: JSON) -> LongDownload:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def to_json(self) -> JSON:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ManyRun:
    """One run of the ``many`` workload through one contender (``Bench.measure_many``).

    ``clients``: per client [kind, status, ttfb_s, done_s, bytes] as bench/many_clients.py
    prints it (kind "ok" = complete, status 200, SHA-256 right). ``upstream``: the
    contender's ESTABLISHED connections to the backend (``ss -tnp``, owned by its
    processes): ``baseline`` before the run, ``samples`` [t_s, established, busy]
    every ~0.2 s (busy: bytes waiting between the backend and the proxy); None for
    direct (no upstream).
    """

    contender: str
    scenario: str
    started: int
    size: int
    rcvbuf: int
    wall_s: float
    loadavg_1m_before: float
    cpu_s: dict[str, float]
    clients: list[list[Any]]
    upstream: JSON | None = None
    error: str | None = None  # the client process failed: its output's tail

    @classmethod
    def from_json(cls, d: JSON) -> ManyRun:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_json(self) -> JSON:
        out: JSON = {
            k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("upstream", "error")
        }
        _put(out, "upstream", self.upstream)
        _put(out, "error", self.error)
        return out


@dataclass
class ManyRow:
    """One contender's ``many`` runs summed (``report.aggregate_many``)."""

    runs: int
    started: int
    completed: int  # byte-exact, status 200
    errors: dict[str, int]  # by kind: status_504, reset, short_body, timeout, no_head, ...
    ttfb_p50_s: float | None
    ttfb_p99_s: float | None
    done_p50_s: float | None  # start to last byte of the completed downloads
    wall_s: float  # the slowest run's
    upstream_baseline: int | None  # None: direct, no upstream
    upstream_max: int | None  # most ESTABLISHED upstream connections at once
    busy_max: int | None  # ... of which the most busy at once (bytes waiting backend -> proxy)
    busy_mean: float | None  # ... and their mean over the samples
    cpu_pct: float | None  # the contender's processes, % of one core over the runs

    @property
    def ratio(self) -> float:
        return self.completed / self.started if self.started else 0.0

    @classmethod
    def from_json(cls, d: JSON) -> ManyRow:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def to_json(self) -> JSON:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ManyWorkload:
    """``many``: N concurrent downloads of one file over the scenario's shared link."""

    clients: int
    size: int
    rcvbuf: int
    order: list[str]
    runs: dict[str, list[ManyRun]]
    rows: dict[str, ManyRow]
    note: str = ""  # the sizing and its arithmetic, as the harness chose it
    deadline_s: float | None = None  # each client's
    keep_alive: bool = False  # the requests' Connection (runs of 2026-12-04 15:42: close)

    @classmethod
    def from_json(cls, d: JSON) -> ManyWorkload:
        return cls(
            clients=d["clients"],
            size=d["size"],
            rcvbuf=d["rcvbuf"],
            order=d["order"],
            runs={k: [ManyRun.from_json(r) for r in v] for k, v in d["runs"].items()},
            rows={k: ManyRow.from_json(r) for k, r in d["rows"].items()},
            note=d.get("note", ""),
            deadline_s=d.get("deadline_s"),
            keep_alive=d.get("keep_alive", False),
        )

    def to_json(self) -> JSON:
        return {
            "clients": self.clients,
            "size": self.size,
            "rcvbuf": self.rcvbuf,
            "order": self.order,
            "runs": {k: [r.to_json() for r in v] for k, v in self.runs.items()},
            "rows": {k: r.to_json() for k, r in self.rows.items()},
            "note": self.note,
            "deadline_s": self.deadline_s,
            "keep_alive": self.keep_alive,
        }


@dataclass
class ScenarioResult:
    """One network scenario: its emulation as verified, its workloads, what came after."""

    name: str
    title: str
    describe: str
    config: JSON
    verification: JSON  # bench.netem's Testbed.verify (+ setup_s, verify_s)
    workloads: list[WorkloadResult] = field(default_factory=list)
    long_download: list[LongDownload] | None = None
    fileproxy_stats: dict[str, JSON] = field(default_factory=dict)
    counters_after: JSON | None = None
    delayer: JSON | None = None
    many: ManyWorkload | None = None  # runs before 2026-12-04 have none

    @classmethod
    def from_json(cls, d: JSON) -> ScenarioResult:
        lds = d.get("long_download")
        return cls(
            name=d["name"],
            title=d["title"],
            describe=d["describe"],
            config=d["config"],
            verification=d["verification"],
            workloads=[WorkloadResult.from_json(w) for w in d["workloads"]],
            long_download=None if lds is None else [LongDownload.from_json(x) for x in lds],
            fileproxy_stats=d.get("fileproxy_stats", {}),
            counters_after=d.get("counters_after"),
            delayer=d.get("delayer"),
            many=ManyWorkload.from_json(d["many"]) if "many" in d else None,
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "name": self.name,
            "title": self.title,
            "describe": self.describe,
            "config": self.config,
            "verification": self.verification,
            "workloads": [w.to_json() for w in self.workloads],
        }
        if self.long_download is not None:
            out["long_download"] = [x.to_json() for x in self.long_download]
        out["fileproxy_stats"] = self.fileproxy_stats
        out["counters_after"] = self.counters_after
        out["delayer"] = self.delayer
        _put(out, "many", self.many.to_json() if self.many else None)
        return out


@dataclass
class Report:
    """A whole run of bench.run: what bench/results/<date>.json holds."""

    full: bool
    notes: list[str]
    scenarios: list[ScenarioResult] = field(default_factory=list)
    environment: JSON = field(default_factory=dict)
    byte_exact_1mib: dict[str, bool] = field(default_factory=dict)
    # bench.extras.run_extras: its keys in the order they were measured, the
    # staircases as Staircase / RateStaircase, the rest plain JSON
    extras: JSON | None = None
    run_time_s: float = 0.0
    command: str | None = None  # runs before 2026-11-30 01:07 did not record it

    @classmethod
    def from_json(cls, d: JSON) -> Report:
        extras = d.get("extras")
        if extras is not None:
            extras = dict(extras)
            if "stair" in extras:
                extras["stair"] = {k: Staircase.from_json(v) for k, v in extras["stair"].items()}
            if "stair_rate" in extras:
                extras["stair_rate"] = {
                    k: RateStaircase.from_json(v) for k, v in extras["stair_rate"].items()
                }
        return cls(
            full=d["full"],
            notes=d["notes"],
            scenarios=[ScenarioResult.from_json(s) for s in d["scenarios"]],
            environment=d["environment"],
            byte_exact_1mib=d["byte_exact_1mib"],
            extras=extras,
            run_time_s=d["run_time_s"],
            command=d.get("command"),
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "full": self.full,
            "scenarios": [s.to_json() for s in self.scenarios],
            "notes": self.notes,
            "environment": self.environment,
            "byte_exact_1mib": self.byte_exact_1mib,
        }
        _put(out, "extras", self.extras)  # records inside: json.dumps(default=to_jsonable)
        out["run_time_s"] = self.run_time_s
        _put(out, "command", self.command)
        return out


# -- the staircases (bench/extras.py) --------------------------------------------------


@dataclass
class StairStep:
    """One step of a staircase: by connections (``connections``) or paced (``fraction``).

    The measured figures are None when wrk failed at this step (``error``).
    """

    peak_rss_mib: float
    connections: int | None = None  # the connection staircase
    cpu_s: dict[str, float] | None = None
    fraction: float | None = None  # the paced staircase: x the knee's req/s
    offered_per_s: float | None = None
    mean_think_ms: float | None = None
    error: str | None = None
    requests_per_s: float | None = None
    requests: int | None = None
    errors: int | None = None
    errors_by_kind: dict[str, int] | None = None
    error_rate: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    stop: str | None = None

    @property
    def measured(self) -> bool:
        return self.requests_per_s is not None

    @classmethod
    def from_json(cls, d: JSON) -> StairStep:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_json(self) -> JSON:
        out: JSON = {}
        _put(out, "connections", self.connections)
        _put(out, "cpu_s", self.cpu_s)
        _put(out, "fraction", self.fraction)
        _put(out, "offered_per_s", self.offered_per_s)
        _put(out, "mean_think_ms", self.mean_think_ms)
        out["peak_rss_mib"] = self.peak_rss_mib
        _put(out, "error", self.error)
        if self.measured:
            out["requests_per_s"] = self.requests_per_s
            _put(out, "requests", self.requests)
            out["errors"] = self.errors
            _put(out, "errors_by_kind", self.errors_by_kind)
            out.update(error_rate=self.error_rate, p50_ms=self.p50_ms, p99_ms=self.p99_ms)
        _put(out, "stop", self.stop)
        return out


class Judgement(NamedTuple):
    """``extras.judge``: the stop conditions that fired, and the steps in a row under the best."""

    reasons: list[str]
    below: int


@dataclass
class Staircase:
    """Connections doubled step by step until a stop condition; the knee."""

    contender: str
    step_s: int
    start_rss_mib: float
    steps: list[StairStep]
    knee: JSON | None  # connections, requests_per_s, p99_ms of the best step
    stopped_at: int | None
    stop: str

    @classmethod
    def from_json(cls, d: JSON) -> Staircase:
        return cls(
            contender=d["contender"],
            step_s=d["step_s"],
            start_rss_mib=d["start_rss_mib"],
            steps=[StairStep.from_json(s) for s in d["steps"]],
            knee=d["knee"],
            stopped_at=d["stopped_at"],
            stop=d["stop"],
        )

    def to_json(self) -> JSON:
        return {
            "contender": self.contender,
            "step_s": self.step_s,
            "start_rss_mib": self.start_rss_mib,
            "steps": [s.to_json() for s in self.steps],
            "knee": self.knee,
            "stopped_at": self.stopped_at,
            "stop": self.stop,
        }


@dataclass
class RateStaircase:
    """Paced load at fractions of the knee's req/s, fixed connections; same stops."""

    contender: str
    connections: int
    step_s: int
    knee_requests_per_s: float
    steps: list[StairStep]
    best: JSON | None  # offered_per_s, requests_per_s, p99_ms of the best step
    stop: str

    @classmethod
    def from_json(cls, d: JSON) -> RateStaircase:
        return cls(
            contender=d["contender"],
            connections=d["connections"],
            step_s=d["step_s"],
            knee_requests_per_s=d["knee_requests_per_s"],
            steps=[StairStep.from_json(s) for s in d["steps"]],
            best=d["best"],
            stop=d["stop"],
        )

    def to_json(self) -> JSON:
        return {
            "contender": self.contender,
            "connections": self.connections,
            "step_s": self.step_s,
            "knee_requests_per_s": self.knee_requests_per_s,
            "steps": [s.to_json() for s in self.steps],
            "best": self.best,
            "stop": self.stop,
        }


# -- the SSE soak's verdict --------------------------------------------------------------


@dataclass
class SoakCycle:
    """One open / hold / close cycle of the SSE soak: RSS per stream, RSS after close."""

    cycle: int
    ok: int
    errors: Any
    open_s: float | None
    rss_opened_mib: float
    pss_opened_mib: float
    rss_held_mib: float | None
    rss_closed_mib: float | None
    kib_per_stream: float | None
    kib_per_stream_cycle: float | None
    kib_per_stream_pss: float | None

    def to_json(self) -> JSON:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SoakVerdict:
    """``extras.soak_verdict``: per cycle, and how RSS after close moved across cycles."""

    per_cycle: list[SoakCycle]
    closed_rise_mib: float | None
    closed_steps_mib: list[float]

    def to_json(self) -> JSON:
        return {
            "per_cycle": [c.to_json() for c in self.per_cycle],
            "closed_rise_mib": self.closed_rise_mib,
            "closed_steps_mib": self.closed_steps_mib,
        }
