"""The edge: aiohttp's per-connection HTTP protocol, hardened for the internet.

aiohttp 3.14 has no hooks for three things a reverse proxy needs before a request
reaches the application, so ``EdgeRequestHandler`` extends aiohttp's protocol
through the named operations of ``aiohttp_server`` (the wall: nothing private of
aiohttp's is touched here):

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

and it is a ``gate.GatedProtocol``: at most ``FILEPROXY_ACTIVE_REQUESTS`` requests
per worker are worked on at once (see ``gate``).

``EdgeApplication`` puts this in place wherever an ``AppRunner`` is built from the
app (``fileproxy serve`` and gunicorn's aiohttp worker alike); the settings come
in through ``handler_args`` (see ``app.server_options``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine

from fileproxy.adaptive.send_watch import SendWatch
from fileproxy.http import errors
from fileproxy.http.aiohttp_server import ProtocolServer, application_class
from fileproxy.http.gate import GATE_MEMBER, ActiveRequestGate, GatedProtocol
from fileproxy.http.headers import request_id_for
from fileproxy.http.target import path_problem

log = logging.getLogger("fileproxy.http.edge")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refuse_what_a_reverse_proxy_must_not_serve(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """CONNECT, TRACE, HTTP versions other than 1.x, targets nginx refuses (a path that does
    not decode, ``target.path_problem``) and targets no route takes: JSON errors.

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
    elif (problem := path_problem(request.raw_path)) is not None:
        failure = errors.Failure(400, "bad_target", problem)  # what nginx refuses (see target)
    if failure is None:
        protocol = request.protocol
        if isinstance(protocol, GatedProtocol) and protocol.gate is not None:
            request[GATE_MEMBER] = protocol
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


def _gate_of(manager: ProtocolServer, limit: int) -> ActiveRequestGate | None:
    """The worker's one gate (kept on its server), or None when unlimited."""
    if not limit:
        return None
    gate: ActiveRequestGate | None = getattr(manager, "fileproxy_gate", None)
    if gate is None:
        gate = ActiveRequestGate(limit)
        manager.fileproxy_gate = gate  # type: ignore[attr-defined]
    return gate


class EdgeRequestHandler(GatedProtocol):
    """One client connection: aiohttp's protocol plus head timeout, limits and JSON errors."""

    def __init__(
        self,
        manager: ProtocolServer,
        *,
        client_header_timeout: float,
        max_connections: int,
        active_requests: int = 0,
        send_timeout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, gate=_gate_of(manager, active_requests), **kwargs)
        self._send_watch = SendWatch(send_timeout) if send_timeout > 0 else None
        self._send_timer: asyncio.TimerHandle | None = None
        self.send_timed_out = False  # aborted: the client took no bytes for send_timeout
        self._head_timeout = client_header_timeout
        self._max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the request head in progress
        self._head_line_len: int | None = None  # length of its request line, once complete
        self._body: StreamReader | None = None  # body of the last parsed request

    # --- connection limit -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.worker_connections >= self._max_connections:
            self.answer_every_request_with(_reject_over_limit)
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._body = None
        super().connection_lost(exc)

    # --- request head timer -----------------------------------------------------------

    def received(self, data: bytes) -> None:
        starting = False  # the first bytes of a request head are in ``data``
        if data and not self.closing:
            timing = self._head_timer is not None
            if not timing and (self._body is None or self._body.is_eof()):
                starting = timing = True
                self._head_bytes, self._head_line_len = 0, None
            if timing:
                if self._head_line_len is None and (end := data.find(b"\n")) >= 0:
                    self._head_line_len = self._head_bytes + end
                self._head_bytes += len(data)
        count = self.heads_parsed
        super().received(data)
        if self.heads_parsed != count:  # a head completed (or failed)
            self._cancel_head_timer()
            # A request line without a version is a bad request line, never HTTP/0.9:
            # aiohttp's C parser (llhttp) takes ``METHOD target`` with no version as an
            # HTTP/0.9 request (its Python parser says BadStatusLine); ``CONNECT`` and
            # spaces then left the connection open with no answer at all (found by the
            # fuzzer). Queued as the parser error it should have been: 400 and close.
            self.replace_http09(lambda: BadStatusLine("request line without an HTTP version"))
            self._body = self.last_queued_body()
        elif starting:
            # The head is still incomplete: time it from now. A head that arrives
            # whole (the usual case) never costs a timer.
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _start_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes, self._head_line_len = 0, None
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.closing or self.transport is None:
            return
        if self._head_bytes == 0:
            self.force_close()  # nothing sent at all: close quietly, as nginx does
            return
        self.queue_error(408, errors.RequestHeadTimeout())  # as aiohttp queues a parser error

    # --- send timeout (nginx's send_timeout) -------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self.watch_sending()  # a write now waits for the client

    def watch_sending(self) -> None:
        """Bytes may wait for the client: abort it should it take none for send_timeout."""
        watch, transport = self._send_watch, self.transport
        if watch is None or transport is None or self._send_timer is not None:
            return
        now = self.loop.time()
        due = watch.start(now, transport.get_write_buffer_size())
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

    # --- errors ----------------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's hook for errors outside a handler's own response: a JSON error."""
        self.leave_gate()  # an error answered here never passes on_response_prepare
        line = self._head_line_len
        in_request_line = line is None or line >= self.max_line_size
        failure = errors.classify_edge(status, exc, in_request_line=in_request_line)
        if failure.status >= 500 and failure.status != 503:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        elif not (self.heads_parsed == 1 and isinstance(exc, BadHttpMethod)):
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


def watch_sending(request: web.BaseRequest) -> None:
    """Bytes of ``request``'s response may still wait for its client (a response that
    ended with its tail buffered): the send timeout watches them."""
    protocol = request.protocol
    if isinstance(protocol, EdgeRequestHandler):
        protocol.watch_sending()


def send_timed_out(request: web.BaseRequest) -> bool:
    """Whether ``request``'s connection was aborted for taking no bytes (send timeout)."""
    protocol = request.protocol
    return isinstance(protocol, EdgeRequestHandler) and protocol.send_timed_out


def abort_send_timed_out(request: web.BaseRequest) -> None:
    """Abort ``request``'s client, which took no bytes for the send timeout as another
    watcher saw it (sendfile's, whose bytes wait in the kernel, not the transport)."""
    protocol = request.protocol
    if isinstance(protocol, EdgeRequestHandler):
        protocol.send_timed_out = True
    if request.transport is not None:
        reset(request.transport)


def end_cut_short(transport: asyncio.Transport, framed: bool) -> None:
    """End a connection whose response body was cut short. Where the framing says how long
    the body is (``framed``: Content-Length, chunked), a close: the kernel sends what it
    holds, then a FIN, and the client sees a short body (curl: "partial file") with every
    byte sent. Where the body ends at the connection's end (HTTP/1.0 without a length), a
    reset: a FIN would make the cut body look complete."""
    if framed:
        transport.abort()
    else:
        reset(transport)


def reset(transport: asyncio.Transport) -> None:
    """Abort with a RST: a plain abort() closes the socket, and the kernel would send
    what it holds and a FIN, an end the client could take for the body's."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class EdgeServer(ProtocolServer):
    """aiohttp's protocol factory, making ``EdgeRequestHandler``s."""

    protocol_class = EdgeRequestHandler


EdgeApplication = application_class(EdgeServer)

__all__ = [
    "EdgeApplication",
    "EdgeRequestHandler",
    "EdgeServer",
    "abort_send_timed_out",
    "refuse_what_a_reverse_proxy_must_not_serve",
    "reset",
    "send_timed_out",
    "watch_sending",
]
