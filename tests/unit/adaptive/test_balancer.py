"""Balancer: the peak-EWMA cost, goodput, slow start and the power of two choices."""

from __future__ import annotations

import math
import random

import pytest

from fileproxy.adaptive.balancer import (
    COST_FLOOR_S,
    DECAY_S,
    MIN_GOODPUT_BYTES,
    SLOW_START_MIN,
    ReplicaLoad,
    pick,
)


def test_a_slower_sample_is_taken_at_once():
    load = ReplicaLoad()
    load.observe_ttfb(0.0, 0.01)
    load.observe_ttfb(0.0, 0.5)
    assert load.ttfb(0.0) == 0.5


def test_a_faster_sample_blends_in_over_the_decay_time():
    load = ReplicaLoad()
    load.observe_ttfb(0.0, 0.5)
    load.observe_ttfb(DECAY_S, 0.1)
    decayed = 0.5 * math.exp(-1)
    w = math.exp(-1)
    assert load.ttfb(DECAY_S) == pytest.approx(decayed * w + 0.1 * (1 - w))


def test_without_samples_the_estimate_decays_towards_zero():
    load = ReplicaLoad()
    load.observe_ttfb(0.0, 1.0)
    assert load.ttfb(DECAY_S) == pytest.approx(math.exp(-1))
    assert load.ttfb(0.0) == 1.0
    assert ReplicaLoad().ttfb(5.0) == 0.0  # never measured


def test_cost_is_latency_plus_transfer_times_in_flight_over_weight():
    load = ReplicaLoad(weight=2.0, in_flight=3)
    load.observe_ttfb(0.0, 0.1)
    load.observe_body(0.0, 10 * MIN_GOODPUT_BYTES, 1.0)  # 10 x 256 KiB/s
    assert load.goodput_bps == 10 * MIN_GOODPUT_BYTES
    size = 5 * MIN_GOODPUT_BYTES
    assert load.cost(0.0, size, 0.0) == pytest.approx((0.1 + 0.5 + COST_FLOOR_S) * 4 / 2.0)
    assert load.cost(0.0, None, 0.0) == pytest.approx((0.1 + COST_FLOOR_S) * 4 / 2.0)


def test_small_bodies_do_not_count_as_goodput():
    load = ReplicaLoad()
    load.observe_body(0.0, MIN_GOODPUT_BYTES - 1, 0.001)
    assert load.goodput_bps is None


def test_slow_start_ramps_from_a_tenth_to_the_whole():
    load = ReplicaLoad(warm_from=100.0)
    assert load.warmth(100.0, 10.0) == SLOW_START_MIN
    assert load.warmth(105.0, 10.0) == 0.5
    assert load.cost(105.0, None, 10.0) == pytest.approx(COST_FLOOR_S / 0.5)
    assert load.warmth(110.0, 10.0) == 1.0
    assert load.warm_from is None  # warmed up
    assert ReplicaLoad(warm_from=0.0).warmth(0.0, 0.0) == 1.0  # slow start off


def test_pick_takes_the_cheaper_of_two():
    fast, slow = ReplicaLoad(), ReplicaLoad()
    fast.observe_ttfb(0.0, 0.01)
    slow.observe_ttfb(0.0, 0.1)
    rng = random.Random(1)
    assert {pick([fast, slow], [0, 1], 0.0, rng) for _ in range(50)} == {0}
    # until the fast one has ten times as many requests waiting
    fast.in_flight = 10
    assert {pick([fast, slow], [0, 1], 0.0, rng) for _ in range(50)} == {1}


def test_pick_spreads_equal_replicas_and_respects_candidates():
    loads = [ReplicaLoad() for _ in range(3)]
    rng = random.Random(7)
    picks = [pick(loads, [0, 1, 2], 0.0, rng) for _ in range(300)]
    assert all(picks.count(i) > 50 for i in range(3))
    assert {pick(loads, [2], 0.0, rng) for _ in range(10)} == {2}
    with pytest.raises(ValueError):
        pick(loads, [], 0.0, rng)


def test_a_ten_times_slower_replica_gets_almost_nothing():
    """Closed loop: 4 requests at a time over three replicas, one 10x slower."""
    ttfb = [0.02, 0.02, 0.2]
    loads = [ReplicaLoad() for _ in ttfb]
    rng = random.Random(3)
    now, ends, counts = 0.0, [], [0, 0, 0]
    for _ in range(4):
        i = pick(loads, [0, 1, 2], now, rng)
        loads[i].in_flight += 1
        ends.append((now + ttfb[i], i))
    for _ in range(2000):
        ends.sort()
        now, i = ends.pop(0)
        loads[i].in_flight -= 1
        loads[i].observe_ttfb(now, ttfb[i])
        counts[i] += 1
        j = pick(loads, [0, 1, 2], now, rng)
        loads[j].in_flight += 1
        ends.append((now + ttfb[j], j))
    assert counts[2] < 0.1 * sum(counts)
    assert min(counts[0], counts[1]) > 0.3 * sum(counts)
