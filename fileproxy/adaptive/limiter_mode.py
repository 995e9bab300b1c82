"""Which limiter answers for an upstream: the fleet's, a local fallback, or both; pure.

Three modes, one transition table (time passed in):

``SHARED``
    The store answers: the fleet's limiter (in the store) decides and admits.
``FALLBACK``
    The store is away: this worker runs its own limiter at its share of the last
    shared limit (``LocalFallback`` in the shell) and admits against it alone.
``RECOVERING``
    The store answers again, but other workers may still be in their fallback for
    up to a probe interval (plus a sync tick): this worker's fallback share stays a
    *ceiling* in front of the shared limiter until ``until``, so the workers still in
    their fallback and those back in shared mode add up to the limit, not more.

============  =====================  ====================  ===========================
event         SHARED                 FALLBACK              RECOVERING
============  =====================  ====================  ===========================
store_failed  FALLBACK               FALLBACK              FALLBACK
store_back    SHARED                 RECOVERING(now+grace) RECOVERING (same until)
at(now)       SHARED                 FALLBACK              SHARED once now >= until
============  =====================  ====================  ===========================

``store_failed`` is a failed tick (or admission call) of the store, ``store_back`` a
tick that answered, ``at`` the passage of time (asked before every admission).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["LimiterMode", "Mode"]


class Mode(enum.Enum):
    SHARED = "shared"
    FALLBACK = "fallback"
    RECOVERING = "recovering"


@dataclass(frozen=True)
class LimiterMode:
    mode: Mode = Mode.SHARED
    until: float | None = None  # RECOVERING: when the fallback's ceiling ends

    def store_failed(self) -> LimiterMode:
        return LimiterMode(Mode.FALLBACK)

    def store_back(self, now: float, grace_s: float) -> LimiterMode:
        if self.mode is Mode.FALLBACK:
            return LimiterMode(Mode.RECOVERING, now + grace_s)
        return self

    def at(self, now: float) -> LimiterMode:
        if self.mode is Mode.RECOVERING and self.until is not None and now >= self.until:
            return LimiterMode(Mode.SHARED)
        return self
