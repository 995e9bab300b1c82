"""/health, /ready, /stats, /metrics: answered from in-memory snapshots, no I/O, no waiting.

/health and /ready are open to all; /stats and /metrics only to peers in
FILEPROXY_ADMIN_ALLOW or requests bearing FILEPROXY_ADMIN_TOKEN.
"""

from __future__ import annotations

import hmac
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from fileproxy.app_keys import (
    ADAPTATION,
    ADAPTATIONS,
    CACHE,
    FLEET,
    LIFECYCLE,
    LISTEN_SOCKETS,
    LOOP_LAG,
    REPLICAS,
    RUNTIME,
    SETTINGS,
    SPOOL,
    STORE,
    TRAFFIC,
    TUNNELS,
    UPSTREAM,
)
from fileproxy.delivery.cache import CacheService
from fileproxy.http import errors, gate
from fileproxy.http.data_plane import ClientRequest
from fileproxy.http.headers import is_trusted, request_id_for
from fileproxy.http.proxy_handler import on_unix_socket
from fileproxy.ops import metrics
from fileproxy.settings import redact_url
from fileproxy.upstream.tcp_options import read_back

Handler = Callable[[ClientRequest], Awaitable[web.Response]]


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def health(request: ClientRequest) -> web.Response:
    app = request.app
    runtime, settings, link = app[RUNTIME], app[SETTINGS], app[STORE]
    upstream, traffic = app[UPSTREAM], app[TRAFFIC]
    now = time.time()
    store: dict[str, Any] = {
        "kind": "redis" if link.shared else "embedded",
        "scope": link.store.scope,
        "state": link.state,
    }
    if link.shared:
        store.update(
            url=redact_url(settings.redis_url) if settings.redis_url else None,
            cluster=settings.redis_cluster,
            since=round(link.since, 3),
            rtt_ms=link.rtt_ms,
            pool_size=settings.redis_pool_size,
            last_error=link.last_error,
            limiter=app[ADAPTATION].limiter_mode,
        )
    degraded = link.state == "down"
    replicas = app[REPLICAS]
    ready, reason = app[LIFECYCLE].readiness(now, replicas.last_answer_at(time.monotonic()))
    return _json(
        {
            "status": "degraded" if degraded else "ok",
            "ready": ready,
            "ready_reason": reason,
            "version": runtime.version,
            "pid": runtime.pid,
            "uptime_seconds": round(now - runtime.started_wall, 3),
            "performance_optimization": {
                "uvloop_enabled": runtime.uvloop_enabled,
                "optimizer_enabled": runtime.optimizer_enabled,
                "optimization_level": runtime.optimization_level,
                "optimization_score": runtime.optimization_score,
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
            # every replica of FILEPROXY_UPSTREAM: healthy, slow_start, probing or ejected
            "upstreams": replicas.report(),
            "state_store": store,
            "in_flight": traffic.in_flight,
            "active_requests": gate.report(request.protocol.gate),
            "event_loop": _loop_report(app),
            "spool": app[SPOOL].report(),
            "cache": cache_health(app[CACHE]),
            "tcp": _tcp_report(request),
        }
    )


def cache_health(cache: CacheService) -> dict[str, Any]:
    """The cache's part of /health: on, off or unavailable (and why), its directory, and
    what it holds as last counted (no I/O)."""
    report = cache.snapshot()
    keys = ("state", "dir", "error", "objects", "bytes_on_disk", "max_size", "free_bytes",
            "fills_in_progress")  # fmt: skip
    return {key: report[key] for key in keys if key in report}


def _loop_report(app: web.Application) -> dict[str, float]:
    """How late this worker's event loop runs (loop_lag): every request waits as long."""
    lag = app[LOOP_LAG]
    return {
        "lag_ms": round(lag.last_s * 1000, 3),
        "lag_max_ms": round(lag.max_s(time.monotonic()) * 1000, 3),
        "lag_window_s": lag.window_s,
    }


async def stats(request: ClientRequest) -> web.Response:
    """The fleet's figures (scope ``cluster``) while its view is fresh, else this worker's."""
    app = request.app
    runtime, traffic, adaptation = app[RUNTIME], app[TRAFFIC], app[ADAPTATION]
    now = time.monotonic()
    fleet = app[FLEET].fresh(now) if app[STORE].shared else None
    adaptations, replicas = app[ADAPTATIONS], app[REPLICAS]
    if fleet is not None:
        counters, window = fleet.totals(), fleet.window()
        rejected = sum(fleet.rejected(name) for name in adaptations)
    else:
        counters, window = traffic.counters(), traffic.window_parts(now)
        rejected = sum(a.rejected for a in adaptations.values())
    level = adaptation.current_level()
    body: dict[str, Any] = {
        "performance_optimizer": {
            "metrics": {
                "total_requests": counters.requests,
                # error_rate, avg/p95_response_time_ms, throughput_mbps and more
                **asdict(window.summary()),
                "uvloop_enabled": runtime.uvloop_enabled,
                "total_errors": counters.errors,
                "total_bytes_sent": counters.bytes_out,
                "total_bytes_received": counters.bytes_in,
                "client_aborts": counters.by_cause.get(errors.CLIENT_ABORT, 0),
                "rate_limited": rejected,
                "in_flight": counters.in_flight,
            },
            "current_rate_limit": adaptation.current_limit,
            "optimization_level": runtime.optimization_level,
            "optimization_score": runtime.optimization_score,
            "quality_level": level.value if level is not None else None,
        },
        "upstreams": {
            replica.name: {
                **adaptations[replica.name].snapshot(),
                "replica": replicas.snapshot(now, time.time(), replica),
            }
            for replica in replicas.replicas
        },
        # this worker's clients slower than their upstream, served from a spool right now
        "slow_clients": {
            "spooled_now": app[SPOOL].active,
            "spooled_total": app[SPOOL].responses_spooled,
            "quality_level": level.value if level is not None else None,
        },
        # the disk cache of this worker (requests, bytes) and of the directory (disk use)
        "cache": app[CACHE].snapshot(),
        # this worker's WebSocket tunnels: open now, and since start
        "tunnels": {"open": len(app[TUNNELS].open), "total": app[TUNNELS].total},
        "retries": {
            "granted": replicas.budget.granted,
            "refused_by_budget": replicas.budget.refused,
            "refused_by_throttle": replicas.budget.throttled,
            "throttle_tokens": round(replicas.budget.throttle.tokens, 3),
            "in_progress": replicas.budget.active,
        },
        "resumes": dict(replicas.resumes),
        "scope": "cluster" if fleet is not None else "worker",
        "pid": runtime.pid,
    }
    if fleet is not None:
        body["live_workers"] = fleet.live_workers
        body["instances"] = fleet.instances()
    elif app[STORE].shared:
        body["scope_reason"] = "the state store is unreachable: this worker's figures only"
    return _json(body)


def _tcp_report(request: ClientRequest) -> dict[str, Any]:
    """Options asked for, what the kernel refused, and what real sockets report."""
    app = request.app
    upstream = app[UPSTREAM]
    transport = request.transport
    client_sock = transport.get_extra_info("socket") if transport is not None else None
    tcp_families = (socket.AF_INET, socket.AF_INET6)
    client = None
    if client_sock is not None and client_sock.family in tcp_families:
        client = read_back(client_sock, upstream.socket_options)
    return {
        "options": {option.name: option.value for option in upstream.socket_options},
        "listen_refused": app[LISTEN_SOCKETS].refused,
        "upstream_refused": sorted(upstream.refused_options),
        "client_socket": client,
        "upstream_socket": upstream.idle_socket_options(),
    }


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 3)


async def ready(request: ClientRequest) -> web.Response:
    app = request.app
    replicas = app[REPLICAS]
    is_ready, reason = app[LIFECYCLE].readiness(
        time.time(), replicas.last_answer_at(time.monotonic())
    )
    body: dict[str, Any] = {"ready": is_ready, "reason": reason}
    if len(replicas.replicas) > 1:
        body["upstreams"] = {
            name: {"state": state["state"], "usable": state["usable"]}
            for name, state in replicas.report().items()
        }
    return _json(body, status=200 if is_ready else 503)


async def purge(request: ClientRequest) -> web.Response:
    """``PURGE <target>`` (operators only): every stored variant of the target is removed;
    readers already sending it finish."""
    removed = await request.app[CACHE].purge(request.raw_path)
    return _json({"purged": removed, "target": request.raw_path})


async def prometheus_metrics(request: ClientRequest) -> web.Response:
    return web.Response(
        body=metrics.render(request.app),
        headers={"Content-Type": metrics.CONTENT_TYPE, "Cache-Control": "no-store"},
    )


def admin_only(handler: Handler) -> Handler:
    """Open to FILEPROXY_ADMIN_ALLOW peers or a matching bearer token; 403 JSON otherwise."""

    async def guarded(request: ClientRequest) -> web.Response:
        settings = request.app[SETTINGS]
        local = on_unix_socket(request)
        if is_trusted(request.remote, settings.admin_allow, local_socket=local) or _token_ok(
            request, settings.admin_token
        ):
            return await handler(request)
        failure = errors.Failure(403, "forbidden", "this endpoint is for operators only")
        return errors.error_response(failure, request_id_for(request))

    return guarded


def _token_ok(request: ClientRequest, token: str) -> bool:
    if not token:
        return False
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip(), token)
