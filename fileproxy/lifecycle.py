"""Readiness: whether this worker should be sent traffic (pure, time passed in).

Ready means: not draining, and the upstream answered recently — a proxied
response or a TCP probe within ``READY_MAX_AGE_S``. Draining starts at SIGTERM
(or a reload's SIGTERM to old workers), ``FILEPROXY_DRAIN_DELAY`` before the
listener closes, so load balancers see 503 and stop first.
"""

from __future__ import annotations

from dataclasses import dataclass

READY_MAX_AGE_S = 10.0  # the upstream counts as reachable this long after it answered
UPSTREAM_PROBE_INTERVAL_S = 2.0  # a TCP probe runs when no response came for this long


@dataclass
class Lifecycle:
    draining_since: float | None = None
    last_probe_ok_at: float | None = None
    last_probe_failed_at: float | None = None

    def start_draining(self, now: float) -> None:
        if self.draining_since is None:
            self.draining_since = now

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def record_probe(self, now: float, ok: bool) -> None:
        if ok:
            self.last_probe_ok_at = now
        else:
            self.last_probe_failed_at = now

    def readiness(self, now: float, last_response_at: float | None) -> tuple[bool, str]:
        """(ready, reason)."""
        if self.draining:
            return False, "draining"
        answered = max(last_response_at or 0.0, self.last_probe_ok_at or 0.0)
        if now - answered > READY_MAX_AGE_S:
            return False, "upstream unreachable"
        return True, "ok"

    def probe_due(self, now: float, last_response_at: float | None) -> bool:
        return last_response_at is None or now - last_response_at >= UPSTREAM_PROBE_INTERVAL_S
