"""The adaptive state of one upstream: the shell around the pure brains and the store.

It feeds the quality classifier with what the proxy observes (time to response
headers, connect times, the upstream socket's TCP_INFO) and counts the outcome of
every exchange for the limiter, and answers the two questions the proxy asks per
request: may it pass (GCRA at the fleet's limit), and with which profile (chunk
size and timeouts of the fleet's quality level).

The limiter is the fleet's (``state_store``): every ~100 ms ``sync`` adds this
worker's counts to the shared window, and when the window has run its course one
worker of the fleet gets the lease, decides with the pure rule and commits. While
the store is unreachable the worker runs a ``LocalFallback``: its own limiter and
GCRA at (last shared limit / live workers), enforcing as the fleet did.

With FILEPROXY_LIMIT_ENFORCE=after-cut (the default) the limit is enforced only
while the upstream needs protecting: from the first cut (error rate above 10%)
until the limit has grown back to its maximum with errors below 2%. A healthy
upstream is never throttled by a limit that is still ramping up from its start
value — measured with wrk, enforcing from the start refused 47,325 of 48,500
requests to a healthy upstream in 8 s while the limit climbed from 100 to 358
req/s. Errors are overload signals only (``limiter_outcome``), and a failure status
counts only when it is the upstream's, not one path's (``adaptive.failure_spread``:
settled at each sync); a 429 is the backend limiting one user and never counts. A cut
wears off without traffic (the idle rule of ``aimd_limiter``); while enforcing, each
client gets its fair share first (``admit``, ``adaptive.fair_share``).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fileproxy.adaptive import (
    AimdLimiter,
    ClassifierConfig,
    Decision,
    FairShare,
    Gcra,
    Level,
    LevelProfile,
    LimiterConfig,
    LimiterState,
    Outcome,
    QualityClassifier,
    TcpInfo,
    close_window,
    enforcing_after,
    profile_table,
    spare_burst,
)
from fileproxy.adaptive.failure_spread import FailureSpread
from fileproxy.adaptive.limiter_mode import LimiterMode, Mode
from fileproxy.exchange import (
    CLIENT_ABORT,
    SEND_TIMEOUT,
    SHUTDOWN,
    TIMEOUT,
    UPSTREAM_ERROR,
    Exchange,
)
from fileproxy.settings import Settings
from fileproxy.state.fleet import FleetView, UpstreamReport
from fileproxy.state.link import PROBE_JITTER, STORE_PROBE_INTERVAL_S, StoreLink
from fileproxy.state.store import REPORT_AGE_OUT_S, SharedLimiter, StoreError, Tick, WindowCounts

if TYPE_CHECKING:
    pass

log = logging.getLogger("fileproxy.state.adaptation")

#: FILEPROXY_LIMIT_ERROR_STATUSES' default: the statuses of an overloaded upstream (429
#: is not one: RFC 6585, the backend limiting one user; it is passed on, never counted)
DEFAULT_ERROR_STATUSES = (502, 503, 504)
#: a client key longer than this (a forged X-Forwarded-For) is cut

#: After the store is back, every worker has probed it within a jittered probe interval
#: (plus a sync tick); until then a worker's fallback share stays its ceiling, so the
#: workers still in their fallback and those back in shared mode add up to the limit.
RECOVERY_GRACE_S = STORE_PROBE_INTERVAL_S * (1 + PROBE_JITTER) + 0.3


def static_profile(settings: Settings) -> LevelProfile:
    """The seed's static settings: used with FILEPROXY_OPTIMIZER=off and before a first estimate."""
    return LevelProfile(
        chunk_size=settings.chunk_size,
        connect_timeout_s=settings.connect_timeout,
        headers_timeout_s=settings.headers_timeout,
        read_timeout_s=settings.read_timeout,
    )


def limiter_outcome(
    exchange: Exchange, error_statuses: Collection[int] = DEFAULT_ERROR_STATUSES
) -> Outcome | None:
    """What an exchange tells the limiter; None when it never involved the upstream.

    Overload signals only are errors: a connect failure, reset or timeout, or a status
    of ``error_statuses`` (FILEPROXY_LIMIT_ERROR_STATUSES; such a status is then weighed
    by ``failure_status`` and ``adaptive.failure_spread``). Any other answer, a 500 of
    one broken URL or a 429 included, is a success: the upstream answered.
    """
    status = exchange.upstream_status
    if exchange.cause in (UPSTREAM_ERROR, TIMEOUT) or status in error_statuses:
        return Outcome.ERROR
    if status is None:
        return None  # rejected by the proxy itself, or the client left before an answer
    # the client left or stopped reading, or the proxy cut the response at shutdown: the
    # upstream answered but the exchange says nothing about its health
    ignored = (CLIENT_ABORT, SHUTDOWN, SEND_TIMEOUT)
    return Outcome.IGNORED if exchange.cause in ignored else Outcome.SUCCESS


def failure_status(exchange: Exchange, error_statuses: Collection[int]) -> bool:
    """An error that is an answer (a status of ``error_statuses``), not a transport failure:
    it may be one path's rather than the upstream's (``adaptive.failure_spread``)."""
    return exchange.cause not in (UPSTREAM_ERROR, TIMEOUT) and (
        exchange.upstream_status in error_statuses
    )


def limiter_config(settings: Settings) -> LimiterConfig:
    return LimiterConfig(
        min_limit=settings.limit_min,
        max_limit=settings.limit_max,
        initial=settings.limit_initial,
        window_s=settings.limit_window,
    )


class LocalFallback:
    """This worker's own limiter while the store is away: its share of the last limit.

    It starts at ``last limit / live workers`` and never grows above it (the fleet
    never exceeds the limit it had), cuts on errors as the shared limiter would, and
    starts without a burst credit, so the switch cannot let a burst through.
    """

    def __init__(
        self,
        config: LimiterConfig,
        last: SharedLimiter,
        workers: int,
        burst: int,
        always_enforce: bool,
        now: float,
    ) -> None:
        share = last.state.limit / max(1, workers)
        self.limiter = AimdLimiter(
            replace(config, min_limit=min(config.min_limit, share), initial=share, max_limit=share)
        )
        self.limiter.decide(now)  # opens the first window
        self.burst = max(1, burst // max(1, workers))
        self.gcra = Gcra(share, self.burst)
        self.gcra.start_drained(now)  # no burst at the switch
        self.enforcing = last.enforcing
        self.always_enforce = always_enforce

    def try_admit(self, now: float, burst: int | None = None) -> tuple[bool, float]:
        if not self.enforcing:
            return True, 0.0
        return self.gcra.try_admit(now, burst)

    def decide(self, now: float) -> Decision | None:
        decision = self.limiter.decide(now)
        if decision is not None:
            self.gcra.set_rate(decision.new)
            self.enforcing = self.always_enforce or enforcing_after(
                self.limiter.config, decision, self.enforcing
            )
        return decision


TRANSPORT_SAMPLE_INTERVAL_S = 0.005


class UpstreamAdaptation:
    def __init__(
        self, settings: Settings, name: str, link: StoreLink, local_workers: int = 1
    ) -> None:
        self.enabled = settings.optimizer
        self.name = name
        self.link = link
        self.static = static_profile(settings)
        self.profiles = profile_table(settings.profiles)
        self.classifier = QualityClassifier(
            ClassifierConfig(boundaries_ms=settings.quality_boundaries_ms)
        )
        self.config = limiter_config(settings)
        self.error_statuses = frozenset(settings.limit_error_statuses)
        self.fair_share = FairShare()
        self.spread = FailureSpread()  # whose failure statuses: a path's or the upstream's
        self.burst = settings.limit_burst
        self.always_enforce = settings.limit_enforce == "always"
        # the fleet's limiter as last seen in the store
        self.limiter = SharedLimiter(
            LimiterState(limit=float(settings.limit_initial)), enforcing=self.always_enforce
        )
        # which limiter answers (adaptive.limiter_mode); ``local`` is this worker's own,
        # in FALLBACK the limiter and in RECOVERING the ceiling in front of the fleet's
        self.mode = LimiterMode()
        self.local: LocalFallback | None = None
        self.fleet_level: Level | None = None
        # until the fleet's reports say how many (Redis down at start: this host's)
        self.live_workers = local_workers
        self._sizes: deque[tuple[float, int]] = deque()  # (when, workers reporting)
        self.token = uuid.uuid4().hex  # names this worker's decision leases
        self.decided_here: deque[Decision] = deque(maxlen=self.config.max_decisions)
        self.rejected = 0
        # the replica's outlier ejection: this worker's (reported to the fleet) and the
        # fleet's latest (wall clock, reason), kept here for the replica set to read
        self.ejection: tuple[float, str] | None = None
        self.fleet_ejection: tuple[float, str] | None = None
        self._successes = self._errors = self._admitted = 0
        self._transport_sampled_at = -math.inf

    @property
    def fallback(self) -> LocalFallback | None:
        """The local limiter while it alone answers (FALLBACK), else None."""
        return self.local if self.mode.mode is Mode.FALLBACK else None

    @property
    def current_limit(self) -> float | None:
        if not self.enabled:
            return None
        if self.fallback is not None:
            return round(self.fallback.limiter.limit, 3)
        return round(self.limiter.state.limit, 3)

    @property
    def enforcing(self) -> bool:
        return self.fallback.enforcing if self.fallback is not None else self.limiter.enforcing

    @property
    def limiter_mode(self) -> str:
        if not self.enabled:
            return "off"
        return "fallback" if self.fallback is not None else "shared"

    # --- per request ---

    def profile(self, now: float) -> LevelProfile:
        """The profile for a request starting now (re-evaluates the level at most 1/s)."""
        if self.enabled:
            self.classifier.evaluate(now)
        return self.current_profile()

    def current_level(self) -> Level | None:
        """The fleet's level; before any estimate, the level the fleet saved last."""
        if not self.enabled:
            return None
        if self.fleet_level is not None and self.link.shared:
            return self.fleet_level  # one worker alone is its own fleet, without the lag
        if self.classifier.estimated:
            return self.classifier.level
        return Level(self.limiter.level) if self.limiter.level else None

    def current_profile(self) -> LevelProfile:
        level = self.current_level()
        return self.static if level is None else self.profiles[level]

    @property
    def admits_all(self) -> bool:
        """Every request is admitted now (no limit enforced): ``admit`` need not be asked."""
        return not self.enabled or (self.fallback is None and not self.limiter.enforcing)

    async def admit(
        self, now: float, client_of: Callable[[], str] | None = None, path: str | None = None
    ) -> tuple[bool, float]:
        """(admitted, seconds until a request would be); never waits on a broken store.

        While the limit is enforced, the request's client (``client_of()``, e.g.
        ``headers.client_key``; asked only then, not on the open path) gets its fair share first
        (``adaptive.fair_share``): a request within its share may use the GCRA's burst,
        one over it only half of it, so the heaviest client is refused first and a
        light one still passes. The share is of this worker's part of the
        rate: the limit over the fleet's live workers (a worker alone: the whole limit).
        A request to a ``path`` that fails almost always (``FailureSpread.failing``) is
        shared apart from the same client's other requests, so those still reach the
        upstream and their answers can show that path's failures are its own.
        """
        if self.admits_all:
            return True, 0.0
        if self.fallback is not None:
            rate = self.fallback.gcra.rate
        else:
            rate = self.limiter.state.limit / max(1, self.live_workers)
        client = client_of() if client_of is not None else ""
        if path is not None and self.spread.failing(now, path):
            client += " (failing path)"
        within = self.fair_share.within_share(now, client, rate, self.burst)
        admitted, retry_after = await self._admit(now, None if within else spare_burst(self.burst))
        if not admitted:
            self.rejected += 1
            if within:
                self.fair_share.refund(client)
        return admitted, retry_after

    async def _admit(self, now: float, burst: int | None) -> tuple[bool, float]:
        """``burst`` None: the configured one; a spare request's: less (``spare_burst``)."""
        if self.fallback is not None or not self.link.available:
            return self._fallback(now).try_admit(now, burst)
        ceiling = self._recovery_ceiling(now)
        if ceiling is not None:
            admitted, retry_after = ceiling.try_admit(now, burst)
            if not admitted:
                return admitted, retry_after
        limit = self.limiter.state.limit
        store_burst = self.burst if burst is None else burst
        try:
            return await self.link.call(lambda: self.link.store.pace(self.name, limit, store_burst))
        except StoreError:
            return self._fallback(now).try_admit(now, burst)

    def observe_exchange(self, now: float, exchange: Exchange) -> None:
        if not self.enabled:
            return
        outcome = limiter_outcome(exchange, self.error_statuses)
        if outcome is None:
            return
        if outcome is Outcome.ERROR:
            if failure_status(exchange, self.error_statuses):
                self.spread.fail(now, exchange.path)  # weighed at the next sync (``_settle``)
                return
            self.spread.fail(now, exchange.path, pending=False)
        elif outcome is Outcome.SUCCESS:
            self.spread.answered(now, exchange.path)
        self._count(now, outcome)

    def _count(self, now: float, outcome: Outcome, n: int = 1) -> None:
        if n <= 0:
            return
        if self.fallback is not None:
            for _ in range(n):
                self.fallback.limiter.record(now, outcome)
            return
        self._admitted += n
        if outcome is Outcome.SUCCESS:
            self._successes += n
        elif outcome is Outcome.ERROR:
            self._errors += n

    def _settle(self, now: float) -> None:
        """The failure statuses since the last sync: errors when the upstream's, else
        admitted requests that say nothing about it (their path was isolated)."""
        before = self.spread.discounted
        counted = self.spread.settle(now)
        self._count(now, Outcome.ERROR, counted)
        self._count(now, Outcome.IGNORED, self.spread.discounted - before)

    def observe_headers(
        self, now: float, ttfb_s: float, read_tcp_info: Callable[[], TcpInfo | None]
    ) -> None:
        """A response head arrived after ``ttfb_s``; ``read_tcp_info`` reads its socket.

        The socket is read (a getsockopt) at most once per TRANSPORT_SAMPLE_INTERVAL_S:
        a quiet worker samples every response, a busy one 200 a second, plenty for
        the classifier's 300-sample window and a syscall less on most requests.
        """
        if not self.enabled:
            return
        self.classifier.observe_http_rtt(now, ttfb_s * 1000.0)
        if now - self._transport_sampled_at < TRANSPORT_SAMPLE_INTERVAL_S:
            return
        self._transport_sampled_at = now
        tcp_info = read_tcp_info()
        if tcp_info is not None and tcp_info.rtt_ms:
            self.classifier.observe_transport(
                now, tcp_info.rtt_ms, tcp_info.min_rtt_ms, tcp_info.retransmit_rate
            )

    def observe_connect(self, now: float, connect_s: float) -> None:
        if self.enabled:
            self.classifier.observe_connect(now, connect_s * 1000.0)

    # --- background: the store ---

    async def sync(self, now: float) -> None:
        """Add this worker's counts to the fleet's window; decide it when leased to us."""
        if not self.enabled:
            return
        self._settle(now)
        counts = self._take_counts()
        try:
            tick = await self.link.call(
                lambda: self.link.store.tick(
                    self.name,
                    counts,
                    token=self.token,
                    window_s=self.config.window_s,
                    initial=self.limiter,
                ),
                probe=True,
            )
        except StoreError:
            self._fallback(now).decide(now)
            return
        if self.mode.mode is Mode.FALLBACK:
            # Other workers may still be in their fallback for up to a probe interval:
            # this worker's share stays its ceiling until they have all come back.
            log.info("shared admission limit again", extra={"limit": tick.limiter.state.limit})
        self.mode = self.mode.store_back(now, RECOVERY_GRACE_S)
        self.limiter = tick.limiter
        if tick.lease:
            await self._decide(tick)

    def _take_counts(self) -> WindowCounts:
        counts = WindowCounts(self._successes, self._errors, self._admitted)
        self._successes = self._errors = self._admitted = 0
        return counts

    async def _decide(self, tick: Tick) -> None:
        closed = close_window(self.config, tick.limiter.state, tick.now)
        decision, enforcing = closed.decision, tick.limiter.enforcing
        if decision is not None:
            enforcing = self.always_enforce or enforcing_after(self.config, decision, enforcing)
        level = self.current_level()
        try:
            applied = await self.link.call(
                lambda: self.link.store.commit(
                    self.name,
                    token=self.token,
                    seen=tick.limiter.counts(),
                    closed=closed,
                    enforcing=enforcing,
                    level=level.value if level is not None else None,
                )
            )
        except StoreError:
            return  # the lease runs out and a later tick decides this window
        if not applied or decision is None:
            return
        self.decided_here.append(decision)
        self.limiter = replace(
            tick.limiter,
            state=closed.state,
            enforcing=enforcing,
            decisions=tick.limiter.decisions + 1,
            last_decision=decision.to_dict(),
        )
        _log_decision(decision, tick.limiter.enforcing, enforcing)

    def _recovery_ceiling(self, now: float) -> LocalFallback | None:
        self.mode = self.mode.at(now)
        if self.mode.mode is Mode.SHARED:
            self.local = None
        return self.local if self.mode.mode is Mode.RECOVERING else None

    def _fallback(self, now: float) -> LocalFallback:
        if self.mode.mode is not Mode.FALLBACK or self.local is None:
            self.mode = self.mode.store_failed()
            self.local = local = LocalFallback(
                self.config, self.limiter, self.live_workers, self.burst, self.always_enforce, now
            )
            log.warning(
                "local admission limit until the state store answers",
                extra={
                    "limit": round(local.limiter.limit, 3),
                    "enforcing": local.enforcing,
                    "live_workers": self.live_workers,
                },
            )
            return local
        return self.local

    def follow_fleet(self, fleet: FleetView | None, now: float) -> None:
        """Take the fleet's level and size from its latest reports (None: store away).

        The size is the largest seen over the last report age-out: a store that has
        just come back (empty) holds only the reports of the first workers to publish,
        and a fallback sized on those would give each worker too large a share.
        """
        self.fleet_level = fleet.level(self.name) if fleet is not None else None
        self.fleet_ejection = fleet.ejection(self.name, time.time()) if fleet else None
        if fleet is None:
            return
        self._sizes.append((now, max(1, fleet.live_workers)))
        while self._sizes[0][0] < now - REPORT_AGE_OUT_S:
            self._sizes.popleft()
        self.live_workers = max(size for _, size in self._sizes)

    def report(self) -> UpstreamReport:
        level = self.classifier.level
        return UpstreamReport(
            level=level.value,
            estimated=self.enabled and self.classifier.estimated,
            samples=self.classifier.sample_count if self.enabled else 0,
            limit=self.current_limit,
            enforcing=self.enabled and self.enforcing,
            rejected=self.rejected,
            limiter_mode=self.limiter_mode,
            ejected_until=self.ejection[0] if self.ejection else None,
            ejected_reason=self.ejection[1] if self.ejection else None,
        )

    def snapshot(self) -> dict[str, Any]:
        """For /stats: level, the signals behind it, the profile in force, the limiter."""
        profile = self.current_profile()
        level = self.current_level()
        return {
            "optimizer_enabled": self.enabled,
            "quality": {
                **self.classifier.snapshot(),
                "fleet_level": level.value if level is not None else None,
            }
            if self.enabled
            else None,
            "profile": {
                "chunk_size": profile.chunk_size,
                "connect_timeout_s": profile.connect_timeout_s,
                "headers_timeout_s": profile.headers_timeout_s,
                "read_timeout_s": profile.read_timeout_s,
                "source": "level" if profile is not self.static else "static",
            },
            "limiter": self._limiter_snapshot() if self.enabled else None,
        }

    def _limiter_snapshot(self) -> dict[str, Any]:
        state = self.limiter.state
        snapshot: dict[str, Any] = {
            "mode": self.limiter_mode,
            "limit": self.current_limit,
            "bounds": [self.config.min_limit, self.config.max_limit],
            "enforce": "always" if self.always_enforce else "after-cut",
            "enforcing": self.enforcing,
            "rejected_total": self.rejected,
            "fair_share": self.fair_share.snapshot(),
            "failure_statuses": self.spread.snapshot(),
            "window_start": state.window_start,
            "cooldown_until": state.cooldown_until,
            "decision_count": self.limiter.decisions,
            "last_decision": self.limiter.last_decision,
            "decisions": [d.to_dict() for d in self.decided_here],
        }
        if self.fallback is not None:
            snapshot["fallback"] = self.fallback.limiter.snapshot()
        return snapshot


def _log_decision(decision: Decision, was_enforcing: bool, enforcing: bool) -> None:
    if enforcing and not was_enforcing:
        log.warning("upstream errors: admission limit enforced", extra=decision.to_dict())
    elif was_enforcing and not enforcing:
        log.info("upstream healthy at the maximum limit: admission open", extra=decision.to_dict())
    elif decision.new != decision.old:
        log.info("admission limit changed", extra=decision.to_dict())
