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
        self.by_status_class: dict[str, int] = {}
        self.by_cause: dict[str, int] = {}
        # cumulative duration histogram and sum per status class (last bucket: above all)
        self.duration_buckets: dict[str, list[int]] = {}
        self.duration_sum_s: dict[str, float] = {}

    def _bucket(self, now: float) -> _Bucket:
        second = int(now)
        bucket = self._buckets[second % self.window]
        if bucket.second != second:
            bucket.reset(second)
        return bucket

    def record(
        self,
        now: float,
        *,
        duration_s: float,
        status: int,
        cause: str,
        bytes_in: int,
        bytes_out: int,
        failed: bool,
    ) -> None:
        """One finished proxied request; ``failed`` means it was not delivered or got a 5xx."""
        bucket = self._bucket(now)
        duration_ms = duration_s * 1000.0
        bucket.requests += 1
        bucket.errors += failed
        bucket.duration_ms_sum += duration_ms
        bucket.bytes_out += bytes_out
        status_class = f"{status // 100}xx"
        histogram = bucket.histograms.get(status_class)
        if histogram is None:
            histogram = bucket.histograms[status_class] = _new_histogram()
        histogram[bisect.bisect_left(LATENCY_BOUNDS_MS, duration_ms)] += 1
        self.total_requests += 1
        self.total_errors += failed
        self.total_bytes_in += bytes_in
        self.total_bytes_out += bytes_out
        self.by_status_class[status_class] = self.by_status_class.get(status_class, 0) + 1
        self.by_cause[cause] = self.by_cause.get(cause, 0) + 1
        cumulative = self.duration_buckets.get(status_class)
        if cumulative is None:
            cumulative = self.duration_buckets[status_class] = [0] * (len(CUMULATIVE_BOUNDS_S) + 1)
        cumulative[bisect.bisect_left(CUMULATIVE_BOUNDS_S, duration_s)] += 1
        self.duration_sum_s[status_class] = self.duration_sum_s.get(status_class, 0.0) + duration_s

    def snapshot(self, now: float) -> StatsSnapshot:
        current = int(now)
        live = [b for b in self._buckets if current - self.window < b.second <= current]
        requests = sum(b.requests for b in live)
        errors = sum(b.errors for b in live)
        sent = sum(b.bytes_out for b in live)
        classes = sorted({c for b in live for c in b.histograms})
        per_class = {
            c: _merge([b.histograms[c] for b in live if c in b.histograms]) for c in classes
        }
        merged = _merge(list(per_class.values()))
        # A window that started less than `window` seconds ago covers only the time since start.
        span = max(1.0, min(float(self.window), now - self.started))
        return StatsSnapshot(
            window_seconds=self.window,
            requests_in_window=requests,
            errors_in_window=errors,
            error_rate=round(errors / requests, 6) if requests else 0.0,
            avg_response_time_ms=round(sum(b.duration_ms_sum for b in live) / requests, 3)
            if requests
            else 0.0,
            p50_response_time_ms=_percentile(merged, 0.50),
            p95_response_time_ms=_percentile(merged, 0.95),
            p99_response_time_ms=_percentile(merged, 0.99),
            throughput_mbps=round(sent * 8 / span / 1e6, 3),
            requests_per_second=round(requests / span, 3),
            latency_by_status_class={
                c: ClassLatency(
                    requests=sum(histogram),
                    p50_ms=_percentile(histogram, 0.50),
                    p95_ms=_percentile(histogram, 0.95),
                    p99_ms=_percentile(histogram, 0.99),
                )
                for c, histogram in per_class.items()
            },
        )


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
