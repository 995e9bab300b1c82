"""The aiohttp application: routes, lifecycle and server options, built from Settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from fileproxy import loop_lag
from fileproxy.app_keys import (
    ADAPTATION,
    ADAPTATIONS,
    CACHE,
    FLEET,
    IN_FLIGHT,
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
from fileproxy.delivery.spool import SpoolStore
from fileproxy.delivery.tunnel import Tunnels
from fileproxy.http import access_log as access_logs
from fileproxy.http import aiohttp_server, errors
from fileproxy.http.cors import Cors
from fileproxy.http.data_plane import ClientRequest, ClientResponse, DataPlane, Handler
from fileproxy.http.headers import request_id_for
from fileproxy.http.proxy_handler import proxy
from fileproxy.lifecycle import UPSTREAM_PROBE_INTERVAL_S, Lifecycle
from fileproxy.loop_lag import LoopLag
from fileproxy.ops import endpoints, logs
from fileproxy.runtime import Runtime, uvloop_active
from fileproxy.settings import Settings
from fileproxy.state import sync as state_sync
from fileproxy.state.adaptation import UpstreamAdaptation
from fileproxy.state.link import StoreLink
from fileproxy.state.redis_store import RedisStore
from fileproxy.state.store import EmbeddedStore, StateStore
from fileproxy.state.sync import Fleet, instance_name
from fileproxy.state.traffic import TrafficStats
from fileproxy.upstream import aiohttp_client, tls
from fileproxy.upstream.client import UpstreamClient
from fileproxy.upstream.replicas import Replica, ReplicaSet
from fileproxy.upstream.tcp_options import ListenSockets

log = logging.getLogger("fileproxy")

STOP_TIMEOUT_S = 2.0  # closing the state store's connections at exit


def create_app(
    settings: Settings, instance_pid: int | None = None, workers: int = 1
) -> web.Application:
    """``instance_pid``: the process that stands for this instance (gunicorn's master);
    ``workers``: how many workers it runs.

    Raises ``AiohttpMoved`` when the installed aiohttp lacks an internal the walls use.
    """
    aiohttp_client.check()
    aiohttp_server.check()
    app = aiohttp_server.application_class(data_plane_factory)()
    app[SETTINGS] = settings
    app[LIFECYCLE] = Lifecycle()
    app[IN_FLIGHT] = set()
    app[LISTEN_SOCKETS] = ListenSockets()
    app[FLEET] = Fleet(
        worker=instance_name(os.getpid()),
        instance=instance_name(instance_pid or os.getpid()),
        local_workers=workers,
    )
    app[TUNNELS] = tunnels = Tunnels()
    app.on_shutdown.append(tunnels.end_all)  # the drain begins: tunnels close, never wait
    app.cleanup_ctx.append(_lifecycle)
    return app


def data_plane_factory(
    app: web.Application, loop: asyncio.AbstractEventLoop, runner_options: dict[str, Any]
) -> DataPlane:
    """The protocol factory every listener of this worker serves with (what an
    ``AppRunner`` builds from the app, under ``fileproxy serve`` and gunicorn alike)."""
    settings = app[SETTINGS]
    cors = Cors(settings.cors_origins) if settings.cors_origins else None
    return DataPlane(
        app,
        _dispatcher(settings, cors),
        loop=loop,
        header_timeout=settings.client_header_timeout,
        keepalive_timeout=runner_options.get("keepalive_timeout", 75.0),
        max_connections=settings.max_connections,
        active_requests=settings.active_requests,
        send_timeout=settings.send_timeout,
        max_header_size=settings.max_header_size,
        read_bufsize=settings.buffer_size,  # upload buffer before the client is paused
        access_log=settings.access_log,
        cors=cors,
    )


def _dispatcher(settings: Settings, cors: Cors | None) -> Handler:
    """Who answers a request: a control endpoint (GET or HEAD of its path), PURGE, a CORS
    preflight (``cors``: FILEPROXY_CORS_ORIGINS, the same the data plane adds to
    responses), or the proxy."""
    control: dict[str, Handler] = {
        "/health": endpoints.health,
        "/ready": endpoints.ready,
        "/stats": endpoints.admin_only(endpoints.stats),
        "/metrics": endpoints.admin_only(endpoints.prometheus_metrics),
    }
    purge = endpoints.admin_only(endpoints.purge)

    async def dispatch(request: ClientRequest) -> ClientResponse | web.Response:
        if request.method in ("GET", "HEAD") and (endpoint := control.get(request.path)):
            return await endpoint(request)
        if request.method == "PURGE" and settings.cache:  # off: relayed, as before the cache
            return await purge(request)
        if cors is not None and cors.is_preflight(request.method, request.headers):
            status, headers = cors.preflight(request.headers)
            if status == 200:
                return web.Response(status=200, headers=headers)
            failure = errors.Failure(403, "forbidden", "CORS preflight refused")
            return errors.error_response(failure, request_id_for(request))
        return await proxy(request)

    return dispatch


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[RUNTIME] = runtime = Runtime(
        uvloop_enabled=uvloop_active(), optimizer_enabled=settings.optimizer
    )
    app[TRAFFIC] = traffic = TrafficStats(settings.stats_window, time.monotonic())
    store: StateStore = RedisStore(settings) if settings.redis_url else EmbeddedStore()
    app[STORE] = link = StoreLink(store)
    adaptations = [
        UpstreamAdaptation(settings, spec.name, link, local_workers=app[FLEET].local_workers)
        for spec in settings.upstreams
    ]
    clients = [
        UpstreamClient(settings, on_connect=adaptation.observe_connect, replica=spec)
        for adaptation, spec in zip(adaptations, settings.upstreams, strict=True)
    ]
    app[ADAPTATIONS] = {adaptation.name: adaptation for adaptation in adaptations}
    app[REPLICAS] = ReplicaSet(settings, clients)
    app[ADAPTATION], app[UPSTREAM] = adaptations[0], clients[0]
    app[LOOP_LAG] = lag = LoopLag()
    app[SPOOL] = spool_store = SpoolStore(settings, workers=app[FLEET].local_workers)
    spool_store.open()
    app[CACHE] = cache = CacheService(settings)
    await cache.open()  # a directory it cannot use: the cache stays off, /health says why
    tasks = [
        asyncio.create_task(loop_lag.watch(lag)),
        asyncio.create_task(_watch_upstream(app)),
        *([asyncio.create_task(_check_health(app))] if settings.health_path else []),
        *([asyncio.create_task(_share_ejections(app))] if len(clients) > 1 else []),
        asyncio.create_task(
            state_sync.run(
                link, app[FLEET], adaptations, traffic, runtime.pid, runtime.started_wall
            )
        ),
    ]
    unverified = tls.unverified_warning(settings)
    if unverified is not None:
        log.warning(unverified)
    log.info(
        "fileproxy worker started",
        extra={
            "bind": str(settings.bind),
            "upstream": ",".join(client.name for client in clients),
            "uvloop": runtime.uvloop_enabled,
            "state_store": store.description,
        },
    )
    try:
        yield
    finally:
        await _stop(tasks)
        await cache.close()  # before the upstream clients: running fills pause, kept
        for client in clients:
            await client.close()
        spool_store.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await store.close()
        # the buffered access lines, written before the worker exits (a line logged
        # even later is written at exit, see access_log)
        access_logs.ACCESS.close()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the background tasks until they have ended.

    One cancel() is not always enough: a cancellation that lands as a timeout inside
    a Redis call expires can come back as that timeout, which the sync loop takes
    for a Redis failure and carries on. Seen as gunicorn workers that never exited
    after a stop with Redis killed and restarted under load.
    """
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


async def _watch_upstream(app: web.Application) -> None:
    """Probe each replica with a TCP connect when no response came lately (for /ready)."""
    replicas, lifecycle = app[REPLICAS], app[LIFECYCLE]
    timeout = min(app[SETTINGS].connect_timeout, UPSTREAM_PROBE_INTERVAL_S)

    async def probe(replica: Replica) -> None:
        if not lifecycle.probe_due(time.time(), replica.client.last_response_at):
            return
        ok = await replica.client.probe(timeout)
        if ok:
            replica.last_probe_ok_at = time.time()
        else:
            replica.last_probe_failed_at = time.time()
        if replica is replicas.first:
            lifecycle.record_probe(time.time(), ok)

    while True:
        await asyncio.gather(*(probe(replica) for replica in replicas.replicas))
        await asyncio.sleep(UPSTREAM_PROBE_INTERVAL_S)


EJECTION_SHARE_INTERVAL_S = 0.25


async def _share_ejections(app: web.Application) -> None:
    """Outlier ejections go round the fleet: this worker's ride on its report to the
    state store (about once a second, ``state.sync``), and an ejection another worker
    reported is taken over here, so one worker's discovery protects every worker
    within about a second (embedded store: each worker alone)."""
    replicas, adaptations = app[REPLICAS], app[ADAPTATIONS]
    while True:
        now, wall = time.monotonic(), time.time()
        for replica in replicas.replicas:
            adaptation = adaptations[replica.name]
            adaptation.ejection = replicas.ejection(now, wall, replica)
            shared = adaptation.fleet_ejection
            if shared is not None and adaptation.ejection is None:
                replicas.adopt(now, wall, replica, *shared)
        await asyncio.sleep(EJECTION_SHARE_INTERVAL_S)


async def _check_health(app: web.Application) -> None:
    """FILEPROXY_HEALTH_PATH: GET it from every replica each interval (active checks)."""
    settings, replicas = app[SETTINGS], app[REPLICAS]

    async def check(replica: Replica) -> str | None:
        client = replica.client
        headers = CIMultiDict({"User-Agent": "fileproxy-health-check"})
        if client.authorization is not None:
            headers["Authorization"] = client.authorization
        try:
            async with asyncio.timeout(settings.health_timeout):
                response = await client.send(
                    "GET",
                    settings.health_path,
                    headers,
                    None,
                    connect_timeout=settings.health_timeout,
                    read_timeout=settings.health_timeout,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return type(exc).__name__
        response.close()  # the head is the answer; the connection is not reused
        return None if response.status < 400 else f"status {response.status}"

    while True:
        results = await asyncio.gather(*(check(r) for r in replicas.replicas))
        for replica, failure in zip(replicas.replicas, results, strict=True):
            replicas.checked(time.monotonic(), time.time(), replica, failure)
        await asyncio.sleep(settings.health_interval)


async def gunicorn_app() -> web.Application:
    """The app gunicorn's aiohttp worker runs (`gunicorn -c gunicorn.conf.py`)."""
    settings = Settings.from_env()  # already validated by gunicorn.conf.py
    logs.configure(settings.log_level, settings.log_format, settings.log_dir)
    # gunicorn's master stands for the instance
    return create_app(settings, instance_pid=os.getppid(), workers=settings.workers)
