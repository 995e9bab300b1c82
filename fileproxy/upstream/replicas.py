"""The replicas of FILEPROXY_UPSTREAM: one client (pool, limits, TCP options) each, which
one gets the next request (``adaptive.balancer``), which are out (``adaptive.ejection``)
and how many retries may run (``adaptive.retry_budget``).

The brains decide; this shell holds their state per worker, feeds them what the proxy
observed, and probes the replicas for /ready. Ejections found here are shared with the
fleet by the app (``ejection`` out, ``adopt`` in; ``app._share_ejections``).
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from fileproxy.adaptive.balancer import ReplicaLoad, pick
from fileproxy.adaptive.ejection import EjectionConfig, OutlierDetector
from fileproxy.adaptive.retry_budget import CONNECT, RetryBudget, RetryThrottle
from fileproxy.settings import ReplicaSpec, Settings
from fileproxy.upstream.client import UpstreamClient, UpstreamResponse

log = logging.getLogger("fileproxy.upstream")

SIZE_MEMORY = 4096  # paths whose last response length is remembered for the cost
EJECT_MAX_FACTOR = 10  # an ejection lasts at most 10 x FILEPROXY_EJECT_TIME


@dataclass
class Replica:
    index: int
    spec: ReplicaSpec
    client: UpstreamClient
    load: ReplicaLoad
    name: str = field(init=False)
    last_probe_ok_at: float | None = None  # wall clock
    last_probe_failed_at: float | None = None
    last_check: dict[str, Any] | None = None  # the last active health check
    counts: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "failures": 0, "ejections": 0, "resumes": 0}
    )

    def __post_init__(self) -> None:
        self.name = self.client.name  # host:port

    def last_answer_at(self) -> float | None:
        """Wall clock of its last response head or successful probe."""
        times = [t for t in (self.client.last_response_at, self.last_probe_ok_at) if t]
        return max(times) if times else None


class Attempt:
    """One try at a replica, and everything it holds, released by its ``with`` block.

    From ``__enter__`` to its end the try counts in its replica's ``in_flight``; a try
    that is a counted retry holds a slot of the retry budget until it has its answer
    (``answered``); the upstream response it got (``response``) is released (back to
    the pool only when its body was read to the end) or closed. ``end`` does all of
    it once, early when the upstream body is complete (a spooled download: the client
    still reading holds nothing of the replica), else when the block exits — whatever
    exits it: a return, a retry, an error or a cancellation.
    """

    __slots__ = ("_ended", "budgeted", "replica", "replicas", "response")

    def __init__(self, replicas: ReplicaSet, replica: Replica, budgeted: bool) -> None:
        self.replicas, self.replica, self.budgeted = replicas, replica, budgeted
        self.response: UpstreamResponse | None = None
        self._ended = True  # until entered

    def __enter__(self) -> Attempt:
        self._ended = False
        self.replicas.begin(self.replica)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()

    def answered(self) -> None:
        """The try has its answer (or failed): its retry-budget slot, if any, is free."""
        if self.budgeted:
            self.budgeted = False
            self.replicas.budget.finish()

    def end(self) -> None:
        """Give back all the try holds (once; later calls do nothing)."""
        self.answered()
        if self.response is not None:
            self.response.release()
        if not self._ended:
            self._ended = True
            self.replicas.end(self.replica)

    def take_over(self, other: Attempt) -> None:
        """Carry on at ``other``'s replica (a download resumed there): this try's replica
        is ended now, ``other``'s is this try's until it ends; ``other`` (its response
        taken over by this one's) becomes an empty shell whose end does nothing."""
        if not self._ended:
            self.replicas.end(self.replica)
        self.replica, self._ended = other.replica, other._ended
        other._ended, other.response = True, None


class ReplicaSet:
    def __init__(
        self, settings: Settings, clients: list[UpstreamClient], rng: random.Random | None = None
    ) -> None:
        self.replicas = [
            Replica(i, spec, client, ReplicaLoad(weight=float(spec.weight)))
            for i, (spec, client) in enumerate(zip(settings.upstreams, clients, strict=True))
        ]
        self.detector = OutlierDetector(
            EjectionConfig(
                consecutive=settings.eject_after,
                base_s=settings.eject_time,
                max_s=settings.eject_time * EJECT_MAX_FACTOR,
            ),
            len(self.replicas),
        )
        self.budget = RetryBudget(
            settings.retry_budget,
            settings.retry_min_concurrency,
            RetryThrottle(max_tokens=settings.retry_tokens),
        )
        self.slow_start_s = settings.slow_start
        self.rng = rng or random.Random()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.resumes = {"ok": 0, "failed": 0}
        self.several = len(self.replicas) > 1

    @property
    def first(self) -> Replica:
        return self.replicas[0]

    def usable(self, now: float, replica: Replica) -> bool:
        health = self.detector.health[replica.index]
        was_out = health.ejected_until is not None
        usable = self.detector.usable(now, replica.index)
        if was_out and usable:
            replica.load.warm_from = health.back_at  # slow start
            log.info("replica back from ejection", extra={"upstream": replica.name})
        return usable

    def choose(
        self, now: float, exclude: tuple[Replica, ...] = (), path: str | None = None
    ) -> Replica | None:
        """The replica for the next try; None when every usable one was tried."""
        if not self.several:
            return None if exclude else self.first
        pool = [r for r in self.replicas if r not in exclude and self.usable(now, r)]
        primaries = [r for r in pool if not r.spec.backup]
        candidates = primaries or pool
        if not candidates:
            if exclude:
                return None
            candidates = [r for r in self.replicas if not r.spec.backup]
        size = self._sizes.get(path) if path is not None else None
        index = pick(
            [r.load for r in self.replicas],
            [r.index for r in candidates],
            now,
            self.rng,
            size=size,
            slow_start_s=self.slow_start_s,
        )
        return self.replicas[index]

    def others_first(self, now: float, failed: Replica) -> list[Replica]:
        """Replicas to resume from: the usable others (balanced), then ``failed`` itself."""
        order: list[Replica] = []
        while (replica := self.choose(now, (failed, *order))) is not None:
            order.append(replica)
        return [*order, failed]

    # --- what the proxy observed ---

    def begin(self, replica: Replica) -> None:
        replica.load.in_flight += 1
        replica.load.picked += 1
        replica.counts["requests"] += 1

    def end(self, replica: Replica) -> None:
        replica.load.in_flight -= 1
        if replica.load.in_flight < 0:  # ended twice: a bug, never hidden
            log.error("replica in_flight below zero", extra={"upstream": replica.name})

    def attempt(self, replica: Replica, *, budgeted: bool = False) -> Attempt:
        """One try at ``replica``, to be used as ``with replicas.attempt(r) as attempt:``."""
        return Attempt(self, replica, budgeted)

    def headers(self, now: float, replica: Replica, ttfb_s: float) -> None:
        if self.several:  # one replica: nothing to balance
            replica.load.observe_ttfb(now, ttfb_s)

    def succeeded(self, replica: Replica) -> None:
        self.detector.success(replica.index)
        self.budget.answered_try()

    def failed(self, now: float, replica: Replica, reason: str) -> None:
        """A try at ``replica`` failed (``reason``: a retry kind, ``status N``, ...); a
        connect failure reached no upstream and costs the retry throttle nothing."""
        if reason != CONNECT:
            self.budget.failed_try()
        self._failed(now, replica, reason)

    def _failed(self, now: float, replica: Replica, reason: str) -> None:
        replica.counts["failures"] += 1
        until = self.detector.failure(now, replica.index, reason)
        if until is not None:
            replica.counts["ejections"] += 1
            log.warning(
                "replica ejected",
                extra={
                    "upstream": replica.name,
                    "reason": reason,
                    "seconds": round(until - now, 3),
                },
            )

    def checked(self, now: float, wall: float, replica: Replica, failure: str | None) -> None:
        """An active health check (FILEPROXY_HEALTH_PATH) passed (``failure`` None) or not."""
        replica.last_check = {"at": wall, "ok": failure is None, "detail": failure}
        if failure is not None:
            replica.last_probe_failed_at = wall
            self._failed(now, replica, f"health check: {failure}")  # no try: no token
            return
        replica.last_probe_ok_at = wall
        if self.detector.readmit(now, replica.index):
            replica.load.warm_from = now  # slow start
            log.info("replica passed its health check: back", extra={"upstream": replica.name})

    def body_done(self, now: float, replica: Replica, path: str, size: int, seconds: float) -> None:
        replica.load.observe_body(now, size, seconds)
        self._sizes[path] = size
        self._sizes.move_to_end(path)
        if len(self._sizes) > SIZE_MEMORY:
            self._sizes.popitem(last=False)

    # --- the fleet (shared through the state store by the app, see app._share_ejections) ---

    def ejection(self, now: float, wall: float, replica: Replica) -> tuple[float, str] | None:
        """This worker's own ejection of ``replica``: (end, wall clock; reason), or None."""
        health = self.detector.health[replica.index]
        if not self.usable(now, replica) and health.ejected_until is not None:
            return wall + (health.ejected_until - now), health.reason or ""
        return None

    def adopt(self, now: float, wall: float, replica: Replica, until: float, reason: str) -> None:
        """Another worker ejected ``replica`` until ``until`` (wall clock): so does this one."""
        if not reason.startswith("fleet: "):
            reason = f"fleet: {reason}"
        if self.detector.adopt(now, replica.index, now + (until - wall), reason):
            log.warning(
                "replica ejected by the fleet",
                extra={
                    "upstream": replica.name,
                    "reason": reason,
                    "seconds": round(until - wall, 3),
                },
            )

    # --- reporting ---

    def last_answer_at(self, now: float) -> float | None:
        """Wall clock of the latest answer of a replica that is not ejected (/ready)."""
        times = [
            t
            for r in self.replicas
            if self.usable(now, r) and (t := r.last_answer_at()) is not None
        ]
        return max(times) if times else None

    def snapshot(self, now: float, wall: float, replica: Replica) -> dict[str, Any]:
        usable = self.usable(now, replica)
        health = self.detector.health[replica.index].snapshot(now)
        load = replica.load
        warmth = load.warmth(now, self.slow_start_s)
        answered = replica.last_answer_at()
        state = health["state"]
        if replica.last_check is not None and not replica.last_check["ok"] and usable:
            state = "probing"  # its health check fails; not ejected (yet)
        elif state == "healthy" and warmth < 1.0:
            state = "slow_start"
        elif state == "healthy" and (answered is None or wall - answered > 10.0):
            state = "probing"  # nothing heard lately
        client = replica.client
        return {
            **health,
            "state": state,
            "usable": usable,
            "weight": replica.spec.weight,
            "backup": replica.spec.backup,
            "in_flight": load.in_flight,
            "ttfb_ewma_ms": round(load.ttfb(now) * 1000, 3),
            "goodput_ewma_bps": round(load.goodput_bps) if load.goodput_bps else None,
            "slow_start_share": round(warmth, 3),
            "connections": client.pool_size(),
            "waiting_for_connection": client.pool.waiting(),
            "last_response_age_s": None if answered is None else round(wall - answered, 3),
            "last_failure": client.last_failure,
            "last_check": None
            if replica.last_check is None
            else {
                "ok": replica.last_check["ok"],
                "age_s": round(wall - replica.last_check["at"], 3),
                "detail": replica.last_check["detail"],
            },
            **replica.counts,
        }

    def report(self) -> dict[str, Any]:
        """For /health: every replica's state."""
        now, wall = time.monotonic(), time.time()
        return {r.name: self.snapshot(now, wall, r) for r in self.replicas}
