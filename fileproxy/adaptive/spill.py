"""When a response should spill to the spool instead of pinning its upstream connection; pure.

A relayed response normally moves at the pace of the slower side: each write to
the client is awaited, so a slow client pauses the upstream read, and the upstream
connection stays taken for the client's whole download. Spilling reads the rest of
the upstream body into a per-response spool (fileproxy.delivery.spool) at the upstream's pace,
gives the connection back the moment the body is complete, and serves the client
from the spool at its own pace.

Two questions, each a function of facts the shell measured (no clock, no I/O):

- ``never_spilled``: can this response ever spill? Not a stream (no length, an
  event stream, ``X-Accel-Buffering: no`` — nginx's convention), not HEAD, not a
  status without a body (1xx, 204, 304).
- ``decide``: should it spill now? Asked only while the client holds the relay back
  (its transport is above the high-water mark), so a client that keeps up never
  gets here and never touches the spool. The relay then watches for ``observe_s``
  (``observe_busy_s`` while other requests wait for an upstream connection: the
  one this response holds is what they wait for): how many bytes the client took
  (its drain rate, measured with the buffers full, so not flattered by them) and
  how long the relay waited on either side. It spills when the client is the
  slower side (the relay waited on it longer than on the upstream) and the rest of
  the body would take the client at least ``min_remaining_s`` at that rate; a
  client about to finish keeps its connection for the moment it still needs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "RelaySample",
    "SpillPolicy",
    "SpillVerdict",
    "decide",
    "never_spilled",
]


@dataclass(frozen=True)
class SpillPolicy:
    #: seconds the client must have held the relay back before it is judged
    observe_s: float = 0.1
    #: the same while other requests wait for an upstream connection
    observe_busy_s: float = 0.02
    #: spill only when the rest of the body needs the client at least this long
    min_remaining_s: float = 1.0

    def observe_for(self, pool_waiters: int) -> float:
        """Seconds to watch a client that holds the relay back before judging it."""
        return self.observe_busy_s if pool_waiters > 0 else self.observe_s


@dataclass(frozen=True)
class RelaySample:
    """What the relay measured since the client first held it back."""

    since_s: float  # seconds since the client's transport first went above high water
    client_bytes: int  # body bytes handed to the client in that time
    client_wait_s: float  # of that time, waiting for the client to drain
    upstream_wait_s: float  # of that time, waiting for upstream body bytes
    remaining: int  # body bytes not yet taken from the upstream connection
    pool_waiters: int = 0  # requests waiting for an upstream connection right now


@dataclass(frozen=True)
class SpillVerdict:
    spill: bool
    reason: str  # observing | upstream_done | upstream_slower | finishing | client_slower


def never_spilled(
    method: str,
    status: int,
    content_length: int | None,
    content_type: str,
    accel_buffering: str,
) -> str | None:
    """Why this response must never spill (streams, HEAD, no body), or None if it may."""
    if method == "HEAD":
        return "head"
    if status < 200 or status in (204, 304):
        return "no_body"
    if content_length is None:
        return "no_length"  # a stream (SSE, live logs) or an unknown size
    if accel_buffering.strip().lower() == "no":
        return "accel_buffering_no"
    if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
        return "event_stream"
    return None


def decide(sample: RelaySample, policy: SpillPolicy) -> SpillVerdict:
    """Spill now, or keep relaying (and ask again at the next blocked write)."""
    if sample.remaining <= 0:
        return SpillVerdict(False, "upstream_done")  # nothing left to free the upstream from
    if sample.since_s < policy.observe_for(sample.pool_waiters):
        return SpillVerdict(False, "observing")
    if sample.upstream_wait_s >= sample.client_wait_s:
        return SpillVerdict(False, "upstream_slower")  # spilling would not free it sooner
    rate = sample.client_bytes / sample.since_s
    if rate > 0 and sample.remaining / rate < policy.min_remaining_s:
        return SpillVerdict(False, "finishing")
    return SpillVerdict(True, "client_slower")
