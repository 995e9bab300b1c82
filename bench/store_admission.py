"""What admission adds to a request: embedded store, Redis, and Redis gone (breaker open).

Starts its own redis-server on a free loopback port (with a password), then times
``UpstreamAdaptation.admit`` with the limit always enforced, one call at a time:
with the embedded store; with the Redis store (one Lua script per request); and
after the redis-server was killed, once the circuit breaker has opened (the
requests are served by the local fallback). Prints p50 / p99 / max per case.

    .venv/bin/python -m bench.store_admission [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime

from bench.procs import free_port
from fileproxy.settings import Settings
from fileproxy.state.adaptation import UpstreamAdaptation
from fileproxy.state.link import StoreLink
from fileproxy.state.redis_store import RedisStore
from fileproxy.state.store import EmbeddedStore, StateStore


async def timed_admits(adaptation: UpstreamAdaptation, calls: int) -> list[float]:
    """Microseconds per admit() call."""
    took = []
    for _ in range(calls):
        started = time.perf_counter()
        await adaptation.admit(time.monotonic())
        took.append((time.perf_counter() - started) * 1e6)
    return took


def adaptation_on(store: StateStore, settings: Settings) -> UpstreamAdaptation:
    return UpstreamAdaptation(settings, "bench:1", StoreLink(store))


def row(case: str, took: list[float]) -> str:
    took = sorted(took)
    p99 = took[int(len(took) * 0.99) - 1]
    return f"| {case} | {statistics.median(took):.1f} | {p99:.1f} | {took[-1]:.1f} |"


async def main(calls: int) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is required: apt-get install -y redis-server")
    password, port = secrets.token_hex(8), free_port()
    env = {
        "FILEPROXY_LIMIT_ENFORCE": "always",
        "FILEPROXY_LIMIT_MIN": "100000",
        "FILEPROXY_LIMIT_INITIAL": "100000",
        "FILEPROXY_LIMIT_MAX": "100000",
        "REDIS_URL": f"redis://:{password}@127.0.0.1:{port}/0",
    }
    settings = Settings.from_env(env)
    rows = []
    rows.append(
        row("embedded store", await timed_admits(adaptation_on(EmbeddedStore(), settings), calls))
    )
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
             "--save", "", "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            store = RedisStore(settings)
            adaptation = adaptation_on(store, settings)
            for _ in range(200):  # until Redis answers
                await adaptation.sync(time.monotonic())
                if adaptation.link.state == "up":
                    break
                await asyncio.sleep(0.05)
            rows.append(
                row("Redis (one Lua script per request)", await timed_admits(adaptation, calls))
            )
            server.kill()
            server.wait()
            while adaptation.link.available:  # the failed ticks that open the breaker
                await adaptation.sync(time.monotonic())
            took = await timed_admits(adaptation, calls)
            assert adaptation.limiter_mode == "fallback"
            rows.append(row("Redis killed, breaker open (local fallback)", took))
            await store.close()
        finally:
            server.kill()
            server.wait()
    print(
        f"admit() with the limit enforced, {calls} calls each, one at a time; "
        f"{platform.node()}, kernel {platform.release()}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
    )
    print("| case | p50 µs | p99 µs | max µs |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    asyncio.run(main(parser.parse_args().calls))
