"""Per-upstream AIMD controller of an admission rate (requests per second); pure.

The shell admits requests through a ``Gcra`` paced at ``limiter.limit``, records the
upstream's verdict on each admitted request (``record``), and calls ``decide`` often
(e.g. on every request); ``decide`` closes a window once ``window_s`` has passed and
returns the ``Decision``, after which the shell calls ``gcra.set_rate(limiter.limit)``.

Outcomes
    SUCCESS and ERROR (upstream 5xx or 429, connect failure, reset, timeout) are the
    samples; IGNORED (client abort) counts as an admitted request for utilisation but
    says nothing about the upstream. The limiter's own rejections are not recorded.
    Record when the verdict is known: at response headers, or at the failure.

Rules, applied when a window closes (``_rule``; one exact test per rule)
    * fewer than ``min_samples`` samples: no decision, the counts carry into the next
      window (skipping such windows could freeze the limit at low rates); a carry older
      than ``max_carry_windows`` windows is dropped as stale;
    * error rate >= ``severe_threshold`` (50 %): ``limit *= severe_factor`` (0.5);
    * error rate > ``cut_threshold`` (10 %): ``limit *= cut_factor`` (0.8);
      either cut starts ``cooldown_windows`` (2) decisions without increase;
    * error rate < ``grow_threshold`` (2 %), not cooling down, and utilisation
      (admitted / (limit * window duration)) >= ``utilisation_to_grow`` (0.5): grow;
    * otherwise hold: 2..10 % errors are tolerated rather than chased (an upstream may
      fail that often whatever the load), and an unused limit is not raised (else
      light traffic drifts it to the maximum and a later burst meets a flood of
      errors).
    The result is clamped to ``[min_limit, max_limit]``.

Growth rule: ``max(limit * 1.2, limit + 5)`` (``Growth(factor=1.2, step=5.0)``), chosen
by simulation (``python -m tests.unit.adaptive.aimd_sim --sweep``: a fake upstream
serving ``capacity`` req/s and failing the excess, 2000 req/s offered through a Gcra
with burst 10, 1 s windows; "outage" = 10 windows of total failure from 1000, then
capacity 800; "sweep" = capacities 150..950 after 40 windows)::

    growth       outage end  capacity   cap 300 (settled)     50 req/s   sweep
                 -> 640      100 -> 640 limit     mean err    light max  limit/cap  worst err
    x1.05, +1    never (60)  38         307       2.3 %       105        0.74..1.07  6.5 %
    x1.1,  +1    54          19         314       4.4 %       110        1.02..1.10  8.8 %
    x1.1,  +5    39          19         314       4.4 %       110        1.02..1.10  8.8 %
    x1.15, +5    30          13         324       7.3 %       115        1.02..1.10  9.2 %
    x1.2,  +1    29          10         330       9.2 %       120        1.02..1.11 10.0 %
    x1.2,  +5    25          10         330       9.2 %       120        1.02..1.11 10.0 %
    x1.25, +1    24           8         305..381  6.6 %       125        0.89..1.27  9.4 %
    x1.3,  +1    21           7         309       2.9 %       130        0.91..1.25 10.0 %

Targets: recovery to 0.8 x capacity within 30 windows after an outage, and at most 120
after light traffic (50 req/s is exactly half the initial limit, so it allows one
step). They pin the factor at 1.2: x1.15 is at the recovery bound, x1.25 breaks the
light-traffic one. Below ``min_samples / window_s`` (20 req/s) a decision needs two
windows (the carry), so the +5 floor lifts the limit out of that zone in two decisions
instead of four: 25 windows instead of 29. The +5 % rule is the slow recovery Netflix
users reported (concurrency-limits #147).

Known limit of the rules themselves: under steady overload the limit parks wherever a
growth step lands between 1.02 and 1.11 x capacity, i.e. inside the 2..10 % hold band,
and stays there (worst mean error 10.0 % over the sweep). That is the hold band doing
what it says; leaving it would need a decrease at <= 10 % errors.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["AimdLimiter", "Decision", "Growth", "LimiterConfig", "Outcome"]


class Outcome(Enum):
    SUCCESS = "success"
    ERROR = "error"
    IGNORED = "ignored"


@dataclass(frozen=True)
class Growth:
    """``new = max(limit * factor, limit + step)``: multiplicative with an additive floor."""

    factor: float = 1.2
    step: float = 5.0

    def apply(self, limit: float) -> float:
        return max(limit * self.factor, limit + self.step)


@dataclass(frozen=True)
class LimiterConfig:
    min_limit: float = 10.0
    max_limit: float = 1000.0
    initial: float = 100.0
    window_s: float = 1.0
    min_samples: int = 20
    cut_threshold: float = 0.10
    severe_threshold: float = 0.50
    cut_factor: float = 0.8
    severe_factor: float = 0.5
    grow_threshold: float = 0.02
    cooldown_windows: int = 2
    utilisation_to_grow: float = 0.5
    growth: Growth = field(default_factory=Growth)
    max_carry_windows: int = 60
    max_decisions: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.min_limit <= self.initial <= self.max_limit:
            raise ValueError("need 0 < min_limit <= initial <= max_limit")
        if not (math.isfinite(self.max_limit) and self.window_s > 0):
            raise ValueError("max_limit must be finite and window_s > 0")
        if not 0 <= self.grow_threshold <= self.cut_threshold <= self.severe_threshold <= 1:
            raise ValueError("need 0 <= grow_threshold <= cut_threshold <= severe_threshold <= 1")
        if not 0 < self.severe_factor <= self.cut_factor < 1:
            raise ValueError("need 0 < severe_factor <= cut_factor < 1")
        if self.growth.factor < 1 or self.growth.step < 0 or self.growth.apply(1.0) <= 1.0:
            raise ValueError("growth must increase the limit (factor >= 1, step >= 0)")
        if self.min_samples < 1 or self.cooldown_windows < 0 or self.max_decisions < 1:
            raise ValueError("need min_samples >= 1, cooldown_windows >= 0, max_decisions >= 1")
        if self.max_carry_windows < 1 or self.utilisation_to_grow < 0:
            raise ValueError("need max_carry_windows >= 1 and utilisation_to_grow >= 0")


@dataclass(frozen=True)
class Decision:
    """What a closed window decided; ``old == new`` for a hold."""

    at: float
    old: float
    new: float
    error_rate: float
    samples: int
    utilisation: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "at": self.at,
            "old": round(self.old, 3),
            "new": round(self.new, 3),
            "error_rate": round(self.error_rate, 4),
            "samples": self.samples,
            "utilisation": round(self.utilisation, 4),
            "reason": self.reason,
        }


class AimdLimiter:
    """Admission rate of one upstream from its error rate; see the module docstring."""

    def __init__(self, config: LimiterConfig | None = None) -> None:
        self.config = config or LimiterConfig()
        self._limit = float(self.config.initial)
        self._window_start: float | None = None
        self._successes = 0
        self._errors = 0
        self._admitted = 0
        self._cooldown_until: float | None = None
        self._carried = 0
        self._decisions: deque[Decision] = deque(maxlen=self.config.max_decisions)
        self._totals = {"success": 0, "error": 0, "ignored": 0, "windows": 0, "stale": 0}

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return tuple(self._decisions)

    def record(self, now: float, outcome: Outcome) -> None:
        """Count one admitted request's outcome in the current window."""
        if self._window_start is None:
            self._window_start = now
        self._admitted += 1
        if outcome is Outcome.SUCCESS:
            self._successes += 1
        elif outcome is Outcome.ERROR:
            self._errors += 1
        self._totals[outcome.value] += 1

    def decide(self, now: float) -> Decision | None:
        """Close the window if ``window_s`` passed; ``None`` if no decision was made."""
        cfg = self.config
        start = self._window_start
        if start is None:
            self._window_start = now
            return None
        elapsed = now - start
        if elapsed < cfg.window_s:
            return None
        self._totals["windows"] += 1
        samples = self._successes + self._errors
        if samples < cfg.min_samples:
            if elapsed >= cfg.max_carry_windows * cfg.window_s:
                self._totals["stale"] += 1
                self._reset(now)
            else:
                self._carried += 1
            return None
        error_rate = self._errors / samples
        utilisation = self._admitted / (self._limit * elapsed)
        old = self._limit
        wanted, reason = self._rule(now, old, error_rate, utilisation)
        new = min(cfg.max_limit, max(cfg.min_limit, wanted))
        if new != wanted:
            reason += f" (clamped to {new:g})"
        self._limit = new
        decision = Decision(now, old, new, error_rate, samples, utilisation, reason)
        self._decisions.append(decision)
        self._reset(now)
        return decision

    def _rule(
        self, now: float, limit: float, error_rate: float, utilisation: float
    ) -> tuple[float, str]:
        cfg = self.config
        if error_rate >= cfg.severe_threshold:
            self._start_cooldown(now)
            return limit * cfg.severe_factor, "severe cut"
        if error_rate > cfg.cut_threshold:
            self._start_cooldown(now)
            return limit * cfg.cut_factor, "cut"
        if self._cooldown_until is not None and now < self._cooldown_until:
            return limit, "hold: cooldown"
        if error_rate >= cfg.grow_threshold:
            return limit, "hold: errors in tolerance band"
        if utilisation < cfg.utilisation_to_grow:
            return limit, "hold: limit underused"
        return cfg.growth.apply(limit), "grow"

    def _start_cooldown(self, now: float) -> None:
        """No increase in windows closing within ``cooldown_windows`` windows of time.

        Counted in time, not decisions, so windows carried at low rates count too; the
        half window of slack absorbs windows closed a little late by the shell.
        """
        self._cooldown_until = now + (self.config.cooldown_windows + 0.5) * self.config.window_s

    def _reset(self, now: float) -> None:
        self._window_start = now
        self._successes = self._errors = self._admitted = 0
        self._carried = 0

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state for /stats."""
        return {
            "limit": round(self._limit, 3),
            "bounds": [self.config.min_limit, self.config.max_limit],
            "window_start": self._window_start,
            "window": {
                "successes": self._successes,
                "errors": self._errors,
                "admitted": self._admitted,
                "carried_windows": self._carried,
            },
            "cooldown_until": self._cooldown_until,
            "totals": dict(self._totals),
            "decisions": [d.to_dict() for d in self._decisions],
        }
