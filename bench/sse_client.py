"""Many concurrent server-sent-event streams from one asyncio process.

    python -m bench.sse_client streams --url http://10.201.0.2:8084/sse?interval_ms=100 \\
        --streams 64 --duration 5
    python -m bench.sse_client soak --url http://10.201.0.2:8084/sse?interval_ms=5000 \\
        --streams 10000 --cycles 3 --hold 30

Raw asyncio streams (no HTTP library: the client must stay cheap at 10,000
streams). Each stream sends ``GET`` (HTTP/1.1, keep-alive), expects 200, then
counts events (blank-line separated; chunked framing does not matter) and,
from the backend's timestamp in each event (bench/sse_backend.py), the
delivery delay. The soft RLIMIT_NOFILE is raised to the hard limit.

``streams``: open N streams (ramped at --ramp-per-s), keep each open for
--duration seconds from its own start, then close. One JSON line (prefix
``SSE_JSON``): streams ok, errors by kind (connect_timeout, connect_<OSError>,
headers_timeout, headers_closed, status_N, no_first_event, closed_early), time to
first event p50/p99/max (ms, from before connect()), events delivered and
events/s over the window, the fraction of the events the backend's schedule
promised, delivery delay p50/p99/max.

``soak``: --cycles times: open N streams, print ``PHASE {"phase": "opened"...}``
and wait for a line on stdin (the caller measures memory), hold --hold
seconds, print ``PHASE {"phase": "held"...}`` and wait, close them all, print
``PHASE {"phase": "closed"...}`` and wait. The caller drives it line by line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_DELAY_SAMPLES = 200_000


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return round(sorted_values[index], 2)


@dataclass
class Tally:
    started: int = 0
    ok: int = 0  # got a 200 and at least one event
    errors: dict[str, int] = field(default_factory=dict)
    ttfe_ms: list[float] = field(default_factory=list)
    delays_ms: list[float] = field(default_factory=list)
    events: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Target:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
            "User-Agent: bench-sse-client\r\n\r\n"
        ).encode()


async def one_stream(
    target: Target, tally: Tally, until: float | None, stop: asyncio.Event, timeout: float
) -> None:
    """One stream: until `until` (loop time) or until `stop` is set."""
    loop = asyncio.get_running_loop()
    tally.started += 1
    started = time.perf_counter()
    writer = None
    got_first = False
    try:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), timeout
            )
        except TimeoutError:
            tally.error("connect_timeout")
            return
        except OSError as exc:
            tally.error(f"connect_{type(exc).__name__}")
            return
        try:
            writer.write(target.request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except TimeoutError:
            tally.error("headers_timeout")
            return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            tally.error("headers_closed")
            return
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 0
        if status != 200:
            tally.error(f"status_{status}")
            return
        carry = b""
        while not stop.is_set():
            left = None if until is None else until - loop.time()
            if left is not None and left <= 0:
                break
            wait = left if got_first else (timeout if left is None else min(timeout, left))
            try:
                data = await asyncio.wait_for(reader.read(65536), wait)
            except TimeoutError:
                if not got_first:
                    tally.error("no_first_event")
                    return
                continue
            except OSError:
                data = b""
            if not data:
                tally.error("closed_early" if got_first else "no_first_event")
                return
            parts = (carry + data).split(b"\n\n")
            carry = parts.pop()
            now_ms = time.time() * 1000
            for part in parts:
                at = part.rfind(b"data: ")
                if at < 0:
                    continue
                tally.events += 1
                if not got_first:
                    got_first = True
                    tally.ok += 1
                    tally.ttfe_ms.append((time.perf_counter() - started) * 1000)
                fields = part[at + 6 :].split(b" ", 2)
                if len(fields) >= 2 and len(tally.delays_ms) < MAX_DELAY_SAMPLES:
                    with contextlib.suppress(ValueError):
                        tally.delays_ms.append(now_ms - int(fields[1]))
        if not got_first:  # the stream's time ran out before its first event
            tally.error("no_first_event")
    except asyncio.CancelledError:
        pass
    finally:
        if writer is not None:
            writer.close()


def summary(tally: Tally) -> dict[str, Any]:
    ttfe = sorted(tally.ttfe_ms)
    delays = sorted(tally.delays_ms)
    return {
        "streams": tally.started,
        "ok": tally.ok,
        "errors": dict(sorted(tally.errors.items())),
        "errors_total": sum(tally.errors.values()),
        "events": tally.events,
        "ttfe_ms": {
            "p50": percentile(ttfe, 50),
            "p99": percentile(ttfe, 99),
            "max": round(ttfe[-1], 2) if ttfe else None,
        },
        "delay_ms": {
            "p50": percentile(delays, 50),
            "p99": percentile(delays, 99),
            "max": round(delays[-1], 2) if delays else None,
        },
    }


async def open_streams(
    target: Target,
    tally: Tally,
    count: int,
    ramp_per_s: float,
    duration: float | None,
    stop: asyncio.Event,
    timeout: float,
) -> list[asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    tasks = []
    begin = loop.time()
    for i in range(count):
        due = begin + i / ramp_per_s
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        until = None if duration is None else loop.time() + duration
        tasks.append(asyncio.create_task(one_stream(target, tally, until, stop, timeout)))
    return tasks


async def run_streams(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args.url)
    tally = Tally()
    stop = asyncio.Event()
    started = time.monotonic()
    tasks = await open_streams(
        target, tally, args.streams, args.ramp_per_s, args.duration, stop, args.timeout
    )
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    out = summary(tally)
    out["duration_s"] = args.duration
    out["elapsed_s"] = round(elapsed, 2)
    out["interval_ms"] = args.interval_ms
    # events the backend's schedule promises a stream that lives `duration` seconds
    per_stream = args.duration * 1000 / args.interval_ms if args.interval_ms else None
    out["events_per_s"] = round(tally.events / args.duration, 1)
    out["delivered_fraction"] = (
        round(tally.events / (per_stream * args.streams), 4) if per_stream else None
    )
    return out


async def wait_line() -> str:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


def phase(name: str, **data: Any) -> None:
    print("PHASE " + json.dumps({"phase": name, **data}), flush=True)


async def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args.url)
    cycles = []
    for cycle in range(1, args.cycles + 1):
        tally = Tally()
        stop = asyncio.Event()
        opened_at = time.monotonic()
        tasks = await open_streams(
            target, tally, args.streams, args.ramp_per_s, None, stop, args.timeout
        )
        # every stream has its first event, or failed
        deadline = time.monotonic() + args.timeout + 5
        while tally.ok + sum(tally.errors.values()) < args.streams:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        open_s = round(time.monotonic() - opened_at, 1)
        phase("opened", cycle=cycle, ok=tally.ok, errors=dict(tally.errors), open_s=open_s)
        await wait_line()
        await asyncio.sleep(args.hold)
        phase("held", cycle=cycle, ok=tally.ok, events=tally.events, errors=dict(tally.errors))
        await wait_line()
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result = summary(tally)
        result["cycle"] = cycle
        result["open_s"] = open_s
        cycles.append(result)
        phase("closed", cycle=cycle)
        await wait_line()
    return {"streams": args.streams, "hold_s": args.hold, "cycles": cycles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("streams", "soak"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="streams: seconds each")
    parser.add_argument("--interval-ms", type=float, default=100, help="the backend's interval")
    parser.add_argument("--ramp-per-s", type=float, default=2000.0, help="new streams per second")
    parser.add_argument("--timeout", type=float, default=10.0, help="connect, headers, 1st event")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--hold", type=float, default=10.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = run_streams if args.mode == "streams" else run_soak
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(runner(args))
    else:
        result = uvloop.run(runner(args))
    print("SSE_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
