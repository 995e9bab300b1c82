"""Reachability of the configured Redis, watched from a background task.

The pool is sized by ``REDIS_POOL_SIZE``; the shared state store builds on the
same pool. ``/health`` reads the last observation, never Redis itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from yarl import URL

log = logging.getLogger("fileproxy.redis")

PROBE_INTERVAL_S = 2.0
SOCKET_TIMEOUT_S = 1.0


@dataclass
class RedisHealth:
    """Embedded (no Redis configured) or the state of the configured Redis."""

    url: URL | None
    pool_size: int
    state: str = "embedded"  # embedded | unknown | up | down
    since: float = 0.0
    rtt_ms: float | None = None
    last_error: str | None = None
    client: aioredis.Redis | None = None

    @property
    def configured(self) -> bool:
        return self.url is not None

    def open(self) -> None:
        if self.url is None:
            return
        pool = aioredis.ConnectionPool.from_url(
            str(self.url),
            max_connections=self.pool_size,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self._set("unknown")

    def _set(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.since = time.time()
            if state == "down":
                log.warning("redis unreachable", extra={"error": error})
            elif state == "up" and self.state != "unknown":
                log.info("redis reachable again")
        self.state = state
        self.last_error = error

    async def probe(self) -> None:
        assert self.client is not None
        started = time.perf_counter()
        try:
            await self.client.ping()
        except (aioredis.RedisError, OSError) as exc:
            self.rtt_ms = None
            self._set("down", type(exc).__name__)
        else:
            self.rtt_ms = round((time.perf_counter() - started) * 1000, 3)
            self._set("up")

    async def watch(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
