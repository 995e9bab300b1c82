"""The active-request gate, all of it: how many requests one worker works on at once,
and who is next (``FILEPROXY_ACTIVE_REQUESTS``).

- ``ActiveRequestGate``: the bookkeeping, pure, time passed in.
- ``GatedProtocol``: the connection's side (a base of ``edge.EdgeRequestHandler``):
  requests parsed while the gate is full are held back, in arrival order, until it
  admits them; the gate's one timer is armed here.
- The request's side: the connection is the request's ``GateMember`` (request key
  ``GATE_MEMBER``, set by the edge's middleware); the proxy handler tells it when it
  waits on its upstream, and ``leave_as_head_goes_out`` when its head goes out.

A request leaves the gate through one exit, ``GatedProtocol.leave_gate``, at the
first of: its response head is prepared (``leave_as_head_goes_out``), the edge
answers an error itself (``handle_error``), its connection is lost; or it gives its
place back after waiting ``UPSTREAM_HOLD_S`` on its upstream (``expire``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Protocol

from aiohttp import web

from fileproxy.http.aiohttp_server import ServerProtocol


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


# --- the request's side ------------------------------------------------------------------

GATE_MEMBER = "fileproxy.gate_member"  # request key: its connection, when gated


class GateMember(Protocol):
    """What a request's handler sees of its place in the gate."""

    def wait_on_upstream(self) -> None: ...

    def leave_gate(self) -> None: ...


def waiting_on_upstream(request: web.BaseRequest) -> None:
    """The proxy handler sent ``request`` upstream and now waits for the answer."""
    member: GateMember | None = request.get(GATE_MEMBER)
    if member is not None:
        member.wait_on_upstream()


def leave_as_head_goes_out(request: web.BaseRequest) -> None:
    """A request whose response head goes out leaves the gate (app's on_response_prepare)."""
    member: GateMember | None = request.get(GATE_MEMBER)
    if member is not None:
        member.leave_gate()


# --- the connection's side ---------------------------------------------------------------

# Liveness and readiness probes, and the operator's figures, never wait behind the
# proxied requests (nginx answers its status page in a millisecond under load).
PROBE_PATHS = frozenset({"/health", "/ready", "/stats", "/metrics"})
MAX_HELD = 8  # requests a pipelining client may have waiting before it is paused


class GatedProtocol(ServerProtocol):
    """A client connection whose requests start only when the worker's gate admits them.

    Requests parsed while the gate is full are not handed to the connection's task:
    they are held (in order) and the connection keeps being read, a held request's
    body bounded by the parser's own buffer limit; a client that pipelines more than
    ``MAX_HELD`` requests is paused (through aiohttp's own pause) until admitted.
    """

    def __init__(self, manager: Any, *, gate: ActiveRequestGate | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.gate = gate
        self._held = False  # its parsed requests wait for a place
        self._held_requests: list[Any] = []
        self._paused_by_gate = False

    def received(self, data: bytes) -> None:
        """Parse ``data`` (the subclass's own reading, e.g. the head timer)."""
        super().data_received(data)

    def data_received(self, data: bytes) -> None:
        gate = self.gate
        if gate is None:
            self.received(data)
            return
        # Requests parsed now are not handed to the connection's task before the gate
        # lets them in; they may arrive while it still finishes the previous one.
        before = self.queued
        waiter = self.detach_waiter()
        try:
            self.received(data)
        finally:
            self.attach_waiter(waiter)
        new = self.queued - before
        # new requests queue behind held ones; else they need a place, unless a request
        # of this connection holds one already (pipelined) or they are probes
        gated = new and (self._held or not (gate.holds(self) or self._is_probe(before)))
        if gated and (self._held or not gate.enter(self, self.loop.time())):
            self._hold(new, gate)
            return
        if self.queued:
            self.wake()

    def _is_probe(self, index: int) -> bool:
        path = self.queued_path(index)
        return path is not None and path.partition("?")[0] in PROBE_PATHS

    def _hold(self, new: int, gate: ActiveRequestGate) -> None:
        self._held_requests.extend(self.take_queued(new))  # after any held before, in order
        if len(self._held_requests) >= MAX_HELD and not self._paused_by_gate:
            self.hold_reading()
            self._paused_by_gate = True
        if self._held:
            return
        self._held = True
        self.stop_keepalive_timer()  # the wait is ours, not an idle client's
        gate.wait(self)
        check_later(gate, self.loop)

    def go_ahead(self) -> bool:
        """The gate's turn for this connection's request; False if the connection is gone."""
        if not self._held or self.transport is None:
            return False
        self._held = False
        self.requeue(self._held_requests)
        self._held_requests.clear()
        if self._paused_by_gate:
            self._paused_by_gate = False
            self.release_reading()
        self.wake()
        return True

    def wait_on_upstream(self) -> None:
        """This connection's request now waits on its upstream: see ``UPSTREAM_HOLD_S``."""
        gate = self.gate
        if gate is not None and gate.holds(self):
            gate.upstream_wait(self, self.loop.time())
            check_later(gate, self.loop)

    def leave_gate(self) -> None:
        """The one exit: this connection's request no longer needs its place, if it has one."""
        if self.gate is not None:
            self.gate.leave(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        gate = self.gate
        if gate is not None:
            if self._held:
                self._held = False
                self._held_requests.clear()
                gate.forget(self)
            self.leave_gate()
        super().connection_lost(exc)


def report(request: web.BaseRequest) -> dict[str, int] | None:
    """The worker's gate for /health, None when unlimited."""
    protocol = request.protocol
    gate = protocol.gate if isinstance(protocol, GatedProtocol) else None
    if gate is None:
        return None
    return {
        "limit": gate.limit,
        "active": gate.active,
        "waiting": gate.waiting,
        "waited_total": gate.waited,
    }
