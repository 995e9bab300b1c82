"""Typed keys for what the application holds (aiohttp ``web.AppKey``)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from fileproxy.delivery.cache import CacheService
from fileproxy.delivery.spool import SpoolStore
from fileproxy.delivery.tunnel import Tunnels
from fileproxy.lifecycle import Lifecycle
from fileproxy.loop_lag import LoopLag
from fileproxy.runtime import Runtime
from fileproxy.settings import Settings
from fileproxy.state.adaptation import UpstreamAdaptation
from fileproxy.state.link import StoreLink
from fileproxy.state.sync import Fleet
from fileproxy.state.traffic import TrafficStats
from fileproxy.upstream.client import UpstreamClient
from fileproxy.upstream.replicas import ReplicaSet
from fileproxy.upstream.tcp_options import ListenSockets

SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", Runtime)
TRAFFIC = web.AppKey("traffic", TrafficStats)
UPSTREAM = web.AppKey("upstream", UpstreamClient)  # the first replica's
REPLICAS = web.AppKey("replicas", ReplicaSet)
STORE = web.AppKey("store", StoreLink)
FLEET = web.AppKey("fleet", Fleet)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# the proxy handlers running now: the drain cuts those left at the graceful timeout
IN_FLIGHT = web.AppKey[set[asyncio.Task[Any]]]("in_flight")
ADAPTATION = web.AppKey("adaptation", UpstreamAdaptation)  # the first replica's
# every replica's, by name (host:port)
ADAPTATIONS = web.AppKey[dict[str, UpstreamAdaptation]]("adaptations")
LISTEN_SOCKETS = web.AppKey("listen_sockets", ListenSockets)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)
SPOOL = web.AppKey("spool", SpoolStore)
CACHE = web.AppKey("cache", CacheService)  # the disk cache (inactive when off)
TUNNELS = web.AppKey("tunnels", Tunnels)  # open WebSocket tunnels, closed at the drain
