"""The cache's I/O service (fileproxy/delivery/cache.py) as a data plane drives it, without
HTTP on the client side: what the backend sends and how soon every waiter gets bytes.

The backend is ``tests/cache_backend.py`` in a process of its own on a loopback port (it
counts the body bytes it sends); the fetch is the proxy's ``UpstreamClient``; the cache
directory is on the temp dir's filesystem; one event loop (uvloop) runs the service and
its readers, as one worker would.

- herd: ``--herd`` requests at once for one cold object of ``--herd-mib`` MiB, the backend
  paced at ``--rate`` MB/s: backend bytes (x the object), first byte p50/p99/max over the
  waiters, and when the last reader finished against when the fill ended.
- cold range: 1 MiB near the end of a cold ``--range-mib`` MiB object at the same pace:
  the time to the whole 206 body, and the backend's bytes.
- hits: ``--seconds`` of back-to-back requests (``--concurrency`` at once) for a stored
  1 KiB and a stored 1 MiB object: requests/s and MiB/s, the copying path (blocks) and
  the runs path (``(fd, offset, count)``, here read with ``os.pread``: what sendfile gets).

    .venv/bin/python -m bench.cache_service [--rate 16] [--herd 40] [--herd-mib 64]
        [--range-mib 256] [--seconds 3] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fileproxy.delivery.cache import CacheService
from fileproxy.runtime import new_event_loop
from fileproxy.upstream.client import UpstreamClient
from tests.cache_service_worker import cache_settings, get

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
FRESH = {"Cache-Control": "max-age=3600"}


class BackendProcess:
    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cache_backend", str(self.port), json.dumps(objects)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = json.loads(self.process.stdout.readline())
        assert line["event"] == "listening", line

    def sent(self) -> dict[str, int]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        sent: dict[str, int] = json.loads(self.process.stdout.readline())["sent"]
        return sent

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def herd(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    size = args.herd_mib * MIB
    backend = BackendProcess(
        {"/herd": {"seed": 1, "length": size, "rate": args.rate * 1e6, "headers": FRESH}}
    )
    try:
        settings = cache_settings(directory, f"http://127.0.0.1:{backend.port}")
        client = UpstreamClient(settings)
        async with CacheService(settings) as cache:
            began = time.monotonic()
            gots = await asyncio.gather(
                *(get(cache, client, "/herd", keep_body=False) for _ in range(args.herd))
            )
            last_done = time.monotonic() - began
            ok = len({g.sha256 for g in gots}) == 1
            ok = ok and all(g.size == size and g.aborted is None for g in gots)
        await client.close()
        firsts = [g.first_byte or float("nan") for g in gots]
        sent = backend.sent()["/herd"]
    finally:
        backend.stop()
    return {
        "waiters": args.herd,
        "object_mib": args.herd_mib,
        "byte_exact": ok,
        "backend_x": round(sent / size, 3),
        "first_byte_p50_s": round(pct(firsts, 0.5), 3),
        "first_byte_p99_s": round(pct(firsts, 0.99), 3),
        "first_byte_max_s": round(max(firsts), 3),
        "last_done_s": round(last_done, 2),
        "object_at_rate_s": round(size / (args.rate * 1e6), 2),
    }


async def cold_range(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    size = args.range_mib * MIB
    backend = BackendProcess(
        {"/big": {"seed": 2, "length": size, "rate": args.rate * 1e6, "headers": FRESH}}
    )
    try:
        settings = cache_settings(directory, f"http://127.0.0.1:{backend.port}")
        client = UpstreamClient(settings)
        async with CacheService(settings) as cache:
            start = size - 2 * MIB
            began = time.monotonic()
            got = await get(cache, client, "/big", [("Range", f"bytes={start}-{start + MIB - 1}")])
            took = time.monotonic() - began
            while cache._tasks:  # the covering chunk's fill, to its end
                await asyncio.sleep(0.05)
        await client.close()
        sent = backend.sent()["/big"]
    finally:
        backend.stop()
    return {
        "object_mib": args.range_mib,
        "status": got.status,
        "bytes": len(got.body),
        "seconds_to_206_body": round(took, 3),
        "backend_mib": round(sent / MIB, 2),
    }


async def hits(args: argparse.Namespace, directory: str) -> list[dict[str, Any]]:
    objects = {
        "/1k": {"seed": 3, "length": 1024, "headers": FRESH},
        "/1m": {"seed": 4, "length": MIB, "headers": FRESH},
    }
    backend = BackendProcess(objects)
    rows = []
    try:
        settings = cache_settings(directory, f"http://127.0.0.1:{backend.port}")
        client = UpstreamClient(settings)
        async with CacheService(settings) as cache:
            for target in objects:
                await get(cache, client, target)  # the miss that stores it
                await asyncio.sleep(0.2)
                for zero_copy in (False, True):
                    count = 0
                    received = 0
                    deadline = time.monotonic() + args.seconds
                    cpu = time.process_time()
                    began = time.monotonic()

                    async def loop(
                        zero_copy: bool = zero_copy,
                        target: str = target,
                        deadline: float = deadline,
                    ) -> None:
                        nonlocal count, received
                        while time.monotonic() < deadline:
                            got = await get(cache, client, target, zero_copy=zero_copy)
                            assert got.word == "hit", got.cache_status
                            count += 1
                            received += len(got.body)

                    await asyncio.gather(*(loop() for _ in range(args.concurrency)))
                    elapsed = time.monotonic() - began
                    cpu = time.process_time() - cpu
                    rows.append(
                        {
                            "object": target,
                            "path": "runs (fd, offset, count)" if zero_copy else "blocks",
                            "req_per_s": round(count / elapsed),
                            "mib_per_s": round(received / MIB / elapsed, 1),
                            "cpu_ms_per_req": round(cpu * 1000 / max(count, 1), 3),
                        }
                    )
        await client.close()
        assert backend.sent()["/1k"] == 1024
    finally:
        backend.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        herd_row = await herd(args, os.path.join(tmp, "herd"))
        range_row = await cold_range(args, os.path.join(tmp, "range"))
        hit_rows = await hits(args, os.path.join(tmp, "hits"))
    print(f"# bench.cache_service ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print("## herd\n\n" + table([herd_row]) + "\n")
    print("## cold far range\n\n" + table([range_row]) + "\n")
    print("## hits\n\n" + table(hit_rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=16.0, help="backend MB/s")
    parser.add_argument("--herd", type=int, default=40)
    parser.add_argument("--herd-mib", type=int, default=64)
    parser.add_argument("--range-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    loop = new_event_loop()
    try:
        loop.run_until_complete(main(parser.parse_args()))
    finally:
        loop.close()
