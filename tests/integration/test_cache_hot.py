"""Hits of objects a worker holds hot (``CacheService.hit``, and ``lookup``/``respond``
over the same entries) with real parts: a backend on a loopback port, the upstream client
as the fetch, a cache directory on disk, and a second ``CacheService`` on that directory
standing for another worker or daemon (they share nothing but the directory, as two
processes do). What is checked: a hot hit is what ``lookup`` and ``respond`` answer, and
whatever another worker does (purge, a replacement, a head merged from a 304, an
eviction) or whatever removes the file underneath, a hit never sends a removed or
replaced object's bytes or head as the current one.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from fileproxy.delivery.cache import Answer, Outcome
from tests.cache_backend import CacheBackend, Obj, object_bytes
from tests.conftest import Backend, Process, get_json
from tests.integration.test_cache import backend, cache_env, fetch, session, url_of  # noqa: F401
from tests.integration.test_cache_service import Rig
from tests.integration.test_spool import WAN_SNDBUF

KIB, MIB = 1 << 10, 1 << 20
FRESH = {"Cache-Control": "max-age=600"}


@pytest.fixture
async def hot_rig(
    tmp_dir: Path, start_backend: Callable[[web.Application], Any]
) -> AsyncIterator[Rig]:
    served = CacheBackend()
    started: Backend = await start_backend(served.app())
    rig = Rig(served, started.port, tmp_dir / "cache")
    try:
        yield rig
    finally:
        await rig.close()


class Other:
    """Another worker on the same cache directory: a service and an upstream client."""

    def __init__(self, rig: Rig, **env: str) -> None:
        self.rig = Rig(rig.backend, int(rig.upstream.rsplit(":", 1)[1]), rig.directory)
        self.env = env

    async def __aenter__(self) -> Rig:
        await self.rig.open(**self.env)
        return self.rig

    async def __aexit__(self, *exc: object) -> None:
        await self.rig.close()


def hot_hit(
    rig: Rig, target: str, headers: Sequence[tuple[bytes, bytes]] = (), method: str = "GET"
) -> Answer | None:
    assert rig.cache is not None
    return rig.cache.hit(method, target, list(headers), time.time())


async def body_of(answer: Answer) -> bytes:
    """What the data plane sends of ``answer``'s body (from memory, or read from the file)."""
    body = answer.body
    try:
        if body is None:
            return b""
        if body.in_memory is not None:
            return body.in_memory
        return b"".join([block async for block in body])
    finally:
        answer.close()


def head_of(answer: Answer) -> dict[str, str]:
    """Every field of the head ``answer`` sends (its pairs and its rendered lines)."""
    fields = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in answer.headers}
    for line in answer.raw_fields.decode("latin-1").split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            assert name.lower() not in fields, f"{name} twice"
            fields[name.lower()] = value
    return fields


async def warm(rig: Rig, target: str, times: int = 3) -> None:
    """A miss and hits through ``lookup``/``respond``: the object is stored, held hot, and
    (small) in memory."""
    for _ in range(times):
        await rig.get(target)
        await rig.settled()


# ---------------------------------------------------------------- what a hot hit answers


async def test_a_hot_hit_is_what_lookup_and_respond_answer_for_small_and_large(
    hot_rig: Rig,
) -> None:
    rig = hot_rig
    small = rig.backend.add("/s", Obj(object_bytes(1, KIB), headers=FRESH))
    large = rig.backend.add("/l", Obj(object_bytes(2, MIB), headers=FRESH))
    await rig.open()
    for target, obj in (("/s", small), ("/l", large)):
        await warm(rig, target)
        slow = await rig.get(target)
        answer = hot_hit(rig, target)
        assert answer is not None, target
        assert answer.status == 200 and answer.log_word == "hit"
        fields = head_of(answer)
        assert fields["content-length"] == str(len(obj.data))
        assert fields["etag"] == '"v1"' and fields["cache-control"] == "max-age=600"
        assert fields["cache-status"].startswith("fileproxy; hit; ttl=")
        assert int(fields["age"]) <= 2
        assert "x-request-id" not in fields and "transfer-encoding" not in fields
        slow_fields = {n.decode().lower(): v.decode() for n, v in slow.headers}
        assert set(fields) == set(slow_fields)  # the same head as lookup/respond's
        assert await body_of(answer) == obj.data
        head = hot_hit(rig, target, method="HEAD")
        assert head is not None and head.body is None
        assert head_of(head)["content-length"] == str(len(obj.data))
    assert rig.backend.count("/s") == 1 and rig.backend.count("/l") == 1


async def test_requests_with_directives_ranges_conditions_or_credentials_are_not_hot_hits(
    hot_rig: Rig,
) -> None:
    rig = hot_rig
    obj = rig.backend.add("/d", Obj(object_bytes(3, 4 * KIB), headers=FRESH))
    await rig.open()
    await warm(rig, "/d")
    assert hot_hit(rig, "/d") is not None
    for field in (
        (b"Cache-Control", b"no-cache"),
        (b"Pragma", b"no-cache"),
        (b"Range", b"bytes=0-9"),
        (b"If-None-Match", b'"v1"'),
        (b"If-Modified-Since", b"Sun, 06 Nov 1994 08:49:37 GMT"),
        (b"Authorization", b"Bearer t"),
        (b"range", b"bytes=0-9"),
    ):
        assert hot_hit(rig, "/d", [field]) is None, field
    ranged = await rig.get("/d", [("Range", "bytes=10-19")])
    assert ranged.status == 206 and ranged.body == obj.data[10:20]
    assert (await rig.get("/d", [("If-None-Match", '"v1"')])).status == 304
    assert rig.backend.count("/d") == 1
    # stale: reuse decides (revalidation), never the hot path
    assert rig.cache is not None
    assert rig.cache.hit("GET", "/d", [], time.time() + 3600) is None


async def test_vary_variants_held_hot_are_never_mixed(hot_rig: Rig) -> None:
    rig = hot_rig
    plain, packed = object_bytes(4, 3 * KIB), object_bytes(5, 2 * KIB)
    rig.backend.add(
        "/v", Obj(plain, headers=FRESH, vary_on="Accept-Encoding", variants={"gzip": packed})
    )
    await rig.open()
    for _ in range(3):
        await rig.get("/v", [("Accept-Encoding", "gzip")])
        await rig.settled()
        await rig.get("/v")
        await rig.settled()
    gzip = hot_hit(rig, "/v", [(b"Accept-Encoding", b"gzip")])
    identity = hot_hit(rig, "/v")
    other = hot_hit(rig, "/v", [(b"Accept-Encoding", b"br")])
    assert gzip is not None and identity is not None
    assert await body_of(gzip) == packed and await body_of(identity) == plain
    assert other is None or await body_of(other) != packed  # br: the no-gzip variant or none
    assert rig.backend.count("/v") == 2


# ---------------------------------------------------------------- another worker changes it


@pytest.mark.parametrize("size", [KIB, MIB], ids=["in-memory", "from-file"])
async def test_after_another_worker_purges_a_hot_object_no_hit_serves_it(
    hot_rig: Rig, size: int
) -> None:
    rig = hot_rig
    rig.backend.add("/p", Obj(object_bytes(6, size), headers=FRESH))
    await rig.open()
    await warm(rig, "/p")
    assert hot_hit(rig, "/p") is not None
    async with Other(rig) as other:
        assert other.cache is not None and await other.cache.purge("/p") == 1
    # the purge answered: from now on this worker answers nothing of it from memory
    assert hot_hit(rig, "/p") is None
    assert hot_hit(rig, "/p", method="HEAD") is None
    after = await rig.get("/p")
    assert after.word == "miss" and rig.backend.count("/p") == 2


@pytest.mark.parametrize("size", [KIB, MIB], ids=["in-memory", "from-file"])
async def test_after_another_worker_replaces_a_hot_object_hits_send_the_new_bytes(
    hot_rig: Rig, size: int
) -> None:
    rig = hot_rig
    old = object_bytes(7, size)
    obj = rig.backend.add("/r", Obj(old, headers=FRESH))
    await rig.open()
    await warm(rig, "/r")
    new = object_bytes(8, size)
    obj.data, obj.etag = new, '"v2"'
    async with Other(rig) as other:
        # the other worker's client asks past the cache: the new version replaces the old
        got = await other.get("/r", [("Cache-Control", "no-cache")])
        assert got.body == new
        await other.settled()
        for _ in range(3):
            answer = hot_hit(rig, "/r")
            if answer is None:  # not hot any more: lookup/respond read the index
                got = await rig.get("/r")
                assert got.body == new and got.header("ETag") == '"v2"'
            else:
                assert head_of(answer)["etag"] == '"v2"'
                assert await body_of(answer) == new
        answer = hot_hit(rig, "/r")  # held hot again, the new version
        assert answer is not None and await body_of(answer) == new
    assert rig.backend.count("/r") == 2


async def test_a_head_another_worker_merged_from_a_304_is_the_one_hits_send(
    hot_rig: Rig,
) -> None:
    rig = hot_rig
    obj = rig.backend.add("/h", Obj(object_bytes(9, 2 * KIB), headers=dict(FRESH)))
    await rig.open()
    await warm(rig, "/h")
    before = hot_hit(rig, "/h")
    assert before is not None and "x-edition" not in head_of(before)
    before.close()
    obj.headers["X-Edition"] = "2"  # the origin's 304 carries a field the stored head lacks
    async with Other(rig) as other:
        revalidated = await other.get("/h", [("Cache-Control", "no-cache")])
        assert revalidated.word == "revalidated" and revalidated.header("X-Edition") == "2"
    assert rig.backend.count("/h", 304) == 1
    got = hot_hit(rig, "/h") or None
    if got is None:  # the file is not the one held: lookup/respond read the merged head
        slow = await rig.get("/h")
        assert slow.header("X-Edition") == "2"
        got = hot_hit(rig, "/h")
    assert got is not None and head_of(got)["x-edition"] == "2"
    assert await body_of(got) == obj.data


# ---------------------------------------------------------------- eviction, files gone


async def test_a_hot_object_evicted_by_another_worker_is_never_answered_from_memory(
    hot_rig: Rig,
) -> None:
    rig = hot_rig
    size = 48 * KIB  # small: held in memory
    objects = {
        f"/e{i}": rig.backend.add(f"/e{i}", Obj(object_bytes(20 + i, size), headers=FRESH))
        for i in range(6)
    }
    await rig.open()
    await warm(rig, "/e0")
    assert hot_hit(rig, "/e0") is not None
    async with Other(rig, FILEPROXY_CACHE_MAX_SIZE=str(2 * size)) as other:
        for i in range(1, 6):  # each needs room: the oldest go, /e0 first
            await other.get(f"/e{i}")
            await other.settled()
        assert other.cache is not None
        assert (await other.cache.report())["evictions"] >= 4
    assert not (rig.directory / "objects").joinpath("1.body").exists()
    assert hot_hit(rig, "/e0") is None
    got = await rig.get("/e0")
    assert got.word == "miss" and got.body == objects["/e0"].data
    assert rig.backend.count("/e0") == 2


async def test_a_hot_file_being_sent_is_pinned_against_eviction_by_another_worker(
    hot_rig: Rig,
) -> None:
    rig = hot_rig
    size = MIB
    first = rig.backend.add("/pin", Obj(object_bytes(30, size), headers=FRESH))
    for i in range(3):
        rig.backend.add(f"/x{i}", Obj(object_bytes(31 + i, size), headers=FRESH))
    await rig.open()
    await warm(rig, "/pin")
    answer = hot_hit(rig, "/pin")
    assert answer is not None and answer.body is not None and answer.body.in_memory is None
    try:
        async with Other(rig, FILEPROXY_CACHE_MAX_SIZE=str(2 * size)) as other:
            for i in range(3):
                await other.get(f"/x{i}")
                await other.settled()
        assert (rig.directory / "objects" / "1.body").exists()  # held open: kept
        assert await body_of(answer) == first.data
    finally:
        answer.close()


async def test_a_hit_after_the_file_was_removed_underneath_never_sends_its_bytes(
    hot_rig: Rig,
) -> None:
    rig = hot_rig
    small = rig.backend.add("/gone-s", Obj(object_bytes(40, KIB), headers=FRESH))
    large = rig.backend.add("/gone-l", Obj(object_bytes(41, MIB), headers=FRESH))
    await rig.open()
    for target in ("/gone-s", "/gone-l"):
        await warm(rig, target)
        assert hot_hit(rig, target) is not None
    for body in (rig.directory / "objects").iterdir():
        body.unlink()  # an operator, a disk check: the rows say complete, the files are gone
    assert hot_hit(rig, "/gone-s") is None and hot_hit(rig, "/gone-l") is None
    for target, obj in (("/gone-s", small), ("/gone-l", large)):
        got = await rig.get(target)
        assert got.aborted is None and got.body == obj.data and got.word == "miss", target
        assert rig.backend.count(target) == 2


# ---------------------------------------------------------------- uses for the eviction policy


def eviction_marks(directory: Path) -> dict[int, tuple[str, int]]:
    """The eviction policy's state in the index: generation -> (queue, mark)."""
    with sqlite3.connect(directory / "index.sqlite3") as db:
        row = db.execute("SELECT state FROM eviction WHERE id = 1").fetchone()
    return {key: (queue, mark) for queue, key, _, mark in orjson.loads(row[0])}


async def test_hot_hits_reach_the_eviction_state_other_workers_evict_by(hot_rig: Rig) -> None:
    rig = hot_rig
    rig.backend.add("/u", Obj(object_bytes(50, 2 * KIB), headers=FRESH))
    rig.backend.add("/idle", Obj(object_bytes(51, 2 * KIB), headers=FRESH))
    await rig.open()
    await rig.get("/u")
    await rig.settled()
    await rig.get("/idle")
    await rig.settled()
    await rig.get("/u")  # a hit through lookup/respond: /u is held hot from here on
    assert rig.cache is not None and rig.cache.store is not None
    await rig.cache.store.flush_hits()
    marks = eviction_marks(rig.directory)
    start, idle = marks[1][1], marks[2]
    assert start < 3  # the miss's reader and the hit's: not yet saturated (two bits)
    for _ in range(3):
        answer = hot_hit(rig, "/u")
        assert answer is not None
        await body_of(answer)
    deadline = time.monotonic() + 10
    while eviction_marks(rig.directory)[1][1] <= start:  # no reader, no fill: flushed by time
        assert time.monotonic() < deadline, "hot hits never reached the index"
        await asyncio.sleep(0.1)
    assert eviction_marks(rig.directory)[2] == idle  # /idle: never used again
    assert rig.cache.counters[Outcome.HIT.value] >= 4


# ---------------------------------------------------------------- through two daemons


async def test_two_daemons_hot_hits_whole_heads_and_never_after_a_purge_or_replacement(
    backend: CacheBackend,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """Two ``fileproxy serve`` on one cache directory, each holding the objects hot: a
    hit's head is whole (every stored field once, ours once: X-Request-ID, CORS), HEAD
    has no body; after PURGE answered 200 at one, the other's next GET is no hit; after
    one stored a new version, the other sends the new bytes."""
    small = backend.add(
        "/t-s",
        Obj(object_bytes(60, KIB), headers={**FRESH, "Access-Control-Allow-Origin": "*"}),
    )
    large = backend.add("/t-l", Obj(object_bytes(61, MIB), headers=FRESH))
    env = cache_env(
        tmp_dir / "cache",
        FILEPROXY_ADMIN_ALLOW="192.0.2.0/24",
        FILEPROXY_ADMIN_TOKEN="s3cret-token",
        FILEPROXY_CORS_ORIGINS="https://app.example",
    )
    one, two = start_proxy(url_of(backend), **env), start_proxy(url_of(backend), **env)
    for proxy in (one, two):
        for target in ("/t-s", "/t-l"):
            for _ in range(3):
                await fetch(session, f"{proxy.url}{target}")
    for target, obj in (("/t-s", small), ("/t-l", large)):
        got = await fetch(session, f"{two.url}{target}", {"Origin": "https://app.example"})
        assert got.body == obj.data and got.cache_status.startswith("fileproxy; hit"), target
        for name in ("ETag", "Cache-Control", "Content-Type", "Date", "Content-Length", "Age",
                     "Cache-Status", "X-Request-ID", "Access-Control-Allow-Origin"):  # fmt: skip
            assert len(got.headers.getall(name, [])) == 1, (target, name, got.headers)
        assert got.headers["Content-Length"] == str(len(obj.data))
        assert got.headers["Access-Control-Allow-Origin"] == "https://app.example"
        head = await fetch(session, f"{two.url}{target}", method="HEAD")
        assert head.length == 0 and head.headers["Content-Length"] == str(len(obj.data))
    assert backend.count("/t-s") == 1 and backend.count("/t-l") == 1
    token = {"Authorization": "Bearer s3cret-token"}
    for target in ("/t-s", "/t-l"):
        purged = await session.request("PURGE", f"{one.url}{target}", headers=token)
        assert purged.status == 200 and (await purged.json())["purged"] == 1
        after = await fetch(session, f"{two.url}{target}")
        assert "; stored" in after.cache_status, (target, after.cache_status)
    assert backend.count("/t-s") == 2 and backend.count("/t-l") == 2
    for target in ("/t-s", "/t-l"):
        await fetch(session, f"{two.url}{target}")  # held hot again at two
    new = object_bytes(62, MIB)
    backend.objects["/t-l"].data, backend.objects["/t-l"].etag = new, '"v2"'
    replaced = await fetch(session, f"{one.url}/t-l", {"Cache-Control": "no-cache"})
    assert replaced.body == new and "; stored" in replaced.cache_status
    got = await fetch(session, f"{two.url}/t-l")
    assert got.body == new and got.headers["ETag"] == '"v2"'
    assert got.cache_status.startswith("fileproxy; hit")


async def test_a_client_gone_mid_file_of_a_hot_hit_leaves_no_file_open_or_pinned(
    backend: CacheBackend,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """A hot hit's body file is the answer's: a client that resets mid-file (the send
    waiting on it, or the task cancelled) leaves no reader open and no pin, and the
    next client gets the whole object, a hit."""
    obj = backend.add("/gone-mid", Obj(object_bytes(70, 8 * MIB), headers=FRESH))
    proxy = start_proxy(url_of(backend), FILEPROXY_SO_SNDBUF=WAN_SNDBUF, **cache_env(tmp_dir / "c"))
    for _ in range(2):  # the miss, then a hit through the index: held hot from here on
        await fetch(session, f"{proxy.url}/gone-mid", keep=False)

    async def readers_open() -> int:
        return int((await get_json(session, f"{proxy.url}/stats"))["cache"]["readers_open"])

    loop = asyncio.get_running_loop()
    for _ in range(3):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        await loop.sock_sendall(sock, b"GET /gone-mid HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while len(received) < MIB:
            received += await asyncio.wait_for(loop.sock_recv(sock, 16384), 10)
            await asyncio.sleep(0.002)
        assert b"Cache-Status: fileproxy; hit" in received.partition(b"\r\n\r\n")[0]
        assert await readers_open() == 1  # the hot file, open while it is sent
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset mid-file
        deadline = time.monotonic() + 10
        while (still := await readers_open()) != 0:
            assert time.monotonic() < deadline, still
            await asyncio.sleep(0.05)
    whole = await fetch(session, f"{proxy.url}/gone-mid", expected=obj.data, keep=False)
    assert whole.exact and whole.cache_status.startswith("fileproxy; hit")
    assert backend.count("/gone-mid") == 1
    assert "Traceback" not in proxy.log_text()
