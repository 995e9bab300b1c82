"""The spool: slow clients never hold upstream connections (issue 14).

A response that may spill (``adaptive.spill.never_spilled``) is relayed by
``relay`` here instead of the plain relay of the proxy handler. It starts the same
way — each upstream piece written to the client and awaited — and costs a fast
client one look at its transport's buffer per piece: a client that keeps up never
touches the spool. When the client holds the relay back (its transport above the
high-water mark), the relay measures for a moment and asks ``adaptive.spill.decide``.
On a spill the rest of the upstream body goes into a per-response ``Spool``:

- memory up to ``BUFFER_SIZE``, then an unlinked temp file in the spool directory
  (``O_TMPFILE``, else ``mkstemp`` and ``unlink`` at once: a crash leaves no file;
  a killed worker's empty private directory is removed by the next worker's start);
- read from the upstream at the upstream's pace by a filler task, which gives the
  connection back to the pool (keep-alive) the moment the body is complete;
- served to the client at the client's pace: what the file holds goes out by
  ``os.sendfile`` (``http.zero_copy``: the kernel copies it, no byte passes through
  Python; uvloop has no ``loop.sendfile``), what memory holds by ``response.write``;
  over TLS or a socket sendfile cannot take, the file is read back and written.
  Every disk read and write runs on the store's small thread pool, never on the
  event loop (a sendfile piece not in the page cache is read into it there first).

Bounds never fail a response. ``FILEPROXY_SPOOL_MAX_FILE`` (per response),
``FILEPROXY_SPOOL_MAX_TOTAL`` (per worker), a full disk (``ENOSPC``) or a directory
that cannot be written: the response stops using the file (counted under the
reason) and its filler waits for the client, as without a spool — slower, never
a lost byte. A file already written is still served in order before anything
newer. When the client has read everything the file holds, it is truncated, so a
client that catches up gives its disk space back.

Edges: the client going away cancels the handler, which cancels the filler (the
upstream read stops, the connection is closed, not pooled) and closes the file
(the space is freed at once). The upstream failing mid-body: the client gets what
arrived, then its connection is aborted — with the Content-Length kept, a short
body never looks complete.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from fileproxy.adaptive.spill import RelaySample, SpillPolicy, decide, never_spilled
from fileproxy.exchange import Exchange
from fileproxy.http import errors, zero_copy
from fileproxy.http.data_plane import ClientRequest, ClientResponse
from fileproxy.http.edge import abort_send_timed_out, end_cut_short, reset, watch_sending
from fileproxy.settings import Settings
from fileproxy.upstream.client import UpstreamResponse

log = logging.getLogger("fileproxy.spool")

# as proxy_handler.RELAY_SLICE_BYTES: a stream gives the loop a turn after this much
SLICE_BYTES = 64 * 1024
# largest piece read from the upstream or the file at once while spooling (one thread hop)
SPOOL_PIECE = 256 * 1024
# piece read back from the file at once: the client's transport holds at most its high-water
# mark plus this
FILE_READ = 64 * 1024
# how often a finished spooled response looks whether its client took the last bytes
FLUSH_POLL_S = 0.05
# threads doing the spool's disk I/O: page-cache copies, a few are plenty
IO_THREADS = 4
# auto FILEPROXY_SPOOL_MAX_TOTAL: this share of the free space at start, split among workers
AUTO_SHARE = 0.5

FALLBACK_REASONS = ("read_only", "enospc", "max_file", "max_total", "io_error")
# a worker's private spool directory (FILEPROXY_SPOOL_DIR unset): <prefix><pid>-<random>
PRIVATE_DIR_PREFIX = "fileproxy-spool-"


def auto_max_total(free_bytes: int, workers: int) -> int:
    """FILEPROXY_SPOOL_MAX_TOTAL=auto: half the spool filesystem's free space, per worker.

    The spool shares its filesystem with whatever else lives there (logs, the
    journal, the OS, other services): a spool that fills it breaks them, and is not
    needed for that — a response that meets the bound only waits for its client, as
    it would without a spool. Half of what is free when the worker starts, split
    evenly among the workers (each keeps its own account), leaves the other half to
    the rest; a disk that still fills up (others grew) is caught by ENOSPC, which
    falls back the same way.
    """
    return int(max(0, free_bytes) * AUTO_SHARE) // max(1, workers)


def private_dir_pid(name: str) -> int | None:
    """The worker pid in a private spool directory's name, None for any other name."""
    if not name.startswith(PRIVATE_DIR_PREFIX):
        return None
    pid, sep, suffix = name[len(PRIVATE_DIR_PREFIX) :].partition("-")
    if not (sep and suffix and pid.isascii() and pid.isdigit()) or "-" in suffix:
        return None
    return int(pid) or None


def stale_private_dirs(names: Iterable[str], alive: Callable[[int], bool]) -> list[str]:
    """Which of these private spool directories (names in one parent, each a directory
    owned by us) belong to a worker that is gone, so nothing will ever remove them.

    A worker removes its own at exit; one killed (SIGKILL, OOM) leaves it behind:
    empty (its files were unlinked from the start) but there for good. ``alive``
    is asked once per pid. A pid reused by another process keeps a directory until
    that one is gone too. Workers that share a temp dir but not a pid namespace
    (containers mounting one host /tmp) would see each other as gone: give them
    their own TMPDIR or FILEPROXY_SPOOL_DIR."""
    verdicts: dict[int, bool] = {}
    stale = []
    for name in names:
        pid = private_dir_pid(name)
        if pid is None:
            continue
        if pid not in verdicts:
            verdicts[pid] = alive(pid)
        if not verdicts[pid]:
            stale.append(name)
    return sorted(stale)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def sweep_stale_private_dirs(parent: str) -> list[str]:
    """Remove the private spool directories in ``parent`` left by workers that are gone
    (only directories, only ours); the paths removed. Errors are ignored: a sweep that
    cannot remove something leaves it for the next worker's."""
    uid = os.geteuid()
    ours = []
    try:
        with os.scandir(parent) as entries:
            for entry in entries:
                if private_dir_pid(entry.name) is None:
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
                    ours.append(entry.name)
    except OSError:
        return []
    removed = []
    for name in stale_private_dirs(ours, _pid_alive):
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _fallback_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "enospc"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR):
        return "read_only"
    return "io_error"


class SpoolStore:
    """One worker's spool: its directory, disk budget, counters and I/O threads."""

    def __init__(self, settings: Settings, workers: int = 1) -> None:
        self.enabled = settings.spool
        self.memory_cap = settings.buffer_size
        # a client that takes no byte of the file for this long is aborted (sendfile)
        self.send_timeout = settings.send_timeout
        self.max_file = settings.spool_max_file
        self._configured_total = settings.spool_max_total
        self._workers = workers
        self._configured_dir = settings.spool_dir
        self.dir = settings.spool_dir
        self.max_total = 0
        self._private = False
        self.policy = SpillPolicy()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tmpfile = hasattr(os, "O_TMPFILE")
        # gauges
        self.bytes_on_disk = 0
        self.bytes_in_memory = 0
        self.files = 0
        self.active = 0  # responses served from a spool right now (clients slower than upstreams)
        # counters
        self.responses_spooled = 0
        self.bytes_spooled = 0
        # spooled responses whose upstream went back to the pool before the client was done
        self.upstream_released_early = 0
        self.fallbacks: dict[str, int] = dict.fromkeys(FALLBACK_REASONS, 0)
        self.zero_copy = zero_copy.ZeroCopyStats()  # file bytes sent by sendfile
        self.copied_file_bytes = 0  # file bytes read back and written (TLS, no sendfile)

    def open(self) -> None:
        """At worker start: the directory (a private one by default) and the disk budget."""
        if not self.enabled:
            return
        if not self._configured_dir:
            parent = tempfile.gettempdir()
            removed = sweep_stale_private_dirs(parent)
            if removed:
                log.info(
                    "removed spool directories of workers that are gone",
                    extra={"removed": removed},
                )
            self.dir = tempfile.mkdtemp(prefix=f"{PRIVATE_DIR_PREFIX}{os.getpid()}-", dir=parent)
            self._private = True
        if self._configured_total == "auto":
            try:
                stat = os.statvfs(self.dir)
                free = stat.f_bavail * stat.f_frsize
            except OSError:
                free = 0
            self.max_total = auto_max_total(free, self._workers)
        else:
            self.max_total = int(self._configured_total)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=IO_THREADS, thread_name_prefix="fileproxy-spool"
        )
        if not os.access(self.dir, os.W_OK | os.X_OK):
            log.warning(
                "spool directory is not writable: slow clients will hold upstream connections",
                extra={"spool_dir": self.dir},
            )

    def close(self) -> None:
        """At worker exit, after every response ended: threads, and the private directory."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
        if self._private:
            shutil.rmtree(self.dir, ignore_errors=True)

    def open_file(self) -> int:
        """An unnamed read-write file in the spool directory; OSError when it cannot be."""
        if self._tmpfile:
            try:
                return os.open(self.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile = False  # a filesystem without O_TMPFILE: name, then unlink
        fd, path = tempfile.mkstemp(prefix="spool-", dir=self.dir)
        os.unlink(path)
        return fd

    def fell_back(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def report(self) -> dict[str, Any]:
        """/health's ``spool`` section."""
        return {
            "enabled": self.enabled,
            "dir": self.dir,
            "max_file_bytes": self.max_file,
            "max_total_bytes": self.max_total,
            "max_total_setting": str(self._configured_total),
            "bytes_on_disk": self.bytes_on_disk,
            "bytes_in_memory": self.bytes_in_memory,
            "files": self.files,
            "active": self.active,
            "responses_spooled": self.responses_spooled,
            "bytes_spooled": self.bytes_spooled,
            "upstream_released_early": self.upstream_released_early,
            "fallbacks": dict(self.fallbacks),
            **self.zero_copy.report(),
            "copied_file_bytes": self.copied_file_bytes,
        }


class Spool:
    """One response's spooled body: a FIFO of memory (the head) and a file (the tail).

    Data goes to memory while the file holds nothing unread and memory has room,
    else to the file; so everything in memory precedes everything in the file, and
    the reader takes memory first. Once the file cannot be used (a bound, a full or
    read-only disk), new data waits for room in memory: backpressure.

    File I/O runs on the store's threads. The descriptor is closed only once no
    read or write on it is queued or running, so a closed number reused by another
    response's file is never written by a late thread.
    """

    def __init__(self, store: SpoolStore) -> None:
        self.store = store
        self._memory: collections.deque[bytes] = collections.deque()
        self._memory_bytes = 0
        self._fd: int | None = None
        self._write_at = 0  # end of the file's data
        self._read_at = 0  # what the reader has taken of it
        self.fallback: str | None = None
        self.complete = False  # the upstream body arrived whole
        self.error: BaseException | None = None  # the upstream failed mid-body
        self._data = asyncio.Event()  # the reader waits on it
        self._room = asyncio.Event()  # the filler waits on it (fallen back, memory full)
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._closed = False

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the store's I/O threads; the file stays open until it ends."""
        return await self._io(fn, *args)

    async def _io(self, fn: Any, *args: Any) -> Any:
        executor = self.store.executor
        if executor is None:
            raise OSError(errno.EIO, "spool I/O threads are shut down")
        future = executor.submit(fn, *args)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        return await asyncio.wrap_future(future)

    # --- the filler's side ---

    async def put(self, data: bytes | memoryview) -> None:
        """Append; waits only when the file cannot be used and memory is full."""
        store = self.store
        while True:
            if self._read_at == self._write_at and (
                self._memory_bytes + len(data) <= store.memory_cap
                or (not self._memory and self.fallback is not None)
            ):
                # a view is copied: kept, it would hold its whole piece in memory, more
                # than the spool counts
                self._memory.append(data if isinstance(data, bytes) else bytes(data))
                self._memory_bytes += len(data)
                store.bytes_in_memory += len(data)
                self._data.set()
                return
            if self.fallback is None:
                reason = await self._to_file(data)
                if reason is None:
                    self._data.set()
                    return
                self.fallback = reason
                store.fell_back(reason)
                continue
            self._room.clear()
            await self._room.wait()  # the reader took something: there may be room

    async def _to_file(self, data: bytes | memoryview) -> str | None:
        """Write at the end of the file; the fallback reason when it cannot be."""
        store = self.store
        size = len(data)
        try:
            if self._fd is None:
                if store.max_file <= 0:
                    return "max_file"
                self._fd = await self._open()
            elif self._write_at and self._read_at == self._write_at:
                # the reader caught up: give the space back, start over at 0
                await self._io(os.ftruncate, self._fd, 0)
                store.bytes_on_disk -= self._write_at
                self._read_at = self._write_at = 0
            if self._write_at + size > store.max_file:
                return "max_file"
            if store.bytes_on_disk + size > store.max_total:
                return "max_total"
            store.bytes_on_disk += size  # reserved before the write: others see it at once
            try:
                await self._io(_pwrite_all, self._fd, data, self._write_at)
            except BaseException:
                store.bytes_on_disk -= size
                raise
        except OSError as exc:
            log.warning(
                "spool file not usable, the response waits for its client",
                extra={
                    "spool_dir": store.dir,
                    "error": f"{type(exc).__name__}: {exc.strerror}",
                    # spooled before: still served, in order, before the rest
                    "file_bytes": self._write_at - self._read_at,
                },
            )
            return _fallback_reason(exc)
        self._write_at += size
        return None

    async def _open(self) -> int:
        store = self.store
        if store.executor is None:
            raise OSError(errno.EIO, "spool I/O threads are shut down")
        future = store.executor.submit(store.open_file)
        try:
            fd: int = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # opened after all: close it once it is there
            future.add_done_callback(_close_opened)
            raise
        store.files += 1
        return fd

    def finish(self, error: BaseException | None = None) -> None:
        self.complete = error is None
        self.error = error
        self._data.set()

    # --- the reader's side ---

    async def take(self) -> bytes | None:
        """The next piece in order; b"" once everything was taken and the body is over
        (then check ``error``); None when nothing is there yet (then ``wait``)."""
        if self._memory:
            data = self._memory.popleft()
            self._memory_bytes -= len(data)
            self.store.bytes_in_memory -= len(data)
            self._room.set()
            return data
        pending = self._write_at - self._read_at
        if pending > 0 and self._fd is not None:
            # the buffer comes from the loop's thread: bytes made by pread in an I/O thread
            # would come from that thread's malloc arena, which keeps freed memory resident
            buffer = bytearray(min(pending, FILE_READ))
            size = await self._io(os.preadv, self._fd, [buffer], self._read_at)
            if not size:
                raise OSError(errno.EIO, "spool file shorter than written")
            self._read_at += size
            self.store.copied_file_bytes += size
            self._room.set()
            return bytes(buffer) if size == len(buffer) else bytes(buffer[:size])
        if self.complete or self.error is not None:
            return b""
        return None

    def file_range(self) -> tuple[int, int, int] | None:
        """``(fd, offset, count)``: what the file holds unread, when it is next in order
        (memory holds nothing); None otherwise. Send it, reporting progress to
        ``took_from_file``: the file is never truncated while a byte of it is unread."""
        pending = self._write_at - self._read_at
        if self._memory or pending <= 0 or self._fd is None:
            return None
        return self._fd, self._read_at, pending

    def took_from_file(self, size: int) -> None:
        self._read_at += size
        self._room.set()

    async def wait(self) -> None:
        self._data.clear()
        await self._data.wait()

    def close(self) -> None:
        """Free memory and file at once (synchronous: it runs when the task is cancelled)."""
        if self._closed:
            return
        self._closed = True
        store = self.store
        store.bytes_in_memory -= self._memory_bytes
        self._memory.clear()
        self._memory_bytes = 0
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        store.bytes_on_disk -= self._write_at
        store.files -= 1
        pending = [future for future in self._inflight if not future.done()]
        if not pending:
            _close_later(store, fd)
            return
        # after the last queued or running I/O on it (from whichever thread ends it)
        left = [len(pending)]
        lock = threading.Lock()

        def one_done(_: concurrent.futures.Future[Any]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                close_quietly(fd)

        for future in pending:
            future.add_done_callback(one_done)


def _close_later(store: SpoolStore, fd: int) -> None:
    # closing the last descriptor frees the file's blocks: off the loop, it can take a while
    if store.executor is not None:
        try:
            store.executor.submit(close_quietly, fd)
            return
        except RuntimeError:  # shut down meanwhile
            pass
    close_quietly(fd)


def _close_opened(future: concurrent.futures.Future[int]) -> None:
    if not future.cancelled() and future.exception() is None:
        close_quietly(future.result())


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def spill_length(store: SpoolStore, method: str, upstream_resp: UpstreamResponse) -> int | None:
    """The body length of a response that may spill, None for one that never does."""
    if not store.enabled or upstream_resp.content.is_eof():
        return None  # off, or the whole body is here already
    headers = upstream_resp.headers
    raw_length = headers.get("Content-Length", "")
    length = int(raw_length) if raw_length.isdigit() else None
    why_not = never_spilled(
        method,
        upstream_resp.status,
        length,
        headers.get("Content-Type", ""),
        headers.get("X-Accel-Buffering", ""),
    )
    return length if why_not is None else None


class _Watch:
    """What the relay measures once the client first held it back (see adaptive.spill)."""

    __slots__ = ("client_bytes", "client_wait_s", "since", "upstream_wait_s")

    def __init__(self, now: float) -> None:
        self.since = now
        self.client_bytes = 0
        self.client_wait_s = 0.0
        self.upstream_wait_s = 0.0


async def relay(
    request: ClientRequest,
    response: ClientResponse,
    upstream_resp: UpstreamResponse,
    exchange: Exchange,
    chunk_size: int,
    content_length: int,
    store: SpoolStore,
    pool_waiting: Callable[[], int],
    upstream_body_complete: Callable[[int], None],
) -> None:
    """Relay a response that may spill: straight through while the client keeps up.

    ``pool_waiting``: how many requests wait for an upstream connection now;
    ``upstream_body_complete(size)`` is called once the whole upstream body was read
    (the replica is done with the request then, whatever the client's pace)."""
    transport = request.transport
    high = transport.get_write_buffer_limits()[1] if transport is not None else 0
    protocol = request.protocol
    read = upstream_resp.content.read
    taken = 0  # body bytes taken from the upstream connection
    unyielded = 0
    watch: _Watch | None = None
    clock = time.monotonic
    while True:
        if watch is None:
            chunk_read = await read_or_abort(read, chunk_size, request, upstream_resp, exchange)
        else:
            started = clock()
            chunk_read = await read_or_abort(read, chunk_size, request, upstream_resp, exchange)
            watch.upstream_wait_s += clock() - started
        if chunk_read is None:
            return
        chunk = chunk_read
        if not chunk:
            break
        taken += len(chunk)
        # this write waits for the client: its transport is paused (above the high-water
        # mark, until it drained to the low one), or this chunk takes it there
        if not (
            protocol.writing_paused
            or (transport is not None and transport.get_write_buffer_size() + len(chunk) > high)
        ):
            try:
                await response.write(chunk)
            except ConnectionError:
                exchange.cause = errors.CLIENT_ABORT
                upstream_resp.close()  # do not pool a half-read connection
                return
            if watch is not None:
                watch.client_bytes += len(chunk)
        else:
            if watch is None:
                watch = _Watch(clock())  # the client holds the relay back: measure from here
            # the write in a task of its own: judged when the watch is due, even while
            # this one write still waits (a slow client's write waits seconds)
            pending = asyncio.ensure_future(response.write(chunk))
            started = clock()
            try:
                due = watch.since + store.policy.observe_for(pool_waiting()) - started
                await asyncio.wait((pending,), timeout=max(0.0, due))
                while not pending.done():
                    now = clock()
                    watch.client_wait_s += now - started
                    started = now
                    sample = RelaySample(
                        since_s=now - watch.since,
                        client_bytes=watch.client_bytes,
                        client_wait_s=watch.client_wait_s,
                        upstream_wait_s=watch.upstream_wait_s,
                        remaining=content_length - taken,
                        pool_waiters=pool_waiting(),
                    )
                    if decide(sample, store.policy).spill:
                        await _spooled(
                            request, response, upstream_resp, exchange, pending, len(chunk),
                            store, functools.partial(upstream_body_complete, content_length),
                        )  # fmt: skip
                        return
                    # judged again while this write still waits: one early "not yet" (the
                    # upstream was the slower side so far) must not pin the upstream for
                    # as long as a client that stopped reading holds this write
                    interval = store.policy.observe_for(pool_waiting())
                    await asyncio.wait((pending,), timeout=interval)
                watch.client_wait_s += clock() - started
                pending.result()
            except ConnectionError:
                exchange.cause = errors.CLIENT_ABORT
                upstream_resp.close()  # do not pool a half-read connection
                return
            finally:
                _settle(pending)
            watch.client_bytes += len(chunk)
        exchange.bytes_out += len(chunk)
        unyielded += len(chunk)
        if unyielded >= SLICE_BYTES:
            unyielded = 0
            await asyncio.sleep(0)
    upstream_body_complete(taken)
    try:
        await response.write_eof()
    except ConnectionError:
        exchange.cause = errors.CLIENT_ABORT


async def read_or_abort(
    read: Any,
    size: int,
    request: ClientRequest,
    upstream_resp: UpstreamResponse,
    exchange: Exchange,
) -> bytes | None:
    """The next upstream piece; None after an upstream failure (client aborted)."""
    try:
        return await read(size)  # type: ignore[no-any-return]
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        _upstream_failed(exc, request, exchange)
        upstream_resp.close()
        return None


def _upstream_failed(exc: BaseException, request: ClientRequest, exchange: Exchange) -> None:
    failure = errors.classify(exc)
    exchange.cause, exchange.error = failure.cause, failure.error
    log.warning(
        "upstream failed mid-body, aborting client connection",
        extra={
            "request_id": exchange.request_id,
            "error": failure.error,
            "bytes_out": exchange.bytes_out,
        },
    )
    if request.transport is not None:
        end_cut_short(request.transport, exchange.framed)


def _settle(pending: asyncio.Future[None]) -> None:
    """A write no longer waited for: cancelled if still running, and its failure (the
    client gone) taken, so it is never logged as an exception nobody retrieved."""
    if not pending.done():
        pending.cancel()
    pending.add_done_callback(_take_result)


def _take_result(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _spooled(
    request: ClientRequest,
    response: ClientResponse,
    upstream_resp: UpstreamResponse,
    exchange: Exchange,
    pending: asyncio.Future[None],
    pending_bytes: int,
    store: SpoolStore,
    upstream_body_complete: Callable[[], None],
) -> None:
    """The rest of the body through a spool: filled at the upstream's pace, served at
    the client's. ``pending``: the write of the last relayed piece, still waiting."""
    spool = Spool(store)
    store.active += 1
    store.responses_spooled += 1
    filler = asyncio.create_task(_fill(spool, upstream_resp, upstream_body_complete))
    try:
        await _serve(spool, request, response, exchange, pending, pending_bytes)
    finally:
        store.active -= 1
        _settle(pending)
        if not filler.done():
            filler.cancel()  # the client left: stop reading the upstream
            upstream_resp.close()
        spool.close()


async def _fill(
    spool: Spool, upstream_resp: UpstreamResponse, upstream_body_complete: Callable[[], None]
) -> None:
    store = spool.store
    read = upstream_resp.content.read
    unyielded = 0
    try:
        while data := await read(SPOOL_PIECE):
            await spool.put(data)
            store.bytes_spooled += len(data)
            unyielded += len(data)
            if unyielded >= SLICE_BYTES:
                unyielded = 0
                await asyncio.sleep(0)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        upstream_resp.close()
        spool.finish(exc)
        return
    # the whole body arrived: the connection goes back to the pool now, not when the
    # client is done
    if spool.fallback is None:
        store.upstream_released_early += 1
    upstream_resp.release()
    spool.finish()
    upstream_body_complete()


async def _serve(
    spool: Spool,
    request: ClientRequest,
    response: ClientResponse,
    exchange: Exchange,
    pending: asyncio.Future[None],
    pending_bytes: int,
) -> None:
    try:
        await pending  # the piece the relay was writing goes first
    except ConnectionError:
        exchange.cause = errors.CLIENT_ABORT
        return
    exchange.bytes_out += pending_bytes
    unyielded = 0
    transport = request.transport
    sendfile = zero_copy.sendfile_socket(transport) is not None

    def sent(size: int) -> None:
        spool.took_from_file(size)
        response.sent_directly(size)
        exchange.bytes_out += size

    while True:
        where = spool.file_range() if sendfile else None
        if where is not None and transport is not None:
            fd, offset, count = where
            try:
                await zero_copy.send_file(
                    transport,
                    fd,
                    offset,
                    count,
                    stall_timeout=spool.store.send_timeout,
                    stats=spool.store.zero_copy,
                    run_in_thread=spool.in_thread,
                    on_sent=sent,
                )
            except zero_copy.SendStalled:
                log.info(
                    "client took no bytes for the send timeout, aborting its connection",
                    extra={"send_timeout_s": spool.store.send_timeout},
                )
                exchange.cause = errors.SEND_TIMEOUT
                abort_send_timed_out(request)
                return
            except ConnectionError:
                exchange.cause = errors.CLIENT_ABORT
                transport.abort()
                return
            except OSError as exc:  # the spool file failed or shrank: never a short body
                log.error("spool sendfile failed, aborting client connection", exc_info=exc)
                exchange.cause, exchange.error = errors.UPSTREAM_ERROR, "spool_read_failed"
                reset(transport)
                return
            continue
        try:
            data = await spool.take()
        except OSError as exc:  # the spool file failed under us: never a short body
            log.error("spool read failed, aborting client connection", exc_info=exc)
            exchange.cause, exchange.error = errors.UPSTREAM_ERROR, "spool_read_failed"
            if request.transport is not None:
                end_cut_short(request.transport, exchange.framed)
            return
        if data is None:
            await spool.wait()
            continue
        if not data:
            break
        try:
            await response.write(data)
        except ConnectionError:
            exchange.cause = errors.CLIENT_ABORT
            return
        exchange.bytes_out += len(data)
        unyielded += len(data)
        if unyielded >= SLICE_BYTES:
            unyielded = 0
            await asyncio.sleep(0)
    if spool.error is not None:
        _upstream_failed(spool.error, request, exchange)
        return
    try:
        await response.write_eof()
    except ConnectionError:
        exchange.cause = errors.CLIENT_ABORT
        return
    await _flushed(request)


async def _flushed(request: ClientRequest) -> None:
    """Until the client's transport has handed its last bytes to the kernel.

    A slow client's tail (up to the high-water mark) waits in the transport's buffer
    after ``write_eof``; a worker that exits once its handlers returned (the end of a
    graceful drain) would drop it, and the body would end short. The handler stays
    until it is out: no upstream connection is held meanwhile. A client that takes none
    of it for FILEPROXY_SEND_TIMEOUT is aborted (the edge's send timeout), which ends this.
    """
    watch_sending(request)
    transport = request.transport
    while transport is not None and not transport.is_closing():
        if transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(FLUSH_POLL_S)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
