"""The cache's storage engine with real processes on one cache directory.

Children are ``python -m tests.cache_store_worker`` processes (each its own CacheStore, as
gunicorn workers or two ``fileproxy serve`` would be); bodies are ``body(seed, length)``
so every process knows the bytes and their sha256. Chunks are 1 MiB here (4 MiB by
default) so that objects of a few MiB span several chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fileproxy.cache.manifest import StoredHead
from fileproxy.delivery.cache_store import (
    CacheStore,
    FillAbandoned,
    FillBusy,
    FillOrphaned,
    NotStored,
    ReservationRefused,
    StoreFull,
)
from tests.cache_store_worker import HEAD, body
from tests.conftest import ROOT
from tests.integration.test_spool import mounted_tmpfs

MIB = 1 << 20
CHUNK = MIB


class Worker:
    """A child process of tests.cache_store_worker; its events read from its stdout."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.cache_store_worker", json.dumps(job)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._lock:
                self.events.append(json.loads(line))
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [event for event in self.events if event["event"] == name]

    def wait_for(self, name: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for event in self.events:
                    if event["event"] == name and all(
                        event.get(k, None) is not None and event[k] >= v for k, v in match.items()
                    ):
                        return event
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"exited {self.popen.returncode} before {name}: {self}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {name} {match} after {timeout}s: {self}")
                self._lock.wait(0.1)

    def finish(self, timeout: float = 60.0) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def __repr__(self) -> str:
        stderr = b""
        if self.popen.poll() is not None and self.popen.stderr is not None:
            stderr = self.popen.stderr.read()
        return f"<worker {self.popen.pid} events={self.events} stderr={stderr[-2000:]!r}>"


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.kill()


def start(workers: list[Worker], **job: Any) -> Worker:
    worker = Worker(job)
    workers.append(worker)
    return worker


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def body_bytes(directory: Path) -> int:
    """Disk blocks of the bodies (what the budget bounds; the index is metadata)."""
    total = 0
    for entry in os.scandir(directory / "objects"):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_blocks * 512
    return total


async def read_all(store: CacheStore, key: str, variant: bytes = b"") -> bytes:
    async with store.open_reader(key, variant) as reader:
        return await read_to_end(reader)


async def read_to_end(reader: Any) -> bytes:
    out = bytearray()
    while len(out) < reader.length:
        out += await reader.read(len(out), MIB)
    return bytes(out)


# ---------------------------------------------------------------- one fill per object per host


@pytest.mark.timeout(90)
def test_two_processes_on_one_key_fill_it_once_and_the_other_reads_as_it_is_written(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    length = 8 * MIB
    job = {"dir": str(tmp_dir / "cache"), "key": "/big", "seed": 1, "length": length}
    # 2 MiB/s: the fill takes ~4 s, long enough for the second process to join it
    first = start(workers, mode="fill-or-read", rate=2 * MIB, **job)
    first.wait_for("lease")
    second = start(workers, mode="fill-or-read", rate=2 * MIB, **job)
    assert first.finish() == 0, first
    assert second.finish() == 0, second
    expected = sha(body(1, length))
    filled = first.named("filled") + second.named("filled")
    assert len(filled) == 1, (first, second)
    assert second.named("busy"), second
    (read,) = second.named("read")
    assert read["sha256"] == expected and read["bytes"] == length
    # the reader had its first byte long before the fill ended: it followed the fill
    assert read["first_byte"] < filled[0]["t"] - 1.0, (read, filled)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_9_of_the_filler_another_process_takes_over_every_byte_once(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    length = 12 * MIB
    job = {"dir": str(tmp_dir / "cache"), "key": "/big", "seed": 2, "length": length}
    filler = start(workers, mode="fill", rate=4 * MIB, **job)
    filler.wait_for("lease")
    follower = start(workers, mode="fill-or-read", rate=8 * MIB, **job)
    follower.wait_for("busy")
    filler.wait_for("committed", committed=3 * MIB)
    filler.kill()
    assert follower.finish(90) == 0, follower
    (takeover,) = follower.named("takeover")
    assert takeover["committed"] >= 3 * MIB and takeover["committed"] % CHUNK == 0
    (read,) = follower.named("read")
    assert read["bytes"] == length and read["sha256"] == sha(body(2, length)), read
    assert follower.named("filled")

    async def check() -> None:
        async with CacheStore(tmp_dir / "cache", max_size=1 << 30, chunk_size=CHUNK) as store:
            (stored,) = await store.variants("/big")
            assert stored.complete and stored.length == length
            assert sha(await read_all(store, "/big")) == sha(body(2, length))

    asyncio.run(check())


@pytest.mark.timeout(120)
def test_after_a_restart_a_complete_object_is_found_and_a_killed_fill_is_resumable_never_complete(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    cache = str(tmp_dir / "cache")
    whole = start(workers, mode="fill", dir=cache, key="/whole", seed=3, length=3 * MIB)
    assert whole.finish() == 0, whole
    half = start(workers, mode="fill", dir=cache, key="/half", seed=4, length=8 * MIB, rate=4 * MIB)
    half.wait_for("committed", committed=2 * MIB)
    half.kill()
    data = body(4, 8 * MIB)

    async def check() -> None:
        async with CacheStore(cache, max_size=1 << 30, chunk_size=CHUNK) as store:
            (stored,) = await store.variants("/whole")
            assert stored.complete
            assert sha(await read_all(store, "/whole")) == sha(body(3, 3 * MIB))
            (partial,) = await store.variants("/half")
            assert not partial.complete
            committed = partial.committed
            assert committed >= 2 * MIB and committed % CHUNK == 0
            assert list(partial.chunks.present()) == list(range(committed // CHUNK))
            async with store.open_reader("/half") as reader:
                assert not reader.complete
                assert await reader.wait_for(0) >= committed
                assert await reader.read(0, committed) == data[:committed]
                with pytest.raises(FillOrphaned) as orphaned:
                    await asyncio.wait_for(reader.wait_for(committed), 10)
                assert orphaned.value.committed == committed
            async with store.resume("/half") as fill:
                assert fill.committed == committed and fill.head == HEAD
                assert fill.missing() == [(committed, 8 * MIB)]
                with pytest.raises(FillBusy):
                    async with store.resume("/half"):
                        pass
                await fill.write(committed, data[committed:])
                await fill.complete()
            assert sha(await read_all(store, "/half")) == sha(data)

    asyncio.run(check())


async def test_a_fill_that_fails_leaves_nothing_and_its_readers_abort(tmp_dir: Path) -> None:
    async with CacheStore(tmp_dir / "cache", max_size=1 << 30, chunk_size=CHUNK) as store:
        data = body(5, 3 * MIB)
        outcome: list[BaseException] = []

        async def follow() -> None:
            async with store.open_reader("/x") as reader:
                try:
                    await read_to_end(reader)
                except FillAbandoned as error:
                    outcome.append(error)

        with pytest.raises(ConnectionResetError):
            async with store.fill("/x", HEAD, len(data)) as fill:
                task = asyncio.create_task(follow())
                await fill.write(0, data[: 2 * MIB])  # two chunks committed
                await asyncio.sleep(0.1)
                raise ConnectionResetError("the upstream went away")
        await task
        assert len(outcome) == 1
        assert await store.variants("/x") == []
        assert os.listdir(tmp_dir / "cache" / "objects") == []
        with pytest.raises(NotStored):
            await read_all(store, "/x")
        # leaving without complete() abandons too: nothing partial is ever complete
        async with store.fill("/x", HEAD, len(data)) as fill:
            await fill.write(0, data)
        assert await store.variants("/x") == []
        stats = await store.stats()
        assert stats["fills_abandoned"] == 2 and stats["objects"] == 0


@pytest.mark.timeout(90)
async def test_a_herd_of_readers_in_another_process_follows_one_fill_byte_exact(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    """20 readers in one process share the polling of the fill's record; each gets every
    byte once, in order."""
    cache = tmp_dir / "cache"
    length = 6 * MIB
    data = body(14, length)
    job = {"dir": str(cache), "key": "/herd", "seed": 14, "length": length}
    async with CacheStore(cache, max_size=1 << 30, chunk_size=CHUNK) as store:
        async with store.fill("/herd", HEAD, length) as fill:
            herd = start(workers, mode="read", readers=20, **job)
            await asyncio.to_thread(herd.wait_for, "opened")
            for offset in range(0, length, 128 * 1024):
                await fill.write(offset, data[offset : offset + 128 * 1024])
                await asyncio.sleep(0.005)
            await fill.complete()
        assert await asyncio.to_thread(herd.finish) == 0, herd
    reads = herd.named("read")
    assert len(reads) == 20
    assert all(r["sha256"] == sha(data) and r["bytes"] == length for r in reads), reads


@pytest.mark.timeout(90)
async def test_a_range_far_into_a_cold_object_is_filled_chunk_first_and_kept_for_later(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    cache = tmp_dir / "cache"
    length = 10 * MIB + 12345
    data = body(15, length)
    wanted = (9 * MIB + 100, 9 * MIB + 100 + 64 * 1024)
    job = {"dir": str(cache), "key": "/far", "seed": 15, "length": length}
    async with CacheStore(cache, max_size=1 << 30, chunk_size=CHUNK) as store:
        async with store.fill("/far", HEAD, length) as fill:
            ranged = start(workers, mode="range", range=wanted, **job)
            await asyncio.to_thread(ranged.wait_for, "opened")
            assert fill.missing(*wanted) == [(9 * MIB, 10 * MIB)]
            await fill.write(9 * MIB, data[9 * MIB : 10 * MIB])  # its chunk, committed
            got = await asyncio.to_thread(ranged.wait_for, "range")
            assert got["sha256"] == sha(data[wanted[0] : wanted[1]])
            assert fill.written == 0  # nothing of the prefix yet
            fill.pause()
        assert await asyncio.to_thread(ranged.finish) == 0, ranged
        (partial,) = await store.variants("/far")
        assert not partial.complete and list(partial.chunks.present()) == [9]
        stats = await store.stats()
        assert stats["bytes_on_disk"] == MIB and stats["bytes_reserved"] == length
        async with store.resume("/far") as fill:
            assert fill.missing() == [(0, 9 * MIB), (10 * MIB, length)]
            await fill.write(0, data[: 9 * MIB])
            await fill.write(10 * MIB, data[10 * MIB :])
            await fill.complete()
        assert sha(await read_all(store, "/far")) == sha(data)


async def test_a_304_merge_replaces_the_stored_head_losslessly(tmp_dir: Path) -> None:
    async with CacheStore(tmp_dir / "cache", max_size=1 << 30, chunk_size=CHUNK) as store:
        async with store.fill("/h", HEAD, 3, variant=b"br") as fill:
            await fill.write(0, b"abc")
            await fill.complete()
        merged = StoredHead(200, ((b"ETag", b'"v2"'), (b"X-Raw", b"\xff\x00\x80")), 10.0, 11.0)
        assert await store.update_head("/h", b"br", merged)
        assert not await store.update_head("/h", b"gzip", merged)
        (stored,) = await store.variants("/h")
        assert stored.head == merged and stored.variant == b"br"
        async with store.open_reader("/h", b"br") as reader:
            assert reader.head == merged


# ---------------------------------------------------------------- the budget


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_budget_of_three_objects_and_a_dozen_fills_never_above_it_readers_keep_theirs(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    cache = tmp_dir / "cache"
    length = 2 * MIB
    budget = 3 * length
    common = {"dir": str(cache), "length": length, "max_size": budget}
    first = start(workers, mode="fills", keys=[["/k0", 100]], **common)
    assert first.finish() == 0 and first.named("filled"), first
    release = tmp_dir / "release"
    holder = start(workers, mode="read", key="/k0", seed=100, hold=str(release), **common)
    holder.wait_for("holding")
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], body_bytes(cache))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fillers = [
            start(workers, mode="fills", keys=[[f"/k{n}", n] for n in range(w, 13, 2)], **common)
            for w in (1, 2)
        ]
        for filler in fillers:
            assert filler.finish() == 0, filler
    finally:
        stop.set()
        watcher.join()
    assert peak[0] <= budget, (peak[0], budget)
    filled = [e["key"] for f in fillers for e in f.named("filled")]
    assert len(filled) + sum(len(f.named("refused")) for f in fillers) == 12
    assert len(filled) >= 6, fillers  # one object pinned: two places left, always reusable
    release.touch()
    assert holder.finish() == 0, holder
    (read,) = holder.named("read")
    assert read["sha256"] == sha(body(100, length))

    async def check() -> None:
        async with CacheStore(cache, max_size=budget, chunk_size=CHUNK) as store:
            stats = await store.stats()
            assert stats["bytes_reserved"] <= budget
            assert stats["objects"] == 3
            assert sum(e.get("evictions", 0) for f in fillers for e in f.named("stats")) >= 6

    asyncio.run(check())


async def test_an_object_larger_than_the_budget_is_refused_without_evicting(tmp_dir: Path) -> None:
    async with CacheStore(tmp_dir / "cache", max_size=4 * MIB, chunk_size=CHUNK) as store:
        async with store.fill("/small", HEAD, MIB) as fill:
            await fill.write(0, body(6, MIB))
            await fill.complete()
        with pytest.raises(ReservationRefused):
            async with store.fill("/huge", HEAD, 5 * MIB):
                pass
        assert [o.key for o in await store.variants("/small")] == [b"/small"]
        stats = await store.stats()
        assert stats["reservations_refused"] == 1 and stats["evictions"] == 0


async def test_min_free_refuses_what_would_eat_into_the_watermark(tmp_dir: Path) -> None:
    free = os.statvfs(tmp_dir).f_bavail * os.statvfs(tmp_dir).f_frsize
    async with CacheStore(
        tmp_dir / "cache", max_size=1 << 40, min_free=free - 2 * MIB, chunk_size=CHUNK
    ) as store:
        with pytest.raises(ReservationRefused):
            async with store.fill("/a", HEAD, 64 * MIB):
                pass
        async with store.fill("/b", HEAD, 1024) as fill:
            await fill.write(0, b"x" * 1024)
            await fill.complete()


# ---------------------------------------------------------------- a full disk


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_enospc_on_a_tiny_tmpfs_abandons_the_fill_releases_its_space_tears_nothing(
    tmp_dir: Path,
) -> None:
    with mounted_tmpfs(tmp_dir / "disk", "size=6m") as disk:
        cache = disk / "cache"
        async with CacheStore(cache, max_size=1 << 30, chunk_size=CHUNK) as store:
            kept = body(7, 512 * 1024)
            async with store.fill("/kept", HEAD, len(kept)) as fill:
                await fill.write(0, kept)
                await fill.complete()
            before = os.statvfs(disk).f_bfree
            data = body(8, 4 * MIB)
            outcome: list[BaseException] = []

            async def follow() -> None:
                async with store.open_reader("/big") as reader:
                    try:
                        await read_to_end(reader)
                    except FillAbandoned as error:
                        outcome.append(error)

            with pytest.raises(StoreFull):
                async with store.fill("/big", HEAD, len(data)) as fill:
                    task = asyncio.create_task(follow())
                    await fill.write(0, data[:MIB])
                    # someone else takes the disk: the rest of the fill meets ENOSPC
                    (disk / "other").write_bytes(b"\0" * (3 * MIB))
                    for offset in range(MIB, len(data), 256 * 1024):
                        await fill.write(offset, data[offset : offset + 256 * 1024])
            await task
            assert len(outcome) == 1, "the reader was not told"
            assert await store.variants("/big") == []
            stats = await store.stats()
            assert stats["enospc"] == 1 and stats["fills_abandoned"] == 1
            (disk / "other").unlink()
            assert os.statvfs(disk).f_bfree >= before - 64  # the fill's space is back
            assert sha(await read_all(store, "/kept")) == sha(kept)  # nothing torn
            again = body(9, 2 * MIB)
            async with store.fill("/big", HEAD, len(again)) as fill:
                await fill.write(0, again)
                await fill.complete()
            assert sha(await read_all(store, "/big")) == sha(again)


# ---------------------------------------------------------------- purge


@pytest.mark.timeout(60)
def test_purge_removes_every_variant_and_an_open_reader_keeps_its_own(tmp_dir: Path) -> None:
    cache = tmp_dir / "cache"
    length = 2 * MIB
    data = body(10, length)

    async def check() -> None:
        async with CacheStore(cache, max_size=1 << 30, chunk_size=CHUNK) as store:
            for variant in (b"gzip", b"identity"):
                async with store.fill("/p", HEAD, length, variant=variant) as fill:
                    await fill.write(0, data)
                    await fill.complete()
            async with store.open_reader("/p", b"gzip") as here:
                assert await store.purge("/p") == 2
                assert await store.variants("/p") == []
                with pytest.raises(NotStored):
                    await read_all(store, "/p", b"identity")
                assert os.listdir(cache / "objects") == []
                assert sha(await read_to_end(here)) == sha(data)

    asyncio.run(check())


@pytest.mark.timeout(60)
def test_purge_while_another_process_reads_it_lets_that_reader_finish(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    cache = tmp_dir / "cache"
    length = 3 * MIB
    job = {"dir": str(cache), "key": "/p", "seed": 11, "length": length}
    assert start(workers, mode="fills", keys=[["/p", 11]], **job).finish() == 0
    release = tmp_dir / "release"
    holder = start(workers, mode="read", hold=str(release), **job)
    holder.wait_for("holding")

    async def purge() -> None:
        async with CacheStore(cache, max_size=1 << 30, chunk_size=CHUNK) as store:
            assert await store.purge("/p") == 1
            with pytest.raises(NotStored):
                await read_all(store, "/p")

    asyncio.run(purge())
    assert os.listdir(cache / "objects") == []
    release.touch()
    assert holder.finish() == 0, holder
    (read,) = holder.named("read")
    assert read["sha256"] == sha(body(11, length)) and read["bytes"] == length


# ---------------------------------------------------------------- cancellation


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_cancelled_at_any_await_a_fill_or_reader_leaks_nothing_and_holds_no_lease(
    tmp_dir: Path,
) -> None:
    data = body(12, 3 * MIB)
    async with CacheStore(tmp_dir / "cache", max_size=1 << 30, chunk_size=CHUNK) as store:

        async def fill_and_follow() -> None:
            async def follow() -> None:
                async with store.open_reader("/c") as reader:
                    await read_to_end(reader)

            async with store.fill("/c", HEAD, len(data)) as fill:
                task = asyncio.create_task(follow())
                try:
                    for offset in range(0, len(data), 256 * 1024):
                        await fill.write(offset, data[offset : offset + 256 * 1024])
                    await fill.complete()
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, FillAbandoned):
                        await task

        await store.purge("/c")
        baseline = open_fds()
        outcomes: list[str] = []
        # cancel after 0, 1, 2, ... turns of the loop, the steps growing slowly, until whole
        # runs come through: how many turns a run takes varies with the index thread's
        # speed, so the walk goes on until it is past the end rather than to a measured count
        steps = 0
        while outcomes[-3:] != ["done"] * 3 and steps < 100_000:
            task = asyncio.create_task(fill_and_follow())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
                outcomes.append("done")
            except asyncio.CancelledError:
                outcomes.append("cancelled")
            for _ in range(3):  # what a cancelled step left to undo runs on the index thread
                await store._in_index(lambda: None)
            assert store._pins == {} and store._live == {}, steps
            stats = await store.stats()
            assert stats["readers_open"] == 0 and stats["readers_waiting"] == 0, (steps, stats)
            assert stats["partial_objects"] == 0, (steps, stats)
            assert open_fds() <= baseline, (steps, open_fds() - baseline)
            async with store.fill("/c", HEAD, 1) as probe:  # the lease is free
                await probe.write(0, b"x")
            await store.purge("/c")
            steps += max(1, steps // 20)
        assert outcomes.count("cancelled") >= 10 and "done" in outcomes, outcomes


async def test_a_reader_in_another_process_wakes_within_a_few_polls(
    tmp_dir: Path, workers: list[Worker]
) -> None:
    """The polling reader's latency: bounded by POLL_S plus scheduling, generously."""
    cache = tmp_dir / "cache"
    job = {"dir": str(cache), "key": "/w", "seed": 13, "length": 2 * MIB}
    reader = None
    async with CacheStore(cache, max_size=1 << 30, chunk_size=CHUNK) as store:
        data = body(13, 2 * MIB)
        async with store.fill("/w", StoredHead(200, ()), len(data)) as fill:
            reader = start(workers, mode="read", **job)
            await asyncio.to_thread(reader.wait_for, "opened")
            await asyncio.sleep(0.3)  # it waits for byte 0
            # (from before the write: the other process may see the byte before the write
            # returns here)
            writing = time.monotonic()
            await fill.write(0, data[:MIB])
            await asyncio.sleep(2.0)  # a reader woken only at the end would be this late
            await fill.write(MIB, data[MIB:])
            await fill.complete()
        assert await asyncio.to_thread(reader.finish) == 0, reader
        (read,) = reader.named("read")
        assert read["sha256"] == sha(data)
        assert 0 <= read["first_byte"] - writing < 1.5, read["first_byte"] - writing
