"""Per-upstream network-quality classifier, after Chromium's Network Quality Estimator.

Pure: no I/O and no clock; every method takes ``now`` (monotonic seconds).

Signals
    * HTTP RTT (``observe_http_rtt``): request start to response headers. It contains
      server think time, so a *hanging* sample (>= 8x the transport estimate, >= 6x the
      HTTP estimate and > 500 ms) is dropped from the estimate and only counted.
    * Transport RTT (``observe_transport``: ``tcpi_rtt`` from TCP_INFO;
      ``observe_connect``: TCP connect time, which is one round trip). Both go into one
      buffer: they measure the same thing, the path's round trip.

Each signal keeps the last ``buffer_size`` samples; a sample ``age`` seconds old weighs
``0.5 ** (age / half_life_s)`` and the estimate is the weighted ``percentile`` (p50).
The HTTP estimate is floored at the transport estimate once the transport buffer holds
``min_samples``: a request cannot be faster than the round trip under it.

What drives the level
    ``effective = max(transport estimate, filtered HTTP estimate)``. Transport RTT is the
    path alone and a lower bound on what a request sees; the HTTP RTT adds the
    upstream's queueing and processing, which also stretch a client's wait. Taking the
    larger never rates a link better than its raw round trip (which would pick large
    chunks and short timeouts for a slow path) while the hanging filter keeps server
    think time of a few requests out. With only one signal present the max is that
    signal, so the classifier also works without TCP_INFO (non-Linux) or before any
    response completed.

Two speeds
    The long estimate above (half-life 60 s, 300 samples) is steady, but at 10 req/s it
    spans 30 s and its median needs ~15 s to follow a step. A *recent* estimate (weighted
    p50 of the samples of the last ``recent_window_s``, at least ``recent_min_samples``)
    catches steps. It can only degrade when it is clearly past a boundary
    (``fast_degrade_margin``, 25 %), so ordinary jitter around a boundary never
    reaches it, and it vetoes upgrades while it disagrees with the long estimate.

Hysteresis (``evaluate``, at most every ``evaluation_interval_s``)
    * The level starts at ``initial_level`` (MEDIUM: the seed's 16 KiB chunk, mid-range
      timeouts) marked *unestimated*, and the estimate's level is adopted directly
      ("first estimate": the initial level was a guess, not an observation) once
      ``first_estimate_evaluations`` (2) consecutive evaluations agree on it. An
      estimate clearly inside its band (20 % from both bounds) counts from
      ``min_samples`` (10) samples on, one near a boundary only from
      ``confident_samples`` (150): the p50 of 10..30 samples wanders by several percent,
      and with 10 samples a 100..180 ms link started POOR in 110 of 300 seeded runs
      (55 with two agreeing evaluations), a wrong level the upgrade margin then holds;
      with this rule 0 of 300, while 20/100/200/400 ms links settle in 2.1 s.
    * Degrade: ``degrade_evaluations`` (2) consecutive evaluations whose candidate is
      worse, the candidate being the worse of ``level_of(long)`` and
      ``level_of(recent / (1 + fast_degrade_margin))``; the move goes to the least bad
      candidate seen in the streak, possibly several levels at once.
    * Upgrade: every evaluation for ``upgrade_sustain_s`` (10 s) has
      ``level_of(max(long, recent) / (1 - upgrade_margin))`` better than the current
      level, i.e. both estimates at least 20 % below the boundary; the move goes to the
      least good candidate seen in that period.
    * No move before ``min_dwell_s`` (5 s) in the current level.

    With these numbers and 10 req/s (``tests/unit/adaptive/quality_sim.py``, 30 seeds):
    a step 50 -> 250 ms is POOR after 3.4 s (recent p50 past 187.5 ms twice), the return
    to 50 ms is MEDIUM again after 24.4..25.4 s (long p50 under 120 ms after ~14 s, then
    10 s sustained); a steady 100..180 ms link never leaves MEDIUM in 5 minutes (its
    recent p50 cannot reach 187.5 ms, its long p50 sits ~6 sigma below 150 ms).

Boundaries are upper bounds: ``estimate < 50`` is GOOD, ``50 <= estimate < 150`` is
MEDIUM, and so on (Chromium's ECT thresholds compare the same way).

Profiles
    ``PROFILE_PRESETS`` maps a preset name to the one table ``Level -> LevelProfile``.
    "seed" reproduces the seed's table (8/16/32/64 KiB chunks, 45/60/90/120 s timeouts
    for good..very_poor, used as the headers and the idle-read bound). "throughput"
    (the default) keeps the seed's timeouts and reads up to 64 KiB at every level:
    ``bench/chunk_sizes.py`` measured 64 KiB the fastest and cheapest relay size here
    (831 MB/s and 0.96 CPU s/GiB against 488 MB/s and 2.08 s/GiB at 8 KiB, and
    576 MB/s at 256 KiB). A read returns whatever has arrived, up to the chunk size,
    so on a slow link the pieces are small anyway; the chunk size does not change
    the TCP window, only the CPU per byte.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

__all__ = [
    "LEVELS",
    "PROFILE_PRESETS",
    "ClassifierConfig",
    "Level",
    "LevelProfile",
    "QualityClassifier",
    "Transition",
    "parse_profile_table",
    "profile_table",
    "weighted_percentile",
]


class Level(Enum):
    """Network quality, best first; ``LEVELS`` holds the order."""

    GOOD = "good"
    MEDIUM = "medium"
    POOR = "poor"
    VERY_POOR = "very_poor"


#: Levels best first; index i is the level below boundary i.
LEVELS: tuple[Level, ...] = (Level.GOOD, Level.MEDIUM, Level.POOR, Level.VERY_POOR)
_RANK: dict[Level, int] = {level: rank for rank, level in enumerate(LEVELS)}


@dataclass(frozen=True)
class LevelProfile:
    """How the proxy moves bytes at a level."""

    chunk_size: int
    connect_timeout_s: float
    headers_timeout_s: float
    read_timeout_s: float


_KIB = 1024

#: Preset name -> the table of profiles per level (read-only).
PROFILE_PRESETS: Mapping[str, Mapping[Level, LevelProfile]] = MappingProxyType(
    {
        "seed": MappingProxyType(
            {
                Level.GOOD: LevelProfile(8 * _KIB, 5.0, 45.0, 45.0),
                Level.MEDIUM: LevelProfile(16 * _KIB, 10.0, 60.0, 60.0),
                Level.POOR: LevelProfile(32 * _KIB, 15.0, 90.0, 90.0),
                Level.VERY_POOR: LevelProfile(64 * _KIB, 20.0, 120.0, 120.0),
            }
        ),
        "throughput": MappingProxyType(
            {
                Level.GOOD: LevelProfile(64 * _KIB, 5.0, 45.0, 45.0),
                Level.MEDIUM: LevelProfile(64 * _KIB, 10.0, 60.0, 60.0),
                Level.POOR: LevelProfile(64 * _KIB, 15.0, 90.0, 90.0),
                Level.VERY_POOR: LevelProfile(64 * _KIB, 20.0, 120.0, 120.0),
            }
        ),
    }
)


def parse_profile_table(text: str) -> dict[Level, LevelProfile]:
    """Parse ``"good=65536:5:45:45,medium=...,poor=...,very_poor=..."``.

    Each level appears once with ``chunk_size:connect_s:headers_s:read_s``; chunk size is
    a positive integer (bytes), the timeouts positive numbers (seconds).
    """
    names = ", ".join(level.value for level in LEVELS)
    table: dict[Level, LevelProfile] = {}
    for raw_entry in text.split(","):
        entry = raw_entry.strip()
        if not entry:
            continue
        name, sep, spec = entry.partition("=")
        name = name.strip().lower()
        if not sep:
            raise ValueError(f"profile entry {entry!r}: expected LEVEL=CHUNK:CONNECT:HEADERS:READ")
        try:
            level = Level(name)
        except ValueError:
            raise ValueError(f"profile entry {entry!r}: unknown level {name!r} ({names})") from None
        if level in table:
            raise ValueError(f"profile entry {entry!r}: level {name!r} given twice")
        parts = [part.strip() for part in spec.split(":")]
        if len(parts) != 4:
            raise ValueError(
                f"profile entry {entry!r}: expected 4 fields CHUNK:CONNECT:HEADERS:READ, "
                f"got {len(parts)}"
            )
        try:
            chunk = int(parts[0])
        except ValueError:
            raise ValueError(
                f"profile entry {entry!r}: chunk size {parts[0]!r} is not an integer"
            ) from None
        if chunk <= 0:
            raise ValueError(f"profile entry {entry!r}: chunk size must be > 0")
        timeouts: list[float] = []
        for label, part in zip(("connect", "headers", "read"), parts[1:], strict=True):
            try:
                value = float(part)
            except ValueError:
                raise ValueError(
                    f"profile entry {entry!r}: {label} timeout {part!r} is not a number"
                ) from None
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"profile entry {entry!r}: {label} timeout must be > 0")
            timeouts.append(value)
        table[level] = LevelProfile(chunk, timeouts[0], timeouts[1], timeouts[2])
    missing = [level.value for level in LEVELS if level not in table]
    if missing:
        raise ValueError(f"profile table: missing level(s) {', '.join(missing)} (need {names})")
    return {level: table[level] for level in LEVELS}


def profile_table(spec: str) -> dict[Level, LevelProfile]:
    """A preset name (``"seed"``, ``"throughput"``) or a table for ``parse_profile_table``."""
    preset = PROFILE_PRESETS.get(spec.strip().lower())
    if preset is not None:
        return dict(preset)
    if "=" not in spec:
        raise ValueError(
            f"profile {spec!r}: not a preset ({', '.join(PROFILE_PRESETS)}) nor a table"
        )
    return parse_profile_table(spec)


def weighted_percentile(samples: Iterable[tuple[float, float]], percentile: float) -> float | None:
    """The smallest value whose cumulative weight reaches ``percentile`` % of the total.

    ``samples`` are ``(value, weight)`` pairs; ``None`` when the total weight is zero.
    The same rule as Chromium's ``ObservationBuffer::GetPercentile``.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError("percentile must be within 0..100")
    ordered = sorted((value, weight) for value, weight in samples if weight > 0.0)
    total = math.fsum(weight for _, weight in ordered)
    if total <= 0.0:
        return None
    wanted = total * percentile / 100.0
    cumulative = 0.0
    for value, weight in ordered:
        cumulative += weight
        if cumulative >= wanted:
            return value
    return ordered[-1][0]


@dataclass(frozen=True)
class ClassifierConfig:
    """Tunables of ``QualityClassifier``; see the module docstring for their roles."""

    #: Upper bounds (ms) of GOOD, MEDIUM and POOR; VERY_POOR is above the last.
    boundaries_ms: tuple[float, float, float] = (50.0, 150.0, 300.0)
    half_life_s: float = 60.0
    buffer_size: int = 300
    percentile: float = 50.0
    #: Samples needed for the first estimate and for the transport floor of HTTP RTT.
    min_samples: int = 10
    #: Consecutive evaluations that must agree before the first estimate is adopted.
    first_estimate_evaluations: int = 2
    #: Samples after which an estimate near a boundary is adopted as well.
    confident_samples: int = 150
    evaluation_interval_s: float = 1.0
    initial_level: Level = Level.MEDIUM
    degrade_evaluations: int = 2
    upgrade_margin: float = 0.2
    upgrade_sustain_s: float = 10.0
    min_dwell_s: float = 5.0
    recent_window_s: float = 3.0
    recent_min_samples: int = 5
    fast_degrade_margin: float = 0.25
    hanging_transport_multiplier: float = 8.0
    hanging_http_multiplier: float = 6.0
    hanging_min_ms: float = 500.0
    max_transitions: int = 20

    def __post_init__(self) -> None:
        bounds = self.boundaries_ms
        if len(bounds) != len(LEVELS) - 1:
            raise ValueError(f"boundaries_ms needs {len(LEVELS) - 1} values")
        if any(not math.isfinite(b) or b <= 0 for b in bounds) or any(
            lo >= hi for lo, hi in itertools.pairwise(bounds)
        ):
            raise ValueError(f"boundaries_ms must be positive and increasing: {bounds}")
        positive = {
            "half_life_s": self.half_life_s,
            "evaluation_interval_s": self.evaluation_interval_s,
            "recent_window_s": self.recent_window_s,
            "hanging_transport_multiplier": self.hanging_transport_multiplier,
            "hanging_http_multiplier": self.hanging_http_multiplier,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0")
        counts = {
            "buffer_size": self.buffer_size,
            "min_samples": self.min_samples,
            "degrade_evaluations": self.degrade_evaluations,
            "first_estimate_evaluations": self.first_estimate_evaluations,
            "confident_samples": self.confident_samples,
            "recent_min_samples": self.recent_min_samples,
            "max_transitions": self.max_transitions,
        }
        for name, count in counts.items():
            if count < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 < self.percentile < 100.0:
            raise ValueError("percentile must be within (0, 100)")
        if not 0.0 <= self.upgrade_margin < 1.0:
            raise ValueError("upgrade_margin must be within [0, 1)")
        if self.fast_degrade_margin < 0.0:
            raise ValueError("fast_degrade_margin must be >= 0")
        if self.upgrade_sustain_s < 0 or self.min_dwell_s < 0 or self.hanging_min_ms < 0:
            raise ValueError("upgrade_sustain_s, min_dwell_s and hanging_min_ms must be >= 0")

    def level_of(self, estimate_ms: float) -> Level:
        """The level whose band holds ``estimate_ms`` (boundaries are upper bounds)."""
        return LEVELS[bisect.bisect_right(self.boundaries_ms, estimate_ms)]


@dataclass(frozen=True)
class Transition:
    """A level change: when, from, to, why, and the estimate that moved it."""

    at: float
    from_level: Level
    to_level: Level
    reason: str
    estimate_ms: float

    def to_dict(self) -> dict[str, object]:
        return {
            "at": self.at,
            "from": self.from_level.value,
            "to": self.to_level.value,
            "reason": self.reason,
            "estimate_ms": round(self.estimate_ms, 3),
        }


class _Signal:
    """A bounded buffer of ``(at, value)`` observations and its weighted percentile."""

    def __init__(self, size: int) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=size)
        self.total = 0

    def add(self, now: float, value: float) -> None:
        self.samples.append((now, value))
        self.total += 1

    def estimate(
        self, now: float, config: ClassifierConfig, since: float | None = None
    ) -> float | None:
        """Weighted percentile over all samples, or over those at or after ``since``."""
        chosen = [s for s in self.samples if since is None or s[0] >= since]
        if since is not None and len(chosen) < config.recent_min_samples:
            return None
        half_life = config.half_life_s
        return weighted_percentile(
            ((value, 0.5 ** (max(0.0, now - at) / half_life)) for at, value in chosen),
            config.percentile,
        )


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0.0


def _max_known(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class QualityClassifier:
    """One upstream's quality level from RTT observations; see the module docstring."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        self.config = config or ClassifierConfig()
        size = self.config.buffer_size
        self._http = _Signal(size)
        self._transport = _Signal(size)
        self._retransmit = _Signal(size)
        self._min_rtt = _Signal(size)
        self._connect_samples = 0
        self._tcp_info_samples = 0
        self._hanging = 0
        self._invalid = 0
        self._level = self.config.initial_level
        self._estimated = False
        self._level_since: float | None = None
        self._last_evaluation: float | None = None
        self._first_streak = 0
        self._first_candidate: Level | None = None
        self._degrade_streak = 0
        self._degrade_target: Level | None = None
        self._upgrade_since: float | None = None
        self._upgrade_target: Level | None = None
        self._transitions: deque[Transition] = deque(maxlen=self.config.max_transitions)
        # Estimates as of ``_estimates_at`` (refreshed by evaluate and, when stale, by
        # observe_http_rtt for the hanging filter).
        self._estimates_at: float | None = None
        self._http_estimate: float | None = None
        self._transport_estimate: float | None = None
        self._effective: float | None = None
        self._recent: float | None = None

    # -- observations ----------------------------------------------------------------

    def observe_http_rtt(self, now: float, ms: float) -> bool:
        """Record a request's time to response headers; ``False`` if dropped as hanging."""
        if not _finite_non_negative(ms):
            self._invalid += 1
            return False
        if self._estimates_at is None or now - self._estimates_at >= (
            self.config.evaluation_interval_s
        ):
            self._refresh_estimates(now)
        if self._is_hanging(ms):
            self._hanging += 1
            return False
        self._http.add(now, ms)
        return True

    def observe_connect(self, now: float, ms: float) -> None:
        """Record a TCP connect time (one round trip) as a transport RTT sample."""
        if not _finite_non_negative(ms):
            self._invalid += 1
            return
        self._transport.add(now, ms)
        self._connect_samples += 1

    def observe_transport(
        self,
        now: float,
        rtt_ms: float,
        min_rtt_ms: float | None = None,
        retransmit_rate: float | None = None,
    ) -> None:
        """Record TCP_INFO figures: smoothed RTT, min RTT and retransmitted share.

        Only the RTT drives the level; min RTT and the retransmit rate are reported.
        """
        if not _finite_non_negative(rtt_ms):
            self._invalid += 1
            return
        self._transport.add(now, rtt_ms)
        self._tcp_info_samples += 1
        if min_rtt_ms is not None and _finite_non_negative(min_rtt_ms):
            self._min_rtt.add(now, min_rtt_ms)
        if retransmit_rate is not None and _finite_non_negative(retransmit_rate):
            self._retransmit.add(now, retransmit_rate)

    def _is_hanging(self, ms: float) -> bool:
        """Chromium's rule: slow beyond the network and beyond the usual HTTP RTT.

        Without an HTTP estimate nothing is hanging (no evidence); without a transport
        estimate (no TCP_INFO) the HTTP condition alone decides.
        """
        cfg = self.config
        if ms <= cfg.hanging_min_ms or self._http_estimate is None:
            return False
        if ms < cfg.hanging_http_multiplier * self._http_estimate:
            return False
        transport = self._transport_estimate
        return transport is None or ms >= cfg.hanging_transport_multiplier * transport

    # -- estimates -------------------------------------------------------------------

    def _refresh_estimates(self, now: float) -> None:
        cfg = self.config
        transport = self._transport.estimate(now, cfg)
        http = self._http.estimate(now, cfg)
        floor_ready = len(self._transport.samples) >= cfg.min_samples
        if http is not None and transport is not None and floor_ready:
            http = max(http, transport)
        since = now - cfg.recent_window_s
        recent_transport = self._transport.estimate(now, cfg, since)
        recent_http = self._http.estimate(now, cfg, since)
        if recent_http is not None and recent_transport is not None:
            recent_http = max(recent_http, recent_transport)
        self._estimates_at = now
        self._transport_estimate = transport
        self._http_estimate = http
        self._effective = _max_known(transport, http)
        self._recent = _max_known(recent_transport, recent_http)

    def _enough_samples(self) -> bool:
        needed = self.config.min_samples
        return len(self._http.samples) >= needed or len(self._transport.samples) >= needed

    # -- decisions -------------------------------------------------------------------

    @property
    def level(self) -> Level:
        return self._level

    @property
    def estimated(self) -> bool:
        """Whether the level comes from an estimate (False: still the initial level)."""
        return self._estimated

    @property
    def sample_count(self) -> int:
        """RTT samples held (HTTP and transport): the weight of this estimate in a fleet."""
        return len(self._http.samples) + len(self._transport.samples)

    @property
    def transitions(self) -> tuple[Transition, ...]:
        return tuple(self._transitions)

    def evaluate(self, now: float) -> Level:
        """Re-decide the level if ``evaluation_interval_s`` passed since the last time."""
        cfg = self.config
        last = self._last_evaluation
        if last is not None and now - last < cfg.evaluation_interval_s:
            return self._level
        self._last_evaluation = now
        self._refresh_estimates(now)
        effective, recent = self._effective, self._recent
        if effective is None or not self._enough_samples():
            return self._level
        if not self._estimated:
            self._consider_first_estimate(now, effective)
            return self._level
        if self._consider_degrade(now, effective, recent):
            return self._level
        self._consider_upgrade(now, effective, recent)
        return self._level

    def _consider_first_estimate(self, now: float, effective: float) -> None:
        """Adopt the estimate's level once consecutive evaluations agree on it.

        An estimate clearly inside a band (``upgrade_margin`` from both of its bounds)
        counts from ``min_samples`` on; one near a boundary only from
        ``confident_samples`` on, since a median of few samples wanders by several
        percent and a wrong first level would then be held by the hysteresis.
        """
        cfg = self.config
        candidate = cfg.level_of(effective)
        clear = (
            cfg.level_of(effective / (1.0 - cfg.upgrade_margin))
            is candidate
            is cfg.level_of(effective / (1.0 + cfg.upgrade_margin))
        )
        samples = max(len(self._http.samples), len(self._transport.samples))
        if not clear and samples < cfg.confident_samples:
            self._first_candidate, self._first_streak = None, 0
            return
        if candidate is self._first_candidate:
            self._first_streak += 1
        else:
            self._first_candidate, self._first_streak = candidate, 1
        if self._first_streak < cfg.first_estimate_evaluations:
            return
        self._estimated = True
        self._level_since = now
        if candidate is not self._level:
            reason = f"first estimate {effective:.1f} ms ({self._first_streak} evaluations)"
            self._move(now, candidate, reason, effective)

    def _dwelt(self, now: float) -> bool:
        since = self._level_since
        return since is None or now - since >= self.config.min_dwell_s

    def _consider_degrade(self, now: float, effective: float, recent: float | None) -> bool:
        """Count an evaluation whose candidate is worse; move after enough in a row."""
        cfg = self.config
        candidate = cfg.level_of(effective)
        trigger, source = effective, "estimate"
        if recent is not None:
            fast = cfg.level_of(recent / (1.0 + cfg.fast_degrade_margin))
            if _RANK[fast] > _RANK[candidate]:
                candidate, trigger, source = fast, recent, "recent estimate"
        if _RANK[candidate] <= _RANK[self._level]:
            self._degrade_streak = 0
            self._degrade_target = None
            return False
        self._upgrade_since = self._upgrade_target = None
        self._degrade_streak += 1
        previous = self._degrade_target
        target = candidate if previous is None or _RANK[candidate] < _RANK[previous] else previous
        self._degrade_target = target
        if self._degrade_streak >= cfg.degrade_evaluations and self._dwelt(now):
            reason = (
                f"degrade: {source} {trigger:.1f} ms worse than {self._level.value} "
                f"for {self._degrade_streak} evaluations"
            )
            self._move(now, target, reason, trigger)
        return True

    def _consider_upgrade(self, now: float, effective: float, recent: float | None) -> None:
        """Move up once both estimates stayed clearly below the boundary long enough."""
        cfg = self.config
        worst = effective if recent is None else max(effective, recent)
        candidate = cfg.level_of(worst / (1.0 - cfg.upgrade_margin))
        if _RANK[candidate] >= _RANK[self._level]:
            self._upgrade_since = self._upgrade_target = None
            return
        if self._upgrade_since is None or self._upgrade_target is None:
            self._upgrade_since, self._upgrade_target = now, candidate
        elif _RANK[candidate] > _RANK[self._upgrade_target]:
            self._upgrade_target = candidate
        sustained = now - self._upgrade_since
        if sustained >= cfg.upgrade_sustain_s and self._dwelt(now):
            reason = (
                f"upgrade: {worst:.1f} ms at least {cfg.upgrade_margin:.0%} below the "
                f"{self._upgrade_target.value} bound for {sustained:.1f} s"
            )
            self._move(now, self._upgrade_target, reason, worst)

    def _move(self, now: float, target: Level, reason: str, estimate_ms: float) -> None:
        self._transitions.append(Transition(now, self._level, target, reason, estimate_ms))
        self._level = target
        self._level_since = now
        self._degrade_streak = 0
        self._degrade_target = None
        self._upgrade_since = self._upgrade_target = None

    # -- reporting -------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """JSON-ready state for /stats; estimates are those of the last evaluation."""
        at = self._estimates_at
        min_rtt = min((v for _, v in self._min_rtt.samples), default=None)
        retransmit = None
        if at is not None and self._retransmit.samples:
            half_life = self.config.half_life_s
            pairs = [
                (v, 0.5 ** (max(0.0, at - t) / half_life)) for t, v in self._retransmit.samples
            ]
            retransmit = math.fsum(v * w for v, w in pairs) / math.fsum(w for _, w in pairs)
        return {
            "level": self._level.value,
            "estimated": self._estimated,
            "level_since": self._level_since,
            "evaluated_at": self._last_evaluation,
            "estimates": {
                "effective_rtt_ms": _round(self._effective),
                "recent_rtt_ms": _round(self._recent),
                "http_rtt_ms": _round(self._http_estimate),
                "transport_rtt_ms": _round(self._transport_estimate),
                "transport_min_rtt_ms": _round(min_rtt),
                "retransmit_rate": None if retransmit is None else round(retransmit, 6),
            },
            "samples": {
                "http": len(self._http.samples),
                "transport": len(self._transport.samples),
                "http_total": self._http.total,
                "tcp_info_total": self._tcp_info_samples,
                "connect_total": self._connect_samples,
                "hanging_total": self._hanging,
                "invalid_total": self._invalid,
            },
            "boundaries_ms": list(self.config.boundaries_ms),
            "transitions": [t.to_dict() for t in self._transitions],
        }
