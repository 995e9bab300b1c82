"""The adaptive engine against real backends: quality level, AIMD limit, TCP options."""

import asyncio
import time

from aiohttp import web

from tests.conftest import get_json


async def _upstream_stats(client, proxy) -> dict:
    stats = await get_json(client, f"{proxy.url}/stats")
    (upstream,) = stats["upstreams"].values()
    return {"top": stats["performance_optimizer"], **upstream}


class Load:
    """``workers`` clients requesting ``url`` in a loop, ``pace`` s apart, until stopped."""

    def __init__(self, client, url: str, workers: int, pace: float) -> None:
        self.statuses: list[int] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(client, url, pace)) for _ in range(workers)]

    async def _run(self, client, url: str, pace: float) -> None:
        while not self._stop.is_set():
            async with client.get(url) as resp:
                await resp.read()
                self.statuses.append(resp.status)
            await asyncio.sleep(pace)

    async def stop(self) -> list[int]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.statuses


async def test_backend_latency_moves_the_quality_level(start_backend, start_proxy, client):
    delay = [0.0]

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(delay[0])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/item", answer)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)
    load = Load(client, f"{proxy.url}/item", workers=4, pace=0.05)
    statuses = load.statuses

    async def level_becomes(expected: str, within: float) -> dict:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            upstream = await _upstream_stats(client, proxy)
            if upstream["quality"]["level"] == expected and upstream["quality"]["estimated"]:
                return upstream
            await asyncio.sleep(0.25)
        raise AssertionError(f"level did not become {expected}: {upstream['quality']}")

    try:
        good = await level_becomes("good", within=20)
        assert good["profile"]["source"] == "level"
        assert good["top"]["quality_level"] == "good"
        delay[0] = 0.2  # 200 ms to response headers: the poor band (150..300 ms)
        poor = await level_becomes("poor", within=20)
        transition = poor["quality"]["transitions"][-1]
        assert transition["to"] == "poor"
        assert poor["profile"]["chunk_size"] == 64 * 1024  # the throughput preset's poor row
        assert poor["profile"]["headers_timeout_s"] == 90.0
    finally:
        await load.stop()
    assert set(statuses) == {200}  # adaptation never refused a healthy upstream


async def test_failing_backend_lowers_the_limit_and_recovery_raises_it(
    start_backend, start_proxy, client
):
    failing = [False]
    served = [0]

    async def answer(request: web.Request) -> web.Response:
        served[0] += 1
        if failing[0] and served[0] % 2:
            return web.Response(status=500, text="broken")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/item", answer)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)
    load = Load(client, f"{proxy.url}/item", workers=6, pace=0.005)
    statuses = load.statuses
    try:
        await asyncio.sleep(2.5)
        healthy = await _upstream_stats(client, proxy)
        assert healthy["limiter"]["enforcing"] is False
        assert 503 not in statuses
        before = healthy["top"]["current_rate_limit"]

        failing[0] = True
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            cut = await _upstream_stats(client, proxy)
            if cut["limiter"]["enforcing"] and 503 in statuses:
                break
            await asyncio.sleep(0.25)
        assert cut["limiter"]["enforcing"], cut["limiter"]
        lowest = cut["top"]["current_rate_limit"]
        assert lowest < before
        assert any(
            d["reason"].startswith(("cut", "severe cut")) for d in cut["limiter"]["decisions"]
        )
        assert 503 in statuses

        failing[0] = False
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            recovered = await _upstream_stats(client, proxy)
            if recovered["top"]["current_rate_limit"] > lowest * 1.5:
                break
            await asyncio.sleep(0.25)
        assert recovered["top"]["current_rate_limit"] > lowest * 1.5, recovered["limiter"]
    finally:
        await load.stop()

    async with client.get(f"{proxy.url}/item") as resp:
        if resp.status == 503:
            assert resp.headers["Retry-After"].isdigit()
            body = await resp.json()
            assert body["error"] == "rate_limited" and body["request_id"]
    metrics = await get_json(client, f"{proxy.url}/stats")
    (upstream,) = metrics["upstreams"].values()
    assert upstream["limiter"]["rejected_total"] == statuses.count(503)


async def test_limit_status_can_be_429(start_backend, start_proxy, client):
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=502, text="down")

    app = web.Application()
    app.router.add_get("/item", broken)
    backend = await start_backend(app)
    proxy = start_proxy(
        backend.url,
        FILEPROXY_LIMIT_STATUS="429",
        FILEPROXY_LIMIT_MIN="1",
        FILEPROXY_LIMIT_INITIAL="5",
    )
    load = Load(client, f"{proxy.url}/item", workers=4, pace=0.005)
    statuses = load.statuses
    deadline = time.monotonic() + 20
    while 429 not in statuses and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await load.stop()
    assert 429 in statuses
    assert 503 not in statuses


async def test_optimizer_off_never_limits(start_backend, start_proxy, client):
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="down")

    app = web.Application()
    app.router.add_get("/item", broken)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url, FILEPROXY_OPTIMIZER="off")
    load = Load(client, f"{proxy.url}/item", workers=4, pace=0.005)
    statuses = load.statuses
    await asyncio.sleep(3)
    await load.stop()
    assert statuses and set(statuses) == {500}  # passed through, never refused


async def test_tcp_options_are_applied_to_accepted_and_upstream_sockets(
    sample_upstream, start_proxy, client
):
    proxy = start_proxy(
        sample_upstream.url,
        FILEPROXY_TCP_KEEPIDLE="33",
        FILEPROXY_TCP_KEEPINTVL="7",
        FILEPROXY_TCP_KEEPCNT="4",
        FILEPROXY_TCP_USER_TIMEOUT="30000",
        FILEPROXY_SO_SNDBUF="262144",
        FILEPROXY_TCP_NOTSENT_LOWAT="131072",
    )
    async with client.get(f"{proxy.url}/files/4k.bin") as resp:
        assert resp.status == 200
        await resp.read()  # leaves a pooled upstream connection
    tcp = (await get_json(client, f"{proxy.url}/health"))["tcp"]
    assert tcp["listen_refused"] == [] and tcp["upstream_refused"] == []
    for side in ("client_socket", "upstream_socket"):
        readback = tcp[side]
        assert readback is not None, side
        assert readback["TCP_NODELAY"] == 1
        assert readback["SO_KEEPALIVE"] == 1
        assert readback["TCP_KEEPIDLE"] == 33
        assert readback["TCP_KEEPINTVL"] == 7
        assert readback["TCP_KEEPCNT"] == 4
        assert readback["TCP_USER_TIMEOUT"] == 30000
        assert readback["SO_SNDBUF"] == 2 * 262144  # the kernel doubles it
        assert readback["TCP_NOTSENT_LOWAT"] == 131072


async def test_default_tcp_options_leave_buffers_to_autotuning(
    sample_upstream, start_proxy, client
):
    proxy = start_proxy(sample_upstream.url)
    tcp = (await get_json(client, f"{proxy.url}/health"))["tcp"]
    assert tcp["options"] == {
        "TCP_NODELAY": 1,
        "SO_KEEPALIVE": 1,
        "TCP_KEEPIDLE": 60,
        "TCP_KEEPINTVL": 10,
        "TCP_KEEPCNT": 6,
    }
    assert tcp["client_socket"]["TCP_KEEPIDLE"] == 60


async def test_new_upstream_connections_are_timed_pooled_ones_are_not(
    start_backend, start_proxy, client
):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/item", answer)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)
    for _ in range(5):  # sequential: one pooled upstream connection serves them all
        async with client.get(f"{proxy.url}/item") as resp:
            assert resp.status == 200
            await resp.read()
    upstream = await _upstream_stats(client, proxy)
    samples = upstream["quality"]["samples"]
    assert samples["connect_total"] == 1
    assert samples["http_total"] == 5
