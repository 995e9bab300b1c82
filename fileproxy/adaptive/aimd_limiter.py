"""Per-upstream AIMD controller of an admission rate (requests per second); pure.

The shell admits requests through a ``Gcra`` paced at ``limiter.limit``, records the
upstream's verdict on each admitted request (``record``), and calls ``decide`` often
(e.g. on every request); ``decide`` closes a window once ``window_s`` has passed and
returns the ``Decision``, after which the shell calls ``gcra.set_rate(limiter.limit)``.

Outcomes
    SUCCESS and ERROR are the samples. ERROR is an overload signal only: a connect
    failure, reset or timeout, or an upstream status of ``FILEPROXY_LIMIT_ERROR_STATUSES``
    (502, 503, 504 by default) that is the upstream's, not one path's (the shell weighs
    them with ``failure_spread``); any other answer, a 500 or a 429 included, is a SUCCESS
    (the upstream answered: one broken URL is no reason to throttle the others). IGNORED
    (client abort) counts as an admitted request for utilisation but says nothing about
    the upstream. The limiter's own rejections are not recorded. Record when the verdict
    is known: at response headers, or at the failure.

Rules, applied when a window closes (``close_window``; one exact test per rule)
    * idle: after a cut (and its cooldown), a window with fewer than ``min_samples``
      samples, none of them in the last ``window_s`` (no sample at all, or the traffic
      stopped): the thin counts are
      dropped and the limit grows once (``growth``) per full ``window_s`` of silence
      (counted from the last sample, the window start or the cooldown end, whichever is
      latest). A cut thus recovers with time once the upstream is left alone (1 s
      windows: from 10 back to 1000 req/s in 24 silent windows after the cooldown) and
      the first burst after a quiet period does not meet a stale cut. At the maximum
      there is nothing to grow: no decision;
    * fewer than ``min_samples`` samples otherwise: no decision, the counts carry into
      the next window (skipping such windows could freeze the limit at low rates); a
      carry older than ``max_carry_windows`` windows is dropped as stale;
    * error rate >= ``severe_threshold`` (50 %): ``limit *= severe_factor`` (0.5);
    * error rate > ``cut_threshold`` (10 %): ``limit *= cut_factor`` (0.8);
      either cut starts ``cooldown_windows`` (2) decisions without increase;
    * error rate < ``grow_threshold`` (2 %), not cooling down, and utilisation
      (admitted / (limit * window duration)) >= ``utilisation_to_grow`` (0.5): grow;
    * the same errors and cooldown but less utilisation, on a limit that was cut:
      grow too ("recover: errors stopped"): light traffic (a health check, a slow
      client) must not keep a stale cut for the next burst;
    * otherwise hold: 2..10 % errors are tolerated rather than chased (an upstream may
      fail that often whatever the load), and a never-cut limit that is unused is not
      raised (else light traffic drifts it to the maximum and a later burst meets a
      flood of errors).
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

Idle recovery and fair share (same simulator, ``python -m tests.unit.adaptive.aimd_sim``):
after 10 windows of total outage from 1000 (cut to 10), with no traffic at all the limit
is back at 0.8 x max in 26 windows and at the maximum (enforcement ends) in 27: the
outage target of 30 windows holds without traffic too. One heavy client (2000 req/s)
and four light ones (20 req/s each) against capacity 300, through ``FairShare`` and
one Gcra: the limit settles at 330 (as without clients told apart), mean error 9.2 %,
the light clients get 100 % of their requests admitted and the heavy one the rest, 250
req/s; without the fair share the light clients got 8.3 %.

Known limit of the rules themselves: under steady overload the limit parks wherever a
growth step lands between 1.02 and 1.11 x capacity, i.e. inside the 2..10 % hold band,
and stays there (worst mean error 10.0 % over the sweep). That is the hold band doing
what it says; leaving it would need a decrease at <= 10 % errors.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum

__all__ = [
    "AimdLimiter",
    "Decision",
    "Growth",
    "LimiterConfig",
    "LimiterState",
    "Outcome",
    "WindowClose",
    "WindowOutcome",
    "close_window",
    "enforcing_after",
]


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


@dataclass(frozen=True)
class LimiterState:
    """What a window decision depends on: the limit, the open window's counts, the cooldown.

    The same record whether one worker keeps it (``AimdLimiter``) or a shared store does
    for the whole fleet (one per upstream, the counts summed over every worker).
    """

    limit: float
    window_start: float | None = None
    successes: int = 0
    errors: int = 0
    admitted: int = 0
    cooldown_until: float | None = None
    carried: int = 0
    last_sample_at: float | None = None  # when the last SUCCESS or ERROR was counted


class WindowOutcome(Enum):
    OPEN = "open"  # window_s has not passed yet (or the first window just opened)
    CARRIED = "carried"  # too few samples: the counts carry into the next window
    STALE = "stale"  # carried for too long: the counts are dropped
    DECIDED = "decided"  # a decision: limit and cooldown updated, counts reset

    @property
    def resets_counts(self) -> bool:
        return self in (WindowOutcome.STALE, WindowOutcome.DECIDED)


@dataclass(frozen=True)
class WindowClose:
    outcome: WindowOutcome
    state: LimiterState
    decision: Decision | None = None


def close_window(config: LimiterConfig, state: LimiterState, now: float) -> WindowClose:
    """Close the window if ``window_s`` passed since ``state.window_start``; pure.

    The one implementation of the rules in the module docstring, for a worker's own
    limiter and for the fleet's shared one alike.
    """
    start = state.window_start
    if start is None:
        return WindowClose(WindowOutcome.OPEN, replace(state, window_start=now))
    elapsed = now - start
    if elapsed < config.window_s:
        return WindowClose(WindowOutcome.OPEN, state)
    samples = state.successes + state.errors
    if samples < config.min_samples and _silent(config, state, now):
        idle = _idle(config, state, now)
        if idle is not None:
            return idle
    if samples < config.min_samples:
        if elapsed >= config.max_carry_windows * config.window_s:
            return WindowClose(WindowOutcome.STALE, _reset(state, now))
        return WindowClose(WindowOutcome.CARRIED, replace(state, carried=state.carried + 1))
    error_rate = state.errors / samples
    utilisation = state.admitted / (state.limit * elapsed)
    old = state.limit
    wanted, reason, cooldown_until = _rule(config, state, now, error_rate, utilisation)
    new = min(config.max_limit, max(config.min_limit, wanted))
    if new != wanted:
        reason += f" (clamped to {new:g})"
    decision = Decision(now, old, new, error_rate, samples, utilisation, reason)
    after = replace(_reset(state, now), limit=new, cooldown_until=cooldown_until)
    return WindowClose(WindowOutcome.DECIDED, after, decision)


def _silent(config: LimiterConfig, state: LimiterState, now: float) -> bool:
    """No sample counted within the last ``window_s``."""
    last = state.last_sample_at
    return state.successes + state.errors == 0 or last is None or now - last >= config.window_s


def _idle(config: LimiterConfig, state: LimiterState, now: float) -> WindowClose | None:
    """The idle rule: one growth step per full window of silence; None if none is due."""
    assert state.window_start is not None
    cooldown = state.cooldown_until
    if cooldown is None:
        return None  # never cut: nothing to recover from
    if now < cooldown:
        return None  # a cut has just been made: no increase, silent or not
    if state.limit >= config.max_limit:
        return None  # nothing to recover: carry or drop as before
    since = max(state.window_start, state.last_sample_at or -math.inf, cooldown)
    steps = math.floor((now - since) / config.window_s + 1e-9)  # 1e-9: float noise
    if steps < 1:
        return None
    old = wanted = state.limit
    for _ in range(steps):
        wanted = config.growth.apply(wanted)
        if wanted >= config.max_limit:
            break
    new = min(config.max_limit, wanted)
    reason = "idle: recover" if steps == 1 else f"idle: recover x{steps}"
    if new != wanted:
        reason += f" (clamped to {new:g})"
    # The thin counts are dropped (as a stale carry would be): the decision rests on the
    # silence, so its error rate and samples are those of the silence, zero.
    decision = Decision(now, old, new, 0.0, 0, 0.0, reason)
    return WindowClose(WindowOutcome.DECIDED, replace(_reset(state, now), limit=new), decision)


def _rule(
    cfg: LimiterConfig, state: LimiterState, now: float, error_rate: float, utilisation: float
) -> tuple[float, str, float | None]:
    """(wanted limit, reason, cooldown end) for a closed window."""
    limit, cooldown_until = state.limit, state.cooldown_until
    # A cut starts a cooldown: no increase in windows closing within ``cooldown_windows``
    # windows of time (counted in time, not decisions, so windows carried at low rates
    # count too; the half window of slack absorbs windows closed a little late).
    cut_cooldown = now + (cfg.cooldown_windows + 0.5) * cfg.window_s
    if error_rate >= cfg.severe_threshold:
        return limit * cfg.severe_factor, "severe cut", cut_cooldown
    if error_rate > cfg.cut_threshold:
        return limit * cfg.cut_factor, "cut", cut_cooldown
    if cooldown_until is not None and now < cooldown_until:
        return limit, "hold: cooldown", cooldown_until
    if error_rate >= cfg.grow_threshold:
        return limit, "hold: errors in tolerance band", cooldown_until
    if utilisation < cfg.utilisation_to_grow:
        if cooldown_until is None:
            return limit, "hold: limit underused", cooldown_until
        # A cut limit recovers once errors stop, used or not: light traffic (a health
        # check, one slow client) must not keep a stale cut for the next burst.
        return cfg.growth.apply(limit), "recover: errors stopped", cooldown_until
    return cfg.growth.apply(limit), "grow", cooldown_until


def _reset(state: LimiterState, now: float) -> LimiterState:
    return replace(state, window_start=now, successes=0, errors=0, admitted=0, carried=0)


def enforcing_after(config: LimiterConfig, decision: Decision, enforcing: bool) -> bool:
    """Whether the limit is enforced after ``decision``; pure.

    Enforced from the first cut until the limit has grown back to its maximum with
    errors under ``grow_threshold``: a healthy upstream is never throttled by a limit
    still ramping up from its start value.
    """
    if not enforcing:
        return decision.new < decision.old
    return not (decision.new >= config.max_limit and decision.error_rate < config.grow_threshold)


class AimdLimiter:
    """One worker's limiter: ``LimiterState`` plus the counters of the open window."""

    def __init__(self, config: LimiterConfig | None = None) -> None:
        self.config = config or LimiterConfig()
        self._state = LimiterState(limit=float(self.config.initial))
        self._successes = 0
        self._errors = 0
        self._admitted = 0
        self._last_sample_at: float | None = None
        self._decisions: deque[Decision] = deque(maxlen=self.config.max_decisions)
        self._totals = {"success": 0, "error": 0, "ignored": 0, "windows": 0, "stale": 0}

    @property
    def limit(self) -> float:
        return self._state.limit

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return tuple(self._decisions)

    def record(self, now: float, outcome: Outcome) -> None:
        """Count one admitted request's outcome in the current window."""
        if self._state.window_start is None:
            self._state = replace(self._state, window_start=now)
        self._admitted += 1
        if outcome is Outcome.SUCCESS:
            self._successes += 1
            self._last_sample_at = now
        elif outcome is Outcome.ERROR:
            self._errors += 1
            self._last_sample_at = now
        self._totals[outcome.value] += 1

    def decide(self, now: float) -> Decision | None:
        """Close the window if ``window_s`` passed; ``None`` if no decision was made."""
        if self._state.window_start is None:
            self._state = replace(self._state, window_start=now)
            return None
        state = replace(
            self._state,
            successes=self._successes,
            errors=self._errors,
            admitted=self._admitted,
            last_sample_at=self._last_sample_at,
        )
        closed = close_window(self.config, state, now)
        if closed.outcome is WindowOutcome.OPEN:
            return None
        self._totals["windows"] += 1
        self._totals["stale"] += closed.outcome is WindowOutcome.STALE
        self._state = closed.state
        if closed.outcome.resets_counts:
            self._successes = self._errors = self._admitted = 0
        if closed.decision is not None:
            self._decisions.append(closed.decision)
        return closed.decision

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state for /stats."""
        return {
            "limit": round(self._state.limit, 3),
            "bounds": [self.config.min_limit, self.config.max_limit],
            "window_start": self._state.window_start,
            "window": {
                "successes": self._successes,
                "errors": self._errors,
                "admitted": self._admitted,
                "carried_windows": self._state.carried,
            },
            "cooldown_until": self._state.cooldown_until,
            "totals": dict(self._totals),
            "decisions": [d.to_dict() for d in self._decisions],
        }
