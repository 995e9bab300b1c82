"""QualityClassifier, its profile tables and the weighted percentile; fake clock throughout."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fileproxy.adaptive.quality_classifier import (
    LEVELS,
    PROFILE_PRESETS,
    ClassifierConfig,
    Level,
    LevelProfile,
    QualityClassifier,
    Transition,
    parse_profile_table,
    profile_table,
    weighted_percentile,
)
from tests.unit.adaptive.quality_sim import LinkSim, jittered, step, uniform

KIB = 1024


def estimates(classifier: QualityClassifier) -> dict[str, object]:
    snap = classifier.snapshot()["estimates"]
    assert isinstance(snap, dict)
    return snap


def feed(classifier: QualityClassifier, now: float, ms: float, n: int = 10) -> None:
    """``n`` requests at ``now`` whose HTTP and transport RTT are both ``ms``."""
    for _ in range(n):
        classifier.observe_transport(now, ms)
        classifier.observe_http_rtt(now, ms)


def small(**changes: Any) -> QualityClassifier:
    """A classifier whose buffer holds exactly one ``feed``: every feed replaces it."""
    config = dataclasses.replace(ClassifierConfig(buffer_size=10), **changes)
    return QualityClassifier(config)


def settled(level: Level, **changes: Any) -> QualityClassifier:
    """A ``small`` classifier whose first estimate (at t=0 and t=1) was ``level``."""
    ms = {Level.GOOD: 20.0, Level.MEDIUM: 100.0, Level.POOR: 200.0, Level.VERY_POOR: 500.0}
    classifier = small(**changes)
    feed(classifier, 0.0, ms[level])
    classifier.evaluate(0.0)
    assert classifier.evaluate(1.0) is level
    return classifier


# -- weighted percentile -------------------------------------------------------------


def test_weighted_percentile_equal_weights() -> None:
    samples = [(30.0, 1.0), (10.0, 1.0), (40.0, 1.0), (20.0, 1.0)]
    assert weighted_percentile(samples, 50) == 20.0  # cumulative 1, 2 >= 2
    assert weighted_percentile(samples, 50.1) == 30.0
    assert weighted_percentile(samples, 0) == 10.0
    assert weighted_percentile(samples, 100) == 40.0
    assert weighted_percentile(samples, 75) == 30.0


def test_weighted_percentile_weights_move_the_median() -> None:
    assert weighted_percentile([(10.0, 3.0), (100.0, 1.0)], 50) == 10.0
    assert weighted_percentile([(10.0, 1.0), (100.0, 3.0)], 50) == 100.0
    assert weighted_percentile([(10.0, 1.0), (100.0, 1.0)], 50) == 10.0  # ties go low
    assert weighted_percentile([(5.0, 0.5), (7.0, 0.25), (9.0, 0.25)], 60) == 7.0


def test_weighted_percentile_empty_or_weightless_is_none() -> None:
    assert weighted_percentile([], 50) is None
    assert weighted_percentile([(10.0, 0.0)], 50) is None


def test_weighted_percentile_rejects_bad_percentile() -> None:
    with pytest.raises(ValueError, match="percentile"):
        weighted_percentile([(1.0, 1.0)], 101)


def test_observations_are_weighted_by_age() -> None:
    # Half-life 60 s: at t=120 an observation from t=0 weighs 0.25.
    classifier = QualityClassifier()
    for _ in range(4):
        classifier.observe_transport(0.0, 100.0)  # 4 x 0.25 = 1.0
    for _ in range(2):
        classifier.observe_transport(120.0, 10.0)  # 2 x 1.0 = 2.0
    classifier.evaluate(120.0)
    assert estimates(classifier)["transport_rtt_ms"] == 10.0  # unweighted p50 would be 100

    classifier = QualityClassifier()
    for _ in range(6):
        classifier.observe_transport(0.0, 100.0)  # 1.5 against 1.0
    classifier.observe_transport(120.0, 10.0)
    classifier.evaluate(120.0)
    assert estimates(classifier)["transport_rtt_ms"] == 100.0


def test_buffer_keeps_the_last_samples_only() -> None:
    classifier = QualityClassifier(ClassifierConfig(buffer_size=5))
    for i in range(8):
        classifier.observe_transport(0.0, float(i))
    classifier.evaluate(0.0)
    assert estimates(classifier)["transport_rtt_ms"] == 5.0  # p50 of 3..7
    samples = classifier.snapshot()["samples"]
    assert isinstance(samples, dict)
    assert samples["transport"] == 5
    assert samples["tcp_info_total"] == 8


# -- levels and config ---------------------------------------------------------------


def test_boundaries_are_upper_bounds() -> None:
    config = ClassifierConfig()
    assert [config.level_of(ms) for ms in (0, 49.9, 50, 149.9, 150, 299.9, 300, 1e6)] == [
        Level.GOOD,
        Level.GOOD,
        Level.MEDIUM,
        Level.MEDIUM,
        Level.POOR,
        Level.POOR,
        Level.VERY_POOR,
        Level.VERY_POOR,
    ]
    assert [level.value for level in LEVELS] == ["good", "medium", "poor", "very_poor"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"boundaries_ms": (50.0, 40.0, 300.0)}, "increasing"),
        ({"boundaries_ms": (0.0, 150.0, 300.0)}, "positive"),
        ({"half_life_s": 0.0}, "half_life_s"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"upgrade_margin": 1.0}, "upgrade_margin"),
        ({"percentile": 100.0}, "percentile"),
    ],
)
def test_config_validation(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(ClassifierConfig(), **changes)


# -- signals -------------------------------------------------------------------------


def test_http_rtt_is_floored_at_transport_rtt_once_enough_samples() -> None:
    classifier = QualityClassifier()
    for _ in range(10):
        classifier.observe_http_rtt(0.0, 10.0)
    for _ in range(9):
        classifier.observe_transport(0.0, 30.0)
    classifier.evaluate(0.0)
    assert estimates(classifier)["http_rtt_ms"] == 10.0  # 9 < min_samples: no floor yet
    classifier.observe_transport(0.0, 30.0)
    classifier.evaluate(1.0)
    assert estimates(classifier)["http_rtt_ms"] == 30.0


def test_connect_times_are_transport_samples() -> None:
    classifier = QualityClassifier()
    for _ in range(3):
        classifier.observe_connect(0.0, 42.0)
    classifier.evaluate(0.0)
    assert estimates(classifier)["transport_rtt_ms"] == 42.0
    samples = classifier.snapshot()["samples"]
    assert isinstance(samples, dict)
    assert (samples["connect_total"], samples["tcp_info_total"]) == (3, 0)


def test_effective_rtt_is_the_larger_of_transport_and_http() -> None:
    classifier = QualityClassifier()
    for _ in range(10):
        classifier.observe_transport(0.0, 20.0)
        classifier.observe_http_rtt(0.0, 90.0)
    classifier.evaluate(0.0)
    assert estimates(classifier)["effective_rtt_ms"] == 90.0
    only_transport = QualityClassifier()
    only_transport.observe_transport(0.0, 20.0)
    only_transport.evaluate(0.0)
    assert estimates(only_transport)["effective_rtt_ms"] == 20.0


def test_invalid_samples_are_counted_not_used() -> None:
    classifier = QualityClassifier()
    assert classifier.observe_http_rtt(0.0, float("nan")) is False
    classifier.observe_transport(0.0, -1.0)
    classifier.observe_connect(0.0, float("inf"))
    samples = classifier.snapshot()["samples"]
    assert isinstance(samples, dict)
    assert (samples["invalid_total"], samples["http"], samples["transport"]) == (3, 0, 0)


def hanging_setup(http_ms: float, transport_ms: float | None) -> QualityClassifier:
    classifier = QualityClassifier()
    for _ in range(10):
        classifier.observe_http_rtt(0.0, http_ms)
        if transport_ms is not None:
            classifier.observe_transport(0.0, transport_ms)
    classifier.evaluate(0.0)
    return classifier


def test_hanging_request_needs_all_three_conditions() -> None:
    # HTTP estimate 80 ms, transport 20 ms: the bar is max(6 x 80, 8 x 20, > 500).
    classifier = hanging_setup(80.0, 20.0)
    assert classifier.observe_http_rtt(0.5, 500.0) is True  # not > 500 ms
    assert classifier.observe_http_rtt(0.5, 500.5) is False  # >= 480, >= 160, > 500
    # HTTP estimate 100 ms, transport 90 ms: 6 x 100 = 600 and 8 x 90 = 720.
    classifier = hanging_setup(100.0, 90.0)
    assert classifier.observe_http_rtt(0.5, 700.0) is True  # below 8 x transport
    assert classifier.observe_http_rtt(0.5, 720.0) is False
    # HTTP estimate 200 ms, transport 20 ms: 6 x 200 = 1200.
    classifier = hanging_setup(200.0, 20.0)
    assert classifier.observe_http_rtt(0.5, 1199.0) is True
    assert classifier.observe_http_rtt(0.5, 1200.0) is False
    samples = classifier.snapshot()["samples"]
    assert isinstance(samples, dict)
    assert (samples["hanging_total"], samples["http"]) == (1, 11)


def test_hanging_filter_without_estimates() -> None:
    # No HTTP estimate yet: no evidence, nothing is dropped.
    assert QualityClassifier().observe_http_rtt(0.0, 10_000.0) is True
    # No transport signal (no TCP_INFO): the HTTP condition alone decides.
    classifier = hanging_setup(50.0, None)
    assert classifier.observe_http_rtt(0.5, 10_000.0) is False


# -- first estimate ------------------------------------------------------------------


def test_initial_level_until_two_evaluations_agree() -> None:
    classifier = small()
    assert classifier.level is Level.MEDIUM
    feed(classifier, 0.0, 20.0)
    assert classifier.evaluate(0.0) is Level.MEDIUM  # one evaluation says GOOD
    assert classifier.snapshot()["estimated"] is False
    assert classifier.evaluate(1.0) is Level.GOOD
    assert classifier.snapshot()["estimated"] is True
    assert classifier.transitions == (
        Transition(1.0, Level.MEDIUM, Level.GOOD, "first estimate 20.0 ms (2 evaluations)", 20.0),
    )


def test_first_estimate_restarts_when_evaluations_disagree() -> None:
    classifier = small()
    feed(classifier, 0.0, 20.0)
    classifier.evaluate(0.0)  # GOOD
    feed(classifier, 1.0, 500.0)
    assert classifier.evaluate(1.0) is Level.MEDIUM  # VERY_POOR: a new streak
    assert classifier.evaluate(2.0) is Level.VERY_POOR
    assert [t.to_level for t in classifier.transitions] == [Level.VERY_POOR]


def test_first_estimate_near_a_boundary_waits_for_confident_samples() -> None:
    classifier = QualityClassifier(ClassifierConfig(confident_samples=30))
    for second in range(3):  # 140 ms is within 20 % of the 150 ms boundary
        feed(classifier, float(second), 140.0)
        classifier.evaluate(float(second))
    assert classifier.snapshot()["estimated"] is False  # 30 samples at t=2: one evaluation
    classifier.evaluate(3.0)
    assert classifier.snapshot()["estimated"] is True
    assert classifier.level is Level.MEDIUM
    assert classifier.transitions == ()  # adopted MEDIUM: no change

    clear = QualityClassifier(ClassifierConfig(confident_samples=30))
    feed(clear, 0.0, 100.0)  # 100 ms is clearly MEDIUM: 10 samples suffice
    clear.evaluate(0.0)
    clear.evaluate(1.0)
    assert clear.snapshot()["estimated"] is True


def test_no_level_without_enough_samples() -> None:
    classifier = QualityClassifier()
    feed(classifier, 0.0, 500.0, n=9)
    assert classifier.evaluate(0.0) is Level.MEDIUM
    assert classifier.evaluate(1.0) is Level.MEDIUM
    assert classifier.snapshot()["estimated"] is False


# -- hysteresis ----------------------------------------------------------------------


def test_evaluation_is_rate_limited() -> None:
    classifier = settled(Level.GOOD, min_dwell_s=0.0)
    feed(classifier, 10.0, 200.0)
    classifier.evaluate(10.0)
    assert classifier.evaluate(10.9) is Level.GOOD  # too soon: not a second evaluation
    assert classifier.evaluate(11.0) is Level.POOR


def test_degrade_needs_two_consecutive_evaluations() -> None:
    classifier = settled(Level.GOOD)
    feed(classifier, 10.0, 200.0)
    assert classifier.evaluate(10.0) is Level.GOOD
    feed(classifier, 10.5, 20.0)
    assert classifier.evaluate(11.0) is Level.GOOD  # streak broken
    feed(classifier, 11.5, 200.0)
    assert classifier.evaluate(12.0) is Level.GOOD
    assert classifier.evaluate(13.0) is Level.POOR
    assert classifier.transitions[-1] == Transition(
        13.0,
        Level.GOOD,
        Level.POOR,
        "degrade: estimate 200.0 ms worse than good for 2 evaluations",
        200.0,
    )


def test_degrade_goes_to_the_least_bad_level_of_the_streak() -> None:
    classifier = settled(Level.GOOD)
    feed(classifier, 10.0, 500.0)
    classifier.evaluate(10.0)  # VERY_POOR
    feed(classifier, 10.5, 100.0)
    assert classifier.evaluate(11.0) is Level.MEDIUM  # MEDIUM: still worse, least bad


def test_minimum_dwell_delays_a_degrade() -> None:
    classifier = settled(Level.GOOD)  # level since t=1
    feed(classifier, 2.0, 200.0)
    for second in (2.0, 3.0, 4.0, 5.0):
        assert classifier.evaluate(second) is Level.GOOD
    assert classifier.evaluate(6.0) is Level.POOR  # 5 s after t=1
    assert classifier.transitions[-1].reason == (
        "degrade: estimate 200.0 ms worse than good for 5 evaluations"
    )


def test_recent_estimate_degrades_only_when_clearly_past_the_boundary() -> None:
    def classifier_after(recent_ms: float) -> QualityClassifier:
        classifier = QualityClassifier()
        for second in range(10):  # 100 good samples: the long p50 stays at 20 ms
            feed(classifier, float(second), 20.0)
            classifier.evaluate(float(second))
        feed(classifier, 20.0, recent_ms, n=20)
        classifier.evaluate(20.0)
        classifier.evaluate(21.0)
        assert estimates(classifier)["effective_rtt_ms"] == 20.0
        assert estimates(classifier)["recent_rtt_ms"] == recent_ms
        return classifier

    assert classifier_after(62.0).level is Level.GOOD  # < 1.25 x 50
    moved = classifier_after(62.5)
    assert moved.level is Level.MEDIUM
    assert moved.transitions[-1] == Transition(
        21.0,
        Level.GOOD,
        Level.MEDIUM,
        "degrade: recent estimate 62.5 ms worse than good for 2 evaluations",
        62.5,
    )


def test_upgrade_needs_a_sustained_clear_margin() -> None:
    classifier = settled(Level.POOR)
    feed(classifier, 10.0, 125.0)  # 125 / 0.8 = 156.25: not clearly below 150
    for second in range(10, 30):
        assert classifier.evaluate(float(second)) is Level.POOR
    feed(classifier, 30.0, 119.0)  # 119 / 0.8 = 148.75: clearly MEDIUM
    for second in range(30, 40):
        assert classifier.evaluate(float(second)) is Level.POOR
    assert classifier.evaluate(40.0) is Level.MEDIUM  # 10 s after t=30
    assert classifier.transitions[-1] == Transition(
        40.0,
        Level.POOR,
        Level.MEDIUM,
        "upgrade: 119.0 ms at least 20% below the medium bound for 10.0 s",
        119.0,
    )


def test_upgrade_timer_restarts_when_interrupted() -> None:
    classifier = settled(Level.POOR)
    feed(classifier, 10.0, 100.0)
    for second in range(10, 19):
        classifier.evaluate(float(second))
    feed(classifier, 19.0, 140.0)  # not clearly below: the timer stops
    classifier.evaluate(19.0)
    feed(classifier, 20.0, 100.0)
    for second in range(20, 30):
        assert classifier.evaluate(float(second)) is Level.POOR
    assert classifier.evaluate(30.0) is Level.MEDIUM


def test_upgrade_goes_to_the_least_good_level_of_the_period() -> None:
    classifier = settled(Level.VERY_POOR)
    feed(classifier, 10.0, 20.0)
    classifier.evaluate(10.0)  # GOOD
    feed(classifier, 10.5, 100.0)
    for second in range(11, 20):
        classifier.evaluate(float(second))  # MEDIUM
    assert classifier.evaluate(20.0) is Level.MEDIUM


def test_transitions_are_bounded() -> None:
    classifier = settled(Level.GOOD, max_transitions=3, min_dwell_s=0.0, upgrade_sustain_s=0.0)
    for second in range(10, 40, 2):
        feed(classifier, float(second), 200.0 if second % 4 else 20.0)
        classifier.evaluate(float(second))
        classifier.evaluate(float(second) + 1)
    assert len(classifier.transitions) == 3


def test_snapshot() -> None:
    classifier = settled(Level.GOOD)
    classifier.observe_transport(1.5, 20.0, min_rtt_ms=15.0, retransmit_rate=0.01)
    classifier.observe_http_rtt(1.5, 10_000.0)
    classifier.evaluate(2.0)
    assert classifier.snapshot() == {
        "level": "good",
        "estimated": True,
        "level_since": 1.0,
        "evaluated_at": 2.0,
        "estimates": {
            "effective_rtt_ms": 20.0,
            "recent_rtt_ms": 20.0,
            "http_rtt_ms": 20.0,
            "transport_rtt_ms": 20.0,
            "transport_min_rtt_ms": 15.0,
            "retransmit_rate": 0.01,
        },
        "samples": {
            "http": 10,
            "transport": 10,
            "http_total": 10,
            "tcp_info_total": 11,
            "connect_total": 0,
            "hanging_total": 1,
            "invalid_total": 0,
        },
        "boundaries_ms": [50.0, 150.0, 300.0],
        "transitions": [
            {
                "at": 1.0,
                "from": "medium",
                "to": "good",
                "reason": "first estimate 20.0 ms (2 evaluations)",
                "estimate_ms": 20.0,
            }
        ],
    }


# -- simulated links (tests/unit/adaptive/quality_sim.py) -----------------------------

SEEDS = range(1, 21)


@pytest.mark.parametrize(
    ("rtt_ms", "level"),
    [(20, Level.GOOD), (100, Level.MEDIUM), (200, Level.POOR), (400, Level.VERY_POOR)],
)
def test_links_settle_within_10_seconds(rtt_ms: float, level: Level) -> None:
    for seed in SEEDS:
        sim = LinkSim(QualityClassifier(), jittered(rtt_ms), seed=seed)
        assert sim.run(10.0) is level
        reached = sim.first_time_at(level)
        assert reached is not None
        assert all(lv is level for t, lv in sim.timeline if t >= reached), seed


def test_steady_140_ms_link_changes_level_at_most_once_in_5_minutes() -> None:
    for seed in (1, 2):
        sim = LinkSim(QualityClassifier(), uniform(100.0, 180.0), seed=seed)
        sim.run(300.0)
        assert len(sim.classifier.transitions) <= 1, sim.classifier.transitions
        assert sim.classifier.level is Level.MEDIUM


def test_step_is_detected_within_5_s_and_the_return_within_30_s() -> None:
    link = step(step(jittered(50.0), jittered(250.0), 60.0), jittered(50.0), 120.0)
    for seed in (1, 2, 3):
        sim = LinkSim(QualityClassifier(), link, seed=seed)
        before = sim.run(60.0)
        assert before is Level.MEDIUM  # 50 ms + 1 ms of server time sits on the boundary
        sim.run(60.0)
        detected = sim.first_time_at(Level.POOR, after=60.0)
        assert detected is not None and detected - 60.0 <= 5.0
        sim.run(60.0)
        back = sim.first_time_at(before, after=120.0)
        assert back is not None and back - 120.0 <= 30.0
        levels = [t.to_level for t in sim.classifier.transitions if t.at > 60.0]
        assert levels == [Level.POOR, Level.MEDIUM]


def test_server_think_time_does_not_change_the_level() -> None:
    config = ClassifierConfig(initial_level=Level.GOOD)
    for seed in (1, 2):
        sim = LinkSim(QualityClassifier(config), jittered(20.0), seed=seed, hanging_share=0.05)
        sim.run(300.0)
        assert all(level is Level.GOOD for _, level in sim.timeline)
        assert sim.classifier.transitions == ()
        samples = sim.classifier.snapshot()["samples"]
        assert isinstance(samples, dict)
        assert sim.hanging_sent > 100
        assert samples["hanging_total"] == sim.hanging_sent


# -- profiles ------------------------------------------------------------------------


def test_seed_preset_is_the_seed_table() -> None:
    seed = PROFILE_PRESETS["seed"]
    assert [seed[level].chunk_size for level in LEVELS] == [8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB]
    assert [seed[level].headers_timeout_s for level in LEVELS] == [45.0, 60.0, 90.0, 120.0]
    assert [seed[level].read_timeout_s for level in LEVELS] == [45.0, 60.0, 90.0, 120.0]
    assert [seed[level].connect_timeout_s for level in LEVELS] == [5.0, 10.0, 15.0, 20.0]


def test_throughput_preset_reads_64_kib_at_every_level() -> None:
    table = PROFILE_PRESETS["throughput"]
    assert [table[level].chunk_size for level in LEVELS] == [64 * KIB] * 4
    seed = PROFILE_PRESETS["seed"]
    assert [table[level].headers_timeout_s for level in LEVELS] == [
        seed[level].headers_timeout_s for level in LEVELS
    ]


def test_presets_cover_every_level_and_are_read_only() -> None:
    for table in PROFILE_PRESETS.values():
        assert list(table) == list(LEVELS)
    with pytest.raises(TypeError):
        PROFILE_PRESETS["seed"][Level.GOOD] = LevelProfile(1, 1.0, 1.0, 1.0)  # type: ignore[index]


def test_parse_profile_table() -> None:
    text = (
        " GOOD=65536:10:60:60, medium=32768:10:60:90,"
        "poor=16384:15:90:120,very_poor=8192:20:120:180 "
    )
    assert parse_profile_table(text) == {
        Level.GOOD: LevelProfile(65536, 10.0, 60.0, 60.0),
        Level.MEDIUM: LevelProfile(32768, 10.0, 60.0, 90.0),
        Level.POOR: LevelProfile(16384, 15.0, 90.0, 120.0),
        Level.VERY_POOR: LevelProfile(8192, 20.0, 120.0, 180.0),
    }
    assert parse_profile_table("very_poor=1:1:1:1,poor=1:1:1:1,medium=1:1:1:1,good=1:1:1:0.5")[
        Level.GOOD
    ] == LevelProfile(1, 1.0, 1.0, 0.5)


REST = "medium=1:1:1:1,poor=1:1:1:1,very_poor=1:1:1:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"missing level\(s\) good, medium, poor, very_poor"),
        ("good=1:1:1:1,medium=1:1:1:1", r"missing level\(s\) poor, very_poor"),
        (f"great=1:1:1:1,{REST}", "unknown level 'great'"),
        (f"good=1:1:1:1,good=2:1:1:1,{REST}", "level 'good' given twice"),
        (f"good:1:1:1:1,{REST}", "expected LEVEL=CHUNK:CONNECT:HEADERS:READ"),
        (f"good=1:1:1,{REST}", "expected 4 fields CHUNK:CONNECT:HEADERS:READ, got 3"),
        (f"good=64k:1:1:1,{REST}", "chunk size '64k' is not an integer"),
        (f"good=0:1:1:1,{REST}", "chunk size must be > 0"),
        (f"good=1:x:1:1,{REST}", "connect timeout 'x' is not a number"),
        (f"good=1:1:0:1,{REST}", "headers timeout must be > 0"),
        (f"good=1:1:1:inf,{REST}", "read timeout must be > 0"),
    ],
)
def test_parse_profile_table_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_profile_table(text)


def test_profile_table_takes_a_preset_or_a_table() -> None:
    assert profile_table("seed") == dict(PROFILE_PRESETS["seed"])
    assert profile_table(" Throughput ") == dict(PROFILE_PRESETS["throughput"])
    assert profile_table(f"good=1:1:1:1,{REST}")[Level.GOOD] == LevelProfile(1, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="not a preset"):
        profile_table("fast")
