"""The retry rule (which tries may be repeated), Envoy's retry budget and gRPC's retry
throttling (issue 20.13)."""

from __future__ import annotations

import pytest

from fileproxy.adaptive.retry_budget import (
    CONNECT,
    OTHER,
    RESET,
    STATUS,
    TIMEOUT,
    RetryBudget,
    RetryThrottle,
    retryable,
)
from tests.unit.adaptive.retry_sim import budget_alone, outage


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "PUT"])
def test_a_request_that_never_left_may_go_elsewhere_whatever_its_method(method):
    assert retryable(method, CONNECT, body_started=False)


@pytest.mark.parametrize("kind", [RESET, TIMEOUT])
def test_resets_and_timeouts_only_for_idempotent_methods_without_a_body_sent(kind):
    assert retryable("GET", kind, body_started=False)
    assert retryable("DELETE", kind, body_started=False)
    assert not retryable("POST", kind, body_started=False)
    assert not retryable("PUT", kind, body_started=True)
    assert not retryable("GET", OTHER, body_started=False)


def test_statuses_only_those_configured_and_never_a_post():
    assert retryable("GET", STATUS, body_started=False, status=503, statuses=(502, 503))
    assert not retryable("GET", STATUS, body_started=False, status=500, statuses=(502, 503))
    assert not retryable("POST", STATUS, body_started=False, status=503, statuses=(503,))


def test_the_budget_is_a_share_of_active_requests_with_a_floor():
    budget = RetryBudget(percent=20.0, min_concurrency=3)
    assert [budget.start(1) for _ in range(4)] == [True, True, True, False]  # the floor
    assert budget.refused == 1
    budget.finish()
    assert budget.start(1)
    for _ in range(3):
        budget.finish()
    assert budget.active == 0
    grants = [budget.start(50) for _ in range(12)]  # 20% of 50 = 10
    assert grants.count(True) == 10
    assert budget.granted == 4 + 10


def test_a_free_retry_is_not_counted():
    budget = RetryBudget(percent=0.0, min_concurrency=0)
    assert not budget.start(100)
    assert budget.start(100, counted=False)
    assert budget.active == 0


# -- issue 20.13: gRPC's retry throttling, driven by outcomes ---------------------------


def test_the_throttle_starts_full_a_failure_costs_1_an_answer_gives_the_ratio():
    throttle = RetryThrottle(max_tokens=10.0, ratio=0.1)
    assert throttle.tokens == 10.0
    throttle.failure()
    assert throttle.tokens == 9.0
    throttle.success()
    assert throttle.tokens == pytest.approx(9.1)
    for _ in range(20):
        throttle.success()
    assert throttle.tokens == 10.0  # capped at the maximum
    for _ in range(30):
        throttle.failure()
    assert throttle.tokens == 0.0  # and never below 0


def test_the_throttle_allows_retries_only_above_half_the_maximum():
    throttle = RetryThrottle(max_tokens=10.0, ratio=0.1)
    for _ in range(4):
        throttle.failure()
    assert throttle.tokens == 6.0 and throttle.allows
    throttle.failure()
    assert throttle.tokens == 5.0 and not throttle.allows  # exactly half: no
    throttle.success()
    assert throttle.allows  # 5.1


def test_a_throttled_budget_refuses_counted_retries_and_still_grants_free_ones():
    budget = RetryBudget(throttle=RetryThrottle(max_tokens=2.0))
    budget.failed_try()
    assert not budget.start(1)  # 1 token of 2: throttled, whatever the concurrency
    assert (budget.throttled, budget.refused, budget.active) == (1, 0, 0)
    assert budget.start(1, counted=False)  # a connect failure reached no upstream
    budget.answered_try()
    assert budget.start(1)


def test_no_throttle_with_0_tokens():
    budget = RetryBudget(throttle=RetryThrottle(max_tokens=0.0))
    for _ in range(100):
        budget.failed_try()
    assert budget.start(1)


def test_an_outage_one_request_at_a_time_is_not_multiplied():
    """Every replica answers 503, one GET at a time: the budget alone always holds at one
    request in flight (the floor of 3), so every GET went to every replica."""
    for replicas in (2, 3):
        before = outage(budget_alone(), replicas=replicas)
        assert before.tries == 90 * replicas  # the bug: 2.0x, 3.0x
        after = outage(RetryBudget(), replicas=replicas)
        assert after.tries <= 96, after  # the first few GETs only; 1.07x at most
        assert after.tries > 90  # retries did happen before the outage was clear


def test_a_burst_is_still_capped_by_the_budget():
    budget = RetryBudget(percent=20.0, min_concurrency=3)
    grants = [budget.start(10) for _ in range(5)]  # tokens aplenty: the cap answers
    assert grants == [True, True, True, False, False] and budget.refused == 2


def test_retries_return_after_enough_answers():
    budget = RetryBudget()  # 20 tokens, ratio 0.1
    outage(budget)
    assert budget.throttle.tokens == 0.0
    answers = 0
    while not budget.throttle.allows:
        budget.answered_try()
        answers += 1
    assert answers == 101  # 0 -> 10.1 tokens


def test_one_failing_replica_among_healthy_ones_keeps_its_retries():
    """Up to ratio / (1 + ratio), 9 %, of tries failing, the tokens do not run down."""
    budget = RetryBudget()
    for i in range(10_000):
        if i % 12 == 0:  # 8.3 % of tries fail
            budget.failed_try()
            assert budget.start(1)
            budget.finish()
        else:
            budget.answered_try()
    assert budget.throttled == 0
