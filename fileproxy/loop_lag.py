"""Event-loop lag: how late this worker's loop runs a timer, the delay every request sees.

A worker with one long loop iteration (a stream relaying megabytes without a
pause, a slow computation) answers nothing else meanwhile, /health included.
``watch`` sleeps ``LAG_INTERVAL_S`` again and again and records by how much each
wake-up came late; ``LoopLag`` keeps the last figure and the largest of the last
``LAG_WINDOW_S`` seconds, shown in /health (``event_loop``) and /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import time

LAG_INTERVAL_S = 0.05
LAG_WINDOW_S = 10.0


class LoopLag:
    """The lag samples of the last ``window_s`` seconds; pure, time passed in."""

    def __init__(self, window_s: float = LAG_WINDOW_S) -> None:
        self.window_s = window_s
        self.last_s = 0.0
        self.samples_total = 0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()

    def record(self, now: float, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.last_s = lag_s
        self.samples_total += 1
        recent = self._recent
        # keep a decreasing run of maxima: an older sample below a newer one can never
        # be the window's maximum again
        while recent and recent[-1][1] <= lag_s:
            recent.pop()
        recent.append((now, lag_s))
        self._expire(now)

    def max_s(self, now: float) -> float:
        """The largest lag of the last ``window_s`` seconds (0.0 without a sample)."""
        self._expire(now)
        return self._recent[0][1] if self._recent else 0.0

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self.window_s:
            self._recent.popleft()


async def watch(lag: LoopLag, interval_s: float = LAG_INTERVAL_S) -> None:
    """Record the loop's lag every ``interval_s`` until cancelled."""
    while True:
        # time.monotonic(), not loop.time(): uvloop's clock has millisecond steps
        due = time.monotonic() + interval_s
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        lag.record(now, now - due)
