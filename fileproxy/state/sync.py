"""Every worker's background task: keep the shared state in step and report to the fleet.

About ten times a second the adaptation ticks the store (its counts into the fleet's
window; the decision when the window is leased to it); once a second the worker
publishes its ``WorkerReport`` and gets every fresh report back, which becomes the
``FleetView`` that /stats and /metrics read (the handlers themselves never wait on
the store) and from which every worker takes the same quality level.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from fileproxy.state.adaptation import UpstreamAdaptation
from fileproxy.state.fleet import FleetView, WorkerReport
from fileproxy.state.link import StoreLink
from fileproxy.state.store import Report, StoreError
from fileproxy.state.traffic import TrafficStats

log = logging.getLogger("fileproxy.state")

SYNC_INTERVAL_S = 0.1
REPORT_INTERVAL_S = 1.0
#: /stats shows the fleet while its view is at most this old, else this worker alone.
FLEET_VIEW_MAX_AGE_S = 3.0


def instance_name(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


@dataclass
class Fleet:
    """The latest view of the fleet, as this worker received it."""

    worker: str
    instance: str
    local_workers: int = 1  # workers of this instance
    view: FleetView | None = None
    received: float | None = None  # monotonic

    def fresh(self, now: float) -> FleetView | None:
        if self.view is None or self.received is None:
            return None
        return self.view if now - self.received <= FLEET_VIEW_MAX_AGE_S else None


def worker_report(
    fleet: Fleet,
    pid: int,
    started: float,
    traffic: TrafficStats,
    adaptations: Sequence[UpstreamAdaptation],
) -> WorkerReport:
    return WorkerReport(
        worker=fleet.worker,
        instance=fleet.instance,
        pid=pid,
        started=started,
        counters=traffic.counters(),
        window=traffic.window_parts(time.monotonic()),
        upstreams={adaptation.name: adaptation.report() for adaptation in adaptations},
    )


def _parse(reports: list[Report]) -> dict[str, tuple[float, WorkerReport]]:
    parsed = {}
    for report in reports:
        try:
            parsed[report.worker] = (report.at, WorkerReport.from_bytes(report.payload))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("unreadable fleet report skipped", extra={"worker": report.worker})
    return parsed


async def publish(
    link: StoreLink,
    fleet: Fleet,
    report: WorkerReport,
    adaptations: Sequence[UpstreamAdaptation],
) -> None:
    payload = report.to_bytes()
    try:
        # a probe too: with the optimizer off nothing else would close the breaker again
        at, reports = await link.call(lambda: link.store.publish(fleet.worker, payload), probe=True)
    except StoreError:
        fleet.view = None
        for adaptation in adaptations:
            adaptation.follow_fleet(None, time.monotonic())
        return
    fleet.view = FleetView(at, _parse(reports))
    fleet.received = time.monotonic()
    for adaptation in adaptations:
        adaptation.follow_fleet(fleet.view, fleet.received)


async def run(
    link: StoreLink,
    fleet: Fleet,
    adaptations: Sequence[UpstreamAdaptation],
    traffic: TrafficStats,
    pid: int,
    started: float,
) -> None:
    """``adaptations``: one per replica of FILEPROXY_UPSTREAM (each its own store keys)."""
    next_report = 0.0
    while True:
        now = time.monotonic()
        try:
            for adaptation in adaptations:
                await adaptation.sync(now)
            if now >= next_report:
                next_report = now + REPORT_INTERVAL_S
                report = worker_report(fleet, pid, started, traffic, adaptations)
                await publish(link, fleet, report, adaptations)
        except Exception:  # a bug here must not end the sharing for the worker's lifetime
            log.exception("state sync failed; retrying")
        await asyncio.sleep(SYNC_INTERVAL_S)
