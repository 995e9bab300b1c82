"""Retries before the first byte: whether a failed try may go to another replica.

A try may be repeated only while nothing has gone to the client, and only when the
upstream cannot have acted on it, or acting twice does no harm (RFC 9110 9.2.2):

- ``connect``: the request never left (connect refused, failed or timed out): any
  method; its body was not read yet.
- ``reset`` (closed before the response head), ``timeout`` (no head in time) and a
  status of ``statuses``: idempotent methods only, and only when none of a request
  body was sent (it cannot be sent again). Never a POST after it was sent (nginx
  since 1.9.13, Envoy).

and only within both limits:

- the budget (Envoy's retry budget): retries in progress at most ``percent`` of the
  requests in progress, with a floor of ``min_concurrency``. A cap on bursts only: at
  low load the floor always holds (``active < 3`` at one request in flight), so alone
  it let every request of an outage go to two replicas (issue 20: 185 tries for 90
  GETs in the simulation, 2.0x in a real run);
- the throttle (gRPC's retry throttling, ``RetryThrottle``): tokens start at
  ``max_tokens``, a failed try costs 1, an answer gives ``ratio`` back, and a retry is
  allowed only while more than half the tokens are left. Driven by outcomes, not
  concurrency: with every replica failing, the tokens fall to half within a few
  requests and retries stop (93 tries for 90 GETs; ``tests/unit/adaptive/retry_sim``),
  while one replica failing among healthy ones costs less than the answers give back
  (up to ``ratio / (1 + ratio)``, 9 % of tries, failing forever are retried forever).

A connect failure is counted in neither: the request reached no upstream.
Pure: the counts are passed in.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # as the client's

CONNECT = "connect"  # never sent
RESET = "reset"  # sent, closed before the response head
TIMEOUT = "timeout"  # sent, no response head in time
STATUS = "status"  # answered with a retryable status
OTHER = "other"  # an invalid response and the like: not retried


def retryable(
    method: str, kind: str, *, body_started: bool, status: int | None = None,
    statuses: Collection[int] = (),
) -> bool:  # fmt: skip
    """Whether a try that ended with ``kind`` may be repeated elsewhere."""
    if kind == CONNECT:
        return not body_started
    if method not in IDEMPOTENT_METHODS or body_started:
        return False
    if kind == STATUS:
        return status in statuses
    return kind in (RESET, TIMEOUT)


@dataclass
class RetryThrottle:
    """gRPC's retry throttling (A6): ``max_tokens`` 0 disables it."""

    max_tokens: float = 20.0
    ratio: float = 0.1
    tokens: float = -1.0  # -1: start full

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or not 0 < self.ratio <= 1:
            raise ValueError("need max_tokens >= 0 and 0 < ratio <= 1")
        if self.tokens < 0:
            self.tokens = self.max_tokens

    def failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    @property
    def allows(self) -> bool:
        return self.max_tokens == 0 or self.tokens > self.max_tokens / 2


@dataclass
class RetryBudget:
    percent: float = 20.0
    min_concurrency: int = 3
    throttle: RetryThrottle = field(default_factory=RetryThrottle)
    active: int = 0  # retries in progress
    granted: int = 0
    refused: int = 0  # by the budget (concurrency)
    throttled: int = 0  # by the throttle (outcomes)

    def allows(self, active_requests: int) -> bool:
        return self.active < max(self.min_concurrency, active_requests * self.percent / 100.0)

    def start(self, active_requests: int, *, counted: bool = True) -> bool:
        """Take a retry if the budget and the throttle allow (``counted`` False: a connect
        failure, free)."""
        if counted and not self.throttle.allows:
            self.throttled += 1
            return False
        if counted and not self.allows(active_requests):
            self.refused += 1
            return False
        self.granted += 1
        if counted:
            self.active += 1
        return True

    def finish(self) -> None:
        self.active = max(0, self.active - 1)

    def failed_try(self) -> None:
        """A try failed (reset, timeout, a gateway status; not a connect failure)."""
        self.throttle.failure()

    def answered_try(self) -> None:
        """A try got an answer that is no failure."""
        self.throttle.success()
