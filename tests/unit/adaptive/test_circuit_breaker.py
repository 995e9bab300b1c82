from fileproxy.adaptive.circuit_breaker import BreakerState, CircuitBreaker


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failures_to_open=3, retry_after_s=1.0)
    breaker.failed(0.0)
    breaker.failed(0.1)
    breaker.succeeded(0.2)  # a success in between resets the streak
    breaker.failed(0.3)
    breaker.failed(0.4)
    assert breaker.closed and breaker.allow(0.4)
    breaker.failed(0.5)
    assert breaker.state is BreakerState.OPEN
    assert breaker.since == 0.5


def test_one_probe_per_interval_with_jitter_then_closes() -> None:
    breaker = CircuitBreaker(failures_to_open=1, retry_after_s=1.0)
    breaker.failed(10.0, jitter=1.2)
    assert not breaker.allow(11.1)  # 1.2 s with this jitter
    assert breaker.allow(11.2)  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(11.3)  # one probe at a time
    breaker.failed(11.4, jitter=0.8)  # the probe failed: open for another interval
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(12.1)
    assert breaker.allow(12.21)  # 0.8 s after the failed probe
    breaker.succeeded(12.25)
    assert breaker.closed and breaker.allow(12.3)
    assert breaker.since == 12.25  # the outage lasted from 10.0 to 12.25


def test_since_marks_the_outage_not_each_probe() -> None:
    breaker = CircuitBreaker(failures_to_open=1, retry_after_s=1.0)
    breaker.failed(1.0)
    breaker.allow(2.0)
    breaker.failed(2.1)
    assert breaker.since == 1.0
