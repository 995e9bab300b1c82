"""The spill decision (fileproxy.adaptive.spill): one exact test per rule, no clock."""

from __future__ import annotations

import pytest

from fileproxy.adaptive.spill import RelaySample, SpillPolicy, SpillVerdict, decide, never_spilled

MIB = 1 << 20
POLICY = SpillPolicy(observe_s=0.25, observe_busy_s=0.02, min_remaining_s=1.0)


def sample(**changes: float) -> RelaySample:
    """A client at 100 KB/s for 0.5 s, the relay waiting on it, 4 MiB still upstream."""
    values = {
        "since_s": 0.5,
        "client_bytes": 50_000,
        "client_wait_s": 0.45,
        "upstream_wait_s": 0.01,
        "remaining": 4 * MIB,
    }
    values.update(changes)
    return RelaySample(**values)  # type: ignore[arg-type]


def test_a_slow_client_with_much_left_spills() -> None:
    assert decide(sample(), POLICY) == SpillVerdict(True, "client_slower")


def test_nothing_left_upstream_never_spills() -> None:
    assert decide(sample(remaining=0), POLICY) == SpillVerdict(False, "upstream_done")


def test_judged_only_after_the_observation_time() -> None:
    assert decide(sample(since_s=0.249), POLICY) == SpillVerdict(False, "observing")
    assert decide(sample(since_s=0.25), POLICY).spill


def test_judged_sooner_while_requests_wait_for_an_upstream_connection() -> None:
    assert decide(sample(since_s=0.019, pool_waiters=3), POLICY) == SpillVerdict(False, "observing")
    assert decide(sample(since_s=0.02, pool_waiters=1), POLICY).spill
    assert not decide(sample(since_s=0.02, pool_waiters=0), POLICY).spill


def test_an_upstream_slower_than_the_client_keeps_the_relay() -> None:
    slow_upstream = sample(client_wait_s=0.2, upstream_wait_s=0.2)
    assert decide(slow_upstream, POLICY) == SpillVerdict(False, "upstream_slower")
    assert decide(sample(client_wait_s=0.2, upstream_wait_s=0.19), POLICY).spill


def test_a_client_about_to_finish_keeps_its_connection() -> None:
    # 100 KB/s: 99,999 bytes left take it just under a second, 100,000 exactly one
    assert decide(sample(remaining=99_999), POLICY) == SpillVerdict(False, "finishing")
    assert decide(sample(remaining=100_000), POLICY).spill


def test_a_client_that_took_nothing_spills() -> None:
    assert decide(sample(client_bytes=0), POLICY) == SpillVerdict(True, "client_slower")


@pytest.mark.parametrize(
    ("method", "status", "length", "content_type", "accel", "reason"),
    [
        ("HEAD", 200, 10, "", "", "head"),
        ("GET", 101, 10, "", "", "no_body"),
        ("GET", 103, 10, "", "", "no_body"),
        ("GET", 204, None, "", "", "no_body"),
        ("GET", 304, 10, "", "", "no_body"),
        ("GET", 200, None, "application/octet-stream", "", "no_length"),
        ("GET", 200, 10, "", "No", "accel_buffering_no"),
        ("GET", 200, 10, "text/event-stream; charset=utf-8", "", "event_stream"),
        ("GET", 200, 10, "application/octet-stream", "yes", None),
        ("GET", 206, 10, "", "", None),
        ("POST", 500, 10, "text/html", "", None),
    ],
)
def test_what_never_spills(
    method: str, status: int, length: int | None, content_type: str, accel: str, reason: str | None
) -> None:
    assert never_spilled(method, status, length, content_type, accel) == reason
