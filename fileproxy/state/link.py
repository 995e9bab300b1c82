"""The worker's line to the state store: a circuit breaker in front, its state for /health.

Requests ask the store only while the breaker is closed (``available``) and never
probe it: while the breaker is open or half-open they are served from the local
fallback at once. The background sync probes (``probe=True``), about once a second
with jitter, and closes the breaker on the first answer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fileproxy.adaptive.circuit_breaker import CircuitBreaker
from fileproxy.state.store import StateStore, StoreError

log = logging.getLogger("fileproxy.state")

FAILURES_TO_OPEN = 3
STORE_PROBE_INTERVAL_S = 1.0
PROBE_JITTER = 0.2  # probes 0.8..1.2 s apart

T = TypeVar("T")


class StoreLink:
    def __init__(self, store: StateStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self.breaker = CircuitBreaker(FAILURES_TO_OPEN, STORE_PROBE_INTERVAL_S)
        self.answered = False  # the store has answered at least once
        self.since = time.time()  # wall clock of the last change of state
        self.rtt_ms: float | None = None
        self.last_error: str | None = None

    @property
    def shared(self) -> bool:
        return self.store.scope == "cluster"

    @property
    def available(self) -> bool:
        return self.breaker.closed

    @property
    def state(self) -> str:
        """embedded | unknown (no answer yet) | up | down (the breaker is open)."""
        if not self.shared:
            return "embedded"
        if not self.breaker.closed:
            return "down"
        return "up" if self.answered else "unknown"

    async def call(self, operation: Callable[[], Awaitable[T]], *, probe: bool = False) -> T:
        """Run one store operation; StoreError at once when the breaker forbids it."""
        now = self.clock()
        allowed = self.breaker.allow(now) if probe else self.breaker.closed
        if not allowed:
            raise StoreError("circuit open")
        before = self.state
        started = time.perf_counter()
        try:
            result = await operation()
        except StoreError as exc:
            self.last_error = str(exc)
            self.breaker.failed(self.clock(), random.uniform(1 - PROBE_JITTER, 1 + PROBE_JITTER))
            self._changed(before)
            raise
        self.rtt_ms = round((time.perf_counter() - started) * 1000, 3)
        self.answered = True
        self.breaker.succeeded(self.clock())
        self._changed(before)
        return result

    def _changed(self, before: str) -> None:
        after = self.state
        if after == before:
            return
        self.since = time.time()
        if after == "down":
            log.warning(
                "state store unreachable: serving with local limits",
                extra={"store": self.store.description, "error": self.last_error},
            )
        elif before == "down":
            log.info(
                "state store reachable again: shared state", extra={"store": self.store.description}
            )
