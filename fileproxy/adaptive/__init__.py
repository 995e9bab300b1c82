"""Adaptive brains: pure decision logic, no I/O and no clock (time is passed in).

- ``quality_classifier``: per-upstream network quality level (Chromium NQE style) and
  the level -> profile tables (chunk size, timeouts).
- ``aimd_limiter``: per-upstream AIMD controller of the admission rate.
- ``gcra``: the admission itself (leaky bucket / GCRA).
- ``fair_share``: per-client shares of an enforced rate (the heaviest client refused first).
- ``circuit_breaker``: when to stop calling the shared store and when to try again.
- ``tcp_info``: Linux TCP_INFO parsing for transport RTT observations.
- ``spill``: whether a response spills to the spool rather than pin its upstream.
"""

from fileproxy.adaptive.aimd_limiter import (
    AimdLimiter,
    Decision,
    Growth,
    LimiterConfig,
    LimiterState,
    Outcome,
    WindowClose,
    WindowOutcome,
    close_window,
    enforcing_after,
)
from fileproxy.adaptive.circuit_breaker import CircuitBreaker
from fileproxy.adaptive.fair_share import FairShare, FairShareConfig, spare_burst
from fileproxy.adaptive.gcra import Gcra
from fileproxy.adaptive.quality_classifier import (
    LEVELS,
    PROFILE_PRESETS,
    ClassifierConfig,
    Level,
    LevelProfile,
    QualityClassifier,
    Transition,
    parse_profile_table,
    profile_table,
    weighted_percentile,
)
from fileproxy.adaptive.spill import RelaySample, SpillPolicy, SpillVerdict, never_spilled
from fileproxy.adaptive.tcp_info import TcpInfo, parse_tcp_info

__all__ = [
    "LEVELS",
    "PROFILE_PRESETS",
    "AimdLimiter",
    "CircuitBreaker",
    "ClassifierConfig",
    "Decision",
    "FairShare",
    "FairShareConfig",
    "Gcra",
    "Growth",
    "Level",
    "LevelProfile",
    "LimiterConfig",
    "LimiterState",
    "Outcome",
    "QualityClassifier",
    "RelaySample",
    "SpillPolicy",
    "SpillVerdict",
    "TcpInfo",
    "Transition",
    "WindowClose",
    "WindowOutcome",
    "close_window",
    "enforcing_after",
    "never_spilled",
    "parse_profile_table",
    "parse_tcp_info",
    "profile_table",
    "spare_burst",
    "weighted_percentile",
]
