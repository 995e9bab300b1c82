"""The cache's storage engine through its API, against plain file I/O; and how fast a reader
in another process learns of new bytes.

- write: one object of ``--mib`` MiB written in 256 KiB pieces through ``Fill.write`` (the
  store commits every 4 MiB chunk: ``fdatasync`` of the body, then one SQLite row), with
  ``durable=False`` (no ``fdatasync``: the SQLite commit alone), and plain ``os.pwrite`` on
  the same thread pool with and without an ``fdatasync`` every 4 MiB. MiB/s (median of
  ``--runs``) and the process's CPU per GiB; the commit's own time per chunk (p50/p99).
- read: the same object read back in 1 MiB pieces through ``Reader.read`` and with plain
  ``os.pread`` on a thread (page cache warm in both).
- wake-up: a reader in another process follows a fill that writes 64 KiB every 10-50 ms
  (random, so writes do not fall in step with the polls): the time from a write to the
  moment that reader's ``wait_for`` returns the new bytes, per poll interval
  (``--polls``), and the CPU that reader burns while a fill stalls (3 s without a write:
  polls plus a lease probe every 0.25 s); then ``--herd`` readers in one process at the
  default interval (they share one poll). The same latency for a reader in the filling
  process (woken by the fill directly) for reference.

    .venv/bin/python -m bench.cache_store [--mib 256] [--runs 3] [--polls 0.005,0.02,0.05]
        [--herd 20] [--dir DIR] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import os
import platform
import random
import resource
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.cache_eviction import cpu_model
from fileproxy.cache.manifest import StoredHead
from fileproxy.delivery import cache_store
from fileproxy.delivery.cache_store import DEFAULT_CHUNK_SIZE, CacheStore, Fill

MIB = 1 << 20
PIECE = 256 * 1024
READ_PIECE = MIB
HEAD = StoredHead(200, ((b"Content-Type", b"application/octet-stream"),))
WAKE_PIECE = 64 * 1024
WAKE_PIECES = 150
STALL_S = 3.0


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(fn: Callable[[], Awaitable[None]], mib: int) -> tuple[float, float]:
    """(MiB/s, CPU s per GiB) of one run."""
    cpu, wall = cpu_s(), time.perf_counter()
    await fn()
    wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
    return mib / wall, cpu / (mib / 1024)


# ---------------------------------------------------------------- write and read


async def store_write(directory: Path, data: bytes, durable: bool) -> None:
    store = CacheStore(directory, max_size=1 << 40, durable=durable)
    async with store, store.fill("/bench", HEAD, len(data)) as fill:
        view = memoryview(data)
        for offset in range(0, len(data), PIECE):
            await fill.write(offset, view[offset : offset + PIECE])
        await fill.complete()


async def plain_write(path: Path, data: bytes, sync_every: int | None) -> None:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            for offset in range(0, len(data), PIECE):
                await loop.run_in_executor(
                    pool, os.pwrite, fd, view[offset : offset + PIECE], offset
                )
                if sync_every and (offset + PIECE) % sync_every == 0:
                    await loop.run_in_executor(pool, os.fdatasync, fd)
        finally:
            os.close(fd)


async def store_read(directory: Path) -> None:
    store = CacheStore(directory, max_size=1 << 40)
    async with store, store.open_reader("/bench") as reader:
        offset = 0
        while offset < reader.length:
            offset += len(await reader.read(offset, READ_PIECE))


async def plain_read(path: Path) -> None:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        fd = os.open(path, os.O_RDONLY)
        try:
            size, offset = os.fstat(fd).st_size, 0
            while offset < size:
                offset += len(await loop.run_in_executor(pool, os.pread, fd, READ_PIECE, offset))
        finally:
            os.close(fd)


async def throughput(args: argparse.Namespace, base: Path) -> tuple[list[str], list[str]]:
    data = os.urandom(args.mib * MIB)
    commits: list[float] = []
    original = Fill._commit_sync

    def commit_timed(self: Fill, *a: Any) -> None:
        began = time.perf_counter()
        original(self, *a)
        commits.append(time.perf_counter() - began)

    writes: dict[str, list[tuple[float, float]]] = {}
    reads: dict[str, list[tuple[float, float]]] = {}
    commit_times: dict[str, list[float]] = {"durable": [], "no fdatasync": []}
    Fill._commit_sync = commit_timed  # type: ignore[method-assign,assignment]
    try:
        for _ in range(args.runs):
            for name, durable in (("durable", True), ("no fdatasync", False)):
                directory = base / f"store-{name}"
                commits.clear()
                writes.setdefault(f"store, {name}", []).append(
                    await timed(functools.partial(store_write, directory, data, durable), args.mib)
                )
                commit_times[name] += commits
                if durable:
                    reads.setdefault("store Reader.read", []).append(
                        await timed(functools.partial(store_read, directory), args.mib)
                    )
                shutil.rmtree(directory)
            for name, every in (("fdatasync every 4 MiB", DEFAULT_CHUNK_SIZE), ("no fsync", None)):
                path = base / "plain.bin"
                writes.setdefault(f"plain pwrite, {name}", []).append(
                    await timed(functools.partial(plain_write, path, data, every), args.mib)
                )
                if every:
                    reads.setdefault("plain pread", []).append(
                        await timed(functools.partial(plain_read, path), args.mib)
                    )
                path.unlink()
    finally:
        Fill._commit_sync = original  # type: ignore[method-assign]

    def rows(results: dict[str, list[tuple[float, float]]]) -> list[str]:
        out = []
        for name, runs in results.items():
            speeds = [s for s, _ in runs]
            out.append(
                f"| {name} | {statistics.median(speeds):,.0f} | {min(speeds):,.0f}-"
                f"{max(speeds):,.0f} | {statistics.median(c for _, c in runs):.2f} |"
            )
        return out

    head = ["| path | MiB/s (median) | min-max | CPU s/GiB |", "|---|---:|---:|---:|"]
    lines = ["## Write", "", *head, *rows(writes), ""]
    lines += ["Commit per 4 MiB chunk (fdatasync of the body, then the index row):", ""]
    lines += ["| store | commits | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, times in commit_times.items():
        ms = [1000 * t for t in times]
        lines.append(
            f"| {name} | {len(ms)} | {pct(ms, 0.5):.2f} | {pct(ms, 0.99):.2f} | {max(ms):.2f} |"
        )
    lines += ["", "## Read (page cache warm)", "", *head, *rows(reads), ""]
    return lines, []


# ---------------------------------------------------------------- wake-up across processes


async def follow(directory: str, poll: float, readers: int) -> None:
    """The child: ``readers`` readers follow /wake; when each byte count became readable to
    each, and the CPU the process spent while they all wait on a stalled fill."""
    cache_store.POLL_S = poll
    seen: list[list[tuple[int, float]]] = [[] for _ in range(readers)]
    stall_at = WAKE_PIECES * WAKE_PIECE
    arrived = asyncio.Semaphore(0)
    store = CacheStore(directory, max_size=1 << 40)

    async def one(log: list[tuple[int, float]]) -> None:
        async with store.open_reader("/wake") as reader:
            arrived.release()
            offset = 0
            while offset < stall_at:
                offset = await reader.wait_for(offset)
                log.append((offset, time.monotonic()))
            arrived.release()
            await reader.wait_for(offset)  # the fill stalls here

    async with store:
        tasks = [asyncio.create_task(one(log)) for log in seen]
        for _ in range(readers):
            await arrived.acquire()
        print(json.dumps({"opened": True}), flush=True)
        for _ in range(readers):
            await arrived.acquire()
        cpu, wall = cpu_s(), time.monotonic()
        await asyncio.gather(*tasks)
        stalled_cpu, stalled_wall = cpu_s() - cpu, time.monotonic() - wall
    print(json.dumps({"seen": seen, "stall_cpu": stalled_cpu, "stall_wall": stalled_wall}))


async def wake(poll: float | None, base: Path, readers: int = 1) -> dict[str, Any]:
    """One fill here; followers in another process (``poll``) or one in this one (None)."""
    directory = base / f"wake-{poll}-{readers}"
    length = (WAKE_PIECES + 1) * WAKE_PIECE
    data = os.urandom(length)
    written: list[tuple[int, float]] = []
    rng = random.Random(1)
    store = CacheStore(directory, max_size=1 << 40)
    async with store, store.fill("/wake", HEAD, length) as fill:
        if poll is not None:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.cache_store",
                    "--follow",
                    str(directory),
                    str(poll),
                    str(readers),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            await asyncio.to_thread(child.stdout.readline)
            result: dict[str, Any] = {}
        else:
            local: list[tuple[int, float]] = []

            async def follow_here() -> None:
                async with store.open_reader("/wake") as reader:
                    offset = 0
                    while offset < WAKE_PIECES * WAKE_PIECE:
                        offset = await reader.wait_for(offset)
                        local.append((offset, time.monotonic()))

            task = asyncio.create_task(follow_here())
        await asyncio.sleep(0.3)
        for n in range(WAKE_PIECES):
            await fill.write(n * WAKE_PIECE, data[n * WAKE_PIECE : (n + 1) * WAKE_PIECE])
            written.append(((n + 1) * WAKE_PIECE, time.monotonic()))
            await asyncio.sleep(rng.uniform(0.01, 0.05))
        if poll is None:
            await task
            seen = local
        else:
            await asyncio.sleep(STALL_S)
        await fill.write(WAKE_PIECES * WAKE_PIECE, data[WAKE_PIECES * WAKE_PIECE :])
        await fill.complete()
    if poll is not None:
        out, _ = await asyncio.to_thread(child.communicate, timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
        logs = [[(int(o), float(t)) for o, t in log] for log in result["seen"]]
    else:
        logs = [seen]
    latencies = []
    for log in logs:
        for end, at in written:
            woke = next(t for o, t in log if o >= end)
            latencies.append(max(0.0, woke - at) * 1000)
    shutil.rmtree(directory)
    return {
        "p50": pct(latencies, 0.5),
        "p99": pct(latencies, 0.99),
        "max": max(latencies),
        "stall_cpu_pct": 100 * result["stall_cpu"] / result["stall_wall"] if poll else None,
    }


async def wakeups(args: argparse.Namespace, base: Path) -> list[str]:
    lines = [
        "## Wake-up of a reader",
        "",
        f"A fill writes {WAKE_PIECES} pieces of 64 KiB, 10-50 ms apart; latency from each write "
        "to the reader's `wait_for` returning it. CPU: the reader process while the fill "
        f"stalls {STALL_S:.0f} s.",
        "",
        "| reader | poll interval | p50 ms | p99 ms | max ms | CPU while stalled |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    local = await wake(None, base)
    lines.append(
        f"| same process (woken by the fill) | - | {local['p50']:.2f} | {local['p99']:.2f} "
        f"| {local['max']:.2f} | - |"
    )
    runs = [(poll, 1) for poll in args.polls] + [(cache_store.POLL_S, args.herd)]
    for poll, readers in runs:
        r = await wake(poll, base, readers)
        who = "other process" if readers == 1 else f"other process, {readers} readers"
        lines.append(
            f"| {who} | {poll * 1000:.0f} ms | {r['p50']:.2f} | {r['p99']:.2f} "
            f"| {r['max']:.2f} | {r['stall_cpu_pct']:.2f}% of a core |"
        )
    lines.append("")
    return lines


def filesystem(path: Path) -> str:
    done = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "?"


async def run(args: argparse.Namespace, argv: Sequence[str]) -> str:
    base = Path(tempfile.mkdtemp(prefix="bench-cache-store-", dir=args.dir))
    try:
        lines = [
            "# Cache store: the engine's API against plain file I/O; reader wake-up",
            "",
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}; "
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; "
            f"directory on {filesystem(base)}",
            f"- command: `{shlex.join(['.venv/bin/python', '-m', 'bench.cache_store', *argv])}`",
            f"- object {args.mib} MiB in 256 KiB writes, 1 MiB reads; chunk "
            f"{DEFAULT_CHUNK_SIZE // MIB} MiB; {args.runs} runs, alternating",
            "",
        ]
        written, _ = await throughput(args, base)
        lines += written
        lines += await wakeups(args, base)
        return "\n".join(lines)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def parse_floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--follow"]:
        asyncio.run(follow(argv[1], float(argv[2]), int(argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--polls", type=parse_floats, default=[0.005, 0.02, 0.05])
    parser.add_argument("--herd", type=int, default=20, help="readers in one process")
    parser.add_argument("--dir", help="where the cache directories go (default: the temp dir)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    text = asyncio.run(run(args, argv))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
