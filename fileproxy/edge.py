"""The edge: aiohttp's per-connection HTTP protocol, hardened for the internet.

aiohttp 3.14 has no hooks for three things a reverse proxy needs before a request
reaches the application, so this module subclasses its ``RequestHandler`` (the
protocol of one client connection) and ``Server`` (its factory):

- Errors the server meets itself (parser errors, a handler's escaping
  exception) are answered with the JSON error body of ``errors`` instead of
  aiohttp's text/plain, with a fixed detail (the parser's messages quote the
  client's bytes) and the right status: 414 for a long request line, 431 for a
  long or too many header fields (aiohttp says 400 for all of them).
- A request head must be complete within ``FILEPROXY_HEADER_TIMEOUT`` seconds of
  accept, or of its first byte on a kept-alive connection (nginx's
  client_header_timeout): else 408 and close. aiohttp itself only has the
  keep-alive timeout, which a slowloris client never lets fire early.
- Connections beyond ``FILEPROXY_MAX_CONNECTIONS`` per worker get 503 for their
  request and are closed; the application never sees them.
- At most ``FILEPROXY_ACTIVE_REQUESTS`` requests per worker are worked on at once
  (``ActiveRequestGate``); the next requests wait their turn in arrival order,
  parsed but not handled, and ``/health`` and ``/ready`` go first. Without it a worker
  with a thousand connections reads every request at once, each loop iteration
  serves a slice of all of them, and a request (and the health check) waits behind
  the whole slice: more CPU per request, a long tail, a slow ``/health``.

``EdgeApplication`` puts this in place wherever an ``AppRunner`` is built from the
app (``fileproxy serve`` and gunicorn's aiohttp worker alike); the settings come
in through ``handler_args`` (see ``app.server_options``).

This leans on aiohttp internals (``_ErrInfo``, ``_messages``, ``_waiter``,
``_close``); tests/reliability pins the behaviour, so an aiohttp upgrade that
moves them fails there.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpVersion, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_server import Server

from . import errors
from .exchange import request_id_for
from .request_gate import ActiveRequestGate

log = logging.getLogger("fileproxy.edge")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refuse_what_a_reverse_proxy_must_not_serve(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """CONNECT, TRACE, HTTP versions other than 1.x, and targets no route takes: JSON errors.

    Without this aiohttp's router answers ``CONNECT host:port`` (or ``OPTIONS *``)
    with a text/plain 404 and keeps a CONNECT connection open as a tunnel. TRACE
    would echo the request, with the cookies and credentials a browser attached, to
    whoever can make it send one (cross-site tracing): 405, as nginx answers.
    Absolute-form targets reach the proxy handler, which serves those naming the
    proxy itself and refuses the others (400).
    """
    failure = None
    extra: dict[str, str] | None = None
    if request.method in _NEVER_FORWARDED:
        failure = errors.Failure(405, "method_not_allowed", f"{request.method} is not supported")
        extra = {"Allow": ALLOWED_METHODS}
    elif request.version.major != 1:
        failure = errors.Failure(505, "http_version_not_supported", "only HTTP/1.0 and 1.1")
    if failure is None:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if isinstance(exc, web.HTTPNotFound):  # the catch-all route takes every "/..."
                failure = errors.Failure(
                    400, "bad_target", "only origin-form request targets are accepted"
                )
            else:
                failure = errors.Failure(exc.status, "bad_request", exc.reason)
    response = errors.error_response(failure, request_id_for(request), extra)
    response.force_close()
    return response


_NEVER_FORWARDED = frozenset({"CONNECT", "TRACE"})
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


async def _reject_over_limit(request: web.BaseRequest) -> web.StreamResponse:
    failure = errors.classify_edge(503, errors.TooManyConnections(), in_request_line=False)
    response = errors.error_response(failure, request_id_for(request), {"Retry-After": "1"})
    response.force_close()
    return response


# Liveness and readiness probes never wait behind the proxied requests.
_PROBE_PATHS = frozenset({"/health", "/ready"})
_MAX_HELD = 8  # requests a pipelining client may have waiting before it is paused


def _check_gate_later(gate: ActiveRequestGate, loop: asyncio.AbstractEventLoop) -> None:
    """Arm the gate's one timer for its next check, unless one is armed."""
    if gate.timer is not None:
        return
    when = gate.next_check()
    if when is not None:
        gate.timer = loop.call_at(when, _check_gate, gate, loop)


def _check_gate(gate: ActiveRequestGate, loop: asyncio.AbstractEventLoop) -> None:
    gate.timer = None
    gate.expire(loop.time())
    _check_gate_later(gate, loop)


def _gate_of(manager: Server, limit: int) -> ActiveRequestGate | None:
    """The worker's one gate (kept on its ``Server``), or None when unlimited."""
    if not limit:
        return None
    gate: ActiveRequestGate | None = getattr(manager, "_fileproxy_gate", None)
    if gate is None:
        gate = ActiveRequestGate(limit)
        manager._fileproxy_gate = gate  # type: ignore[attr-defined]
    return gate


class EdgeRequestHandler(RequestHandler):
    """One client connection: aiohttp's protocol plus head timeout, limits and JSON errors."""

    def __init__(
        self,
        manager: Server,
        *,
        client_header_timeout: float,
        max_connections: int,
        active_requests: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = client_header_timeout
        self._max_connections = max_connections
        self._gate = _gate_of(manager, active_requests)
        self._held = False  # its parsed requests wait for a place
        self._held_messages: list[Any] = []
        self._paused_by_gate = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the request head in progress
        self._head_line_len: int | None = None  # length of its request line, once complete
        self._body: StreamReader | None = None  # body of the last parsed request

    # --- connection limit and head timer -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if manager is not None and len(manager.connections) >= self._max_connections:
            self._request_handler = _reject_over_limit
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._body = None
        if self._held and self._gate is not None:
            self._held = False
            self._held_messages.clear()
            self._gate.forget(self)
        self.leave_gate()
        super().connection_lost(exc)

    # --- the active-request gate ---------------------------------------------------

    def data_received(self, data: bytes) -> None:
        gate = self._gate
        if gate is None:
            self._receive(data)
            return
        # Requests parsed now are not handed to the connection's task before the gate
        # lets them in; they may arrive while it still finishes the previous one.
        queued = len(self._messages)
        waiter, self._waiter = self._waiter, None
        try:
            self._receive(data)
        finally:
            self._waiter = waiter
        new = len(self._messages) - queued
        # new requests queue behind held ones; else they need a place, unless a request
        # of this connection holds one already (pipelined) or they are probes
        gated = new and (self._held or not (gate.holds(self) or self._is_probe(queued)))
        if gated and (self._held or not gate.enter(self, self._loop.time())):
            self._hold(new, gate)
            return
        if self._messages:
            self._wake()

    def _hold(self, new: int, gate: ActiveRequestGate) -> None:
        """Keep the ``new`` requests just parsed back until the gate admits them.

        The connection keeps being read: a held request's body is bounded by the
        parser's own buffer limit, and a client that pipelines more than
        ``_MAX_HELD`` requests is paused until they are admitted.
        """
        held = [self._messages.pop() for _ in range(new)]
        self._held_messages.extend(reversed(held))  # after any held before, in order
        if len(self._held_messages) >= _MAX_HELD and self.transport is not None:
            self.transport.pause_reading()
            self._paused_by_gate = True
        if self._held:
            return
        self._held = True
        if self._keepalive_handle is not None:  # the wait is ours, not an idle client's
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        gate.wait(self)
        _check_gate_later(gate, self._loop)

    @property
    def gate(self) -> ActiveRequestGate | None:
        return self._gate

    def admit(self) -> bool:
        """The gate's turn for this connection's request; False if the connection is gone."""
        if not self._held or self.transport is None:
            return False
        self._held = False
        self._messages.extend(self._held_messages)
        self._held_messages.clear()
        if self._paused_by_gate:
            self._paused_by_gate = False
            self.transport.resume_reading()
        self._wake()
        return True

    def leave_gate(self) -> None:
        """This connection's request no longer needs its place (if it holds one)."""
        if self._gate is not None:
            self._gate.leave(self)

    def wait_on_upstream(self) -> None:
        """This connection's request now waits on its upstream: see request_gate.UPSTREAM_HOLD_S."""
        gate = self._gate
        if gate is not None and gate.holds(self):
            gate.upstream_wait(self, self._loop.time())
            _check_gate_later(gate, self._loop)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        self.leave_gate()  # error responses do not pass on_response_prepare
        return await super().finish_response(request, resp, start_time)

    def _is_probe(self, index: int) -> bool:
        message = self._messages[index][0]
        return isinstance(message, RawRequestMessage) and (
            message.path.partition("?")[0] in _PROBE_PATHS
        )

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- request head timer -----------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        starting = False  # the first bytes of a request head are in ``data``
        if data and not (self._close or self._force_close or self._upgraded):
            timing = self._head_timer is not None
            if not timing and (self._body is None or self._body.is_eof()):
                starting = timing = True
                self._head_bytes, self._head_line_len = 0, None
            if timing:
                if self._head_line_len is None and (end := data.find(b"\n")) >= 0:
                    self._head_line_len = self._head_bytes + end
                self._head_bytes += len(data)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a head completed (or failed)
            self._cancel_head_timer()
            self._refuse_http09()
            self._body = self._messages[-1][1] if self._messages else None
        elif starting:
            # The head is still incomplete: time it from now. A head that arrives
            # whole (the usual case) never costs a timer.
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)

    def _refuse_http09(self) -> None:
        """A request line without a version is a bad request line, never HTTP/0.9.

        aiohttp's C parser (llhttp) takes ``METHOD target`` with no version as an
        HTTP/0.9 request (its Python parser says BadStatusLine); ``CONNECT`` and
        spaces then left the connection open with no answer at all (found by the
        fuzzer). Queued as the parser error it should have been: 400 and close.
        """
        for index, (message, _) in enumerate(self._messages):
            if isinstance(message, RawRequestMessage) and message.version == HttpVersion(0, 9):
                exc = BadStatusLine("request line without an HTTP version")
                self._messages[index] = (_ErrInfo(status=400, exc=exc, message=""), EMPTY_PAYLOAD)
                self._upgraded = False
                self._close = True

    def _start_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes, self._head_line_len = 0, None
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._force_close or self._close or self.transport is None:
            return
        if self._head_bytes == 0:
            self.force_close()  # nothing sent at all: close quietly, as nginx does
            return
        # Queue a 408 like aiohttp queues a parser error; parse nothing more.
        exc = errors.RequestHeadTimeout()
        self._messages.append((_ErrInfo(status=408, exc=exc, message=""), EMPTY_PAYLOAD))
        self._request_count += 1
        self._close = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- errors ----------------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's hook for errors outside a handler's own response: a JSON error."""
        line = self._head_line_len
        in_request_line = line is None or line >= self.max_line_size
        failure = errors.classify_edge(status, exc, in_request_line=in_request_line)
        if failure.status >= 500 and failure.status != 503:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        elif not (self._request_count == 1 and isinstance(exc, BadHttpMethod)):
            # bad input from the internet is routine: one line, no traceback
            log.info(
                "bad request",
                extra={"peer": request.remote, "status": failure.status, "error": failure.error},
            )
        if request.writer.output_size > 0:  # headers already sent: only a close remains
            raise ConnectionError("response already started, cannot send the error")
        response = errors.error_response(failure, request_id_for(request))
        response.force_close()
        return response


def waiting_on_upstream(request: web.BaseRequest) -> None:
    """The proxy handler sent ``request`` upstream and now waits for the answer."""
    protocol = request.protocol
    if isinstance(protocol, EdgeRequestHandler):
        protocol.wait_on_upstream()


async def leave_gate_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a request whose response head goes out leaves the gate."""
    protocol = request.protocol
    if isinstance(protocol, EdgeRequestHandler):
        protocol.leave_gate()


class EdgeServer(Server):
    """aiohttp's protocol factory, making ``EdgeRequestHandler``s."""

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, **self._kwargs)


with warnings.catch_warnings():
    # aiohttp discourages subclassing Application; it is the one place that builds
    # the Server under both AppRunner users (fileproxy serve and gunicorn's worker).
    warnings.simplefilter("ignore", DeprecationWarning)

    class EdgeApplication(web.Application):
        """A web.Application whose server speaks through ``EdgeRequestHandler``."""

        def _make_handler(
            self,
            *,
            loop: asyncio.AbstractEventLoop | None = None,
            access_log_class: type[AbstractAccessLogger] = AccessLogger,
            **kwargs: Any,
        ) -> Server:
            server = super()._make_handler(loop=loop, access_log_class=access_log_class, **kwargs)
            server.__class__ = EdgeServer  # same state, our protocol factory
            return server


__all__ = [
    "EdgeApplication",
    "EdgeRequestHandler",
    "EdgeServer",
    "leave_gate_on_prepare",
    "refuse_what_a_reverse_proxy_must_not_serve",
    "waiting_on_upstream",
]
