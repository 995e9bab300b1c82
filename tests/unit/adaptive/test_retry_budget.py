"""The retry rule (which tries may be repeated) and Envoy's retry budget."""

from __future__ import annotations

import pytest

from fileproxy.adaptive.retry_budget import (
    CONNECT,
    OTHER,
    RESET,
    STATUS,
    TIMEOUT,
    RetryBudget,
    retryable,
)


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
