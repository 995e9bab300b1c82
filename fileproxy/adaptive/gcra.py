"""GCRA admission (the leaky bucket of nginx ``limit_req``, a token bucket's twin); pure.

State is one number, the theoretical arrival time (TAT). With emission interval
``T = 1 / rate`` and tolerance ``tau = (burst - 1) * T``, a request at ``now`` is
admitted when ``max(TAT, now) - now <= tau`` and then moves TAT on by ``T``: ``burst``
requests pass at once from idle, after which they pass one per ``T``. A rejected
request learns when the next one would pass: ``retry_after = max(TAT, now) - tau - now``.

``gcra_step`` is that rule, written once: ``Gcra`` (a worker's own pace) and the
embedded store's shared clock use it; the Redis store's ``ADMIT`` script is its Lua
transcription, and the store contract test holds both stores to the same answers.
"""

from __future__ import annotations

import math

__all__ = ["Gcra", "gcra_step"]

#: float noise: ``(now + tau) - now - tau`` is not always 0.0 (a microsecond is plenty)
_EPSILON_S = 1e-6


def gcra_step(
    tat: float, now: float, interval: float, tolerance: float
) -> tuple[bool, float, float]:
    """One decision: ``(admitted, seconds until one would be, the TAT after it)``."""
    tat = max(tat, now)
    wait = tat - now - tolerance
    if wait > _EPSILON_S:
        return False, wait, tat
    return True, 0.0, tat + interval


class Gcra:
    """``rate`` admissions per second with bursts of up to ``burst`` requests."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        self._interval = 0.0
        self._burst = 1
        self._tat: float | None = None
        self._last_now: float | None = None
        self._set(rate, burst)

    @property
    def rate(self) -> float:
        return 1.0 / self._interval

    @property
    def burst(self) -> int:
        return self._burst

    def _set(self, rate: float, burst: int) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self._interval = 1.0 / rate
        self._burst = burst

    @property
    def _tolerance(self) -> float:
        return (self._burst - 1) * self._interval

    def try_admit(self, now: float, burst: int | None = None) -> tuple[bool, float]:
        """``(True, 0.0)`` if admitted, else ``(False, seconds until one would be)``.

        ``burst`` overrides the tolerance for this request only (e.g. 1: admitted only
        while the rate has room, leaving the burst to others; see ``fair_share``).
        """
        self._last_now = now
        tolerance = self._tolerance if burst is None else (burst - 1) * self._interval
        admitted, wait, tat = gcra_step(
            now if self._tat is None else self._tat, now, self._interval, tolerance
        )
        if admitted:
            self._tat = tat
        return admitted, wait

    def start_drained(self, now: float) -> None:
        """No burst credit: one request passes now, the next ones at the rate."""
        self._tat = now + self._tolerance
        self._last_now = now

    def set_rate(self, rate: float, burst: int | None = None) -> None:
        """Change the pace; the queued backlog is rescaled to the new interval.

        The backlog (TAT ahead of the last seen ``now``) counts admissions not yet paid
        for; it keeps its count, so a rate rise does not stall requests behind a TAT
        computed at the old, slower pace, and a cut does not forgive the backlog.
        """
        old_interval = self._interval
        self._set(rate, self._burst if burst is None else burst)
        if self._tat is not None and self._last_now is not None:
            backlog = max(0.0, self._tat - self._last_now)
            self._tat = self._last_now + backlog * (self._interval / old_interval)
