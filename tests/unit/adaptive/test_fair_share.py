"""FairShare: one exact test per rule (fake clock)."""

from __future__ import annotations

import pytest

from fileproxy.adaptive import FairShare, FairShareConfig, Gcra, spare_burst


def test_a_lone_client_has_half_the_rate_and_burst_the_other_half_kept() -> None:
    fair = FairShare()  # shares: the client and one kept for a newcomer
    assert [fair.within_share(0.0, "a", 10.0, 4) for _ in range(3)] == [True, True, False]
    assert fair.within_share(0.1, "a", 10.0, 4) is False
    assert fair.within_share(0.2, "a", 10.0, 4) is True  # one more per 2 / rate


def test_active_clients_split_the_rate_and_the_burst() -> None:
    fair = FairShare()
    assert fair.within_share(0.0, "heavy", 9.0, 6) is True  # alone: 2 shares, TAT 2/9
    assert fair.within_share(0.0, "light", 9.0, 6) is True  # now 3 shares: 3 req/s, burst 2
    assert fair.within_share(0.0, "heavy", 9.0, 6) is True  # its burst of 2
    assert fair.within_share(0.0, "heavy", 9.0, 6) is False  # over its share: spare
    assert fair.within_share(0.5, "heavy", 9.0, 6) is True
    assert fair.within_share(0.5, "heavy", 9.0, 6) is False  # 1 per 1/3 s beyond
    assert fair.within_share(0.5, "light", 9.0, 6) is True  # light is never in the way
    assert fair.snapshot() == {"active_clients": 2, "priority": 5, "spare": 2}


def test_spare_requests_are_not_charged_to_the_share() -> None:
    fair = FairShare()
    assert fair.within_share(0.0, "a", 1.0, 1) is True  # 2 shares: one per 2 s
    for t in (0.1, 1.0, 1.9):
        assert fair.within_share(t, "a", 1.0, 1) is False
    assert fair.within_share(2.0, "a", 1.0, 1) is True  # the refused ones cost nothing


def test_a_refund_gives_the_charge_back() -> None:
    fair = FairShare()
    assert fair.within_share(0.0, "a", 1.0, 1) is True
    fair.refund("a")  # the upstream's GCRA refused it after all
    fair.refund("a")  # once only
    assert fair.within_share(0.0, "a", 1.0, 1) is True
    assert fair.within_share(0.0, "a", 1.0, 1) is False
    assert fair.snapshot()["priority"] == 1


def test_clients_quiet_for_active_s_no_longer_count() -> None:
    fair = FairShare(FairShareConfig(active_s=2.0))
    fair.within_share(0.0, "a", 10.0, 1)
    fair.within_share(1.0, "b", 10.0, 1)
    assert fair.active == 2
    fair.within_share(2.5, "b", 10.0, 1)  # a was last seen 2.5 s ago
    assert fair.active == 1


def test_tracked_clients_are_bounded_least_recently_seen_evicted() -> None:
    fair = FairShare(FairShareConfig(max_clients=2))
    for t, client in ((0.0, "a"), (0.1, "b"), (0.2, "a"), (0.3, "c")):
        fair.within_share(t, client, 10.0, 1)
    assert fair.active == 2
    assert list(fair._clients) == ["a", "c"]  # b, the least recently seen, went


def test_priority_keeps_room_that_spare_requests_cannot_take() -> None:
    """Through one Gcra: spare requests (half the burst) leave the rest to priority ones."""
    gcra, fair = Gcra(10.0, 5), FairShare()
    light_refused = heavy_admitted = 0
    for i in range(2000):  # 10 s: heavy asks every 5 ms, light every 500 ms
        now = i * 0.005
        for name in ("heavy", "light") if i % 100 == 0 else ("heavy",):
            within = fair.within_share(now, name, 10.0, 5)
            admitted = gcra.try_admit(now, None if within else spare_burst(5))[0]
            if within and not admitted:
                fair.refund(name)
            if name == "heavy":
                heavy_admitted += admitted
            else:
                light_refused += not admitted
    assert light_refused == 0
    assert 70 <= heavy_admitted <= 100  # the rest of the 10 req/s for 10 s


def test_spare_requests_meet_half_the_burst() -> None:
    assert [spare_burst(b) for b in (1, 2, 5, 20)] == [1, 1, 2, 10]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        FairShareConfig(max_clients=0)
    with pytest.raises(ValueError):
        FairShareConfig(active_s=0.0)
