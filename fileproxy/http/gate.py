"""The active-request gate, all of it: how many requests one worker works on at once,
and who is next (``FILEPROXY_ACTIVE_REQUESTS``).

- ``ActiveRequestGate``: the bookkeeping, pure, time passed in.
- The connection's side is ``data_plane.ClientProtocol``: a request that becomes the
  one to answer while the gate is full waits (in arrival order) until the gate admits
  it (``go_ahead``); pipelined requests behind it are read ahead up to the connection
  machine's limit, then the client is paused. The proxy handler tells the connection
  when it waits on its upstream (``wait_on_upstream``).

A request leaves the gate through one exit, ``ClientProtocol.leave_gate``, at the
first of: its response head goes out, it ends without one, its connection is lost;
or it gives its place back after waiting ``UPSTREAM_HOLD_S`` on its upstream
(``expire``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Protocol


class Admittable(Protocol):
    def go_ahead(self) -> bool:
        """Go ahead with the request held back; False if its connection is gone."""
        ...


_ABSENT = object()


# A request that has waited this long for its upstream's answer gives its place in
# the gate back: it waits on the network, not on this worker, and a slow upstream
# must not cap how many requests a worker starts (the connection limits bound those).
UPSTREAM_HOLD_S = 0.010


class ActiveRequestGate:
    """At most ``limit`` requests of one worker active at once; the next wait, FIFO.

    A request is active from its complete head until its response head is sent (or
    it ends without one): the part that is this worker's own work. One that has
    waited ``hold_s`` for its upstream gives its place back at the next check
    (``expire``). A response being relayed (a large file, an SSE stream) never
    counts. Times are the caller's clock (``loop.time()``); ``timer`` is the
    caller's handle for the next check (``next_check``).
    """

    def __init__(self, limit: int, hold_s: float = UPSTREAM_HOLD_S) -> None:
        self.limit = limit
        self.hold_s = hold_s
        self.waited = 0  # requests that had to wait for a place, since start
        self.timer: asyncio.TimerHandle | None = None  # the caller's, for next_check
        # the connections holding a place -> since when each waits on its upstream
        self._holders: dict[Admittable, float | None] = {}
        self._waiting: collections.deque[Admittable] = collections.deque()

    @property
    def active(self) -> int:
        return len(self._holders)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def holds(self, connection: Admittable) -> bool:
        return connection in self._holders

    def enter(self, connection: Admittable, now: float) -> bool:
        """A place for ``connection`` if one is free (or freed by ``expire``)."""
        if len(self._holders) >= self.limit:
            self.expire(now)
        if len(self._holders) < self.limit and not self._waiting:
            self._holders[connection] = None
            return True
        return False

    def wait(self, connection: Admittable) -> None:
        self.waited += 1
        self._waiting.append(connection)

    def forget(self, connection: Admittable) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(connection)

    def upstream_wait(self, connection: Admittable, now: float) -> None:
        """``connection``'s request now waits on its upstream (from ``now``)."""
        if connection in self._holders:
            self._holders[connection] = now

    def leave(self, connection: Admittable) -> None:
        if self._holders.pop(connection, _ABSENT) is not _ABSENT:
            self._admit_next()

    def expire(self, now: float) -> None:
        """Give back the places of requests that have waited ``hold_s`` on their upstream."""
        hold = self.hold_s
        stale = [
            c for c, since in self._holders.items() if since is not None and now - since >= hold
        ]
        for connection in stale:
            del self._holders[connection]
        if stale:
            self._admit_next()

    def next_check(self) -> float | None:
        """When ``expire`` could next free a place for a waiting request, if one waits."""
        if not self._waiting:
            return None
        starts = [since for since in self._holders.values() if since is not None]
        return min(starts) + self.hold_s if starts else None

    def _admit_next(self) -> None:
        while self._waiting and len(self._holders) < self.limit:
            connection = self._waiting.popleft()
            self._holders[connection] = None
            if not connection.go_ahead():
                del self._holders[connection]  # its connection is gone


def check_later(gate: ActiveRequestGate, loop: asyncio.AbstractEventLoop) -> None:
    """Arm the gate's one timer for its next check, unless one is armed."""
    if gate.timer is not None:
        return
    when = gate.next_check()
    if when is not None:
        gate.timer = loop.call_at(when, _check, gate, loop)


def _check(gate: ActiveRequestGate, loop: asyncio.AbstractEventLoop) -> None:
    gate.timer = None
    gate.expire(loop.time())
    check_later(gate, loop)


# Liveness and readiness probes, and the operator's figures, never wait behind the
# proxied requests (nginx answers its status page in a millisecond under load).
PROBE_PATHS = frozenset({"/health", "/ready", "/stats", "/metrics"})


def report(gate: ActiveRequestGate | None) -> dict[str, int] | None:
    """The worker's gate for /health, None when unlimited."""
    if gate is None:
        return None
    return {
        "limit": gate.limit,
        "active": gate.active,
        "waiting": gate.waiting,
        "waited_total": gate.waited,
    }
