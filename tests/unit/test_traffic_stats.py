import pytest

from fileproxy.state.traffic import CUMULATIVE_BOUNDS_S, LATENCY_BOUNDS_MS, TrafficStats


def _record(stats, now, duration_s, bytes_sent, failed, status=200, cause="ok", bytes_in=0):
    stats.record(
        now,
        upstream="u:1",
        duration_s=duration_s,
        status=status,
        cause=cause,
        bytes_in=bytes_in,
        bytes_out=bytes_sent,
        failed=failed,
    )


def test_empty_window():
    snap = TrafficStats(60, now=1000.0).snapshot(1000.5)
    assert snap.requests_in_window == 0
    assert snap.error_rate == 0.0
    assert snap.p95_response_time_ms == 0.0
    assert snap.throughput_mbps == 0.0


def test_rates_and_percentiles_over_the_window():
    stats = TrafficStats(10, now=0.0)
    for i in range(100):
        # 95 fast requests of 10 ms, 5 slow ones of 1 s; 3 failed
        _record(stats, 5.0, 1.0 if i >= 95 else 0.010, bytes_sent=125_000, failed=i < 3)
    snap = stats.snapshot(10.0)
    assert snap.requests_in_window == 100
    assert snap.error_rate == 0.03
    assert snap.avg_response_time_ms == pytest.approx((95 * 10 + 5 * 1000) / 100)
    # bucket upper bounds are ~12% apart
    assert 10.0 <= snap.p50_response_time_ms <= 11.2
    assert 10.0 <= snap.p95_response_time_ms <= 11.2
    assert 1000.0 <= snap.p99_response_time_ms <= 1120.0
    # 12.5 MB over 10 s = 10 Mbit/s
    assert snap.throughput_mbps == pytest.approx(10.0)
    assert stats.total_requests == 100 and stats.total_errors == 3


def test_old_seconds_leave_the_window_but_totals_stay():
    stats = TrafficStats(5, now=0.0)
    _record(stats, now=1.2, duration_s=0.5, bytes_sent=10, failed=True)
    _record(stats, now=7.0, duration_s=0.1, bytes_sent=10, failed=False)
    snap = stats.snapshot(7.5)
    assert snap.requests_in_window == 1
    assert snap.error_rate == 0.0
    assert stats.total_requests == 2 and stats.total_errors == 1


def test_a_reused_bucket_is_reset():
    stats = TrafficStats(2, now=0.0)
    _record(stats, now=0.5, duration_s=0.1, bytes_sent=1, failed=True)
    _record(stats, now=2.5, duration_s=0.1, bytes_sent=1, failed=False)  # same slot, 2 s later
    assert stats.snapshot(2.6).errors_in_window == 0


def test_young_window_rates_use_the_elapsed_time():
    stats = TrafficStats(60, now=100.0)
    for _ in range(20):
        _record(stats, now=101.0, duration_s=0.01, bytes_sent=0, failed=False)
    assert stats.snapshot(102.0).requests_per_second == pytest.approx(10.0)


def test_very_long_requests_land_in_the_last_bucket():
    stats = TrafficStats(60, now=0.0)
    _record(stats, now=1.0, duration_s=10 * 3600, bytes_sent=0, failed=False)
    assert stats.snapshot(1.0).p99_response_time_ms == LATENCY_BOUNDS_MS[-1]


def test_cumulative_counters_for_metrics():
    stats = TrafficStats(60, now=0.0)
    _record(stats, 1.0, 0.003, 10, False, status=200, bytes_in=5)
    _record(stats, 1.0, 0.2, 0, True, status=502, cause="upstream_error")
    _record(stats, 1.0, 7200.0, 0, False, status=499, cause="client_abort")
    assert stats.by_status_class == {"2xx": 1, "5xx": 1, "4xx": 1}
    assert stats.by_cause == {"ok": 1, "upstream_error": 1, "client_abort": 1}
    assert stats.total_bytes_in == 5 and stats.total_bytes_out == 10
    buckets = stats.duration_buckets
    assert {c: sum(counts) for c, counts in buckets.items()} == {"2xx": 1, "5xx": 1, "4xx": 1}
    assert buckets["2xx"][CUMULATIVE_BOUNDS_S.index(0.005)] == 1
    assert buckets["5xx"][CUMULATIVE_BOUNDS_S.index(0.25)] == 1
    assert buckets["4xx"][-1] == 1  # above the largest bound
    assert stats.duration_sum_s == {"2xx": 0.003, "5xx": 0.2, "4xx": 7200.0}


def test_latency_percentiles_per_status_class():
    stats = TrafficStats(60, now=0.0)
    for _ in range(10):
        _record(stats, 1.0, 0.010, 0, False, status=200)
    _record(stats, 1.0, 2.0, 0, True, status=504, cause="timeout")
    snap = stats.snapshot(2.0)
    ok, timeout = snap.latency_by_status_class["2xx"], snap.latency_by_status_class["5xx"]
    assert ok.requests == 10 and 10.0 <= ok.p99_ms <= 11.2
    assert timeout.requests == 1 and 2000.0 <= timeout.p50_ms <= 2240.0
    assert 10.0 <= snap.p50_response_time_ms <= 11.2  # all classes together


def test_cumulative_counters_per_upstream():
    """The same counters per upstream: each request credited to the one named."""
    stats = TrafficStats(60, now=0.0)
    for upstream, status, cause, sent in (("a:1", 200, "ok", 10), ("b:1", 200, "ok", 20),
                                          ("b:1", 502, "upstream_error", 0)):  # fmt: skip
        stats.record(1.0, upstream=upstream, duration_s=0.01, status=status, cause=cause,
                     bytes_in=1, bytes_out=sent, failed=status >= 500)  # fmt: skip
    a, b = stats.upstreams["a:1"], stats.upstreams["b:1"]
    assert (a.by_status_class, b.by_status_class) == ({"2xx": 1}, {"2xx": 1, "5xx": 1})
    assert (a.by_cause, b.by_cause) == ({"ok": 1}, {"ok": 1, "upstream_error": 1})
    assert (a.bytes_out, b.bytes_out, a.bytes_in, b.bytes_in) == (10, 20, 1, 2)
    assert {c: sum(n) for c, n in b.duration_buckets.items()} == {"2xx": 1, "5xx": 1}
    assert b.duration_sum_s == {"2xx": 0.01, "5xx": 0.01}
    assert stats.total_requests == 3 and stats.by_status_class == {"2xx": 2, "5xx": 1}
