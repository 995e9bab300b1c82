"""What a worker reports to its fleet, and the fleet's view built from every report; pure.

Each worker publishes a ``WorkerReport`` about once a second (``shared_state``): its
counters since start, the raw figures of its stats window and, per upstream, its
quality estimate and its limiter's view. ``FleetView`` adds them up for ``/stats`` and
``/metrics`` and picks the one quality level every worker then uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson

from fileproxy.adaptive import LEVELS, Level
from fileproxy.state.traffic import Counters, WindowParts


@dataclass(frozen=True)
class UpstreamReport:
    level: str
    estimated: bool
    samples: int  # RTT samples behind the estimate: its weight in the fleet's level
    limit: float | None
    enforcing: bool
    rejected: int
    limiter_mode: str  # shared | fallback | off
    # this worker's outlier ejection of the replica (wall clock), shared with the fleet
    ejected_until: float | None = None
    ejected_reason: str | None = None


@dataclass(frozen=True)
class WorkerReport:
    worker: str  # host:pid
    instance: str  # host:pid of the fileproxy instance (gunicorn's master)
    pid: int
    started: float  # wall clock
    counters: Counters
    window: WindowParts
    upstreams: dict[str, UpstreamReport]

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, raw: bytes) -> WorkerReport:
        data = orjson.loads(raw)
        return cls(
            worker=data["worker"],
            instance=data["instance"],
            pid=data["pid"],
            started=data["started"],
            counters=Counters(**data["counters"]),
            window=WindowParts(**data["window"]),
            upstreams={k: UpstreamReport(**v) for k, v in data["upstreams"].items()},
        )


def fleet_level(reports: list[UpstreamReport]) -> Level | None:
    """The level every worker uses: the sample-weighted median of the estimated levels.

    A median, not a mean, so one worker with a bad path cannot drag the fleet; ties go
    to the worse level (the cautious profile has the longer timeouts).
    """
    weighted = sorted(
        (LEVELS.index(Level(r.level)), max(1, r.samples)) for r in reports if r.estimated
    )
    total = sum(weight for _, weight in weighted)
    if not total:
        return None
    seen = 0
    for rank, weight in weighted:
        seen += weight
        if seen * 2 >= total:
            return LEVELS[rank]
    raise AssertionError("unreachable: the weights add up to total")


@dataclass(frozen=True)
class FleetView:
    """Every fresh report, as received at ``at`` (the store's clock)."""

    at: float
    reports: dict[str, tuple[float, WorkerReport]]  # worker -> (received at, report)

    @property
    def live_workers(self) -> int:
        return len(self.reports)

    def totals(self) -> Counters:
        return Counters.combine([r.counters for _, r in self.reports.values()])

    def window(self) -> WindowParts:
        return WindowParts.combine([r.window for _, r in self.reports.values()])

    def level(self, upstream: str) -> Level | None:
        return fleet_level(
            [r.upstreams[upstream] for _, r in self.reports.values() if upstream in r.upstreams]
        )

    def ejection(self, upstream: str, now: float) -> tuple[float, str] | None:
        """The latest end of an ejection of ``upstream`` some worker reported (wall
        clock, after ``now``) and its reason; None when no worker has it ejected."""
        found = [
            (r.upstreams[upstream].ejected_until, r.upstreams[upstream].ejected_reason or "")
            for _, r in self.reports.values()
            if upstream in r.upstreams
        ]
        live = [(until, why) for until, why in found if until is not None and until > now]
        return max(live) if live else None

    def rejected(self, upstream: str) -> int:
        return sum(
            r.upstreams[upstream].rejected
            for _, r in self.reports.values()
            if upstream in r.upstreams
        )

    def instances(self) -> dict[str, dict[str, Any]]:
        """Per instance: its workers and what they counted."""
        grouped: dict[str, list[tuple[float, WorkerReport]]] = {}
        for received, report in self.reports.values():
            grouped.setdefault(report.instance, []).append((received, report))
        out: dict[str, dict[str, Any]] = {}
        for instance, members in sorted(grouped.items()):
            counters = Counters.combine([r.counters for _, r in members])
            out[instance] = {
                "total_requests": counters.requests,
                "total_errors": counters.errors,
                "total_bytes_sent": counters.bytes_out,
                "in_flight": counters.in_flight,
                "workers": {
                    str(r.pid): {
                        "total_requests": r.counters.requests,
                        "total_errors": r.counters.errors,
                        "report_age_s": round(max(0.0, self.at - received), 3),
                        "upstreams": {k: asdict(v) for k, v in r.upstreams.items()},
                    }
                    for received, r in sorted(members, key=lambda m: m[1].pid)
                },
            }
        return out
