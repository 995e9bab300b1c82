"""`fileproxy serve`: one process, uvloop when installed."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from . import logs
from .app import create_app
from .settings import Settings

log = logging.getLogger("fileproxy")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        logging.getLogger("fileproxy").warning("uvloop not installed: using asyncio's event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format, settings.log_dir)
    bind = settings.bind
    web.run_app(
        create_app(settings),
        host=bind.host,
        port=bind.port,
        path=bind.path,
        keepalive_timeout=settings.client_keepalive_timeout,
        shutdown_timeout=settings.graceful_timeout,
        backlog=1024,
        print=None,
        handle_signals=True,
        loop=new_event_loop(),
    )
