"""The state a fleet of workers shares, behind one small interface with two stores.

- ``EmbeddedStore`` (no ``REDIS_URL``): in the worker's memory; the fleet is this one
  worker (scope ``worker``).
- ``RedisStore`` (``fileproxy.state.redis_store``): one Redis or a Redis Cluster; the fleet
  is every worker of every instance that uses the same Redis and key prefix (scope
  ``cluster``).

Both keep, per upstream, the limiter's ``LimiterState`` with the fleet's counts of the
open window (and when a tick last brought a sample, for the idle rule), whether the
limit is enforced, a decision counter and the last level; a GCRA admission clock; and,
for the whole fleet, each worker's last report. The time of every read-modify-write is
the store's own (Redis ``TIME``), so workers whose clocks differ still agree on windows,
cooldowns and GCRA.

A window decision is taken by exactly one caller: ``tick`` adds the caller's counts
and, once the window has run for ``window_s``, hands the caller a *lease* on it (no
other caller gets one until the lease is committed or has expired); the caller decides
with the pure rule (``adaptive.close_window``) and ``commit``\\ s, which succeeds only
for the lease holder. No leader election: any worker may tick, the first one after the
window closes decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fileproxy.adaptive import LimiterState, WindowClose
from fileproxy.adaptive.gcra import gcra_step

#: A lease outlives a decider that died mid-decision by this long at most.
LEASE_S = 2.0
#: Limiter state and saved level: kept across restarts of the fleet, gone after a day idle.
STATE_TTL_S = 86400
#: An admission clock is kept this long past its last use; a new one starts drained, so
#: a Redis that restarted empty (or a first cut) lets no burst through.
ADMISSION_KEEP_S = 60.0
#: A worker that published no report for this long is no longer part of the fleet.
REPORT_AGE_OUT_S = 5.0
#: The reports themselves disappear this long after the last worker published.
REPORTS_TTL_S = 60


class StoreError(Exception):
    """The store did not answer (connection refused, timeout, cluster down, script error)."""


@dataclass(frozen=True)
class WindowCounts:
    """A worker's outcomes since its last tick, added to the fleet's open window."""

    successes: int = 0
    errors: int = 0
    admitted: int = 0


@dataclass(frozen=True)
class SharedLimiter:
    """One upstream's limiter as the store holds it for the fleet."""

    state: LimiterState
    enforcing: bool
    decisions: int = 0
    last_decision: dict[str, Any] | None = None
    level: str | None = None  # the fleet's last quality level, kept across restarts

    def counts(self) -> WindowCounts:
        return WindowCounts(self.state.successes, self.state.errors, self.state.admitted)


@dataclass(frozen=True)
class Tick:
    now: float  # the store's clock, seconds
    limiter: SharedLimiter
    lease: bool  # True: this caller decides the closed window and must commit


@dataclass(frozen=True)
class Report:
    """One worker's last published report and when the store received it."""

    worker: str
    at: float
    payload: bytes


class StateStore(Protocol):
    scope: str  # "worker" or "cluster"
    description: str  # for /health and logs; never holds a password
    report_age_out_s: float

    async def tick(
        self,
        upstream: str,
        counts: WindowCounts,
        *,
        token: str,
        window_s: float,
        initial: SharedLimiter,
    ) -> Tick:
        """Add ``counts`` to the open window; a lease when the window has run its course."""
        ...

    async def commit(
        self,
        upstream: str,
        *,
        token: str,
        seen: WindowCounts,
        closed: WindowClose,
        enforcing: bool,
        level: str | None,
    ) -> bool:
        """Apply a leased decision; ``seen`` is what the tick returned, subtracted when
        the counts reset. False when the lease was no longer ours (nothing applied)."""
        ...

    async def pace(self, upstream: str, rate: float, burst: int) -> tuple[bool, float]:
        """One GCRA admission for the fleet: (admitted, seconds until one would be)."""
        ...

    async def publish(self, worker: str, payload: bytes) -> tuple[float, list[Report]]:
        """Store this worker's report; (store time, every report fresher than the age-out)."""
        ...

    async def close(self) -> None: ...


def limiter_key(prefix: str, upstream: str) -> str:
    """One hash tag per upstream, so a decision's keys share one Cluster slot."""
    return f"{prefix}{{up:{upstream}}}:limiter"


def admission_key(prefix: str, upstream: str) -> str:
    return f"{prefix}{{up:{upstream}}}:admission"


def report_keys(prefix: str) -> tuple[str, str]:
    """The fleet's reports and the time each was received, in one slot."""
    return f"{prefix}{{fleet}}:reports", f"{prefix}{{fleet}}:seen"


@dataclass
class _Gcra:
    tat: float = 0.0  # theoretical arrival time, store clock


@dataclass
class EmbeddedStore:
    """The store in one worker's memory: the same semantics as ``RedisStore``."""

    clock: Callable[[], float] = time.time
    scope: str = "worker"
    description: str = "embedded (in-process, one worker)"
    report_age_out_s: float = REPORT_AGE_OUT_S
    _limiters: dict[str, SharedLimiter] = field(default_factory=dict)
    _leases: dict[str, tuple[str, float]] = field(default_factory=dict)
    _admission: dict[str, _Gcra] = field(default_factory=dict)
    _reports: dict[str, Report] = field(default_factory=dict)

    async def tick(
        self,
        upstream: str,
        counts: WindowCounts,
        *,
        token: str,
        window_s: float,
        initial: SharedLimiter,
    ) -> Tick:
        now = self.clock()
        limiter = self._limiters.get(upstream)
        if limiter is None:
            limiter = replace(initial, state=replace(initial.state, window_start=now))
        state = limiter.state
        limiter = replace(
            limiter,
            state=replace(
                state,
                successes=state.successes + counts.successes,
                errors=state.errors + counts.errors,
                admitted=state.admitted + counts.admitted,
                # the store's clock: when the fleet last saw an upstream verdict (idle rule)
                last_sample_at=now if counts.successes + counts.errors else state.last_sample_at,
            ),
        )
        self._limiters[upstream] = limiter
        window_start = limiter.state.window_start
        assert window_start is not None
        holder = self._leases.get(upstream)
        lease = now - window_start >= window_s and (holder is None or holder[1] < now)
        if lease:
            self._leases[upstream] = (token, now + LEASE_S)
        return Tick(now, limiter, lease)

    async def commit(
        self,
        upstream: str,
        *,
        token: str,
        seen: WindowCounts,
        closed: WindowClose,
        enforcing: bool,
        level: str | None,
    ) -> bool:
        holder = self._leases.get(upstream)
        current = self._limiters.get(upstream)
        if holder is None or holder[0] != token or current is None:
            return False
        del self._leases[upstream]
        state = current.state
        if closed.outcome.resets_counts:
            state = replace(
                state,
                successes=state.successes - seen.successes,
                errors=state.errors - seen.errors,
                admitted=state.admitted - seen.admitted,
            )
        decided = closed.decision
        self._limiters[upstream] = SharedLimiter(
            state=replace(
                state,
                limit=closed.state.limit,
                window_start=closed.state.window_start,
                cooldown_until=closed.state.cooldown_until,
                carried=closed.state.carried,
            ),
            enforcing=enforcing,
            decisions=current.decisions + (decided is not None),
            last_decision=decided.to_dict() if decided is not None else current.last_decision,
            level=level if level is not None else current.level,
        )
        return True

    async def pace(self, upstream: str, rate: float, burst: int) -> tuple[bool, float]:
        now = self.clock()
        interval = 1.0 / rate
        tolerance = (burst - 1) * interval
        gcra = self._admission.get(upstream)
        if gcra is None or now - gcra.tat > ADMISSION_KEEP_S:
            gcra = self._admission[upstream] = _Gcra(tat=now + tolerance)  # starts drained
        admitted, wait, tat = gcra_step(gcra.tat, now, interval, tolerance)
        if admitted:
            gcra.tat = tat
        return admitted, wait

    async def publish(self, worker: str, payload: bytes) -> tuple[float, list[Report]]:
        now = self.clock()
        self._reports[worker] = Report(worker, now, payload)
        age_out = self.report_age_out_s
        for stale in [w for w, r in self._reports.items() if now - r.at > age_out]:
            del self._reports[stale]
        return now, list(self._reports.values())

    async def close(self) -> None:
        return None
