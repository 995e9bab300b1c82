"""The adaptive state of one upstream: the shell around the pure brains.

It feeds the quality classifier and the AIMD limiter with what the proxy
observes (time to response headers, connect times, the upstream socket's
TCP_INFO, the outcome of every exchange), and answers the two questions the
proxy asks per request: may it pass (GCRA at the current limit), and with which
profile (chunk size and timeouts of the current quality level).

The limit is enforced only while the upstream needs protecting: from the first
cut (error rate above 10%) until the limit has grown back to its maximum with
errors below 2%. A healthy upstream is never throttled by a limit that is still
ramping up from its start value — measured with wrk, enforcing from the start
refused 47,325 of 48,500 requests to a healthy upstream in 8 s while the limit
climbed from 100 to 358 req/s.
"""

from __future__ import annotations

import logging
from typing import Any

from .adaptive import (
    AimdLimiter,
    ClassifierConfig,
    Decision,
    Gcra,
    LevelProfile,
    LimiterConfig,
    Outcome,
    QualityClassifier,
    TcpInfo,
    profile_table,
)
from .errors import CLIENT_ABORT, TIMEOUT, UPSTREAM_ERROR
from .exchange import Exchange
from .settings import Settings

log = logging.getLogger("fileproxy.adaptation")


def static_profile(settings: Settings) -> LevelProfile:
    """The seed's static settings: used with FILEPROXY_OPTIMIZER=off and before a first estimate."""
    return LevelProfile(
        chunk_size=settings.chunk_size,
        connect_timeout_s=settings.connect_timeout,
        headers_timeout_s=settings.headers_timeout,
        read_timeout_s=settings.read_timeout,
    )


def limiter_outcome(exchange: Exchange) -> Outcome | None:
    """What an exchange tells the limiter; None when it never involved the upstream."""
    status = exchange.upstream_status
    if exchange.cause in (UPSTREAM_ERROR, TIMEOUT) or (
        status is not None and (status >= 500 or status == 429)
    ):
        return Outcome.ERROR
    if status is None:
        return None  # rejected by the proxy itself, or the client left before an answer
    return Outcome.IGNORED if exchange.cause == CLIENT_ABORT else Outcome.SUCCESS


class UpstreamAdaptation:
    def __init__(self, settings: Settings, now: float) -> None:
        self.enabled = settings.optimizer
        self.static = static_profile(settings)
        self.profiles = profile_table(settings.profiles)
        self.classifier = QualityClassifier(
            ClassifierConfig(boundaries_ms=settings.quality_boundaries_ms)
        )
        self.limiter = AimdLimiter(
            LimiterConfig(
                min_limit=settings.limit_min,
                max_limit=settings.limit_max,
                initial=settings.limit_initial,
                window_s=settings.limit_window,
            )
        )
        self.gcra = Gcra(self.limiter.limit, settings.limit_burst)
        self.enforcing = False
        self.rejected = 0
        self.limiter.decide(now)  # opens the first window

    @property
    def current_limit(self) -> float | None:
        return round(self.limiter.limit, 3) if self.enabled else None

    def profile(self, now: float) -> LevelProfile:
        """The profile for a request starting now (re-evaluates the level at most 1/s)."""
        if self.enabled:
            self.classifier.evaluate(now)
        return self.current_profile()

    def current_profile(self) -> LevelProfile:
        if not self.enabled or not self.classifier.estimated:
            return self.static
        return self.profiles[self.classifier.level]

    def admit(self, now: float) -> tuple[bool, float]:
        """(admitted, seconds until a request would be)."""
        if not self.enabled:
            return True, 0.0
        decision = self.limiter.decide(now)
        if decision is not None:
            self._after(decision)
        if not self.enforcing:
            return True, 0.0
        admitted, retry_after = self.gcra.try_admit(now)
        if not admitted:
            self.rejected += 1
        return admitted, retry_after

    def _after(self, decision: Decision) -> None:
        config = self.limiter.config
        if decision.new != decision.old:
            self.gcra.set_rate(decision.new)
        if not self.enforcing and decision.new < decision.old:
            self.enforcing = True
            log.warning("upstream errors: admission limit enforced", extra=decision.to_dict())
        elif (
            self.enforcing
            and decision.new >= config.max_limit
            and decision.error_rate < config.grow_threshold
        ):
            self.enforcing = False
            log.info(
                "upstream healthy at the maximum limit: admission open", extra=decision.to_dict()
            )
        elif decision.new != decision.old:
            log.info("admission limit changed", extra=decision.to_dict())

    def observe_exchange(self, now: float, exchange: Exchange) -> None:
        if not self.enabled:
            return
        outcome = limiter_outcome(exchange)
        if outcome is not None:
            self.limiter.record(now, outcome)

    def observe_headers(self, now: float, ttfb_s: float, tcp_info: TcpInfo | None) -> None:
        if not self.enabled:
            return
        self.classifier.observe_http_rtt(now, ttfb_s * 1000.0)
        if tcp_info is not None and tcp_info.rtt_ms:
            self.classifier.observe_transport(
                now, tcp_info.rtt_ms, tcp_info.min_rtt_ms, tcp_info.retransmit_rate
            )

    def observe_connect(self, now: float, connect_s: float) -> None:
        if self.enabled:
            self.classifier.observe_connect(now, connect_s * 1000.0)

    def snapshot(self) -> dict[str, Any]:
        """For /stats: level, the signals behind it, the profile in force, the limiter."""
        profile = self.current_profile()
        return {
            "optimizer_enabled": self.enabled,
            "quality": self.classifier.snapshot() if self.enabled else None,
            "profile": {
                "chunk_size": profile.chunk_size,
                "connect_timeout_s": profile.connect_timeout_s,
                "headers_timeout_s": profile.headers_timeout_s,
                "read_timeout_s": profile.read_timeout_s,
                "source": "level" if profile is not self.static else "static",
            },
            "limiter": {
                **self.limiter.snapshot(),
                "enforcing": self.enforcing,
                "rejected_total": self.rejected,
            }
            if self.enabled
            else None,
        }
