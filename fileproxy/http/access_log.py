"""The access line: one per request, what the client asked and got, what the proxy saw.

Built without the logging module (one ``orjson.dumps`` of a dict, no LogRecord, no
handler chain) and written in batches, as nginx's ``access_log ... buffer=32k
flush=1s``: lines collect in a per-process buffer that is written when it holds
``BUFFER_BYTES`` (32 KiB), ``FLUSH_INTERVAL_S`` (1 s) after its first line (an
event-loop timer), and at shutdown (app cleanup, then ``atexit`` for anything
logged later), so a graceful stop or reload loses no line.

A request only takes its line's values (a tuple); the lines are built when the
batch is written, all in one loop. What a client or backend sent is written as bytes:
those that are not UTF-8 as ``\\xHH`` (``escape``); a record whose line cannot be built
is dropped alone and counted, never holding back the batch. Built in the request's
path, between the proxy's own work, a line cost 7.3 µs in a running worker (the same
code in a loop: 2.2); built in the batch, about 3.5 (README, Performance;
``bench.hot_path --time-access-log``).

Written from the event loop itself, never waiting on a reader:

- stdout is shared by every worker of a gunicorn instance. To a pipe or socket a
  batch goes out in writes of at most ``PIPE_BUF`` bytes (4 KiB), each ending at
  a line end, so no line of one worker is ever split by another's (POSIX: writes
  up to PIPE_BUF to a pipe are atomic); ~12 lines per system call instead of one.
  To a regular file it is one write (Linux serialises writes through a shared
  file description and its offset, so they never interleave). When stdout is a
  pipe, it is reopened (``/proc/self/fd/1``) as a non-blocking file description
  of our own (the shared one keeps its flags, so the master and other writers
  are unaffected); a socket (journald's) is written with ``MSG_DONTWAIT``. A full
  pipe or socket (journald not reading) leaves the rest pending: retried every
  second, kept up to ``BACKLOG_BYTES`` (4 MiB; older lines beyond it are dropped
  and counted on stderr), and waited for up to ``DRAIN_TIMEOUT_S`` at shutdown.
  A regular file or a terminal is written as it is (blocking, page cache).
  A thread that wrote the batches was tried first: the GIL hand-overs around its
  writes cost 10-15% of req/s on 2 cores, more than the writes themselves.
- ``access.log`` is opened by each worker with ``O_APPEND`` (appends are atomic):
  a batch is one write. Before each batch the path is checked (device, inode) and
  the file reopened when logrotate moved it (``WatchedFileHandler``'s rule).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import select
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from fileproxy.exchange import CLIENT_ABORT, EXCHANGE, Exchange

ACCESS_LOGGER = "fileproxy.access"

BUFFER_BYTES = 32 * 1024  # nginx's buffer=32k
FLUSH_INTERVAL_S = 1.0  # nginx's flush=1s
BACKLOG_BYTES = 4 * 1024 * 1024  # unwritten to a stdout nobody reads, at most
DRAIN_TIMEOUT_S = 5.0  # at shutdown, for a stdout nobody reads
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)

_JSON_OPTIONS = orjson.OPT_APPEND_NEWLINE

log = logging.getLogger("fileproxy")


class StreamSink:
    """A file descriptor shared with other processes (stdout): line-aligned writes of
    at most PIPE_BUF bytes; a pipe or socket is never waited on (see the module)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""  # what a full pipe or socket did not take yet
        self.dropped = 0  # lines dropped beyond BACKLOG_BYTES
        self._reported_at = -60.0
        self._own_fd = -1
        self._sock: socket.socket | None = None
        self._write: Callable[[memoryview], int] = self._write_fd
        mode = os.fstat(fd).st_mode
        # the most one write may carry: a line-aligned PIPE_BUF, except to a regular file
        self._piece = sys.maxsize if stat.S_ISREG(mode) else PIPE_BUF
        if stat.S_ISFIFO(mode):
            # a description of our own: O_NONBLOCK without touching the shared one
            with contextlib.suppress(OSError):
                self._own_fd = os.open(
                    f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                )
        elif stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self._write = self._send_socket
        self._wfd = self._own_fd if self._own_fd >= 0 else fd

    def _write_fd(self, piece: memoryview) -> int:
        return os.write(self._wfd, piece)

    def _send_socket(self, piece: memoryview) -> int:
        assert self._sock is not None
        return self._sock.send(piece, socket.MSG_DONTWAIT)

    def write(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
            self.pending = b""
        view = memoryview(data)
        write = self._write
        start, end = 0, len(data)
        piece = self._piece
        while start < end:
            stop = start + piece
            if stop < end:
                cut = data.rfind(b"\n", start, stop)
                # a line longer than a piece goes out alone
                stop = cut + 1 if cut >= start else data.find(b"\n", stop) + 1 or end
            else:
                stop = end
            try:
                while start < stop:
                    start += write(view[start:stop])
            except BlockingIOError:
                self._keep(data[start:])
                return

    def _keep(self, rest: bytes) -> None:
        if len(rest) > BACKLOG_BYTES:
            cut = rest.find(b"\n", len(rest) - BACKLOG_BYTES) + 1
            self.dropped += rest.count(b"\n", 0, cut)
            rest = rest[cut:]
            now = time.monotonic()
            if now - self._reported_at >= 60:  # at most once a minute
                self._reported_at = now
                log.error(
                    "access log: stdout is not read, lines dropped",
                    extra={"dropped_total": self.dropped},
                )
        self.pending = rest

    def wait_writable(self, timeout: float) -> None:
        poller = select.poll()
        fd = self._sock.fileno() if self._sock is not None else self._wfd
        poller.register(fd, select.POLLOUT)
        poller.poll(max(0, int(timeout * 1000)))

    def close(self) -> None:
        """stdout itself is not ours to close; our own description of it is."""
        if self._own_fd >= 0:
            os.close(self._own_fd)
            self._own_fd = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class WatchedFileSink:
    """A file of our own, opened O_APPEND, reopened when its path no longer leads to it."""

    pending = b""  # a regular file takes every write

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self._id = (-1, -1)
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        st = os.fstat(self.fd)
        self._id = (st.st_dev, st.st_ino)

    def reopen_if_moved(self) -> None:
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
        self.reopen_if_moved()
        view = memoryview(data)
        written = 0
        while written < len(data):
            written += os.write(self.fd, view[written:])

    def wait_writable(self, timeout: float) -> None:
        """Never pending."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Sink = StreamSink | WatchedFileSink


# What a request leaves for its line (see ``log_access``), rendered when written:
# (time, peer, method, target, status, response bytes, duration s, User-Agent, exchange)
Record = tuple[float, "str | None", str, str, int, int, float, "str | None", "Exchange | None"]
# what a record counts against BUFFER_BYTES: a proxied request's line is 330-400 bytes
RECORD_BYTES = 384


class AccessLog:
    """The per-process buffer of access lines and where they go."""

    def __init__(self) -> None:
        self.text = False  # FILEPROXY_LOG_FORMAT=text
        self.sinks: list[Sink] = []
        self.failures = 0
        self.unrendered = 0  # records dropped because their line could not be built
        self._lines: list[bytes | Record] = []  # lines, and records still to render
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, sinks: list[Sink], text: bool = False) -> None:
        """Where lines go (replacing the previous sinks, after writing what is buffered)."""
        self.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = sinks
        self.text = text

    def add(self, line: bytes) -> None:
        """A line, written as it is."""
        self._lines.append(line)
        self._grown(len(line))

    def add_record(self, record: Record) -> None:
        """A request's line, built when the batch is written (``render``)."""
        self._lines.append(record)
        self._grown(RECORD_BYTES)

    def _grown(self, size: int) -> None:
        self._size += size
        if self._size >= BUFFER_BYTES:
            self.flush()
        elif self._timer is None:
            self._arm()

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (any more): no timer to wait for
            self.flush()
            return
        self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Write what is buffered (and what a full stdout did not take before)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        text = self.text
        lines, self._lines, self._size = self._lines, [], 0
        try:
            data = b"".join(
                [item if isinstance(item, bytes) else render(item, text) for item in lines]
            )
        except Exception:  # one bad record must not take the others with it
            data = self._render_each(lines, text)
        pending = False
        for sink in self.sinks:
            if data or sink.pending:
                try:
                    sink.write(data)
                except OSError as exc:
                    self.failures += 1
                    if self.failures == 1 or self.failures % 1000 == 0:
                        log.error(
                            "access log write failed",
                            extra={"error": repr(exc), "failures": self.failures},
                        )
                pending = pending or bool(sink.pending)
        if pending:
            self._arm_retry()

    def _render_each(self, lines: list[bytes | Record], text: bool) -> bytes:
        """The batch line by line: a record that cannot be rendered is dropped and counted,
        the others are written."""
        rendered = []
        for item in lines:
            if isinstance(item, bytes):
                rendered.append(item)
                continue
            try:
                rendered.append(render(item, text))
            except Exception as exc:
                self.unrendered += 1
                if self.unrendered == 1 or self.unrendered % 1000 == 0:
                    log.error(
                        "access line could not be rendered, dropped",
                        extra={"error": repr(exc), "dropped_total": self.unrendered},
                    )
        return b"".join(rendered)

    def _arm_retry(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # written at close()
        self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Write everything, waiting up to ``timeout`` for a full stdout (shutdown, exit);
        False if some is still unwritten."""
        self.flush()
        deadline = time.monotonic() + timeout
        for sink in self.sinks:
            while sink.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sink.wait_writable(min(left, 0.1))
                try:
                    sink.write(b"")
                except OSError:
                    return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return True

    def reopen_files(self) -> None:
        """Reopen the files that were moved or removed now, not at the next batch (HUP)."""
        for sink in self.sinks:
            if isinstance(sink, WatchedFileSink):
                sink.reopen_if_moved()

    def _after_fork(self) -> None:
        # the parent's buffered lines are the parent's to write; its timer is not ours
        self._lines = []
        self._size = 0
        self._timer = None


ACCESS = AccessLog()
atexit.register(ACCESS.close)
os.register_at_fork(after_in_child=ACCESS._after_fork)


def _text_line(fields: dict[str, Any], message: str, now: float) -> bytes:
    """logging's text layout: ``asctime LEVEL logger: message key=value ...``."""
    ct = time.localtime(now)
    stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S', ct)},{int((now - int(now)) * 1000):03d}"
    extras = " ".join(f"{k}={v}" for k, v in fields.items() if k not in _HEAD)
    line = f"{stamp} INFO {ACCESS_LOGGER}: {message} {extras}\n"
    try:
        return line.encode()
    except UnicodeEncodeError:  # bytes from the wire that are not UTF-8
        return escape(line).encode()


_HEAD = ("ts", "level", "logger", "msg")


def _ms(seconds: float) -> float:
    """Milliseconds to 3 decimals (``round(x, 3)`` costs 5x more)."""
    return int(seconds * 1e6 + 0.5) / 1000


def log_access(
    request: Any,
    status: int,
    response_bytes: int,
    duration_s: float,
    exchange: Exchange | None = None,
) -> None:
    """One access line: what the client asked, what it got, and what the proxy saw.

    ``exchange``: the proxied request's record (looked up in ``request`` if not given);
    nothing changes it once its response has ended.
    """
    if exchange is None:
        exchange = request.get(EXCHANGE)
    ACCESS.add_record(
        (
            time.time(),
            request.remote,
            request.method,
            request.raw_path,
            status,
            response_bytes,
            duration_s,
            request.headers.get("User-Agent"),
            exchange,
        )
    )


def render(record: Record, text: bool = False) -> bytes:
    """The access line of a request's record: JSON, or the text layout."""
    now, remote, method, path, status, response_bytes, duration_s, user_agent, exchange = record
    aborted = exchange is not None and exchange.cause == CLIENT_ABORT
    fields: dict[str, Any] = {
        "ts": int(now * 1000 + 0.5) / 1000,
        "level": "info",
        "logger": ACCESS_LOGGER,
        "msg": "client disconnected" if aborted else "request",
        "remote": remote,
        "method": method,
        "path": path,
        "status": status,
        "response_bytes": response_bytes,
        "duration_ms": _ms(duration_s),
        "user_agent": user_agent,
    }
    if exchange is not None:  # a proxied request: what the proxy saw of it
        ttfb_s = exchange.ttfb_s
        fields["request_id"] = exchange.request_id
        fields["upstream"] = exchange.upstream
        fields["upstream_status"] = exchange.upstream_status
        fields["ttfb_ms"] = None if ttfb_s is None else _ms(ttfb_s)
        fields["bytes_in"] = exchange.bytes_in
        fields["bytes_out"] = exchange.bytes_out
        fields["cause"] = exchange.cause
        if exchange.error:
            fields["error"] = exchange.error
        if exchange.tries > 1:
            fields["tries"] = exchange.tries
        if exchange.resumes:
            fields["resumes"] = exchange.resumes
        if exchange.cache is not None:
            fields["cache"] = exchange.cache
    if text:
        return _text_line(fields, fields["msg"], now)
    try:
        return orjson.dumps(fields, default=str, option=_JSON_OPTIONS)
    except TypeError:  # bytes from the wire that are not UTF-8 (see escape)
        escaped = {k: escape(v) if isinstance(v, str) else v for k, v in fields.items()}
        return orjson.dumps(escaped, default=str, option=_JSON_OPTIONS)


def escape(text: str) -> str:
    """``text`` as it can be written to a UTF-8 log: the bytes of the wire that were not
    UTF-8 as ``\\xHH`` (as nginx's ``escape=default`` writes bytes above 0x7F).

    aiohttp decodes what a client or backend sent (request target, header values) as
    UTF-8 with ``surrogateescape``: each byte that is not UTF-8 becomes a lone surrogate,
    which neither orjson nor a UTF-8 encoder writes. Only such a line pays for this.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode()
    return raw.decode("utf-8", "backslashreplace")


def stdout_fd() -> int:
    """stdout's file descriptor (after flushing what Python buffered there)."""
    try:
        sys.stdout.flush()
        return sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by something without a file
        return 1
