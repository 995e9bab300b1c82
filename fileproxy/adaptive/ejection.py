"""Passive health: outlier ejection of replicas that fail in a row.

A replica that fails ``consecutive`` times in a row (connect failure, reset,
timeout, a 502/503/504) is ejected from balancing for ``base_s`` times the number
of its ejections so far, at most ``max_s`` (Envoy's outlier detection: 5
consecutive gateway failures, 30 s x ejections, max 300 s). Never more than
``max_fraction`` of the replicas are out at once (Envoy's max_ejection_percent):
with one replica nothing is ever ejected, so one upstream behaves as before.

A replica whose ejection ran out is usable again, and ``back_at`` tells the
balancer when, for its slow start. Pure: time is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EjectionConfig:
    consecutive: int = 5  # 0: never eject
    base_s: float = 30.0
    max_s: float = 300.0
    max_fraction: float = 0.5


@dataclass
class ReplicaHealth:
    failures: int = 0  # consecutive
    ejections: int = 0  # how many times so far
    ejected_until: float | None = None
    reason: str | None = None  # of the last ejection
    back_at: float | None = None  # when the last ejection ran out

    def snapshot(self, now: float) -> dict[str, object]:
        ejected = self.ejected_until is not None and now < self.ejected_until
        return {
            "state": "ejected" if ejected else "healthy",
            "ejected_for_s": round(self.ejected_until - now, 3)
            if ejected and self.ejected_until is not None
            else None,
            "reason": self.reason,
            "ejections": self.ejections,
            "consecutive_failures": self.failures,
        }


@dataclass
class OutlierDetector:
    config: EjectionConfig
    replicas: int
    health: list[ReplicaHealth] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.health:
            self.health = [ReplicaHealth() for _ in range(self.replicas)]

    @property
    def max_ejected(self) -> int:
        return math.floor(self.replicas * self.config.max_fraction)

    def usable(self, now: float, index: int) -> bool:
        """Whether replica ``index`` takes requests; ends an ejection that ran out."""
        health = self.health[index]
        if health.ejected_until is None:
            return True
        if now < health.ejected_until:
            return False
        health.back_at, health.ejected_until = health.ejected_until, None
        return True

    def ejected(self, now: float) -> int:
        return sum(not self.usable(now, i) for i in range(self.replicas))

    def success(self, index: int) -> None:
        self.health[index].failures = 0

    def adopt(self, now: float, index: int, until: float, reason: str) -> bool:
        """Another worker of the fleet ejected replica ``index`` until ``until``: take it
        over (within max_fraction; the back-off multiplier is not raised); whether taken."""
        health = self.health[index]
        if until <= now or not self.usable(now, index):
            return False
        if self.ejected(now) + 1 > self.max_ejected:
            return False
        health.ejected_until, health.reason, health.failures = until, reason, 0
        return True

    def readmit(self, now: float, index: int) -> bool:
        """An active health check passed: an ejected replica is back now; whether it was out."""
        health = self.health[index]
        health.failures = 0
        if health.ejected_until is None or now >= health.ejected_until:
            return False
        health.back_at, health.ejected_until = now, None
        return True

    def failure(self, now: float, index: int, reason: str) -> float | None:
        """One more failure of replica ``index``; the end of its ejection when it is ejected."""
        health = self.health[index]
        health.failures += 1
        consecutive = self.config.consecutive
        if not consecutive or health.failures < consecutive or not self.usable(now, index):
            return None
        if self.ejected(now) + 1 > self.max_ejected:
            return None  # never more than max_fraction out: keep counting
        health.ejections += 1
        health.failures = 0
        health.reason = reason
        health.ejected_until = now + min(self.config.max_s, self.config.base_s * health.ejections)
        return health.ejected_until
