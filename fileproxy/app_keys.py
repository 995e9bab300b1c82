"""Typed keys for what the application holds (aiohttp ``web.AppKey``)."""

from __future__ import annotations

from aiohttp import web

from .adaptation import UpstreamAdaptation
from .lifecycle import Lifecycle
from .loop_lag import LoopLag
from .runtime import Runtime
from .settings import Settings
from .spool import SpoolStore
from .state_sync import Fleet
from .store_link import StoreLink
from .tcp_options import ListenSockets
from .traffic_stats import TrafficStats
from .upstream_client import UpstreamClient

SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", Runtime)
TRAFFIC = web.AppKey("traffic", TrafficStats)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
STORE = web.AppKey("store", StoreLink)
FLEET = web.AppKey("fleet", Fleet)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
ADAPTATION = web.AppKey("adaptation", UpstreamAdaptation)
LISTEN_SOCKETS = web.AppKey("listen_sockets", ListenSockets)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)
SPOOL = web.AppKey("spool", SpoolStore)
