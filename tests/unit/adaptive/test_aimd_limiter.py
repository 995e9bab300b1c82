"""AimdLimiter: one exact test per rule, model-based properties, and simulations."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fileproxy.adaptive.aimd_limiter import AimdLimiter, Decision, Growth, LimiterConfig, Outcome
from tests.unit.adaptive.aimd_sim import (
    Phase,
    UpstreamSim,
    fair_share_figures,
    growth_figures,
    idle_figures,
    windows_until,
)


def limiter(**changes: Any) -> AimdLimiter:
    return AimdLimiter(dataclasses.replace(LimiterConfig(), **changes))


def window(
    lim: AimdLimiter, start: float, successes: int, errors: int = 0, ignored: int = 0
) -> Decision | None:
    """Record outcomes inside ``[start, start + 1)`` and decide at ``start + 1``."""
    lim.decide(start)  # opens the first window; a no-op later
    for outcome, count in (
        (Outcome.SUCCESS, successes),
        (Outcome.ERROR, errors),
        (Outcome.IGNORED, ignored),
    ):
        for _ in range(count):
            lim.record(start + 0.5, outcome)
    return lim.decide(start + 1.0)


# -- one exact test per rule ----------------------------------------------------------


def test_cut_above_10_percent_errors() -> None:
    lim = limiter()
    assert window(lim, 0.0, 80, 20) == Decision(1.0, 100.0, 80.0, 0.2, 100, 1.0, "cut")
    assert lim.limit == 80.0


def test_exactly_10_percent_errors_holds() -> None:
    decision = window(limiter(), 0.0, 90, 10)
    assert decision == Decision(1.0, 100.0, 100.0, 0.1, 100, 1.0, "hold: errors in tolerance band")


def test_severe_cut_at_50_percent_errors() -> None:
    assert window(limiter(), 0.0, 50, 50) == Decision(1.0, 100.0, 50.0, 0.5, 100, 1.0, "severe cut")
    assert window(limiter(), 0.0, 51, 49) == Decision(1.0, 100.0, 80.0, 0.49, 100, 1.0, "cut")


def test_grow_below_2_percent_errors_when_used() -> None:
    assert window(limiter(), 0.0, 99, 1) == Decision(1.0, 100.0, 120.0, 0.01, 100, 1.0, "grow")


def test_growth_has_an_additive_floor() -> None:
    lim = limiter(initial=10.0)
    assert window(lim, 0.0, 20) == Decision(1.0, 10.0, 15.0, 0.0, 20, 2.0, "grow")  # 10 + 5
    assert Growth().apply(100.0) == 120.0  # x1.2 once the limit is above 25


def test_exactly_2_percent_errors_holds() -> None:
    decision = window(limiter(), 0.0, 98, 2)
    assert decision == Decision(1.0, 100.0, 100.0, 0.02, 100, 1.0, "hold: errors in tolerance band")


def test_no_growth_below_half_utilisation() -> None:
    decision = window(limiter(), 0.0, 49)
    assert decision == Decision(1.0, 100.0, 100.0, 0.0, 49, 0.49, "hold: limit underused")
    assert window(limiter(), 0.0, 50) == Decision(1.0, 100.0, 120.0, 0.0, 50, 0.5, "grow")


def test_cooldown_after_a_cut() -> None:
    lim = limiter()
    assert window(lim, 0.0, 80, 20) is not None  # 100 -> 80 at t=1
    for start in (1.0, 2.0):
        decision = window(lim, start, 80)
        assert decision == Decision(start + 1, 80.0, 80.0, 0.0, 80, 1.0, "hold: cooldown")
    assert window(lim, 3.0, 80) == Decision(4.0, 80.0, 96.0, 0.0, 80, 1.0, "grow")


def test_a_cut_limit_recovers_under_light_traffic() -> None:
    """After a cut, errors gone: the limit grows whether or not the traffic uses it."""
    lim = limiter()
    window(lim, 0.0, 80, 20)  # 100 -> 80 at t=1, cooldown until t=3.5
    window(lim, 1.0, 80)
    window(lim, 2.0, 80)
    assert window(lim, 3.0, 20) == Decision(
        4.0, 80.0, 96.0, 0.0, 20, 0.25, "recover: errors stopped"
    )


def test_cut_during_cooldown_restarts_it() -> None:
    lim = limiter()
    window(lim, 0.0, 80, 20)  # 100 -> 80
    assert window(lim, 1.0, 60, 20) == Decision(2.0, 80.0, 64.0, 0.25, 80, 1.0, "cut")
    assert window(lim, 2.0, 64) is not None
    assert window(lim, 3.0, 64) is not None
    assert lim.limit == 64.0
    assert window(lim, 4.0, 64) == Decision(5.0, 64.0, 76.8, 0.0, 64, 1.0, "grow")


def test_cooldown_counts_carried_windows() -> None:
    lim = limiter(initial=10.0)
    window(lim, 0.0, 5, 15)  # 10 -> 10 (clamped), cooldown until t=3.5
    assert window(lim, 1.0, 10) is None  # carried
    assert window(lim, 2.0, 10) == Decision(3.0, 10.0, 10.0, 0.0, 20, 1.0, "hold: cooldown")
    assert window(lim, 3.0, 10) is None
    assert window(lim, 4.0, 10) == Decision(5.0, 10.0, 15.0, 0.0, 20, 1.0, "grow")


def test_window_with_too_few_samples_carries_forward() -> None:
    lim = limiter()
    assert window(lim, 0.0, 8, 2) is None
    assert lim.limit == 100.0
    # Accumulated over 2 s: 20 samples, 5 errors, utilisation 20 / (100 x 2).
    assert window(lim, 1.0, 7, 3) == Decision(2.0, 100.0, 80.0, 0.25, 20, 0.1, "cut")


def test_stale_carry_is_dropped() -> None:
    lim = limiter(max_carry_windows=3)
    window(lim, 0.0, 0, 5)
    assert lim.decide(2.0) is None  # 2 s of carry: kept
    assert lim.decide(3.0) is None  # 3 s: dropped
    snap = lim.snapshot()
    assert snap["window"] == {"successes": 0, "errors": 0, "admitted": 0, "carried_windows": 0}
    assert snap["totals"] == {"success": 0, "error": 5, "ignored": 0, "windows": 3, "stale": 1}
    assert window(lim, 3.0, 20) == Decision(
        4.0, 100.0, 100.0, 0.0, 20, 0.2, "hold: limit underused"
    )


def cut_to_minimum() -> AimdLimiter:
    """A limiter cut at t=1 (10 -> 10, clamped), cooling down until t=3.5, then silent."""
    lim = limiter(initial=10.0)
    assert window(lim, 0.0, 5, 15) is not None  # last sample at t=0.5
    return lim


def test_idle_windows_after_a_cut_grow_the_limit() -> None:
    lim = cut_to_minimum()
    assert lim.decide(3.0) is None  # cooling down: no increase, silent or not
    # silence counted from the cooldown's end (3.5): one full window at 4.5
    assert lim.decide(4.5) == Decision(4.5, 10.0, 15.0, 0.0, 0, 0.0, "idle: recover")
    assert lim.decide(5.0) is None  # half a window: nothing due
    # one step per full window of silence however late the window closes
    assert lim.decide(7.5) == Decision(7.5, 15.0, 30.0, 0.0, 0, 0.0, "idle: recover x3")


def test_idle_needs_a_full_window_without_samples() -> None:
    lim = cut_to_minimum()
    lim.decide(4.0)  # carried (cooling down until 3.5, then less than a window since)
    for _ in range(5):
        lim.record(4.2, Outcome.ERROR)  # a thin trickle: 5 samples, under min_samples
    assert lim.decide(5.0) is None  # the last sample 0.8 s ago: carried, not idle
    decision = lim.decide(5.2)  # 1.0 s after it: idle, the thin counts are dropped
    assert decision == Decision(5.2, 10.0, 15.0, 0.0, 0, 0.0, "idle: recover")
    assert lim.snapshot()["window"] == {
        "successes": 0,
        "errors": 0,
        "admitted": 0,
        "carried_windows": 0,
    }


def test_idle_recovery_stops_at_the_maximum() -> None:
    lim = cut_to_minimum()
    decision = lim.decide(100.0)  # 96.5 s of silence: far more steps than needed
    assert decision == Decision(
        100.0, 10.0, 1000.0, 0.0, 0, 0.0, "idle: recover x96 (clamped to 1000)"
    )
    assert lim.decide(200.0) is None  # at the maximum: nothing to recover


def test_idle_without_a_cut_holds() -> None:
    lim = limiter()
    assert lim.decide(0.0) is None
    assert lim.decide(30.0) is None  # silent, but never cut: the limit stays
    assert lim.limit == 100.0


def test_ignored_outcomes_count_for_utilisation_only() -> None:
    assert window(limiter(), 0.0, 30, 0, ignored=70) == Decision(
        1.0, 100.0, 120.0, 0.0, 30, 1.0, "grow"
    )
    assert window(limiter(), 0.0, 10, 10, ignored=100).reason == "severe cut"  # type: ignore[union-attr]
    assert window(limiter(), 0.0, 0, 0, ignored=500) is None  # no samples: carried


def test_limit_is_clamped() -> None:
    assert window(limiter(initial=900.0), 0.0, 900) == Decision(
        1.0, 900.0, 1000.0, 0.0, 900, 1.0, "grow (clamped to 1000)"
    )
    assert window(limiter(initial=1000.0), 0.0, 1000) == Decision(
        1.0, 1000.0, 1000.0, 0.0, 1000, 1.0, "grow (clamped to 1000)"
    )
    assert window(limiter(initial=12.0), 0.0, 0, 20) == Decision(
        1.0, 12.0, 10.0, 1.0, 20, 20 / 12, "severe cut (clamped to 10)"
    )


def test_window_closes_only_after_window_s() -> None:
    lim = limiter()
    assert lim.decide(5.0) is None  # the first call opens the window
    for _ in range(100):
        lim.record(5.5, Outcome.SUCCESS)
    assert lim.decide(5.999) is None
    assert lim.decide(6.0) == Decision(6.0, 100.0, 120.0, 0.0, 100, 1.0, "grow")


def test_first_record_opens_the_window() -> None:
    lim = limiter()
    for _ in range(100):
        lim.record(7.0, Outcome.SUCCESS)
    assert lim.decide(7.5) is None
    assert lim.decide(8.0) is not None


def test_decisions_are_bounded_and_reported() -> None:
    lim = limiter()
    for second in range(25):
        window(lim, float(second), 100, 5)
    assert len(lim.decisions) == 20
    assert lim.decisions[-1] == Decision(
        25.0, 100.0, 100.0, 5 / 105, 105, 1.05, lim.decisions[-1].reason
    )
    snap = lim.snapshot()
    decisions = snap["decisions"]
    assert isinstance(decisions, list) and len(decisions) == 20
    assert decisions[-1] == {
        "at": 25.0,
        "old": 100.0,
        "new": 100.0,
        "error_rate": 0.0476,
        "samples": 105,
        "utilisation": 1.05,
        "reason": "hold: errors in tolerance band",
    }
    assert snap["limit"] == 100.0


@pytest.mark.parametrize(
    "changes",
    [
        {"initial": 5.0},
        {"min_limit": 2000.0},
        {"cut_factor": 1.0},
        {"severe_factor": 0.9},
        {"grow_threshold": 0.2},
        {"growth": Growth(factor=1.0, step=0.0)},
        {"window_s": 0.0},
        {"min_samples": 0},
    ],
)
def test_config_validation(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(LimiterConfig(), **changes)


# -- properties (a model of the window accounting checks every decision) --------------

windows_strategy = st.lists(
    st.tuples(
        st.integers(0, 150),  # successes
        st.integers(0, 150),  # errors
        st.integers(0, 30),  # ignored
        st.sampled_from([1.0, 1.25, 2.0, 3.5]),  # window duration
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None, database=None)
@given(windows=windows_strategy, initial=st.floats(10.0, 1000.0))
def test_properties(windows: list[tuple[int, int, int, float]], initial: float) -> None:
    cfg = dataclasses.replace(LimiterConfig(), initial=initial)
    lim = AimdLimiter(cfg)
    now = 0.0
    lim.decide(now)
    acc_start, acc_s, acc_e, acc_admitted = now, 0, 0, 0
    last_sample: float | None = None
    cooldown_until: float | None = None  # set by the last cut
    for successes, errors, ignored, duration in windows:
        for outcome, count in (
            (Outcome.SUCCESS, successes),
            (Outcome.ERROR, errors),
            (Outcome.IGNORED, ignored),
        ):
            for _ in range(count):
                lim.record(now + 0.25 * cfg.window_s, outcome)
        if successes + errors:
            last_sample = now + 0.25 * cfg.window_s
        acc_s, acc_e, acc_admitted = (
            acc_s + successes,
            acc_e + errors,
            acc_admitted + (successes + errors + ignored),
        )
        if acc_start == now:  # no carry pending: half a window closes nothing
            assert lim.decide(now + 0.5 * cfg.window_s) is None
        old = lim.limit
        now += duration
        decision = lim.decide(now)
        assert cfg.min_limit <= lim.limit <= cfg.max_limit
        samples = acc_s + acc_e
        if samples < cfg.min_samples:
            silent = samples == 0 or last_sample is None or now - last_sample >= cfg.window_s
            idle_since = max(acc_start, last_sample or 0.0, cooldown_until or 0.0)
            if (
                silent
                and cooldown_until is not None
                and now >= cooldown_until
                and old < cfg.max_limit
                and now - idle_since >= cfg.window_s
            ):
                # idle: grows once per window of silence, the thin counts are dropped
                assert decision is not None and decision.reason.startswith("idle: recover")
                assert decision.new > old and (decision.error_rate, decision.samples) == (0, 0)
                acc_start, acc_s, acc_e, acc_admitted = now, 0, 0, 0
                continue
            assert decision is None
            assert lim.limit == old  # never changes on a thin window: it carries
            if now - acc_start >= cfg.max_carry_windows * cfg.window_s:
                acc_start, acc_s, acc_e, acc_admitted = now, 0, 0, 0
            continue
        error_rate = acc_e / samples
        utilisation = acc_admitted / (old * (now - acc_start))
        assert decision is not None
        assert (decision.old, decision.new, decision.samples) == (old, lim.limit, samples)
        assert (decision.error_rate, decision.utilisation) == (error_rate, utilisation)
        # never grows with errors; unused, grows only while recovering from a cut
        if error_rate >= cfg.grow_threshold or (
            utilisation < cfg.utilisation_to_grow and cooldown_until is None
        ):
            assert decision.new <= old, decision
        if error_rate <= cfg.cut_threshold:
            assert decision.new >= old, decision
        else:
            cooldown_until = now + (cfg.cooldown_windows + 0.5) * cfg.window_s
        acc_start, acc_s, acc_e, acc_admitted = now, 0, 0, 0


# -- simulations (tests/unit/adaptive/aimd_sim.py) ------------------------------------


def test_capacity_drop_is_followed_within_10_windows() -> None:
    sim = UpstreamSim(dataclasses.replace(LimiterConfig(), initial=800.0))
    before = sim.run(Phase(30, 800.0))
    assert 700.0 <= before[-1].new_limit <= 1000.0
    after = sim.run(Phase(10, 100.0))
    reached = windows_until(after, 111.0, above=False)
    assert reached is not None and reached <= 10


def test_total_outage_takes_the_limit_to_the_minimum_within_10_windows() -> None:
    sim = UpstreamSim(dataclasses.replace(LimiterConfig(), initial=1000.0))
    results = sim.run(Phase(10, 0.0))
    assert windows_until(results, 10.0, above=False) is not None
    assert results[-1].new_limit == 10.0


def test_recovery_after_an_outage_within_30_windows() -> None:
    sim = UpstreamSim(dataclasses.replace(LimiterConfig(), initial=1000.0))
    sim.run(Phase(10, 0.0))
    reached = windows_until(sim.run(Phase(30, 800.0)), 0.8 * 800.0, above=True)
    assert reached is not None and reached <= 30


def test_recovery_after_a_capacity_drop_within_30_windows() -> None:
    sim = UpstreamSim()
    sim.run(Phase(30, 100.0))
    reached = windows_until(sim.run(Phase(30, 800.0)), 0.8 * 800.0, above=True)
    assert reached is not None and reached <= 30


def test_steady_overload_stays_near_capacity() -> None:
    results = UpstreamSim().run(Phase(150, 300.0))[30:]
    assert all(0.8 * 300 <= r.limit <= 1.3 * 300 for r in results)
    assert sum(r.error_rate for r in results) / len(results) <= 0.10


def test_light_traffic_does_not_inflate_the_limit() -> None:
    results = UpstreamSim().run(Phase(60, 800.0, offered=50.0))
    assert max(r.new_limit for r in results) <= 120.0


def test_growth_rule_figures_quoted_in_the_module_docstring() -> None:
    figures = growth_figures(Growth())
    assert (figures.outage_recovery, figures.drop_recovery) == (25, 10)
    assert (round(figures.overload_low), round(figures.overload_high)) == (330, 330)
    assert round(figures.overload_mean_error, 3) == 0.092
    assert figures.light_max == 120.0


def test_idle_recovery_figures_quoted_in_the_module_docstring() -> None:
    """An outage cut, then no traffic: back to 0.8 x max within 30 windows (the outage
    recovery target), to the maximum (enforcement ends) one window later."""
    figures = idle_figures()
    assert (figures.cut_to, figures.to_80_percent, figures.to_max) == (10.0, 26, 27)


def test_one_heavy_client_does_not_starve_light_ones() -> None:
    figures = fair_share_figures()
    assert figures.light_admitted >= 0.99
    low, high = figures.settled_limit
    assert 0.8 * 300 <= low <= high <= 1.35 * 300
    assert figures.mean_error <= 0.10
    assert figures.heavy_admitted >= 150  # work-conserving: the heavy gets the rest
