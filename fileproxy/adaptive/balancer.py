"""Which replica gets the next request: power of two choices on an expected cost.

Pick two usable replicas at random and send to the cheaper one (Mitzenmacher: the
worst load falls exponentially against one random choice, with no global state).
The cost of a replica is what a request is expected to take there, times the
requests already waiting on it, as Finagle's and Linkerd's peak EWMA do::

    cost = (ttfb + size / goodput + COST_FLOOR_S) x (in_flight + 1) / weight / warmth

- ``ttfb``: a peak EWMA of a try's time from its request write to the response
  headers: a larger sample is taken at once (a replica that turns slow is avoided at
  the next request), a smaller one blends in over ``DECAY_S``, and without samples
  the estimate decays towards 0 so a replica avoided for being slow is tried again:
  after one slow sample within seconds (``DECAY_S`` x ln(slowness / ``TIE_RATIO``)),
  while a replica really 10x slower is tried about every 4 s.
- ``size / goodput``: for a request whose size is known, the seconds its body takes
  at the replica's measured goodput (an EWMA of bytes/s of finished bodies): what a
  file proxy cares about, and what no peer scores by.
- ``warmth``: slow start. A replica back from ejection counts as (time back /
  ``slow_start_s``) of itself, at least ``SLOW_START_MIN``, so it is warmed up,
  not flooded (Envoy ``slow_start_config``, HAProxy ``slowstart``).

Costs within ``TIE_RATIO`` of each other are a tie, and a tie is decided at random
(Envoy's least-request is even on ties): the latency noise of identical replicas
(a cold connection's first answer, a scheduling hiccup) must not decide where the
traffic goes, as it would under sequential load, where nothing is in flight to
push it back.

Pure: time and the random source are passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

# the peak EWMA's time constant. Finagle's default is 10 s, but under sequential load
# only the decay gives a replica its traffic back: 10 s held one that had a single
# slow sample off for tens of seconds
DECAY_S = 2.0
TIE_RATIO = 1.5  # costs closer than this are a tie: the noise of identical replicas
GOODPUT_DECAY_S = 30.0
COST_FLOOR_S = 0.001  # so in-flight requests count even before anything was measured
SLOW_START_MIN = 0.1  # a replica just back counts as a tenth of itself (Envoy's min_weight_percent)
MIN_GOODPUT_BYTES = 256 * 1024  # smaller bodies say more about latency than goodput


@dataclass
class ReplicaLoad:
    """What the balancer knows of one replica."""

    weight: float = 1.0
    ttfb_s: float = 0.0  # peak EWMA, as of ``ttfb_at``
    ttfb_at: float | None = None  # None: never measured
    goodput_bps: float | None = None
    goodput_at: float = 0.0
    in_flight: int = 0
    warm_from: float | None = None  # slow start began (back from ejection)
    picked: int = 0  # requests sent there

    def ttfb(self, now: float) -> float:
        """The estimate now: decayed towards 0 since the last sample."""
        if self.ttfb_at is None:
            return 0.0
        return self.ttfb_s * math.exp(-max(0.0, now - self.ttfb_at) / DECAY_S)

    def observe_ttfb(self, now: float, sample_s: float) -> None:
        if self.ttfb_at is None:
            self.ttfb_s = sample_s
        else:
            w = math.exp(-max(0.0, now - self.ttfb_at) / DECAY_S)
            current = self.ttfb_s * w  # decayed once, as ``ttfb`` reads it
            # the peak: a slower sample counts at once; a faster one blends in
            self.ttfb_s = sample_s if sample_s >= current else current + sample_s * (1 - w)
        self.ttfb_at = now

    def observe_body(self, now: float, size: int, seconds: float) -> None:
        """A body of ``size`` bytes took ``seconds`` from its head to its end."""
        if size < MIN_GOODPUT_BYTES or seconds <= 0:
            return
        sample = size / seconds
        if self.goodput_bps is None:
            self.goodput_bps = sample
        else:
            w = math.exp(-max(0.0, now - self.goodput_at) / GOODPUT_DECAY_S)
            self.goodput_bps = self.goodput_bps * w + sample * (1 - w)
        self.goodput_at = now

    def warmth(self, now: float, slow_start_s: float) -> float:
        if self.warm_from is None or slow_start_s <= 0:
            return 1.0
        share = (now - self.warm_from) / slow_start_s
        if share >= 1.0:
            self.warm_from = None
            return 1.0
        return max(SLOW_START_MIN, share)

    def cost(self, now: float, size: int | None, slow_start_s: float) -> float:
        seconds = self.ttfb(now) + COST_FLOOR_S
        if size and self.goodput_bps:
            seconds += size / self.goodput_bps
        return seconds * (self.in_flight + 1) / self.weight / self.warmth(now, slow_start_s)


def pick(
    loads: Sequence[ReplicaLoad],
    candidates: Sequence[int],
    now: float,
    rng: random.Random,
    *,
    size: int | None = None,
    slow_start_s: float = 0.0,
) -> int:
    """The index (of ``loads``) of the replica for the next request, among ``candidates``."""
    if not candidates:
        raise ValueError("no candidate replica")
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    cost_a = loads[a].cost(now, size, slow_start_s)
    cost_b = loads[b].cost(now, size, slow_start_s)
    if max(cost_a, cost_b) < min(cost_a, cost_b) * TIE_RATIO:
        return a  # a tie: already random
    return a if cost_a < cost_b else b
