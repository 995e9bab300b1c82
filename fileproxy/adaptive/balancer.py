"""Which replica gets the next request: power of two choices on an expected cost.

Pick two usable replicas at random and send to the cheaper one (Mitzenmacher: the
worst load falls exponentially against one random choice, with no global state).
The cost of a replica is what a request is expected to take there, times the
requests already waiting on it, as Finagle's and Linkerd's peak EWMA do::

    cost = (ttfb + size / goodput + COST_FLOOR_S) x (in_flight + 1) / weight / warmth

- ``ttfb``: a peak EWMA of a try's time from its request write to the response
  headers: a slower sample raises the estimate at once, but only as far as the
  sample before it, so two slow answers in a row count (a replica that turns slow
  is avoided from its second slow answer) and a single hiccup of a busy host does
  not; a faster sample blends in over ``DECAY_S``, and without samples the
  estimate decays towards 0, so a replica avoided for being slow is tried again
  now and then.
- ``size / goodput``: for a request whose size is known, the seconds its body takes
  at the replica's measured goodput (an EWMA of bytes/s of finished bodies): what a
  file proxy cares about, and what no peer scores by.
- ``warmth``: slow start. A replica back from ejection counts as (time back /
  ``slow_start_s``) of itself, at least ``SLOW_START_MIN``, so it is warmed up,
  not flooded (Envoy ``slow_start_config``, HAProxy ``slowstart``).

Two replicas with as many requests in flight whose costs are within ``TIE_RATIO``
are a tie, decided at random (Envoy's least-request is even on ties), and
``COST_FLOOR_S`` is as large as the latency noise of a busy host: differences of a
few ms (a cold connection's first answer, a scheduling hiccup) must not decide where
the traffic goes, as they would under sequential load, where nothing is in flight
to push it back. With different counts in flight the cheaper one always wins.

Pure: time and the random source are passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

# the peak EWMA's time constant (Finagle's default is 10 s: under sequential load only
# the decay gives an avoided replica its traffic back, so shorter)
DECAY_S = 5.0
TIE_RATIO = 2.0  # as many in flight and costs closer than this: a tie
GOODPUT_DECAY_S = 30.0
# added to every latency: in-flight requests count even before anything was measured,
# and latencies that differ by the noise of a busy host (a few ms) cost about the same
COST_FLOOR_S = 0.01
SLOW_START_MIN = 0.1  # a replica just back counts as a tenth of itself (Envoy's min_weight_percent)
MIN_GOODPUT_BYTES = 256 * 1024  # smaller bodies say more about latency than goodput


@dataclass
class ReplicaLoad:
    """What the balancer knows of one replica."""

    weight: float = 1.0
    ttfb_s: float = 0.0  # peak EWMA, as of ``ttfb_at``
    ttfb_at: float | None = None  # None: never measured
    last_ttfb_s: float = 0.0  # the latest sample (0 before the first)
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
        # unmeasured: 0, and so is the answer before the first one (which may come late
        # from a cold connection or process: one sample, no peak)
        w = 0.0 if self.ttfb_at is None else math.exp(-max(0.0, now - self.ttfb_at) / DECAY_S)
        current = self.ttfb_s * w  # decayed once, as ``ttfb`` reads it
        if sample_s >= current:
            # the peak, of two answers in a row: a slower one raises the estimate at
            # once, but only as far as the answer before it (one hiccup is no peak)
            self.ttfb_s = max(current, min(sample_s, self.last_ttfb_s))
        else:
            self.ttfb_s = current + sample_s * (1 - w)
        self.ttfb_at = now
        self.last_ttfb_s = sample_s

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
    load_a, load_b = loads[a], loads[b]
    cost_a = load_a.cost(now, size, slow_start_s)
    cost_b = load_b.cost(now, size, slow_start_s)
    close = max(cost_a, cost_b) < min(cost_a, cost_b) * TIE_RATIO
    if close and load_a.in_flight == load_b.in_flight:
        return a  # a tie: already random
    return a if cost_a < cost_b else b
