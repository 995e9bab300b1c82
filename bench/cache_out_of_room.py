"""What readers of a fill that runs out of disk room cost the backend: each reader takes
the rest of the object from the upstream uncached, from its own offset (Range + If-Range),
so N readers cost about 1 + N x (the share not yet sent) of the object, in N + 1 requests.

The cache service (fileproxy/delivery/cache.py) on a tmpfs of its own (root: it mounts
one), the backend (tests/cache_backend.py) in this loop, paced at ``--rate`` MB/s; the
readers start together, and another file takes every free byte of the tmpfs once the
backend has sent ``--at-mib`` MiB. Prints, per count of readers: how many got every byte,
the backend's requests and bytes (x the object).

    .venv/bin/python -m bench.cache_out_of_room [--readers 1,8,40] [--mib 8] [--rate 16]
        [--at-mib 2]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from aiohttp import web

from tests.cache_backend import CacheBackend, Obj, object_bytes
from tests.integration.test_cache import disk_hog
from tests.integration.test_cache_service import Rig
from tests.integration.test_spool import mounted_tmpfs

MIB = 1 << 20


async def once(readers: int, size: int, rate: float, at: int, base: Path) -> str:
    backend = CacheBackend()
    obj = backend.add("/o", Obj(object_bytes(7, size), headers={"Cache-Control": "max-age=60"},
                                rate=rate))  # fmt: skip
    runner = web.AppRunner(backend.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with mounted_tmpfs(base / f"disk-{readers}", f"size={size + 4 * MIB}") as disk:
            rig = Rig(backend, port, disk / "cache")
            try:
                await rig.open(FILEPROXY_CACHE_MAX_SIZE=str(1 << 40))
                tasks = [
                    asyncio.create_task(rig.get("/o", keep_body=False)) for _ in range(readers)
                ]
                while backend.sent["/o"] < at:
                    await asyncio.sleep(0.002)
                with disk_hog(disk):
                    gots = await asyncio.gather(*tasks)
            finally:
                await rig.close()
    finally:
        await runner.cleanup()
    exact = sum(g.aborted is None and g.sha256 == obj.sha256 for g in gots)
    return (
        f"readers={readers} exact={exact} backend_requests={backend.count('/o')} "
        f"backend_bytes={backend.sent['/o'] / size:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", default="1,8,40")
    parser.add_argument("--mib", type=int, default=8)
    parser.add_argument("--rate", type=float, default=16.0, help="MB/s")
    parser.add_argument("--at-mib", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fileproxy-bench-room-") as base:
        for readers in (int(n) for n in args.readers.split(",")):
            line = asyncio.run(
                once(readers, args.mib * MIB, args.rate * 1e6, int(args.at_mib * MIB), Path(base))
            )
            print(line, flush=True)


if __name__ == "__main__":
    main()
