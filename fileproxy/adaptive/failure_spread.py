"""Whether an upstream's failure statuses are the upstream's or one path's; pure.

A 503 (502, 504) from one path while the other paths answer is a broken path, not an
overloaded upstream: counted as overload, one client flooding ``/status/503`` cut the
admission rate of everyone (issue 20: 72 to 100 % of the other users' requests refused,
where nginx served them all). So a failure status is held back (``fail``) until the
shell settles it (``settle``, e.g. every sync tick), and it counts as an overload signal
only if its path is not *isolated*:

* a path is a *suspect* when, over the last one to two ``bucket_s`` (two rotating
  buckets), it failed at least ``min_failures`` times and at least ``isolated_rate``
  (90 %) of its answers were failures;
* the suspects are *isolated* when the rest of the traffic (every other path) answered:
  at least one success, and a failure rate of at most ``others_rate`` (50 %).

So an upstream that fails everything (every path a suspect or failing, no other path
answering) is still counted and cut; one under overload, failing part of every path's
requests, is counted and cut (a path failing half its requests is no suspect, and
one-off paths, a file each, are each under ``min_failures``); a path whose own failures
stand out against the others' answers is left to its clients (its answers go to them
unchanged). While the limit is enforced, a client's requests to a failing path
(``failing``) are fair-shared apart from its other requests (the shell's key): else one
client flooding a broken path before anyone else asked gets the limit cut, and the same
client's (or, without X-Forwarded-For, every user's) requests to the paths that answer
are refused with the flood's, so no answer ever shows the path isolated. Transport
failures (connect, reset, timeout) are the upstream's anyway:
the shell counts them at once, and they count here as failures of the rest too (a
struggling upstream makes no path look isolated). Memory is bounded (``max_paths``
paths that failed, least recent evicted first). Time is passed in.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["FailureSpread", "SpreadConfig"]


@dataclass(frozen=True)
class SpreadConfig:
    bucket_s: float = 1.0
    min_failures: int = 3
    isolated_rate: float = 0.9
    others_rate: float = 0.5
    max_paths: int = 1024

    def __post_init__(self) -> None:
        if not (self.bucket_s > 0 and self.min_failures >= 1 and self.max_paths >= 1):
            raise ValueError("need bucket_s > 0, min_failures >= 1 and max_paths >= 1")
        if not (0 < self.isolated_rate <= 1 and 0 <= self.others_rate < 1):
            raise ValueError("need 0 < isolated_rate <= 1 and 0 <= others_rate < 1")


@dataclass
class _Counts:
    """(successes, failures) in the previous and the current bucket."""

    ok: tuple[int, int] = (0, 0)
    failed: tuple[int, int] = (0, 0)

    def rotate(self, steps: int) -> None:
        if steps >= 2:
            self.ok = self.failed = (0, 0)
        elif steps == 1:
            self.ok, self.failed = (self.ok[1], 0), (self.failed[1], 0)

    def add(self, failed: bool) -> None:
        if failed:
            self.failed = (self.failed[0], self.failed[1] + 1)
        else:
            self.ok = (self.ok[0], self.ok[1] + 1)

    @property
    def total_ok(self) -> int:
        return self.ok[0] + self.ok[1]

    @property
    def total_failed(self) -> int:
        return self.failed[0] + self.failed[1]


class FailureSpread:
    def __init__(self, config: SpreadConfig | None = None) -> None:
        self.config = config or SpreadConfig()
        self._bucket: int | None = None
        self._all = _Counts()
        # paths that failed lately, least recent first; a path is tracked from its
        # first failure on (its successes before that are in ``_all`` only)
        self._paths: OrderedDict[str, _Counts] = OrderedDict()
        self._pending: dict[str, int] = {}  # failure statuses not settled yet, per path
        self.counted = 0  # settled failures that counted as overload
        self.discounted = 0  # ... that did not: their path was isolated

    def answered(self, now: float, path: str) -> None:
        """The upstream answered ``path`` with a status that is no failure."""
        self._rotate(now)
        self._all.add(False)
        counts = self._paths.get(path)
        if counts is not None:
            counts.add(False)

    def fail(self, now: float, path: str, *, pending: bool = True) -> None:
        """A failure at ``path``: a failure status (``pending``: held until ``settle``)
        or a transport failure (not pending: the shell counted it already)."""
        self._rotate(now)
        self._all.add(True)
        counts = self._paths.get(path)
        if counts is None:
            if len(self._paths) >= self.config.max_paths:
                self._paths.popitem(last=False)
            counts = self._paths[path] = _Counts()
        else:
            self._paths.move_to_end(path)
        counts.add(True)
        if pending:
            self._pending[path] = self._pending.get(path, 0) + 1

    def isolated(self, now: float) -> frozenset[str]:
        """The paths whose failures stand out against the other paths' answers."""
        self._rotate(now)
        cfg = self.config
        suspects = {path for path, c in self._paths.items() if self._suspect(c)}
        if not suspects:
            return frozenset()
        rest_ok = self._all.total_ok - sum(self._paths[p].total_ok for p in suspects)
        rest_failed = self._all.total_failed - sum(self._paths[p].total_failed for p in suspects)
        if rest_ok < 1 or rest_failed > cfg.others_rate * (rest_ok + rest_failed):
            return frozenset()  # nothing else answers: the upstream's failures
        return frozenset(suspects)

    def failing(self, now: float, path: str) -> bool:
        """Whether ``path`` is a suspect now: (almost) all its recent answers failed."""
        self._rotate(now)
        counts = self._paths.get(path)
        return counts is not None and self._suspect(counts)

    def _suspect(self, c: _Counts) -> bool:
        cfg = self.config
        return c.total_failed >= cfg.min_failures and c.total_failed >= cfg.isolated_rate * (
            c.total_failed + c.total_ok
        )

    def settle(self, now: float) -> int:
        """How many of the pending failure statuses count as overload (the others were
        their path's); the pending ones are cleared."""
        if not self._pending:
            return 0
        isolated = self.isolated(now)
        counted = sum(n for path, n in self._pending.items() if path not in isolated)
        self.discounted += sum(self._pending.values()) - counted
        self.counted += counted
        self._pending.clear()
        return counted

    def _rotate(self, now: float) -> None:
        bucket = math.floor(now / self.config.bucket_s)
        if self._bucket is None:
            self._bucket = bucket
            return
        steps = bucket - self._bucket
        if steps <= 0:
            return
        self._bucket = bucket
        self._all.rotate(steps)
        for path, counts in list(self._paths.items()):
            counts.rotate(steps)
            if not counts.total_failed:
                del self._paths[path]  # no failure left in the horizon: untracked again

    def snapshot(self) -> dict[str, int]:
        return {
            "counted": self.counted,
            "discounted": self.discounted,
            "paths_tracked": len(self._paths),
        }
