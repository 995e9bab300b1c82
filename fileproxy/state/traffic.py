"""Sliding-window traffic figures for /stats: pure, the time is passed in.

The window is a ring of one-second buckets; each holds a request count, an error
count, the sum of durations, the bytes sent and a latency histogram with fixed
log-spaced bounds, so recording is O(1) and a snapshot merges at most
``window`` buckets without sorting samples.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

# Cumulative latency histogram bounds for /metrics (Prometheus buckets, seconds): from
# a cached 1 KiB answer to an hour-long download.
CUMULATIVE_BOUNDS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

# Window latency histogram bounds in milliseconds: 0.1 ms .. ~3.3 h, ~12% apart; a longer
# request counts in the last bucket.
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(
    round(0.1 * 1.12**i, 4) for i in range(int(math.log(1.2e7 / 0.1, 1.12)) + 1)
)


_STATUS_CLASSES = tuple(f"{n}xx" for n in range(6))  # "0xx" .. "5xx", built once


@dataclass
class _Bucket:
    second: int = -1
    requests: int = 0
    errors: int = 0
    duration_ms_sum: float = 0.0
    bytes_out: int = 0
    # latency histogram per status class ("2xx", ...), created on first use
    histograms: dict[str, list[int]] = field(default_factory=dict)

    def reset(self, second: int) -> None:
        self.second = second
        self.requests = self.errors = self.bytes_out = 0
        self.duration_ms_sum = 0.0
        self.histograms = {}


def _new_histogram() -> list[int]:
    return [0] * (len(LATENCY_BOUNDS_MS) + 1)


def _merge(histograms: list[list[int]]) -> list[int]:
    return [sum(column) for column in zip(*histograms, strict=True)] if histograms else []


@dataclass(frozen=True)
class ClassLatency:
    requests: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class StatsSnapshot:
    window_seconds: int
    requests_in_window: int
    errors_in_window: int
    error_rate: float
    avg_response_time_ms: float
    p50_response_time_ms: float
    p95_response_time_ms: float
    p99_response_time_ms: float
    throughput_mbps: float
    requests_per_second: float
    latency_by_status_class: dict[str, ClassLatency]


@dataclass
class UpstreamCounters:
    """Since start, the requests one upstream (replica) delivered or failed: the per-upstream
    series of /metrics."""

    by_status_class: dict[str, int] = field(default_factory=dict)
    by_cause: dict[str, int] = field(default_factory=dict)
    # cumulative duration histogram (CUMULATIVE_BOUNDS_S, last: above all) and sum per class
    duration_buckets: dict[str, list[int]] = field(default_factory=dict)
    duration_sum_s: dict[str, float] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0

    def add(
        self, status_class: str, cause: str, duration_s: float, bytes_in: int, bytes_out: int
    ) -> None:
        self.by_status_class[status_class] = self.by_status_class.get(status_class, 0) + 1
        self.by_cause[cause] = self.by_cause.get(cause, 0) + 1
        cumulative = self.duration_buckets.get(status_class)
        if cumulative is None:
            cumulative = self.duration_buckets[status_class] = [0] * (len(CUMULATIVE_BOUNDS_S) + 1)
            self.duration_sum_s[status_class] = 0.0
        cumulative[bisect.bisect_left(CUMULATIVE_BOUNDS_S, duration_s)] += 1
        self.duration_sum_s[status_class] += duration_s
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out


class TrafficStats:
    """Counters since start plus figures over the last ``window`` seconds."""

    def __init__(self, window: int, now: float) -> None:
        if window < 1:
            raise ValueError("window must be >= 1 second")
        self.window = window
        self.started = now
        self._buckets = [_Bucket() for _ in range(window)]
        self.in_flight = 0
        # since start
        self.total_requests = 0
        self.total_errors = 0
        self.total_bytes_in = 0
        self.total_bytes_out = 0
        # by status class and cause, per upstream (the replica that delivered the response,
        # or failed last); the totals over all of them are added up when read
        self.upstreams: dict[str, UpstreamCounters] = {}

    def record(
        self,
        now: float,
        *,
        upstream: str,
        duration_s: float,
        status: int,
        cause: str,
        bytes_in: int,
        bytes_out: int,
        failed: bool,
    ) -> None:
        """One finished proxied request; ``upstream``: the replica it is credited to (the
        one that delivered its response); ``failed``: not delivered, or a 5xx."""
        second = int(now)
        bucket = self._buckets[second % self.window]
        if bucket.second != second:
            bucket.reset(second)
        duration_ms = duration_s * 1000.0
        bucket.requests += 1
        bucket.duration_ms_sum += duration_ms
        bucket.bytes_out += bytes_out
        status_class = _STATUS_CLASSES[status // 100] if 0 <= status < 600 else f"{status // 100}xx"
        histogram = bucket.histograms.get(status_class)
        if histogram is None:
            histogram = bucket.histograms[status_class] = _new_histogram()
        histogram[bisect.bisect_left(LATENCY_BOUNDS_MS, duration_ms)] += 1
        self.total_requests += 1
        if failed:
            bucket.errors += 1
            self.total_errors += 1
        if bytes_in:
            self.total_bytes_in += bytes_in
        self.total_bytes_out += bytes_out
        counters = self.upstreams.get(upstream)
        if counters is None:
            counters = self.upstreams[upstream] = UpstreamCounters()
        counters.add(status_class, cause, duration_s, bytes_in, bytes_out)

    @property
    def by_status_class(self) -> dict[str, int]:
        """Requests since start by status class sent, over every upstream."""
        return _add_up([u.by_status_class for u in self.upstreams.values()])

    @property
    def by_cause(self) -> dict[str, int]:
        """Requests since start by termination cause, over every upstream."""
        return _add_up([u.by_cause for u in self.upstreams.values()])

    @property
    def duration_buckets(self) -> dict[str, list[int]]:
        """Cumulative duration histogram per status class (last bucket: above all)."""
        classes = sorted({c for u in self.upstreams.values() for c in u.duration_buckets})
        return {
            c: _merge(
                [u.duration_buckets[c] for u in self.upstreams.values() if c in u.duration_buckets]
            )
            for c in classes
        }

    @property
    def duration_sum_s(self) -> dict[str, float]:
        return _add_up([u.duration_sum_s for u in self.upstreams.values()])

    def window_parts(self, now: float) -> WindowParts:
        """The raw figures of the window, which add up across workers."""
        current = int(now)
        live = [b for b in self._buckets if current - self.window < b.second <= current]
        classes = sorted({c for b in live for c in b.histograms})
        return WindowParts(
            window_seconds=self.window,
            # A window that started less than `window` seconds ago covers only the time since start.
            span_s=max(1.0, min(float(self.window), now - self.started)),
            requests=sum(b.requests for b in live),
            errors=sum(b.errors for b in live),
            duration_ms_sum=sum(b.duration_ms_sum for b in live),
            bytes_out=sum(b.bytes_out for b in live),
            histograms={
                c: _merge([b.histograms[c] for b in live if c in b.histograms]) for c in classes
            },
        )

    def snapshot(self, now: float) -> StatsSnapshot:
        return self.window_parts(now).summary()

    def counters(self) -> Counters:
        """Everything counted since start, ready to be added to another worker's."""
        return Counters(
            requests=self.total_requests,
            errors=self.total_errors,
            bytes_in=self.total_bytes_in,
            bytes_out=self.total_bytes_out,
            in_flight=self.in_flight,
            by_status_class=dict(self.by_status_class),
            by_cause=dict(self.by_cause),
            duration_buckets={c: list(b) for c, b in self.duration_buckets.items()},
            duration_sum_s=dict(self.duration_sum_s),
        )


@dataclass(frozen=True)
class WindowParts:
    window_seconds: int
    span_s: float
    requests: int
    errors: int
    duration_ms_sum: float
    bytes_out: int
    histograms: dict[str, list[int]]  # per status class, LATENCY_BOUNDS_MS buckets

    @classmethod
    def combine(cls, parts: list[WindowParts]) -> WindowParts:
        """Several workers' windows as one (their spans overlap: the longest counts)."""
        classes = sorted({c for p in parts for c in p.histograms})
        return cls(
            window_seconds=max((p.window_seconds for p in parts), default=1),
            span_s=max((p.span_s for p in parts), default=1.0),
            requests=sum(p.requests for p in parts),
            errors=sum(p.errors for p in parts),
            duration_ms_sum=sum(p.duration_ms_sum for p in parts),
            bytes_out=sum(p.bytes_out for p in parts),
            histograms={
                c: _merge([p.histograms[c] for p in parts if c in p.histograms]) for c in classes
            },
        )

    def summary(self) -> StatsSnapshot:
        requests, errors = self.requests, self.errors
        merged = _merge(list(self.histograms.values()))
        return StatsSnapshot(
            window_seconds=self.window_seconds,
            requests_in_window=requests,
            errors_in_window=errors,
            error_rate=round(errors / requests, 6) if requests else 0.0,
            avg_response_time_ms=round(self.duration_ms_sum / requests, 3) if requests else 0.0,
            p50_response_time_ms=_percentile(merged, 0.50),
            p95_response_time_ms=_percentile(merged, 0.95),
            p99_response_time_ms=_percentile(merged, 0.99),
            throughput_mbps=round(self.bytes_out * 8 / self.span_s / 1e6, 3),
            requests_per_second=round(requests / self.span_s, 3),
            latency_by_status_class={
                c: ClassLatency(
                    requests=sum(histogram),
                    p50_ms=_percentile(histogram, 0.50),
                    p95_ms=_percentile(histogram, 0.95),
                    p99_ms=_percentile(histogram, 0.99),
                )
                for c, histogram in self.histograms.items()
            },
        )


@dataclass(frozen=True)
class Counters:
    requests: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    in_flight: int = 0
    by_status_class: dict[str, int] = field(default_factory=dict)
    by_cause: dict[str, int] = field(default_factory=dict)
    duration_buckets: dict[str, list[int]] = field(default_factory=dict)
    duration_sum_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def combine(cls, parts: list[Counters]) -> Counters:
        classes = sorted({c for p in parts for c in p.duration_buckets})
        return cls(
            requests=sum(p.requests for p in parts),
            errors=sum(p.errors for p in parts),
            bytes_in=sum(p.bytes_in for p in parts),
            bytes_out=sum(p.bytes_out for p in parts),
            in_flight=sum(p.in_flight for p in parts),
            by_status_class=_add_up([p.by_status_class for p in parts]),
            by_cause=_add_up([p.by_cause for p in parts]),
            duration_buckets={
                c: _merge([p.duration_buckets[c] for p in parts if c in p.duration_buckets])
                for c in classes
            },
            duration_sum_s=_add_up([p.duration_sum_s for p in parts]),
        )


def _add_up(maps: list[dict[str, int]] | list[dict[str, float]]) -> dict[str, Any]:
    """Several maps of counts as one, in key order."""
    total: dict[str, Any] = {}
    for m in maps:
        for k, v in m.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def _percentile(histogram: list[int], q: float) -> float:
    """Upper bound of the bucket holding the q-quantile (0.0 when empty)."""
    total = sum(histogram)
    if not total:
        return 0.0
    rank = math.ceil(q * total)
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return LATENCY_BOUNDS_MS[min(index, len(LATENCY_BOUNDS_MS) - 1)]
    raise AssertionError("unreachable: rank <= total")
