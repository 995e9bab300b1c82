"""A simulated link feeding a QualityClassifier under a fake clock (test helper).

One request every ``interval_s``. Its round trip is ``rtt_ms(t, rng)``; the transport
observation is the kernel's smoothed RTT (srtt += (sample - srtt) / 8, RFC 6298), the
HTTP observation is the round trip plus ``server_ms`` of server time, or
``hanging_ms`` for a ``hanging_share`` of requests (server think time). The classifier
is evaluated after every request (it rate-limits itself).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fileproxy.adaptive.quality_classifier import Level, QualityClassifier

RttModel = Callable[[float, random.Random], float]


def jittered(base_ms: float, jitter: float = 0.10) -> RttModel:
    """``base_ms`` with uniform relative jitter (0.10 = +-10 %)."""
    return lambda _t, rng: base_ms * rng.uniform(1.0 - jitter, 1.0 + jitter)


def uniform(low_ms: float, high_ms: float) -> RttModel:
    return lambda _t, rng: rng.uniform(low_ms, high_ms)


def step(before: RttModel, after: RttModel, at_s: float) -> RttModel:
    return lambda t, rng: before(t, rng) if t < at_s else after(t, rng)


@dataclass
class LinkSim:
    classifier: QualityClassifier
    rtt_ms: RttModel
    seed: int = 1
    interval_s: float = 0.1
    server_ms: float = 1.0
    hanging_share: float = 0.0
    hanging_ms: float = 10_000.0
    now: float = 0.0
    srtt: float | None = None
    timeline: list[tuple[float, Level]] = field(default_factory=list)
    hanging_sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def run(self, duration_s: float) -> Level:
        """Advance ``duration_s`` of simulated time; returns the level at the end."""
        steps = round(duration_s / self.interval_s)
        start = self.now
        for i in range(1, steps + 1):
            t = start + i * self.interval_s
            rtt = self.rtt_ms(t, self.rng)
            self.srtt = rtt if self.srtt is None else self.srtt + (rtt - self.srtt) / 8
            self.classifier.observe_transport(t, self.srtt)
            if self.hanging_share and self.rng.random() < self.hanging_share:
                self.hanging_sent += 1
                self.classifier.observe_http_rtt(t, self.hanging_ms)
            else:
                self.classifier.observe_http_rtt(t, rtt + self.server_ms)
            self.timeline.append((t, self.classifier.evaluate(t)))
        self.now = start + steps * self.interval_s
        return self.classifier.level

    def first_time_at(self, level: Level, after: float = 0.0) -> float | None:
        """When the level first was ``level`` at or after ``after``."""
        return next((t for t, lv in self.timeline if t >= after and lv is level), None)
