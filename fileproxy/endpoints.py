"""/health and /stats: answered from in-memory snapshots, no I/O, no waiting."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from . import errors
from .app_keys import REDIS, RUNTIME, SETTINGS, TRAFFIC, UPSTREAM
from .settings import redact_url


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def health(request: web.Request) -> web.Response:
    app = request.app
    runtime, settings, redis = app[RUNTIME], app[SETTINGS], app[REDIS]
    upstream, traffic = app[UPSTREAM], app[TRAFFIC]
    now = time.time()
    store: dict[str, Any] = {"kind": "redis" if redis.configured else "embedded"}
    if redis.configured:
        store.update(
            url=redact_url(redis.url) if redis.url else None,
            state=redis.state,
            since=round(redis.since, 3),
            rtt_ms=redis.rtt_ms,
            pool_size=redis.pool_size,
            last_error=redis.last_error,
        )
    degraded = redis.configured and redis.state == "down"
    return _json(
        {
            "status": "degraded" if degraded else "ok",
            "version": runtime.version,
            "pid": runtime.pid,
            "uptime_seconds": round(now - runtime.started_wall, 3),
            "performance_optimization": {
                "uvloop_enabled": runtime.uvloop_enabled,
                "optimizer_enabled": runtime.optimizer_enabled,
                "optimization_level": runtime.optimization_level,
            },
            "config": settings.public_dict(),
            "upstream": {
                "url": redact_url(settings.upstream),
                "name": upstream.name,
                "connections": upstream.pool_size(),
                "last_response_age_s": _age(now, upstream.last_response_at),
                "last_failure_age_s": _age(now, upstream.last_failure_at),
                "last_failure": upstream.last_failure,
            },
            "state_store": store,
            "in_flight": traffic.in_flight,
        }
    )


async def stats(request: web.Request) -> web.Response:
    app = request.app
    runtime, traffic = app[RUNTIME], app[TRAFFIC]
    window = traffic.snapshot(time.monotonic())
    return _json(
        {
            "performance_optimizer": {
                "metrics": {
                    "total_requests": traffic.total_requests,
                    "error_rate": window.error_rate,
                    "avg_response_time_ms": window.avg_response_time_ms,
                    "p95_response_time_ms": window.p95_response_time_ms,
                    "throughput_mbps": window.throughput_mbps,
                    "uvloop_enabled": runtime.uvloop_enabled,
                    **asdict(window),
                    "total_errors": traffic.total_errors,
                    "total_bytes_sent": traffic.total_bytes_out,
                    "total_bytes_received": traffic.total_bytes_in,
                    "client_aborts": traffic.by_cause.get(errors.CLIENT_ABORT, 0),
                    "in_flight": traffic.in_flight,
                },
                "current_rate_limit": None,  # no admission limiter yet: nothing is limited
                "optimization_level": runtime.optimization_level,
            },
            "scope": "worker",
            "pid": runtime.pid,
        }
    )


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 3)
