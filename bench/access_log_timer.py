"""gunicorn running fileproxy with its access-log path timed in every worker.

``bench.hot_path --time-access-log`` starts the contenders that log through this
script instead of ``python -m gunicorn``: it wraps ``access_log.log_access`` (one
call per request: taking the line, and writing a batch when it is full)
and ``AccessLog.flush`` when the timer calls it (a batch written after a second),
then runs gunicorn. Each worker writes ``{"lines": N, "seconds": S}`` to
``$ACCESS_LOG_TIMER_DIR/<pid>.json`` every ``EVERY`` lines and at exit: the CPU the
access log costs a running worker per line, free of the run-to-run noise of req/s
on a shared machine (thread CPU time, so time the worker waited for a core is
not counted).

    ACCESS_LOG_TIMER_DIR=/tmp/t python bench/access_log_timer.py -c gunicorn.conf.py
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Any

from fileproxy.http import access_log

EVERY = 5000
OUT = os.environ.get("ACCESS_LOG_TIMER_DIR", "")
_stats = {"lines": 0, "seconds": 0.0}
_inside = [False]  # in log_access: a flush there is already timed


def _dump() -> None:
    if OUT and _stats["lines"]:
        with open(os.path.join(OUT, f"{os.getpid()}.json"), "w") as out:
            json.dump(_stats, out)


def _timed_log(original: Any) -> Any:
    def log(*args: Any, **kwargs: Any) -> None:
        started = time.thread_time()
        _inside[0] = True
        try:
            original(*args, **kwargs)
        finally:
            _inside[0] = False
            _stats["seconds"] += time.thread_time() - started
            _stats["lines"] += 1
            if _stats["lines"] % EVERY == 0:
                _dump()

    return log


def _timed_flush(original: Any) -> Any:
    def flush(self: Any) -> None:
        if _inside[0]:
            original(self)
            return
        started = time.thread_time()
        original(self)
        _stats["seconds"] += time.thread_time() - started

    return flush


def main() -> None:
    access_log.log_access = _timed_log(access_log.log_access)
    access_log.AccessLog.flush = _timed_flush(access_log.AccessLog.flush)  # type: ignore[method-assign]
    atexit.register(_dump)
    from gunicorn.app.wsgiapp import run

    sys.argv[0] = "gunicorn"
    run()


if __name__ == "__main__":
    main()
