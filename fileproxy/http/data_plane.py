"""The data plane: one ``asyncio.Protocol`` per client connection, below aiohttp's web layer.

A proxied request never becomes an aiohttp ``Request``: the bytes go to llhttp (through
httptools, ``bench/parsers.py``), the events to the sans-IO connection machine
(``connection.Connection``: keep-alive, pipelining, ``Expect``, ``Upgrade``, HTTP/1.0,
refusals), and the request to the proxy handler as a ``ClientRequest``; the handler
answers with a ``ClientResponse`` whose head and body this module writes, counted, with
the machine's framing. The control endpoints (``/health``, ``/ready``, ``/stats``,
``/metrics``) answer here too, through the same objects.

The layers of one connection, top to bottom::

    proxy_handler.proxy(request) -> ClientResponse     the handler (one task per request)
    ClientProtocol                                     timers, gate, errors, flow control
    connection.Connection                              HTTP/1.1 rules, pure
    httptools.HttpRequestParser                        llhttp, C

What the edge did on aiohttp's protocol is here, on our own: a request head must be
complete within ``FILEPROXY_HEADER_TIMEOUT`` (408, or a quiet close when nothing came);
414/431 for a long request line or header field, 431 for too many fields; connections
beyond ``FILEPROXY_MAX_CONNECTIONS`` get 503 and close; the active-request gate
(``gate.ActiveRequestGate``); the send timeout (``adaptive.send_watch``); JSON errors with
a fixed detail (``errors``). A client that goes away cancels its request's task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import HttpVersion, web
from multidict import CIMultiDict, CIMultiDictProxy

from fileproxy.adaptive.send_watch import SendWatch
from fileproxy.exchange import EXCHANGE
from fileproxy.http import access_log as access_logs
from fileproxy.http import connection as http1
from fileproxy.http import errors
from fileproxy.http.cors import Cors
from fileproxy.http.edge import reset
from fileproxy.http.gate import PROBE_PATHS, ActiveRequestGate, check_later
from fileproxy.http.headers import request_id_for
from fileproxy.http.target import path_problem

log = logging.getLogger("fileproxy.http.edge")

MAX_HEADERS = 128  # header fields per request head (aiohttp's limit, nginx has none)
MAX_HELD = 8  # pipelined requests read ahead of the one being answered
NEVER_FORWARDED = frozenset({"CONNECT", "TRACE"})
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_VERSIONS = {b"1.1": HttpVersion(1, 1), b"1.0": HttpVersion(1, 0)}
EDGE_FAILURE = "fileproxy.edge_failure"  # request key: the failure the connection met
_REASONS = {status.value: status.phrase for status in HTTPStatus}


def reason_phrase(status: int) -> str:
    """The standard reason phrase ("" for a status without one): a lookup per response."""
    return _REASONS.get(status, "")


class BodyBroken(ConnectionError):
    """The client's request body ended early or was malformed."""


class RequestBody:
    """The client's request body, as the handler reads it; the connection is paused while
    more than ``limit`` bytes wait here."""

    __slots__ = ("_asked", "_buffer", "_eof", "_exception", "_limit", "_owner", "_wakeup")

    def __init__(self, owner: ClientProtocol, limit: int) -> None:
        self._owner = owner
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._exception: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._asked = False

    def feed_data(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self._limit:
            self._owner.hold_body()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exception = exc
            self._wake()

    def is_eof(self) -> bool:
        return self._eof and not self._buffer

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _wake(self) -> None:
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is buffered with -1); b"" at the body's end."""
        if not self._asked:
            self._asked = True
            self._owner.body_wanted()  # 100 Continue when the client waits for it
        while not self._buffer:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                return b""
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        if len(self._buffer) <= self._limit:
            self._owner.release_body()
        return data


class ClientRequest:
    """One client request, as the handlers see it (the names of aiohttp's ``Request``
    that fileproxy used, so the handlers read the same)."""

    __slots__ = (
        "_path",
        "_state",
        "app",
        "body_exists",
        "content",
        "content_length",
        "exchange",
        "headers",
        "method",
        "protocol",
        "raw_headers",
        "raw_path",
        "response",
        "started",
        "task",
        "transport",
        "version",
    )  # fmt: skip

    def __init__(
        self,
        protocol: ClientProtocol,
        exchange: http1.Exchange,
        raw_headers: list[tuple[bytes, bytes]],
        content: RequestBody,
    ) -> None:
        self.protocol = protocol
        self.app = protocol.app
        self.transport = protocol.transport
        self.exchange = exchange
        self.method = exchange.method.decode("ascii", "surrogateescape")
        self.raw_path = exchange.target.decode("utf-8", "surrogateescape")
        self.version = _VERSIONS.get(b"%d.%d" % exchange.version) or HttpVersion(*exchange.version)
        self.raw_headers = tuple(raw_headers)
        self.headers = CIMultiDictProxy(
            CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in raw_headers
            )
        )
        framing = exchange.framing
        self.content = content
        self.content_length = (
            framing.length
            if framing.body is http1.Body.LENGTH
            else (
                0 if "Content-Length" in self.headers and framing.body is http1.Body.NONE else None
            )
        )
        self.body_exists = framing.body is not http1.Body.NONE
        self.started = time.monotonic()
        self._path: str | None = None
        self._state: dict[str, Any] = {}
        self.task: asyncio.Task[None] | None = None
        self.response: ClientResponse | None = None

    # --- aiohttp Request's names ------------------------------------------------------

    @property
    def remote(self) -> str | None:
        return self.protocol.remote

    @property
    def scheme(self) -> str:
        return "https" if self.protocol.tls else "http"

    @property
    def secure(self) -> bool:
        return self.protocol.tls

    @property
    def host(self) -> str:
        host = self.headers.get("Host")
        return host if host is not None else socket.getfqdn()

    @property
    def path(self) -> str:
        """The target's path, percent-decoded, without its query (aiohttp's ``path``)."""
        if self._path is None:
            raw = self.raw_path
            if not raw.startswith("/"):
                raw = urllib.parse.urlsplit(raw).path or "/"
            self._path = urllib.parse.unquote(raw.partition("?")[0], errors="surrogateescape")
        return self._path

    @property
    def query_string(self) -> str:
        return self.raw_path.partition("?")[2]

    def get(self, key: str, default: Any = None) -> Any:
        return self._state.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self._state[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._state[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._state


class ClientResponse:
    """A response the handler streams: ``prepare`` sends the head (or, with
    ``head_with_body``, keeps it for the first body bytes: one write for a small file),
    ``write`` each piece (waiting while the client's transport is full), ``write_eof``."""

    __slots__ = (
        "_close",
        "_eof",
        "_request",
        "body_length",
        "head_with_body",
        "headers",
        "raw_fields",
        "reason",
        "status",
    )  # fmt: skip

    def __init__(
        self, status: int = 200, reason: str | None = None, *, head_with_body: bool = False
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDict[str] = CIMultiDict()
        #: header lines sent as they are after ``headers`` (``Name: value\r\n`` each): a
        #: cache's stored head rendered once, never framing, hop-by-hop, Date or CORS fields
        self.raw_fields = b""
        self.head_with_body = head_with_body
        self._request: ClientRequest | None = None
        self.body_length = 0
        self._close = False
        self._eof = False

    @property
    def prepared(self) -> bool:
        return self._request is not None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def force_close(self) -> None:
        self._close = True

    async def prepare(self, request: ClientRequest) -> ClientResponse:
        if self._request is None:
            self._request = request
            request.response = self
            request.protocol.start_response(request, self)
        return self

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        request = self._request
        assert request is not None, "prepare() first"
        if data:
            self.body_length += len(data)
            await request.protocol.send(request, data)

    def sent_directly(self, size: int) -> None:
        """``size`` body bytes went to the client's socket past the transport (sendfile):
        counted as written."""
        request = self._request
        assert request is not None, "prepare() first"
        self.body_length += size
        request.protocol.machine.send_data(request.exchange, size)

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof:
            return
        if data:
            await self.write(data)
        self._eof = True
        request = self._request
        assert request is not None, "prepare() first"
        request.protocol.end_response(request)


ResponseLike = ClientResponse | web.Response
Handler = Callable[[ClientRequest], Awaitable[ResponseLike]]


class _HeadTooLarge(Exception):
    def __init__(self, failure: errors.Failure) -> None:
        self.failure = failure


class ClientProtocol(asyncio.Protocol):
    """One client connection of the data plane."""

    def __init__(self, server: DataPlane) -> None:
        self.server = server
        self.app = server.app
        self.gate = server.gate
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.tls = False
        self.machine = http1.Connection(pipeline_limit=MAX_HELD)
        # the parser holds this protocol's callbacks: dropped when the connection ends, so
        # the two go by reference counting, not by the cyclic collector
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.requests: collections.deque[ClientRequest] = collections.deque()
        self.writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._over_limit = False
        self._closing = False  # the drain: close once the current response is done
        # the head being parsed
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._line_done = False
        self._body: RequestBody | None = None  # of the request being read
        self._reading_paused = False
        self._body_held = False
        # timers
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._send_watch = SendWatch(server.send_timeout) if server.send_timeout > 0 else None
        self._send_timer: asyncio.TimerHandle | None = None
        self.send_timed_out = False
        # the gate: this connection's current request holds a place / waits for one
        self._gate_waiting = False
        # a WebSocket tunnel after a 101
        self.upgraded = False
        self._upgrade_rest = b""
        self._tunnel_inflow: Any = None

    # --- the transport's events ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, (list, tuple)) else peer
        self.tls = transport.get_extra_info("sslcontext") is not None
        server = self.server
        self._over_limit = len(server.connections) >= server.max_connections
        server.connections.add(self)
        self._head_timer = self.loop.call_later(server.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.discard(self)
        for timer in (self._head_timer, self._idle_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._send_timer = None
        with contextlib.suppress(http1.LocalProtocolError):
            self.machine.abort()
        if self._body is not None and not self._body.is_eof():
            self._body.set_exception(BodyBroken("the client closed the connection"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)  # the writer wakes and finds the transport gone
        self.leave_gate()
        if self._gate_waiting and self.gate is not None:
            self.gate.forget(self)
            self._gate_waiting = False
        for request in self.requests:  # handler_cancellation: the client went away
            if request.task is not None and not request.task.done():
                request.task.cancel()
        if self._tunnel_inflow is not None:
            self._tunnel_inflow.feed_eof()
        self.transport = None
        self.parser = None

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.machine.pause_writing()
        self.watch_sending()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.machine.resume_writing()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def eof_received(self) -> bool | None:
        if self._tunnel_inflow is not None:
            self._tunnel_inflow.feed_eof()
            return True  # half-open: the tunnel passes the FIN on and closes
        if self._body is not None and not self._body.is_eof():
            self._body.set_exception(BodyBroken("the client closed inside the body"))
        with contextlib.suppress(http1.LocalProtocolError):
            self.machine.receive_eof()
        # the client's end is its going away (as aiohttp and nginx take it): the transport
        # closes, and a request still being answered is cancelled (connection_lost)
        return False

    def data_received(self, data: bytes) -> None:
        if self._tunnel_inflow is not None:
            self._tunnel_inflow.feed_data(data)
            return
        if self.upgraded:
            self._upgrade_rest += data  # bytes for the tunnel, before it started
            return
        machine, parser = self.machine, self.parser
        if parser is None or machine.reader in (
            http1.Reader.DONE, http1.Reader.ERROR, http1.Reader.CLOSED
        ):  # fmt: skip
            return  # nothing after the last request is parsed (RFC 9112 9.6)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            self._upgrade_rest = data[upgrade.args[0] :] if upgrade.args else b""
            self._reading(False)
        except _HeadTooLarge as too_large:
            self._refuse(too_large.failure)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadTooLarge):
                self._refuse(cause.failure)
            else:
                self._refuse_parse(exc)
        except httptools.HttpParserError as exc:
            self._refuse_parse(exc)
        self._update_reading()

    # --- the parser's callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._line_done = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.server.header_timeout, self._head_timed_out
            )
        self.machine.receive_head_start()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_line_size:
            raise _HeadTooLarge(errors.REQUEST_LINE_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._line_done = True
        headers = self._headers
        if len(name) + len(value) + 2 > self.server.max_field_size:
            raise _HeadTooLarge(errors.FIELD_TOO_LARGE)
        if len(headers) >= MAX_HEADERS:
            raise _HeadTooLarge(errors.TOO_MANY_FIELDS)
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parser = self.parser
        assert parser is not None  # (called by the parser itself)
        version_text = parser.get_http_version()
        if version_text in ("0.9", ""):
            raise _HeadTooLarge(errors.BAD_REQUEST_LINE)
        major, _, minor = version_text.partition(".")
        version = (int(major), int(minor or 0))
        method = parser.get_method()
        exchange = self.machine.receive_head(method, bytes(self._url), version, self._headers)
        if exchange is None:
            return
        body = RequestBody(self, self.server.read_bufsize)
        self._body = body
        request = ClientRequest(self, exchange, self._headers, body)
        self.requests.append(request)
        self.server.requests_count += 1
        if exchange.refusal is not None:
            body.set_exception(BodyBroken("refused"))
        if len(self.requests) == 1:
            self._start(request)

    def on_body(self, body: bytes) -> None:
        self.machine.receive_data(len(body))
        if self._body is not None:
            self._body.feed_data(body)

    def on_message_complete(self) -> None:
        body = self._body
        self.machine.receive_end()
        if body is not None:
            body.feed_eof()
        self._body = None

    # --- reading ------------------------------------------------------------------------

    def hold_body(self) -> None:
        self._body_held = True
        self._update_reading()

    def release_body(self) -> None:
        if self._body_held:
            self._body_held = False
            self._update_reading()

    @property
    def connected(self) -> bool:
        """aiohttp StreamReader's question (a tunnel's reader)."""
        return self.transport is not None

    def pause_reading(self) -> None:
        """aiohttp StreamReader's flow control (a tunnel's reader)."""
        self._reading(False)

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading(True)

    def _update_reading(self) -> None:
        if self._tunnel_inflow is not None or self.upgraded:
            return
        self._reading(self.machine.reading and not self._body_held)

    def _reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or on != self._reading_paused:
            return
        self._reading_paused = not on
        with contextlib.suppress(RuntimeError, AttributeError):
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def body_wanted(self) -> None:
        """The handler reads the request's body: ``100 Continue`` if the client waits."""
        request = self.requests[0] if self.requests else None
        if request is None or self.transport is None:
            return
        with contextlib.suppress(http1.LocalProtocolError):
            if self.machine.want_body(request.exchange):
                self.transport.write(http1.CONTINUE)

    # --- timers -------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self.upgraded:
            return
        if self.machine.reader is http1.Reader.HEAD:
            self._refuse(errors.HEAD_TIMEOUT)
        elif self.machine.reader is http1.Reader.IDLE and not self.requests:
            self.transport.close()  # nothing sent at all: close quietly, as nginx does

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if self.transport is not None and not self.requests:
            self.transport.close()

    def watch_sending(self) -> None:
        """Bytes may wait for the client: abort it should it take none for send_timeout."""
        watch, transport = self._send_watch, self.transport
        if watch is None or transport is None or self._send_timer is not None:
            return
        due = watch.start(self.loop.time(), transport.get_write_buffer_size())
        if due is not None:
            self._send_timer = self.loop.call_at(due, self._check_sending)

    def _check_sending(self) -> None:
        self._send_timer = None
        watch, transport = self._send_watch, self.transport
        if watch is None or transport is None:
            return
        verdict = watch.check(self.loop.time(), transport.get_write_buffer_size())
        if verdict.stalled:
            self.send_timed_out = True
            log.info(
                "client took no bytes for the send timeout, aborting its connection",
                extra={"send_timeout_s": watch.timeout_s},
            )
            reset(transport)
        elif verdict.due is not None:
            self._send_timer = self.loop.call_at(verdict.due, self._check_sending)

    # --- the gate -----------------------------------------------------------------------

    def go_ahead(self) -> bool:
        """The gate's turn for this connection's request; False if the connection is gone."""
        if not self._gate_waiting or self.transport is None or not self.requests:
            self._gate_waiting = False
            return False
        self._gate_waiting = False
        self._run(self.requests[0])
        return True

    def wait_on_upstream(self) -> None:
        gate = self.gate
        if gate is not None and gate.holds(self):
            gate.upstream_wait(self, self.loop.time())
            check_later(gate, self.loop)

    def leave_gate(self) -> None:
        if self.gate is not None:
            self.gate.leave(self)

    # --- answering ------------------------------------------------------------------------

    def _start(self, request: ClientRequest) -> None:
        """``request`` is the one to answer now."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        exchange = request.exchange
        gate = self.gate
        if (
            gate is not None
            and exchange.refusal is None
            and not self._over_limit
            and request.path not in PROBE_PATHS
            and not gate.enter(self, self.loop.time())
        ):
            self._gate_waiting = True
            gate.wait(self)
            check_later(gate, self.loop)
            return
        self._run(request)

    def _run(self, request: ClientRequest) -> None:
        request.task = self.loop.create_task(self._answer(request))

    async def _answer(self, request: ClientRequest) -> None:
        """Run the handler for ``request`` and finish its response; one access line."""
        try:
            await self._handle(request)
        finally:
            # the request and its response point at each other: unlinked here, they go by
            # reference counting, not by the cyclic collector (whose passes were the p99)
            request.response = None
            request.task = None

    async def _handle(self, request: ClientRequest) -> None:
        server = self.server
        try:
            refusal = self._edge_refusal(request)
            response = refusal if refusal is not None else await server.handler(request)
        except asyncio.CancelledError:
            # the client went away (its handler logged it) or the drain cut it
            self.leave_gate()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.abort()
            raise
        except Exception as exc:
            self.leave_gate()
            log.exception("Error handling request from %s", self.remote, exc_info=exc)
            if request.response is None and self.transport is not None:
                failure = errors.classify_unexpected(exc)
                response = errors.error_response(failure, request_id_for(request))
                response.force_close()
            else:
                self._abort()
                return
        try:
            if isinstance(response, web.Response):
                if server.cors is not None and request.path not in PROBE_PATHS:
                    server.cors.add_headers(request.headers, response.headers)
                sent = 0 if request.method == "HEAD" else len(_body_of(response))
                self._send_whole(request, response)
            else:
                exchange = request.get(EXCHANGE)
                if not response._eof:
                    await response.write_eof()
                sent = exchange.bytes_out if exchange is not None else response.body_length
                if self.machine.switched and self.transport is not None:
                    self.transport.close()  # the tunnel ended: so does the connection
        except (ConnectionError, http1.LocalProtocolError) as exc:
            transport = self.transport
            if isinstance(exc, http1.LocalProtocolError) and (
                transport is not None and not transport.is_closing()
            ):  # our own bug, not a client that went away meanwhile
                log.warning("response broke HTTP framing: connection aborted", exc_info=exc)
            self._abort()
            exchange = request.get(EXCHANGE)
            sent = exchange.bytes_out if exchange is not None else 0
        if server.access_log:
            access_logs.log_access(
                request, response.status, sent, time.monotonic() - request.started,
                request.get(EXCHANGE),
            )  # fmt: skip

    def _abort(self) -> None:
        self.leave_gate()
        if self.transport is not None:
            self.transport.abort()

    def _edge_refusal(self, request: ClientRequest) -> web.Response | None:
        """What the edge answers itself: the machine's refusals, the connection limit,
        CONNECT and TRACE, targets nginx refuses."""
        exchange = request.exchange
        failure, extra = None, None
        if self._over_limit:
            failure = errors.TOO_MANY_CONNECTIONS
            extra = {"Retry-After": "1"}
        elif exchange.refusal is not None:
            failure = request.get(EDGE_FAILURE) or errors.classify_refusal(exchange.refusal)
        elif request.method in NEVER_FORWARDED:
            failure = errors.Failure(
                405, "method_not_allowed", f"{request.method} is not supported"
            )
            extra = {"Allow": ALLOWED_METHODS}
        elif (problem := path_problem(request.raw_path)) is not None:
            failure = errors.Failure(400, "bad_target", problem)
        if failure is None:
            return None
        if failure.status != 503 and EDGE_FAILURE not in request:
            log.info(
                "bad request",
                extra={"peer": self.remote, "status": failure.status, "error": failure.error},
            )
        response = errors.error_response(failure, request_id_for(request), extra)
        response.force_close()
        return response

    def _head(
        self,
        exchange: http1.Exchange,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        raw: http1.Fields,
        start: http1.ResponseStart,
    ) -> bytes:
        """The response head's bytes: ``raw`` as the machine accepted it, the Connection
        field the machine asks for and a Date unless the response has one."""
        if start.connection is not None and "Connection" not in headers:
            raw.append((b"Connection", start.connection))
        elif start.connection == b"close":
            raw = [field for field in raw if field[0].lower() != b"connection"]
            raw.append((b"Connection", b"close"))
        if "Date" not in headers:
            raw.append((b"Date", self.server.date().encode("ascii")))
        major, minor = exchange.version
        phrase = (reason or reason_phrase(status)).encode("latin-1", "replace")
        return http1.encode_head(b"HTTP/%d.%d %d %b" % (major, minor, status, phrase), raw)

    def start_response(self, request: ClientRequest, response: ClientResponse) -> None:
        """Send ``response``'s head (held for the first body bytes with head_with_body)."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.leave_gate()  # the head goes out: this request no longer needs its place
        headers = response.headers
        if self.server.cors is not None:
            self.server.cors.add_headers(request.headers, headers)
        if response._close or self._closing or self.upgraded:
            # (an upgrade the upstream refused: what follows its head is not parsed)
            headers["Connection"] = "close"
        raw = http1.encode_fields(headers.items())
        status = response.status
        if (
            status >= 200
            and "Content-Length" not in headers
            and "Transfer-Encoding" not in headers
            and status not in (204, 304)
            and request.method != "HEAD"
            and request.exchange.version >= (1, 1)
            and status != 101
        ):
            headers["Transfer-Encoding"] = "chunked"
            raw.append((b"Transfer-Encoding", b"chunked"))
        start = self.machine.start_response(request.exchange, status, raw)
        head = self._head(request.exchange, status, response.reason, headers, raw, start)
        if response.raw_fields:  # lines rendered once by their owner (a cache hit's head)
            head = head[:-2] + response.raw_fields + b"\r\n"
        self._chunked = start.framing.body is http1.Body.CHUNKED
        if response.head_with_body:
            self._held_head = head
        else:
            self._held_head = b""
            transport.write(head)

    _held_head = b""
    _chunked = False

    async def send(self, request: ClientRequest, data: bytes | bytearray | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.machine.send_data(request.exchange, len(data))
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), bytes(data))
        if self._held_head:
            data = self._held_head + data
            self._held_head = b""
        transport.write(data)
        if self.writing_paused:
            await self.drained()

    async def drained(self) -> None:
        """Until the client's transport is below its low-water mark again."""
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if not self.writing_paused:
            return
        drain = self._drain
        if drain is None or drain.done():
            drain = self._drain = self.loop.create_future()
        await asyncio.shield(drain)
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")

    def end_response(self, request: ClientRequest) -> None:
        """The response is complete: the next request becomes current, or the connection
        closes once written."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        tail = self._held_head + (b"0\r\n\r\n" if self._chunked else b"")
        self._held_head = b""
        self.machine.end_response(request.exchange)
        if tail:
            transport.write(tail)
        self._next(request)

    def _send_whole(self, request: ClientRequest, response: web.Response) -> None:
        """A response known whole (an error, a control endpoint): head and body, one write."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.leave_gate()
        body = _body_of(response)
        headers = CIMultiDict(response.headers)
        headers["Content-Length"] = str(len(body))
        if response.keep_alive is False or self._closing:
            headers["Connection"] = "close"
        raw = http1.encode_fields(headers.items())
        exchange = request.exchange
        start = self.machine.start_response(exchange, response.status, raw)
        head = self._head(exchange, response.status, response.reason, headers, raw, start)
        if start.framing.body is http1.Body.NONE:
            body = b""
        if body:
            self.machine.send_data(exchange, len(body))
        transport.write(head + body)
        self.machine.end_response(exchange)
        self._next(request)

    def _next(self, request: ClientRequest) -> None:
        if self.requests and self.requests[0] is request:
            self.requests.popleft()
        transport = self.transport
        if transport is None:
            return
        if self.machine.must_close or self._closing:
            transport.close()
            return
        if self.requests:
            self._start(self.requests[0])
        elif self.machine.reader is http1.Reader.IDLE:
            self._idle_timer = self.loop.call_later(self.server.keepalive_timeout,
                                                    self._idle_timed_out)  # fmt: skip
        self._update_reading()

    # --- errors the connection meets itself ---------------------------------------------------

    def _refuse_parse(self, exc: httptools.HttpParserError) -> None:
        self._refuse(errors.classify_parse_error(exc, in_request_line=not self._line_done))

    def _refuse(self, failure: errors.Failure) -> None:
        """A client's mistake the parser or a timer found: answered in order, then close."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body is not None:
            self._body.set_exception(BodyBroken("request body ended early or was malformed"))
            self._body = None
        try:
            exchange = self.machine.receive_error(failure.status)
        except http1.LocalProtocolError:
            exchange = None
        if exchange is None or self.transport is None:
            return
        if any(r.exchange is exchange for r in self.requests):
            return  # its handler is answering: the connection closes after it
        log.info(
            "bad request",
            extra={"peer": self.remote, "status": failure.status, "error": failure.error},
        )
        request = ClientRequest(self, exchange, [], RequestBody(self, 0))
        request.content.feed_eof()
        request[EDGE_FAILURE] = failure
        self.requests.append(request)
        if len(self.requests) == 1:
            self._start(request)

    # --- a WebSocket tunnel -----------------------------------------------------------------

    def tunnel_to(self, inflow: Any) -> None:
        """From now on the client's bytes go to ``inflow`` (and its end: a FIN leaves the
        connection half-open, the tunnel closes it)."""
        self._tunnel_inflow = inflow
        rest, self._upgrade_rest = self._upgrade_rest, b""
        if rest:
            inflow.feed_data(rest)
        transport = self.transport
        if transport is not None and self._reading_paused:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError, AttributeError):
                transport.resume_reading()

    def send_switch(self, request: ClientRequest, response: ClientResponse) -> None:
        """A 101 head; the bytes after it are the tunnel's."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.leave_gate()
        headers = response.headers
        raw = http1.encode_fields(headers.items())
        self.machine.start_response(request.exchange, 101, raw)
        reason = (response.reason or "Switching Protocols").encode("latin-1", "replace")
        transport.write(http1.encode_head(b"HTTP/1.1 101 %b" % reason, raw))
        response._request, response._eof = request, True  # no HTTP body: the tunnel's bytes
        request.response = response

    async def send_tunnelled(self, data: bytes) -> None:
        """Bytes of a tunnel to the client, waiting while its transport is full."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)
        if self.writing_paused:
            await self.drained()

    # --- the drain --------------------------------------------------------------------------

    def close_when_done(self) -> None:
        """The drain: an idle connection closes now, a busy one after its response."""
        self._closing = True
        if not self.requests and self.transport is not None and self._tunnel_inflow is None:
            self.transport.close()

    @property
    def busy(self) -> bool:
        return bool(self.requests) or self._tunnel_inflow is not None


def _body_of(response: web.Response) -> bytes:
    body = response.body
    assert body is None or isinstance(body, bytes)  # JSON errors and endpoints: bytes
    return body or b""


class DataPlane:
    """The protocol factory of a worker (``loop.create_server``'s), with what its
    connections share: the handler, the limits, the gate, the open connections.

    It stands where aiohttp's ``web.Server`` stands for an ``AppRunner`` (``connections``,
    ``requests_count``, ``pre_shutdown``, ``shutdown``), so ``fileproxy serve`` and
    gunicorn's aiohttp worker run it as they ran aiohttp's."""

    def __init__(
        self,
        app: web.Application,
        handler: Handler,
        *,
        loop: asyncio.AbstractEventLoop,
        header_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
        active_requests: int,
        send_timeout: float,
        max_header_size: int,
        read_bufsize: int,
        access_log: bool,
        cors: Cors | None = None,
    ) -> None:
        self.app = app
        self.handler = handler
        self.loop = loop
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.gate = ActiveRequestGate(active_requests) if active_requests else None
        self.send_timeout = send_timeout
        self.max_line_size = self.max_field_size = max_header_size
        self.read_bufsize = read_bufsize
        self.access_log = access_log
        self.cors = cors
        self.connections: set[ClientProtocol] = set()
        self.requests_count = 0
        self._date = ""
        self._date_at = 0.0

    def __call__(self) -> ClientProtocol:
        return ClientProtocol(self)

    def date(self) -> str:
        now = time.time()
        if int(now) != self._date_at:
            self._date_at = int(now)
            self._date = formatdate(now, usegmt=True)
        return self._date

    def pre_shutdown(self) -> None:
        for connection in list(self.connections):
            connection.close_when_done()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Until every connection's requests are answered (the runner cuts what is left at
        its graceful timeout), then close what remains."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while any(c.busy for c in self.connections):
            if deadline is not None and loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close_when_done()
            if connection.transport is not None and connection.busy:
                connection.transport.abort()
