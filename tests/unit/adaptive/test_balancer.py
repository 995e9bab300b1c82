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
    TIE_RATIO,
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
    w = math.exp(-1)
    # the estimate decays once: 0.5 x w as read, then the sample's share (1 - w);
    # never (0.5 x w) x w, which drew a replica sampled often towards half its ttfb
    assert load.ttfb(DECAY_S) == pytest.approx(0.5 * w + 0.1 * (1 - w))


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


def test_costs_within_the_tie_ratio_are_a_tie_decided_at_random():
    cold, warm = ReplicaLoad(), ReplicaLoad()
    warm.observe_ttfb(0.0, 0.002)
    cold.observe_ttfb(0.0, 0.0029)  # a first answer on a cold connection: 1.3x the cost
    assert cold.cost(0.0, None, 0.0) < warm.cost(0.0, None, 0.0) * TIE_RATIO
    rng = random.Random(5)
    picks = [pick([cold, warm], [0, 1], 0.0, rng) for _ in range(400)]
    assert 120 < picks.count(0) < 280  # even, not all to the warm one
    cold.observe_ttfb(0.0, 0.0035)  # 1.5x: no longer a tie
    assert {pick([cold, warm], [0, 1], 0.0, rng) for _ in range(50)} == {1}


def test_one_slow_sample_costs_a_replica_its_traffic_for_seconds_only():
    """Sequential requests (nothing in flight) every 5 ms to three replicas answering in
    2 ms; at 0 one of them answers once in 20 ms (10x). It gets traffic again once its
    decayed estimate is within the tie ratio of the others':
    (0.02 x exp(-t / DECAY_S) + floor) < TIE_RATIO x (0.002 + floor)."""
    loads = [ReplicaLoad() for _ in range(3)]
    for load in loads:
        load.observe_ttfb(-0.01, 0.002)
    loads[0].observe_ttfb(0.0, 0.02)
    rng = random.Random(11)
    now, back_at = 0.0, None
    while back_at is None and now < 60.0:
        now += 0.005
        i = pick(loads, [0, 1, 2], now, rng)
        if i == 0:
            back_at = now
        loads[i].observe_ttfb(now, 0.002)
    bound = DECAY_S * math.log(0.02 / (TIE_RATIO * (0.002 + COST_FLOOR_S) - COST_FLOOR_S))
    assert back_at is not None
    assert bound <= back_at < bound + 0.5
    assert back_at < 5.0  # seconds, not the tens of seconds of a 10 s decay


def _sequential_shares(seed: int, requests: int = 90) -> list[int]:
    """Three identical replicas (2 ms, +-25% lognormal noise), one request at a time; the
    first answer of each comes on a cold connection, 1 ms later."""
    rng = random.Random(seed)
    loads = [ReplicaLoad() for _ in range(3)]
    counts = [0, 0, 0]
    now = 0.0
    for _ in range(requests):
        i = pick(loads, [0, 1, 2], now, rng)
        sample = 0.002 * math.exp(rng.gauss(0, 0.25)) + (0.001 if counts[i] == 0 else 0.0)
        now += sample + 0.001
        loads[i].observe_ttfb(now, sample)
        counts[i] += 1
    return counts


def test_identical_replicas_share_sequential_requests_evenly():
    even = [all(30 * 0.5 <= n <= 30 * 1.5 for n in _sequential_shares(seed)) for seed in range(200)]
    assert sum(even) >= 190, sum(even)  # +-50% of an even share in (nearly) every run


def test_pick_takes_the_cheaper_of_two():
    fast, slow = ReplicaLoad(), ReplicaLoad()
    fast.observe_ttfb(0.0, 0.01)
    slow.observe_ttfb(0.0, 0.1)
    rng = random.Random(1)
    assert {pick([fast, slow], [0, 1], 0.0, rng) for _ in range(50)} == {0}
    # until the fast one has so many requests waiting that it costs more (beyond a tie)
    fast.in_flight = 15
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
