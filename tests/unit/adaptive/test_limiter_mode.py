"""adaptive.limiter_mode: one exact test per cell of the transition table."""

from __future__ import annotations

from fileproxy.adaptive.limiter_mode import LimiterMode, Mode

SHARED = LimiterMode()
FALLBACK = LimiterMode(Mode.FALLBACK)
RECOVERING = LimiterMode(Mode.RECOVERING, until=12.0)


def test_store_failed_goes_to_fallback_from_every_mode() -> None:
    for mode in (SHARED, FALLBACK, RECOVERING):
        assert mode.store_failed() == LimiterMode(Mode.FALLBACK, None)


def test_store_back_from_fallback_recovers_until_now_plus_grace() -> None:
    assert FALLBACK.store_back(10.0, 1.5) == LimiterMode(Mode.RECOVERING, 11.5)


def test_store_back_keeps_shared_and_a_running_recovery() -> None:
    assert SHARED.store_back(10.0, 1.5) == SHARED
    assert RECOVERING.store_back(11.0, 1.5) == RECOVERING  # the grace is not extended


def test_recovery_ends_at_its_deadline_not_before() -> None:
    assert RECOVERING.at(11.999) == RECOVERING
    assert RECOVERING.at(12.0) == SHARED


def test_time_alone_changes_neither_shared_nor_fallback() -> None:
    assert SHARED.at(1e9) == SHARED
    assert FALLBACK.at(1e9) == FALLBACK
