"""One upstream connection: an ``asyncio.Protocol`` of our own with llhttp (httptools).

The protocol reads one response at a time for the request the client just wrote
(``expect_response``, then ``read_head``), as aiohttp's client protocol did, without
its per-message object graph (a ``RawResponseMessage``, a ``CIMultiDict`` built in C
from a ``URL``, a ``StreamReader``):

- the head: bytes are gathered until the blank line that ends it, then fed to a fresh
  ``httptools.HttpResponseParser`` (llhttp: the status line and fields, strictly); 1xx
  heads before the final one are read and dropped, a ``101`` stops parsing (what follows
  is the tunnel's, ``take_upgraded``);
- the body, delimited as ``fileproxy.http.connection.response_framing`` says (RFC 9112
  6.3, the method of the request included: HEAD, 204 and 304 have none): a
  Content-Length body is counted in ``data_received`` and handed on as received, never
  through a parser; a chunked one goes through the same llhttp parser (its
  ``on_body``); one without framing ends with the connection;
- the keep-alive decision: the connection goes back to its pool only after a complete
  body, with keep-alive (``keep_alive_requested``: HTTP/1.1 unless ``Connection:
  close``, HTTP/1.0 only with ``keep-alive``), and without a byte beyond the response;
- flow control: reading pauses while the body's unread bytes are over its limit (the
  settings' ``FILEPROXY_BUFFER_SIZE``) and resumes when the reader took them; the
  request body's writer waits in ``drain`` while the transport's write buffer is over
  its high-water mark;
- the idle-read timeout (``FILEPROXY_READ_TIMEOUT``): armed once the request was sent
  (``start_read_timeout``), measured from the last byte received, off while our side
  holds reading paused; one timer handle, moved only when it fires (not per read).

Receive buffers: bodies are handed on in the pieces the transport read (uvloop reads
into one buffer of its own, reused), never joined into larger ones (``read(n)`` returns
at most one piece), so the allocations stay the size of a socket read.

Errors are aiohttp's public client exceptions, as its client raised them, so
``fileproxy/http/errors.py`` classifies them as before: ``ServerDisconnectedError``
(closed before a head), ``ClientOSError`` (a reset), ``ClientPayloadError`` (a body cut
short), ``SocketTimeoutError`` (the idle-read timeout), ``ClientResponseError`` (a head
llhttp refuses, or too large).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from typing import Any

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from fileproxy.http.connection import (
    Body,
    FramingError,
    HeadFields,
    keep_alive_requested,
    response_framing,
    scan_fields,
)

# the blank line that ends a head (CRLF; a bare LF one is looked for only without it,
# and llhttp then judges it)
_HEAD_END = b"\r\n\r\n"
_BARE_HEAD_END = re.compile(rb"\n\r?\n")
# the fields response_framing and keep_alive_requested read (http/connection.py), looked up
# in the head's CIMultiDict (in C) rather than by a pass over every field in Python
_FRAMING_NAMES = (
    ("Content-Length", b"content-length"),
    ("Transfer-Encoding", b"transfer-encoding"),
    ("Connection", b"connection"),
)
# bounds of a response head (aiohttp's client defaults per line; the whole head as
# nginx bounds it by proxy_buffer_size, generously: 130 Set-Cookie of a login pass)
MAX_LINE_SIZE = 8190
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 2048

# what a ClientResponseError names as its request (the protocol knows no URL; errors.classify
# reads only the type, the access log the message)
_NO_REQUEST = aiohttp.RequestInfo(URL(), "", CIMultiDictProxy(CIMultiDict()))

# what a transport without flow control (or one closing) raises on pause/resume_reading
_NO_FLOW_CONTROL = (AttributeError, NotImplementedError, RuntimeError)

# states of the response being read
_IDLE, _HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _UPGRADED = range(6)


class ResponseHead:
    """A final response head as the upstream sent it."""

    __slots__ = ("headers", "raw_headers", "reason", "status", "version")

    def __init__(
        self,
        status: int,
        reason: str,
        version: tuple[int, int],
        headers: CIMultiDictProxy[str],
        raw_headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self.status, self.reason, self.version = status, reason, version
        self.headers, self.raw_headers = headers, raw_headers


class ResponseBody:
    """The body of one response as it arrives: ``read(n)``, ``is_eof()``.

    ``is_eof``: the whole body was received (some may still be unread), as aiohttp's
    ``StreamReader.is_eof``. ``read(n)`` returns at most ``n`` bytes of one received
    piece (``n`` < 0: the rest of the body, joined), ``b""`` at the end; a failure is
    raised once the pieces received before it were read.
    """

    __slots__ = (
        "_chunks",
        "_eof",
        "_error",
        "_limit",
        "_loop",
        "_offset",
        "_owner",
        "_reader_waiter",
        "_size",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None, owner: UpstreamProtocol | None, limit: int
    ) -> None:
        self._loop, self._owner, self._limit = loop, owner, limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of the first piece already read
        self._size = 0
        self._eof = owner is None
        self._error: BaseException | None = None
        self._reader_waiter: asyncio.Future[None] | None = None

    def is_eof(self) -> bool:
        return self._eof

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def exception(self) -> BaseException | None:
        return self._error

    async def read(self, n: int = -1) -> bytes | memoryview:
        """Up to ``n`` bytes (all with -1): a bytes object, or a view of part of one."""
        if n < 0:  # all of it: piece by piece, so flow control lets the rest in
            pieces = []
            while piece := await self.read(1 << 62):
                pieces.append(piece)
            return b"".join(pieces)
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait()
        # the first piece itself when it fits, else a view of part of it: no byte is
        # copied (a relay's pieces are a quarter of what one socket read brings)
        first, offset = chunks[0], self._offset
        end = offset + n
        data: bytes | memoryview
        if end >= len(first):
            chunks.popleft()
            self._offset = 0
            data = memoryview(first)[offset:] if offset else first
        else:
            self._offset = end
            data = memoryview(first)[offset:end]
        self._size -= len(data)
        owner = self._owner
        if owner is not None and owner._reading_held and self._size <= self._limit:
            owner.resume_reading()
        return data

    async def readany(self) -> bytes | memoryview:
        return await self.read(1 << 62)

    async def _wait(self) -> None:
        assert self._loop is not None  # (EMPTY_BODY never waits: it is at its end)
        waiter = self._reader_waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._reader_waiter = None

    # --- the protocol's side ---------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._reader_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def feed_data(self, data: bytes, start: int = 0) -> None:
        """``data[start:]`` arrived (``start``: the first piece may begin past a head)."""
        if start:
            if self._chunks:  # (never: a head precedes only the first piece)
                data, start = data[start:], 0
            self._offset = start
        self._chunks.append(data)
        self._size += len(data) - start
        if self._reader_waiter is not None:
            self._wake()
        if self._size > self._limit and self._owner is not None:
            self._owner.pause_reading()

    def feed_eof(self) -> None:
        self._eof = True
        self._owner = None  # the connection may carry another response now
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._error is None and not self._eof:
            self._error = exc
            self._owner = None
            self._wake()


#: the body of a response that has none (HEAD, 1xx, 204, 304): at its end already
EMPTY_BODY = ResponseBody(None, None, 0)


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection to an upstream, reading one response at a time."""

    __slots__ = (
        "_body",
        "_bufsize",
        "_drain_waiter",
        "_error",
        "_head_buffer",
        "_head_only",
        "_head_waiter",
        "_keep_alive",
        "_last_read",
        "_loop",
        "_must_close",
        "_parser",
        "_raw_headers",
        "_read_timeout",
        "_reading_held",
        "_reason",
        "_remaining",
        "_state",
        "_timer",
        "_timing",
        "_tunnel",
        "_tunnel_payload",
        "_writing_paused",
        "transport",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._state = _IDLE
        self._must_close = False
        self._head_only = False
        self._head_buffer = b""
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._parser: Any = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._body: ResponseBody = EMPTY_BODY
        self._remaining = 0
        self._keep_alive = True
        self._bufsize = 2**16
        self._error: BaseException | None = None
        self._read_timeout: float | None = None
        self._timing = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._reading_held = False  # our side paused reading (a full body buffer)
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._tunnel: Any = None  # after a 101: who takes the bytes (``take_upgraded``)
        self._tunnel_payload: Any = None

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._timing:
            self._last_read = self._loop.time()
        state = self._state
        if state == _LENGTH:  # the hot path: a body counted, handed on as received
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._body.feed_data(data)
                return
            self._remaining = 0
            if len(data) > remaining:
                self._body.feed_data(data[:remaining])
                self._must_close = True  # bytes beyond the response: never reused
            else:
                self._body.feed_data(data)
            self._response_done()
        elif state == _HEAD:
            try:
                self._head_received(data)
            except Exception as exc:  # a bug of ours: the request fails, never hangs
                self._bad_head(f"response head not understood: {type(exc).__name__}")
                raise
        elif state == _CHUNKED:
            self._chunked_received(data)
        elif state == _UNTIL_CLOSE:
            self._body.feed_data(data)
        elif state == _UPGRADED:
            self._upgraded_received(data)
        else:  # nothing asked: a byte the upstream should not have sent
            self._must_close = True

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost ends what was being read

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._stop_timer()
        state = self._state
        self._state = _IDLE
        self._must_close = True
        if isinstance(exc, OSError):
            failure: BaseException = aiohttp.ClientOSError(*exc.args)
        elif exc is None:
            failure = aiohttp.ServerDisconnectedError()
        else:
            failure = exc
        if state == _HEAD:
            self._fail(failure)
        elif state == _UNTIL_CLOSE and exc is None:
            self._body.feed_eof()  # the close is its end
        elif state in (_LENGTH, _CHUNKED, _UNTIL_CLOSE):
            detail = "" if exc is None else f". {exc!r}"
            self._fail(aiohttp.ClientPayloadError(f"Response payload is not completed{detail}"))
        elif state == _UPGRADED and self._tunnel is not None:
            with contextlib.suppress(Exception):  # the tunnel's reader is gone already
                self._tunnel.feed_eof()
        if self._error is None:
            self._error = failure
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(aiohttp.ClientConnectionResetError("Connection lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- what the pool and the client ask --------------------------------------------

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def is_connected(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing()

    @property
    def should_close(self) -> bool:
        """Not to be reused: told so, broken, or a response not read to its end."""
        return self._must_close or self._state != _IDLE or self._error is not None

    def close(self) -> None:
        transport, self.transport = self.transport, None
        self._stop_timer()
        if transport is not None:
            transport.close()
        if self._state != _IDLE:
            self.connection_lost(None)  # ends whatever was being read (once)
        self._must_close = True

    def expect_response(self, *, head_only: bool, read_timeout: float | None, bufsize: int) -> None:
        """The request is about to be written: read its response next."""
        self._state = _HEAD
        self._head_only = head_only
        self._read_timeout = read_timeout
        self._bufsize = bufsize
        self._timing = False
        self._head_waiter = self._loop.create_future()

    def start_read_timeout(self) -> None:
        """The whole request was sent: the idle-read timeout runs from now."""
        if not self._read_timeout or self._state == _IDLE or self._state == _UPGRADED:
            return
        self._timing = True
        self._last_read = self._loop.time()
        if self._timer is None and not self._reading_held:
            self._timer = self._loop.call_at(
                self._last_read + self._read_timeout, self._on_read_timer
            )

    async def read_head(self) -> tuple[ResponseHead, ResponseBody]:
        """The final response head (1xx before it skipped; a 101 is final) and its body."""
        waiter = self._head_waiter
        assert waiter is not None, "expect_response first"
        try:
            head = await waiter
        finally:
            self._head_waiter = None
        return head, self._body

    def set_exception(self, exc: BaseException, cause: BaseException | None = None) -> None:
        """The request failed on our side (its body): the response read fails with ``exc``."""
        if cause is not None:
            exc.__cause__ = cause
        self._must_close = True
        self._fail(exc)

    async def drain(self) -> None:
        """Return once the write buffer is below its high-water mark."""
        if self.transport is None:
            raise aiohttp.ClientConnectionResetError("Connection lost")
        if not self._writing_paused:
            return
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self._loop.create_future()
        await asyncio.shield(waiter)

    def pause_reading(self) -> None:
        if self._reading_held:
            return
        self._reading_held = True
        self._stop_timer()  # the wait is ours, not the upstream's
        if self.transport is not None:
            with contextlib.suppress(*_NO_FLOW_CONTROL):
                self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if not self._reading_held:
            return
        self._reading_held = False
        if self.transport is not None:
            with contextlib.suppress(*_NO_FLOW_CONTROL):
                self.transport.resume_reading()
        if self._timing:
            self.start_read_timeout()

    def take_upgraded(self, tunnel: Any, payload: Any) -> None:
        """After a 101: the bytes read past its head and all that follow go to
        ``tunnel.feed_data`` (the end to ``feed_eof``), failures to
        ``payload.set_exception``; no idle-read timeout (the tunnel has its own)."""
        self._tunnel, self._tunnel_payload = tunnel, payload
        self._timing = False
        self._stop_timer()
        tail, self._head_buffer = self._head_buffer, b""
        if tail:
            tunnel.feed_data(tail)
        self.resume_reading()
        if self.transport is None:
            tunnel.feed_eof()

    # --- reading a head --------------------------------------------------------------

    def _head_received(self, data: bytes) -> None:
        buffer = self._head_buffer + data if self._head_buffer else data
        while True:
            end = buffer.find(_HEAD_END) + 4
            if end == 3:  # not found
                found = _BARE_HEAD_END.search(buffer)
                end = found.end() if found is not None else 0
            if not end:
                if len(buffer) > MAX_HEADER_BYTES:
                    self._bad_head(f"response head larger than {MAX_HEADER_BYTES} bytes")
                    return
                self._head_buffer = buffer
                return
            self._head_buffer = b""
            head = self._parse_head(buffer[:end])
            if head is None:
                return  # refused: failed
            status = head.status
            if 100 <= status < 200 and status != 101:
                if end == len(buffer):  # an early hint or a stray 100: the final head follows
                    return
                buffer = buffer[end:]
                continue
            self._start_body(head, buffer, end)
            return

    def _parse_head(self, data: bytes) -> ResponseHead | None:
        self._raw_headers = []
        self._reason = b""
        parser = self._parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, ValueError) as exc:
            # llhttp pauses after a whole 101 head (HttpParserUpgrade, or HPE_PAUSED_UPGRADE
            # "Pause on CONNECT/Upgrade"); any other error is a head refused
            upgraded = isinstance(exc, httptools.HttpParserUpgrade) or "Upgrade" in str(exc)
            if not (upgraded and parser.get_status_code() == 101):
                self._bad_head(f"invalid response head: {type(exc).__name__}: {exc}")
                return None
        raw = self._raw_headers
        if len(data) > MAX_LINE_SIZE:  # (a smaller head has no line over the bound)
            refused = _refused_head(data, self._reason, raw)
            if refused is not None:
                self._bad_head(refused)
                return None
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in raw:
            headers.add(
                name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
            )
        version = parser.get_http_version()
        return ResponseHead(
            parser.get_status_code(),
            self._reason.decode("utf-8", "surrogateescape"),
            (1, 1) if version == "1.1" else (1, 0) if version == "1.0" else _version(version),
            CIMultiDictProxy(headers),
            tuple(raw),
        )

    # llhttp's callbacks (httptools looks them up on this object)
    def on_status(self, reason: bytes) -> None:
        if self._state == _IDLE:  # after the last chunk: a response nobody asked for
            self._must_close = True
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value.strip(b" \t")))

    def on_body(self, data: bytes) -> None:
        if self._state == _CHUNKED:
            self._body.feed_data(data)

    def on_message_complete(self) -> None:
        if self._state == _CHUNKED:
            self._response_done()

    def _start_body(self, head: ResponseHead, buffer: bytes, end: int) -> None:
        """The final head was parsed; ``buffer[end:]`` is what came after it."""
        status = head.status
        try:
            fields = _framing_fields(head.headers)
            framing = response_framing(b"HEAD" if self._head_only else b"GET", status, fields)
        except FramingError as exc:
            self._bad_head(str(exc))
            return
        self._keep_alive = keep_alive_requested(head.version, fields.connection)
        waiter = self._head_waiter
        rest = buffer[end:] if framing.body is not Body.LENGTH else b""
        if status == 101:
            self._state = _UPGRADED
            self._must_close = True
            self._timing = False
            self._stop_timer()
            self._body = EMPTY_BODY
            self._head_buffer = rest  # the tunnel's first bytes
            if len(rest) > self._bufsize:
                self.pause_reading()
        elif framing.body is Body.NONE:
            self._body = EMPTY_BODY
            self._response_done()
            if rest:
                self._must_close = True
        else:
            self._body = ResponseBody(self._loop, self, self._bufsize)
            if framing.body is Body.LENGTH:
                assert framing.length is not None
                self._remaining = framing.length
                self._state = _LENGTH
                if framing.length == 0:
                    self._response_done()
                    if end < len(buffer):
                        self._must_close = True
                elif len(buffer) - end <= framing.length:  # the usual: the body's start
                    if end < len(buffer):  # handed on in place, not copied out of the read
                        self._body.feed_data(buffer, end)
                        self._remaining = framing.length - (len(buffer) - end)
                        if not self._remaining:
                            self._response_done()
                else:
                    self.data_received(buffer[end:])
            elif framing.body is Body.CHUNKED:
                self._state = _CHUNKED
                if rest:
                    self._chunked_received(rest)
            else:
                self._state = _UNTIL_CLOSE
                self._keep_alive = False
                if rest:
                    self._body.feed_data(rest)
        if waiter is not None and not waiter.done():
            waiter.set_result(head)

    # --- reading a body --------------------------------------------------------------

    def _chunked_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._state == _CHUNKED:
                self._fail(aiohttp.ClientPayloadError(f"invalid chunked body: {exc}"))
            else:  # bytes after the last chunk that are not a response
                self._must_close = True

    def _response_done(self) -> None:
        self._state = _IDLE
        self._timing = False  # the timer, if armed, finds nothing to time and lapses (the
        # next request on this connection reuses it when it is still pending: no handle
        # made and cancelled per response)
        if not self._keep_alive:
            self._must_close = True
        self._body.feed_eof()
        self.resume_reading()

    def _upgraded_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.feed_data(data)
            return
        self._head_buffer += data  # until the tunnel takes the connection
        if len(self._head_buffer) > self._bufsize:
            self.pause_reading()

    # --- failures and the read timeout -----------------------------------------------

    def _bad_head(self, message: str) -> None:
        self._must_close = True
        self._state = _IDLE
        self._fail(aiohttp.ClientResponseError(_NO_REQUEST, (), status=502, message=message))
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        self._must_close = True
        self._timing = False
        self._stop_timer()
        if self._error is None:
            self._error = exc
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._body.set_exception(exc)
        payload = self._tunnel_payload
        if payload is not None:
            payload.set_exception(exc)

    def _on_read_timer(self) -> None:
        self._timer = None
        timeout = self._read_timeout
        if not self._timing or self._reading_held or not timeout:
            return
        due = self._last_read + timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._on_read_timer)
            return
        self._fail(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))

    def _stop_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()


def _refused_head(head: bytes, reason: bytes, raw: list[tuple[bytes, bytes]]) -> str | None:
    """Why a head over a line's bound is refused, or None: more than ``MAX_HEADER_BYTES``
    in all, more than ``MAX_HEADERS`` fields, or a line over ``MAX_LINE_SIZE``."""
    if len(head) > MAX_HEADER_BYTES:
        return f"response head larger than {MAX_HEADER_BYTES} bytes"
    if len(raw) > MAX_HEADERS:
        return f"more than {MAX_HEADERS} header fields"
    if len(reason) > MAX_LINE_SIZE:
        return "status line too long"
    if any(len(name) > MAX_LINE_SIZE or len(value) > MAX_LINE_SIZE for name, value in raw):
        return "response header field too long"
    return None


def _framing_fields(headers: CIMultiDictProxy[str]) -> HeadFields:
    """What ``scan_fields`` finds in the fields that decide framing and keep-alive (llhttp
    already refused CR, LF and NUL in values)."""
    found = [
        (raw_name, value.encode("utf-8", "surrogateescape"))
        for name, raw_name in _FRAMING_NAMES
        for value in headers.getall(name, ())
    ]
    return scan_fields(found) if found else _NO_FIELDS


_NO_FIELDS = HeadFields()


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return (int(major), int(minor or 0)) if major.isdigit() and minor.isdigit() else (1, 0)


def take_upgraded(protocol: UpstreamProtocol, tunnel: Any, payload: Any) -> None:
    protocol.take_upgraded(tunnel, payload)


async def wait_writable(protocol: UpstreamProtocol) -> None:
    await protocol.drain()
