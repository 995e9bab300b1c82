"""The cache's I/O service (fileproxy/delivery/cache.py) with real parts: a backend on a
loopback port (tests/cache_backend.py) that counts the body bytes it sends, the upstream
client the proxy uses as the ``fetch``, a cache directory on disk, and for the tests of
several processes, processes of their own (tests/cache_service_worker.py) killed with -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from fileproxy.cache.manifest import StoredHead
from fileproxy.delivery.cache import (
    CacheAborted,
    CachedBody,
    CacheService,
    Outcome,
    check_cache_dir,
)
from fileproxy.delivery.cache_store import StoreFull
from fileproxy.ops.endpoints import cache_health
from fileproxy.ops.metrics import cache_metrics
from fileproxy.settings import ConfigError, Settings
from fileproxy.upstream.client import UpstreamClient
from tests.cache_backend import CacheBackend, Obj, object_bytes
from tests.cache_service_worker import Got, cache_settings, get, make_fetch
from tests.conftest import ROOT, Backend
from tests.integration.test_cache import disk_hog
from tests.integration.test_spool import mounted_tmpfs

MIB = 1 << 20
FRESH = {"Cache-Control": "max-age=600"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Rig:
    """A backend, a cache service on ``directory`` and the upstream client as its fetch."""

    def __init__(self, backend: CacheBackend, port: int, directory: Path) -> None:
        self.backend = backend
        self.upstream = f"http://127.0.0.1:{port}"
        self.directory = directory
        self.cache: CacheService | None = None
        self.client: UpstreamClient | None = None

    async def open(self, **env: str) -> CacheService:
        settings = cache_settings(str(self.directory), self.upstream, **env)
        self.client = UpstreamClient(settings)
        self.cache = CacheService(settings, durable=False)
        await self.cache.open()
        assert self.cache.active, self.cache.error
        return self.cache

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        if self.client is not None:
            await self.client.close()
        self.cache = self.client = None

    async def get(
        self, target: str, headers: list[tuple[str, str]] | None = None, **kw: Any
    ) -> Got:
        assert self.cache is not None and self.client is not None
        return await asyncio.wait_for(
            get(self.cache, self.client, target, headers or [], **kw), timeout=60
        )

    async def settled(self, timeout: float = 30.0) -> None:
        """Until no fill runs in this process."""
        assert self.cache is not None and self.cache.store is not None
        deadline = time.monotonic() + timeout
        while self.cache.store.fills_in_progress or self.cache._tasks:
            assert time.monotonic() < deadline, "fills still running"
            await asyncio.sleep(0.02)


@pytest.fixture
async def rig(tmp_dir: Path, start_backend: Callable[[web.Application], Any]) -> AsyncIterator[Rig]:
    backend = CacheBackend()
    started: Backend = await start_backend(backend.app())
    rig = Rig(backend, started.port, tmp_dir / "cache")
    try:
        yield rig
    finally:
        await rig.close()


# ---------------------------------------------------------------- one fill, every reader


@pytest.mark.slow
async def test_forty_readers_of_a_cold_object_are_served_from_one_fill_then_ten_hits(
    rig: Rig,
) -> None:
    size = 16 * MIB
    obj = rig.backend.add("/herd", Obj(object_bytes(1, size), headers=FRESH, rate=16e6))
    await rig.open()
    began = time.monotonic()
    gots = await asyncio.gather(*(rig.get("/herd") for _ in range(40)))
    elapsed = time.monotonic() - began
    assert all(g.aborted is None and g.status == 200 for g in gots)
    assert all(sha(g.body) == obj.sha256 for g in gots)
    assert rig.backend.count("/herd") == 1
    assert rig.backend.sent["/herd"] <= 1.15 * size
    assert sorted(g.word for g in gots).count("miss") == 1
    # every waiter got its first byte while the object was arriving (1 s at this pace),
    # not after the whole of it; a generous bound for a shared 2-core machine
    assert max(g.first_byte or 99 for g in gots) < 3.0, [g.first_byte for g in gots]
    assert elapsed < 20
    again = await asyncio.gather(*(rig.get("/herd") for _ in range(10)))
    assert all(sha(g.body) == obj.sha256 and g.word == "hit" for g in again)
    assert rig.backend.count("/herd") == 1


async def test_a_reader_joining_mid_fill_reads_from_byte_0_and_the_backend_sends_it_once(
    rig: Rig,
) -> None:
    size = 8 * MIB
    obj = rig.backend.add("/join", Obj(object_bytes(2, size), headers=FRESH, rate=8e6))
    await rig.open()
    first = asyncio.create_task(rig.get("/join"))
    deadline = time.monotonic() + 10
    while rig.backend.sent["/join"] < 2 * MIB:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert rig.backend.sent["/join"] < size
    late = await rig.get("/join")
    early = await first
    assert sha(early.body) == sha(late.body) == obj.sha256
    assert late.word == "hit" and late.header("Age") is not None
    assert rig.backend.count("/join") == 1


async def test_the_fill_goes_on_when_the_client_that_caused_it_leaves(rig: Rig) -> None:
    size = 8 * MIB
    obj = rig.backend.add("/leave", Obj(object_bytes(3, size), headers=FRESH, rate=16e6))
    await rig.open()
    left = await rig.get("/leave", leave_after=1)
    assert left.word == "miss" and 0 < len(left.body) < size
    await rig.settled()
    assert rig.backend.sent["/leave"] == size
    hit = await rig.get("/leave")
    assert hit.word == "hit" and sha(hit.body) == obj.sha256
    assert rig.backend.count("/leave") == 1


async def test_zero_copy_runs_and_head_and_a_clients_if_none_match_come_from_the_store(
    rig: Rig,
) -> None:
    obj = rig.backend.add("/runs", Obj(object_bytes(4, 5 * MIB + 7), headers=FRESH, rate=32e6))
    await rig.open()
    got = await rig.get("/runs", zero_copy=True)
    assert sha(got.body) == obj.sha256 and got.header("Content-Length") == str(len(obj.data))
    head = await rig.get("/runs", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.word == "hit"
    assert head.header("Content-Length") == str(len(obj.data))
    not_modified = await rig.get("/runs", [("If-None-Match", '"v1"')])
    assert not_modified.status == 304 and not_modified.body == b""
    tail = await rig.get("/runs", [("Range", "bytes=-10")])
    assert tail.status == 206 and tail.body == obj.data[-10:]
    beyond = await rig.get("/runs", [("Range", f"bytes={len(obj.data)}-")])
    assert beyond.status == 416
    assert rig.backend.count("/runs") == 1


# ---------------------------------------------------------------- Range on a cold miss


@pytest.mark.slow
async def test_a_cold_far_range_fetches_the_chunks_that_cover_it_not_the_file(rig: Rig) -> None:
    size = 64 * MIB
    obj = rig.backend.add("/big", Obj(object_bytes(5, size), headers=FRESH, rate=16e6))
    await rig.open()
    start, end = size - 3 * MIB, size - 2 * MIB
    began = time.monotonic()
    got = await rig.get("/big", [("Range", f"bytes={start}-{end - 1}")])
    took = time.monotonic() - began
    assert got.status == 206 and got.body == obj.data[start:end]
    assert got.header("Content-Range") == f"bytes {start}-{end - 1}/{size}"
    assert took < 5, took  # the whole file takes 4 s at this pace; one chunk 0.26 s
    await rig.settled()
    assert rig.backend.sent["/big"] <= 8 * MIB  # the 4 MiB chunk, not the 64 MiB file
    # a second range of the same chunk is a hit
    again = await rig.get("/big", [("Range", f"bytes={end}-{end + 99}")])
    assert again.status == 206 and again.body == obj.data[end : end + 100]
    assert rig.backend.count("/big") == 1
    # the whole object: the chunks it lacks are fetched (by Range + If-Range), once
    whole = await rig.get("/big")
    assert whole.aborted is None and sha(whole.body) == obj.sha256
    assert rig.backend.sent["/big"] <= size + 4 * MIB
    assert all(h.get("If-Range") == '"v1"' for _, h, s in rig.backend.requests[1:])


# ---------------------------------------------------------------- RFC 9111 in practice


async def test_no_cache_is_revalidated_with_a_304_and_new_bytes_once_the_etag_changed(
    rig: Rig,
) -> None:
    size = 2 * MIB
    headers = {"Cache-Control": "no-cache"}
    obj = rig.backend.add("/nc", Obj(object_bytes(6, size), headers=headers))
    await rig.open()
    first = await rig.get("/nc")
    assert first.word == "miss" and sha(first.body) == obj.sha256
    await rig.settled()
    second = await rig.get("/nc")
    assert second.word == "revalidated" and sha(second.body) == obj.sha256
    assert "fwd-status=304" in second.cache_status
    assert rig.backend.sent["/nc"] == size  # the 304 sent no body
    assert rig.backend.requests[-1][1].get("If-None-Match") == '"v1"'
    changed = rig.backend.add("/nc", Obj(object_bytes(7, size), headers=headers, etag='"v2"'))
    third = await rig.get("/nc")
    assert sha(third.body) == changed.sha256 and third.word == "miss"
    await rig.settled()
    fourth = await rig.get("/nc")
    assert fourth.word == "revalidated" and sha(fourth.body) == changed.sha256


async def test_stale_if_error_covers_a_503_and_must_revalidate_does_not(rig: Rig) -> None:
    allowed = {"Cache-Control": "max-age=1, stale-if-error=3600"}
    strict = {"Cache-Control": "max-age=1, must-revalidate, stale-if-error=3600"}
    soft = rig.backend.add("/soft", Obj(object_bytes(8, MIB), headers=allowed))
    rig.backend.add("/strict", Obj(object_bytes(9, MIB), headers=strict))
    await rig.open()
    assert (await rig.get("/soft")).word == "miss"
    assert (await rig.get("/strict")).word == "miss"
    await rig.settled()
    rig.backend.objects["/soft"].status = 503
    rig.backend.objects["/strict"].status = 503
    stale = await rig.get("/soft", later=30)
    assert stale.status == 200 and sha(stale.body) == soft.sha256 and stale.word == "stale"
    assert "stale-if-error" in stale.cache_status and "fwd-status=503" in stale.cache_status
    assert int(stale.header("Age") or 0) >= 29
    failed = await rig.get("/strict", later=30)
    assert failed.status == 503


@pytest.mark.parametrize(
    ("headers", "request_headers", "reason"),
    [
        ({"Cache-Control": "private, max-age=600"}, [], "private"),
        ({"Cache-Control": "no-store"}, [], "no-store"),
        (FRESH, [("Authorization", "Basic dTpw")], "authorization"),
        (FRESH, [("Cache-Control", "no-store")], "no-store"),
    ],
)
async def test_what_must_not_be_shared_is_never_stored(
    rig: Rig, headers: dict[str, str], request_headers: list[tuple[str, str]], reason: str
) -> None:
    obj = rig.backend.add("/p", Obj(object_bytes(10, MIB), headers=headers))
    await rig.open()
    first = await rig.get("/p", request_headers)
    assert sha(first.body) == obj.sha256 and f"detail={reason}" in first.cache_status
    second = await rig.get("/p", request_headers)
    assert sha(second.body) == obj.sha256 and second.word in ("miss", "bypass")
    assert rig.backend.count("/p") == 2
    assert (await rig.cache.report())["objects"] == 0  # type: ignore[union-attr]


async def test_a_response_with_set_cookie_is_never_given_to_another_request(rig: Rig) -> None:
    rig.backend.add(
        "/cookie", Obj(object_bytes(11, 1000), headers=FRESH, extra=[("Set-Cookie", "s=1")])
    )
    await rig.open()
    for _ in range(3):
        got = await rig.get("/cookie")
        assert got.header("Set-Cookie") == "s=1" and got.word in ("miss", "bypass")
    assert rig.backend.count("/cookie") == 3


async def test_vary_variants_are_stored_side_by_side_never_mixed_and_purge_takes_all(
    rig: Rig,
) -> None:
    plain, packed = object_bytes(12, MIB), object_bytes(13, MIB // 2)
    rig.backend.add(
        "/v", Obj(plain, headers=FRESH, vary_on="Accept-Encoding", variants={"gzip": packed})
    )
    await rig.open()
    gzip = [("Accept-Encoding", "gzip")]
    assert (await rig.get("/v", gzip)).body == packed
    await rig.settled()
    assert (await rig.get("/v")).body == plain
    await rig.settled()
    for _ in range(2):
        assert (await rig.get("/v", gzip)).body == packed
        assert (await rig.get("/v")).body == plain
    assert rig.backend.count("/v") == 2
    assert await rig.cache.purge("/v") == 2  # type: ignore[union-attr]
    after = await rig.get("/v", gzip)
    assert after.word == "miss" and after.body == packed
    assert rig.backend.count("/v") == 3


async def test_a_body_the_upstream_keeps_cutting_is_aborted_and_never_cached_whole(
    rig: Rig,
) -> None:
    rig.backend.add("/cut", Obj(object_bytes(14, 4 * MIB), headers=FRESH, cut=MIB))
    await rig.open()
    for attempt in range(3):
        got = await rig.get("/cut")
        assert got.aborted is not None and len(got.body) < 4 * MIB, attempt
        await rig.settled()
    assert rig.backend.count("/cut") == 3
    report = await rig.cache.report()  # type: ignore[union-attr]
    assert report["objects"] == 0 and report["partial_objects"] == 0


async def test_a_successful_unsafe_request_invalidates_its_target(rig: Rig) -> None:
    rig.backend.add("/inv", Obj(object_bytes(15, 1000), headers=FRESH))
    await rig.open()
    await rig.get("/inv")
    await rig.settled()
    assert (await rig.get("/inv")).word == "hit"
    gone = await rig.cache.invalidate(  # type: ignore[union-attr]
        "PUT", "/inv", 204, [("Host", "example.com")], []
    )
    assert gone == 1
    assert (await rig.get("/inv")).word == "miss"


# ---------------------------------------------------------------- disk: restart, budget, full


async def test_after_a_restart_a_stored_object_is_a_hit(rig: Rig) -> None:
    obj = rig.backend.add("/keep", Obj(object_bytes(16, 3 * MIB), headers=FRESH))
    await rig.open()
    await rig.get("/keep")
    await rig.settled()
    await rig.close()
    await rig.open()
    got = await rig.get("/keep")
    assert got.word == "hit" and sha(got.body) == obj.sha256
    assert rig.backend.count("/keep") == 1


def body_bytes_on_disk(directory: Path) -> int:
    objects = directory / "objects"
    return sum(os.stat(e.path).st_blocks * 512 for e in os.scandir(objects))


async def test_a_budget_of_three_objects_serves_a_dozen_byte_exact_never_above_it(
    rig: Rig,
) -> None:
    size = 2 * MIB
    objects = {
        f"/b{i}": rig.backend.add(f"/b{i}", Obj(object_bytes(100 + i, size), headers=FRESH))
        for i in range(12)
    }
    await rig.open(FILEPROXY_CACHE_MAX_SIZE=str(3 * size))
    for path, obj in objects.items():
        got = await rig.get(path)
        assert got.aborted is None and sha(got.body) == obj.sha256, path
        await rig.settled()
        assert body_bytes_on_disk(rig.directory) <= 3 * size
    report = await rig.cache.report()  # type: ignore[union-attr]
    assert report["evictions"] >= 9 and report["objects"] <= 3


async def test_enospc_on_a_tiny_tmpfs_is_proxied_uncached_nothing_lost(
    tmp_dir: Path, start_backend: Callable[[web.Application], Any]
) -> None:
    backend = CacheBackend()
    obj = backend.add("/huge", Obj(object_bytes(17, 6 * MIB), headers=FRESH))
    small = backend.add("/small", Obj(object_bytes(18, MIB), headers=FRESH))
    started: Backend = await start_backend(backend.app())
    with mounted_tmpfs(tmp_dir / "tiny", "size=4m"):
        rig = Rig(backend, started.port, tmp_dir / "tiny" / "cache")
        try:
            # the budget says yes; the filesystem has 4 MiB
            await rig.open(FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
            got = await rig.get("/huge")
            assert got.status == 200 and sha(got.body) == obj.sha256
            assert "no-room" in got.cache_status
            again = await rig.get("/huge")  # for a while, straight through
            assert again.status == 200 and sha(again.body) == obj.sha256
            fits = await rig.get("/small")
            assert sha(fits.body) == small.sha256
            await rig.settled()
            assert (await rig.get("/small")).word == "hit"
        finally:
            await rig.close()


async def test_a_fill_out_of_room_is_finished_uncached_by_each_reader_in_blocks_or_runs(
    tmp_dir: Path, start_backend: Callable[[web.Application], Any]
) -> None:
    """The disk fills up under a fill: its readers, copying blocks or taking runs for
    sendfile, each go on from their own offset with the rest from the upstream (Range +
    If-Range on the strong ETag), byte-exact; the upstream connections all go back."""
    backend = CacheBackend()
    obj = backend.add("/room", Obj(object_bytes(19, 3 * MIB), headers=FRESH, rate=3e6))
    started: Backend = await start_backend(backend.app())
    with mounted_tmpfs(tmp_dir / "tiny", "size=8m") as tiny:
        rig = Rig(backend, started.port, tiny / "cache")
        try:
            cache = await rig.open(FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
            readers = [
                asyncio.create_task(rig.get("/room", zero_copy=bool(i % 2), pace=0.001 * i))
                for i in range(4)
            ]
            await _until(lambda: backend.sent["/room"] >= 512 * 1024, "the fill started")
            with disk_hog(tiny):
                gots = await asyncio.gather(*readers)
            for got in gots:
                assert got.aborted is None and sha(got.body) == obj.sha256, got.aborted
            rests = [h for p, h, _ in backend.requests if p == "/room" and "Range" in h]
            assert len(rests) == 4 and all(h["If-Range"] == '"v1"' for h in rests), rests
            assert cache.counters["continued_uncached"] == 4
            await rig.settled()
            assert rig.client is not None and rig.client.pool_size()["in_use"] == 0
            report = await cache.report()
            assert report["objects"] == 0 and report["partial_objects"] == 0, report
        finally:
            await rig.close()


async def test_readers_of_a_fill_out_of_room_never_splice_another_representation(
    tmp_dir: Path, start_backend: Callable[[web.Application], Any]
) -> None:
    """The origin changed (another ETag) while the fill ran: when it runs out of room,
    the readers' If-Range gets the new object whole (200), which is not the rest of the
    one they started: they are aborted, never given a spliced body."""
    backend = CacheBackend()
    size = 3 * MIB
    obj = backend.add("/changed", Obj(object_bytes(21, size), headers=FRESH, rate=3e6))
    started: Backend = await start_backend(backend.app())
    with mounted_tmpfs(tmp_dir / "tiny", "size=8m") as tiny:
        rig = Rig(backend, started.port, tiny / "cache")
        try:
            cache = await rig.open(FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
            readers = [
                asyncio.create_task(rig.get("/changed", zero_copy=bool(i % 2))) for i in range(2)
            ]
            await _until(lambda: backend.sent["/changed"] >= 512 * 1024, "the fill started")
            obj.data, obj.etag = object_bytes(22, size), '"v2"'  # the fill's answer stays v1
            with disk_hog(tiny):
                gots = await asyncio.gather(*readers)
            for got in gots:
                assert got.aborted is not None and len(got.body) < size, got.aborted
            rests = [(h, st) for p, h, st in backend.requests if p == "/changed" and "Range" in h]
            assert len(rests) == 2, rests
            assert all(h["If-Range"] == '"v1"' and status == 200 for h, status in rests)
            assert cache.counters["aborted"] == 2
            await rig.settled()
            assert rig.client is not None and rig.client.pool_size()["in_use"] == 0
        finally:
            await rig.close()


@pytest.mark.parametrize("by_runs", [True, False], ids=["runs", "blocks"])
async def test_a_file_given_back_under_a_run_being_sent_goes_on_uncached_from_there(
    tmp_dir: Path, start_backend: Callable[[web.Application], Any], by_runs: bool
) -> None:
    """The fill runs out of room while a body sends what it was told is there: the file
    is truncated under it (a sendfile of the run comes back short: ``shorter``), and the
    body goes on uncached from exactly the byte it got to, never a gap or a repeat. A run
    found short while the fill is well is never papered over: the body aborts."""
    backend = CacheBackend()
    size = 3 * MIB
    obj = backend.add("/given-back", Obj(object_bytes(20, size), headers=FRESH))
    started: Backend = await start_backend(backend.app())
    with mounted_tmpfs(tmp_dir / "tiny", "size=8m") as tiny:
        rig = Rig(backend, started.port, tiny / "cache")
        body: CachedBody | None = None
        try:
            cache = await rig.open(FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
            assert cache.store is not None and rig.client is not None
            head = StoredHead(200, ((b"ETag", b'"v1"'), (b"Content-Length", b"%d" % size)))
            fetches: list[Any] = []
            fetch = make_fetch(rig.client, "/given-back", [], fetches)
            got = bytearray()
            with contextlib.suppress(StoreFull):
                async with cache.store.fill("/given-back", head, size) as fill:
                    await fill.write(0, obj.data[:MIB])
                    reader = await cache.store.open_reader("/given-back").__aenter__()
                    body = CachedBody(cache, reader, 0, size, fetch)
                    pieces = body.runs() if by_runs else aiter(body)
                    first = await anext(pieces)
                    if isinstance(first, tuple):
                        assert first[1:] == (0, MIB), first
                        got += os.pread(first[0], 4096, 0)  # 4 KiB went out, then short
                    else:
                        got += first
                    with disk_hog(tiny):
                        await fill.write(MIB, obj.data[MIB : 2 * MIB])  # ENOSPC
            assert os.fstat(reader.fileno()).st_size == 0  # given back for want of room
            sent = len(got)
            if by_runs:
                body.shorter(sent)
            async for piece in pieces:
                assert isinstance(piece, bytes), piece  # the rest, from the upstream
                got += piece
            assert bytes(got) == obj.data
            assert fetches == [[("Range", f"bytes={sent}-{size - 1}"), ("If-Range", '"v1"')]]
            assert rig.client.pool_size()["in_use"] == 0
        finally:
            if body is not None:
                body.close()
            await rig.close()


async def test_a_run_found_short_while_its_fill_is_well_aborts_the_body(rig: Rig) -> None:
    cache = await rig.open()
    assert cache.store is not None and rig.client is not None
    head = StoredHead(200, ((b"ETag", b'"v1"'), (b"Content-Length", b"%d" % (2 * MIB))))
    fetches: list[Any] = []
    async with cache.store.fill("/short", head, 2 * MIB) as fill:
        await fill.write(0, bytes(MIB))
        async with cache.store.open_reader("/short") as reader:
            body = CachedBody(cache, reader, 0, 2 * MIB, make_fetch(rig.client, "/", [], fetches))
            runs = body.runs()
            assert await anext(runs) == (reader.fileno(), 0, MIB)
            body.shorter(4096)  # the sendfile found the file shorter than the run
            with pytest.raises(CacheAborted, match="shorter"):
                await asyncio.wait_for(anext(runs), 10)  # not the next run
            body.close()
        fill.pause()
    assert fetches == [] and cache.counters["aborted"] == 1


async def test_a_reader_cancelled_while_it_takes_the_rest_uncached_leaks_nothing(
    tmp_dir: Path, start_backend: Callable[[web.Application], Any]
) -> None:
    """A client that goes away at any await of the uncached rest of a fill out of room
    (asking the upstream, reading its body; in blocks and by runs): its upstream answer
    is closed, its reader too, no connection stays lent, and nothing partial is stored.
    The walk goes on, waiting more loop turns each time, until whole rests come through."""
    backend = CacheBackend()
    started: Backend = await start_backend(backend.app())
    with mounted_tmpfs(tmp_dir / "tiny", "size=8m") as tiny:
        rig = Rig(backend, started.port, tiny / "cache")
        try:
            cache = await rig.open(FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
            store, client = cache.store, rig.client
            assert store is not None and client is not None
            objects: dict[str, Obj] = {}
            cancelled, whole, turns, step = 0, 0, 0, 0
            while whole < 2:
                assert step < 80, f"no whole rest after {step} steps"
                path = f"/walk{step}"
                obj = Obj(object_bytes(400 + step, 2 * MIB), headers=FRESH, rate=4e6)
                objects[path] = backend.add(path, obj)
                task = asyncio.create_task(rig.get(path, zero_copy=bool(step % 2)))
                await _until(lambda p=path: backend.sent[p] >= 256 * 1024, "the fill started")
                before = cache.counters["continued_uncached"]
                with disk_hog(tiny):
                    obj.rate = 0  # the rest at once: a few loop turns, not seconds
                    await _until(
                        lambda b=before, t=task: (
                            cache.counters["continued_uncached"] > b or t.done()
                        ),
                        "the reader went on uncached",
                        turns=True,
                    )
                    for _ in range(turns):
                        await asyncio.sleep(0)
                    task.cancel()
                    try:
                        got = await task
                    except asyncio.CancelledError:
                        cancelled += 1
                    else:
                        whole += 1
                        assert got.aborted is None and sha(got.body) == obj.sha256, step
                    await rig.settled()
                    await _until(
                        lambda: client.pool_size()["in_use"] == 0, "the upstream given back"
                    )
                    assert store.counters["readers_open"] == 0
                    assert store.counters["readers_waiting"] == 0
                turns += 1 + turns // 8
                step += 1
            print(f"{step} steps: {cancelled} cancelled, last after {turns} turns")
            assert cancelled >= 5, (cancelled, step)
            for path, obj in objects.items():  # room again: fetched whole, never torn
                got = await rig.get(path)
                assert got.aborted is None and sha(got.body) == obj.sha256, path
                assert got.word == "miss", got.cache_status  # never a hit of a partial
        finally:
            await rig.close()


async def _until(predicate: Callable[[], bool], what: str, *, turns: bool = False) -> None:
    """Until ``predicate()``, polled every 5 ms (every loop turn with ``turns``), 30 s."""
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"not within 30 s: {what}"
        await asyncio.sleep(0 if turns else 0.005)


# ---------------------------------------------------------------- several processes


async def _worker(job: dict[str, Any]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.cache_service_worker",
        json.dumps(job),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def _events(process: asyncio.subprocess.Process, until: str, count: int = 1) -> list[Any]:
    assert process.stdout is not None
    events: list[Any] = []
    while sum(e["event"] == until for e in events) < count:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line, f"the worker ended before {until}: {events}"
        events.append(json.loads(line))
    return events


@pytest.mark.slow
async def test_two_processes_fetch_once_and_kill_9_of_the_filler_leaves_the_other_exact(
    rig: Rig,
) -> None:
    size = 32 * MIB
    obj = rig.backend.add("/shared", Obj(object_bytes(19, size), headers=FRESH, rate=12e6))
    job = {"dir": str(rig.directory), "upstream": rig.upstream, "target": "/shared"}
    filler = await _worker({**job, "readers": 1})
    follower: asyncio.subprocess.Process | None = None
    try:
        await _events(filler, "ready")
        deadline = time.monotonic() + 10
        while rig.backend.sent["/shared"] < 4 * MIB:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        follower = await _worker({**job, "readers": 3, "delay": 0.1})
        await _events(follower, "ready")
        while rig.backend.sent["/shared"] < 10 * MIB:
            assert time.monotonic() < deadline + 10
            await asyncio.sleep(0.01)
        filler.send_signal(signal.SIGKILL)
        await filler.wait()
        done = [e for e in await _events(follower, "done", 3) if e["event"] == "done"]
        assert all(e["sha256"] == obj.sha256 and e["aborted"] is None for e in done), done
        assert max(e["takeovers"] for e in done) >= 1
        assert rig.backend.sent["/shared"] <= 1.5 * size
        await follower.wait()
    finally:
        for process in (filler, follower):
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
    # the object is complete on disk: a third process finds it a hit
    third = await _worker({**job, "readers": 2})
    try:
        done = [e for e in await _events(third, "done", 2) if e["event"] == "done"]
        assert all(e["sha256"] == obj.sha256 and e["word"] == "hit" for e in done), [
            (e["word"], e["sha256"] == obj.sha256, e["aborted"], e["bytes"]) for e in done
        ]
        await third.wait()
    finally:
        if third.returncode is None:
            third.kill()
            await third.wait()


@pytest.mark.slow
async def test_two_processes_asking_at_once_fetch_the_object_once(rig: Rig) -> None:
    size = 16 * MIB
    obj = rig.backend.add("/both", Obj(object_bytes(20, size), headers=FRESH, rate=16e6))
    job = {"dir": str(rig.directory), "upstream": rig.upstream, "target": "/both"}
    first = await _worker({**job, "readers": 5})
    second = await _worker({**job, "readers": 5})
    try:
        results = await asyncio.gather(_events(first, "done", 5), _events(second, "done", 5))
        done = [e for events in results for e in events if e["event"] == "done"]
        assert len(done) == 10
        assert all(e["sha256"] == obj.sha256 and e["aborted"] is None for e in done), done
        assert rig.backend.count("/both") == 1
        assert rig.backend.sent["/both"] <= 1.15 * size
    finally:
        for process in (first, second):
            if process.returncode is None:
                process.kill()
            await process.wait()


# ---------------------------------------------------------------- settings and check


def test_cache_settings_refuse_bad_values_with_one_line() -> None:
    for env, value in [
        ("FILEPROXY_CACHE", "maybe"),
        ("FILEPROXY_CACHE_DIR", "relative/dir"),
        ("FILEPROXY_CACHE_MAX_SIZE", "lots"),
        ("FILEPROXY_CACHE_MIN_FREE", "-1"),
        ("FILEPROXY_CACHE_MAX_OBJECT", "1e9"),
        ("FILEPROXY_CACHE_RANGE_FILL", "sometimes"),
    ]:
        with pytest.raises(ConfigError) as error:
            Settings.from_env({env: value})
        assert env in str(error.value) and "\n" not in str(error.value)
    settings = Settings.from_env({})
    assert settings.cache and settings.cache_max_size == "auto" and not settings.cache_range_fill


def test_fileproxy_check_reports_the_cache_dir(tmp_dir: Path) -> None:
    ok, line = check_cache_dir(Settings.from_env({"FILEPROXY_CACHE_DIR": str(tmp_dir / "c")}))
    assert ok and str(tmp_dir / "c") in line and (tmp_dir / "c").is_dir()
    blocked = tmp_dir / "file"
    blocked.write_bytes(b"")
    ok, line = check_cache_dir(Settings.from_env({"FILEPROXY_CACHE_DIR": str(blocked / "c")}))
    assert not ok and "FILEPROXY_CACHE_DIR" in line
    ok, line = check_cache_dir(
        Settings.from_env(
            {"FILEPROXY_CACHE_DIR": str(tmp_dir / "c"), "FILEPROXY_CACHE_MIN_FREE": str(1 << 50)}
        )
    )
    assert not ok and "FILEPROXY_CACHE_MIN_FREE" in line


async def test_cache_off_bypasses_everything(rig: Rig) -> None:
    rig.backend.add("/off", Obj(object_bytes(21, 1000), headers=FRESH))
    await rig.close()
    settings = cache_settings(str(rig.directory), rig.upstream, FILEPROXY_CACHE="off")
    async with CacheService(settings) as cache:
        decision = await cache.lookup("GET", "/off", [], now=time.time())
        assert decision.outcome is Outcome.BYPASS
        assert not rig.directory.exists()


async def test_report_metrics_and_health_count_what_the_cache_did(rig: Rig) -> None:
    size = MIB
    rig.backend.add("/m", Obj(object_bytes(22, size), headers=FRESH))
    rig.backend.add("/private", Obj(b"x", headers={"Cache-Control": "private"}))
    cache = await rig.open()
    await rig.get("/m")
    await rig.settled()
    for _ in range(3):
        await rig.get("/m")
    await rig.get("/private")
    report = await cache.report()
    assert report["requests"]["hit"] == 3 and report["requests"]["miss"] == 2
    assert report["uncached_misses"] == 1
    assert report["bytes_from_cache"] == 4 * size and report["bytes_fetched"] == size
    assert report["hit_ratio_requests"] == 0.6 and report["hit_ratio_bytes"] == 0.75
    assert report["objects"] == 1 and report["bytes_on_disk"] == size

    class Collector:
        def collect(self) -> Any:
            yield from cache_metrics(cache, "1")

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'fileproxy_cache_requests_total{outcome="hit",pid="1"} 3.0' in text
    assert 'fileproxy_cache_body_bytes_total{pid="1",source="upstream"} 1.048576e+06' in text
    assert 'fileproxy_cache_objects{pid="1",state="complete"} 1.0' in text
    health = cache_health(cache)
    assert health["state"] == "on" and health["objects"] == 1


# ---------------------------------------------------------------- cancellation


async def test_a_request_cancelled_at_any_point_leaves_no_lock_no_reader_no_torn_object(
    rig: Rig,
) -> None:
    """A client that goes away at any await of its request (while it leads a miss, waits
    for the upstream's head, waits for the fill to start, opens its reader, reads): the
    miss lock is released, readers closed, every object complete or absent and then
    served byte-exact."""
    cache = await rig.open()
    store = cache.store
    assert store is not None
    objects = {}
    for step in range(24):
        path = f"/cancel{step}"
        objects[path] = rig.backend.add(
            path, Obj(object_bytes(200 + step, 3 * MIB), headers=FRESH, rate=64e6, head_delay=0.01)
        )
        follower_path = path if step % 2 else None
        task = asyncio.create_task(rig.get(path))
        follower = asyncio.create_task(rig.get(follower_path)) if follower_path else None
        await asyncio.sleep(step * 0.004)
        task.cancel()
        if follower is not None and step % 4 == 1:
            follower.cancel()
        for one in (task, follower):
            if one is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    got = await one
                    assert got.aborted is None and sha(got.body) == objects[path].sha256
    await rig.settled()
    assert not cache._leaders and not cache._takeovers
    assert store.counters["readers_open"] == 0 and store.counters["readers_waiting"] == 0
    for path, obj in objects.items():
        got = await rig.get(path)
        assert got.aborted is None and sha(got.body) == obj.sha256, path
    assert store.counters["readers_open"] == 0


async def test_stale_while_revalidate_answers_at_once_and_revalidates_behind(rig: Rig) -> None:
    headers = {"Cache-Control": "max-age=1, stale-while-revalidate=600"}
    obj = rig.backend.add("/swr", Obj(object_bytes(23, MIB), headers=headers))
    await rig.open()
    await rig.get("/swr")
    await rig.settled()
    rig.backend.objects["/swr"].head_delay = 0.5  # the revalidation is slow; the answer not
    began = time.monotonic()
    stale = await rig.get("/swr", later=30)
    assert time.monotonic() - began < 0.4
    assert stale.word == "stale" and sha(stale.body) == obj.sha256
    assert "detail=stale-while-revalidate" in stale.cache_status
    await rig.settled()
    assert rig.backend.requests[-1][1].get("If-None-Match") == '"v1"'
    assert rig.backend.requests[-1][2] == 304 and rig.backend.sent["/swr"] == MIB


async def test_a_small_object_is_answered_from_memory_until_another_process_purges_it(
    rig: Rig,
) -> None:
    small = rig.backend.add("/small", Obj(object_bytes(24, 1000), headers=FRESH))
    cache = await rig.open()
    assert rig.client is not None
    await rig.get("/small")  # the miss: the fill, read whole
    await rig.settled()
    await rig.get("/small")  # a hit from the file, read whole: kept in memory
    decision = await cache.lookup("GET", "/small", [], now=time.time())
    assert decision.outcome is Outcome.HIT and decision.memory == small.data
    answer = await cache.respond(decision, lambda _: None)  # type: ignore[arg-type,return-value]
    assert answer.body is not None and answer.body.in_memory == small.data
    ranged = await rig.get("/small", [("Range", "bytes=10-19")])
    assert ranged.status == 206 and ranged.body == small.data[10:20]
    # another service on the same directory (another worker) purges it
    other = CacheService(cache_settings(str(rig.directory), rig.upstream), durable=False)
    async with other:
        assert await other.purge("/small") == 1
    decision = await cache.lookup("GET", "/small", [], now=time.time())
    assert decision.outcome is Outcome.MISS and decision.memory is None
    assert rig.backend.count("/small") == 1


async def test_a_cold_range_from_byte_0_fetches_its_chunk_not_the_file(rig: Rig) -> None:
    size = 32 * MIB
    obj = rig.backend.add("/head", Obj(object_bytes(25, size), headers=FRESH))
    await rig.open()
    got = await rig.get("/head", [("Range", "bytes=0-99")])
    assert got.status == 206 and got.body == obj.data[:100]
    await rig.settled()
    assert rig.backend.sent["/head"] == 4 * MIB


async def test_range_fill_on_fills_the_rest_of_a_cold_object_behind_the_range(rig: Rig) -> None:
    size = 16 * MIB
    obj = rig.backend.add("/rest", Obj(object_bytes(26, size), headers=FRESH))
    await rig.open(FILEPROXY_CACHE_RANGE_FILL="on")
    start = size - MIB
    got = await rig.get("/rest", [("Range", f"bytes={start}-")])
    assert got.status == 206 and got.body == obj.data[start:]
    await rig.settled()
    # the rest came behind the range, before anyone asked for it: every byte once
    assert rig.backend.sent["/rest"] == size
    assert (await rig.cache.report())["objects"] == 1  # type: ignore[union-attr]
    whole = await rig.get("/rest")
    assert whole.word == "hit" and sha(whole.body) == obj.sha256
    assert rig.backend.sent["/rest"] == size


async def test_a_request_with_authorization_gets_only_what_says_it_may_be_shared(
    rig: Rig,
) -> None:
    rig.backend.add("/plain", Obj(object_bytes(27, 1000), headers=FRESH))
    public = {"Cache-Control": "public, max-age=600"}
    shared = rig.backend.add("/public", Obj(object_bytes(28, 1000), headers=public))
    await rig.open()
    await rig.get("/plain")
    await rig.get("/public")
    await rig.settled()
    auth = [("Authorization", "Bearer t")]
    plain = await rig.get("/plain", auth)
    assert plain.word == "bypass" and rig.backend.count("/plain") == 2
    hit = await rig.get("/public", auth)
    assert hit.word == "hit" and hit.body == shared.data and rig.backend.count("/public") == 1


async def test_requests_for_an_answer_not_stored_do_not_queue_behind_each_other(
    rig: Rig,
) -> None:
    private = {"Cache-Control": "private"}
    obj = rig.backend.add("/mine", Obj(object_bytes(29, 1000), headers=private, head_delay=1.0))
    await rig.open()
    assert "detail=private" in (await rig.get("/mine")).cache_status
    began = time.monotonic()
    gots = await asyncio.gather(*(rig.get("/mine") for _ in range(6)))
    assert all(g.body == obj.data and g.word == "bypass" for g in gots)
    # each waits for its own answer's head (1 s), none for another's first (2 s)
    assert time.monotonic() - began < 1.7
