"""The cache's I/O service: between "a client request head arrived" and "bytes to send".

HTTP-layer neutral: a data plane (aiohttp today, the asyncio.Protocol one of issue 21
next) calls it with the request's method, target and raw header pairs, and gets back
either "proxy it as you always do" or an ``Answer`` to send: a status, the header pairs,
and a body that reads the cache file as it is written (an async iterator of blocks, or
``(fd, offset, count)`` runs of committed bytes for sendfile). Every HTTP rule comes from
``fileproxy.cache.policy`` (pure, time passed in); the disk from
``fileproxy.delivery.cache_store``. The interface the data plane calls::

    cache = CacheService(settings)            # one per worker, opened at start
    await cache.open()                        # cache.close() at exit, BEFORE the upstream
                                              # clients: running fills pause, kept
    answer = cache.hit(method, target, headers, now=time.time())
    if answer is not None:                    # a fresh hit of an object held hot, at
        send it as below                      # once (its head also in answer.raw_fields)
    decision = await cache.lookup(method, target, headers, now=time.time())
    if decision.outcome is Outcome.BYPASS:    # not for the cache: relay as today,
        ...                                   # adding decision.extra_headers
    elif decision.outcome is Outcome.GATEWAY_TIMEOUT:
        ...                                   # only-if-cached and nothing: 504 (errors.py)
    else:
        answer = await cache.respond(decision, fetch, waiting=on_upstream)
                                              # fetch(conditions) -> upstream; waiting():
                                              # it waits on another request's upstream
        if answer.upstream is not None:       # not stored (uncacheable, no room...):
            relay(answer.upstream, extra=answer.extra_headers)   # as today
        else:
            send_head(answer.status, answer.headers)
            if answer.body is not None:       # None for HEAD, 304, 416
                try:                          # a small object: body.in_memory is its bytes
                    async for block in answer.body: write(block)   # or body.runs()
                except CacheAborted: abort the client connection (never a short body)
                finally: answer.body.close()
    log(word=answer.log_word)                 # hit / miss / revalidated / stale / bypass
    await cache.invalidate(method, target, status, request_headers, response_headers)
                                              # after an unsafe method's 2xx/3xx
    await cache.purge(target)                 # PURGE (admin peers / token): every variant
    cache.snapshot()  # /stats, /health (no I/O); metrics.cache_metrics(cache, pid)

``fetch`` is the data plane's: ``await fetch(conditions)`` sends the client's request
upstream as GET (the headers it forwards, without the fields in ``CONDITIONAL_FIELDS``,
plus ``conditions``: the cache's own Range, If-Range, If-None-Match, If-Modified-Since),
with its replicas, retries and mid-body resume, and returns an object with the interface
of ``fileproxy.upstream.client.UpstreamResponse`` (``status``, ``raw_headers``,
``content.read(n)``, ``release()``, ``close()``). It must not depend on the client's
connection: a fill goes on after the client that caused it left, and a take-over of an
orphaned fill uses the fetch of the reader that found it orphaned.

How a miss becomes one fill per object per host: the first request of a key takes a
"miss lock" (an asyncio future in the process, an ``flock`` on a file in the cache
directory across processes) until its upstream answer is either stored (the fill has its
lease and its row: everyone else opens a reader) or found not storable; requests that
arrive meanwhile wait for it, then read the fill from byte 0 at their own pace. A key
found not storable is not coalesced again for ``PASS_S`` in that process (Varnish's
hit-for-miss): concurrent requests for private answers must not queue behind each other.

Hits without the index: each worker holds the complete objects it served hot (``_Hot``:
the head parsed, filtered and rendered once, the freshness worked out once, the body
file's path and identity, a small object's body once read whole). ``hit`` answers a
fresh hit of a request without directives, ranges, conditions or credentials from there
with a ``stat`` (a body in memory, a HEAD) or the ``open`` of the file to send (a shared
``flock``: pinned against eviction like a reader); ``lookup`` uses the same entries
before it asks the index. A file that is no longer the one held (removed by a purge, an
eviction or a replacement anywhere on the host, or touched by a 304's merged head) is
forgotten and the index asked again: nothing is answered from memory after another
process removed it. The uses these hits count reach the index's eviction state every
``HITS_FLUSH_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import orjson

from fileproxy.cache import policy
from fileproxy.cache.manifest import ByteRanges, ChunkMap, StoredHead
from fileproxy.cache.policy import Forward, Reuse, ReuseDecision, StoredResponse
from fileproxy.delivery.cache_store import (
    HITS_FLUSH_S,
    CacheStore,
    Fill,
    FillAbandoned,
    FillBusy,
    FillOrphaned,
    FillOutOfRoom,
    HeldFile,
    NotStored,
    Reader,
    ReservationRefused,
    StoredObject,
    StoreFull,
    acquire_lock_file,
    remove_lock_file,
)
from fileproxy.http.zero_copy import ZeroCopyStats
from fileproxy.settings import Settings

__all__ = [
    "CONDITIONAL_FIELDS",
    "Answer",
    "CacheAborted",
    "CacheService",
    "CachedBody",
    "Decision",
    "Fetch",
    "MemoryBody",
    "Outcome",
    "UpstreamAnswer",
    "auto_max_size",
    "default_cache_dir",
]

log = logging.getLogger("fileproxy.cache")

HeaderPair = tuple[bytes, bytes]
#: request fields the cache sets itself on what it sends upstream (the data plane drops
#: the client's, then adds ``conditions``)
CONDITIONAL_FIELDS = frozenset(
    {"range", "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since"}
)
#: a block read from the cache file for the copying path (the zero-copy path uses runs)
READ_BLOCK = 256 * 1024
#: bytes read from the upstream per write into the cache file
WRITE_BLOCK = 256 * 1024
#: a key found not storable is not coalesced again for this long in this process
PASS_S = 30.0
#: a miss waiting for another process's miss lock (its upstream's response head) gives
#: up waiting after this long and fetches on its own, uncached
MISS_WAIT_S = 30.0
MISS_POLL_S = 0.02
#: a reader takes an orphaned fill over at most this often before it aborts its client
MAX_TAKEOVERS = 8
#: a complete object up to this size is kept in memory once read whole, and its hits are
#: answered from there (no thread hop, no file): a hit of 1 KiB then costs a ``stat`` (is
#: it still stored?) and a few header copies
SMALL_OBJECT_MAX = 64 * 1024
#: the memory those small objects may take per worker (least recently used go first)
SMALL_MEMORY = 64 * 1024 * 1024
#: complete objects a worker holds hot (their head parsed and rendered, their freshness
#: worked out, their file's identity): least recently used go first
HOT_MAX = 16_384
#: a request with one of these fields is answered through ``lookup`` and ``respond``
#: (directives, credentials, ranges, conditions, an upgrade), never by ``hit``
_NOT_PLAIN = frozenset(
    {
        b"cache-control",
        b"pragma",
        b"authorization",
        b"range",
        b"if-range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"upgrade",
    }
)
#: stored fields ``hit`` gives as header pairs, not in its pre-rendered lines: the data
#: plane adds Date when there is none and may set the CORS ones (X-Request-ID is the
#: request's own: the stored one is never sent)
_SET_PER_RESPONSE = frozenset(
    {b"date", b"x-request-id", b"access-control-allow-origin", b"access-control-expose-headers"}
)
_CONTROL = re.compile(rb"[\r\n\0]").search
#: how often the disk figures of ``report()``/metrics are refreshed from the index
TOTALS_REFRESH_S = 5.0
#: FILEPROXY_CACHE_MAX_SIZE=auto takes this share of the cache filesystem's size
AUTO_SHARE = 0.5
#: where the ``auto`` budget of the directory is written down (see ``shared_budget``)
BUDGET_FILE = "budget.json"
#: never cached: hop-by-hop fields, and the framing of the response as it came
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_CONTENT_RANGE = re.compile(rb"bytes (\d+)-(\d+)/(\d+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class CacheAborted(Exception):
    """The fill a body follows failed beyond mending (or its object went away): abort the
    client's connection; never end its body as if it were complete."""


class _NotMended(Exception):
    """An upstream answer that is not the exact continuation of a stored object."""


class Content(Protocol):
    async def read(self, n: int = -1) -> bytes | memoryview: ...


class UpstreamAnswer(Protocol):
    """What ``fetch`` returns: ``fileproxy.upstream.client.UpstreamResponse``'s interface."""

    status: int
    raw_headers: tuple[tuple[bytes, bytes], ...]

    @property
    def content(self) -> Content: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


#: ``await fetch(conditions)``: see the module's docstring
Fetch = Callable[[Sequence[tuple[str, str]]], Awaitable[UpstreamAnswer]]


class Outcome(StrEnum):
    """What ``lookup`` decided; its value is the access log's word."""

    BYPASS = "bypass"  # not for the cache: relay as today
    HIT = "hit"  # fresh (or stale where the request allows it): served from the cache
    REVALIDATE = "revalidated"  # stored, must be revalidated: ``respond`` sends conditions
    STALE = "stale"  # served stale while it is revalidated in the background (RFC 5861)
    MISS = "miss"  # nothing usable: ``respond`` fetches, and stores if it may
    GATEWAY_TIMEOUT = "gateway-timeout"  # only-if-cached and nothing usable: answer 504


@dataclass
class Decision:
    """``lookup``'s answer. ``extra_headers``: what a BYPASS response gets (Cache-Status)."""

    outcome: Outcome
    method: str
    target: bytes
    request_headers: tuple[HeaderPair, ...]
    now: float
    reason: str = ""
    reuse: ReuseDecision | None = None
    stored: StoredObject | None = None
    response: StoredResponse | None = None
    fwd: Forward | None = None
    memory: bytes | None = None  # the stored body, when it is a small object held in memory
    hot: _Hot | None = None  # ``stored`` as this worker holds it hot (its file, its head)

    @property
    def conditions(self) -> list[tuple[bytes, bytes]]:
        """REVALIDATE: the validators ``respond`` sends (If-None-Match, If-Modified-Since)."""
        if self.response is None:
            return []
        return [(_b(n), _b(v)) for n, v in policy.conditional_headers(self.response)]

    @property
    def cache_status(self) -> str:
        if self.outcome is Outcome.BYPASS:
            fwd = self.fwd or Forward.BYPASS
            detail = self.reason if self.reason and self.reason != fwd.value else None
            return policy.cache_status(fwd=fwd, detail=detail)
        if self.reuse is not None:
            return self.reuse.cache_status()
        return policy.cache_status(fwd=self.fwd or Forward.URI_MISS)

    @property
    def extra_headers(self) -> list[HeaderPair]:
        return [(b"Cache-Status", self.cache_status.encode("latin-1"))]


@dataclass
class Answer:
    """What to send. Either ``upstream`` (relay it as today, with ``extra_headers``) or
    ``status`` + ``headers`` (complete: Content-Length, Age, Cache-Status) + ``body``
    (None for HEAD, 304, 416; the caller closes it). ``raw_fields``: more header lines
    of the head, rendered (``Name: value\r\n`` each, from ``hit``): to send as they are,
    after ``headers``; never a framing, hop-by-hop or per-response field."""

    log_word: str
    cache_status: str
    status: int = 0
    headers: list[HeaderPair] = field(default_factory=list)
    body: CachedBody | None = None
    upstream: UpstreamAnswer | None = None
    raw_fields: bytes = b""

    @property
    def extra_headers(self) -> list[HeaderPair]:
        return [(b"Cache-Status", self.cache_status.encode("latin-1"))]

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        if self.upstream is not None:
            self.upstream.close()


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _name(value: str | bytes) -> bytes:
    return _b(value).strip().lower()


def _field(headers: Sequence[tuple[str | bytes, str | bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if _name(n) == name:
            return _b(v).strip()
    return None


def _fields(headers: Sequence[tuple[str | bytes, str | bytes]], name: bytes) -> list[bytes]:
    return [_b(v).strip() for n, v in headers if _name(n) == name]


def strong_etag(headers: Sequence[tuple[str | bytes, str | bytes]]) -> bytes | None:
    """The ETag when it is a strong one (If-Range needs a strong validator)."""
    tag = _field(headers, b"etag")
    if tag is None or tag.startswith(b"W/") or len(tag) < 2 or not tag.startswith(b'"'):
        return None
    return tag


def encode_variant(key: policy.VaryKey) -> bytes:
    return orjson.dumps([list(pair) for pair in key]) if key else b""


def decode_variant(variant: bytes) -> policy.VaryKey:
    if not variant:
        return ()
    return tuple((str(name), value) for name, value in orjson.loads(variant))


def default_cache_dir() -> str:
    """FILEPROXY_CACHE_DIR empty: one directory under the system temp dir, shared by the
    workers (they coordinate their fills through it) and kept across restarts."""
    return os.path.join(tempfile.gettempdir(), "fileproxy-cache")


def auto_max_size(fs_size: int, fs_free: int, held: int, min_free: int) -> int:
    """FILEPROXY_CACHE_MAX_SIZE=auto: half the cache filesystem's size, at most what the
    cache may grow to without eating into the watermark (free now plus what it holds
    already, less ``min_free``): the other half stays for whatever else lives there."""
    return max(0, min(int(fs_size * AUTO_SHARE), fs_free + held - min_free))


def shared_budget(directory: Path, compute: Callable[[], int]) -> tuple[int, int]:
    """One ``FILEPROXY_CACHE_MAX_SIZE=auto`` budget for every process on ``directory``
    (gunicorn workers, several ``fileproxy serve``), not one per process computed from
    the free space each happened to see at its start: the first process to open the
    directory (no other holds it open) computes it with ``compute()`` and writes it
    down; the others, and a worker restarted while others run, read it. The budget is an
    upper bound: the free-space watermark is checked live at every reservation.
    Blocking (a thread). Returns (budget, a descriptor to keep open while this process
    uses the directory, and to close after)."""
    locks = directory / "locks"
    mutex = os.open(locks / "budget.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)  # one process at a time decides
        users = os.open(locks / "users.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:  # others use the directory: theirs is the budget
                alone = False
            budget = None if alone else _read_budget(directory / BUDGET_FILE)
            if budget is None:
                budget = compute()
                record = directory / f"{BUDGET_FILE}.{os.getpid()}"
                try:
                    record.write_bytes(orjson.dumps({"max_size": budget}))
                    os.replace(record, directory / BUDGET_FILE)
                except OSError as error:  # a full disk: the others compute their own
                    record.unlink(missing_ok=True)
                    log.warning("the cache budget is not written down: %s", error)
            fcntl.flock(users, fcntl.LOCK_SH)  # the mutex keeps others out meanwhile
        except BaseException:
            os.close(users)
            raise
    finally:
        os.close(mutex)
    return budget, users


def _close_budget_fd(done: asyncio.Future[tuple[int, int]]) -> None:
    if not done.cancelled() and done.exception() is None:
        os.close(done.result()[1])


def _read_budget(path: Path) -> int | None:
    try:
        value = orjson.loads(path.read_bytes()).get("max_size")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def _single_range(value: bytes | None, length: int) -> tuple[int, int] | str | None:
    """A single byte range ``[start, end)`` of ``length``; None to send it whole (no
    Range, several ranges or a syntax we do not serve partially); "unsatisfiable"."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.decode("latin-1").strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        count = int(last)
        if count == 0:
            return "unsatisfiable"
        return max(0, length - count), length
    start = int(first)
    end = length if not last else min(int(last) + 1, length)
    if last and int(last) < start:
        return None
    if start >= length:
        return "unsatisfiable"
    return start, end


def _cold_range(value: bytes | None) -> tuple[int, int | None] | None:
    """A cold miss's single Range as (first byte, last byte + 1 or None); None when the
    request has none (or a suffix, which needs the length first)."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.decode("latin-1").strip())
    if match is None or not match.group(1):
        return None
    start = int(match.group(1))
    if match.group(2):
        last = int(match.group(2))
        return None if last < start else (start, last + 1)
    return start, None


def _stored_response(stored: StoredObject) -> StoredResponse:
    head = stored.head
    return StoredResponse(
        head.status, head.headers, head.request_time, head.response_time,
        decode_variant(stored.variant),
    )  # fmt: skip


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells a body file from any other one at its path: a file removed (purge,
    eviction, a replacement: a new generation, a new path), recreated (a cache directory
    wiped under a running worker: generations start again) or changed (a head updated
    elsewhere touches it, see ``CacheStore.update_head``; a truncation) is not the one
    a hot entry knows."""
    return st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size


class _Hot:
    """A complete stored object this worker answers without the index: its head parsed,
    filtered and rendered once, its freshness worked out once (``policy.freshness``),
    where its body file is and which file that is (``_identity``), and for a small object
    the body itself once read whole. Every use checks the file is still that one (a
    ``stat``, or the ``open`` that sends it): an object purged, evicted or replaced by any
    process on the host is never answered from here."""

    __slots__ = (
        "body",
        "fields",
        "freshness",
        "headers",
        "identity",
        "kept",
        "path",
        "response",
        "stored",
        "vary",
    )  # fmt: skip

    def __init__(
        self,
        stored: StoredObject,
        response: StoredResponse,
        path: str,
        identity: tuple[int, int, int, int, int],
    ) -> None:
        self.stored = stored
        self.response = response
        self.path = path
        self.identity = identity
        self.freshness = policy.freshness(response)
        self.vary = policy.vary_fields(response.headers)  # None: Vary: *
        self.body: bytes | None = None
        #: the stored fields a cache answer repeats
        self.headers = [
            (_b(n), _b(v))
            for n, v in response.headers
            if _name(n) not in _HOP_BY_HOP
            and _name(n) not in (b"age", b"content-length", b"content-range")
        ]
        lines: list[bytes] = []
        self.kept: list[HeaderPair] = []  # ``_SET_PER_RESPONSE`` fields, as pairs
        self.fields: bytes | None = None  # the others rendered; None: not safe to render
        for name, value in self.headers:
            if _CONTROL(name) or _CONTROL(value) or b":" in name:
                return  # never rendered as is (the data plane's own checks refuse it)
            lower = name.lower()
            if lower in _SET_PER_RESPONSE:
                if lower != b"x-request-id":
                    self.kept.append((name, value))
            else:
                lines.append(b"%s: %s\r\n" % (name, value))
        self.fields = b"".join(lines)


async def _no_fetch(conditions: Sequence[tuple[str, str]]) -> UpstreamAnswer:
    raise CacheAborted("a complete object is never fetched again by its readers")


class _MissLock:
    """The right to fetch a missed key (see the module's docstring)."""

    def __init__(self, service: CacheService, key: bytes, fd: int, path: Path) -> None:
        self.service, self.key, self.fd, self.path = service, key, fd, path
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def release(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            held = os.fstat(fd)
            with contextlib.suppress(FileNotFoundError):
                current = os.stat(self.path)
                if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                    os.unlink(self.path)
        finally:
            os.close(fd)
            if self.service._leaders.get(self.key) is self:
                del self.service._leaders[self.key]
            if not self.future.done():
                self.future.set_result(None)


class CacheService:
    """The cache of one worker (see the module's docstring)."""

    def __init__(self, settings: Settings, *, durable: bool = True) -> None:
        self.enabled = settings.cache
        self.directory = Path(settings.cache_dir or default_cache_dir())
        self.configured_max_size = settings.cache_max_size
        self.min_free = settings.cache_min_free
        self.max_object = settings.cache_max_object
        self.range_fill = settings.cache_range_fill
        self.durable = durable
        self.store: CacheStore | None = None
        self.error: str | None = None  # why the cache is off although enabled
        self._leaders: dict[bytes, _MissLock] = {}
        self._passes: dict[bytes, float] = {}
        self._takeovers: dict[tuple[bytes, bytes], asyncio.Future[bool]] = {}
        self._revalidating: set[bytes] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._totals: dict[str, int] = {}
        self._totals_at = 0.0
        self._refresher: asyncio.Future[None] | None = None
        self._users_fd = -1  # held (shared) while this process uses an ``auto`` budget
        # complete objects held hot: key -> variant -> entry (oldest generation first)
        self._hot: OrderedDict[bytes, dict[bytes, _Hot]] = OrderedDict()
        self._hot_count = 0
        self._small_bytes = 0  # of the small bodies the hot entries hold
        self.counters: Counter[str] = Counter()
        self.zero_copy = ZeroCopyStats()  # hit bytes the data plane sent by sendfile

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """At worker start. A directory that cannot be used turns the cache off for this
        worker (``error`` says why, /health shows it), it never stops the proxy."""
        if not self.enabled:
            return
        store = CacheStore(self.directory, max_size=0, min_free=self.min_free, durable=self.durable)
        try:
            await store.open()
            totals = await store.stats()
        except Exception as error:  # OSError, sqlite3.Error, CacheStoreError
            self.error = f"{self.directory}: {error}"
            log.warning("the cache is off in this worker: %s", self.error)
            with contextlib.suppress(Exception):
                await store.close()
            return
        if self.configured_max_size == "auto":

            def compute() -> int:
                usage = shutil.disk_usage(self.directory)
                return auto_max_size(
                    usage.total, usage.free, totals["bytes_reserved"], self.min_free
                )

            budget = asyncio.get_running_loop().run_in_executor(
                None, shared_budget, self.directory, compute
            )
            try:
                store.max_size, self._users_fd = await asyncio.shield(budget)
            except asyncio.CancelledError:  # the descriptor, once there, is nobody's
                budget.add_done_callback(_close_budget_fd)
                raise
            except OSError as error:
                self.error = f"{self.directory}: {error}"
                log.warning("the cache is off in this worker: %s", self.error)
                await store.close()
                return
        else:
            store.max_size = int(self.configured_max_size)
        self.store = store
        self._totals, self._totals_at = totals, time.monotonic()
        self._refresher = asyncio.ensure_future(self._refresh_totals_now_and_then())

    async def _refresh_totals_now_and_then(self) -> None:
        """Disk figures for a scrape that does no I/O (``snapshot``), and the uses of the
        hits answered without a reader for the eviction policy (batched: one index
        transaction per ``HITS_FLUSH_S`` at most, none while there are none)."""
        while True:
            for _ in range(max(1, round(TOTALS_REFRESH_S / HITS_FLUSH_S))):
                await asyncio.sleep(HITS_FLUSH_S)
                if self.store is not None:
                    try:
                        await self.store.flush_hits()
                    except Exception as error:  # sqlite3 or OS errors: the policy is a bit off
                        log.info("cache uses not recorded: %s", error)
            try:
                await self.refresh_totals()
            except Exception as error:  # sqlite3 or OS errors: the figures get older
                log.info("cache figures not refreshed: %s", error)

    async def close(self) -> None:
        """At worker exit: fills still running are paused (kept for a later resume)."""
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for lock in list(self._leaders.values()):
            lock.release()
        store, self.store = self.store, None
        if store is not None:
            await store.close()
        users, self._users_fd = self._users_fd, -1
        if users >= 0:
            os.close(users)  # the last process to leave lets the next first one compute

    async def __aenter__(self) -> CacheService:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def active(self) -> bool:
        return self.store is not None

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ lookup

    async def lookup(
        self,
        method: str | bytes,
        target: str | bytes,
        headers: Sequence[tuple[str | bytes, str | bytes]],
        now: float,
    ) -> Decision:
        """What to do with a request (RFC 9111 4 via ``policy.reuse``)."""
        method_text = _b(method).decode("latin-1").upper()
        key = _b(target)
        request_headers = tuple((_b(n), _b(v)) for n, v in headers)

        def decide(outcome: Outcome, reason: str = "", **more: Any) -> Decision:
            decision = Decision(outcome, method_text, key, request_headers, now, reason, **more)
            if outcome is Outcome.BYPASS:
                self.counters["bypass"] += 1
            return decision

        if self.store is None:
            return decide(Outcome.BYPASS, "off" if not self.enabled else "unavailable")
        if method_text not in ("GET", "HEAD"):
            return decide(Outcome.BYPASS, "method", fwd=Forward.METHOD)
        if _field(request_headers, b"upgrade") is not None:
            return decide(Outcome.BYPASS, "upgrade")
        if b"," in (_field(request_headers, b"range") or b""):
            # several ranges: the backend answers multipart/byteranges, as without the
            # cache; from the cache they would get the whole object
            return decide(Outcome.BYPASS, "multi-range")
        chosen: tuple[StoredObject, StoredResponse] | None = None
        hot = self._hot_choice(key, request_headers)
        if hot is not None:
            if self._still_there(hot):
                chosen = hot.stored, hot.response
                variants = [hot.stored]
            else:
                self._forget(key)
                hot = None
        if chosen is None:
            variants = await self.store.variants(key)
            chosen = self._choose(variants, request_headers)
            if chosen is not None and chosen[0].complete:
                hot = self._warm(key, variants, chosen[0])
        if chosen is not None and _field(request_headers, b"authorization") is not None:
            cc = policy.parse_cache_control(_fields(chosen[1].headers, b"cache-control"))
            if not (cc.public or cc.s_maxage is not None or cc.must_revalidate):
                return decide(Outcome.BYPASS, "authorization")  # RFC 9111 3.5
        absent = Forward.VARY_MISS if variants else Forward.URI_MISS
        reuse = policy.reuse(
            method_text,
            request_headers,
            chosen[1] if chosen else None,
            now,
            fwd_when_absent=absent,
        )
        more: dict[str, Any] = {
            "reuse": reuse,
            "stored": chosen[0] if chosen else None,
            "response": chosen[1] if chosen else None,
            "fwd": reuse.fwd,
            "memory": hot.body if hot is not None else None,
            "hot": hot,
        }
        if reuse.action is Reuse.GATEWAY_TIMEOUT:
            return decide(Outcome.GATEWAY_TIMEOUT, "only-if-cached", **more)
        if reuse.action in (Reuse.FRESH, Reuse.STALE):
            return decide(Outcome.HIT, **more)
        if reuse.action is Reuse.STALE_WHILE_REVALIDATE:
            return decide(Outcome.STALE, **more)
        if reuse.action is Reuse.REVALIDATE:
            if method_text == "HEAD":
                return decide(Outcome.BYPASS, "head-revalidate", fwd=reuse.fwd)
            return decide(Outcome.REVALIDATE, **more)
        # a miss
        if method_text == "HEAD":
            return decide(Outcome.BYPASS, "head-miss", fwd=reuse.fwd)
        if self._passes.get(key, 0.0) > time.monotonic():
            return decide(Outcome.BYPASS, "uncacheable", fwd=reuse.fwd)
        return decide(Outcome.MISS, **more)

    @staticmethod
    def _choose(
        variants: Sequence[StoredObject], request_headers: Sequence[HeaderPair]
    ) -> tuple[StoredObject, StoredResponse] | None:
        """The newest stored variant the request selects (RFC 9111 4.1)."""
        for stored in reversed(variants):  # the newest first
            try:
                response = _stored_response(stored)
            except (ValueError, orjson.JSONDecodeError):
                continue
            if policy.variant_matches(response, request_headers):
                return stored, response
        return None

    # ------------------------------------------------------------ hot objects

    def hit(
        self,
        method: str,
        target: str | bytes,
        headers: Sequence[tuple[bytes, bytes]],
        now: float,
    ) -> Answer | None:
        """The answer to a GET or HEAD that is a fresh hit of an object this worker holds
        hot, at once: no thread, no index, no parsing; a ``stat`` (a small object held in
        memory, or a HEAD) or the ``open`` of its file. None for anything else (then
        ``lookup`` and ``respond``): a request with directives, credentials, ranges or
        conditions (``_NOT_PLAIN``), an object not held hot, stale, to revalidate, or
        gone. What it answers is what ``lookup`` and ``respond`` would."""
        if self.store is None or method not in ("GET", "HEAD"):
            return None
        key = _b(target)
        held = self._hot.get(key)
        if held is None:
            return None
        for name, _ in headers:
            if name.lower() in _NOT_PLAIN:
                return None
        hot = self._hot_choice(key, headers)
        if hot is None or hot.fields is None:
            return None
        reuse = policy.reuse_fresh(hot.freshness, now)
        if reuse is None:
            return None
        stored = hot.stored
        length = stored.length
        body: CachedBody | None = None
        if method != "GET" or length == 0 or hot.body is not None:
            if not self._still_there(hot):
                self._forget(key)
                return None
            if hot.body is not None and method == "GET" and length:
                body = MemoryBody(self, hot.body, 0, length)
            self.store.note_use(stored.generation)
        else:
            opened = self._open_hot(hot)
            if opened is None:
                self._forget(key)
                return None
            body = CachedBody(self, opened, 0, length, _no_fetch)  # type: ignore[arg-type]
            if length <= SMALL_OBJECT_MAX:
                body.remember = stored.head
        self._hot.move_to_end(key)
        status = reuse.cache_status()
        self.counters[Outcome.HIT.value] += 1
        headers_out = [
            *hot.kept,
            (b"Age", policy.age_text(reuse.age).encode()),
            (b"Cache-Status", status.encode("latin-1")),
            (b"Content-Length", b"%d" % length),
        ]
        return Answer(Outcome.HIT.value, status, 200, headers_out, body, raw_fields=hot.fields)

    def _hot_choice(
        self, key: bytes, request_headers: Sequence[tuple[bytes, bytes]]
    ) -> _Hot | None:
        """The newest variant of ``key`` held hot that the request selects (RFC 9111 4.1);
        not checked against the disk."""
        held = self._hot.get(key)
        if not held:
            return None
        for hot in reversed(held.values()):  # the newest first
            vary = hot.vary
            if vary is None:  # Vary: *
                continue
            if not vary or policy.secondary_key(vary, request_headers) == hot.response.vary_key:
                return hot  # (policy.variant_matches, with the Vary fields parsed once)
        return None

    @staticmethod
    def _still_there(hot: _Hot) -> bool:
        try:
            return _identity(os.stat(hot.path)) == hot.identity
        except OSError:
            return False

    def _open_hot(self, hot: _Hot) -> HeldFile | None:
        """``hot``'s body file, open and pinned (a shared ``flock``, as a reader holds);
        None when it is no longer that file, or an evictor holds it."""
        assert self.store is not None
        try:
            fd = os.open(hot.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if st.st_nlink == 0 or _identity(st) != hot.identity:
                os.close(fd)
                return None
        except OSError:  # BlockingIOError: an evictor has it
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        stored = hot.stored
        return self.store.hold(fd, stored.key, stored.variant, stored.generation, stored.length)

    def _warm(
        self, key: bytes, variants: Sequence[StoredObject], chosen: StoredObject
    ) -> _Hot | None:
        """Hold the complete ``variants`` of ``key`` hot (as the index has them now: the
        bodies of the ones held already stay); ``chosen``'s entry, if it is held."""
        assert self.store is not None
        before = self._hot.get(key, {})
        held: dict[bytes, _Hot] = {}
        for stored in sorted(variants, key=lambda one: one.generation):  # oldest first
            if not stored.complete:
                continue
            old = before.get(stored.variant)
            if (
                old is not None
                and old.stored.generation == stored.generation
                and old.stored.head == stored.head
                and self._still_there(old)
            ):
                held[stored.variant] = old
                continue
            path = str(self.store.index.body_path(stored.generation))
            try:
                identity = _identity(os.stat(path))
                response = _stored_response(stored)
            except (OSError, ValueError, orjson.JSONDecodeError):
                continue
            if identity[4] != stored.length:
                continue
            held[stored.variant] = _Hot(stored, response, path, identity)
        self._forget(key)
        if not held:
            return None
        self._hot[key] = held
        self._hot_count += len(held)
        for hot in held.values():
            if hot.body is not None:
                self._small_bytes += len(hot.body)
        self._trim()
        found = held.get(chosen.variant)
        return found if found is not None and found.stored.generation == chosen.generation else None

    def _remember(self, key: bytes, variant: bytes, generation: int, head: StoredHead,
                  body: bytes) -> None:  # fmt: skip
        """A small object read whole: its hits are answered from memory from now on."""
        if len(body) > SMALL_OBJECT_MAX or self.store is None:
            return
        hot = self._hot.get(key, {}).get(variant)
        if hot is None or hot.stored.generation != generation:
            chunks = ChunkMap(len(body), self.store.chunk_size)
            for index in range(chunks.count):
                chunks.mark(index)
            stored = StoredObject(key, variant, generation, head, len(body), True, len(body),
                                  chunks)  # fmt: skip
            others = [h.stored for v, h in self._hot.get(key, {}).items() if v != variant]
            hot = self._warm(key, [*others, stored], stored)
            if hot is None:
                return
        if hot.body is None and hot.stored.length == len(body):
            hot.body = body
            self._small_bytes += len(body)
            self._trim()

    def _trim(self) -> None:
        """Least recently used keys go until the hot entries and their bodies fit."""
        while (self._small_bytes > SMALL_MEMORY or self._hot_count > HOT_MAX) and self._hot:
            self._forget(next(iter(self._hot)))

    def _forget(self, key: bytes, variant: bytes | None = None) -> None:
        held = self._hot.get(key)
        if held is None:
            return
        for one in [variant] if variant is not None else list(held):
            entry = held.pop(one, None)
            if entry is not None:
                self._hot_count -= 1
                if entry.body is not None:
                    self._small_bytes -= len(entry.body)
        if not held:
            del self._hot[key]

    # ------------------------------------------------------------ respond

    async def respond(
        self, decision: Decision, fetch: Fetch, *, waiting: Callable[[], None] | None = None
    ) -> Answer:
        """The answer to a HIT, STALE, REVALIDATE or MISS decision. Raises what ``fetch``
        raises when the upstream fails and nothing stale may cover it. ``waiting()`` is
        called when the request starts waiting on another request's upstream (the miss
        it collapses into): the data plane counts that as waiting on its own upstream."""
        outcome = decision.outcome
        if outcome is Outcome.HIT:
            answer = await self._serve(decision, fetch, decision.reuse, Outcome.HIT)
            if answer is not None:
                return answer
            if decision.hot is not None:  # gone since: what the index says now
                return await self.respond(await self._look_again(decision), fetch, waiting=waiting)
            return await self._miss(decision, fetch, waiting)
        if outcome is Outcome.STALE:
            answer = await self._serve(decision, fetch, decision.reuse, Outcome.STALE)
            if answer is None and decision.hot is not None:
                return await self.respond(await self._look_again(decision), fetch, waiting=waiting)
            if answer is None:
                return await self._miss(decision, fetch, waiting)
            if decision.target not in self._revalidating:
                self._revalidating.add(decision.target)
                self._spawn(self._background_revalidation(decision, fetch))
            return answer
        if outcome is Outcome.REVALIDATE:
            return await self._revalidate(decision, fetch)
        if outcome is Outcome.MISS:
            return await self._miss(decision, fetch, waiting)
        raise ValueError(f"nothing to respond for {outcome}")

    async def _look_again(self, decision: Decision) -> Decision:
        """``decision``'s lookup again, from the index (its hot entry went away)."""
        self._forget(decision.target)
        again = await self.lookup(
            decision.method, decision.target, decision.request_headers, decision.now
        )
        again.hot = None  # at most once more from a file held hot
        return again

    async def _serve(
        self,
        decision: Decision,
        fetch: Fetch,
        reuse: ReuseDecision | None,
        word: Outcome,
        *,
        cache_status: str | None = None,
        response: StoredResponse | None = None,
    ) -> Answer | None:
        """The stored object of ``decision`` sent (206 for a single Range, 304 for a
        client's matching condition); None if it went away meanwhile."""
        assert self.store is not None and decision.stored is not None
        stored = decision.stored
        response = response or decision.response
        assert response is not None
        status = cache_status or (reuse.cache_status() if reuse else policy.cache_status())
        if decision.memory is not None:
            self.store.note_use(stored.generation)
            return self._answer_from(
                None, decision, fetch, response, word.value, status, served=True,
                memory=decision.memory, generation=stored.generation,
            )  # fmt: skip
        hot = decision.hot
        if hot is not None and hot.stored.generation == stored.generation:
            opened = self._open_hot(hot)
            if opened is None:  # removed, replaced or being evicted since the lookup
                self._forget(stored.key)
                return None
            try:
                return self._answer_from(
                    opened, decision, fetch, response, word.value, status,  # type: ignore[arg-type]
                    served=True, generation=stored.generation,
                )  # fmt: skip
            except BaseException:
                opened.close()
                raise
        reader = self.store.open_reader(stored.key, stored.variant)
        try:
            await reader.__aenter__()
        except NotStored:
            return None
        try:
            if reader.generation != stored.generation:  # replaced since the lookup
                head = reader.head
                assert head is not None
                response = StoredResponse(
                    head.status,
                    head.headers,
                    head.request_time,
                    head.response_time,
                    decode_variant(stored.variant),
                )
            answer = self._answer_from(
                reader, decision, fetch, response, word.value, status, served=True,
                generation=reader.generation,
            )  # fmt: skip
        except BaseException:
            reader.close()
            raise
        return answer

    def _answer_from(
        self,
        reader: Reader | None,
        decision: Decision,
        fetch: Fetch,
        response: StoredResponse,
        word: str,
        cache_status: str,
        *,
        served: bool,
        generation: int,
        memory: bytes | None = None,
    ) -> Answer:
        """Status, headers and body of ``reader``'s object (or of ``memory``) for the
        request: the whole of it, a single range of it, a 304 or a 416 (the reader is the
        answer's, or closed)."""
        assert reader is not None or memory is not None
        length = reader.length if reader is not None else len(memory or b"")

        def no_body() -> None:
            if reader is not None:
                reader.close()

        headers = [
            (_b(n), _b(v))
            for n, v in response.headers
            if _name(n) not in _HOP_BY_HOP
            and _name(n) not in (b"age", b"content-length", b"content-range")
        ]
        age = policy.age_value(response, decision.now) if served else "0"
        headers.append((b"Age", age.encode()))
        headers.append((b"Cache-Status", cache_status.encode("latin-1")))
        self.counters[word] += 1
        request = decision.request_headers
        if _not_modified(request, response.headers):
            no_body()
            kept = [(n, v) for n, v in headers if _name(n) in _KEPT_IN_304]
            return Answer(word, cache_status, 304, kept)
        wanted = None
        if _if_range_allows(request, response.headers):
            wanted = _single_range(_field(request, b"range"), length)
        if wanted == "unsatisfiable":
            no_body()
            headers = [(n, v) for n, v in headers if _name(n) != b"content-type"]
            headers += [(b"Content-Range", b"bytes */%d" % length), (b"Content-Length", b"0")]
            return Answer(word, cache_status, 416, headers)
        status, start, end = 200, 0, length
        if isinstance(wanted, tuple):
            status, (start, end) = 206, wanted
            headers.append((b"Content-Range", b"bytes %d-%d/%d" % (start, end - 1, length)))
        headers.append((b"Content-Length", str(end - start).encode()))
        if decision.method == "HEAD" or start == end:
            no_body()
            return Answer(word, cache_status, status, headers)
        if memory is not None:
            return Answer(word, cache_status, status, headers, MemoryBody(self, memory, start, end))
        assert reader is not None
        body = CachedBody(self, reader, start, end, fetch)
        if start == 0 and end == length <= SMALL_OBJECT_MAX and response.status == 200:
            body.remember = StoredHead(
                response.status,
                tuple((_b(n), _b(v)) for n, v in response.headers),
                response.request_time,
                response.response_time,
            )
        return Answer(word, cache_status, status, headers, body)

    # ------------------------------------------------------------ misses and fills

    async def _miss(
        self, decision: Decision, fetch: Fetch, waiting: Callable[[], None] | None
    ) -> Answer:
        assert self.store is not None
        key = decision.target
        lock = await self._lead(key, waiting)
        if lock is None:  # another request fetched it: read what it stored
            again = await self.lookup(decision.method, key, decision.request_headers, decision.now)
            if again.outcome in (Outcome.HIT, Outcome.STALE, Outcome.REVALIDATE) and again.stored:
                status = policy.cache_status(hit=True, detail="collapsed")
                answer = await self._serve(
                    again, fetch, again.reuse, Outcome.HIT, cache_status=status
                )
                if answer is not None:
                    return answer
            response = await fetch(_client_conditions(decision))
            return self._uncached(decision, response, "not-stored", decision.fwd)
        try:
            return await self._fetch_and_store(decision, fetch, lock)
        finally:
            lock.release()

    async def _lead(self, key: bytes, waiting: Callable[[], None] | None) -> _MissLock | None:
        """The miss lock of ``key``, or None after waiting for whoever held it (calling
        ``waiting()`` first: that wait is on another request's upstream)."""
        assert self.store is not None
        leader = self._leaders.get(key)
        if leader is not None:
            if waiting is not None:
                waiting()
            await asyncio.shield(leader.future)
            return None
        path = self.store.index.locks / f"miss-{hashlib.sha256(key).hexdigest()}.lock"
        waited = False
        deadline = time.monotonic() + MISS_WAIT_S
        while True:
            fd = acquire_lock_file(path)
            if fd is not None:
                if waited:  # another process had it: read what it did
                    _unlock_and_remove(path, fd)
                    return None
                lock = _MissLock(self, key, fd, path)
                self._leaders[key] = lock
                return lock
            if not waited and waiting is not None:
                waiting()
            waited = True
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(MISS_POLL_S)
            leader = self._leaders.get(key)
            if leader is not None:
                await asyncio.shield(leader.future)
                return None

    async def _fetch_and_store(self, decision: Decision, fetch: Fetch, lock: _MissLock) -> Answer:
        """The leader's miss: fetch (the covering chunks for a Range), store what may be
        stored, answer every waiter from the fill."""
        cold = _cold_range(_field(decision.request_headers, b"range"))
        conditions: list[tuple[str, str]] = []
        if cold is not None and self.store is not None:
            chunk = self.store.chunk_size
            first = cold[0] // chunk * chunk
            if cold[1] is None:
                conditions.append(("Range", f"bytes={first}-"))
            else:
                last = -(-cold[1] // chunk) * chunk - 1
                conditions.append(("Range", f"bytes={first}-{last}"))
        request_time = time.time()
        response = await fetch(conditions)
        response_time = time.time()
        if response.status == 206 and strong_etag(response.raw_headers) is None:
            # a range that could never be continued: fetch it whole instead
            response.close()
            request_time = time.time()
            response = await fetch(())
            response_time = time.time()
        return await self._store_response(
            decision, fetch, response, request_time, response_time, own_range=bool(conditions)
        )

    def _pass(self, key: bytes) -> None:
        """Not stored: the next ``PASS_S`` of requests for ``key`` go straight upstream,
        none waiting for another's response head."""
        now = time.monotonic()
        self._passes[key] = now + PASS_S
        if len(self._passes) > 10_000:
            self._passes = {k: t for k, t in self._passes.items() if t > now}

    def _uncached(
        self,
        decision: Decision,
        response: UpstreamAnswer,
        detail: str,
        fwd: Forward | None,
    ) -> Answer:
        self.counters["uncached"] += 1
        self.counters[Outcome.MISS.value] += 1
        status = policy.cache_status(
            fwd=fwd or Forward.URI_MISS, fwd_status=response.status, detail=detail
        )
        return Answer(Outcome.MISS.value, status, upstream=response)

    async def _store_response(
        self,
        decision: Decision,
        fetch: Fetch,
        response: UpstreamAnswer,
        request_time: float,
        response_time: float,
        *,
        fwd: Forward | None = None,
        own_range: bool = False,
    ) -> Answer:
        """Store ``response`` if it may be (then answer from the fill) or hand it back to be
        relayed uncached. ``own_range``: it answers the cache's chunk-aligned Range, not the
        client's: an uncached answer is then asked again with the client's conditions."""
        fwd = fwd or decision.fwd or Forward.URI_MISS
        plan = self._plan(decision, response, request_time, response_time)
        if isinstance(plan, str):
            self._pass(decision.target)
            if own_range:
                response.close()
                response = await fetch(_client_conditions(decision))
            return self._uncached(decision, response, plan, fwd)
        head, length, start, end, variant = plan
        stored_response = StoredResponse(
            head.status, head.headers, request_time, response_time, decode_variant(variant)
        )
        entered: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = self._spawn(
            self._fill(decision.target, variant, head, length, response, start, end, fetch, entered)
        )
        # a task cancelled before it ran (the service closing) never ran its finally
        task.add_done_callback(lambda _: _settle(entered, "failed"))
        try:
            how = await asyncio.shield(entered)
        except asyncio.CancelledError:  # the response is the fill's, or nobody's: close it
            entered.add_done_callback(
                lambda done: None if done.result() == "filling" else response.close()
            )
            raise
        if how == "refused":  # no room now: not a pass, the next request may find room
            if own_range:
                response.close()
                response = await fetch(_client_conditions(decision))
            return self._uncached(decision, response, "no-room", fwd)
        if how == "failed":
            response.close()
            raise CacheAborted(f"the fill of {decision.target!r} could not start")
        # filling (ours) or busy (another fill of this variant started meanwhile): read it
        assert self.store is not None
        reader = self.store.open_reader(decision.target, variant)
        try:
            await reader.__aenter__()
        except NotStored:
            raise CacheAborted(f"the fill of {decision.target!r} failed at once") from None
        ttl = policy.freshness_lifetime(head.status, head.headers, response_time=response_time)
        status = policy.cache_status(fwd=fwd, fwd_status=response.status, stored=True, ttl=ttl)
        try:
            return self._answer_from(
                reader, decision, fetch, stored_response, Outcome.MISS.value, status,
                served=False, generation=reader.generation,
            )  # fmt: skip
        except BaseException:
            reader.close()
            raise

    def _plan(
        self,
        decision: Decision,
        response: UpstreamAnswer,
        request_time: float,
        response_time: float,
    ) -> tuple[StoredHead, int, int, int, bytes] | str:
        """(head to store, object length, first and end byte the response carries, variant)
        or why it is not stored."""
        raw = tuple((_b(n), _b(v)) for n, v in response.raw_headers)
        storability = policy.storable(
            "GET", decision.request_headers, response.status, raw, response_time=response_time
        )
        if not storability.stored:
            return storability.value
        if response.status not in (200, 206):
            return "status"
        content_type = _field(raw, b"content-type") or b""
        if content_type.split(b";")[0].strip().lower() == b"text/event-stream":
            return "event-stream"
        if (_field(raw, b"x-accel-buffering") or b"").lower() == b"no":
            return "x-accel-buffering"
        if _field(raw, b"transfer-encoding") is not None:
            return "no-length"
        length_field = _field(raw, b"content-length")
        if length_field is None or not length_field.isdigit():
            return "no-length"
        carried = int(length_field)
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(_field(raw, b"content-range") or b"")
            if match is None:
                return "content-range"
            start, last, length = (int(g) for g in match.groups())
            if last + 1 - start != carried or last >= length:
                return "content-range"
        else:
            start, length = 0, carried
        if length > self.max_object:
            return "too-large"
        connection = {m.strip().lower() for v in _fields(raw, b"connection") for m in v.split(b",")}
        kept = tuple(
            (n, v)
            for n, v in raw
            if _name(n) not in _HOP_BY_HOP
            and _name(n) not in connection
            and _name(n) not in (b"content-length", b"content-range")
        )
        headers = (*kept, (b"Content-Length", str(length).encode()))
        head = StoredHead(200, headers, request_time, response_time)
        fields = policy.vary_fields(raw)
        vary = policy.secondary_key(fields, decision.request_headers) if fields else ()
        return head, length, start, start + carried, encode_variant(vary)

    async def _fill(
        self,
        key: bytes,
        variant: bytes,
        head: StoredHead,
        length: int,
        response: UpstreamAnswer,
        start: int,
        end: int,
        fetch: Fetch,
        entered: asyncio.Future[str],
    ) -> None:
        """The fill task: independent of the client that caused it."""
        assert self.store is not None
        paused = False
        try:
            async with self.store.fill(key, head, length, variant) as fill:
                entered.set_result("filling")
                try:
                    await self._copy(fill, response, start, end)
                    response.release()
                    response.close()
                    # a whole body leaves no gap; a cold Range's chunks fill the rest
                    # only with FILEPROXY_CACHE_RANGE_FILL
                    await self._finish(fill, fetch, start, end, whole=self.range_fill)
                except asyncio.CancelledError:
                    fill.pause()
                    paused = True
        except FillBusy:
            if not entered.done():
                entered.set_result("busy")
                response.close()
        except (ReservationRefused, StoreFull) as error:
            if not entered.done():
                entered.set_result("refused")  # the response goes to its client uncached
            else:  # the disk filled up under the fill: its readers go on uncached
                self.counters["fills_failed"] += 1
                log.warning("cache fill of %r ran out of room, not stored: %s", key, error)
        except Exception as error:
            if not entered.done():
                entered.set_result("failed")
            self.counters["fills_failed"] += 1
            log.warning("cache fill of %r failed: %s", key, error)
        finally:
            if not entered.done():
                entered.set_result("failed")
            if entered.result() == "filling":
                response.close()
        if paused:
            raise asyncio.CancelledError

    async def _copy(self, fill: Fill, response: UpstreamAnswer, start: int, end: int) -> None:
        """The upstream body into the fill at ``start``; exactly ``end - start`` bytes."""
        offset = start
        while offset < end:
            data = await response.content.read(min(WRITE_BLOCK, end - offset))
            if not data:
                raise _NotMended(f"the upstream body ended at byte {offset} of {end}")
            if offset + len(data) == end:
                # read whole: its connection goes back to the pool before the last bytes
                # reach the readers (their client may ask again at once), not after the
                # commit of the last chunk (an fdatasync)
                response.release()
            await fill.write(offset, data)
            offset += len(data)
            self.counters["bytes_fetched"] += len(data)

    async def _finish(self, fill: Fill, fetch: Fetch, start: int, end: int, *, whole: bool) -> None:
        """After ``[start, end)``: fetch the rest (``whole``) and complete, or pause with
        what is there (a cold Range without FILEPROXY_CACHE_RANGE_FILL)."""
        if whole:
            for first, last in _gaps(fill, end, fill.length) + _gaps(fill, 0, end):
                await self._fetch_into(fill, fetch, first, last)
        if not _gaps(fill, 0, fill.length):
            await fill.complete()
        else:
            await fill.commit()
            fill.pause()

    async def _fetch_into(self, fill: Fill, fetch: Fetch, start: int, end: int) -> None:
        """``[start, end)`` of the stored representation by Range + If-Range on its strong
        ETag; only the exact continuation is written (else ``_NotMended``)."""
        validator = strong_etag(fill.head.headers)
        if validator is None:
            raise _NotMended("no strong validator to continue the object with")
        conditions = [
            ("Range", f"bytes={start}-{end - 1}"),
            ("If-Range", validator.decode("latin-1")),
        ]
        response = await fetch(conditions)
        try:
            _check_continuation(response, start, end, fill.length, validator)
            await self._copy(fill, response, start, end)
            response.release()
        finally:
            response.close()

    # ------------------------------------------------------------ taking an orphan over

    async def take_over(
        self, key: bytes, variant: bytes, fetch: Fetch, start: int, end: int
    ) -> bool:
        """Continue the fill that stopped (its process died, or a cold Range paused it),
        first the bytes ``[start, end)`` a reader needs. True when a fill (ours or another
        process's) goes on; False when it cannot (the reader aborts)."""
        pending = self._takeovers.get((key, variant))
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._takeovers[(key, variant)] = pending
            task = self._spawn(self._resume(key, variant, fetch, start, end, pending))
            task.add_done_callback(lambda _: self._takeovers.pop((key, variant), None))
            task.add_done_callback(lambda _: _settle(pending, False))
        return await asyncio.shield(pending)

    async def _resume(
        self,
        key: bytes,
        variant: bytes,
        fetch: Fetch,
        start: int,
        end: int,
        entered: asyncio.Future[bool],
    ) -> None:
        assert self.store is not None
        paused = False
        try:
            async with self.store.resume(key, variant) as fill:
                self.counters["takeovers"] += 1
                entered.set_result(True)
                try:
                    for first, last in _gaps(fill, start, end):
                        await self._fetch_into(fill, fetch, first, last)
                    # a reader that reads to the end wants the object: complete it
                    whole = self.range_fill or end == fill.length
                    await self._finish(fill, fetch, start, end, whole=whole)
                except asyncio.CancelledError:
                    fill.pause()
                    paused = True
        except FillBusy:
            if not entered.done():
                entered.set_result(True)  # someone else fills it: read on
        except NotStored:
            if not entered.done():
                entered.set_result(False)
        except Exception as error:
            if not entered.done():
                entered.set_result(False)
            self.counters["fills_failed"] += 1
            log.warning("cache take-over of %r failed: %s", key, error)
        finally:
            if not entered.done():
                entered.set_result(False)
        if paused:
            raise asyncio.CancelledError

    # ------------------------------------------------------------ revalidation

    async def _revalidate(self, decision: Decision, fetch: Fetch) -> Answer:
        assert decision.response is not None
        response_stored = decision.response
        conditions = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in decision.conditions]
        request_time = time.time()
        try:
            response = await fetch(conditions)
        except Exception:
            if policy.stale_if_error_allowed(
                decision.request_headers, response_stored, decision.now, None
            ):
                answer = await self._stale_if_error(decision, fetch)
                if answer is not None:
                    return answer
            raise
        response_time = time.time()
        if response.status == 304:
            fresh = policy.freshen(
                response_stored, response.raw_headers, request_time, response_time
            )
            response.release()
            response.close()
            if fresh is None:  # the 304 is not for what we have: fetch it whole
                return await self._refetch(decision, fetch)
            assert self.store is not None and decision.stored is not None
            storable = policy.storable(
                "GET", decision.request_headers, 200, fresh.headers, response_time=response_time
            )
            head = StoredHead(
                fresh.status,
                tuple((_b(n), _b(v)) for n, v in fresh.headers),
                fresh.request_time,
                fresh.response_time,
            )
            stored = decision.stored
            self._forget(stored.key, stored.variant)  # the merged head replaces it
            if storable.stored:
                await self.store.update_head(stored.key, stored.variant, head)
            ttl = policy.freshness_lifetime(200, fresh.headers, response_time=response_time)
            status = policy.cache_status(
                fwd=decision.fwd or Forward.STALE, fwd_status=304, stored=storable.stored, ttl=ttl
            )
            decision_now = Decision(
                decision.outcome,
                decision.method,
                decision.target,
                decision.request_headers,
                response_time,
                stored=stored,
                response=fresh,
            )
            answer = await self._serve(
                decision_now, fetch, None, Outcome.REVALIDATE, cache_status=status, response=fresh
            )
            if not storable.stored:
                await self.store.purge(stored.key)
            if answer is not None:
                return answer
            return await self._refetch(decision, fetch)
        if response.status in policy.ERROR_STATUSES and policy.stale_if_error_allowed(
            decision.request_headers, response_stored, decision.now, response.status
        ):
            try:
                answer = await self._stale_if_error(decision, fetch, response.status)
            except BaseException:
                response.close()
                raise
            if answer is not None:
                response.close()
                return answer
        return await self._store_response(
            decision,
            fetch,
            response,
            request_time,
            response_time,
            fwd=decision.fwd or Forward.STALE,
        )

    async def _refetch(self, decision: Decision, fetch: Fetch) -> Answer:
        request_time = time.time()
        response = await fetch(())
        return await self._store_response(decision, fetch, response, request_time, time.time())

    async def _stale_if_error(
        self, decision: Decision, fetch: Fetch, error_status: int | None = None
    ) -> Answer | None:
        assert decision.reuse is not None
        status = policy.cache_status(
            hit=True,
            fwd=Forward.STALE,
            fwd_status=error_status,
            ttl=decision.reuse.ttl,
            detail="stale-if-error",
        )
        return await self._serve(decision, fetch, None, Outcome.STALE, cache_status=status)

    async def _background_revalidation(self, decision: Decision, fetch: Fetch) -> None:
        """stale-while-revalidate: the conditional request after the stale answer."""
        try:
            answer = await self._revalidate(decision, fetch)
            if answer.upstream is not None:
                answer.upstream.close()
            if answer.body is not None:
                answer.body.close()
        except Exception as error:
            log.info("background revalidation of %r failed: %s", decision.target, error)
        finally:
            self._revalidating.discard(decision.target)

    # ------------------------------------------------------------ operators

    async def purge(self, target: str | bytes) -> int:
        """PURGE: every variant of ``target`` goes (readers that hold one keep reading it).
        Returns how many objects went."""
        key = _b(target)
        self._passes.pop(key, None)
        self._forget(key)
        if self.store is None:
            return 0
        removed = await self.store.purge(key)
        self.counters["purges"] += 1
        return removed

    async def invalidate(
        self,
        method: str | bytes,
        target: str | bytes,
        status: int,
        request_headers: Sequence[tuple[str | bytes, str | bytes]],
        response_headers: Sequence[tuple[str | bytes, str | bytes]],
    ) -> int:
        """RFC 9111 4.4: after an unsafe request answered 2xx/3xx, its target (and a
        Location / Content-Location on the same origin) is dropped. Returns objects gone."""
        if self.store is None:
            return 0
        host = (_field(request_headers, b"host") or b"cache").decode("latin-1")
        base = f"http://{host}"
        uri = base + _b(target).decode("latin-1")
        removed = 0
        for gone in policy.invalidated_uris(method, uri, status, response_headers):
            if gone.startswith(base + "/") or gone == base:
                removed += await self.purge(gone[len(base) :].encode("latin-1") or b"/")
        return removed

    async def refresh_totals(self) -> dict[str, int]:
        if self.store is not None:
            self._totals = await self.store.stats()
            self._totals_at = time.monotonic()
        return self._totals

    async def report(self) -> dict[str, Any]:
        """The state, ratios, and this worker's counters; disk use from the index (all
        processes), counted now. /stats and /health, which do no I/O, take ``snapshot()``
        (disk figures at most ``TOTALS_REFRESH_S`` old)."""
        await self.refresh_totals()
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """``report()`` without a refresh of the disk figures (for a synchronous scrape)."""
        counters = self.counters
        served = sum(counters[w] for w in ("hit", "stale", "revalidated", "miss"))
        from_cache = sum(counters[w] for w in ("hit", "stale", "revalidated"))
        bytes_served = counters["bytes_from_cache"]
        fetched = counters["bytes_fetched"]
        store = self.store
        state = "off" if not self.enabled else ("on" if store is not None else "unavailable")
        report: dict[str, Any] = {
            "state": state,
            "dir": str(self.directory),
            "requests": {
                w.value: counters[w.value] for w in Outcome if w.value != "gateway-timeout"
            },
            "uncached_misses": counters["uncached"],
            "hit_ratio_requests": round(from_cache / served, 4) if served else None,
            "hit_ratio_bytes": round(max(0, bytes_served - fetched) / bytes_served, 4)
            if bytes_served
            else None,
            "bytes_from_cache": bytes_served,
            "bytes_fetched": fetched,
            "fills_in_progress": store.fills_in_progress if store is not None else 0,
            "readers_waiting": store.counters["readers_waiting"] if store is not None else 0,
            "readers_open": store.counters["readers_open"] if store is not None else 0,
            "evictions": store.counters["evictions"] if store is not None else 0,
            "takeovers": counters["takeovers"],
            "continued_uncached": counters["continued_uncached"],
            "bytes_uncached": counters["bytes_uncached"],
            "fills_failed": counters["fills_failed"],
            "aborted": counters["aborted"],
            "purges": counters["purges"],
            **self.zero_copy.report(),
        }
        if self.error:
            report["error"] = self.error
        if store is not None:
            report["disk_figures_age_s"] = round(time.monotonic() - self._totals_at, 1)
            report["max_size"] = store.max_size
            report["min_free"] = store.min_free
            for name in (
                "bytes_on_disk",
                "bytes_reserved",
                "objects",
                "partial_objects",
                "free_bytes",
            ):
                report[name] = self._totals.get(name, 0)
        return report


_KEPT_IN_304 = frozenset(
    {
        b"cache-control",
        b"content-location",
        b"date",
        b"etag",
        b"expires",
        b"vary",
        b"last-modified",
        b"age",
        b"cache-status",
    }
)


def _settle(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        future.set_result(result)


def _client_conditions(decision: Decision) -> list[tuple[str, str]]:
    """The client's own conditional fields, for a request the cache relays uncached."""
    return [
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in decision.request_headers
        if _name(n).decode("latin-1") in CONDITIONAL_FIELDS
    ]


def _etags(value: bytes) -> list[bytes]:
    return [tag.strip().removeprefix(b"W/") for tag in value.split(b",") if tag.strip()]


def _not_modified(request: Sequence[HeaderPair], stored: Sequence[tuple[Any, Any]]) -> bool:
    """RFC 9110 13.1.2/13.1.3 for a GET/HEAD answered from the cache."""
    inm = _fields(request, b"if-none-match")
    etag = _field(stored, b"etag")
    if inm:
        tags = [t for v in inm for t in _etags(v)]
        return b"*" in tags or (etag is not None and etag.removeprefix(b"W/") in tags)
    ims = _field(request, b"if-modified-since")
    modified = _field(stored, b"last-modified")
    if ims is None or modified is None:
        return False
    since, last = policy.parse_http_date(ims), policy.parse_http_date(modified)
    return since is not None and last is not None and last <= since


def _if_range_allows(request: Sequence[HeaderPair], stored: Sequence[tuple[Any, Any]]) -> bool:
    """RFC 9110 13.1.5: a Range with If-Range applies only when the validator matches
    (strong comparison for an ETag, an exact date for Last-Modified)."""
    condition = _field(request, b"if-range")
    if condition is None:
        return True
    if condition.startswith(b'"'):
        return strong_etag(stored) == condition
    modified = _field(stored, b"last-modified")
    return modified is not None and condition == modified


def _gaps(fill: Fill, start: int, end: int) -> list[tuple[int, int]]:
    """What ``fill`` lacks of ``[start, end)``: neither in its written prefix nor in a
    present chunk."""
    have = ByteRanges([(0, fill.written)] if fill.written else [])
    for chunk in fill.chunks.present():
        have.add(*fill.chunks.bounds(chunk))
    gaps: list[tuple[int, int]] = []
    offset = start
    for first, last in have:
        if last <= offset:
            continue
        if first >= end:
            break
        if first > offset:
            gaps.append((offset, min(first, end)))
        offset = max(offset, last)
    if offset < end:
        gaps.append((offset, end))
    return gaps


def _unlock_and_remove(path: Path, fd: int) -> None:
    try:
        remove_lock_file(path, fd)
    finally:
        os.close(fd)


class CachedBody:
    """The bytes ``[start, end)`` of a stored object, read as they are committed. Iterate
    it for blocks, or ``runs()`` for ``(fd, offset, count)`` to sendfile; ``close()`` it.
    ``CacheAborted`` when its fill fails beyond mending: abort the client.

    When the fill it follows stops because the disk had no room (in this process or
    another), the body goes on from its own offset with the rest from the upstream,
    uncached: ``Range`` + ``If-Range`` on the object's strong ETag, through ``fetch`` (its
    replicas, retries and mid-body resume), accepted only as the exact continuation. Both
    iterations then yield ``bytes`` blocks. Without a strong ETag it cannot continue
    byte-exact, and aborts."""

    def __init__(
        self, service: CacheService, reader: Reader, start: int, end: int, fetch: Fetch
    ) -> None:
        self.service = service
        self.reader = reader
        self.start = start
        self.end = end
        self.fetch = fetch
        self.sent = 0
        #: the head to keep the object in memory with, once read whole (small objects)
        self.remember: StoredHead | None = None
        self._upstream: UpstreamAnswer | None = None  # the uncached rest, while it is read
        self._short: int | None = None  # a run the caller found the file too short for

    #: the bytes themselves when the object is held in memory (``MemoryBody``)
    in_memory: bytes | None = None

    @property
    def length(self) -> int:
        return self.end - self.start

    def close(self) -> None:
        self._close_upstream()
        self.reader.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._blocks()

    async def _blocks(self) -> AsyncIterator[bytes]:
        offset = self.start
        kept: list[bytes] | None = [] if self.remember is not None else None
        while offset < self.end:
            try:
                available = await self._wait(offset)
            except _OutOfRoom:
                async for data in self._uncached(offset):
                    yield data
                return
            count = min(available, self.end, offset + READ_BLOCK) - offset
            data = await self.reader.pread(offset, count)
            if not data:  # given back under us: the next wait says why, or aborts
                self._short = offset
                continue
            offset += len(data)
            self._count(len(data))
            if kept is not None:
                kept.append(data)
            yield data
        if kept is not None and self.remember is not None and self.reader.complete:
            reader = self.reader
            self.service._remember(
                reader.key, reader.variant, reader.generation, self.remember, b"".join(kept)
            )

    async def runs(self) -> AsyncIterator[tuple[int, int, int] | bytes]:
        """``(fd, offset, count)`` of committed bytes in order; the next run is computed
        when the caller asks for it (after it sent this one). A caller whose sendfile finds
        the file shorter than a run calls ``shorter(at)`` with where it got to. After a fill
        ran out of room, the rest comes as ``bytes`` blocks (see the class)."""
        offset = self.start
        while offset < self.end:
            try:
                available = await self._wait(offset)
            except _OutOfRoom:
                async for data in self._uncached(offset):
                    yield data
                return
            count = min(available, self.end) - offset
            self._short = None
            yield self.reader.fileno(), offset, count
            if self._short is not None:  # the caller sent less: go on from there
                count = self._short - offset
            offset += count
            self._count(count)

    def shorter(self, at: int) -> None:
        """The run being sent ended at byte ``at``: the file was shorter than it said."""
        self._short = at

    def _count(self, count: int) -> None:
        self.sent += count
        self.service.counters["bytes_from_cache"] += count

    async def _wait(self, offset: int) -> int:
        """Where the committed bytes from ``offset`` end; ``_OutOfRoom`` when the fill
        stopped for want of room (go on uncached), else ``CacheAborted``."""
        short, self._short = self._short, None
        reader = self.reader
        for _ in range(MAX_TAKEOVERS):
            try:
                available = await reader.wait_for(offset)
            except FillOutOfRoom as error:
                raise _OutOfRoom() from error
            except FillAbandoned as error:
                self.service.counters["aborted"] += 1
                raise CacheAborted(str(error)) from error
            except FillOrphaned:
                taken = await self.service.take_over(
                    reader.key, reader.variant, self.fetch, offset, self.end
                )
                if not taken:
                    self.service.counters["aborted"] += 1
                    raise CacheAborted("the fill stopped and could not be continued") from None
                continue
            if short is not None and short <= offset:
                # the file ended where its fill says there are bytes, and not because the
                # fill ran out of room: never send what is not there
                self.service.counters["aborted"] += 1
                raise CacheAborted("the cache file is shorter than its object")
            return available
        self.service.counters["aborted"] += 1
        raise CacheAborted("the fill kept stopping")

    async def _uncached(self, offset: int) -> AsyncIterator[bytes]:
        """``[offset, end)`` from the upstream, uncached, as the exact continuation of the
        stored object (its fill ran out of room); ``CacheAborted`` when it is not that."""
        service, reader = self.service, self.reader
        assert reader.head is not None
        validator = strong_etag(reader.head.headers)
        if validator is None:  # nothing proves another answer holds the same bytes
            service.counters["aborted"] += 1
            raise CacheAborted("the fill ran out of room; no strong ETag to continue by")
        service.counters["continued_uncached"] += 1
        conditions = [
            ("Range", f"bytes={offset}-{self.end - 1}"),
            ("If-Range", validator.decode("latin-1")),
        ]
        try:
            self._upstream = response = await self.fetch(conditions)
            _check_continuation(response, offset, self.end, reader.length, validator)
        except Exception as error:  # the upstream's failures, or another representation
            service.counters["aborted"] += 1
            raise CacheAborted(f"the fill ran out of room and the rest failed: {error}") from error
        while offset < self.end:
            try:
                data = await response.content.read(min(READ_BLOCK, self.end - offset))
            except Exception as error:  # what the resumes could not mend
                service.counters["aborted"] += 1
                raise CacheAborted(f"the uncached rest failed: {error}") from error
            if not data:
                service.counters["aborted"] += 1
                raise CacheAborted(f"the uncached rest ended at byte {offset} of {self.end}")
            offset += len(data)
            if offset == self.end:
                response.release()  # read whole: its connection goes back to the pool
            self.sent += len(data)
            service.counters["bytes_uncached"] += len(data)
            # bytes, told apart from a run by their type (a view of a piece is copied)
            yield data if isinstance(data, bytes) else bytes(data)
        self._close_upstream()

    def _close_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.close()


class _OutOfRoom(Exception):
    """A body's fill stopped for want of room: the body goes on uncached."""


def _check_continuation(
    response: UpstreamAnswer, start: int, end: int, length: int, validator: bytes
) -> None:
    """``response`` is exactly ``[start, end)`` of the object of ``length`` bytes whose
    strong ETag is ``validator`` (a 206 to Range + If-Range), else ``_NotMended``."""
    raw = response.raw_headers
    expected = b"bytes %d-%d/%d" % (start, end - 1, length)
    if (
        response.status != 206
        or _field(raw, b"content-range") != expected
        or strong_etag(raw) != validator
    ):
        raise _NotMended(
            f"asked {expected!r}, got {response.status} "
            f"{_field(raw, b'content-range')!r} {strong_etag(raw)!r}"
        )


class MemoryBody(CachedBody):
    """A small object's bytes from memory: ``in_memory`` is what to send (no file, so no
    ``runs()``); iterating yields it once. Counted as served from the cache when made
    (the data plane sends ``in_memory`` in one write, without iterating)."""

    def __init__(self, service: CacheService, data: bytes, start: int, end: int) -> None:
        self.service = service
        self.start, self.end = start, end
        self.sent = 0
        self.remember = None
        self.in_memory = data[start:end]
        self._count(end - start)

    def close(self) -> None:
        pass

    async def _blocks(self) -> AsyncIterator[bytes]:
        assert self.in_memory is not None
        yield self.in_memory

    async def runs(self) -> AsyncIterator[tuple[int, int, int]]:
        raise TypeError("a body held in memory has no file: send body.in_memory")
        yield  # an async generator


def check_cache_dir(settings: Settings) -> tuple[bool, str]:
    """For ``fileproxy check``: the directory exists or can be made, takes a file, and
    has room beyond the watermark. (ok, one line)."""
    if not settings.cache:
        return True, "off (FILEPROXY_CACHE=off)"
    directory = Path(settings.cache_dir or default_cache_dir())
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
        usage = shutil.disk_usage(directory)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        return False, (
            f"{directory}: cannot create a file there ({reason}); make it a directory the "
            "daemon's user can write, set FILEPROXY_CACHE_DIR, or FILEPROXY_CACHE=off"
        )
    gib = 1 << 30
    line = f"{directory}, {usage.free / gib:.1f} GiB free of {usage.total / gib:.1f} GiB"
    if usage.free <= settings.cache_min_free:
        return False, (
            f"{line}: not above FILEPROXY_CACHE_MIN_FREE={settings.cache_min_free}; "
            "nothing could be cached (lower it or free space)"
        )
    return True, line
