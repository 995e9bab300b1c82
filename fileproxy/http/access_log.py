"""The access line: one per request, what the client asked and got, what the proxy saw.

Built without the logging module (one ``orjson.dumps`` of a dict, no LogRecord, no
handler chain) and written in batches, as nginx's ``access_log ... buffer=32k
flush=1s``: lines collect in a per-process buffer that is handed to the writer
when it holds ``BUFFER_BYTES`` (32 KiB), ``FLUSH_INTERVAL_S`` (1 s) after its first
line (an event-loop timer), and at shutdown (app cleanup, then ``atexit`` for
anything logged later), so a graceful stop or reload loses no line.

The writer is one thread per process that owns the sinks (stdout, and
``access.log`` with ``FILEPROXY_LOG_DIR``): the event loop never waits on a
write, even when stdout is a full pipe (systemd/journald not reading), unless more
than ``BACKLOG_BYTES`` (4 MiB) are still unwritten; then it waits (as nginx does,
no line is dropped and memory stays bounded).

- stdout is shared by every worker of a gunicorn instance: a batch goes out in
  writes of at most ``PIPE_BUF`` bytes (4 KiB), each ending at a line end, so no
  line of one worker is ever split by another's (POSIX: writes up to PIPE_BUF to
  a pipe are atomic). ~15 lines per system call instead of one.
- ``access.log`` is opened by each worker with ``O_APPEND`` (appends are atomic):
  a batch is one write. Before each batch the path is checked (device, inode) and
  the file reopened when logrotate moved it (``WatchedFileHandler``'s rule).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import select
import sys
import threading
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from fileproxy.exchange import CLIENT_ABORT, EXCHANGE, Exchange

ACCESS_LOGGER = "fileproxy.access"

BUFFER_BYTES = 32 * 1024  # nginx's buffer=32k
FLUSH_INTERVAL_S = 1.0  # nginx's flush=1s
BACKLOG_BYTES = 4 * 1024 * 1024  # handed to the writer but not yet written
DRAIN_TIMEOUT_S = 5.0  # at exit, for a stdout nobody reads
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)

_JSON_OPTIONS = orjson.OPT_APPEND_NEWLINE

log = logging.getLogger("fileproxy")


class StreamSink:
    """A file descriptor shared with other processes (stdout): line-aligned writes of
    at most PIPE_BUF bytes, each atomic on a pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        start, end = 0, len(data)
        while start < end:
            stop = start + PIPE_BUF
            if stop < end:
                cut = data.rfind(b"\n", start, stop)
                # a line longer than PIPE_BUF goes out alone
                stop = cut + 1 if cut >= start else data.find(b"\n", stop) + 1 or end
            else:
                stop = end
            while start < stop:
                start += os.write(self.fd, view[start:stop])

    def close(self) -> None:
        """stdout is not ours to close."""


class WatchedFileSink:
    """A file of our own, opened O_APPEND, reopened when its path no longer leads to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self._id = (-1, -1)
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        st = os.fstat(self.fd)
        self._id = (st.st_dev, st.st_ino)

    def _reopen_if_moved(self) -> None:
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._id
        except FileNotFoundError:
            moved = True
        if moved:
            os.close(self.fd)
            self.fd = -1
            self._open()

    def write(self, data: bytes) -> None:
        self._reopen_if_moved()
        view = memoryview(data)
        written = 0
        while written < len(data):
            written += os.write(self.fd, view[written:])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Sink = StreamSink | WatchedFileSink


class _Writer:
    """One thread that writes handed-over batches to every sink, in order."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self._cond = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()
        self._pending = 0  # bytes queued or being written
        self._thread: threading.Thread | None = None
        self.failures = 0

    def after_fork(self) -> None:
        """In a forked child: the parent's thread, lock and queue are not ours."""
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._pending = 0
        self._thread = None

    def submit(self, data: bytes) -> None:
        with self._cond:
            if self._thread is None:  # started with the first batch
                self._thread = threading.Thread(
                    target=self._run, name="fileproxy-access-log", daemon=True
                )
                self._thread.start()
            while self._pending > BACKLOG_BYTES:
                self._cond.wait()  # the sinks are this far behind: wait, lose nothing
            self._queue.append(data)
            self._pending += len(data)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                data = self._queue.popleft()
            for sink in self.sinks:
                try:
                    sink.write(data)
                except OSError as exc:
                    self.failures += 1
                    if self.failures == 1 or self.failures % 1000 == 0:
                        log.error(
                            "access log write failed",
                            extra={"error": repr(exc), "failures": self.failures},
                        )
            with self._cond:
                self._pending -= len(data)
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything handed over is written; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)


class AccessLog:
    """The per-process buffer of access lines and where they go."""

    def __init__(self) -> None:
        self.text = False  # FILEPROXY_LOG_FORMAT=text
        self._writer: _Writer | None = None
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, sinks: list[Sink], text: bool = False) -> None:
        """Where lines go (replacing the previous sinks, after writing what is buffered)."""
        self.close()
        if self._writer is not None:
            for sink in self._writer.sinks:
                sink.close()
        self._writer = _Writer(sinks) if sinks else None
        self.text = text

    def add(self, line: bytes) -> None:
        lines = self._lines
        lines.append(line)
        self._size += len(line)
        if self._size >= BUFFER_BYTES:
            self.flush()
        elif len(lines) == 1:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (any more): no timer to wait for
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Hand what is buffered to the writer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines = []
        self._size = 0
        if self._writer is not None:
            self._writer.submit(data)

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until what was flushed is written; False if a sink stayed stuck."""
        return self._writer is None or self._writer.drain(timeout)

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Flush and wait until it is written (shutdown, at exit)."""
        self.flush()
        return self.drain(timeout)

    def _after_fork(self) -> None:
        # the parent's buffered lines are the parent's to write; its timer is not ours
        self._lines = []
        self._size = 0
        self._timer = None
        if self._writer is not None:
            self._writer.after_fork()


ACCESS = AccessLog()
atexit.register(ACCESS.close)
os.register_at_fork(after_in_child=ACCESS._after_fork)


def _text_line(fields: dict[str, Any], message: str, now: float) -> bytes:
    """logging's text layout: ``asctime LEVEL logger: message key=value ...``."""
    ct = time.localtime(now)
    stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S', ct)},{int((now - int(now)) * 1000):03d}"
    extras = " ".join(f"{k}={v}" for k, v in fields.items() if k not in _HEAD)
    return f"{stamp} INFO {ACCESS_LOGGER}: {message} {extras}\n".encode(errors="replace")


_HEAD = ("ts", "level", "logger", "msg")


def log_access(
    request: web.BaseRequest, status: int, response_bytes: int, duration_s: float
) -> None:
    """One access line: what the client asked, what it got, and what the proxy saw."""
    now = time.time()
    exchange = request.get(EXCHANGE)
    message = "request"
    if exchange is not None and exchange.cause == CLIENT_ABORT:
        message = "client disconnected"
    fields: dict[str, Any] = {
        "ts": round(now, 3),
        "level": "info",
        "logger": ACCESS_LOGGER,
        "msg": message,
        "remote": request.remote,
        "method": request.method,
        "path": request.raw_path,
        "status": status,
        "response_bytes": response_bytes,
        "duration_ms": round(duration_s * 1000, 3),
        "user_agent": request.headers.get("User-Agent"),
    }
    if exchange is not None:
        ttfb_s = exchange.ttfb_s
        fields["request_id"] = exchange.request_id
        fields["upstream"] = exchange.upstream
        fields["upstream_status"] = exchange.upstream_status
        fields["ttfb_ms"] = None if ttfb_s is None else round(ttfb_s * 1000, 3)
        fields["bytes_in"] = exchange.bytes_in
        fields["bytes_out"] = exchange.bytes_out
        fields["cause"] = exchange.cause
        if exchange.error:
            fields["error"] = exchange.error
    if ACCESS.text:
        ACCESS.add(_text_line(fields, message, now))
    else:
        ACCESS.add(orjson.dumps(fields, default=str, option=_JSON_OPTIONS))


class AccessLogger(AbstractAccessLogger):
    """aiohttp's hook for finished requests; aborted ones are logged by the proxy handler."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        # response_bytes: body bytes handed to the client's connection; for a proxied
        # response the relay's count (aiohttp's stays 0 for a body cut by an abort)
        exchange: Exchange | None = request.get(EXCHANGE)
        sent = exchange.bytes_out if exchange is not None else response.body_length
        log_access(request, response.status, sent, time_s)

    @property
    def enabled(self) -> bool:
        return True  # aiohttp gets no logger at all when FILEPROXY_ACCESS_LOG=off


def stdout_fd() -> int:
    """stdout's file descriptor (after flushing what Python buffered there)."""
    try:
        sys.stdout.flush()
        return sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by something without a file
        return 1
