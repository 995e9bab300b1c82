"""Readiness: whether this worker should be sent traffic (pure, time passed in).

Ready means: not draining, and the upstream answered recently — a proxied
response or a TCP probe within ``READY_MAX_AGE_S``. Draining starts at SIGTERM
(or a reload's SIGTERM to old workers), ``FILEPROXY_DRAIN_DELAY`` before the
listener closes, so load balancers see 503 and stop first.

The cut-off: ``FILEPROXY_GRACEFUL_TIMEOUT`` after the listener closed, the requests
still in flight are cut (cause ``shutdown`` in their access lines). The process then
still has work to do before it exits: the cut handlers log their lines, the state
store's connections close (``app.STOP_TIMEOUT_S``, 2 s at most), the access log is
written (``access_log.DRAIN_TIMEOUT_S``, 5 s at most for a stdout nobody reads), the
spool's threads end and its private directory is removed. gunicorn's master kills a
worker ``graceful_timeout`` after its SIGTERM, so gunicorn.conf.py sets that to the
worker's own deadline plus ``CUT_OFF_MARGIN_S``, which covers those bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

READY_MAX_AGE_S = 10.0  # the upstream counts as reachable this long after it answered
UPSTREAM_PROBE_INTERVAL_S = 2.0  # a TCP probe runs when no response came for this long
# seconds between a worker's own cut-off and gunicorn's SIGKILL (an int: gunicorn's
# graceful_timeout is whole seconds): 2 + 5 bounded waits after the cut, 3 for the rest
CUT_OFF_MARGIN_S = 10


@dataclass
class Lifecycle:
    draining_since: float | None = None
    last_probe_ok_at: float | None = None
    last_probe_failed_at: float | None = None
    cut_off_at: float | None = None  # when the requests still in flight were cut

    def start_draining(self, now: float) -> None:
        if self.draining_since is None:
            self.draining_since = now

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def cut_off(self, now: float) -> None:
        """The graceful timeout ended: what is still in flight is being cut."""
        if self.cut_off_at is None:
            self.cut_off_at = now

    @property
    def cutting_off(self) -> bool:
        return self.cut_off_at is not None

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
