"""Gcra: burst, pacing, retry_after and rate changes, with binary-exact times."""

from __future__ import annotations

import pytest

from fileproxy.adaptive.gcra import Gcra


def admitted_between(gcra: Gcra, start: float, end: float, step: float) -> list[float]:
    """Try at ``start, start + step, ... <= end``; the times that were admitted."""
    times = []
    t = start
    while t <= end:
        if gcra.try_admit(t)[0]:
            times.append(t)
        t += step
    return times


def test_admits_burst_at_once_then_rejects() -> None:
    gcra = Gcra(rate=4.0, burst=3)
    assert [gcra.try_admit(0.0) for _ in range(3)] == [(True, 0.0)] * 3
    assert gcra.try_admit(0.0) == (False, 0.25)


def test_paces_at_rate_after_the_burst() -> None:
    gcra = Gcra(rate=4.0, burst=3)
    times = admitted_between(gcra, 0.0, 10.0, 1 / 64)
    # The burst goes to the first three tries, then one every 0.25 s through t=10.
    assert times == [0.0, 1 / 64, 2 / 64] + [k / 4 for k in range(1, 41)]


def test_burst_counts_requests_at_one_instant() -> None:
    gcra = Gcra(rate=4.0, burst=3)
    admitted = sum(gcra.try_admit(t / 4)[0] for t in range(41) for _ in range(3))
    assert admitted == 3 + 40  # the burst at t=0, then one per 0.25 s through t=10


def test_retry_after_is_when_the_next_request_passes() -> None:
    gcra = Gcra(rate=8.0, burst=2)
    gcra.try_admit(1.0)
    gcra.try_admit(1.0)
    admitted, retry_after = gcra.try_admit(1.0625)
    assert (admitted, retry_after) == (False, 0.0625)
    assert gcra.try_admit(1.0625 + retry_after - 1 / 1024)[0] is False
    assert gcra.try_admit(1.0625 + retry_after) == (True, 0.0)


def test_idle_time_refills_the_burst() -> None:
    gcra = Gcra(rate=2.0, burst=4)
    assert sum(gcra.try_admit(0.0)[0] for _ in range(10)) == 4
    assert sum(gcra.try_admit(100.0)[0] for _ in range(10)) == 4


def test_burst_of_one_is_strict_pacing() -> None:
    gcra = Gcra(rate=2.0)
    assert gcra.try_admit(0.0) == (True, 0.0)
    assert gcra.try_admit(0.25) == (False, 0.25)
    assert gcra.try_admit(0.5) == (True, 0.0)


def test_set_rate_changes_the_pace() -> None:
    gcra = Gcra(rate=4.0, burst=1)
    gcra.try_admit(0.0)
    gcra.set_rate(16.0)
    assert gcra.rate == 16.0
    times = admitted_between(gcra, 0.0, 1.0, 1 / 64)
    assert times == [k / 16 for k in range(1, 17)]


def test_set_rate_rescales_the_backlog() -> None:
    gcra = Gcra(rate=4.0, burst=3)
    for _ in range(3):
        gcra.try_admit(0.0)  # TAT 0.75: three intervals of 0.25 s
    gcra.set_rate(8.0)  # three intervals of 0.125 s: TAT 0.375, tolerance 0.25
    assert gcra.try_admit(0.0) == (False, 0.125)
    assert gcra.try_admit(0.125) == (True, 0.0)
    gcra.set_rate(2.0)  # backlog 0.5 - 0.125 = 0.375 s = 3 intervals -> 1.5 s
    assert gcra.try_admit(0.125) == (False, 0.5)  # TAT 1.625 - tolerance 1.0 - now


def test_set_rate_can_change_the_burst() -> None:
    gcra = Gcra(rate=4.0, burst=1)
    gcra.set_rate(4.0, burst=5)
    assert gcra.burst == 5
    assert sum(gcra.try_admit(0.0)[0] for _ in range(10)) == 5


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0)])
def test_rejects_bad_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Gcra(rate, burst)
