"""`fileproxy serve`: one process, uvloop when installed, the same drain as under gunicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import time
from typing import Any

from aiohttp import web

from fileproxy.app import create_app
from fileproxy.app_keys import IN_FLIGHT, LIFECYCLE, LISTEN_SOCKETS
from fileproxy.http.edge import reset
from fileproxy.ops import logs
from fileproxy.runtime import new_event_loop
from fileproxy.settings import BindAddress, Settings
from fileproxy.upstream.tcp_options import apply_to_listeners

log = logging.getLogger("fileproxy")

LISTEN_BACKLOG = 1024
FLUSH_POLL_S = 0.01  # how often the drain looks at the closing connections' write buffers
# aiohttp's own wait for the handlers ends this much after the runner's cut-off, never
# in the same loop iteration: a handler that ends just as that wait times out makes
# aiohttp fail with InvalidStateError ("Unhandled exception") instead of closing
AIOHTTP_WAIT_AFTER_CUT_OFF_S = 1.0


class ListenError(Exception):
    """The daemon cannot listen where FILEPROXY_BIND says (port in use, no such directory...)."""


class DrainingRunner(web.AppRunner):
    """An AppRunner whose cleanup ends once every response's last byte is in the kernel.

    aiohttp closes a connection whose handler has returned with ``transport.close()``,
    which keeps the bytes still in the transport's write buffer (up to
    BUFFER_SIZE when the client reads slower than we write) and sends them
    as the client makes room. But ``AppRunner.cleanup()`` returns as soon as the
    handlers have returned, and the process then closes its event loop and exits
    (``fileproxy serve`` here; aiohttp's gunicorn worker in ``GunicornWebWorker.run``):
    those buffered bytes were dropped, and a download that logged ``cause: ok`` and
    every byte out ended short at the client (issue 12, item 2).

    So cleanup waits, after aiohttp's, until every connection it closed has handed its
    write buffer to the kernel, within what is left of ``shutdown_timeout`` (counted
    from the start of the cleanup, as aiohttp counts the wait for handlers); the kernel
    then sends the rest and the FIN after the process exits. A connection still
    holding bytes at the deadline is aborted (RST), so the client sees a cut, not an
    end. Only public aiohttp names: ``server.connections``, each protocol's
    ``transport``, and the ``shutdown()`` hook that ``cleanup()`` calls after the
    listeners closed.

    The handlers still running at the graceful timeout are cancelled by the runner
    itself (``cut_off``: the proxy handler logs each, cause ``shutdown``). aiohttp's
    own wait would give them the timeout twice (a first wait, then a cancel of the
    request's body only and a second wait), and gunicorn's master, which counts
    from its SIGTERM, would kill the worker before it logged them and removed its
    spool directory.
    """

    def __init__(self, app: web.Application, *, shutdown_timeout: float, **kwargs: Any) -> None:
        super().__init__(
            app, shutdown_timeout=shutdown_timeout + AIOHTTP_WAIT_AFTER_CUT_OFF_S, **kwargs
        )
        self.graceful_timeout = shutdown_timeout
        self.flush_deadline: float | None = None
        self.closing: list[asyncio.Transport] = []
        self.cut_off_timer: asyncio.TimerHandle | None = None

    async def shutdown(self) -> None:
        # cleanup() calls this once the sites stopped (no new connection) and before it
        # waits for the handlers, which close their transports when done.
        loop = asyncio.get_running_loop()
        self.flush_deadline = loop.time() + self.graceful_timeout
        server = self.server
        if server is not None:
            self.closing = [p.transport for p in server.connections if p.transport is not None]
        self.cut_off_timer = loop.call_at(self.flush_deadline, self.cut_off)
        await super().shutdown()

    def cut_off(self) -> None:
        """The graceful timeout ended: cancel the requests still in flight."""
        self.app[LIFECYCLE].cut_off(time.time())
        running = self.app[IN_FLIGHT]
        in_flight = list(running)  # a copy: each handler leaves the set as it ends
        if in_flight:
            log.warning(
                "graceful timeout: cutting the requests still in flight",
                extra={"requests": len(in_flight)},
            )
        for task in in_flight:
            task.cancel()

    async def cleanup(self) -> None:
        try:
            await super().cleanup()
            if self.flush_deadline is not None:
                await flush_transports(self.closing, self.flush_deadline)
        finally:
            if self.cut_off_timer is not None:
                self.cut_off_timer.cancel()
                self.cut_off_timer = None
            self.closing = []


async def flush_transports(transports: list[asyncio.Transport], deadline: float) -> None:
    """Until every transport's write buffer is empty (in the kernel), or ``deadline``
    (loop time): then abort those that still hold bytes."""
    loop = asyncio.get_running_loop()
    pending = [t for t in transports if t.get_write_buffer_size()]
    if pending:
        log.info("draining: sending the last buffered bytes", extra={"connections": len(pending)})
    while pending and loop.time() < deadline:
        await asyncio.sleep(min(FLUSH_POLL_S, max(0.0, deadline - loop.time())))
        pending = [t for t in pending if t.get_write_buffer_size()]
    if pending:
        log.warning(
            "graceful timeout: aborting connections with unsent bytes",
            extra={"connections": len(pending)},
        )
        for transport in pending:
            reset(transport)
    await asyncio.sleep(0)  # let the transports that were emptied close their sockets


def _cause(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def listen_sockets(bind: BindAddress) -> list[socket.socket]:
    """Bound (not yet listening) sockets for ``bind``, as loop.create_server and
    create_unix_server would make them; ListenError names the address and the cause."""
    try:
        if bind.path is not None:
            return [_unix_socket(bind.path)]
        assert bind.host is not None and bind.port is not None
        infos = socket.getaddrinfo(
            bind.host, bind.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ListenError(f"cannot listen on {bind}: {_cause(exc)}") from None
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # as asyncio does: a "::" bind beside "0.0.0.0" must not take IPv4 too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {bind}: {_cause(exc)}") from None
    return sockets


def _unix_socket(path: str) -> socket.socket:
    # a socket file left by a previous run is replaced, as create_unix_server does
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve(settings: Settings) -> None:
    # Bound before the app starts (upstream probe, state store): a port in use stops
    # here with one line. Our own sockets, so the TCP options are applied to exactly
    # what listens, through aiohttp's public SockSite.
    sockets = listen_sockets(settings.bind)
    try:
        await _run(settings, sockets)
    finally:
        for sock in sockets:
            sock.close()


async def _run(settings: Settings, sockets: list[socket.socket]) -> None:
    app = create_app(settings)
    apply_to_listeners(sockets, settings, app[LISTEN_SOCKETS])
    runner = DrainingRunner(
        app,
        keepalive_timeout=settings.client_keepalive_timeout,
        shutdown_timeout=settings.graceful_timeout,
        handle_signals=False,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reopen_log_files)
    try:
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        await stop.wait()
        # Drain: /ready turns 503 while we still accept, then the listener closes and
        # in-flight requests get the graceful timeout, their last bytes included.
        app[LIFECYCLE].start_draining(time.time())
        log.info("draining", extra={"delay_s": settings.drain_delay})
        await asyncio.sleep(settings.drain_delay)
    finally:
        await runner.cleanup()


def reopen_log_files() -> None:
    """SIGHUP (logrotate's ``postrotate kill -HUP``): reopen the log files that were
    moved; nothing else changes and no request is cut."""
    logs.reopen_files()
    log.info("log files reopened (SIGHUP); settings are read at start only")


def serve(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format, settings.log_dir)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(settings))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
