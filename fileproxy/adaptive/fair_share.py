"""Per-client fair share of an enforced admission rate; pure, bounded memory.

While the AIMD limit is enforced, one client must not take every other's share: the
heaviest is refused first. Each client (the shell's key: the peer address, or the
client a trusted proxy named in X-Forwarded-For) has a GCRA paced at its share,
``rate / (active clients + 1)``, with ``burst / (active clients + 1)`` of burst (at
least 1): one share is kept for a client that has not asked yet, so that a newcomer
passes at once even while the others use their shares to the full. A
request within its client's share is *priority*: it meets the upstream's GCRA with the
full burst tolerance. A request over its share is *spare*: it meets the same GCRA with
half the burst (``spare_burst``), so it is admitted only while the rate has room and the
upper half of the burst stays for priority requests, and it is not charged to its
client's share (half, not none: with a tolerance of 0, randomly arriving spare requests
lose the gap before each arrival, and a fleet of one-client workers admitted 42.5 of
its 50 req/s). Priority requests of all clients add up to less
than the rate, so a client under its share is admitted even while a heavy client's
spare requests are refused; with nobody else asking, the heavy client still gets the
whole rate (work-conserving).

A client is active while it asked within ``active_s``; at most ``max_clients`` are
tracked (least recently seen evicted first), so memory is bounded whatever the number
of addresses. An evicted or returning client starts with its full burst.

With several workers (Redis), each worker splits *its* part of the fleet's rate
(limit / live workers) among the clients it sees; the upstream's GCRA stays the
fleet's. Per worker is an approximation (a client spread over workers gets a share in
each), but priority still adds up to less than the fleet's rate.

``within_share(now, client, rate, burst)`` answers and charges; ``refund(client)`` gives
the charge back when the upstream's GCRA refused the request after all. Time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["FairShare", "FairShareConfig", "spare_burst"]

_EPSILON_S = 1e-6  # float noise, as in gcra


def spare_burst(burst: int) -> int:
    """The GCRA burst a request over its client's share meets: half the configured one."""
    return max(1, burst // 2)


@dataclass(frozen=True)
class FairShareConfig:
    max_clients: int = 4096
    active_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_clients < 1 or not self.active_s > 0:
            raise ValueError("need max_clients >= 1 and active_s > 0")


@dataclass
class _Client:
    tat: float  # theoretical arrival time of the client's share
    seen: float  # last request, admitted or not
    charged: float = 0.0  # the interval the last priority request was charged


class FairShare:
    def __init__(self, config: FairShareConfig | None = None) -> None:
        self.config = config or FairShareConfig()
        # least recently seen first: expiry and eviction pop from the front
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.priority = 0  # requests within their client's share
        self.spare = 0  # requests over it

    @property
    def active(self) -> int:
        return len(self._clients)

    def within_share(self, now: float, client: str, rate: float, burst: int) -> bool:
        """Whether this request is within ``client``'s share of ``rate`` req/s (charged if so)."""
        entry = self._touch(now, client)
        shares = len(self._clients) + 1  # one kept for a client that has not asked yet
        interval = shares / rate
        tolerance = (max(1, burst // shares) - 1) * interval
        tat = max(entry.tat, now)
        if tat - now - tolerance > _EPSILON_S:
            self.spare += 1
            return False
        entry.tat = tat + interval
        entry.charged = interval
        self.priority += 1
        return True

    def refund(self, client: str) -> None:
        """A priority request the upstream's GCRA refused after all: its share is not spent
        (else the refused requests would waste the shares and the fleet admit less than
        its rate)."""
        entry = self._clients.get(client)
        if entry is not None and entry.charged:
            entry.tat -= entry.charged
            entry.charged = 0.0
            self.priority -= 1

    def _touch(self, now: float, client: str) -> _Client:
        clients = self._clients
        horizon = now - self.config.active_s
        while clients:
            oldest = next(iter(clients.values()))
            if oldest.seen >= horizon:
                break
            clients.popitem(last=False)
        entry = clients.get(client)
        if entry is None:
            if len(clients) >= self.config.max_clients:
                clients.popitem(last=False)
            entry = clients[client] = _Client(tat=now, seen=now)
        else:
            clients.move_to_end(client)
            entry.seen = now
        return entry

    def snapshot(self) -> dict[str, int]:
        return {"active_clients": self.active, "priority": self.priority, "spare": self.spare}
