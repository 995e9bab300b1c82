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


def measured(ttfb_s: float, now: float = 0.0, **fields: float) -> ReplicaLoad:
    """A replica that answered twice in ``ttfb_s`` at ``now``: its estimate is ``ttfb_s``."""
    load = ReplicaLoad(**fields)  # type: ignore[arg-type]
    load.observe_ttfb(now, ttfb_s)
    load.observe_ttfb(now, ttfb_s)
    return load


def test_a_first_answer_is_no_peak():
    """An unmeasured replica counts as answering in 0, and so does the answer before its
    first: that one (maybe late from a cold connection or process) is one sample."""
    load = ReplicaLoad()
    load.observe_ttfb(0.0, 0.2)
    assert load.ttfb(0.0) == 0.0
    load.observe_ttfb(0.0, 0.3)
    assert load.ttfb(0.0) == 0.2  # two in a row


def test_two_slower_samples_in_a_row_are_taken_at_once():
    load = measured(0.01)
    load.observe_ttfb(0.0, 0.5)
    assert load.ttfb(0.0) == 0.01  # one slow answer: no further than the one before
    load.observe_ttfb(0.0, 0.4)
    assert load.ttfb(0.0) == 0.4  # two in a row: the smaller of the two
    load.observe_ttfb(DECAY_S, 0.6)
    assert load.ttfb(DECAY_S) == 0.4


def test_a_single_slower_sample_is_no_peak():
    load = measured(0.1)
    load.observe_ttfb(0.0, 0.02)  # blends in: no time passed, the estimate stays 0.1
    load.observe_ttfb(DECAY_S, 0.5)  # a hiccup after an answer faster than the estimate
    assert load.ttfb(DECAY_S) == pytest.approx(0.1 * math.exp(-1))  # only decayed


def test_a_faster_sample_blends_in_over_the_decay_time():
    load = measured(0.5)
    load.observe_ttfb(DECAY_S, 0.1)
    w = math.exp(-1)
    # the estimate decays once: 0.5 x w as read, then the sample's share (1 - w);
    # never (0.5 x w) x w, which drew a replica sampled often towards half its ttfb
    assert load.ttfb(DECAY_S) == pytest.approx(0.5 * w + 0.1 * (1 - w))


def test_without_samples_the_estimate_decays_towards_zero():
    load = measured(1.0)
    assert load.ttfb(DECAY_S) == pytest.approx(math.exp(-1))
    assert load.ttfb(0.0) == 1.0
    assert ReplicaLoad().ttfb(5.0) == 0.0  # never measured


def test_cost_is_latency_plus_transfer_times_in_flight_over_weight():
    load = measured(0.1, weight=2.0, in_flight=3)
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
    warm = measured(0.0005)
    cold = measured(0.008)  # answers on cold connections, or from a busy host
    assert cold.cost(0.0, None, 0.0) < warm.cost(0.0, None, 0.0) * TIE_RATIO
    rng = random.Random(5)
    picks = [pick([cold, warm], [0, 1], 0.0, rng) for _ in range(400)]
    assert 140 < picks.count(0) < 260  # even, not all to the warm one
    warm.in_flight = cold.in_flight = 1
    assert 140 < [pick([cold, warm], [0, 1], 0.0, rng) for _ in range(400)].count(0) < 260
    warm.in_flight = 0  # as many in flight, or the cheaper one always wins
    assert {pick([cold, warm], [0, 1], 0.0, rng) for _ in range(50)} == {1}
    warm.in_flight = 1
    cold.ttfb_s = TIE_RATIO * (0.0005 + COST_FLOOR_S)  # twice the cost: no longer a tie
    assert {pick([cold, warm], [0, 1], 0.0, rng) for _ in range(50)} == {1}


def _busy_host_sample(rng: random.Random, base: float) -> float:
    """An answer of ``base`` seconds as a busy shared host measures it: 10% of them a few
    ms late, 1% tens of ms late (measured on loopback here: p50 0.4 ms, p90 4 ms, p99
    11 ms, max 75 ms)."""
    sample = base * math.exp(rng.gauss(0, 0.2))
    dice = rng.random()
    if dice < 0.01:
        sample += rng.uniform(0.01, 0.08)
    elif dice < 0.1:
        sample += rng.uniform(0.002, 0.01)
    return sample


def _sequential(seed: int, base: list[float], requests: int) -> list[tuple[float, int]]:
    """One request at a time; the first answer of each replica 1 ms later (a cold
    connection). (time, replica) of each request."""
    rng = random.Random(seed)
    loads = [ReplicaLoad() for _ in base]
    seen: set[int] = set()
    now, picks = 0.0, []
    for _ in range(requests):
        i = pick(loads, range(len(base)), now, rng)  # type: ignore[arg-type]
        sample = _busy_host_sample(rng, base[i]) + (0.0 if i in seen else 0.001)
        seen.add(i)
        picks.append((now, i))
        now += sample + 0.001
        loads[i].observe_ttfb(now, sample)
    return picks


def test_identical_replicas_share_sequential_requests_evenly():
    even = 0
    for seed in range(200):
        picks = [i for _, i in _sequential(seed, [0.0004] * 3, 90)]
        even += all(15 <= picks.count(i) <= 45 for i in range(3))  # +-50% of a third
    assert even >= 190, even


def test_one_slow_answer_costs_a_replica_no_traffic():
    """Sequential requests to three replicas answering in 2 ms; at 0 one of them
    answers once in 20 ms (10x): it is picked again at once, as often as before."""
    loads = [ReplicaLoad() for _ in range(3)]
    now = 0.0
    rng = random.Random(11)
    for _ in range(300):  # warmed up
        i = pick(loads, [0, 1, 2], now, rng)
        now += 0.003
        loads[i].observe_ttfb(now, 0.002)
    loads[0].observe_ttfb(now, 0.02)
    picks = []
    for _ in range(300):
        i = pick(loads, [0, 1, 2], now, rng)
        picks.append(i)
        now += 0.003
        loads[i].observe_ttfb(now, 0.002)
    assert picks.index(0) < 10
    assert picks.count(0) >= 50


def test_pick_takes_the_cheaper_of_two():
    fast, slow = measured(0.01), measured(0.1)
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
