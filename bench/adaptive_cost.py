"""CPU cost of the adaptive engine per request, as a share of one core at 1,000 req/s.

Drives one upstream's UpstreamAdaptation exactly as the proxy handler does for
each request (admission, profile, headers observation with a real TCP_INFO read
from a live loopback socket, outcome), and as the background sync does every
100 ms (the window tick, and the decision when it is due) with the embedded
store, for N simulated requests spread over N / 1000 seconds of simulated time,
and divides the CPU time used by the simulated duration. ``--enforcing`` makes
every request go through the GCRA as well (the limit is always enforced).

    .venv/bin/python -m bench.adaptive_cost [--requests 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import time

from fileproxy.exchange import Exchange
from fileproxy.settings import Settings
from fileproxy.state.adaptation import UpstreamAdaptation
from fileproxy.state.link import StoreLink
from fileproxy.state.store import EmbeddedStore
from fileproxy.upstream.tcp_info import read_tcp_info

RATE = 1000.0  # req/s


async def run(requests: int, enforcing: bool) -> float:
    """CPU seconds for ``requests`` simulated requests."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    client.sendall(b"x" * 4096)
    server.recv(4096)

    env = (
        {"FILEPROXY_LIMIT_ENFORCE": "always", "FILEPROXY_LIMIT_MAX": "100000"} if enforcing else {}
    )
    clock = [0.0]
    store = EmbeddedStore(clock=lambda: clock[0])
    adaptation = UpstreamAdaptation(Settings.from_env(env), "u:1", StoreLink(store))
    rng = random.Random(1)
    sync_every = int(RATE / 10)
    started = time.process_time()
    for i in range(requests):
        now = clock[0] = i / RATE
        if i % sync_every == 0:
            await adaptation.sync(now)
        await adaptation.admit(now)
        adaptation.profile(now)
        ttfb = 0.02 + rng.random() * 0.004
        adaptation.observe_headers(now + ttfb, ttfb, lambda: read_tcp_info(client))
        exchange = Exchange("r", "u", upstream_status=200, ttfb_s=ttfb)
        adaptation.observe_exchange(now + ttfb, exchange)
    cpu = time.process_time() - started
    for sock in (client, server, listener):
        sock.close()
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--enforcing", action="store_true")
    args = parser.parse_args()
    cpu = asyncio.run(run(args.requests, args.enforcing))
    simulated = args.requests / RATE
    per_request_us = cpu / args.requests * 1e6
    print(
        f"{args.requests} requests{' (limit enforced)' if args.enforcing else ''}, "
        f"{per_request_us:.1f} µs CPU each: "
        f"{cpu / simulated * 100:.2f}% of one core at {RATE:.0f} req/s"
    )


if __name__ == "__main__":
    main()
