"""A process that uses a CacheStore, for tests/integration/test_cache_store.py.

    python -m tests.cache_store_worker '<json>'

The JSON names the cache directory and what to do; the process prints one JSON line per
event (with ``t``, time.monotonic(): one clock for every process on the host):

- ``fill``: fill ``key`` with ``body(seed, length)`` at ``rate`` bytes/s (0: at once), in
  pieces of ``piece`` bytes: events ``lease``, ``committed`` (each time the committed prefix
  moves), ``filled``; ``busy`` if another fill holds the lease; ``refused``.
- ``fill-or-read``: fill as above; if another process fills it, read it as it is written,
  taking the fill over (``takeover``, from the committed prefix) when its filler dies; the
  bytes read go into one sha256 in order: event ``read`` with ``sha256``, ``bytes``,
  ``first_byte`` (when the first byte was read).
- ``read``: read the object (``read`` event) with ``readers`` readers at once (1); with
  ``hold``, print ``holding`` once open and wait until the file ``hold`` names exists.
- ``range``: read the bytes ``range`` = [start, end) only (``range`` event with ``sha256``).
- ``fills``: fill each key of ``keys`` in turn at once (events ``filled``/``refused``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from fileproxy.cache.manifest import StoredHead
from fileproxy.delivery.cache_store import (
    CacheStore,
    Fill,
    FillBusy,
    FillOrphaned,
    Reader,
    ReservationRefused,
)

HEAD = StoredHead(200, ((b"Content-Type", b"application/octet-stream"), (b"ETag", b'"v1"')))


def body(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), "pid": os.getpid(), **fields}))
    sys.stdout.flush()


async def write_paced(fill: Fill, data: bytes, start: int, rate: float, piece: int) -> None:
    began = time.monotonic()
    committed = fill.committed
    for offset in range(start, len(data), piece):
        await fill.write(offset, data[offset : offset + piece])
        if fill.committed != committed:
            committed = fill.committed
            emit("committed", committed=committed)
        if rate:
            ahead = (offset + piece - start) / rate - (time.monotonic() - began)
            if ahead > 0:
                await asyncio.sleep(ahead)
    await fill.complete()


async def read_following(store: CacheStore, reader: Reader, job: dict[str, Any]) -> None:
    """Every byte once, in order; take the fill over when its filler is gone."""
    data = body(job["seed"], job["length"])
    digest = hashlib.sha256()
    offset = 0
    first_byte = None
    takeover: asyncio.Task[None] | None = None
    try:
        while offset < reader.length:
            try:
                chunk = await reader.read(offset, 1 << 20)
            except FillOrphaned:
                if takeover is None or takeover.done():
                    takeover = asyncio.create_task(take_over(store, data, job))
                await asyncio.sleep(0.02)
                continue
            if first_byte is None:
                first_byte = time.monotonic()
            digest.update(chunk)
            offset += len(chunk)
        if takeover is not None:
            await takeover
    finally:
        if takeover is not None and not takeover.done():
            takeover.cancel()
    emit("read", sha256=digest.hexdigest(), bytes=offset, first_byte=first_byte)


async def take_over(store: CacheStore, data: bytes, job: dict[str, Any]) -> None:
    try:
        async with store.resume(job["key"]) as fill:
            emit("takeover", committed=fill.committed)
            await write_paced(fill, data, fill.committed, job.get("rate", 0), job["piece"])
        emit("filled", sha256=hashlib.sha256(data).hexdigest())
    except FillBusy:
        pass  # another process took it over


async def run(job: dict[str, Any]) -> None:
    job.setdefault("piece", 65536)
    store = CacheStore(
        job["dir"],
        max_size=job.get("max_size", 1 << 30),
        chunk_size=job.get("chunk_size", 1 << 20),
    )
    async with store:
        mode = job["mode"]
        if mode in ("fill", "fill-or-read"):
            data = body(job["seed"], job["length"])
            try:
                async with store.fill(job["key"], HEAD, len(data)) as fill:
                    emit("lease", generation=fill.generation)
                    await write_paced(fill, data, 0, job.get("rate", 0), job["piece"])
                emit("filled", sha256=hashlib.sha256(data).hexdigest())
                return
            except FillBusy:
                emit("busy")
                if mode == "fill":
                    return
            async with store.open_reader(job["key"]) as reader:
                await read_following(store, reader, job)
        elif mode == "read":

            async def one() -> None:
                async with store.open_reader(job["key"]) as reader:
                    emit("opened", generation=reader.generation)
                    if job.get("hold"):
                        emit("holding", generation=reader.generation)
                        while not Path(job["hold"]).exists():
                            await asyncio.sleep(0.02)
                    await read_following(store, reader, job)

            await asyncio.gather(*(one() for _ in range(job.get("readers", 1))))
        elif mode == "range":
            start, end = job["range"]
            async with store.open_reader(job["key"]) as reader:
                emit("opened", generation=reader.generation)
                piece = bytearray()
                while len(piece) < end - start:
                    piece += await reader.read(start + len(piece), end - start - len(piece))
                emit("range", sha256=hashlib.sha256(piece).hexdigest())
        elif mode == "fills":
            for key, seed in job["keys"]:
                data = body(seed, job["length"])
                try:
                    async with store.fill(key, HEAD, len(data)) as fill:
                        await fill.write(0, data)
                        await fill.complete()
                    emit("filled", key=key)
                except ReservationRefused:
                    emit("refused", key=key)
        emit("stats", **(await store.stats()))


if __name__ == "__main__":
    asyncio.run(run(json.loads(sys.argv[1])))
