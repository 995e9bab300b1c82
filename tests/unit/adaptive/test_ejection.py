"""Outlier ejection: consecutive failures, growing back-off, at most half out."""

from __future__ import annotations

from fileproxy.adaptive.ejection import EjectionConfig, OutlierDetector

CONFIG = EjectionConfig(consecutive=3, base_s=10.0, max_s=25.0)


def test_consecutive_failures_eject_and_a_success_resets_the_count():
    detector = OutlierDetector(CONFIG, 3)
    assert detector.failure(0.0, 0, "connect") is None
    assert detector.failure(0.0, 0, "connect") is None
    detector.success(0)
    assert detector.failure(1.0, 0, "reset") is None
    assert detector.failure(1.0, 0, "reset") is None
    assert detector.failure(1.0, 0, "reset") == 11.0
    assert not detector.usable(5.0, 0)
    assert detector.health[0].reason == "reset"
    assert detector.health[0].snapshot(5.0)["state"] == "ejected"
    assert detector.health[0].snapshot(5.0)["ejected_for_s"] == 6.0


def test_the_back_off_grows_with_each_ejection_up_to_the_maximum():
    detector = OutlierDetector(CONFIG, 2)
    ends = []
    now = 0.0
    for _ in range(3):
        for _ in range(3):
            until = detector.failure(now, 1, "status 503")
        assert until is not None
        ends.append(until - now)
        assert detector.usable(until, 1)  # the ejection ran out
        assert detector.health[1].back_at == until  # for the slow start
        now = until
    assert ends == [10.0, 20.0, 25.0]


def test_never_more_than_half_the_replicas_are_out():
    detector = OutlierDetector(CONFIG, 3)
    for _ in range(3):
        detector.failure(0.0, 0, "connect")
    for _ in range(6):
        assert detector.failure(0.0, 1, "connect") is None  # one of three: the limit
    assert detector.usable(0.0, 1)
    assert detector.ejected(0.0) == 1


def test_one_replica_is_never_ejected_and_zero_means_never():
    alone = OutlierDetector(CONFIG, 1)
    for _ in range(10):
        assert alone.failure(0.0, 0, "connect") is None
    never = OutlierDetector(EjectionConfig(consecutive=0), 4)
    for _ in range(10):
        assert never.failure(0.0, 0, "connect") is None


def test_a_passing_health_check_ends_an_ejection_early():
    detector = OutlierDetector(CONFIG, 2)
    for _ in range(3):
        detector.failure(0.0, 0, "connect")
    assert not detector.usable(1.0, 0)
    assert detector.readmit(2.0, 0)
    assert detector.usable(2.0, 0)
    assert detector.health[0].back_at == 2.0
    assert not detector.readmit(3.0, 0)  # was not out


def test_an_ejection_from_the_fleet_is_taken_over_within_the_limit():
    detector = OutlierDetector(CONFIG, 3)
    assert detector.adopt(0.0, 2, 30.0, "fleet: reset")
    assert not detector.usable(29.0, 2)
    assert detector.health[2].ejections == 0  # not this worker's: no longer back-off
    assert not detector.adopt(0.0, 1, 30.0, "fleet: reset")  # one of three is the limit
    assert not detector.adopt(0.0, 2, 40.0, "fleet: reset")  # already out
    assert not detector.adopt(50.0, 1, 40.0, "fleet: reset")  # already over
