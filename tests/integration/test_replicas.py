"""Several upstreams (issue 15): balancing, ejection, retries and mid-download resume,
against real replica processes (tests/replica_backend.py) serving the same files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from fileproxy.sample_upstream import FILES, file_bytes
from tests.conftest import ROOT, Process, clean_env, free_port, get_json

MIB = 1024 * 1024


def digest(name: str, seed: int = 0) -> str:
    h = hashlib.sha256()
    for chunk in file_bytes(name, seed=seed):
        h.update(chunk)
    return h.hexdigest()


async def download(
    client: aiohttp.ClientSession, url: str, rate: float | None = None
) -> tuple[int, str, int]:
    """(status, sha256, bytes) of a whole body; a broken one raises."""
    h, size, began = hashlib.sha256(), 0, time.monotonic()
    async with client.get(url) as resp:
        async for chunk in resp.content.iter_chunked(256 * 1024):
            h.update(chunk)
            size += len(chunk)
            if rate:
                ahead = size / rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        return resp.status, h.hexdigest(), size


async def counts(client: aiohttp.ClientSession, replica: Process) -> dict[str, int]:
    return await get_json(client, f"{replica.url}/_count")


def replica_list(*replicas: Process | str) -> str:
    return ",".join(r if isinstance(r, str) else r.url for r in replicas)


def access_lines(proxy: Process) -> list[dict[str, object]]:
    lines = []
    for line in proxy.log_text().splitlines():
        if line.startswith("{") and '"method"' in line:
            lines.append(json.loads(line))
    return lines


async def test_requests_spread_and_a_slow_replica_gets_little(start_replica, start_proxy, client):
    fast = [start_replica(ttfb=0.02), start_replica(ttfb=0.02)]
    slow = start_replica(ttfb=0.2)
    proxy = start_proxy(replica_list(*fast, slow))

    async def worker() -> None:
        for _ in range(60):
            async with client.get(f"{proxy.url}/files/4k.bin") as resp:
                assert resp.status == 200
                await resp.read()

    await asyncio.gather(*(worker() for _ in range(4)))
    got = [(await counts(client, r)).get("GET", 0) for r in (*fast, slow)]
    assert sum(got) == 240
    assert all(n > 0.3 * 240 for n in got[:2]), got
    assert got[2] < 0.1 * 240, got
    stats = await get_json(client, f"{proxy.url}/stats")
    names = [f"127.0.0.1:{r.port}" for r in (*fast, slow)]
    assert sorted(stats["upstreams"]) == sorted(names)
    health = await get_json(client, f"{proxy.url}/health")
    assert {health["upstreams"][n]["state"] for n in names} == {"healthy"}
    metrics = await (await client.get(f"{proxy.url}/metrics")).text()
    for name in names:
        assert f'fileproxy_upstream_requests_total{{pid="{proxy.pid}",upstream="{name}"}}' in (
            metrics
        )


@pytest.mark.slow
async def test_a_replica_that_resets_every_body_after_1_mib(start_replica, start_proxy, client):
    good = [start_replica(), start_replica()]
    bad = start_replica(reset_after=MIB)
    # never ejected: every download that starts there has to be resumed
    proxy = start_proxy(replica_list(bad, *good), FILEPROXY_EJECT_AFTER="0")
    expected = digest("16m.bin")
    gate = asyncio.Semaphore(4)

    async def one() -> tuple[int, str, int]:
        async with gate:
            return await download(client, f"{proxy.url}/files/16m.bin")

    results = await asyncio.gather(*(one() for _ in range(12)))
    assert results == [(200, expected, FILES["16m.bin"])] * 12
    assert (await counts(client, bad)).get("GET", 0) > 0
    stats = await get_json(client, f"{proxy.url}/stats")
    assert stats["resumes"]["ok"] > 0
    assert stats["resumes"]["failed"] == 0
    deadline = time.monotonic() + 10  # access lines are written in batches (~1 s)
    while True:
        logged = sum(int(str(line.get("resumes", 0))) for line in access_lines(proxy))
        if logged == stats["resumes"]["ok"]:
            break
        assert time.monotonic() < deadline, (logged, stats["resumes"])
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_a_replica_killed_mid_download(start_replica, start_proxy, client):
    # paced: 64 MiB at 16 MiB/s takes 4 s
    replicas = [start_replica(pace=16 * MIB) for _ in range(3)]
    proxy = start_proxy(replica_list(*replicas))
    expected = digest("64m.bin")
    downloads = [
        asyncio.create_task(download(client, f"{proxy.url}/files/64m.bin")) for _ in range(4)
    ]
    await asyncio.sleep(1.5)
    served = [(await counts(client, r)).get("GET", 0) for r in replicas]
    victim = replicas[max(range(3), key=lambda i: served[i])]
    assert max(served) > 0
    os.kill(victim.pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*downloads), 60)
    assert results == [(200, expected, FILES["64m.bin"])] * 4
    stats = await get_json(client, f"{proxy.url}/stats")
    assert stats["resumes"]["ok"] >= max(served) >= 1


@pytest.mark.slow
async def test_different_contents_are_never_spliced(start_replica, start_proxy, client):
    cutting = start_replica(seed=0, reset_after=MIB)
    others = [start_replica(seed=1), start_replica(seed=1)]
    proxy = start_proxy(replica_list(cutting, *others), FILEPROXY_EJECT_AFTER="0")
    allowed = {digest("16m.bin", 0), digest("16m.bin", 1)}
    complete = broken = 0
    for _ in range(12):
        try:
            status, sha, size = await download(client, f"{proxy.url}/files/16m.bin")
        except aiohttp.ClientPayloadError:
            broken += 1
            continue
        assert status == 200 and size == FILES["16m.bin"]
        assert sha in allowed  # one content or the other, never a mix
        complete += 1
    assert (await counts(client, cutting)).get("GET", 0) > 0
    assert broken > 0  # what started at the cutting replica cannot be finished elsewhere
    stats = await get_json(client, f"{proxy.url}/stats")
    assert stats["resumes"]["failed"] == broken


async def test_closed_port_retries_and_the_budget(start_replica, start_proxy, client):
    closed = f"http://127.0.0.1:{free_port()}"
    up = [start_replica(), start_replica()]
    proxy = start_proxy(replica_list(closed, *up))
    gate = asyncio.Semaphore(4)

    async def get() -> int:
        async with gate, client.get(f"{proxy.url}/files/64k.bin") as resp:
            await resp.read()
            return resp.status

    assert await asyncio.gather(*(get() for _ in range(40))) == [200] * 40
    health = await get_json(client, f"{proxy.url}/health")
    assert health["upstreams"][closed.removeprefix("http://")]["state"] == "ejected"

    # every replica answers 503 (after 50 ms, so requests overlap)
    failing = [start_replica(status=503, ttfb=0.05) for _ in range(2)]
    proxy = start_proxy(replica_list(closed, *failing))
    n = 60
    gets = await asyncio.gather(*(client.get(f"{proxy.url}/files/4k.bin") for _ in range(n)))
    assert [r.status for r in gets] == [503] * n
    got = [await counts(client, r) for r in failing]
    reached = sum(c.get("GET", 0) for c in got)
    # retried, within the budget (20% + 3) and the throttle (until half its tokens are spent)
    assert n < reached <= 1.3 * n + 3, reached
    stats = await get_json(client, f"{proxy.url}/stats")
    retries = stats["retries"]
    assert retries["refused_by_budget"] + retries["refused_by_throttle"] > 0, retries

    posts = await asyncio.gather(
        *(client.post(f"{proxy.url}/files/x", data=b"payload") for _ in range(20))
    )
    assert [r.status for r in posts] == [503] * 20
    got = [await counts(client, r) for r in failing]
    assert sum(c.get("POST", 0) for c in got) == 20  # exactly once each


async def test_active_health_checks_eject_without_traffic(start_replica, start_proxy, client):
    good = [start_replica(), start_replica()]
    sick = start_replica(status=503)
    proxy = start_proxy(
        replica_list(*good, sick),
        FILEPROXY_HEALTH_PATH="/files/4k.bin",
        FILEPROXY_HEALTH_INTERVAL="0.1",
        FILEPROXY_EJECT_AFTER="2",
    )
    name = f"127.0.0.1:{sick.port}"
    deadline = time.monotonic() + 20
    while True:
        health = await get_json(client, f"{proxy.url}/health")
        if health["upstreams"][name]["state"] == "ejected":
            break
        assert time.monotonic() < deadline, health["upstreams"]
        await asyncio.sleep(0.1)
    assert health["upstreams"][name]["reason"] == "health check: status 503"
    assert health["upstreams"][name]["last_check"]["ok"] is False
    ready = await client.get(f"{proxy.url}/ready")
    assert ready.status == 200
    assert (await ready.json())["upstreams"][name] == {"state": "ejected", "usable": False}
    for _ in range(20):
        async with client.get(f"{proxy.url}/files/4k.bin") as resp:
            assert resp.status == 200
    assert (await counts(client, sick)).get("GET", 0) > 0  # the checks, not the clients'
    assert sum([(await counts(client, r)).get("GET", 0) for r in good]) >= 20 + 2


async def test_ready_is_503_only_when_no_replica_answers(start_proxy, client):
    closed = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    proxy = start_proxy(replica_list(*closed))
    async with client.get(f"{proxy.url}/ready") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert set(body["upstreams"]) == {c.removeprefix("http://") for c in closed}


def test_check_probes_every_replica(sample_upstream):
    def run(upstream: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fileproxy", "check"],
            env=clean_env(FILEPROXY_UPSTREAM=upstream),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    one_down = run(f"{sample_upstream.url},http://127.0.0.1:1")
    assert one_down.returncode == 0, one_down.stdout  # the other serves
    assert f"PASS upstream: {sample_upstream.url} answered 200" in one_down.stdout
    assert "WARN upstream: http://127.0.0.1:1: cannot connect" in one_down.stdout
    all_down = run("http://127.0.0.1:1,http://127.0.0.1:2")
    assert all_down.returncode == 1
    assert all_down.stdout.count("FAIL upstream") == 2


@pytest.mark.slow
async def test_an_ejection_is_shared_by_the_fleet(start_replica, redis_server, tmp_dir, client):
    from tests.integration.test_deployment import WORKERS, start_gunicorn

    good = [start_replica(), start_replica()]
    sick = start_replica(status=503)
    name = f"127.0.0.1:{sick.port}"
    instance = start_gunicorn(
        tmp_dir,
        replica_list(sick, *good),
        REDIS_URL=redis_server.url,
        FILEPROXY_EJECT_AFTER="3",
        FILEPROXY_ACCESS_LOG="off",
    )
    try:
        # one keep-alive connection: one worker finds the sick replica
        for _ in range(200):
            async with client.get(f"{instance.url}/files/4k.bin") as resp:
                await resp.read()
            if "replica ejected" in instance.log_text():
                break
        found = time.monotonic()
        seen: dict[int, str] = {}
        while len(seen) < WORKERS or set(seen.values()) != {"ejected"}:
            assert time.monotonic() - found < 10, seen
            async with client.get(
                f"{instance.url}/health", headers={"Connection": "close"}
            ) as resp:
                health = await resp.json()
            seen[health["pid"]] = health["upstreams"][name]["state"]
        assert instance.log_text().count("replica ejected by the fleet") >= WORKERS - 1
    finally:
        instance.stop()


async def per_upstream(
    client: aiohttp.ClientSession, proxy: Process
) -> dict[str, dict[str, float]]:
    """/metrics' per-upstream series of proxied requests: {upstream: {series: value}}, the
    status classes, causes and histogram buckets of a series added up."""
    from prometheus_client.parser import text_string_to_metric_families

    text = await (await client.get(f"{proxy.url}/metrics")).text()
    wanted = (
        "fileproxy_requests_total",
        "fileproxy_response_bytes_total",
        "fileproxy_request_duration_seconds_count",
        "fileproxy_request_terminations_total",
    )
    got: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                series = got.setdefault(sample.labels["upstream"], dict.fromkeys(wanted, 0.0))
                series[sample.name] += sample.value
    return got


async def test_metrics_credit_each_request_to_the_replica_that_served_it(
    start_replica, start_proxy, client
):
    replicas = [start_replica(), start_replica(), start_replica()]
    proxy = start_proxy(replica_list(*replicas))

    async def worker() -> None:
        for _ in range(30):
            async with client.get(f"{proxy.url}/files/4k.bin") as resp:
                assert resp.status == 200
                await resp.read()

    await asyncio.gather(*(worker() for _ in range(4)))
    served = {f"127.0.0.1:{r.port}": (await counts(client, r)).get("GET", 0) for r in replicas}
    assert sum(served.values()) == 120
    assert sum(n > 0 for n in served.values()) >= 2, served  # spread, or this proves nothing
    metrics = await per_upstream(client, proxy)
    assert set(metrics) == set(served), metrics
    for name, count in served.items():
        assert metrics[name] == {
            "fileproxy_requests_total": count,
            "fileproxy_response_bytes_total": count * FILES["4k.bin"],
            "fileproxy_request_duration_seconds_count": count,
            "fileproxy_request_terminations_total": count,
        }, (name, metrics, served)


async def test_a_resumed_download_is_credited_to_the_replica_that_finished_it(
    start_replica, start_proxy, client
):
    bad = start_replica(reset_after=256 * 1024)  # cuts every body: never finishes one
    good = start_replica()
    bad_name, good_name = f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"
    # bad weighs more, so that downloads start there; never ejected, so they keep doing so
    proxy = start_proxy(f"{bad.url};weight=4,{good.url}", FILEPROXY_EJECT_AFTER="0")
    expected = digest("1m.bin")
    gate = asyncio.Semaphore(3)

    async def one() -> tuple[int, str, int]:
        async with gate:
            return await download(client, f"{proxy.url}/files/1m.bin")

    results = await asyncio.gather(*(one() for _ in range(12)))
    assert results == [(200, expected, FILES["1m.bin"])] * 12
    assert (await counts(client, bad)).get("GET", 0) > 0
    stats = await get_json(client, f"{proxy.url}/stats")
    assert stats["resumes"]["ok"] > 0 and stats["resumes"]["failed"] == 0, stats["resumes"]

    deadline = time.monotonic() + 15  # access lines are written in batches (~1 s)
    while len(lines := [x for x in access_lines(proxy) if x["path"] == "/files/1m.bin"]) < 12:
        assert time.monotonic() < deadline, lines
        await asyncio.sleep(0.2)
    resumed = [line for line in lines if line.get("resumes")]
    assert len(resumed) == stats["resumes"]["ok"], lines
    assert {line["upstream"] for line in resumed} == {good_name}, resumed
    assert {line["upstream"] for line in lines} == {good_name}, lines

    metrics = await per_upstream(client, proxy)
    assert metrics[bad_name]["fileproxy_requests_total"] == 0, metrics
    assert metrics[bad_name]["fileproxy_response_bytes_total"] == 0, metrics
    assert metrics[good_name]["fileproxy_requests_total"] == 12, metrics
    assert metrics[good_name]["fileproxy_response_bytes_total"] == 12 * FILES["1m.bin"], metrics


@pytest.mark.parametrize("eject_after", ["0", "5"])
async def test_an_outage_one_request_at_a_time_is_not_multiplied(
    eject_after, start_replica, start_proxy, client
):
    """Issue 20.13: every replica answers 503 and GETs come one at a time. The budget's
    floor (3 retries in progress) always held at one request in flight, so each GET went
    to every replica; the retry throttle stops retries once the tries keep failing."""
    failing = [start_replica(status=503) for _ in range(3)]
    proxy = start_proxy(replica_list(*failing), FILEPROXY_EJECT_AFTER=eject_after)
    n = 60
    for _ in range(n):
        async with client.get(f"{proxy.url}/files/4k.bin") as resp:
            assert resp.status == 503
            await resp.read()
    reached = sum([(await counts(client, r)).get("GET", 0) for r in failing])
    stats = await get_json(client, f"{proxy.url}/stats")
    print(f"\n{n} GETs, eject_after {eject_after}: {reached} tries ({reached / n:.2f}/GET)")
    assert n < reached <= 1.15 * n, (reached, stats["retries"])
    assert stats["retries"]["refused_by_throttle"] > 0, stats["retries"]


async def test_a_resume_that_cannot_connect_costs_the_retry_throttle_nothing(
    start_replica, start_proxy, client
):
    """A connect failure reached no upstream: it costs the retry throttle no token, on a
    resume's ask as on a try (else a dead replica drains the throttle of every request
    resumed past it, and the fleet loses its retries)."""
    cutting = start_replica(reset_after=MIB)  # each body cut after 1 MiB
    closed = f"http://127.0.0.1:{free_port()}"  # refuses every connection
    proxy = start_proxy(
        replica_list(cutting, closed),
        FILEPROXY_EJECT_AFTER="0",  # the closed one stays in the resume's order
        FILEPROXY_RESUMES="1",
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await download(client, f"{proxy.url}/files/16m.bin")
    stats = await get_json(client, f"{proxy.url}/stats")
    assert stats["resumes"] == {"ok": 1, "failed": 1}, stats["resumes"]
    # of the 20 tokens the throttle starts with (the first answer gives back none: it is
    # full), the cut the resume followed costs one, the closed port's refusal none
    assert stats["retries"]["throttle_tokens"] == 19.0, stats["retries"]
