"""The cache through the real proxy (issue 22, "Done when" 1-5): `fileproxy serve` and
gunicorn started as processes, a backend that counts the body bytes it sends
(tests/cache_backend.py, in the test's loop or in a process of its own when its pace
must not depend on the clients), clients reading over loopback sockets, a cache
directory on disk (a tmpfs the test mounts for ENOSPC).

Every test here fails with FILEPROXY_CACHE=off (the backend is then asked every time),
except the last group, which checks that off is exactly the relay of before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from tests.cache_backend import CacheBackend, Obj, object_bytes
from tests.conftest import ROOT, Backend, Process, free_port, require_binary
from tests.integration.test_deployment import start_gunicorn
from tests.integration.test_spool import mounted_tmpfs

MIB = 1 << 20
FRESH = {"Cache-Control": "max-age=600"}
PACE = 16e6  # bytes/s: the backend link of done-when 1 and 2


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- clients


@dataclass
class Got:
    status: int
    headers: CIMultiDictProxy[str]
    sha256: str
    length: int
    first_byte: float | None  # seconds from the request to the first body byte
    done: float  # wall clock when the body ended (or broke off)
    aborted: str | None  # the body broke off: why
    body: bytes
    exact: bool | None = None  # every byte as ``expected`` (when given), none more or less

    @property
    def cache_status(self) -> str:
        return self.headers.get("Cache-Status", "")


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    keep: bool = True,
    expected: bytes | None = None,
) -> Got:
    """One request; its body hashed as it arrives (kept only if ``keep``), or compared
    with ``expected`` as it arrives (memcmp: 40 clients of 64 MiB cost less than hashing)."""
    began = time.monotonic()
    digest, kept, length = hashlib.sha256(), bytearray(), 0
    first: float | None = None
    aborted: str | None = None
    view = memoryview(expected) if expected is not None else None
    exact = True
    async with session.request(method, url, headers=headers or {}) as resp:
        try:
            async for block in resp.content.iter_any():
                if first is None:
                    first = time.monotonic() - began
                if view is None:
                    digest.update(block)
                elif exact:
                    exact = view[length : length + len(block)] == block
                length += len(block)
                if keep:
                    kept += block
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
            aborted = repr(error)
        if expected is not None:
            exact = exact and length == len(expected) and aborted is None
        return Got(
            resp.status, resp.headers, digest.hexdigest(), length, first, time.time(), aborted,
            bytes(kept), exact if expected is not None else None,
        )  # fmt: skip


@dataclass
class Download:
    status: int
    cache_status: str
    first_byte: float  # seconds from the start of its curl to the first body byte seen
    done: float  # wall clock when its curl ended
    exact: bool  # every byte as expected, none more or less


async def downloads(url: str, expected: bytes, count: int, directory: Path) -> list[Download]:
    """``count`` concurrent curls of ``url``, each body to a file in ``directory`` (a
    tmpfs: memory speed) whose size is watched for the first body byte, then compared
    with ``expected``. curl, not 40 clients in the test's loop: those read 2.5 GiB slower
    than the proxy sends it on a shared 2-core machine, and would time themselves."""
    curl = require_binary("curl")
    bodies = [directory / f"body-{i}" for i in range(count)]
    heads = [directory / f"head-{i}" for i in range(count)]
    started: list[float] = []
    done: list[float] = [0.0] * count
    processes = []
    for body, head in zip(bodies, heads, strict=True):
        started.append(time.monotonic())
        args = ["-sS", "--max-time", "90", "-o", str(body), "-D", str(head), "-w", "%{http_code}"]
        process = await asyncio.create_subprocess_exec(
            curl, *args, url, stdout=asyncio.subprocess.PIPE
        )
        processes.append(process)

    async def ended(i: int) -> bytes:
        out, _ = await processes[i].communicate()
        done[i] = time.time()
        return out

    waiting = [asyncio.ensure_future(ended(i)) for i in range(count)]
    first = [float("inf")] * count
    try:
        while not all(task.done() for task in waiting):
            for i, body in enumerate(bodies):
                if first[i] == float("inf") and body.exists() and body.stat().st_size > 0:
                    first[i] = time.monotonic() - started[i]
            await asyncio.sleep(0.005)
        statuses = [int(task.result() or b"0") for task in waiting]
    finally:
        for task in waiting:
            task.cancel()
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    got = []
    for i in range(count):
        fields = {}
        for line in heads[i].read_bytes().decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(": ")
            if sep:
                fields[name.lower()] = value
        exact = bodies[i].read_bytes() == expected
        bodies[i].unlink()
        got.append(Download(statuses[i], fields.get("cache-status", ""), first[i], done[i], exact))
    return got


@pytest.fixture
def memory_dir() -> Iterator[Path]:
    """A directory on a tmpfs (/dev/shm) for bodies the test compares after."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="fileproxy-bodies-", dir=base) as path:
        yield Path(path)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=90),
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
    ) as session:
        yield session


# ---------------------------------------------------------------- a backend of its own


class BackendProcess:
    """tests/cache_backend.py in a process of its own: its pace holds while the test's
    loop is busy reading bodies; ``report()`` says what it sent and was asked."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"

    async def report(self) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 10)
        assert line, "the backend process ended"
        report: dict[str, Any] = json.loads(line)
        return report

    async def sent(self, path: str) -> int:
        return int((await self.report())["sent"].get(path, 0))

    async def asked(self, path: str) -> int:
        return int((await self.report())["requests"].get(path, 0))

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


@pytest.fixture
async def backend_process() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[BackendProcess]]]:
    started: list[BackendProcess] = []

    async def start(spec: dict[str, Any]) -> BackendProcess:
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.cache_backend", str(port), json.dumps(spec),
            cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        backend = BackendProcess(process, port)
        started.append(backend)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert json.loads(line)["event"] == "listening", line
        return backend

    yield start
    for backend in started:
        await backend.stop()


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def backend(start_backend: Callable[[web.Application], Any]) -> CacheBackend:
    """A backend in the test's loop whose objects a test changes as it goes."""
    served = CacheBackend()
    started: Backend = await start_backend(served.app())
    served.url = started.url  # type: ignore[attr-defined]
    return served


def url_of(backend: CacheBackend) -> str:
    return backend.url  # type: ignore[attr-defined, no-any-return]


def cache_env(directory: Path, **env: str) -> dict[str, str]:
    """The cache on (the suites' daemons relay unless told, see conftest.clean_env)."""
    return {
        "FILEPROXY_CACHE": "on",
        "FILEPROXY_CACHE_DIR": str(directory),
        "FILEPROXY_CACHE_MIN_FREE": "0",
        **env,
    }


def access_words(proxy: Process, path: str) -> list[str]:
    """The ``cache`` field of every access line of ``path``, in order."""
    words = []
    for raw in proxy.log_text().splitlines():
        if raw.startswith("{") and '"logger":"fileproxy.access"' in raw:
            line = json.loads(raw)
            if line.get("path") == path:
                words.append(line.get("cache", "-"))
    return words


async def logged(proxy: Process, path: str, count: int) -> list[str]:
    """The access lines of ``path`` once ``count`` of them are written."""
    deadline = time.monotonic() + 10
    while len(words := access_words(proxy, path)) < count:
        assert time.monotonic() < deadline, proxy.log_text()[-3000:]
        await asyncio.sleep(0.05)
    return words


# ---------------------------------------------------------------- 1. the herd


@pytest.mark.slow
async def test_forty_clients_of_a_cold_64_mib_object_through_gunicorn_get_one_fill(
    backend_process: Callable[[dict[str, Any]], Awaitable[BackendProcess]],
    memory_dir: Path,
    tmp_dir: Path,
) -> None:
    size = 64 * MIB
    spec = {"/herd": {"seed": 1, "length": size, "rate": PACE, "headers": FRESH}}
    backend = await backend_process(spec)
    expected = object_bytes(1, size)
    gunicorn = start_gunicorn(
        tmp_dir, backend.url, FILEPROXY_WORKERS="2", **cache_env(tmp_dir / "cache")
    )
    try:
        began = time.time()
        url = f"{gunicorn.url}/herd"
        gots = await asyncio.wait_for(downloads(url, expected, 40, memory_dir), 120)
        report = await backend.report()
        problems = [(g.status, g.cache_status) for g in gots if not g.exact or g.status != 200]
        assert not problems, problems
        assert report["requests"]["/herd"] == 1, report
        assert report["sent"]["/herd"] <= 1.15 * size, report
        # every waiter streams from the first byte: the whole object takes 4.2 s at this pace
        first = sorted(g.first_byte for g in gots)
        assert first[-1] < 1.0, first
        # the last client is done soon after the fill ended (a generous bound for a
        # shared machine, far below the 4.2 s a second fill would take)
        fill_end = report["finished"]["/herd"]
        assert fill_end - began >= size / PACE * 0.9  # the pace held
        last = max(g.done for g in gots)
        assert last - fill_end < 2.0, (last - fill_end, sorted(g.done - fill_end for g in gots))
        words = sorted(g.cache_status.split(";")[1].strip() for g in gots)
        assert words.count("fwd=uri-miss") >= 1 and words.count("hit") >= 20, words
        again = await asyncio.wait_for(downloads(url, expected, 10, memory_dir), 60)
        assert all(g.exact and "; hit" in g.cache_status for g in again)
        after = await backend.report()
        assert after["requests"]["/herd"] == 1 and after["sent"] == report["sent"], after
    finally:
        gunicorn.stop()


# ---------------------------------------------------------------- 2. a cold far Range


async def test_a_cold_range_near_the_end_of_256_mib_fetches_a_few_mib_not_the_file(
    backend_process: Callable[[dict[str, Any]], Awaitable[BackendProcess]],
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    size = 256 * MIB
    spec = {"/far": {"seed": 2, "length": size, "rate": PACE, "headers": FRESH}}
    backend = await backend_process(spec)
    proxy = start_proxy(backend.url, **cache_env(tmp_dir / "cache"))
    start, end = size - 3 * MIB + 12345, size - 2 * MIB + 12345
    wanted = {"Range": f"bytes={start}-{end - 1}"}
    began = time.monotonic()
    got = await fetch(session, f"{proxy.url}/far", wanted)
    took = time.monotonic() - began
    data = object_bytes(2, size)
    assert got.status == 206 and got.aborted is None
    assert got.body == data[start:end]
    assert got.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
    # the file takes 16.8 s at this pace; the two 4 MiB chunks that cover it 0.5 s
    assert took < 4.0, took
    assert await backend.sent("/far") <= 8 * MIB
    # the same bytes again come from the chunks stored
    again = await fetch(session, f"{proxy.url}/far", {"Range": f"bytes={end - 100}-{end - 1}"})
    assert again.status == 206 and again.body == data[end - 100 : end]
    assert "; hit" in again.cache_status
    assert await backend.asked("/far") == 1
    assert await backend.sent("/far") <= 8 * MIB


# ---------------------------------------------------------------- 3. RFC 9111 through the proxy


async def test_no_cache_is_revalidated_with_a_304_then_new_bytes_once_the_etag_changed(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    size = 2 * MIB
    headers = {"Cache-Control": "no-cache"}
    obj = backend.add("/nc", Obj(object_bytes(6, size), headers=headers))
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache"))
    first = await fetch(session, f"{proxy.url}/nc")
    assert sha(first.body) == obj.sha256 and "stored" in first.cache_status
    second = await fetch(session, f"{proxy.url}/nc")
    assert second.status == 200 and sha(second.body) == obj.sha256
    assert "fwd=stale" in second.cache_status and "fwd-status=304" in second.cache_status
    assert backend.count("/nc") == 2 and backend.count("/nc", 304) == 1
    assert backend.sent["/nc"] == size  # the 304 carried no body
    assert backend.requests[-1][1].get("If-None-Match") == '"v1"'
    changed = backend.add("/nc", Obj(object_bytes(7, size), headers=headers, etag='"v2"'))
    third = await fetch(session, f"{proxy.url}/nc")
    assert sha(third.body) == changed.sha256 and third.headers["ETag"] == '"v2"'
    fourth = await fetch(session, f"{proxy.url}/nc")
    assert sha(fourth.body) == changed.sha256 and "fwd-status=304" in fourth.cache_status
    assert backend.sent["/nc"] == 2 * size
    assert await logged(proxy, "/nc", 4) == ["miss", "revalidated", "miss", "revalidated"]


@pytest.mark.parametrize(
    ("response_headers", "extra", "request_headers", "detail"),
    [
        ({"Cache-Control": "private, max-age=600"}, [], {}, "private"),
        ({"Cache-Control": "no-store"}, [], {}, "no-store"),
        (FRESH, [], {"Authorization": "Basic dTpw"}, "authorization"),
        (FRESH, [("Set-Cookie", "session=alice")], {}, "set-cookie"),
    ],
    ids=["private", "no-store", "authorization", "set-cookie"],
)
async def test_what_must_not_be_shared_is_never_given_to_another_request(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
    response_headers: dict[str, str],
    extra: list[tuple[str, str]],
    request_headers: dict[str, str],
    detail: str,
) -> None:
    obj = backend.add("/p", Obj(object_bytes(10, MIB), headers=response_headers, extra=extra))
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache"))
    # the one it was for, then another client (without its credentials), then it again
    for n, headers in enumerate((request_headers, {}, request_headers)):
        got = await fetch(session, f"{proxy.url}/p", headers)
        assert got.status == 200 and sha(got.body) == obj.sha256
        assert "; hit" not in got.cache_status, got.cache_status
        # the first says why; then "uncacheable" (hit-for-pass) for a while
        why = detail if n == 0 else "uncacheable"
        assert got.cache_status.startswith("fileproxy; fwd=uri-miss;"), got.cache_status
        assert got.cache_status.endswith(f"; detail={why}"), got.cache_status
        for name, value in extra:
            assert got.headers.get(name) == value
    assert backend.count("/p") == 3
    assert disk_use(tmp_dir / "cache")[0] == 0  # no body was ever written


async def test_vary_variants_are_stored_side_by_side_and_never_mixed(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    plain, packed = object_bytes(12, MIB), object_bytes(13, MIB // 2)
    backend.add(
        "/v", Obj(plain, headers=FRESH, vary_on="Accept-Encoding", variants={"gzip": packed})
    )
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache"))
    gzip = {"Accept-Encoding": "gzip"}
    identity = {"Accept-Encoding": "identity"}
    for round_ in range(3):
        for headers, body in ((gzip, packed), (identity, plain), (gzip, packed)):
            got = await fetch(session, f"{proxy.url}/v", headers)
            assert got.body == body, (round_, headers, got.cache_status)
            assert got.headers["Vary"] == "Accept-Encoding"
    assert backend.count("/v") == 2  # one per variant
    purged = await session.request("PURGE", f"{proxy.url}/v")
    assert purged.status == 200 and (await purged.json())["purged"] == 2
    after = await fetch(session, f"{proxy.url}/v", identity)
    assert after.body == plain and "stored" in after.cache_status
    assert backend.count("/v") == 3


async def test_stale_if_error_is_served_when_every_replica_answers_503(
    backend: CacheBackend,
    start_backend: Callable[[web.Application], Any],
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    allowed = {"Cache-Control": "max-age=1, stale-if-error=3600"}
    strict = {"Cache-Control": "max-age=1, must-revalidate, stale-if-error=3600"}
    soft = backend.add("/soft", Obj(object_bytes(8, MIB), headers=allowed))
    backend.add("/strict", Obj(object_bytes(9, MIB), headers=strict))
    second: Backend = await start_backend(backend.app())  # a replica serving the same
    proxy = start_proxy(f"{url_of(backend)},{second.url}", **cache_env(tmp_dir / "cache"))
    assert "stored" in (await fetch(session, f"{proxy.url}/soft")).cache_status
    assert "stored" in (await fetch(session, f"{proxy.url}/strict")).cache_status
    await asyncio.sleep(2.2)  # both stale now
    backend.objects["/soft"].status = backend.objects["/strict"].status = 503
    asked = len(backend.requests)
    stale = await fetch(session, f"{proxy.url}/soft")
    assert stale.status == 200 and sha(stale.body) == soft.sha256 and stale.aborted is None
    assert "fwd=stale" in stale.cache_status and "fwd-status=503" in stale.cache_status
    assert "stale-if-error" in stale.cache_status or "detail=stale" in stale.cache_status
    assert int(stale.headers["Age"]) >= 2
    # both replicas were asked (a retry at the second) before the stale copy stood in
    assert len(backend.requests) - asked >= 2
    assert all(s == 503 for _, _, s in backend.requests[asked:])
    failed = await fetch(session, f"{proxy.url}/strict")
    assert failed.status == 503  # must-revalidate: never stale
    assert (await logged(proxy, "/soft", 2))[-1] == "stale"


async def test_purge_removes_an_object_for_operators_only(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    obj = backend.add("/gone", Obj(object_bytes(20, 100_000), headers=FRESH))
    # this client (127.0.0.1) is not an admin peer here: only the token opens PURGE
    proxy = start_proxy(
        url_of(backend),
        FILEPROXY_ADMIN_ALLOW="192.0.2.0/24",
        FILEPROXY_ADMIN_TOKEN="s3cret-token",
        **cache_env(tmp_dir / "cache"),
    )
    await fetch(session, f"{proxy.url}/gone")
    assert "; hit" in (await fetch(session, f"{proxy.url}/gone")).cache_status
    refused = await session.request("PURGE", f"{proxy.url}/gone")
    assert refused.status == 403 and (await refused.json())["error"] == "forbidden"
    wrong = await session.request(
        "PURGE", f"{proxy.url}/gone", headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status == 403
    assert "; hit" in (await fetch(session, f"{proxy.url}/gone")).cache_status
    assert backend.count("/gone") == 1  # PURGE never reached the backend
    purged = await session.request(
        "PURGE", f"{proxy.url}/gone", headers={"Authorization": "Bearer s3cret-token"}
    )
    assert purged.status == 200 and (await purged.json()) == {"purged": 1, "target": "/gone"}
    after = await fetch(session, f"{proxy.url}/gone")
    assert sha(after.body) == obj.sha256 and "stored" in after.cache_status
    assert backend.count("/gone") == 2


async def test_a_body_the_upstream_keeps_cutting_is_aborted_and_never_cached_whole(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    size = 8 * MIB  # cut after every MiB: the 3 resumes reach 4 MiB, never the end
    backend.add("/cut", Obj(object_bytes(14, size), headers=FRESH, cut=MIB))
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache"))
    for attempt in range(3):
        got = await fetch(session, f"{proxy.url}/cut")
        assert got.status == 200 and got.headers["Content-Length"] == str(size)
        assert got.aborted is not None and got.length < size, (attempt, got.length)
        assert "; hit" not in got.cache_status
    asked = backend.count("/cut")
    assert asked >= 3
    # resumes asked for the exact continuation, on the strong validator
    resumed = [h for p, h, _ in backend.requests if p == "/cut" and "Range" in h]
    assert resumed and all(h.get("If-Range") == '"v1"' for h in resumed)
    # now the upstream mends: the whole object, fetched anew, never the torn one
    backend.objects["/cut"].cut = None
    whole = await fetch(session, f"{proxy.url}/cut")
    assert whole.aborted is None and sha(whole.body) == backend.objects["/cut"].sha256
    hit = await fetch(session, f"{proxy.url}/cut")
    assert "; hit" in hit.cache_status and sha(hit.body) == backend.objects["/cut"].sha256


async def test_head_is_answered_from_a_stored_get_and_cache_status_says_what_happened(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    size = 3 * MIB
    obj = backend.add("/h", Obj(object_bytes(21, size), headers=FRESH))
    small = backend.add("/small", Obj(object_bytes(22, 1000), headers=FRESH))
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache"))
    miss = await fetch(session, f"{proxy.url}/h")
    assert miss.cache_status.startswith("fileproxy; fwd=uri-miss; fwd-status=200")
    assert "; stored" in miss.cache_status and sha(miss.body) == obj.sha256
    head = await fetch(session, f"{proxy.url}/h", method="HEAD")
    assert head.status == 200 and head.length == 0
    assert head.headers["Content-Length"] == str(size) and head.headers["ETag"] == '"v1"'
    assert head.cache_status.startswith("fileproxy; hit")
    assert backend.count("/h") == 1  # the HEAD reached no backend
    # a client's own conditional and Range are answered from the stored GET
    not_modified = await fetch(session, f"{proxy.url}/h", {"If-None-Match": '"v1"'})
    assert not_modified.status == 304 and not_modified.length == 0
    part = await fetch(session, f"{proxy.url}/h", {"Range": "bytes=100-199"})
    assert part.status == 206 and part.body == obj.data[100:200]
    for _ in range(2):  # small objects too, the second from memory
        got = await fetch(session, f"{proxy.url}/small")
        assert got.body == small.data
    assert backend.count("/h") == 1 and backend.count("/small") == 1
    # a bypass says why; the access line and /stats say what the cache did
    bypass = await fetch(session, f"{proxy.url}/h", {"Authorization": "Basic dTpw"})
    assert sha(bypass.body) == obj.sha256 and backend.count("/h") == 2
    assert "fwd=bypass" in bypass.cache_status and "detail=authorization" in bypass.cache_status
    assert await logged(proxy, "/h", 5) == ["miss", "hit", "hit", "hit", "bypass"]
    stats = (await (await session.get(f"{proxy.url}/stats")).json())["cache"]
    assert stats["requests"]["hit"] == 4 and stats["requests"]["miss"] == 2, stats


async def test_a_successful_put_invalidates_the_target_before_its_client_has_the_answer(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    obj = backend.add("/u", Obj(object_bytes(23, 8 * MIB), headers=FRESH, rate=32e6))
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache"))
    stored = await fetch(session, f"{proxy.url}/u", keep=False)
    assert stored.sha256 == obj.sha256 and "stored" in stored.cache_status
    for round_ in range(3):
        hit = await fetch(session, f"{proxy.url}/u", keep=False)
        assert hit.sha256 == obj.sha256 and "; hit" in hit.cache_status, round_
        # RFC 9111 4.4: once the PUT's 200 head is here (its 8 MiB answer still coming),
        # the old object is no longer served
        async with session.put(f"{proxy.url}/u", data=b"new") as put:
            assert put.status == 200
            after = await fetch(session, f"{proxy.url}/u", keep=False)
            assert "; hit" not in after.cache_status, (round_, after.cache_status)
            assert after.sha256 == obj.sha256 and "stored" in after.cache_status
            await put.read()


# ---------------------------------------------------------------- 4. two processes, one directory


@pytest.mark.slow
async def test_two_serves_on_one_cache_dir_fetch_once_survive_kill_9_and_a_restart(
    backend_process: Callable[[dict[str, Any]], Awaitable[BackendProcess]],
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    size = 32 * MIB
    spec = {
        "/both": {"seed": 30, "length": size, "rate": PACE, "headers": FRESH},
        "/killed": {"seed": 31, "length": size, "rate": 12e6, "headers": FRESH},
    }
    backend = await backend_process(spec)
    env = cache_env(tmp_dir / "cache")
    one, two = start_proxy(backend.url, **env), start_proxy(backend.url, **env)
    both = sha(object_bytes(30, size))
    # an object asked at both at once: fetched once, every client exact
    gots = await asyncio.wait_for(
        asyncio.gather(
            *(fetch(session, f"{proxy.url}/both", keep=False) for proxy in (one, two) * 3)
        ),
        60,
    )
    assert all(g.sha256 == both and g.aborted is None for g in gots), [
        (g.status, g.aborted, g.length) for g in gots
    ]
    assert await backend.asked("/both") == 1
    assert await backend.sent("/both") <= 1.15 * size
    # kill -9 the process filling an object: the other's clients still get every byte
    killed = sha(object_bytes(31, size))
    filler = asyncio.create_task(fetch(session, f"{one.url}/killed", keep=False))
    await until(lambda: _sent_at_least(backend, "/killed", 4 * MIB), 15, "the fill started")
    followers = [
        asyncio.create_task(fetch(session, f"{two.url}/killed", keep=False)) for _ in range(3)
    ]
    await until(lambda: _sent_at_least(backend, "/killed", 10 * MIB), 15, "the fill went on")
    one.popen.send_signal(signal.SIGKILL)
    one.popen.wait(10)
    done = await asyncio.wait_for(asyncio.gather(*followers), 60)
    assert all(g.sha256 == killed and g.aborted is None for g in done), [
        (g.status, g.aborted, g.length) for g in done
    ]
    assert (await filler).aborted is not None  # its own client lost its connection

    # a restart: what is stored is a hit, the backend asked nothing more
    # the take-over completes the object behind its readers (the bytes the dead filler
    # wrote past its last commit are fetched again: not durable, so not trusted)
    async def settled() -> bool:
        stats = (await (await session.get(f"{two.url}/stats")).json())["cache"]
        return stats["fills_in_progress"] == 0 and stats["takeovers"] >= 1

    await until(settled, 30, "the take-over completed")
    assert await backend.sent("/killed") <= 1.5 * size
    two.stop()
    asked = (await backend.report())["requests"]
    three = start_proxy(backend.url, **env)
    for path, expected in (("/both", both), ("/killed", killed)):
        got = await fetch(session, f"{three.url}{path}", keep=False)
        assert got.sha256 == expected and "; hit" in got.cache_status, got.cache_status
    after = await backend.report()
    assert after["requests"] == asked, (after["log"], three.log_text()[-4000:])


async def _sent_at_least(backend: BackendProcess, path: str, count: int) -> bool:
    return await backend.sent(path) >= count


# ---------------------------------------------------------------- 5. the disk budget


def disk_use(directory: Path) -> tuple[int, int]:
    """(bytes of the object bodies, bytes of everything) on disk under ``directory``."""
    bodies = total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                used = os.stat(os.path.join(root, name)).st_blocks * 512
                total += used
                if Path(root).name == "objects":
                    bodies += used
    return bodies, total


@contextlib.contextmanager
def sampled_disk_use(directory: Path) -> Iterator[list[tuple[int, int]]]:
    """Samples of ``disk_use`` every 10 ms on a thread while the block runs."""
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            samples.append(disk_use(directory))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(5)


async def test_a_budget_of_three_objects_serves_a_dozen_downloads_never_above_it(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    size, budget = 2 * MIB, 6 * MIB
    objects = {
        f"/b{i}": backend.add(f"/b{i}", Obj(object_bytes(100 + i, size), headers=FRESH))
        for i in range(12)
    }
    directory = tmp_dir / "cache"
    proxy = start_proxy(
        url_of(backend), **cache_env(directory, FILEPROXY_CACHE_MAX_SIZE=str(budget))
    )
    with sampled_disk_use(directory) as samples:
        for i in range(12):  # two at a time, each object twice
            pair = [f"/b{i}", f"/b{(i + 6) % 12}"]
            gots = await asyncio.gather(*(fetch(session, f"{proxy.url}{p}") for p in pair))
            for p, got in zip(pair, gots, strict=True):
                assert got.aborted is None and sha(got.body) == objects[p].sha256, p
    assert samples and max(b for b, _ in samples) <= budget, max(samples)
    # the index, manifests and locks: small beside the bodies
    assert max(t - b for b, t in samples) <= 2 * MIB, max(samples)
    stats = (await (await session.get(f"{proxy.url}/stats")).json())["cache"]
    assert stats["evictions"] >= 9, stats
    assert backend.count("/b0") >= 2  # evicted, then fetched again


async def test_a_full_tmpfs_is_proxied_uncached_and_enospc_mid_fill_never_tears_an_object(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    huge = backend.add("/huge", Obj(object_bytes(40, 6 * MIB), headers=FRESH))
    small = backend.add("/small", Obj(object_bytes(41, MIB), headers=FRESH))
    paced = backend.add("/paced", Obj(object_bytes(42, 2 * MIB), headers=FRESH, rate=4e6))
    with mounted_tmpfs(tmp_dir / "tiny", "size=4m") as tiny:
        # the budget says yes to anything; the filesystem has 4 MiB
        env = cache_env(tiny / "cache", FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
        proxy = start_proxy(url_of(backend), **env)
        try:
            for _ in range(2):  # larger than the disk: relayed whole, uncached
                got = await fetch(session, f"{proxy.url}/huge")
                assert got.status == 200 and sha(got.body) == huge.sha256
                assert "detail=no-room" in got.cache_status, got.cache_status
            assert backend.count("/huge") == 2
            fits = await fetch(session, f"{proxy.url}/small")
            assert sha(fits.body) == small.sha256 and "stored" in fits.cache_status
            assert "; hit" in (await fetch(session, f"{proxy.url}/small")).cache_status
            # another program fills the disk under a running fill: ENOSPC mid-fill
            filling = asyncio.create_task(fetch(session, f"{proxy.url}/paced"))
            await until(_sent_here(backend, "/paced", 256 * 1024), 10, "the fill started")
            with disk_hog(tiny):
                cut = await asyncio.wait_for(filling, 30)
                await until(_logs(proxy, "No space left on device"), 10, "ENOSPC")
                # its client: every byte or an abort, never a short body that looks whole
                assert cut.aborted is not None or sha(cut.body) == paced.sha256
                for _ in range(2):  # while the disk is full: proxied uncached, exact
                    again = await fetch(session, f"{proxy.url}/paced")
                    assert again.aborted is None and sha(again.body) == paced.sha256
                    assert "detail=no-room" in again.cache_status, again.cache_status
                assert "; hit" in (await fetch(session, f"{proxy.url}/small")).cache_status
            stored = await fetch(session, f"{proxy.url}/paced")  # room again
            assert sha(stored.body) == paced.sha256 and "stored" in stored.cache_status
            hit = await fetch(session, f"{proxy.url}/paced")
            assert sha(hit.body) == paced.sha256 and "; hit" in hit.cache_status
        finally:
            proxy.stop()


async def test_the_reader_of_a_fill_that_hits_enospc_still_gets_every_byte(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """A fill that runs out of disk room mid-way: its readers (the client that started it
    and three that joined it) each take the rest from the upstream uncached, from their
    own offset, by Range + If-Range on the strong ETag: every byte exact. Nothing partial
    stays: with room again the object is fetched whole and stored."""
    paced = backend.add("/paced", Obj(object_bytes(43, 3 * MIB), headers=FRESH, rate=3e6))
    with mounted_tmpfs(tmp_dir / "tiny", "size=8m") as tiny:
        env = cache_env(tiny / "cache", FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
        proxy = start_proxy(url_of(backend), **env)
        url = f"{proxy.url}/paced"
        try:
            filling = asyncio.create_task(fetch(session, url))
            await until(_sent_here(backend, "/paced", 256 * 1024), 10, "the fill started")
            joined = [asyncio.create_task(fetch(session, url)) for _ in range(3)]
            await until(_readers_open(session, proxy, 4), 10, "the readers joined the fill")
            with disk_hog(tiny):
                gots = await asyncio.wait_for(asyncio.gather(filling, *joined), 30)
                await until(_logs(proxy, "No space left on device"), 10, "ENOSPC")
            for got in gots:
                assert got.status == 200 and got.headers["Content-Length"] == str(3 * MIB)
                assert got.aborted is None and sha(got.body) == paced.sha256, got.length
            rest = [(h, status) for p, h, status in backend.requests if p == "/paced"][1:]
            assert len(rest) == 4, rest  # one uncached rest per reader
            assert all(h.get("If-Range") == '"v1"' and status == 206 for h, status in rest)
            stats = (await (await session.get(f"{proxy.url}/stats")).json())["cache"]
            assert stats["continued_uncached"] == 4 and stats["aborted"] == 0, stats
            again = await fetch(session, url)  # room again: never the torn object
            assert sha(again.body) == paced.sha256 and "stored" in again.cache_status
            hit = await fetch(session, url)
            assert sha(hit.body) == paced.sha256 and "; hit" in hit.cache_status
        finally:
            proxy.stop()


@pytest.mark.slow
async def test_readers_in_another_process_of_a_fill_that_hits_enospc_get_every_byte(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """Two `fileproxy serve` on one cache directory: the fill runs in one, readers follow
    it from the other. It runs out of room: the other's readers learn why from the fill's
    record (not from an upstream failure) and continue uncached, each byte exact."""
    paced = backend.add("/paced", Obj(object_bytes(44, 3 * MIB), headers=FRESH, rate=3e6))
    with mounted_tmpfs(tmp_dir / "tiny", "size=8m") as tiny:
        env = cache_env(tiny / "cache", FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
        one, two = start_proxy(url_of(backend), **env), start_proxy(url_of(backend), **env)
        try:
            filling = asyncio.create_task(fetch(session, f"{one.url}/paced"))
            await until(_sent_here(backend, "/paced", 256 * 1024), 10, "the fill started")
            elsewhere = [asyncio.create_task(fetch(session, f"{two.url}/paced")) for _ in range(3)]
            await until(_readers_open(session, two, 3), 10, "the other's readers joined")
            with disk_hog(tiny):
                gots = await asyncio.wait_for(asyncio.gather(filling, *elsewhere), 30)
                await until(_logs(one, "No space left on device"), 10, "ENOSPC")
            for got in gots:
                assert got.aborted is None and sha(got.body) == paced.sha256, got.length
            assert backend.count("/paced") == 5  # the fill, then one rest per reader
            ones = (await (await session.get(f"{one.url}/stats")).json())["cache"]
            twos = (await (await session.get(f"{two.url}/stats")).json())["cache"]
            assert ones["continued_uncached"] == 1 and twos["continued_uncached"] == 3
            assert twos["aborted"] == 0 and twos["takeovers"] == 0, twos
            again = await fetch(session, f"{two.url}/paced")
            assert sha(again.body) == paced.sha256 and "stored" in again.cache_status
        finally:
            one.stop()
            two.stop()


async def test_readers_of_a_fill_out_of_room_without_a_strong_etag_are_aborted(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """No ETag, or a weak one: nothing proves another answer holds the same bytes, so a
    reader cannot continue byte-exact: it is aborted (never a body that looks complete),
    and asks the upstream nothing. With room again the object is stored whole."""
    size = 3 * MIB
    objects = {
        "/weak": backend.add("/weak", Obj(object_bytes(45, size), headers=FRESH, rate=3e6,
                                          etag='W/"w1"')),
        "/none": backend.add("/none", Obj(object_bytes(46, size), headers=FRESH, rate=3e6,
                                          etag=None)),
    }  # fmt: skip
    with mounted_tmpfs(tmp_dir / "tiny", "size=8m") as tiny:
        env = cache_env(tiny / "cache", FILEPROXY_CACHE_MAX_SIZE=str(1 << 30))
        proxy = start_proxy(url_of(backend), **env)
        try:
            for path, obj in objects.items():
                url = f"{proxy.url}{path}"
                filling = asyncio.create_task(fetch(session, url))
                await until(_sent_here(backend, path, 256 * 1024), 10, "the fill started")
                joined = asyncio.create_task(fetch(session, url))
                await until(_readers_open(session, proxy, 2), 10, "the reader joined")
                with disk_hog(tiny):
                    gots = await asyncio.wait_for(asyncio.gather(filling, joined), 30)
                for got in gots:
                    assert got.headers["Content-Length"] == str(size)
                    assert got.aborted is not None and got.length < size, (path, got.length)
                assert backend.count(path) == 1  # no uncached rest was asked
                again = await fetch(session, url)
                assert sha(again.body) == obj.sha256 and "stored" in again.cache_status
            stats = (await (await session.get(f"{proxy.url}/stats")).json())["cache"]
            assert stats["continued_uncached"] == 0 and stats["aborted"] == 4, stats
        finally:
            proxy.stop()


async def test_readers_of_a_fill_whose_upstream_failed_are_aborted_and_ask_it_nothing(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """An upstream that fails beyond mending (cut after every MiB; the fill's 3 resumes do
    not reach the end): its six readers are aborted, and none asks the upstream again:
    the fill's four requests in all, not four per reader."""
    size = 8 * MIB
    backend.add("/cut", Obj(object_bytes(47, size), headers=FRESH, cut=MIB, rate=2e6))
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache"))
    url = f"{proxy.url}/cut"
    leader = asyncio.create_task(fetch(session, url))
    await until(_sent_here(backend, "/cut", 64 * 1024), 10, "the fill started")
    joined = [asyncio.create_task(fetch(session, url)) for _ in range(5)]
    await until(_readers_open(session, proxy, 6), 10, "the readers joined the fill")
    gots = await asyncio.wait_for(asyncio.gather(leader, *joined), 30)
    for got in gots:
        assert got.aborted is not None and got.length < size, got.length
    assert backend.count("/cut") == 4, backend.requests  # the fill and its 3 resumes
    stats = (await (await session.get(f"{proxy.url}/stats")).json())["cache"]
    assert stats["continued_uncached"] == 0 and stats["aborted"] == 6, stats


async def test_requests_waiting_on_another_requests_miss_hold_no_admission_place(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """FILEPROXY_ACTIVE_REQUESTS=1: requests that wait for another request's upstream
    (the miss they collapse into) give their place back as that request does, so a hit
    of another object is answered while the slow upstream has not yet answered."""
    slow = backend.add("/slow", Obj(object_bytes(48, MIB), headers=FRESH, head_delay=3.0))
    other = backend.add("/other", Obj(object_bytes(49, MIB), headers=FRESH))
    env = cache_env(tmp_dir / "cache", FILEPROXY_ACTIVE_REQUESTS="1")
    proxy = start_proxy(url_of(backend), **env)
    assert "stored" in (await fetch(session, f"{proxy.url}/other")).cache_status
    waiting = [asyncio.create_task(fetch(session, f"{proxy.url}/slow")) for _ in range(4)]
    await until(_arrived(proxy, 4), 10, "the four requests arrived")
    hit = await asyncio.wait_for(fetch(session, f"{proxy.url}/other"), 10)
    assert sha(hit.body) == other.sha256 and "; hit" in hit.cache_status
    assert backend.count("/slow") == 0  # answered before the slow upstream's head
    health = await (await session.get(f"{proxy.url}/health")).json()
    assert health["active_requests"]["waiting"] == 0, health["active_requests"]
    for got in await asyncio.wait_for(asyncio.gather(*waiting), 30):
        assert got.aborted is None and sha(got.body) == slow.sha256
    assert backend.count("/slow") == 1


def _arrived(proxy: Process, count: int) -> Callable[[], Awaitable[bool]]:
    """``count`` requests are in the proxy: working on (in flight) or waiting for a place
    in the gate (the /health probe is neither)."""

    async def arrived() -> bool:
        async with aiohttp.ClientSession() as probe:
            health = await (await probe.get(f"{proxy.url}/health")).json()
        return int(health["in_flight"]) + int(health["active_requests"]["waiting"]) >= count

    return arrived


def _readers_open(
    session: aiohttp.ClientSession, proxy: Process, count: int
) -> Callable[[], Awaitable[bool]]:
    async def joined() -> bool:
        stats = (await (await session.get(f"{proxy.url}/stats")).json())["cache"]
        return int(stats["readers_open"]) >= count

    return joined


def _logs(process: Process, text: str) -> Callable[[], Awaitable[bool]]:
    async def logged() -> bool:
        return text in process.log_text()

    return logged


def _sent_here(backend: CacheBackend, path: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def sent() -> bool:
        return backend.sent[path] >= count

    return sent


@contextlib.contextmanager
def disk_hog(directory: Path) -> Iterator[None]:
    """Another program's file that takes every free byte of ``directory``'s filesystem."""
    hog = directory / "hog"
    try:
        with contextlib.suppress(OSError), open(hog, "wb") as out:
            while True:
                out.write(bytes(65536))
        yield
    finally:
        hog.unlink(missing_ok=True)


async def test_an_auto_budget_is_one_for_the_directory_not_one_per_worker(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    tmp_dir: Path,
) -> None:
    """FILEPROXY_CACHE_MAX_SIZE=auto, two gunicorn workers on one cache directory: both
    have the budget the first computed, and so does a worker the master starts again
    after another program took most of the disk (computed from the free space it saw,
    it would have a smaller one: two budgets for one directory)."""
    with mounted_tmpfs(tmp_dir / "disk", "size=64m") as disk:
        env = cache_env(disk / "cache", FILEPROXY_CACHE_MAX_SIZE="auto", FILEPROXY_WORKERS="2")
        gunicorn = start_gunicorn(tmp_dir, url_of(backend), **env)
        hog = disk / "another-programs-file"
        try:
            first = await _budgets(session, gunicorn.url, 2)
            assert set(first.values()) == {32 * MIB}, first  # half the filesystem
            hog.write_bytes(bytes(40 * MIB))  # free: 24 MiB
            os.kill(next(iter(first)), signal.SIGKILL)
            gunicorn.wait_for_log("fileproxy worker started", count=3, timeout=60)
            after = await _budgets(session, gunicorn.url, 2, not_in=set(first))
            assert set(after.values()) == {32 * MIB}, after
        finally:
            gunicorn.stop()
            hog.unlink(missing_ok=True)


async def _budgets(
    session: aiohttp.ClientSession, url: str, workers: int, not_in: set[int] | None = None
) -> dict[int, int]:
    """Each worker's cache budget (pid: max_size) from /health, until ``workers`` of them
    answered, one of them not in ``not_in`` (the ones killed answer no more)."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(seen) < workers or (not_in and not set(seen) - not_in):
        assert time.monotonic() < deadline, seen
        try:
            health = await (await session.get(f"{url}/health")).json()
        except aiohttp.ClientConnectionError:  # the killed worker's connection
            continue
        seen[int(health["pid"])] = int(health["cache"]["max_size"])
    return seen


# ---------------------------------------------------------------- 6. FILEPROXY_CACHE=off


async def test_cache_off_is_the_relay_of_before(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    obj = backend.add("/off", Obj(object_bytes(50, MIB), headers=FRESH))
    proxy = start_proxy(url_of(backend), **cache_env(tmp_dir / "cache", FILEPROXY_CACHE="off"))
    for _ in range(3):
        got = await fetch(session, f"{proxy.url}/off")
        assert sha(got.body) == obj.sha256 and "Cache-Status" not in got.headers
    head = await fetch(session, f"{proxy.url}/off", method="HEAD")
    assert head.status == 200 and "Cache-Status" not in head.headers
    ranged = await fetch(session, f"{proxy.url}/off", {"Range": "bytes=10-19"})
    assert ranged.status == 206 and ranged.body == obj.data[10:20]
    assert backend.count("/off") == 5  # every request reached the backend, as it asked
    assert backend.requests[-2][1].get("Range") is None
    assert backend.requests[-1][1].get("Range") == "bytes=10-19"
    # PURGE is a method like any other: relayed to the backend, as before
    purge = await session.request("PURGE", f"{proxy.url}/off")
    assert purge.status == 200 and backend.count("/off") == 6
    assert not (tmp_dir / "cache").exists() or disk_use(tmp_dir / "cache")[0] == 0
    assert await logged(proxy, "/off", 6) == ["-"] * 6
    health = await (await session.get(f"{proxy.url}/health")).json()
    assert health["cache"]["state"] == "off"


# bytes a backend may send that are not ASCII: UTF-8 (a file name in Content-Disposition)
# and bytes that are no UTF-8 at all
UTF8_NAME = 'attachment; filename="résumé €.pdf"'.encode()
RAW_BYTES = b"caf\xe9 \xff"


async def test_what_is_stored_and_hit_keeps_every_byte_of_target_and_fields(
    start_proxy: Callable[..., Process], tmp_dir: Path
) -> None:
    """Header values that are not ASCII are stored and answered as the backend sent them,
    byte for byte (the cache never takes them for Latin-1). (A target with raw bytes above
    ASCII is refused by the parser, a 400 before the cache; its percent-encoded form is
    ASCII.)"""
    body = b"0123456789" * 100
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nCache-Control: max-age=600\r\n"
        b'ETag: "e1"\r\nContent-Disposition: %b\r\nX-Raw: %b\r\n\r\n%b'
        % (len(body), UTF8_NAME, RAW_BYTES, body)
    )
    asked: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                asked.append(head.split(b" ")[1])
                writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = start_proxy(f"http://127.0.0.1:{port}", **cache_env(tmp_dir / "cache"))
    try:
        for target in (b"/plain", b"/r%C3%A9sum%C3%A9-%E2%82%AC"):
            heads = []
            for _ in range(2):  # stored, then a hit
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"GET %b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % target)
                got = await asyncio.wait_for(reader.read(), 30)
                writer.close()
                head, _, got_body = got.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert got_body == body, (head, proxy.log_text()[-3000:])
                lines = head.split(b"\r\n")
                assert b"Content-Disposition: " + UTF8_NAME in lines, head
                assert b"X-Raw: " + RAW_BYTES in lines, head
                heads.append(head)
            assert b"; hit" in heads[1], heads[1]
        assert asked == [b"/plain", b"/r%C3%A9sum%C3%A9-%E2%82%AC"]
    finally:
        proxy.stop()
        server.close()
        await server.wait_closed()


async def test_a_stored_object_is_answered_while_the_admission_limit_refuses_the_upstream(
    backend: CacheBackend,
    session: aiohttp.ClientSession,
    start_proxy: Callable[..., Process],
    tmp_dir: Path,
) -> None:
    """The admission rate protects the upstream: a hit, which never reaches it, is not
    refused by it (nginx's cache answers hits whatever its upstream's state)."""
    backend.add("/stored", Obj(object_bytes(51, 4096), headers=FRESH))
    backend.add("/other", Obj(object_bytes(52, 4096), headers=FRESH))
    limit = {f"FILEPROXY_LIMIT_{name}": "1" for name in ("MIN", "INITIAL", "MAX", "BURST")}
    proxy = start_proxy(
        url_of(backend),
        **cache_env(tmp_dir / "cache", FILEPROXY_LIMIT_ENFORCE="always",
                    FILEPROXY_LIMIT_STATUS="429", **limit),
    )  # fmt: skip
    try:
        first = await fetch(session, f"{proxy.url}/stored")
        assert first.status == 200 and "stored" in first.cache_status, first.cache_status
        hits = [await fetch(session, f"{proxy.url}/stored") for _ in range(5)]
        assert [h.status for h in hits] == [200] * 5, [h.status for h in hits]
        assert all("; hit" in h.cache_status for h in hits), [h.cache_status for h in hits]
        # the limit is in force meanwhile: what must reach the upstream is refused
        refused = [(await fetch(session, f"{proxy.url}/other")).status for _ in range(3)]
        assert 429 in refused, refused
    finally:
        proxy.stop()
