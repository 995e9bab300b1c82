"""/metrics: Prometheus text exposition, built at scrape time from the live counters.

A custom collector reads the same objects /stats reads (TrafficStats, the
upstream pool, Redis health), so there is one bookkeeping, not two. The scope is
the worker that answers (label ``pid``); gunicorn runs several.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from fileproxy.adaptive import LEVELS
from fileproxy.app_keys import (
    ADAPTATIONS,
    CACHE,
    FLEET,
    LIFECYCLE,
    LOOP_LAG,
    REPLICAS,
    RUNTIME,
    SPOOL,
    STORE,
    TRAFFIC,
    UPSTREAM,
)
from fileproxy.http import errors
from fileproxy.state.traffic import CUMULATIVE_BOUNDS_S, UpstreamCounters

if TYPE_CHECKING:
    from fileproxy.delivery.cache import CacheService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FileproxyCollector(Collector):
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(
        self,
    ) -> Iterator[
        InfoMetricFamily | GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily
    ]:
        app = self._app
        traffic, upstream, runtime = app[TRAFFIC], app[UPSTREAM], app[RUNTIME]
        pid = str(runtime.pid)

        info = InfoMetricFamily("fileproxy", "fileproxy build and runtime", labels=["pid"])
        info.add_metric([pid], {"version": runtime.version})
        yield info

        uvloop = GaugeMetricFamily(
            "fileproxy_uvloop_enabled", "1 when uvloop runs the event loop", labels=["pid"]
        )
        uvloop.add_metric([pid], float(runtime.uvloop_enabled))
        yield uvloop

        # every series of a proxied request is the upstream's that delivered it (the
        # replica that finished it after a retry or resume), one per configured replica
        names = [replica.name for replica in app[REPLICAS].replicas]
        per_upstream = [(n, traffic.upstreams.get(n) or UpstreamCounters()) for n in names]
        requests = CounterMetricFamily(
            "fileproxy_requests",
            "Proxied requests by status class sent to the client",
            labels=["pid", "upstream", "status_class"],
        )
        for name, counters in per_upstream:
            for status_class, count in sorted(counters.by_status_class.items()):
                requests.add_metric([pid, name, status_class], count)
        yield requests

        causes = CounterMetricFamily(
            "fileproxy_request_terminations",
            "Proxied requests by how they ended",
            labels=["pid", "upstream", "cause"],
        )
        for name, counters in per_upstream:
            for cause in errors.CAUSES:
                causes.add_metric([pid, name, cause], counters.by_cause.get(cause, 0))
        yield causes

        histogram = HistogramMetricFamily(
            "fileproxy_request_duration_seconds",
            "Time from request to the end of the response",
            labels=["pid", "upstream", "status_class"],
        )
        bounds = (*(str(b) for b in CUMULATIVE_BOUNDS_S), "+Inf")
        for name, counters in per_upstream:
            for status_class, counts in sorted(counters.duration_buckets.items()):
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                histogram.add_metric(
                    [pid, name, status_class], buckets, counters.duration_sum_s[status_class]
                )
        yield histogram

        sent = CounterMetricFamily(
            "fileproxy_response_bytes", "Response body bytes delivered", labels=["pid", "upstream"]
        )
        received = CounterMetricFamily(
            "fileproxy_request_bytes", "Request body bytes forwarded", labels=["pid", "upstream"]
        )
        for name, counters in per_upstream:
            sent.add_metric([pid, name], counters.bytes_out)
            received.add_metric([pid, name], counters.bytes_in)
        yield sent
        yield received

        in_flight = GaugeMetricFamily(
            "fileproxy_in_flight_requests", "Proxied requests in progress", labels=["pid"]
        )
        in_flight.add_metric([pid], traffic.in_flight)
        yield in_flight

        connections = GaugeMetricFamily(
            "fileproxy_upstream_connections",
            "Open upstream connections",
            labels=["pid", "upstream", "state"],
        )
        replicas = app[REPLICAS]
        for replica in replicas.replicas:
            for state, count in replica.client.pool_size().items():
                connections.add_metric([pid, replica.name, state], count)
        yield connections
        yield from _replica_metrics(app, pid)

        lag = app[LOOP_LAG]
        loop_lag = GaugeMetricFamily(
            "fileproxy_event_loop_lag_seconds",
            "How late the worker's event loop ran its last timer (every request waits as long)",
            labels=["pid"],
        )
        loop_lag.add_metric([pid], lag.last_s)
        yield loop_lag
        loop_lag_max = GaugeMetricFamily(
            "fileproxy_event_loop_lag_max_seconds",
            f"The largest event-loop lag of the last {lag.window_s:g} s",
            labels=["pid"],
        )
        loop_lag_max.add_metric([pid], lag.max_s(time.monotonic()))
        yield loop_lag_max

        yield from _spool_metrics(app, pid)
        yield from cache_metrics(app[CACHE], pid)

        draining = GaugeMetricFamily(
            "fileproxy_draining", "1 while the worker drains before exit", labels=["pid"]
        )
        draining.add_metric([pid], float(app[LIFECYCLE].draining))
        yield draining

        adaptations = app[ADAPTATIONS]
        if upstream.name in adaptations and adaptations[upstream.name].enabled:
            level = GaugeMetricFamily(
                "fileproxy_quality_level",
                "Network quality level of the upstream the worker uses (0 good .. 3 very poor)",
                labels=["pid", "upstream"],
            )
            for name, adaptation in adaptations.items():
                current = adaptation.current_level()
                if current is not None:
                    level.add_metric([pid, name], LEVELS.index(current))
            yield level
            limit = GaugeMetricFamily(
                "fileproxy_rate_limit",
                "Current admission rate limit (req/s; the fleet's, or the local fallback's)",
                labels=["pid", "upstream", "mode"],
            )
            for name, adaptation in adaptations.items():
                limit.add_metric(
                    [pid, name, adaptation.limiter_mode], adaptation.current_limit or 0
                )
            yield limit
            rejected = CounterMetricFamily(
                "fileproxy_rate_limited",
                "Requests refused over the admission rate",
                labels=["pid", "upstream"],
            )
            for name, adaptation in adaptations.items():
                rejected.add_metric([pid, name], adaptation.rejected)
            yield rejected
            decisions = CounterMetricFamily(
                "fileproxy_limit_decisions",
                "Window decisions of the fleet's limiter",
                labels=["pid", "upstream"],
            )
            for name, adaptation in adaptations.items():
                decisions.add_metric([pid, name], adaptation.limiter.decisions)
            yield decisions

        link = app[STORE]
        if link.shared:
            up = GaugeMetricFamily(
                "fileproxy_redis_up",
                "1 while the shared state store answers (circuit breaker closed)",
                labels=["pid"],
            )
            up.add_metric([pid], float(link.state == "up"))
            yield up
            yield from _fleet_metrics(app)


def _spool_metrics(
    app: web.Application, pid: str
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The worker's spool for slow clients (see spool): what it holds and what it did."""
    spool = app[SPOOL]
    held = GaugeMetricFamily(
        "fileproxy_spool_bytes", "Bytes held by spooled responses", labels=["pid", "where"]
    )
    held.add_metric([pid, "disk"], spool.bytes_on_disk)
    held.add_metric([pid, "memory"], spool.bytes_in_memory)
    yield held
    files = GaugeMetricFamily("fileproxy_spool_files", "Open spool files", labels=["pid"])
    files.add_metric([pid], spool.files)
    yield files
    active = GaugeMetricFamily(
        "fileproxy_spool_active",
        "Responses served from a spool right now (clients slower than the upstream)",
        labels=["pid"],
    )
    active.add_metric([pid], spool.active)
    yield active
    spooled = CounterMetricFamily(
        "fileproxy_spooled_responses", "Responses that spilled to a spool", labels=["pid"]
    )
    spooled.add_metric([pid], spool.responses_spooled)
    yield spooled
    spooled_bytes = CounterMetricFamily(
        "fileproxy_spooled_bytes", "Body bytes that went through a spool", labels=["pid"]
    )
    spooled_bytes.add_metric([pid], spool.bytes_spooled)
    yield spooled_bytes
    file_bytes = CounterMetricFamily(
        "fileproxy_spool_file_sent_bytes",
        "Spool file bytes sent to clients, by how (sendfile, or read back and written)",
        labels=["pid", "how"],
    )
    file_bytes.add_metric([pid, "sendfile"], spool.zero_copy.bytes)
    file_bytes.add_metric([pid, "copy"], spool.copied_file_bytes)
    yield file_bytes
    fallbacks = CounterMetricFamily(
        "fileproxy_spool_fallbacks",
        "Spooled responses that stopped using the disk and waited for their client, by reason",
        labels=["pid", "reason"],
    )
    for reason, count in spool.fallbacks.items():
        fallbacks.add_metric([pid, reason], count)
    yield fallbacks


def cache_metrics(
    cache: CacheService, pid: str
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The cache of large files (fileproxy.delivery.cache): this worker's requests and
    bytes, its fills and waiting readers; disk use as the shared index last said (at
    most a few seconds old: a scrape does no I/O)."""
    report = cache.snapshot()
    enabled = GaugeMetricFamily(
        "fileproxy_cache_enabled",
        "1 when the cache serves in this worker (0: off, or its directory is unusable)",
        labels=["pid"],
    )
    enabled.add_metric([pid], float(report["state"] == "on"))
    yield enabled
    requests = CounterMetricFamily(
        "fileproxy_cache_requests",
        "Requests by what the cache did (hit, miss, revalidated, stale, bypass)",
        labels=["pid", "outcome"],
    )
    for outcome, count in report["requests"].items():
        requests.add_metric([pid, outcome], count)
    yield requests
    uncached = CounterMetricFamily(
        "fileproxy_cache_uncached_misses",
        "Misses proxied without storing (not storable, too large, no room)",
        labels=["pid"],
    )
    uncached.add_metric([pid], report["uncached_misses"])
    yield uncached
    body = CounterMetricFamily(
        "fileproxy_cache_body_bytes",
        "Body bytes sent to clients from cache files (source=cache) and fetched from the "
        "upstream into them (source=upstream); 1 - upstream/cache is the byte hit ratio",
        labels=["pid", "source"],
    )
    body.add_metric([pid, "cache"], report["bytes_from_cache"])
    body.add_metric([pid, "upstream"], report["bytes_fetched"])
    yield body
    for name, key, text in (
        ("fileproxy_cache_fills_in_progress", "fills_in_progress", "Fills this worker runs now"),
        (
            "fileproxy_cache_readers_waiting",
            "readers_waiting",
            "Responses waiting for bytes a fill has not written yet",
        ),
        ("fileproxy_cache_readers_open", "readers_open", "Responses reading a cache file now"),
    ):
        gauge = GaugeMetricFamily(name, text, labels=["pid"])
        gauge.add_metric([pid], report[key])
        yield gauge
    for name, key, text in (
        ("fileproxy_cache_evictions", "evictions", "Objects this worker evicted for room"),
        ("fileproxy_cache_takeovers", "takeovers", "Orphaned fills this worker took over"),
        (
            "fileproxy_cache_continued_uncached",
            "continued_uncached",
            "Responses whose fill ran out of disk room, continued from the upstream uncached",
        ),
        ("fileproxy_cache_fills_failed", "fills_failed", "Fills that could not be completed"),
        ("fileproxy_cache_aborted", "aborted", "Responses aborted because their fill failed"),
        ("fileproxy_cache_purges", "purges", "PURGE requests"),
    ):
        counter = CounterMetricFamily(name, text, labels=["pid"])
        counter.add_metric([pid], report[key])
        yield counter
    if report["state"] == "on":
        disk = GaugeMetricFamily(
            "fileproxy_cache_disk_bytes",
            "The cache directory: bytes written, reserved by objects and fills, the budget, "
            "and free on its filesystem",
            labels=["pid", "what"],
        )
        for what, key in (
            ("on_disk", "bytes_on_disk"),
            ("reserved", "bytes_reserved"),
            ("max_size", "max_size"),
            ("free", "free_bytes"),
        ):
            disk.add_metric([pid, what], report[key])
        yield disk
        objects = GaugeMetricFamily(
            "fileproxy_cache_objects",
            "Stored objects (partial: being filled)",
            labels=["pid", "state"],
        )
        objects.add_metric([pid, "complete"], report["objects"])
        objects.add_metric([pid, "partial"], report["partial_objects"])
        yield objects


def _fleet_metrics(app: web.Application) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The fleet as this worker last saw it: one series per reporting worker."""
    fleet = app[FLEET].fresh(time.monotonic())
    if fleet is None:
        return
    workers = GaugeMetricFamily(
        "fileproxy_fleet_workers", "Workers of the fleet reporting to the shared store"
    )
    workers.add_metric([], fleet.live_workers)
    yield workers
    requests = CounterMetricFamily(
        "fileproxy_fleet_requests",
        "Proxied requests of every worker of the fleet, by status class",
        labels=["instance", "worker_pid", "status_class"],
    )
    for _, report in sorted(fleet.reports.values(), key=lambda r: r[1].worker):
        for status_class, count in sorted(report.counters.by_status_class.items()):
            requests.add_metric([report.instance, str(report.pid), status_class], count)
    yield requests


def _replica_metrics(
    app: web.Application, pid: str
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Each replica's health and share, retries and resumes (issue 15)."""
    replicas = app[REPLICAS]
    now = time.monotonic()
    ejected = GaugeMetricFamily(
        "fileproxy_upstream_ejected",
        "1 while the replica is ejected from balancing (outlier detection)",
        labels=["pid", "upstream"],
    )
    picked = CounterMetricFamily(
        "fileproxy_upstream_requests",
        "Tries sent to the replica (retries and resumes included)",
        labels=["pid", "upstream"],
    )
    ejections = CounterMetricFamily(
        "fileproxy_upstream_ejections", "Times the replica was ejected", labels=["pid", "upstream"]
    )
    for replica in replicas.replicas:
        ejected.add_metric([pid, replica.name], float(not replicas.usable(now, replica)))
        picked.add_metric([pid, replica.name], replica.counts["requests"])
        ejections.add_metric([pid, replica.name], replica.counts["ejections"])
    yield ejected
    yield picked
    yield ejections
    retries = CounterMetricFamily(
        "fileproxy_retries",
        "Retries before the first byte, granted or refused by the retry budget or throttle",
        labels=["pid", "outcome"],
    )
    retries.add_metric([pid, "granted"], replicas.budget.granted)
    retries.add_metric([pid, "refused_by_budget"], replicas.budget.refused)
    retries.add_metric([pid, "refused_by_throttle"], replicas.budget.throttled)
    yield retries
    resumes = CounterMetricFamily(
        "fileproxy_resumes",
        "Downloads continued from a replica by Range after their upstream failed mid-body",
        labels=["pid", "outcome"],
    )
    for outcome, count in replicas.resumes.items():
        resumes.add_metric([pid, outcome], count)
    yield resumes


def render(app: web.Application) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FileproxyCollector(app))
    return generate_latest(registry)
