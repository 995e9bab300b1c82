"""/health and /stats: their shapes, real figures, uvloop, Redis state, no secrets."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, clean_env, get_json
from tests.redis_servers import RedisServer

PASSWORD = "s3cret-pass-word"


async def test_health_has_the_shape_operators_script_against(client, start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url)
    health = await get_json(client, f"{proxy.url}/health")
    assert health["status"] == "ok"
    assert health["performance_optimization"] == {
        "uvloop_enabled": True,
        "optimizer_enabled": True,
        "optimization_level": "high",
        "optimization_score": 2,
    }
    assert health["config"]["HTTP_CONNECTOR_LIMIT"] == "200"
    assert health["upstream"]["url"] == sample_upstream.url
    assert health["state_store"] == {"kind": "embedded", "scope": "worker", "state": "embedded"}


async def test_optimizer_off_is_reported(client, start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_OPTIMIZER="off")
    health = await get_json(client, f"{proxy.url}/health")
    assert health["performance_optimization"] == {
        "uvloop_enabled": True,
        "optimizer_enabled": False,
        "optimization_level": "medium",
        "optimization_score": 1,
    }
    stats = await get_json(client, f"{proxy.url}/stats")
    assert stats["performance_optimizer"]["current_rate_limit"] is None
    upstream = stats["upstreams"][sample_upstream.url.removeprefix("http://")]
    assert upstream["profile"]["source"] == "static"
    assert upstream["limiter"] is None


async def test_stats_report_real_figures(client, start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url)
    for _ in range(8):
        async with client.get(f"{proxy.url}/files/1m.bin") as resp:
            assert resp.status == 200
            await resp.read()
    for _ in range(2):
        async with client.get(f"{proxy.url}/status/503") as resp:
            assert resp.status == 503
    stats = await get_json(client, f"{proxy.url}/stats")
    optimizer = stats["performance_optimizer"]
    metrics = optimizer["metrics"]
    assert metrics["total_requests"] == 10
    assert metrics["error_rate"] == 0.2
    assert metrics["avg_response_time_ms"] > 0
    assert metrics["p95_response_time_ms"] >= metrics["p50_response_time_ms"] > 0
    assert metrics["total_bytes_sent"] >= 8 * 1024 * 1024
    assert metrics["throughput_mbps"] > 0
    assert metrics["uvloop_enabled"] is True
    assert optimizer["current_rate_limit"] == 100.0  # FILEPROXY_LIMIT_INITIAL
    assert optimizer["optimization_level"] == "high"
    assert stats["scope"] == "worker"
    # the endpoints themselves are not proxied requests
    again = await get_json(client, f"{proxy.url}/stats")
    assert again["performance_optimizer"]["metrics"]["total_requests"] == 10


async def test_without_uvloop_the_daemon_runs_and_says_so(
    client, start_proxy, sample_upstream, tmp_dir: Path
):
    blocker = tmp_dir / "no-uvloop" / "uvloop"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('uvloop hidden by the test')\n")
    proxy = start_proxy(sample_upstream.url, PYTHONPATH=str(blocker.parent))
    health = await get_json(client, f"{proxy.url}/health")
    assert health["performance_optimization"]["uvloop_enabled"] is False
    assert health["performance_optimization"]["optimization_level"] == "medium"
    async with client.get(f"{proxy.url}/files/64k.bin") as resp:
        assert resp.status == 200
        assert len(await resp.read()) == 65536
    assert "uvloop not installed" in proxy.log_text()


async def _wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


async def test_redis_state_in_health_and_no_secret_anywhere(
    client, start_proxy, sample_upstream, redis_server: RedisServer
):
    upstream = sample_upstream.url.replace("http://", f"http://operator:{PASSWORD}@")
    proxy = start_proxy(upstream, REDIS_URL=redis_server.url)

    async def redis_up():
        health = await get_json(client, f"{proxy.url}/health")
        return health if health["state_store"].get("state") == "up" else None

    health = await _wait_for(redis_up)
    assert health["status"] == "ok"
    assert health["state_store"]["url"] == f"redis://***@127.0.0.1:{redis_server.port}/0"
    assert redis_server.password not in str(health)
    assert health["state_store"]["pool_size"] == 150

    async with client.get(
        f"{proxy.url}/echo", headers={"Authorization": "Bearer from-the-client"}
    ) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert ["Authorization", "Basic b3BlcmF0b3I6czNjcmV0LXBhc3Mtd29yZA=="] in echoed["headers"]

    redis_server.stop()

    async def degraded():
        health = await get_json(client, f"{proxy.url}/health")
        return health if health["status"] == "degraded" else None

    health = await _wait_for(degraded)
    assert health["state_store"]["state"] == "down"
    async with client.get(f"{proxy.url}/files/4k.bin") as resp:
        assert resp.status == 200  # serving goes on without Redis

    seen = [await (await client.get(f"{proxy.url}/{path}")).text() for path in ("health", "stats")]
    for text in [*seen, proxy.log_text()]:
        assert PASSWORD not in text and redis_server.password not in text


def test_check_reports_each_item_and_fails_without_upstream(sample_upstream):
    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fileproxy", "check"],
            env=clean_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    ok = run(FILEPROXY_UPSTREAM=sample_upstream.url, FILEPROXY_TCP_KEEPIDLE="45")
    assert ok.returncode == 0, ok.stdout
    lines = ok.stdout.splitlines()
    for item in ("configuration", "uvloop", "open files limit", "socket options", "upstream"):
        assert any(line.split(":")[0].endswith(item) for line in lines), (item, lines)
    assert "TCP_KEEPIDLE=45" in ok.stdout
    assert "time to first byte" in ok.stdout
    assert lines[-1] == "all checks passed"

    down = run(FILEPROXY_UPSTREAM="http://127.0.0.1:1")
    assert down.returncode == 1
    assert "FAIL upstream: http://127.0.0.1:1: cannot connect to upstream (ECONNREFUSED)" in (
        down.stdout
    )
