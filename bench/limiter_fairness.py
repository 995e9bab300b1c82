"""Issue 12.1 replayed: can one client get every other client refused?

Starts a backend (this script, ``backend`` mode: ``/good`` 200, ``/broken`` 500,
``/busy`` 503) and ``fileproxy serve`` (from ``--tree``, default this checkout; each
a subprocess on a free loopback port, stopped by PID), then for ``--seconds``:

- the heavy client (source address 127.0.0.2): 8 loops on ``/broken`` (or ``/busy``
  with ``--bad busy``: an overload signal until issue 20; since then one path's 503s
  while ``/good`` answers are that path's, and the limit is no longer cut);
- the light client (127.0.0.3): 2 loops on ``/good`` (``--light-pace``: seconds
  between a loop's requests; 0, the default, as fast as it can);

then 100 sequential ``/good`` requests right after, then no traffic at all while
``/stats`` is polled until the limit is no longer enforced (at most ``--quiet`` s).
Prints the status counts of each phase (the proxy's refusals are 429:
FILEPROXY_LIMIT_STATUS=429), the limit, and the seconds until the cut wore off.
Run it against main with ``--tree /path/to/main/checkout``.

    .venv/bin/python -m bench.limiter_fairness [--bad broken|busy] [--light-pace S] [--tree DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.procs import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def run_backend(port: int) -> None:
    async def good(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="broken")

    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    app = web.Application()
    app.router.add_get("/good", good)
    app.router.add_get("/broken", broken)
    app.router.add_get("/busy", busy)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def client(source: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(source, 0), limit=0),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def loop(
    session: aiohttp.ClientSession, url: str, until: float, seen: Counter[int], pace: float = 0.0
) -> None:
    while time.monotonic() < until:
        async with session.get(url) as resp:
            await resp.read()
            seen[resp.status] += 1
        if pace:
            await asyncio.sleep(pace)


async def limiter(session: aiohttp.ClientSession, base: str) -> dict:  # type: ignore[type-arg]
    async with session.get(f"{base}/stats") as resp:
        stats = await resp.json()
    (upstream,) = stats["upstreams"].values()
    return upstream["limiter"]  # type: ignore[no-any-return]


async def scenario(base: str, bad: str, seconds: float, quiet: float, pace: float) -> None:
    heavy_seen: Counter[int] = Counter()
    light_seen: Counter[int] = Counter()
    after_seen: Counter[int] = Counter()
    async with (
        client("127.0.0.2") as heavy,
        client("127.0.0.3") as light,
        client("127.0.0.1") as admin,  # /stats is for operators (FILEPROXY_ADMIN_ALLOW)
    ):
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(loop(heavy, f"{base}/{bad}", until, heavy_seen) for _ in range(8)),
            *(loop(light, f"{base}/good", until, light_seen, pace) for _ in range(2)),
        )
        for _ in range(100):
            async with light.get(f"{base}/good") as resp:
                await resp.read()
                after_seen[resp.status] += 1
        state = await limiter(admin, base)
        print(f"heavy 8 loops /{bad}: {dict(sorted(heavy_seen.items()))}")
        paced = f", {pace:g} s apart" if pace else ""
        print(f"light 2 loops /good{paced}: {dict(sorted(light_seen.items()))}")
        print(f"100 /good right after: {dict(sorted(after_seen.items()))}")
        print(f"limit {state['limit']} enforcing {state['enforcing']}")
        started = time.monotonic()
        while state["enforcing"] and time.monotonic() - started < quiet:
            await asyncio.sleep(0.5)
            state = await limiter(admin, base)
        waited = time.monotonic() - started
        if state["enforcing"]:
            print(f"no traffic: still enforcing at limit {state['limit']} after {waited:.0f} s")
        else:
            print(f"no traffic: enforcement ended after {waited:.1f} s (limit {state['limit']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bad", choices=["broken", "busy"], default="broken")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--light-pace", type=float, default=0.0, help="s between light requests")
    parser.add_argument("--quiet", type=float, default=90.0, help="longest wait without traffic")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose fileproxy runs")
    args = parser.parse_args()
    backend_port, proxy_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEPROXY_", "REDIS_"))}
    env.update(
        FILEPROXY_BIND=f"127.0.0.1:{proxy_port}",
        FILEPROXY_UPSTREAM=f"http://127.0.0.1:{backend_port}",
        FILEPROXY_CACHE="off",  # the relay: the limiter sees every request
        FILEPROXY_ACCESS_LOG="off",
        FILEPROXY_LIMIT_STATUS="429",  # the proxy's refusals, told apart from the backend's 503
    )
    with tempfile.TemporaryFile() as log:
        backend = subprocess.Popen(
            [sys.executable, "-m", "bench.limiter_fairness", "backend", str(backend_port)],
            cwd=ROOT,
        )
        proxy = subprocess.Popen(
            [sys.executable, "-m", "fileproxy", "serve"],
            cwd=args.tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(backend_port)
            wait_for_port(proxy_port)
            print(
                f"# {datetime.now(UTC):%Y-%m-%d} {platform.node()} {os.cpu_count()} cores, "
                f"fileproxy from {args.tree}"
            )
            asyncio.run(
                scenario(
                    f"http://127.0.0.1:{proxy_port}",
                    args.bad,
                    args.seconds,
                    args.quiet,
                    args.light_pace,
                )
            )
        finally:
            for process in (proxy, backend):
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["backend"]:
        run_backend(int(sys.argv[2]))
    else:
        main()
