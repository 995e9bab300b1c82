"""The wall around aiohttp's server internals: every one fileproxy uses is here, and only here.

aiohttp 3.14 has no hooks for what the edge (``edge``) does before a request reaches
the application: a head timeout, a connection limit, the active-request gate, JSON
errors for the parser's own failures. ``ServerProtocol`` subclasses aiohttp's
per-connection protocol and gives the edge named operations over its private state;
the edge uses those and nothing private. Each name, why, and what public API would
replace it:

``web_protocol.RequestHandler``
    The protocol class (one client connection) the edge extends. Replacement: a
    protocol factory hook on ``web.Server`` / ``AppRunner``.
``RequestHandler._messages``
    The queue of parsed (message, payload) pairs its task works through: the gate
    holds new ones back until the request may start, the head timeout and HTTP/0.9
    refusal queue an error there as the parser queues its own. Replacement: a hook
    between "request head parsed" and "handler task started".
``RequestHandler._waiter``
    The future that wakes the connection's idle task for the next request. Kept
    unset while ``data_received`` parses (``detach_waiter``), set when the gate admits.
``RequestHandler._request_count``
    Counts parsed heads (and parser errors): how the edge sees that a head completed.
``RequestHandler._close``, ``_force_close``, ``_upgraded``
    Whether the connection is ending (or a tunnel): no head timer then.
``RequestHandler._keepalive_handle``
    The keep-alive timer: a request waiting in the gate is not an idle connection.
``RequestHandler._manager``, ``Server.connections``
    The open connections of this worker (``FILEPROXY_MAX_CONNECTIONS``).
``RequestHandler._request_handler``
    Set to the over-limit answer for a connection beyond the limit, which then never
    reaches the application. Replacement: a reject hook in ``connection_made``.
``RequestHandler._loop``
    The connection's event loop (for timers).
``RequestHandler._pause_reading_for_buffer()``, ``_resume_reading_if_drained()``
    aiohttp's own pause for a buffer the protocol cannot drain yet (its queue of
    pipelined requests uses it): the gate pauses a client through it, so the resume
    re-checks aiohttp's other holds and never resumes a read aiohttp wants paused.
``web_protocol._ErrInfo``, ``streams.EMPTY_PAYLOAD``
    What a parser error looks like in the queue (``handle_error`` then answers it).
``Server._loop``, ``Server._kwargs``
    What ``Server.__call__`` builds each protocol with; ``EdgeServer.__call__``
    builds fileproxy's protocol from the same.
``Application._make_handler``
    Where an ``AppRunner`` (``fileproxy serve`` and gunicorn's aiohttp worker alike)
    gets its ``Server``: the one place to put fileproxy's in. aiohttp 4 removes it;
    replacement: an ``AppRunner`` subclass overriding ``_make_server``, or a public
    factory argument.
``GunicornWebWorker._notify_waiter_done()``
    Wakes aiohttp's gunicorn worker loop at once after ``handle_exit`` (it otherwise
    notices at its next 1 s tick): a drained worker exits when it is done, not up to a
    second later (``wake_worker``). Replacement: none.
``RequestHandler.set_parser()``, ``keep_alive()``, ``eof_received()``, ``_upgraded``
    A WebSocket tunnel (``tunnel_to``, used by ``delivery.tunnel``) takes the client's
    connection after its ``101`` as aiohttp's own ``WebSocketResponse`` does: the bytes
    after the upgrade head go to a parser object of ours instead of the HTTP parser
    (``set_parser``, undocumented), the connection is not kept alive, and the client's
    FIN half-closes it (``eof_received`` keeps the transport open), so the tunnel can
    pass it on and still send the upstream's rest. ``_upgraded``: aiohttp's parser stopped
    at an upgrade request's head (``upgraded``); only such a connection is tunnelled.
    Replacement: a public "take over the connection" API.
``StreamResponse._send_headers_immediately``
    A response whose head goes out with its first body bytes, in one write
    (``send_head_with_body``). Replacement: none; ``web.Response`` does it for
    bodies known in advance.
``aiohttp.http_writer._serialize_headers``
    Every response head goes through it; its C version drops lone surrogates, i.e. each
    byte a backend sent that is not UTF-8 (``filename="caf\xe9.txt"`` reached clients as
    ``caf.txt``). ``keep_header_bytes`` puts the upstream side's ``serialize_head`` in its
    place: the C serializer still runs first (it refuses CR/LF), and only a head with a
    value that is not ASCII is written again with the bytes as they came, as nginx
    relays them. Replacement: none; ``StreamWriter.write_headers`` calls it.

``check()`` verifies them against the installed aiohttp and raises ``AiohttpMoved``
naming what moved; the application calls it at startup, and
tests/unit/test_aiohttp_walls.py runs it.
"""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import http_writer, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger
from aiohttp.worker import GunicornWebWorker

from fileproxy.upstream.aiohttp_client import PINNED, AiohttpMoved, serialize_head

try:
    from aiohttp.streams import EMPTY_PAYLOAD
    from aiohttp.web_protocol import RequestHandler, _ErrInfo
    from aiohttp.web_server import Server
except ImportError as exc:  # pragma: no cover - only with another aiohttp
    raise AiohttpMoved(
        f"aiohttp {aiohttp.__version__}: {exc} (fileproxy.http.aiohttp_server was checked "
        f"against aiohttp {PINNED})"
    ) from exc

RequestFn = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

#: Instance attributes of RequestHandler the protocol reads or writes.
_PROTOCOL_STATE = (
    "_messages",
    "_waiter",
    "_request_count",
    "_close",
    "_force_close",
    "_upgraded",
    "_keepalive_handle",
    "_manager",
    "_request_handler",
    "_loop",
)
_PROTOCOL_METHODS = (
    "_pause_reading_for_buffer",
    "_resume_reading_if_drained",
    "handle_error",
    "set_parser",
    "keep_alive",
    "eof_received",
)


class TunnelInflow(Protocol):
    """Where a tunnelled connection's bytes go (aiohttp's ``set_parser`` interface)."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]: ...

    def feed_eof(self) -> None: ...


class ServerProtocol(RequestHandler):
    """aiohttp's server protocol, its private state behind named operations."""

    _tunnel_inflow: TunnelInflow | None = None

    # --- the queue of parsed requests --------------------------------------------------

    @property
    def queued(self) -> int:
        """Parsed requests waiting for the connection's task."""
        return len(self._messages)

    def take_queued(self, count: int) -> list[Any]:
        """Remove the last ``count`` parsed requests from the queue, in order."""
        taken = [self._messages.pop() for _ in range(count)]
        taken.reverse()
        return taken

    def requeue(self, items: list[Any]) -> None:
        self._messages.extend(items)

    def queued_path(self, index: int) -> str | None:
        """The target of the ``index``-th queued request (None for a queued error)."""
        message = self._messages[index][0]
        return message.path if isinstance(message, aiohttp.http.RawRequestMessage) else None

    def last_queued_body(self) -> aiohttp.StreamReader | None:
        return self._messages[-1][1] if self._messages else None

    def replace_http09(self, make_error: Callable[[], Exception]) -> None:
        """A queued request without an HTTP version becomes a 400 error, and the end."""
        for index, (message, _) in enumerate(self._messages):
            if isinstance(
                message, aiohttp.http.RawRequestMessage
            ) and message.version == aiohttp.HttpVersion(0, 9):
                self._messages[index] = (
                    _ErrInfo(status=400, exc=make_error(), message=""),
                    EMPTY_PAYLOAD,
                )
                self._upgraded = False
                self._close = True

    def queue_error(self, status: int, exc: Exception) -> None:
        """Answer with ``status`` (through ``handle_error``) and parse nothing more."""
        self._messages.append((_ErrInfo(status=status, exc=exc, message=""), EMPTY_PAYLOAD))
        self._request_count += 1
        self._close = True
        self.wake()

    @property
    def heads_parsed(self) -> int:
        """Request heads parsed on this connection (parser errors count too)."""
        count: int = self._request_count
        return count

    # --- the connection's task -------------------------------------------------------

    def wake(self) -> None:
        """Let the connection's idle task take the next queued request."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def detach_waiter(self) -> asyncio.Future[None] | None:
        """Parse without handing new requests to the idle task: the caller decides,
        then gives the waiter back (``attach_waiter``)."""
        waiter: asyncio.Future[None] | None = self._waiter
        self._waiter = None
        return waiter

    def attach_waiter(self, waiter: asyncio.Future[None] | None) -> None:
        self._waiter = waiter

    def stop_keepalive_timer(self) -> None:
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def answer_every_request_with(self, handler: RequestFn) -> None:
        """This connection's requests never reach the application: ``handler`` answers."""
        self._request_handler = handler

    # --- state -------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Ending (after this response, or now) or upgraded to a tunnel."""
        return bool(self._close or self._force_close or self._upgraded)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self._loop
        return loop

    @property
    def worker_connections(self) -> int:
        """Open client connections of this worker (this one included once made)."""
        manager = self._manager
        return len(manager.connections) if manager is not None else 0

    # --- a tunnel (an upgraded connection) ------------------------------------------------

    @property
    def upgraded(self) -> bool:
        """aiohttp's parser stopped at an upgrade request's head: what follows is not HTTP."""
        return bool(self._upgraded)

    def tunnel_to(self, inflow: TunnelInflow) -> None:
        """From now on the client's bytes go to ``inflow``, and its end too (a FIN leaves the
        connection half-open: the tunnel closes it); no request follows on it."""
        self._tunnel_inflow = inflow
        self.set_parser(inflow)  # type: ignore[arg-type]
        self.keep_alive(False)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        inflow = self._tunnel_inflow
        if inflow is None:
            super().eof_received()
            return None
        inflow.feed_eof()
        return True

    # --- reading -----------------------------------------------------------------------

    def hold_reading(self) -> None:
        """Pause reading the client, through aiohttp's own buffer pause."""
        self._pause_reading_for_buffer()

    def release_reading(self) -> None:
        """Resume, unless aiohttp's other reasons to pause still hold."""
        self._resume_reading_if_drained()


class ProtocolServer(Server):
    """aiohttp's protocol factory, building ``protocol_class`` from the same arguments."""

    protocol_class: type[ServerProtocol] = ServerProtocol

    def __call__(self) -> RequestHandler:
        return self.protocol_class(self, loop=self._loop, **self._kwargs)


def application_class(server_class: type[ProtocolServer]) -> type[web.Application]:
    """A ``web.Application`` whose ``AppRunner`` serves through ``server_class``."""
    with warnings.catch_warnings():
        # aiohttp discourages subclassing Application; it is the one place that builds
        # the Server under both AppRunner users (fileproxy serve and gunicorn's worker).
        warnings.simplefilter("ignore", DeprecationWarning)

        class ProtocolApplication(web.Application):
            def _make_handler(
                self,
                *,
                loop: asyncio.AbstractEventLoop | None = None,
                access_log_class: type[AbstractAccessLogger] = AccessLogger,
                **kwargs: Any,
            ) -> Server:
                base = super()._make_handler(loop=loop, access_log_class=access_log_class, **kwargs)
                return server_class(
                    base.request_handler,
                    request_factory=base.request_factory,
                    handler_cancellation=base.handler_cancellation,
                    loop=base._loop,
                    **base._kwargs,
                )

    return ProtocolApplication


def wake_worker(worker: GunicornWebWorker) -> None:
    """Wake aiohttp's gunicorn worker loop now (after ``handle_exit``)."""
    worker._notify_waiter_done()


def keep_header_bytes() -> None:
    """Response heads keep the header bytes a backend sent that are not UTF-8 (idempotent)."""
    http_writer._serialize_headers = serialize_head


def send_head_with_body(response_class: type[web.StreamResponse]) -> None:
    """Responses of ``response_class`` send their head with the first body bytes."""
    response_class._send_headers_immediately = False


def check() -> None:
    """Raise ``AiohttpMoved`` naming every internal above that is missing or changed."""
    problems = []
    loop = asyncio.new_event_loop()
    try:

        async def never(request: web.BaseRequest) -> web.StreamResponse:  # pragma: no cover
            raise NotImplementedError

        server = Server(never, loop=loop)
        for name in ("_loop", "_kwargs", "request_handler", "request_factory"):
            if not hasattr(server, name):
                problems.append(f"Server.{name}")
        protocol = RequestHandler(server, loop=loop)
        problems += [f"RequestHandler.{n}" for n in _PROTOCOL_STATE if not hasattr(protocol, n)]
    finally:
        loop.close()
    problems += [
        f"RequestHandler.{n}()"
        for n in _PROTOCOL_METHODS
        if not callable(getattr(RequestHandler, n, None))
    ]
    if "status" not in inspect.signature(_ErrInfo).parameters:
        problems.append("_ErrInfo(status=...)")
    if not callable(getattr(web.Application, "_make_handler", None)):
        problems.append("Application._make_handler")
    if not callable(getattr(GunicornWebWorker, "_notify_waiter_done", None)):
        problems.append("GunicornWebWorker._notify_waiter_done()")
    if not hasattr(web.StreamResponse, "_send_headers_immediately"):
        problems.append("StreamResponse._send_headers_immediately")
    write_headers = getattr(http_writer.StreamWriter, "write_headers", None)
    uses = getattr(getattr(write_headers, "__code__", None), "co_names", ())
    if not callable(getattr(http_writer, "_serialize_headers", None)) or (
        "_serialize_headers" not in uses
    ):
        problems.append("http_writer._serialize_headers (as StreamWriter.write_headers' global)")
    if problems:
        raise AiohttpMoved(
            f"aiohttp {aiohttp.__version__} moved internals fileproxy relies on "
            f"(checked against {PINNED}): {'; '.join(problems)}"
        )
