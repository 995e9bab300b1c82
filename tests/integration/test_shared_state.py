"""A fleet shares one limiter, one level and one /stats through Redis, and outlives Redis.

Two fileproxy instances (gunicorn as systemd runs it, two workers each) and one Redis
with a password, or a real 3-master Redis Cluster (the ``redis_backend`` fixture runs
every test against both). The load is open-loop: requests leave at a fixed rate
whatever the answers, spread over both instances, and every outcome is kept.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fileproxy.state.store import limiter_key
from tests.conftest import Process, clean_env
from tests.integration.test_deployment import start_gunicorn

LIMIT = 50  # req/s for the whole fleet: LIMIT_MIN = LIMIT_INITIAL = LIMIT_MAX, always enforced
OFFERED = 3 * LIMIT
WORKERS = 2  # per instance (start_gunicorn's)
PATH = "/files/4k.bin"

pytestmark = pytest.mark.slow


def fleet_settings(redis_backend: Any) -> dict[str, str]:
    return {
        "REDIS_URL": redis_backend.url,
        "FILEPROXY_REDIS_CLUSTER": "on" if redis_backend.cluster else "off",
        "FILEPROXY_LIMIT_MIN": str(LIMIT),
        "FILEPROXY_LIMIT_INITIAL": str(LIMIT),
        "FILEPROXY_LIMIT_MAX": str(LIMIT),
        "FILEPROXY_LIMIT_ENFORCE": "always",
        # GCRA admits at most LIMIT * t + BURST in any t seconds: a burst of LIMIT / 10 is
        # what "never above 1.1 x the limit" per second leaves room for (credit builds up
        # whenever the offered load pauses, e.g. while this test's client is busy)
        "FILEPROXY_LIMIT_BURST": str(LIMIT // 10),
        "FILEPROXY_LIMIT_STATUS": "429",  # refusals by the limit, told apart from failures
        "FILEPROXY_ACCESS_LOG": "off",
    }


@dataclass
class Outcome:
    sent: float  # monotonic
    status: int | str  # HTTP status, or the exception's name


async def open_load(
    session: aiohttp.ClientSession, urls: list[str], rate: float, duration: float
) -> list[Outcome]:
    """``rate`` requests per second for ``duration`` seconds, round-robin over ``urls``."""
    outcomes: list[Outcome] = []

    async def one(url: str, sent: float) -> None:
        try:
            async with session.get(url) as resp:
                await resp.read()
                outcomes.append(Outcome(sent, resp.status))
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcomes.append(Outcome(sent, type(exc).__name__))

    start = time.monotonic()
    tasks = []
    for i in range(int(rate * duration)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(urls[i % len(urls)], time.monotonic())))
    await asyncio.gather(*tasks)
    return outcomes


async def every_worker(
    session: aiohttp.ClientSession, instances: list[Process], path: str, timeout: float = 10.0
) -> dict[int, dict[str, Any]]:
    """One answer of ``path`` from each of the fleet's workers (new connection each time)."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < WORKERS * len(instances):
        assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered"
        for instance in instances:
            async with session.get(
                f"{instance.url}{path}", headers={"Connection": "close"}
            ) as resp:
                body = await resp.json()
            seen[body["pid"]] = body
    return seen


async def wait_until_shared(session: aiohttp.ClientSession, instances: list[Process]) -> None:
    """Every worker reads the fleet: Redis up and four workers reporting."""
    deadline = time.monotonic() + 30
    while True:
        stats = await every_worker(session, instances, "/stats")
        if all(s["scope"] == "cluster" and s["live_workers"] == 4 for s in stats.values()):
            return
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.3)


@pytest.fixture
def fleet(redis_backend, sample_upstream, tmp_dir: Path):
    env = fleet_settings(redis_backend)
    instances: list[Process] = []
    try:
        for _ in range(2):  # one by one: the first is stopped even if the second fails
            instances.append(start_gunicorn(tmp_dir, sample_upstream.url, **env))
        yield instances
    finally:
        for instance in instances:
            instance.stop()


def decision_count(redis_backend: Any, upstream_url: str) -> int:
    key = limiter_key("fileproxy:", upstream_url.removeprefix("http://"))
    return int(redis_backend.client().hget(key, "decisions") or 0)


async def test_one_limit_and_one_stats_for_the_whole_fleet(
    redis_backend, fleet, sample_upstream, client
):
    await wait_until_shared(client, fleet)
    decisions_before, before = decision_count(redis_backend, sample_upstream.url), time.monotonic()
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=connector) as session:
        outcomes = await open_load(
            session, [f"{i.url}{PATH}" for i in fleet], rate=OFFERED, duration=10
        )
    decisions = decision_count(redis_backend, sample_upstream.url) - decisions_before
    elapsed = time.monotonic() - before

    statuses = Counter(o.status for o in outcomes)
    assert set(statuses) <= {200, 429}, statuses  # refused by the limit or served: no failure
    admitted_rate = statuses[200] / 10
    print(
        f"offered {OFFERED}/s over 2 instances x 2 workers: admitted {admitted_rate}/s, {statuses}"
    )
    assert 0.9 * LIMIT <= admitted_rate <= 1.1 * LIMIT, statuses
    # one decision per 1 s window for the fleet, not one per worker
    assert 0.5 * elapsed <= decisions <= elapsed + 1, (decisions, elapsed)

    # /stats on any worker of either instance: the fleet's totals with a breakdown
    await asyncio.sleep(2.5)  # every worker has published since the load ended
    for pid, stats in (await every_worker(client, fleet, "/stats")).items():
        metrics = stats["performance_optimizer"]["metrics"]
        assert stats["scope"] == "cluster", pid
        assert metrics["total_requests"] == len(outcomes), (pid, metrics)
        assert metrics["rate_limited"] == statuses[429], (pid, metrics)
        instances = stats["instances"]
        assert len(instances) == 2 and all(len(i["workers"]) == 2 for i in instances.values())
        assert sum(i["total_requests"] for i in instances.values()) == len(outcomes)
        assert stats["performance_optimizer"]["current_rate_limit"] == LIMIT
        assert (
            stats["upstreams"][sample_upstream.url.removeprefix("http://")]["limiter"]["mode"]
            == "shared"
        )
    # /metrics too: one series per worker of the fleet, adding up to what was sent
    async with client.get(f"{fleet[1].url}/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    assert families["fileproxy_fleet_workers"].samples[0].value == 4
    fleet_requests = families["fileproxy_fleet_requests"].samples
    assert sum(s.value for s in fleet_requests if s.name.endswith("_total")) == len(outcomes)
    levels = {
        s["performance_optimizer"]["quality_level"]
        for s in (await every_worker(client, fleet, "/stats")).values()
    }
    assert len(levels) == 1, levels  # every worker uses the fleet's level

    # every key: the prefix and a TTL
    redis = redis_backend.client()
    keys = list(redis.scan_iter("*"))
    assert keys
    for key in keys:
        assert key.startswith("fileproxy:{"), key
        assert redis.pttl(key) > 0, key

    # the password: nowhere in what fileproxy shows or logs
    password = redis_backend.password
    shown = [
        await (await client.get(f"{i.url}/{path}")).text()
        for i in fleet
        for path in ("health", "stats", "metrics")
    ]
    env = clean_env(**fleet_settings(redis_backend), FILEPROXY_UPSTREAM=sample_upstream.url)
    for command in ("config", "check"):
        run = subprocess.run(
            [sys.executable, "-m", "fileproxy", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        shown.append(run.stdout + run.stderr)
    assert "redis" in shown[-1] and "answered PING" in shown[-1]
    shown += [i.log_text() for i in fleet]
    for text in shown:
        assert password not in text


async def test_the_fleet_outlives_redis(redis_backend, fleet, client):
    await wait_until_shared(client, fleet)
    urls = [f"{i.url}{PATH}" for i in fleet]
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=connector) as session:
        load = asyncio.create_task(open_load(session, urls, rate=OFFERED, duration=14))
        await asyncio.sleep(3)
        killed_at_wall, killed_at = time.time(), time.monotonic()
        await asyncio.to_thread(redis_backend.kill)

        # /health degraded on every worker, each within 2 s of the kill (its own clock)
        down = await poll_every_worker(client, fleet, lambda h: h["status"] == "degraded")
        for pid, health in down.items():
            store = health["state_store"]
            assert store["state"] == "down" and store["limiter"] == "fallback", (pid, store)
            assert store["since"] - killed_at_wall <= 2.0, (pid, store["since"] - killed_at_wall)
            assert health["ready"] is True  # /ready stays 200: the proxy still serves
        async with client.get(f"{fleet[0].url}/ready") as resp:
            assert resp.status == 200

        await asyncio.sleep(max(0.0, killed_at + 4 - time.monotonic()))
        # returns once Redis answers (a Cluster: once it is ok); in a thread, so the
        # load goes on meanwhile
        await asyncio.to_thread(redis_backend.restart)
        answering_wall = time.time()
        # the link is up at its next probe; the limiter is the fleet's again at the next
        # sync that answers, a moment later: wait for both
        up = await poll_every_worker(
            client,
            fleet,
            lambda h: (
                h["state_store"]["state"] == "up"
                and h["status"] == "ok"
                and h["state_store"]["limiter"] == "shared"
            ),
        )
        shared_after = time.time() - answering_wall
        assert shared_after <= 6.0, shared_after  # a probe, the recovery grace, a sync
        for pid, health in up.items():
            store = health["state_store"]
            assert store["since"] - answering_wall <= 2.0, (pid, store["since"] - answering_wall)
        outcomes = await load

    statuses = Counter(o.status for o in outcomes)
    print(f"through a Redis kill and restart: {statuses}")
    assert set(statuses) <= {200, 429}, statuses  # not one proxied request failed
    start = min(o.sent for o in outcomes)
    per_second = Counter(int(o.sent - start) for o in outcomes if o.status == 200)
    print(f"admitted per second: {[per_second[s] for s in sorted(per_second)]}")
    assert max(per_second.values()) <= 1.1 * LIMIT, per_second
    # never starved; each worker admits its share (LIMIT / 4) in the fallback, so when the
    # client's connections sit on fewer workers the fleet admits less, never more
    assert min(per_second[s] for s in range(1, 13)) >= 0.2 * LIMIT, per_second


async def poll_every_worker(
    client: aiohttp.ClientSession, fleet: list[Process], done, timeout: float = 15.0
) -> dict[int, dict[str, Any]]:
    """/health of every worker once ``done(health)`` holds for each."""
    reached: dict[int, dict[str, Any]] = {}
    last: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(reached) < WORKERS * len(fleet):
        assert time.monotonic() < deadline, (sorted(reached), last)
        last = await every_worker(client, fleet, "/health")
        for pid, health in last.items():
            if done(health) and pid not in reached:
                reached[pid] = health
        await asyncio.sleep(0.05)
    return reached


async def test_redis_down_at_start_then_shared_when_it_comes(
    redis_server, start_proxy, sample_upstream, client
):
    redis_server.kill()  # the port and password are known, nothing listens there yet
    env = {**fleet_settings(redis_server), "FILEPROXY_LIMIT_MIN": "20"}
    env.update(FILEPROXY_LIMIT_INITIAL="20", FILEPROXY_LIMIT_MAX="20")
    proxy = start_proxy(sample_upstream.url, **env)

    async def health() -> dict[str, Any]:
        async with client.get(f"{proxy.url}/health") as resp:
            return await resp.json()

    deadline = time.monotonic() + 5
    while (await health())["status"] != "degraded":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    statuses = Counter()
    for _ in range(60):  # as fast as one client goes: the local limit still holds
        async with client.get(f"{proxy.url}{PATH}") as resp:
            await resp.read()
            statuses[resp.status] += 1
    assert set(statuses) == {200, 429} and statuses[200] <= 20 + 5, statuses  # never unlimited
    assert (await health())["state_store"]["limiter"] == "fallback"
    async with client.get(f"{proxy.url}/ready") as resp:
        assert resp.status == 200

    await asyncio.to_thread(redis_server.restart)
    answering = time.time()
    deadline = time.monotonic() + 5
    while (current := await health())["state_store"]["state"] != "up":
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.1)
    assert current["status"] == "ok" and current["state_store"]["limiter"] == "shared"
    assert current["state_store"]["since"] - answering <= 2.0


async def test_with_the_optimizer_off_the_fleet_stats_still_recover(
    redis_server, start_proxy, sample_upstream, client
):
    """Nothing ticks the limiter then: the reports alone must probe Redis again."""
    proxy = start_proxy(sample_upstream.url, REDIS_URL=redis_server.url, FILEPROXY_OPTIMIZER="off")

    async def state() -> str:
        async with client.get(f"{proxy.url}/health") as resp:
            return (await resp.json())["state_store"]["state"]

    async def becomes(expected: str) -> None:
        deadline = time.monotonic() + 10
        while await state() != expected:
            assert time.monotonic() < deadline, expected
            await asyncio.sleep(0.1)

    await becomes("up")
    await asyncio.to_thread(redis_server.kill)
    await becomes("down")
    await asyncio.to_thread(redis_server.restart)
    await becomes("up")
    async with client.get(f"{proxy.url}/stats") as resp:
        assert (await resp.json())["scope"] == "cluster"
