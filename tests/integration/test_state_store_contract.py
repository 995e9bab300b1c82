"""One contract for every state store: embedded, a real redis-server, a real 3-master Cluster.

The Redis variants run against servers the fixtures start on ephemeral loopback ports
(tests/redis_servers.py), with a password; the same assertions hold for all three.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fileproxy.adaptive import LimiterConfig, LimiterState, close_window
from fileproxy.settings import Settings
from fileproxy.state.redis_store import RedisStore
from fileproxy.state.store import LEASE_S, EmbeddedStore, SharedLimiter, StateStore, WindowCounts

UPSTREAM = "backend.test:8080"
INITIAL = SharedLimiter(LimiterState(limit=100.0), enforcing=False)
CONFIG = LimiterConfig(min_limit=10, max_limit=1000, initial=100, window_s=0.3, min_samples=5)


def redis_settings(url: str, cluster: bool, prefix: str = "fileproxy:") -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": url,
            "FILEPROXY_REDIS_CLUSTER": "on" if cluster else "off",
            "FILEPROXY_REDIS_PREFIX": prefix,
            "FILEPROXY_REDIS_TIMEOUT": "1",
        }
    )


@pytest.fixture(params=["embedded", "single", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "embedded":
        yield EmbeddedStore()
        return
    # one server (or cluster) for the run; this test's keys under a prefix of its own
    name = "session_redis_server" if request.param == "single" else "session_redis_cluster"
    backend = request.getfixturevalue(name)
    prefix = request.getfixturevalue("unique_prefix")
    redis_store = RedisStore(redis_settings(backend.url, backend.cluster, prefix))
    try:
        yield redis_store
    finally:
        await redis_store.close()


NOTHING = WindowCounts()


async def tick(store: StateStore, token: str, counts: WindowCounts = NOTHING) -> Any:
    return await store.tick(
        UPSTREAM, counts, token=token, window_s=CONFIG.window_s, initial=INITIAL
    )


async def test_counts_of_every_worker_add_up_in_the_open_window(store: StateStore):
    await tick(store, "a", WindowCounts(successes=3, errors=1, admitted=4))
    await tick(store, "b", WindowCounts(successes=2, errors=0, admitted=2))
    seen = await tick(store, "a")
    assert seen.limiter.counts() == WindowCounts(successes=5, errors=1, admitted=6)
    assert seen.limiter.state.limit == 100.0
    assert seen.lease is False  # the window has not run its course


async def test_exactly_one_caller_gets_the_lease_and_only_it_can_commit(store: StateStore):
    first = await tick(store, "a", WindowCounts(successes=20, errors=10, admitted=30))
    await asyncio.sleep(CONFIG.window_s + 0.05)
    ticks = await asyncio.gather(*(tick(store, f"w{i}") for i in range(8)))
    holders = [t for t in ticks if t.lease]
    assert len(holders) == 1, [t.lease for t in ticks]
    holder = holders[0]
    token = f"w{ticks.index(holder)}"
    closed = close_window(CONFIG, holder.limiter.state, holder.now)
    assert closed.decision is not None and closed.decision.reason == "cut"  # 33 % errors
    assert closed.state.limit == pytest.approx(80.0)

    # counts that arrive between the tick and the commit stay in the new window
    await tick(store, "late", WindowCounts(successes=1, admitted=1))
    kwargs = {
        "seen": holder.limiter.counts(),
        "closed": closed,
        "enforcing": True,
        "level": "poor",
    }
    assert await store.commit(UPSTREAM, token="someone-else", **kwargs) is False
    assert await store.commit(UPSTREAM, token=token, **kwargs) is True
    assert await store.commit(UPSTREAM, token=token, **kwargs) is False  # the lease is spent

    after = await tick(store, "a")
    assert after.limiter.state.limit == pytest.approx(80.0)
    assert after.limiter.enforcing is True
    assert after.limiter.decisions == 1
    assert after.limiter.last_decision is not None
    assert after.limiter.last_decision["reason"] == "cut"
    assert after.limiter.level == "poor"
    assert after.limiter.counts() == WindowCounts(successes=1, admitted=1)
    assert after.limiter.state.cooldown_until == pytest.approx(
        closed.state.cooldown_until, abs=1e-3
    )
    assert after.lease is False  # a new window started at the decision
    assert first.now <= holder.now <= after.now  # one clock, the store's


async def test_a_lease_whose_holder_died_passes_to_another_worker(store: StateStore):
    await tick(store, "a")
    await asyncio.sleep(CONFIG.window_s + 0.05)
    assert (await tick(store, "dies")).lease is True
    assert (await tick(store, "b")).lease is False
    await asyncio.sleep(LEASE_S + 0.1)
    assert (await tick(store, "b")).lease is True


async def test_a_carried_window_keeps_its_counts(store: StateStore):
    await tick(store, "a", WindowCounts(successes=2, admitted=2))
    await asyncio.sleep(CONFIG.window_s + 0.05)
    leased = await tick(store, "a")
    closed = close_window(CONFIG, leased.limiter.state, leased.now)
    assert closed.decision is None and not closed.outcome.resets_counts
    assert await store.commit(
        UPSTREAM,
        token="a",
        seen=leased.limiter.counts(),
        closed=closed,
        enforcing=False,
        level=None,
    )
    after = await tick(store, "a", WindowCounts(successes=3, admitted=3))
    assert after.limiter.counts() == WindowCounts(successes=5, admitted=5)
    assert after.limiter.state.carried == 1
    assert after.limiter.decisions == 0


async def decide_and_commit(store: StateStore, token: str) -> Any:
    """Tick until leased (the window has run its course), decide with the pure rule, commit."""
    for _ in range(50):
        leased = await tick(store, token)
        if leased.lease:
            break
        await asyncio.sleep(0.05)
    assert leased.lease
    closed = close_window(CONFIG, leased.limiter.state, leased.now)
    committed = await store.commit(
        UPSTREAM,
        token=token,
        seen=leased.limiter.counts(),
        closed=closed,
        enforcing=True,
        level=None,
    )
    assert committed
    return closed


async def test_after_a_cut_silence_recovers_the_limit_by_the_pure_rule(store: StateStore):
    sampled = await tick(store, "a", WindowCounts(successes=2, errors=10, admitted=12))
    assert sampled.limiter.state.last_sample_at == pytest.approx(sampled.now, abs=1e-3)
    await asyncio.sleep(CONFIG.window_s)
    cut = await decide_and_commit(store, "a")
    assert cut.decision is not None and cut.decision.reason == "severe cut"  # 100 -> 50
    quiet = await tick(store, "a", WindowCounts(admitted=1))  # an abort: not a sample
    assert quiet.limiter.state.last_sample_at == pytest.approx(sampled.now, abs=1e-3)
    # the cooldown (2.5 windows) and then one silent window
    await asyncio.sleep(3.5 * CONFIG.window_s)
    idle = await decide_and_commit(store, "a")
    assert idle.decision is not None, idle
    assert idle.decision.reason.startswith("idle: recover"), idle.decision
    assert idle.decision.old == pytest.approx(50.0)
    assert idle.decision.new >= 60.0  # x1.2 per silent window
    after = await tick(store, "a")
    assert after.limiter.state.limit == pytest.approx(idle.decision.new)
    assert after.limiter.counts() == WindowCounts()  # the thin counts were dropped


async def test_gcra_starts_drained_then_paces_the_rate_with_bursts(store: StateStore):
    # a new clock gives no burst credit (a Redis restarted empty lets no burst through)
    results = [await store.pace(UPSTREAM, 5.0, 3) for _ in range(3)]
    assert [ok for ok, _ in results] == [True, False, False]
    assert 0.0 < results[1][1] <= 0.2 + 0.01  # one interval at 5 req/s
    # idle for a while: the credit of a burst of 3 builds up, then the rate paces again
    await asyncio.sleep(1.0)
    results = [await store.pace(UPSTREAM, 5.0, 3) for _ in range(4)]
    assert [ok for ok, _ in results] == [True, True, True, False]
    await asyncio.sleep(results[3][1] + 0.02)
    assert (await store.pace(UPSTREAM, 5.0, 3))[0] is True
    assert (await store.pace("another:1", 5.0, 1))[0] is True  # one clock per upstream


async def test_reports_come_back_and_age_out(store: StateStore):
    store.report_age_out_s = 0.6
    now_a, seen = await store.publish("host:1", b'{"n": 1}')
    assert [(r.worker, r.payload) for r in seen] == [("host:1", b'{"n": 1}')]
    await asyncio.sleep(0.4)
    now_b, seen = await store.publish("host:2", b'{"n": 2}')
    assert sorted(r.worker for r in seen) == ["host:1", "host:2"]
    assert now_b - now_a == pytest.approx(0.4, abs=0.2)
    await asyncio.sleep(0.4)
    _, seen = await store.publish("host:2", b'{"n": 3}')
    assert [(r.worker, r.payload) for r in seen] == [("host:2", b'{"n": 3}')]


@pytest.fixture
async def shared_store(redis_backend) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_settings(redis_backend.url, redis_backend.cluster))
    try:
        yield store
    finally:
        await store.close()


async def test_redis_keys_have_the_prefix_a_hash_tag_and_a_ttl(redis_backend, shared_store):
    other = RedisStore(
        redis_settings(redis_backend.url, redis_backend.cluster, prefix="other-deployment:")
    )
    try:
        await tick(shared_store, "a", WindowCounts(successes=1, admitted=1))
        await shared_store.pace(UPSTREAM, 5.0, 1)
        await shared_store.publish("host:1", b"{}")
        await tick(other, "a", WindowCounts(successes=7, admitted=7))
        client = redis_backend.client()
        keys = sorted(client.scan_iter("*"))
        assert keys == sorted(
            [
                "fileproxy:{fleet}:reports",
                "fileproxy:{fleet}:seen",
                f"fileproxy:{{up:{UPSTREAM}}}:admission",
                f"fileproxy:{{up:{UPSTREAM}}}:limiter",
                f"other-deployment:{{up:{UPSTREAM}}}:limiter",
            ]
        )
        for key in keys:
            assert client.pttl(key) > 0, key
        # two deployments on one Redis do not see each other's counts
        assert (await tick(shared_store, "a")).limiter.counts().successes == 1
    finally:
        await other.close()


async def test_the_limit_and_level_survive_a_restart_of_the_proxy(redis_backend, shared_store):
    """A new store (a restarted worker) starts from the limit and level the fleet saved."""
    await tick(shared_store, "a", WindowCounts(successes=30, admitted=30))
    await asyncio.sleep(CONFIG.window_s + 0.05)
    leased = await tick(shared_store, "a")
    closed = close_window(CONFIG, leased.limiter.state, leased.now)
    assert closed.decision is not None and closed.decision.reason == "grow"  # 100 -> 120
    assert await shared_store.commit(
        UPSTREAM,
        token="a",
        seen=leased.limiter.counts(),
        closed=closed,
        enforcing=True,
        level="good",
    )
    restarted = RedisStore(redis_settings(redis_backend.url, redis_backend.cluster))
    try:
        seen = await tick(restarted, "new-worker")
        assert seen.limiter.state.limit == pytest.approx(120.0)  # not the initial 100
        assert seen.limiter.level == "good" and seen.limiter.enforcing is True
    finally:
        await restarted.close()
