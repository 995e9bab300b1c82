"""`fileproxy serve`: one process, uvloop when installed, the same drain as under gunicorn."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from fileproxy.app import create_app
from fileproxy.app_keys import LIFECYCLE, LISTEN_SOCKETS
from fileproxy.ops import logs
from fileproxy.runtime import new_event_loop
from fileproxy.settings import Settings
from fileproxy.upstream.tcp_options import apply_to_listeners

log = logging.getLogger("fileproxy")


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        keepalive_timeout=settings.client_keepalive_timeout,
        shutdown_timeout=settings.graceful_timeout,
        handle_signals=False,
    )
    await runner.setup()
    bind = settings.bind
    site: web.BaseSite
    if bind.path is not None:
        site = web.UnixSite(runner, bind.path, backlog=1024)
    else:
        site = web.TCPSite(runner, bind.host, bind.port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await site.start()
        server = getattr(site, "_server", None)
        listeners = list(server.sockets) if server is not None else []
        apply_to_listeners(listeners, settings, app[LISTEN_SOCKETS])
        await stop.wait()
        # Drain: /ready turns 503 while we still accept, then the listener closes and
        # in-flight requests get the graceful timeout.
        app[LIFECYCLE].start_draining(time.time())
        log.info("draining", extra={"delay_s": settings.drain_delay})
        await asyncio.sleep(settings.drain_delay)
    finally:
        await runner.cleanup()


def serve(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format, settings.log_dir)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(settings))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
