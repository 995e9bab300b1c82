"""Retries before the first byte: whether a failed try may go to another replica.

A try may be repeated only while nothing has gone to the client, and only when the
upstream cannot have acted on it, or acting twice does no harm (RFC 9110 9.2.2):

- ``connect``: the request never left (connect refused, failed or timed out): any
  method; its body was not read yet.
- ``reset`` (closed before the response head), ``timeout`` (no head in time) and a
  status of ``statuses``: idempotent methods only, and only when none of a request
  body was sent (it cannot be sent again). Never a POST after it was sent (nginx
  since 1.9.13, Envoy).

and only within the budget (Envoy's retry budget): retries in progress at most
``percent`` of the requests in progress, with a floor of ``min_concurrency``, so a
failing fleet is never sent more than about (1 + percent) times its traffic.
A connect failure is not counted: the request reached no upstream.
Pure: the counts are passed in.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

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
class RetryBudget:
    percent: float = 20.0
    min_concurrency: int = 3
    active: int = 0  # retries in progress
    granted: int = 0
    refused: int = 0

    def allows(self, active_requests: int) -> bool:
        return self.active < max(self.min_concurrency, active_requests * self.percent / 100.0)

    def start(self, active_requests: int, *, counted: bool = True) -> bool:
        """Take a retry if the budget allows (``counted`` False: a connect failure, free)."""
        if counted and not self.allows(active_requests):
            self.refused += 1
            return False
        self.granted += 1
        if counted:
            self.active += 1
        return True

    def finish(self) -> None:
        self.active = max(0, self.active - 1)
