"""The aiohttp application: routes, lifecycle and server options, built from Settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from . import endpoints, logs
from .app_keys import REDIS, RUNTIME, SETTINGS, TRAFFIC, UPSTREAM
from .proxy_handler import proxy
from .redis_health import RedisHealth
from .runtime import Runtime, uvloop_active
from .settings import Settings
from .traffic_stats import TrafficStats
from .upstream_client import UpstreamClient

log = logging.getLogger("fileproxy")

RESERVED_PATHS = ("/health", "/stats")


def server_options(settings: Settings) -> dict[str, Any]:
    """Options of aiohttp's HTTP server, the same under `fileproxy serve` and gunicorn."""
    return {
        # a client that goes away cancels its handler at once (idle SSE streams too)
        "handler_cancellation": True,
        "auto_decompress": False,  # request bodies pass through as sent
        "read_bufsize": settings.buffer_size,  # upload buffer before the client is paused
        "max_line_size": settings.max_header_size,
        "max_field_size": settings.max_header_size,
        "access_log_class": logs.AccessLogger,
        "access_log": logging.getLogger(logs.ACCESS_LOGGER) if settings.access_log else None,
    }


def create_app(settings: Settings) -> web.Application:
    app = web.Application(handler_args=server_options(settings))
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/health", endpoints.health)
    app.router.add_get("/stats", endpoints.stats)
    app.router.add_route("*", "/{target:.*}", proxy)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[RUNTIME] = Runtime(uvloop_enabled=uvloop_active(), optimizer_enabled=False)
    app[TRAFFIC] = TrafficStats(settings.stats_window, time.monotonic())
    app[UPSTREAM] = upstream = UpstreamClient(settings)
    app[REDIS] = redis = RedisHealth(settings.redis_url, settings.redis_pool_size)
    redis.open()
    watcher = asyncio.create_task(redis.watch()) if redis.configured else None
    log.info(
        "fileproxy worker started",
        extra={
            "bind": str(settings.bind),
            "upstream": app[UPSTREAM].name,
            "uvloop": app[RUNTIME].uvloop_enabled,
            "state_store": "redis" if redis.configured else "embedded",
        },
    )
    try:
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await upstream.close()
        await redis.close()


async def gunicorn_app() -> web.Application:
    """The app gunicorn's aiohttp worker runs (`gunicorn -c gunicorn.conf.py`)."""
    settings = Settings.from_env()  # already validated by gunicorn.conf.py
    logs.configure(settings.log_level, settings.log_format, settings.log_dir)
    return create_app(settings)
