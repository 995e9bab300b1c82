"""LoopLag: the last lag and the largest of the window, with a fake clock."""

from __future__ import annotations

from fileproxy.loop_lag import LoopLag


def test_last_and_window_maximum() -> None:
    lag = LoopLag(window_s=10.0)
    assert (lag.last_s, lag.max_s(0.0)) == (0.0, 0.0)
    lag.record(1.0, 0.002)
    lag.record(2.0, 0.300)  # one long iteration
    lag.record(3.0, 0.001)
    assert lag.last_s == 0.001
    assert lag.max_s(3.0) == 0.300
    assert lag.max_s(11.9) == 0.300  # still within 10 s of the sample
    assert lag.max_s(12.0) == 0.001  # the 300 ms stall has left the window
    assert lag.max_s(13.0) == 0.0
    assert lag.samples_total == 3


def test_a_timer_that_fired_early_counts_as_no_lag() -> None:
    lag = LoopLag()
    lag.record(1.0, -0.0005)
    assert lag.last_s == 0.0


def test_memory_stays_bounded_by_the_decreasing_run() -> None:
    lag = LoopLag(window_s=1e9)
    for i in range(10_000):
        lag.record(float(i), i / 1e6)  # every sample larger than the last
    assert len(lag._recent) == 1
    assert lag.max_s(10_000.0) == 9_999 / 1e6
