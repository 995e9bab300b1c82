"""When to stop calling the shared store, and when to try it again; pure.

Closed: every call goes through. ``failures_to_open`` consecutive failures open the
breaker: no call for ``retry_after_s`` (scaled by a jitter factor the caller draws,
so a fleet does not probe in lock-step). Then one probe is allowed (half-open): its
success closes the breaker, its failure opens it for another interval. While the
breaker is not closed the caller serves from its local fallback.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failures_to_open: int = 3, retry_after_s: float = 1.0) -> None:
        if failures_to_open < 1 or retry_after_s <= 0:
            raise ValueError("need failures_to_open >= 1 and retry_after_s > 0")
        self.failures_to_open = failures_to_open
        self.retry_after_s = retry_after_s
        self.state = BreakerState.CLOSED
        self.since: float | None = None  # when the current state began (None: from start)
        self.consecutive_failures = 0
        self._probe_at = 0.0

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def allow(self, now: float) -> bool:
        """Whether a call may go to the store now (half-open: the single probe)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and now >= self._probe_at:
            self._enter(BreakerState.HALF_OPEN, now)
            return True
        return False

    def succeeded(self, now: float) -> None:
        self.consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            self._enter(BreakerState.CLOSED, now)

    def failed(self, now: float, jitter: float = 1.0) -> None:
        """A call failed; ``jitter`` (e.g. uniform 0.8..1.2) scales the wait before a probe."""
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive_failures >= self.failures_to_open
        ):
            self._enter(BreakerState.OPEN, now)
        if self.state is BreakerState.OPEN:
            self._probe_at = now + self.retry_after_s * jitter

    def _enter(self, state: BreakerState, now: float) -> None:
        """``since`` marks the moves between closed and not closed (an outage's start and end)."""
        if (self.state is BreakerState.CLOSED) != (state is BreakerState.CLOSED):
            self.since = now
        self.state = state
