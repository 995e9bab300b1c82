"""The cache's storage engine: objects on disk, one fill per object per host, readers that
follow a fill as it is written, a disk budget that fails soft.

Layout of the cache directory (shared by every process that opens a ``CacheStore`` on it:
gunicorn workers, several ``fileproxy serve``):

- ``index.sqlite3`` (SQLite, WAL, ``synchronous=NORMAL``): one row per stored object (key,
  Vary variant, generation id, state ``filling``/``complete``, length, committed prefix, the
  chunk map, the encoded head) and the eviction policy's state. Every change that spans
  objects (reserve, evict, purge) is one ``BEGIN IMMEDIATE`` transaction: the process that
  needs space evicts under the index's write lock, with the policy's state (S3-FIFO by
  default) loaded from the index, changed and saved back in the same transaction; the uses
  (hits) a process saw are folded in at its next transaction (at least every
  ``HITS_FLUSH_S`` while it reads).
- ``objects/<generation>.body``: the body, a sparse file of the object's full length.
  A chunk of ``chunk_size`` (4 MiB) bytes counts as present once written and made durable
  (``fdatasync``, then the index row); a sequential fill also records its committed prefix.
- ``locks/<sha256 of key and variant>.lock``: the fill lease, an exclusive ``flock`` held
  by the filling process for as long as it fills (the kernel drops it when the process
  dies: another process then takes the fill over from the committed prefix). The filler
  also writes a small ``FillProgress`` record into this file after every write, which
  readers in other processes poll (``POLL_S``; the readers of one object in one process
  share a single poll); readers in the filling process are woken by the fill directly.

Crash safety: the body is made durable before the row says so, and a row becomes
``complete`` only after every byte is durable, so a ``kill -9`` or a power cut leaves an
object either complete or ``filling`` with an exact committed prefix and chunk map (a lost
WAL commit only moves that back). A fill that raises (or is left without ``complete()``) is
abandoned: its row and body are removed, its readers told to abort (``FillAbandoned``), or,
when it stopped because the disk had no room, told just that (``FillOutOfRoom``: the record
says ``NO_ROOM``), so that they may take the rest from the upstream uncached. ``pause()``
stops a fill on purpose, keeping what is committed for a later ``resume``.

Pins: a reader holds a shared ``flock`` on its body file; the evictor takes an exclusive one
(non-blocking) before it removes an object, so an object a reader in any process holds open
is never evicted (the policy is told it is pinned and keeps it). Purge removes regardless:
readers that hold the file keep reading it (an unlinked file stays readable on Linux until
its last descriptor closes), and the space comes back when they close.

Blocking work runs on two small thread pools: one thread owns the index connection (and
the ``fdatasync`` of commits, so they are ordered with the rows), a few do body reads and
writes. Every step that changes the disk runs to its end in its thread even when the
awaiting task is cancelled; what it leaves behind is then undone from that thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson

from fileproxy.cache.eviction import DEFAULT_EVICTION, EvictionPolicy, new_eviction_policy
from fileproxy.cache.manifest import ByteRanges, ChunkMap, FillProgress, FillState, StoredHead

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CacheStore",
    "CacheStoreError",
    "Fill",
    "FillAbandoned",
    "FillBusy",
    "FillOrphaned",
    "FillOutOfRoom",
    "NotStored",
    "Reader",
    "ReservationRefused",
    "StoreFull",
    "StoredObject",
    "acquire_lock_file",
    "remove_lock_file",
]

log = logging.getLogger("fileproxy.cache")

MIB = 1 << 20
#: aligned chunk: a cold Range costs at most one chunk's fetch before its first byte (a
#: quarter second at 16 MB/s; lancache settled on 8 MB slices, nginx's slice module is
#: often set to 1-8 MB), a 64 GiB object's map is 2 KiB, and a fill commits (fdatasync +
#: one index row) once per chunk: measured 3-5 ms p50, 12-17 ms p99 per 4 MiB on this
#: machine's ext4 (bench/cache_store.py), a few percent of the 250 ms the chunk takes to
#: arrive at 16 MB/s, so the fill is not slowed; smaller chunks would commit more often.
DEFAULT_CHUNK_SIZE = 4 * MIB
#: how often a reader in another process looks at a fill's progress record: measured
#: wake-up p50 10 ms, p99 23 ms, ~1% of a core per object and process while a fill stalls
#: (5 ms: p50 3 ms for 3%; 50 ms: p50 27 ms for 0.5%). Against a first byte budget of a
#: second and a per-write wake-up of the readers in the filling process itself, 20 ms.
POLL_S = 0.02
#: a reader whose fill made no progress this long asks the kernel whether the lease is held
LEASE_PROBE_S = 0.25
#: uses seen by a process reach the index's eviction state at least this often
HITS_FLUSH_S = 1.0
#: a reader arriving while another process holds the lease but has not yet stored its row
OPEN_WAIT_S = 5.0
#: threads for body reads and writes (page-cache copies mostly)
IO_THREADS = 4
#: SQLite's SQLITE_FULL: the disk is full (the WAL could not grow)
SQLITE_FULL = 13

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL,
    variant BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('filling', 'complete')),
    length INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    committed INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    chunks_version INTEGER NOT NULL DEFAULT 0,
    head BLOB NOT NULL,
    created REAL NOT NULL,
    UNIQUE (key, variant)
);
CREATE TABLE IF NOT EXISTS eviction (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    policy TEXT NOT NULL,
    state BLOB NOT NULL
);
"""

T = TypeVar("T")


class CacheStoreError(Exception):
    """Base of what the store raises to its caller."""


class FillBusy(CacheStoreError):
    """Another fill (this process or another) holds the object's lease: read it instead."""


class ReservationRefused(CacheStoreError):
    """No room for the object within the budget and free space: proxy it uncached."""


class StoreFull(CacheStoreError):
    """The disk filled up during a fill (ENOSPC): the fill is abandoned, its space released."""


class NotStored(CacheStoreError, KeyError):
    """No such object (or nothing to resume)."""


class FillAbandoned(CacheStoreError):
    """The fill a reader follows failed or its object was removed: abort the client."""


class FillOutOfRoom(FillAbandoned):
    """The fill a reader follows stopped because the disk had no room for its next bytes
    (``ENOSPC``, a quota, the index unable to grow): the object is gone, but nothing says
    its upstream failed. A reader that can ask the upstream for the exact rest of the
    object (Range + If-Range on its strong validator) continues from its own offset
    uncached; one that cannot aborts, as for ``FillAbandoned``."""


class FillOrphaned(CacheStoreError):
    """The fill a reader follows stopped (its process died or paused it): take it over
    with ``store.resume``, or abort the client. ``committed`` is where a resume starts."""

    def __init__(self, committed: int) -> None:
        super().__init__(f"the fill stopped; {committed} bytes committed")
        self.committed = committed


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def object_name(key: bytes, variant: bytes) -> str:
    """The lock file's name of (key, variant): unambiguous for any bytes."""
    digest = hashlib.sha256(len(key).to_bytes(8, "big") + key + variant)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredObject:
    """One stored variant as the index has it."""

    key: bytes
    variant: bytes
    generation: int
    head: StoredHead
    length: int
    complete: bool
    committed: int
    chunks: ChunkMap


@dataclass
class _Row:
    id: int
    key: bytes
    variant: bytes
    state: str
    length: int
    chunk_size: int
    committed: int
    chunks: bytes
    chunks_version: int
    head: bytes

    COLUMNS = "id, key, variant, state, length, chunk_size, committed, chunks, chunks_version, head"

    def stored(self) -> StoredObject:
        return StoredObject(
            self.key,
            self.variant,
            self.id,
            StoredHead.decode(self.head),
            self.length,
            self.state == "complete",
            self.committed,
            ChunkMap(self.length, self.chunk_size, self.chunks),
        )


def acquire_lock_file(path: Path) -> int | None:
    """An exclusive flock on the lock file at ``path`` (created if missing), or None when
    another open file holds it. Lock files are only ever removed by a holder of the lock,
    so after locking, the file must still be the one at ``path`` (else retry)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        held = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def remove_lock_file(path: Path, fd: int) -> None:
    """Unlink the lock file we hold through ``fd`` (if it is still the one at ``path``)."""
    held = os.fstat(fd)
    with contextlib.suppress(FileNotFoundError):
        current = os.stat(path)
        if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            os.unlink(path)


def _lease_held(fd: int) -> bool:
    """Does an open file (another process's, or another of ours) hold the lock on ``fd``?"""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, sqlite3.OperationalError) and (
        getattr(error, "sqlite_errorcode", None) == SQLITE_FULL
    )


@dataclass
class _Doomed:
    """An object whose row is deleted in the current transaction: after the commit its body
    is unlinked, its lock file too if we hold it, and the descriptors we claimed it with
    are closed."""

    generation: int
    lock_path: Path | None = None
    lock_fd: int | None = None
    body_fd: int | None = None
    evicted: bool = False


class _Index:
    """The index: only ever used from the store's one index thread."""

    def __init__(self, root: Path, eviction: str) -> None:
        self.root = root
        self.objects = root / "objects"
        self.locks = root / "locks"
        self.eviction = eviction
        for path in (root, self.objects, self.locks):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            root / "index.sqlite3", timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.last_hits_flush = time.monotonic()

    def close(self) -> None:
        self.db.close()

    def body_path(self, generation: int) -> Path:
        return self.objects / f"{generation}.body"

    def lock_path(self, key: bytes, variant: bytes) -> Path:
        return self.locks / f"{object_name(key, variant)}.lock"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def row(self, where: str, args: tuple[Any, ...]) -> _Row | None:
        found = self.db.execute(f"SELECT {_Row.COLUMNS} FROM objects WHERE {where}", args)
        values = found.fetchone()
        return None if values is None else _Row(*values)

    def rows(self, where: str = "1", args: tuple[Any, ...] = ()) -> list[_Row]:
        found = self.db.execute(f"SELECT {_Row.COLUMNS} FROM objects WHERE {where}", args)
        return [_Row(*values) for values in found]

    # ------------------------------------------------------------ the eviction state

    def load_policy(self) -> EvictionPolicy[Any]:
        policy = new_eviction_policy(self.eviction)
        saved = self.db.execute("SELECT policy, state FROM eviction WHERE id = 1").fetchone()
        if saved is not None and saved[0] == self.eviction:
            policy.restore(orjson.loads(saved[1]))
        else:  # first use, or another policy configured: start from what is on disk
            for generation, length in self.db.execute("SELECT id, length FROM objects ORDER BY id"):
                policy.admit(generation, length)
        return policy

    def save_policy(self, policy: EvictionPolicy[Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO eviction (id, policy, state) VALUES (1, ?, ?)",
            (self.eviction, orjson.dumps(policy.snapshot())),
        )

    def apply_hits(self, policy: EvictionPolicy[Any], hits: Mapping[int, int]) -> None:
        for generation, count in hits.items():
            for _ in range(min(count, 4)):  # the policies saturate far below
                policy.hit(generation)
        self.last_hits_flush = time.monotonic()

    def flush_hits(self, hits: Mapping[int, int]) -> None:
        with self.transaction():
            policy = self.load_policy()
            self.apply_hits(policy, hits)
            self.save_policy(policy)

    # ------------------------------------------------------------ startup

    def reconcile(self) -> tuple[int, int]:
        """Make the index and the objects directory agree (after a crash): rows whose body
        is missing and bodies no row names are removed; the policy's state is brought in
        line with the rows. Returns (rows removed, files removed)."""
        with self.transaction():
            rows = {row.id: row for row in self.rows()}
            files_removed = 0
            on_disk = set()
            for entry in os.scandir(self.objects):
                stem, _, suffix = entry.name.partition(".")
                if suffix == "body" and stem.isdigit() and int(stem) in rows:
                    on_disk.add(int(stem))
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    files_removed += 1
            gone = [generation for generation in rows if generation not in on_disk]
            for generation in gone:
                self.db.execute("DELETE FROM objects WHERE id = ?", (generation,))
                del rows[generation]
            policy = self.load_policy()
            for queue, generation, _, _ in policy.snapshot():
                if queue not in ("ghost", "hand") and generation not in rows:
                    policy.remove(generation)
            for generation, row in rows.items():
                if generation not in policy:
                    policy.admit(generation, row.length)
            self.save_policy(policy)
        return len(gone), files_removed

    # ------------------------------------------------------------ reserving and evicting

    def reserve(
        self,
        key: bytes,
        variant: bytes,
        head: bytes,
        length: int,
        chunk_size: int,
        max_size: int,
        min_free: int,
        pins: Mapping[int, int],
        hits: Mapping[int, int],
    ) -> tuple[int | None, int, list[_Doomed]]:
        """Room for a new object of ``length`` bytes, evicting as needed: (generation, the
        new body's descriptor, what was removed) or (None, -1, removed) when refused."""
        doomed: list[_Doomed] = []
        with self.transaction():
            policy = self.load_policy()
            self.apply_hits(policy, hits)
            old = self.row("key = ? AND variant = ?", (key, variant))
            if old is not None:  # replaced: readers that hold it keep their file
                self.db.execute("DELETE FROM objects WHERE id = ?", (old.id,))
                policy.remove(old.id)
                doomed.append(_Doomed(old.id))
            target = max_size - length
            stat = os.statvfs(self.root)
            free = stat.f_bavail * stat.f_frsize
            (unwritten,) = self.db.execute(
                "SELECT COALESCE(SUM(length - committed), 0) FROM objects WHERE state = 'filling'"
            ).fetchone()
            deficit = min_free + length + unwritten - free
            if deficit > 0:
                target = min(target, policy.used - deficit)
            generation: int | None = None
            fd = -1
            if target >= 0:
                self.evict(policy, target, pins, doomed)
            if target >= 0 and policy.used <= target:
                created = self.db.execute(
                    "INSERT INTO objects (key, variant, state, length, chunk_size, committed,"
                    " chunks, head, created) VALUES (?, ?, 'filling', ?, ?, 0, ?, ?, ?)",
                    (
                        key,
                        variant,
                        length,
                        chunk_size,
                        ChunkMap(length, chunk_size).to_bytes(),
                        head,
                        time.time(),
                    ),
                )
                generation = created.lastrowid
                assert generation is not None
                # the body exists before the row is visible: a row without a body is a crash
                fd = os.open(
                    self.body_path(generation),
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o600,
                )
                try:
                    os.ftruncate(fd, length)
                    policy.admit(generation, length)
                    self.save_policy(policy)
                except BaseException:
                    os.close(fd)
                    os.unlink(self.body_path(generation))
                    raise
            else:
                self.save_policy(policy)
        self.bury(doomed)
        return generation, fd, doomed

    def evict(
        self,
        policy: EvictionPolicy[Any],
        target: int,
        pins: Mapping[int, int],
        doomed: list[_Doomed],
    ) -> None:
        """Ask the policy for victims until ``used <= target``; a victim some reader or fill
        holds (in any process) goes back in, pinned for this round."""
        held = [generation for generation in pins if generation in policy]
        for generation in held:
            policy.pin(generation)
        try:
            while policy.used > target:
                victims = policy.evict(target)
                if not victims:
                    break
                for generation in victims:
                    row = self.row("id = ?", (generation,))
                    if row is None:
                        continue
                    claimed = self.claim(row)
                    if claimed is None:
                        policy.admit(generation, row.length)
                        policy.pin(generation)
                        held.append(generation)
                        continue
                    self.db.execute("DELETE FROM objects WHERE id = ?", (generation,))
                    claimed.evicted = True
                    doomed.append(claimed)
        finally:
            for generation in held:
                policy.unpin(generation)

    def claim(self, row: _Row) -> _Doomed | None:
        """Take what keeps ``row`` from being removed by another process: its lease if it
        is filling (a fill whose process died holds none), and an exclusive lock on its body
        (readers hold shared ones). None if someone holds either."""
        lock_path = self.lock_path(row.key, row.variant)
        # the lease, so the lock file goes too (a complete object's may be held by a fill
        # about to replace it: that fill keeps it)
        doomed = _Doomed(row.id, lock_path=lock_path, lock_fd=acquire_lock_file(lock_path))
        if doomed.lock_fd is None and row.state == "filling":
            return None
        try:
            doomed.body_fd = os.open(self.body_path(row.id), os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(doomed.body_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            pass
        except BlockingIOError:
            self.release(doomed)
            return None
        return doomed

    def release(self, doomed: _Doomed) -> None:
        for fd in (doomed.body_fd, doomed.lock_fd):
            if fd is not None:
                os.close(fd)
        doomed.body_fd = doomed.lock_fd = None

    def bury(self, doomed: list[_Doomed]) -> None:
        """After the commit that deleted their rows: unlink, then let go."""
        for one in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.body_path(one.generation))
            if one.lock_fd is not None and one.lock_path is not None:
                remove_lock_file(one.lock_path, one.lock_fd)
            self.release(one)

    def purge(self, key: bytes, hits: Mapping[int, int]) -> list[_Doomed]:
        doomed: list[_Doomed] = []
        with self.transaction():
            policy = self.load_policy()
            self.apply_hits(policy, hits)
            for row in self.rows("key = ?", (key,)):
                self.db.execute("DELETE FROM objects WHERE id = ?", (row.id,))
                policy.remove(row.id)
                lock_path = self.lock_path(row.key, row.variant)
                # a live fill keeps its lock file (and goes on for its readers)
                one = _Doomed(row.id, lock_path=lock_path, lock_fd=acquire_lock_file(lock_path))
                doomed.append(one)
            self.save_policy(policy)
        self.bury(doomed)
        return doomed

    def remove(self, generation: int) -> None:
        """An abandoned fill's row (and its place in the policy)."""
        with self.transaction():
            gone = self.db.execute("DELETE FROM objects WHERE id = ?", (generation,)).rowcount
            if gone:
                policy = self.load_policy()
                policy.remove(generation)
                self.save_policy(policy)

    def totals(self) -> dict[str, int]:
        complete, complete_bytes, filling, filling_bytes, committed = self.db.execute(
            "SELECT COALESCE(SUM(state = 'complete'), 0),"
            " COALESCE(SUM(CASE WHEN state = 'complete' THEN length END), 0),"
            " COALESCE(SUM(state = 'filling'), 0),"
            " COALESCE(SUM(CASE WHEN state = 'filling' THEN length END), 0),"
            " COALESCE(SUM(CASE WHEN state = 'filling' THEN committed END), 0)"
            " FROM objects"
        ).fetchone()
        on_disk = complete_bytes
        for row in self.rows("state = 'filling'"):
            chunks = ChunkMap(row.length, row.chunk_size, row.chunks)
            beyond = [
                chunks.bounds(i) for i in chunks.present() if chunks.bounds(i)[0] >= row.committed
            ]
            on_disk += row.committed + sum(end - start for start, end in beyond)
        stat = os.statvfs(self.root)
        return {
            "bytes_on_disk": on_disk,
            "objects": complete,
            "objects_bytes": complete_bytes,
            "partial_objects": filling,
            "partial_bytes_reserved": filling_bytes,
            "partial_bytes_committed": committed,
            "bytes_reserved": complete_bytes + filling_bytes,
            "free_bytes": stat.f_bavail * stat.f_frsize,
        }


class CacheStore:
    """The disk store of the cache; open it with ``async with CacheStore(...) as store``.

    ``max_size``: bytes the objects may reserve in all (each object counts its full length
    from the moment its fill starts; the index and lock files are metadata on top).
    ``min_free``: bytes of the filesystem a new reservation must leave free.
    ``durable=False`` skips the ``fdatasync`` before each commit: a killed process still
    leaves exact objects (the page cache outlives it), a power cut may not.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_size: int,
        min_free: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        eviction: str = DEFAULT_EVICTION,
        durable: bool = True,
    ) -> None:
        if max_size < 0 or min_free < 0 or chunk_size <= 0:
            raise ValueError("max_size and min_free are >= 0, chunk_size > 0")
        new_eviction_policy(eviction)  # a bad name fails here
        self.directory = Path(directory)
        self.max_size = max_size
        self.min_free = min_free
        self.chunk_size = chunk_size
        self.eviction = eviction
        self.durable = durable
        self._index: _Index | None = None
        self._index_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._io_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # generation -> count of this process's readers and fills holding it
        self._pins: collections.Counter[int] = collections.Counter()
        self._hits: collections.Counter[int] = collections.Counter()
        self._live: dict[int, Fill] = {}
        self._follows: dict[int, _Follow] = {}  # generation -> readers polling its record
        self.counters: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._index_pool = concurrent.futures.ThreadPoolExecutor(1, "fileproxy-cache-index")
        self._io_pool = concurrent.futures.ThreadPoolExecutor(IO_THREADS, "fileproxy-cache-io")
        try:
            self._index = await self._loop.run_in_executor(
                self._index_pool, _Index, self.directory, self.eviction
            )
            rows, files = await self._loop.run_in_executor(self._index_pool, self._index.reconcile)
        except BaseException:
            await self.close()
            raise
        if rows or files:
            log.info("cache index repaired: %d rows without a body, %d stray files", rows, files)

    async def close(self) -> None:
        """After every fill and reader is closed; waits for the disk work under way."""
        index, self._index = self._index, None
        pools = [pool for pool in (self._index_pool, self._io_pool) if pool is not None]
        try:
            if index is not None and self._index_pool is not None:
                if self._hits:
                    hits, self._hits = dict(self._hits), collections.Counter()
                    with contextlib.suppress(sqlite3.Error, OSError):
                        await asyncio.get_running_loop().run_in_executor(
                            self._index_pool, index.flush_hits, hits
                        )
                await asyncio.get_running_loop().run_in_executor(self._index_pool, index.close)
        finally:
            for pool in pools:
                pool.shutdown(wait=True)
            self._index_pool = self._io_pool = None

    async def __aenter__(self) -> CacheStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def index(self) -> _Index:
        if self._index is None:
            raise RuntimeError("the cache store is not open")
        return self._index

    async def _in_index(
        self, fn: Callable[..., T], *args: Any, undo: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn`` on the index thread to its end even if the caller is cancelled; then
        ``undo`` its result there (what the cancelled caller would have owned)."""
        assert self._loop is not None and self._index_pool is not None
        future = self._loop.run_in_executor(self._index_pool, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if undo is not None:
                pool = self._index_pool
                future.add_done_callback(lambda done: _undo_after(done, pool, undo))
            raise

    async def _in_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on an I/O thread; a cancelled caller still waits for it to end (its
        descriptor must not be closed, and its number reused, under a running pread/pwrite)."""
        assert self._loop is not None and self._io_pool is not None
        future = self._loop.run_in_executor(self._io_pool, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            raise

    def hold(self, fd: int, key: bytes, variant: bytes, generation: int, length: int) -> HeldFile:
        """``fd``, the body file of the complete object ``generation`` the caller opened
        (and checked), held as a reader holds it: pinned until closed."""
        return HeldFile(self, fd, key, variant, generation, length)

    def note_use(self, generation: int) -> None:
        """A use of a stored object (a hit) for the eviction policy; it reaches the
        index's state at this process's next transaction."""
        self._hits[generation] += 1

    @property
    def fills_in_progress(self) -> int:
        """Fills this process runs now."""
        return len(self._live)

    def _take_hits(self) -> dict[int, int]:
        hits, self._hits = dict(self._hits), collections.Counter()
        return hits

    # ------------------------------------------------------------ the API

    def fill(
        self, key: bytes | str, head: StoredHead, length: int, variant: bytes | str = b""
    ) -> Fill:
        """A new fill of (key, variant): ``async with store.fill(...) as fill``. Entering
        takes the lease (else ``FillBusy``) and reserves ``length`` bytes (else
        ``ReservationRefused``); an older object of the same key and variant is replaced."""
        if length < 0:
            raise ValueError(f"a length is >= 0, got {length}")
        return Fill(self, _as_bytes(key), _as_bytes(variant), head, length, resume=False)

    def resume(self, key: bytes | str, variant: bytes | str = b"") -> Fill:
        """Take over an incomplete object (a fill whose process died, or paused): its head,
        length, committed prefix and chunks are the fill's; ``NotStored`` if there is none."""
        return Fill(self, _as_bytes(key), _as_bytes(variant), None, 0, resume=True)

    def open_reader(self, key: bytes | str, variant: bytes | str = b"") -> Reader:
        """``async with store.open_reader(key, variant) as reader``; ``NotStored`` if there
        is neither an object nor a fill that is about to store one."""
        return Reader(self, _as_bytes(key), _as_bytes(variant))

    async def variants(self, key: bytes | str) -> list[StoredObject]:
        """Every stored variant of ``key`` (complete or filling), oldest first."""
        rows = await self._in_index(self.index.rows, "key = ? ORDER BY id", (_as_bytes(key),))
        return [row.stored() for row in rows]

    async def update_head(self, key: bytes | str, variant: bytes | str, head: StoredHead) -> bool:
        """Replace a stored head (a 304's merge); False if the object is gone. The body
        file is touched after (its ctime changes): a process that holds the object hot
        (``CacheService.hit``) sees it is no longer the file it knows, and reads the row."""

        def update() -> bool:
            index = self.index
            with index.transaction():
                found = index.db.execute(
                    "SELECT id FROM objects WHERE key = ? AND variant = ?",
                    (_as_bytes(key), _as_bytes(variant)),
                ).fetchone()
                if found is None:
                    return False
                index.db.execute(
                    "UPDATE objects SET head = ? WHERE id = ?", (head.encode(), found[0])
                )
            path = index.body_path(found[0])
            with contextlib.suppress(FileNotFoundError):  # its mtime moves on by 1 ns at least
                st = os.stat(path)
                os.utime(path, ns=(st.st_atime_ns, max(time.time_ns(), st.st_mtime_ns + 1)))
            return True

        return await self._in_index(update)

    async def flush_hits(self) -> None:
        """The uses this process counted (``_hits``: hits answered without opening a
        reader too) into the index's eviction state now; nothing when there were none."""
        if self._hits and self._index is not None:
            await self._in_index(self.index.flush_hits, self._take_hits())

    async def purge(self, key: bytes | str) -> int:
        """Remove every variant of ``key``; readers that hold one keep it until they close.
        Returns how many objects went."""
        doomed = await self._in_index(self.index.purge, _as_bytes(key), self._take_hits())
        self.counters["purged"] += len(doomed)
        return len(doomed)

    async def stats(self) -> dict[str, int]:
        """Disk use from the index (all processes), activity counters of this process."""
        totals = await self._in_index(self.index.totals)
        return {
            **totals,
            "max_size": self.max_size,
            "min_free": self.min_free,
            "fills_in_progress": self.fills_in_progress,
            "readers_open": self.counters["readers_open"],
            "readers_waiting": self.counters["readers_waiting"],
            "evictions": self.counters["evictions"],
            "reservations_refused": self.counters["reservations_refused"],
            "fills_busy": self.counters["fills_busy"],
            "fills_completed": self.counters["fills_completed"],
            "fills_abandoned": self.counters["fills_abandoned"],
            "fills_resumed": self.counters["fills_resumed"],
            "enospc": self.counters["enospc"],
            "purged": self.counters["purged"],
        }

    async def _poll(self, generation: int, fd: int) -> None:
        """Until the progress record of ``generation`` (read through ``fd``) changes, or at
        most ``LEASE_PROBE_S``. The readers of one object in this process share the polling:
        one of them reads the record every ``POLL_S``, the others sleep until it sees a
        change (or leaves), so a herd of readers costs the polls of one."""
        follow = self._follows.get(generation)
        if follow is None:
            follow = self._follows[generation] = _Follow()
        follow.users += 1
        try:
            if follow.leading:
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                follow.waiters.append(waiter)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, LEASE_PROBE_S)
                return
            follow.leading = True
            try:
                seen = _read_record(fd)
                deadline = time.monotonic() + LEASE_PROBE_S
                while time.monotonic() < deadline:
                    await asyncio.sleep(POLL_S)
                    if _read_record(fd) != seen:
                        break
            finally:
                follow.leading = False
                waiters, follow.waiters = follow.waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            follow.users -= 1
            if not follow.users:
                del self._follows[generation]

    def _pin(self, generation: int) -> None:
        self._pins[generation] += 1

    def _unpin(self, generation: int) -> None:
        self._pins[generation] -= 1
        if self._pins[generation] <= 0:
            del self._pins[generation]


class _Follow:
    """The readers in this process that poll one fill's record (see ``CacheStore._poll``)."""

    __slots__ = ("leading", "users", "waiters")

    def __init__(self) -> None:
        self.leading = False
        self.users = 0
        self.waiters: list[asyncio.Future[None]] = []


def _read_record(fd: int) -> bytes:
    return os.pread(fd, FillProgress.SIZE, 0) if fd >= 0 else b""


def _undo_after(
    done: asyncio.Future[T], pool: concurrent.futures.Executor, undo: Callable[[T], None]
) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    pool.submit(undo, done.result())


class Fill:
    """The lease on one object and the writes into it (see ``CacheStore.fill``/``resume``).

    ``write(offset, data)`` anywhere in ``[0, length)``; the bytes are visible to readers at
    once, and durable at the next ``commit`` (automatic whenever a chunk is completed).
    ``complete()`` once every byte is written. Leaving the block without ``complete()`` or
    ``pause()``, or with an exception, abandons the fill."""

    def __init__(
        self,
        store: CacheStore,
        key: bytes,
        variant: bytes,
        head: StoredHead | None,
        length: int,
        *,
        resume: bool,
    ) -> None:
        self.store = store
        self.key = key
        self.variant = variant
        self._head = head
        self.length = length
        self.resuming = resume
        self.generation = 0
        self.committed = 0  # durable prefix
        self.chunks = ChunkMap(length, store.chunk_size)
        self.chunks_version = 0
        self.purged = False  # the object was purged or replaced while filling: not stored
        self._written = ByteRanges()
        self._run = (0, 0)
        self._state: FillState | None = None
        self._ending: str | None = None  # "complete" or "pause"
        self._failed: BaseException | None = None
        self._lease_fd = -1
        self._lease_lock = threading.Lock()  # publications (loop) against closing (index thread)
        self._body_fd = -1
        self._waiters: list[asyncio.Future[None]] = []
        self.progress: FillProgress | None = None

    @property
    def head(self) -> StoredHead:
        assert self._head is not None
        return self._head

    @property
    def written(self) -> int:
        """The prefix written so far (visible to readers, durable up to ``committed``)."""
        return self._written.prefix()

    def missing(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Chunk-aligned ranges not yet durable, to cover ``[start, end)``."""
        return self.chunks.missing(start, end)

    # ------------------------------------------------------------ enter: lease, reservation

    async def __aenter__(self) -> Fill:
        store, index = self.store, self.store.index
        lease = acquire_lock_file(index.lock_path(self.key, self.variant))
        if lease is None:
            store.counters["fills_busy"] += 1
            raise FillBusy(f"another fill holds {self.key!r}")
        self._lease_fd = lease
        try:
            if self.resuming:
                await self._enter_resume()
            else:
                await self._enter_new()
        except BaseException:
            self._close_lease()
            raise
        store._live[self.generation] = self
        store._pin(self.generation)
        self._state = FillState.FILLING
        self._publish()
        return self

    async def _enter_new(self) -> None:
        store = self.store
        assert self._head is not None
        try:
            generation, fd, doomed = await store._in_index(
                store.index.reserve,
                self.key,
                self.variant,
                self._head.encode(),
                self.length,
                store.chunk_size,
                store.max_size,
                store.min_free,
                dict(store._pins),
                store._take_hits(),
                undo=self._undo_reservation,
            )
        except Exception as error:
            if _disk_full(error):
                store.counters["reservations_refused"] += 1
                raise ReservationRefused(f"the disk is full: {error}") from error
            raise
        store.counters["evictions"] += sum(one.evicted for one in doomed)
        if generation is None:
            store.counters["reservations_refused"] += 1
            raise ReservationRefused(
                f"no room for {self.length} bytes within max_size {store.max_size} "
                f"and min_free {store.min_free}"
            )
        self.generation, self._body_fd = generation, fd

    def _undo_reservation(self, result: tuple[int | None, int, list[_Doomed]]) -> None:
        generation, fd, _ = result
        if generation is not None:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.store.index.body_path(generation))
            self.store.index.remove(generation)

    async def _enter_resume(self) -> None:
        store = self.store

        def find() -> tuple[_Row, int]:
            row = store.index.row(
                "key = ? AND variant = ? AND state = 'filling'", (self.key, self.variant)
            )
            if row is None:
                raise NotStored(self.key)
            try:
                fd = os.open(store.index.body_path(row.id), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                store.index.remove(row.id)
                raise NotStored(self.key) from None
            return row, fd

        row, fd = await store._in_index(find, undo=lambda found: os.close(found[1]))
        self._body_fd = fd
        self.generation = row.id
        self._head = StoredHead.decode(row.head)
        self.length = row.length
        self.committed = row.committed
        self.chunks = ChunkMap(row.length, row.chunk_size, row.chunks)
        self.chunks_version = row.chunks_version
        self._written = ByteRanges([(0, row.committed)])
        for chunk in self.chunks.present():
            self._written.add(*self.chunks.bounds(chunk))
        self._run = (0, row.committed)
        store.counters["fills_resumed"] += 1

    # ------------------------------------------------------------ writing

    def _check_open(self) -> None:
        if self._failed is not None:
            raise StoreFull("this fill failed") from self._failed
        if self._state is not FillState.FILLING or self._ending is not None:
            raise RuntimeError("the fill is not open for writing")

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``; commits when this completes a chunk.
        ``StoreFull`` when the disk is full (the fill is then abandoned on exit)."""
        self._check_open()
        size = len(data)
        if offset < 0 or offset + size > self.length:
            raise ValueError(f"[{offset}, {offset + size}) is outside 0..{self.length}")
        if size == 0:
            return
        try:
            await self.store._in_io(_pwrite_all, self._body_fd, data, offset)
        except OSError as error:
            self._fail(error)
            raise StoreFull(f"writing the cache file: {error}") from error
        self._written.add(offset, offset + size)
        start, end = self._run
        self._run = (start, end + size) if offset == end else (offset, offset + size)
        self._publish()
        first, last = self.chunks.index_of(offset), self.chunks.index_of(offset + size - 1)
        for chunk in range(first, last + 1):
            if chunk not in self.chunks and self._written.covers(*self.chunks.bounds(chunk)):
                await self.commit()
                break

    def _fail(self, error: BaseException) -> None:
        self._failed = error
        if _disk_full(error):
            self.store.counters["enospc"] += 1

    async def commit(self) -> None:
        """Make what is written durable: the chunks it completes and the prefix."""
        self._check_open()
        prefix = self._written.prefix()
        newly = [
            chunk
            for chunk in range(self.chunks.count)
            if chunk not in self.chunks and self._written.covers(*self.chunks.bounds(chunk))
        ]
        if prefix == self.committed and not newly:
            return
        try:
            await self.store._in_index(self._commit_sync, prefix, newly, False)
        except (OSError, sqlite3.Error) as error:
            self._fail(error)
            raise StoreFull(f"committing the cache file: {error}") from error

    def _commit_sync(self, prefix: int, newly: list[int], complete: bool) -> None:
        if self.store.durable:
            os.fdatasync(self._body_fd)
        chunks = self.chunks.copy()
        for chunk in newly:
            chunks.mark(chunk)
        index = self.store.index
        with index.transaction():
            updated = index.db.execute(
                "UPDATE objects SET committed = ?, chunks = ?, chunks_version = chunks_version + 1,"
                " state = ? WHERE id = ? AND state = 'filling'",
                (
                    prefix,
                    chunks.to_bytes(),
                    "complete" if complete else "filling",
                    self.generation,
                ),
            ).rowcount
        if not updated:
            self.purged = True
        self.chunks, self.committed = chunks, prefix
        self.chunks_version += 1
        if complete:
            self._state = FillState.COMPLETE
        self._publish_threadsafe()

    async def complete(self) -> None:
        """Every byte is written: make it durable and mark the object complete (a purged or
        replaced object is finished for its readers but not stored: ``purged``)."""
        self._check_open()
        if not self._written.covers(0, self.length):
            raise ValueError(
                f"{self.length - self._written.prefix()} bytes of {self.length} are not written"
            )
        try:
            await self.store._in_index(
                self._commit_sync, self.length, list(range(self.chunks.count)), True
            )
        except (OSError, sqlite3.Error) as error:
            self._fail(error)
            raise StoreFull(f"completing the cache file: {error}") from error
        self._ending = "complete"
        self.store.counters["fills_completed"] += 1

    def pause(self) -> None:
        """Stop here on purpose: on leaving the block, what is written is committed and
        stays, the object incomplete, for ``store.resume``."""
        self._check_open()
        self._ending = "pause"

    # ------------------------------------------------------------ progress for readers

    def _publish(self) -> None:
        """The progress record for readers elsewhere; wake the readers here."""
        assert self._state is not None
        prefix = self._written.prefix()
        self.progress = FillProgress(
            self.generation,
            prefix,
            self._run[0],
            self._run[1],
            self.chunks_version,
            self._state,
            os.getpid(),
        )
        with self._lease_lock, contextlib.suppress(OSError):  # else readers elsewhere probe
            if self._lease_fd >= 0:
                os.pwrite(self._lease_fd, self.progress.encode(), 0)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _publish_threadsafe(self) -> None:
        loop = self.store._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._publish)

    def changed(self) -> asyncio.Future[None]:
        """Resolved at the next publication (for readers in this process)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    # ------------------------------------------------------------ leaving

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store = self.store
        if exc is None and self._ending == "complete":
            ending, final = self._release_sync, FillState.COMPLETE
        elif exc is None and self._ending == "pause" and self._failed is None:
            ending, final = self._pause_sync, FillState.PAUSED
        else:
            ending, final = self._abandon_sync, FillState.ABANDONED
            if self._failed is not None and _disk_full(self._failed):
                final = FillState.NO_ROOM  # readers elsewhere learn it from the record
            store.counters["fills_abandoned"] += 1
        self._state = final
        self._publish()
        try:
            await store._in_index(ending)
        finally:
            store._live.pop(self.generation, None)
            store._unpin(self.generation)
            self._publish()  # wake the readers here once more, the lease gone

    def _release_sync(self) -> None:
        os.close(self._body_fd)
        self._close_lease()

    def _close_lease(self) -> None:
        with self._lease_lock:
            fd, self._lease_fd = self._lease_fd, -1
            os.close(fd)  # the lease goes with the last descriptor

    def _pause_sync(self) -> None:
        try:
            prefix = self._written.prefix()
            newly = [
                chunk
                for chunk in range(self.chunks.count)
                if chunk not in self.chunks and self._written.covers(*self.chunks.bounds(chunk))
            ]
            if prefix != self.committed or newly:
                with contextlib.suppress(OSError, sqlite3.Error):  # then less stays committed
                    self._commit_sync(prefix, newly, False)
        finally:
            self._release_sync()

    def _abandon_sync(self) -> None:
        """Nothing of an abandoned fill stays: the body truncated and unlinked first (that
        frees its space at once, even while readers hold it open — they are told to abort —
        and a full disk needs that space for the index's own write), then its row."""
        index = self.store.index
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(self._body_fd, 0)
            os.close(self._body_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(index.body_path(self.generation))
            try:
                index.remove(self.generation)
            except sqlite3.OperationalError as error:
                if not _disk_full(error):
                    raise
                try:
                    index.remove(self.generation)  # once more, with the body's space back
                except sqlite3.OperationalError as again:
                    if not _disk_full(again):
                        raise
                    # the row stays 'filling' without a lease and without a body: never
                    # complete; the next reader, resume or start removes it
                    log.warning("cache index full: an abandoned fill's row stays for now")
        finally:
            self._close_lease()


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class HeldFile:
    """A complete object's body file, opened by its caller (who checked it is still the
    object's file): the part of ``Reader`` a body sent from it uses. Like a reader, it
    pins the object while it is open (see ``CacheStore.hold``)."""

    complete = True

    def __init__(
        self, store: CacheStore, fd: int, key: bytes, variant: bytes, generation: int, length: int
    ) -> None:
        self.store = store
        self.key, self.variant, self.generation, self.length = key, variant, generation, length
        self._fd = fd
        store._pin(generation)
        store.note_use(generation)
        store.counters["readers_open"] += 1

    def fileno(self) -> int:
        return self._fd

    async def wait_for(self, offset: int) -> int:
        return self.length  # complete: every byte is there

    async def pread(self, offset: int, size: int) -> bytes:
        return await self.store._in_io(os.pread, self._fd, size, offset)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self.store._unpin(self.generation)
            self.store.counters["readers_open"] -= 1
            os.close(fd)


class Reader:
    """One object held open (see ``CacheStore.open_reader``): the head, the length, and
    the bytes as they are committed. While a reader is open its object is pinned."""

    def __init__(self, store: CacheStore, key: bytes, variant: bytes) -> None:
        self.store = store
        self.key = key
        self.variant = variant
        self.generation = 0
        self.head: StoredHead | None = None
        self.length = 0
        self.complete = False
        self.owner = 0  # pid of the process filling it, as last seen
        self.takeovers = 0  # how often another process took the fill over
        self._body_fd = -1
        self._lock_fd = -1
        self._progress: FillProgress | None = None
        self._chunks: ChunkMap | None = None
        self._chunks_version = -1
        self._committed = 0
        self._opened = False

    async def __aenter__(self) -> Reader:
        store = self.store
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            due = time.monotonic() - store.index.last_hits_flush > HITS_FLUSH_S
            hits = store._take_hits() if due else {}
            opened = await store._in_index(self._open_sync, hits, undo=_close_opened)
            if opened is not None:
                break
            if time.monotonic() > deadline:
                raise NotStored(self.key)
            await asyncio.sleep(POLL_S)
        row, self._body_fd, self._lock_fd = opened
        self.generation = row.id
        self.head = StoredHead.decode(row.head)
        self.length = row.length
        self.complete = row.state == "complete"
        self._chunks = ChunkMap(row.length, row.chunk_size, row.chunks)
        self._chunks_version = row.chunks_version
        if not self.complete:
            self._progress = FillProgress(
                row.id, row.committed, 0, row.committed, row.chunks_version, FillState.FILLING, 0
            )
        store._pin(self.generation)
        store.note_use(self.generation)
        store.counters["readers_open"] += 1
        self._opened = True
        return self

    def _open_sync(self, hits: dict[int, int]) -> tuple[_Row, int, int] | None:
        """(row, body fd with a shared lock, lock-file fd or -1); None to wait a moment (a
        fill holds the lease but has not stored its row); NotStored when there is nothing."""
        index = self.store.index
        if hits:
            with contextlib.suppress(sqlite3.Error):  # uses lost: the policy is a little off
                index.flush_hits(hits)
        for _ in range(3):
            row = index.row("key = ? AND variant = ?", (self.key, self.variant))
            if row is None:
                lock_path = index.lock_path(self.key, self.variant)
                try:
                    fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise NotStored(self.key) from None
                try:
                    if _lease_held(fd):
                        return None
                finally:
                    os.close(fd)
                raise NotStored(self.key)
            try:
                body = os.open(index.body_path(row.id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed a moment ago
            try:
                fcntl.flock(body, fcntl.LOCK_SH)  # pinned against eviction from here on
                if index.row("id = ?", (row.id,)) is None:
                    os.close(body)
                    continue
                lock = -1
                if row.state == "filling":
                    with contextlib.suppress(FileNotFoundError):
                        lock = os.open(
                            index.lock_path(self.key, self.variant), os.O_RDONLY | os.O_CLOEXEC
                        )
                return row, body, lock
            except BaseException:
                os.close(body)
                raise
        raise NotStored(self.key)

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._opened:
            self._opened = False
            self.store._unpin(self.generation)
            self.store.counters["readers_open"] -= 1
        for fd in (self._body_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._body_fd = self._lock_fd = -1

    def fileno(self) -> int:
        """The body's descriptor (for ``os.sendfile`` of committed ranges)."""
        return self._body_fd

    # ------------------------------------------------------------ following the fill

    def _available(self, offset: int) -> int:
        if self.complete:
            return self.length
        end = offset
        while True:
            reach = end
            if self._progress is not None:
                reach = max(reach, self._progress.available_end(end))
            if self._chunks is not None:
                reach = max(reach, self._chunks.run_end(end))
            if reach == end:
                return min(end, self.length)
            end = reach

    def _look(self) -> bool:
        """Read the fill's progress (from the fill itself here, else from its record);
        True if it changed since the last look."""
        live = self.store._live.get(self.generation)
        progress = live.progress if live is not None else None
        if progress is None and self._lock_fd >= 0:
            for _ in range(3):
                progress = FillProgress.decode(os.pread(self._lock_fd, FillProgress.SIZE, 0))
                if progress is not None:
                    break
        if progress is None or progress.generation != self.generation:
            return False
        changed = progress != self._progress
        if self._progress is not None and progress.owner and self.owner != progress.owner:
            if self.owner:
                self.takeovers += 1
            self.owner = progress.owner
        self._progress = progress
        if progress.state is FillState.COMPLETE:
            self.complete = True
        if live is not None:
            self._chunks, self._chunks_version = live.chunks, live.chunks_version
        return changed

    def _record_generation(self) -> int:
        progress = FillProgress.decode(os.pread(self._lock_fd, FillProgress.SIZE, 0))
        return self.generation if progress is None else progress.generation

    async def _reload_chunks(self) -> bool:
        """The durable chunk map from the index; False if the object is gone."""
        row = await self.store._in_index(self.store.index.row, "id = ?", (self.generation,))
        if row is None:
            return False
        self._chunks = ChunkMap(row.length, row.chunk_size, row.chunks)
        self._chunks_version = row.chunks_version
        self._committed = row.committed
        if row.state == "complete":
            self.complete = True
        return True

    async def wait_for(self, offset: int) -> int:
        """Wait until the byte at ``offset`` is readable; returns where the readable bytes
        from ``offset`` end. ``FillAbandoned``: the fill failed or the object was removed;
        ``FillOutOfRoom`` (a ``FillAbandoned``): it stopped for want of room, its upstream
        did not fail; ``FillOrphaned``: nobody fills it any more (take it over, or give up)."""
        if not self._opened:
            raise RuntimeError("the reader is closed")
        if not 0 <= offset < self.length:
            raise ValueError(f"offset {offset} outside 0..{self.length}")
        counters = self.store.counters
        counters["readers_waiting"] += 1
        try:
            quiet_since = time.monotonic()
            while True:
                if self._look():
                    quiet_since = time.monotonic()
                progress = self._progress
                if progress is not None and progress.state is FillState.NO_ROOM:
                    raise FillOutOfRoom(f"the fill of {self.key!r} ran out of room")
                if progress is not None and progress.state is FillState.ABANDONED:
                    raise FillAbandoned(f"the fill of {self.key!r} was abandoned")
                if (
                    progress is not None
                    and progress.chunks_version != self._chunks_version
                    and not await self._reload_chunks()
                ):
                    raise FillAbandoned(f"{self.key!r} was removed while filling")
                end = self._available(offset)
                if end > offset:
                    return end
                live = self.store._live.get(self.generation)
                if live is not None:
                    waiter = live.changed()
                    try:
                        await waiter
                    finally:
                        waiter.cancel()
                    continue
                if progress is not None and progress.state is FillState.PAUSED:
                    raise FillOrphaned(progress.prefix)
                await self.store._poll(self.generation, self._lock_fd)
                if time.monotonic() - quiet_since < LEASE_PROBE_S:
                    continue
                quiet_since = time.monotonic()
                ours = self._lock_fd >= 0 and self._record_generation() == self.generation
                if ours and _lease_held(self._lock_fd):
                    continue  # a slow fill
                self._look()
                if self._available(offset) > offset:
                    continue
                if not await self._reload_chunks():
                    raise FillAbandoned(f"{self.key!r} was removed while filling")
                if not self.complete:
                    raise FillOrphaned(self._committed)
        finally:
            counters["readers_waiting"] -= 1

    async def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` committed bytes at ``offset`` (waits for the first of them)."""
        end = await self.wait_for(offset)
        return await self.pread(offset, min(size, end - offset))

    async def pread(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` without waiting: bytes ``wait_for`` said are
        readable. Fewer (none) when the file was given back under the reader: a fill that
        ran out of room truncates its file; ``wait_for`` then says why."""
        return await self.store._in_io(os.pread, self._body_fd, size, offset)


def _close_opened(opened: tuple[_Row, int, int] | None) -> None:
    if opened is not None:
        for fd in opened[1:]:
            if fd >= 0:
                os.close(fd)
