from fileproxy.adaptive import Level
from fileproxy.state.fleet import FleetView, UpstreamReport, WorkerReport, fleet_level
from fileproxy.state.traffic import TrafficStats


def upstream(level: str, samples: int, estimated: bool = True) -> UpstreamReport:
    return UpstreamReport(level, estimated, samples, 100.0, False, 0, "shared")


def test_fleet_level_is_the_sample_weighted_median() -> None:
    assert fleet_level([upstream("good", 100), upstream("poor", 30), upstream("poor", 30)]) is (
        Level.GOOD
    )
    assert fleet_level([upstream("good", 10), upstream("poor", 30)]) is Level.POOR
    # a tie goes to the worse level
    assert fleet_level([upstream("good", 20), upstream("very_poor", 20)]) is Level.GOOD
    assert fleet_level([upstream("good", 19), upstream("very_poor", 20)]) is Level.VERY_POOR
    # estimates that are still the initial guess do not vote
    assert fleet_level([upstream("medium", 5, estimated=False)]) is None
    assert fleet_level([]) is None


def report(worker: str, instance: str, pid: int, traffic: TrafficStats) -> WorkerReport:
    return WorkerReport(
        worker, instance, pid, 0.0, traffic.counters(), traffic.window_parts(10.0),
        {"up:1": upstream("good", 50)},
    )  # fmt: skip


def test_reports_survive_the_wire_and_add_up_per_instance() -> None:
    a, b = TrafficStats(10, 0.0), TrafficStats(10, 0.0)
    for traffic, durations in ((a, (0.01, 0.02)), (b, (0.5,))):
        for duration in durations:
            traffic.record(
                9.0, upstream="u:1", duration_s=duration, status=200, cause="ok", bytes_in=0,
                bytes_out=1000, failed=False,
            )  # fmt: skip
    b.record(9.5, upstream="u:1", duration_s=0.1, status=502, cause="upstream_error", bytes_in=0,
             bytes_out=0, failed=True)  # fmt: skip
    reports = [report("h:11", "h:10", 11, a), report("h:21", "h:20", 21, b)]
    wired = [WorkerReport.from_bytes(r.to_bytes()) for r in reports]
    assert wired == reports
    view = FleetView(100.0, {r.worker: (99.5, r) for r in wired})
    totals = view.totals()
    assert (totals.requests, totals.errors, totals.bytes_out) == (4, 1, 3000)
    assert totals.by_status_class == {"2xx": 3, "5xx": 1}
    window = view.window().summary()
    assert window.requests_in_window == 4 and window.errors_in_window == 1
    assert window.p99_response_time_ms >= 500
    instances = view.instances()
    assert sorted(instances) == ["h:10", "h:20"]
    assert instances["h:20"]["total_requests"] == 2
    assert instances["h:20"]["workers"]["21"]["report_age_s"] == 0.5
    assert view.level("up:1") is Level.GOOD and view.live_workers == 2
