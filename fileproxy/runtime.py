"""Facts about the running worker: its event loop, its start time, its process."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from fileproxy import __version__

log = logging.getLogger("fileproxy")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency, but the daemon runs without it
    uvloop = None  # type: ignore[assignment]


def uvloop_active() -> bool:
    return uvloop is not None and isinstance(asyncio.get_running_loop(), uvloop.Loop)


@dataclass(frozen=True)
class Runtime:
    uvloop_enabled: bool
    optimizer_enabled: bool
    pid: int = field(default_factory=os.getpid)
    started_wall: float = field(default_factory=time.time)
    version: str = __version__

    @property
    def optimization_score(self) -> int:
        """0..2: one point for uvloop, one for the adaptive optimizer."""
        return int(self.uvloop_enabled) + int(self.optimizer_enabled)

    @property
    def optimization_level(self) -> str:
        """The seed's words, which operators script against: both on "high", one of them
        "medium" (the seed's level without uvloop), neither "low"."""
        return _LEVEL_WORDS[self.optimization_score]


_LEVEL_WORDS = ("low", "medium", "high")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop not installed: using asyncio's event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
