"""The access log's buffer and writer, on real pipes, sockets and files.

- Lines wait in the buffer until it holds 32 KiB or for a second, then go out in
  batches, never one write per line.
- stdout is shared by every worker: writes to it are whole lines of at most
  PIPE_BUF bytes (a SOCK_SEQPACKET socket shows each write as one message).
- A full stdout pipe (nobody reading) does not stop the event loop; a stdout never
  read keeps at most 4 MiB of the newest lines.
- access.log is reopened when logrotate moved or removed it.
- A regular-file stdout takes a batch in one write; a request's line is built when its
  batch is written, in order with the other lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fileproxy.http.access_log import (
    BACKLOG_BYTES,
    BUFFER_BYTES,
    FLUSH_INTERVAL_S,
    PIPE_BUF,
    AccessLog,
    StreamSink,
    WatchedFileSink,
)


def line(i: int, size: int = 200) -> bytes:
    head = f'{{"n":{i},"pad":"'.encode()
    return head + b"x" * (size - len(head) - 3) + b'"}\n'


def read_available(fd: int) -> bytes:
    """What the pipe holds now, without waiting."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


async def test_lines_wait_for_a_second_or_32_kib_then_go_out_together(pipe):
    r, w = pipe
    log = AccessLog()
    log.configure([StreamSink(w)])

    started = time.monotonic()
    for i in range(10):
        log.add(line(i))
    await asyncio.sleep(0.2)
    assert read_available(r) == b"", "a line was written before the flush interval"
    got = b""
    while got.count(b"\n") < 10:
        assert time.monotonic() - started < FLUSH_INTERVAL_S + 5, got
        await asyncio.sleep(0.05)
        got += read_available(r)
    assert time.monotonic() - started >= FLUSH_INTERVAL_S * 0.9
    assert got == b"".join(line(i) for i in range(10))

    # 32 KiB fill the buffer: written at once, not a second later
    count = BUFFER_BYTES // 200 + 1
    started = time.monotonic()
    for i in range(count):
        log.add(line(i))
    got = b""
    while got.count(b"\n") < count:
        assert time.monotonic() - started < FLUSH_INTERVAL_S * 0.8, got.count(b"\n")
        await asyncio.sleep(0.01)
        got += read_available(r)
    assert got == b"".join(line(i) for i in range(count))
    assert log.close()


async def test_stdout_writes_are_whole_lines_of_at_most_pipe_buf():
    # SOCK_SEQPACKET keeps the boundary of every write: one write, one message
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    messages: list[bytes] = []

    def receive() -> None:
        while message := ours.recv(1 << 20):
            messages.append(message)

    reader = threading.Thread(target=receive)
    reader.start()
    try:
        log = AccessLog()
        log.configure([StreamSink(theirs.fileno())])
        lines = [line(i, 100 + (i * 37) % 400) for i in range(600)]
        lines[300] = line(300, 3 * PIPE_BUF)  # longer than PIPE_BUF: alone, unsplit
        for one in lines:
            log.add(one)
        assert log.close()  # waits (a blocking poll) while the reader takes it all
        theirs.shutdown(socket.SHUT_WR)
        reader.join(10)
    finally:
        ours.close()
        theirs.close()
    assert b"".join(messages) == b"".join(lines)
    assert len(messages) <= len(lines) // 10, len(messages)
    for message in messages:
        assert message.endswith(b"\n"), message[-50:]
        assert len(message) <= PIPE_BUF or message.count(b"\n") == 1, len(message)
    assert lines[300] in messages


async def test_a_full_stdout_pipe_does_not_stop_the_event_loop(pipe):
    r, w = pipe
    log = AccessLog()
    log.configure([StreamSink(w)])
    lines = [line(i, 250) for i in range(4000)]  # 1 MB: 16 pipes' worth, nobody reading

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    for i, one in enumerate(lines):
        log.add(one)
        if i % 100 == 0:
            await asyncio.sleep(0)
    log.flush()
    added_in = time.monotonic() - started
    await asyncio.sleep(0.5)
    assert added_in < 2.0, added_in  # never waited for the pipe
    assert ticks >= 10, ticks  # the loop kept running while the writer waits

    # the reader comes back: every line arrives, in order, whole
    got = bytearray()

    def drain() -> None:
        os.set_blocking(r, True)
        while len(got) < sum(map(len, lines)):
            got.extend(os.read(r, 1 << 20))

    reader = threading.Thread(target=drain)
    reader.start()
    assert log.close(10.0)  # at shutdown: waits (poll) for the reader
    reader.join(10)
    task.cancel()
    assert bytes(got) == b"".join(lines)
    log.configure([])


async def test_a_stdout_never_read_keeps_at_most_4_mib_of_the_newest_whole_lines(pipe):
    r, w = pipe
    log = AccessLog()
    sink = StreamSink(w)
    log.configure([sink])
    lines = [line(i, 500) for i in range(12_000)]  # 6 MB
    for one in lines:
        log.add(one)
    log.flush()
    assert len(sink.pending) <= BACKLOG_BYTES
    assert sink.dropped > 0
    out = read_available(r).splitlines(keepends=True)  # what the pipe took
    waiting = sink.pending.splitlines(keepends=True)
    # the oldest lines went out, the newest wait, those in between were dropped: whole lines
    assert out == lines[: len(out)]
    assert waiting == lines[len(out) + sink.dropped :]
    assert len(out) + sink.dropped + len(waiting) == len(lines)
    assert not log.close(0.2)  # nobody reads: gives up after the timeout
    sink.pending = b""
    log.configure([])


async def test_access_log_file_is_reopened_after_rotation(tmp_path: Path):
    path = tmp_path / "access.log"
    log = AccessLog()
    log.configure([WatchedFileSink(str(path))])
    log.add(b"one\n")
    assert log.close()
    path.rename(tmp_path / "access.log.1")  # logrotate: move, no signal
    log.add(b"two\n")
    assert log.close()
    assert (tmp_path / "access.log.1").read_bytes() == b"one\n"
    assert path.read_bytes() == b"two\n"
    path.unlink()  # or removed
    log.add(b"three\n")
    assert log.close()
    assert path.read_bytes() == b"three\n"
    log.configure([])


async def test_lines_after_the_loop_are_written_at_once(tmp_path: Path):
    path = tmp_path / "access.log"
    log = AccessLog()
    log.configure([WatchedFileSink(str(path))])
    await asyncio.to_thread(log.add, b"no loop here\n")  # no running loop in that thread
    assert log.close(5)
    assert path.read_bytes() == b"no loop here\n"


def test_the_process_wide_log_writes_what_is_left_at_exit(tmp_path: Path):
    """``ACCESS.close`` runs at exit (atexit) and writes what is buffered."""
    script = (
        "import asyncio\n"
        "from fileproxy.http import access_log\n"
        f"access_log.ACCESS.configure([access_log.WatchedFileSink({str(tmp_path / 'a.log')!r})])\n"
        "async def main():\n"
        "    for i in range(5):\n"
        "        access_log.ACCESS.add(b'line %d\\n' % i)\n"
        "asyncio.run(main())\n"  # the timer dies with the loop; atexit writes them
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.log").read_bytes() == b"".join(b"line %d\n" % i for i in range(5))


def test_text_lines_have_the_logging_layout_of_the_other_lines():
    """FILEPROXY_LOG_FORMAT=text: built without logging, laid out as TextFormatter does."""
    import logging

    from fileproxy.http.access_log import ACCESS_LOGGER, _text_line
    from fileproxy.ops.logs import TextFormatter

    fields = {"ts": 1.0, "level": "info", "logger": ACCESS_LOGGER, "msg": "request",
              "remote": "127.0.0.1", "path": "/a b", "status": 200, "ttfb_ms": None}  # fmt: skip
    now = 1_800_000_000.25
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, "request", (), None)
    record.created, record.msecs = now, 250.0
    for key in ("remote", "path", "status", "ttfb_ms"):
        setattr(record, key, fields[key])
    expected = TextFormatter().format(record) + "\n"
    assert _text_line(fields, "request", now).decode() == expected


async def test_a_regular_file_stdout_takes_each_batch_whole_in_order(tmp_path: Path):
    """A regular-file stdout is written a batch at a time, not in PIPE_BUF pieces: every
    line, short or longer than PIPE_BUF, still arrives whole and in order."""
    path = tmp_path / "stdout.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        log = AccessLog()
        log.configure([StreamSink(fd)])
        lines = [line(i, 2 * PIPE_BUF if i % 50 == 7 else 200) for i in range(400)]
        for one in lines:
            log.add(one)
        assert log.close()
        assert path.read_bytes() == b"".join(lines)
        log.configure([])
    finally:
        os.close(fd)


async def test_a_request_record_is_rendered_when_its_batch_is_written(tmp_path: Path):
    """``add_record`` keeps the values; the line is built at flush, in order with lines."""
    import orjson

    from fileproxy.exchange import Exchange
    from fileproxy.http.access_log import render

    path = tmp_path / "access.log"
    log = AccessLog()
    log.configure([WatchedFileSink(str(path))])
    exchange = Exchange("rid-1", "up:80", upstream_status=206)
    exchange.bytes_out = 1000
    log.add(b"before\n")
    record = (1_800_000_000.5, "10.0.0.1", "GET", "/f?x=1", 206, 1000, 0.0125, 'ua "q"', exchange)
    log.add_record(record)
    log.add(b"after\n")
    assert log.close()
    first, middle, last = path.read_bytes().splitlines(keepends=True)
    assert (first, last) == (b"before\n", b"after\n")
    assert middle == render(record)
    fields = orjson.loads(middle)
    assert fields["path"] == "/f?x=1" and fields["user_agent"] == 'ua "q"'
    assert fields["status"] == 206 and fields["upstream_status"] == 206
    assert fields["request_id"] == "rid-1" and fields["bytes_out"] == 1000
    assert fields["duration_ms"] == 12.5 and fields["ts"] == 1_800_000_000.5
    log.configure([])


def test_bytes_that_are_not_utf8_are_written_as_escapes():
    """A header value as aiohttp hands it over (UTF-8 with surrogateescape): each byte
    that is not UTF-8 becomes ``\\xHH``, valid UTF-8 stays as it is, in both formats."""
    import orjson

    from fileproxy.exchange import Exchange
    from fileproxy.http.access_log import escape, render

    raw = "café ".encode() + bytes(range(0x80, 0x100))
    value = raw.decode("utf-8", "surrogateescape")
    escaped = "café " + "".join(f"\\x{b:02x}" for b in range(0x80, 0x100))
    assert escape(value) == escaped
    assert escape("plain") == "plain"
    record = (
        1_800_000_000.5,
        "10.0.0.1",
        "GET",
        "/a",
        200,
        1,
        0.001,
        value,
        Exchange(value, "u:1"),
    )
    fields = orjson.loads(render(record))
    assert fields["user_agent"] == escaped and fields["request_id"] == escaped
    assert f" user_agent={escaped} ".encode() in render(record, text=True)


async def test_a_record_that_cannot_be_rendered_blocks_no_other_line(tmp_path: Path):
    """Dropped and counted alone: the lines around it and every later batch are written."""

    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no text")

    path = tmp_path / "access.log"
    log = AccessLog()
    log.configure([WatchedFileSink(str(path))])
    bad = (1.0, "10.0.0.1", "GET", "/bad", 200, 1, 0.001, Unprintable(), None)
    good = (1.0, "10.0.0.1", "GET", "/good", 200, 1, 0.001, "ua", None)
    log.add(b"before\n")
    log.add_record(bad)  # type: ignore[arg-type]
    log.add_record(good)
    log.flush()
    log.add_record(good)
    assert log.close()
    lines = path.read_bytes().splitlines()
    assert lines[0] == b"before" and len(lines) == 3, lines
    assert all(b'"path":"/good"' in line for line in lines[1:]), lines
    assert log.unrendered == 1
    log.configure([])


def test_other_json_log_lines_escape_such_bytes_too():
    """A log line whose ``extra`` carries a value from the wire is written, escaped."""
    import logging

    import orjson

    from fileproxy.ops.logs import JsonFormatter

    record = logging.LogRecord("fileproxy", logging.WARNING, "", 0, "bad", (), None)
    record.detail = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert orjson.loads(JsonFormatter().format(record))["detail"] == "caf\\xe9"
