"""The Redis fixtures themselves: real servers, passwords enforced, a real 3-master cluster."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from tests.redis_servers import (
    CLUSTER_SLOTS,
    RedisBackend,
    RedisClusterServers,
    RedisServer,
    no_retry,
)

# Reads the server clock, then writes both keys (same hash tag: same slot in a cluster).
STATE_SCRIPT = """
local now = redis.call('TIME')
local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000)
redis.call('SET', KEYS[2], micros, 'PX', 60000)
return {redis.call('GET', KEYS[1]), tonumber(redis.call('GET', KEYS[2]))}
"""
STATE_KEY = "fileproxy:{up:abc}:state"
GCRA_KEY = "fileproxy:{up:abc}:gcra"


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_single_password_required(redis_server: RedisServer) -> None:
    assert redis_server.port not in (6379, 6380)
    assert redis_server.url == f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/0"
    with redis_server.client() as client:
        assert client.ping() is True
    anonymous = redis.Redis(
        host="127.0.0.1", port=redis_server.port, socket_timeout=5, retry=no_retry()
    )
    with anonymous, pytest.raises(redis.AuthenticationError):  # NOAUTH
        anonymous.ping()
    with redis.Redis.from_url(redis_server.url, socket_timeout=5) as from_url:
        assert from_url.ping() is True


def test_single_kill_and_restart_same_port(redis_server: RedisServer) -> None:
    port, pid = redis_server.port, redis_server.pid
    with redis_server.client() as client:
        client.set("k", "v")
    redis_server.kill()
    assert not _alive(pid)
    with (
        redis_server.client(socket_connect_timeout=0.5, retry=no_retry()) as client,
        pytest.raises(redis.ConnectionError),
    ):
        client.ping()
    redis_server.restart()
    assert redis_server.port == port and redis_server.pid != pid
    with redis_server.client() as client:
        assert client.ping() is True
        assert client.get("k") is None  # no persistence: a crash loses the data


def test_cluster_three_masters_cover_all_slots(redis_cluster: RedisClusterServers) -> None:
    assert len(set(redis_cluster.ports)) == 3
    assert all(port + 10000 <= 65535 for port in redis_cluster.ports)
    with redis_cluster.client() as client:
        masters = client.get_primaries()
        assert sorted(node.port for node in masters) == sorted(redis_cluster.ports)
        slots = client.cluster_slots()
        covered = sum(end - start + 1 for start, end in slots)
        assert covered == CLUSTER_SLOTS
        info = client.cluster_info()
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS
        assert int(info["cluster_known_nodes"]) == 3
    for port in redis_cluster.ports:
        anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, retry=no_retry())
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()


async def test_async_cluster_lua_script_with_hash_tag(redis_cluster: RedisClusterServers) -> None:
    client = AsyncRedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        async with asyncio.timeout(30):
            script = client.register_script(STATE_SCRIPT)
            value, micros = await script(keys=[STATE_KEY, GCRA_KEY], args=["open"])
            assert value == "open" and micros > 1_600_000_000 * 1_000_000
            # The second call is a plain EVALSHA (the script is loaded now)
            value, _ = await script(keys=[STATE_KEY, GCRA_KEY], args=["half-open"])
            assert value == "half-open"
    finally:
        await client.aclose()
    with redis_cluster.client() as sync_client:
        assert sync_client.keyslot(STATE_KEY) == sync_client.keyslot(GCRA_KEY)
        assert sync_client.get(STATE_KEY) == "half-open"


async def test_backend_script_kill_restart(redis_backend: RedisBackend) -> None:
    """The common API: the same steps against one node and against the cluster."""
    if redis_backend.cluster:
        client = AsyncRedisCluster.from_url(redis_backend.url, decode_responses=True)
    else:
        client = redis.asyncio.Redis.from_url(redis_backend.url, decode_responses=True)
    try:
        async with asyncio.timeout(30):
            script = client.register_script(STATE_SCRIPT)
            value, _ = await script(keys=[STATE_KEY, GCRA_KEY], args=["closed"])
            assert value == "closed"
    finally:
        await client.aclose()

    redis_backend.kill()
    redis_backend.restart()
    with redis_backend.client() as sync_client:
        assert sync_client.ping()
        if redis_backend.cluster:
            assert sync_client.cluster_info()["cluster_state"] == "ok"
        sync_client.set(STATE_KEY, "after-restart")
        assert sync_client.get(STATE_KEY) == "after-restart"


def test_cluster_kill_all_restart_all(redis_cluster: RedisClusterServers) -> None:
    ports = list(redis_cluster.ports)
    redis_cluster.kill_all()
    assert not any(_alive(pid) for pid in redis_cluster.pids)
    redis_cluster.restart_all()
    assert redis_cluster.ports == ports
    assert redis_cluster.cluster_states() == dict.fromkeys(ports, "ok")
    with redis_cluster.client() as client:
        client.set(GCRA_KEY, "1")
        assert client.get(GCRA_KEY) == "1"
        assert len(client.get_primaries()) == 3


def test_stop_terminates_by_pid(tmp_dir: Path) -> None:
    """stop() ends every process (the fixtures call it at teardown, also after a failure)."""
    single = RedisServer(tmp_dir / "single")
    cluster = RedisClusterServers(tmp_dir / "cluster")
    pids = [single.pid, *cluster.pids]
    try:
        assert all(_alive(pid) for pid in pids)
    finally:
        single.stop()
        cluster.stop()
    assert not any(_alive(pid) for pid in pids)
    assert "Received SIGTERM" in single.log_text()  # stop() is SIGTERM first
