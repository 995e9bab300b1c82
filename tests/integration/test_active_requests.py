"""FILEPROXY_ACTIVE_REQUESTS: requests beyond it wait their turn; probes go first."""

import asyncio
import time

from aiohttp import web

from tests.conftest import get_json


def _parking_backend(
    concurrent: list[int], release: asyncio.Event, order: list[str] | None = None
) -> web.Application:
    """/park waits for ``release``; concurrent = [now, peak, served]; ``order``: the
    ``n`` of each request as it arrived. /stream: SSE, its second event after release."""

    async def park(request: web.Request) -> web.Response:
        if order is not None:
            order.append(request.query.get("n", ""))
        concurrent[0] += 1
        concurrent[1] = max(concurrent[1], concurrent[0])
        try:
            await release.wait()
        finally:
            concurrent[0] -= 1
        concurrent[2] += 1
        return web.Response(text=request.query.get("n", ""))

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: last\n\n")
        return response

    app = web.Application()
    app.router.add_get("/park", park)
    app.router.add_get("/stream", stream)
    return app


async def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_requests_beyond_the_limit_wait_in_order_and_all_complete(
    start_backend, start_proxy, client
):
    concurrent, release, order = [0, 0, 0], asyncio.Event(), []
    backend = await start_backend(_parking_backend(concurrent, release, order))
    proxy = start_proxy(
        backend.url, FILEPROXY_ACTIVE_REQUESTS="2", HTTP_CONNECTOR_LIMIT_PER_HOST="0"
    )
    tasks = []
    for n in range(6):
        tasks.append(asyncio.create_task(client.get(f"{proxy.url}/park?n={n}")))
        await asyncio.sleep(0.05)  # a known arrival order
    await _wait_until(lambda: concurrent[1] >= 2)
    await asyncio.sleep(1.0)  # time for more to reach the backend, were they let through
    assert concurrent[1] == 2

    # The probes are answered while the gate is full, and say so.
    health = await get_json(client, f"{proxy.url}/health")
    assert health["active_requests"] == {"limit": 2, "active": 2, "waiting": 4}
    async with client.get(f"{proxy.url}/ready") as ready:
        assert ready.status in (200, 503)

    release.set()
    bodies = []
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 200
        bodies.append(await resp.text())
        resp.release()
    assert bodies == [str(n) for n in range(6)]
    assert order == [str(n) for n in range(6)]  # let in first come, first served
    assert concurrent[1] == 2
    health = await get_json(client, f"{proxy.url}/health")
    assert health["active_requests"] == {"limit": 2, "active": 0, "waiting": 0}


async def test_a_relayed_stream_gives_its_place_back(start_backend, start_proxy, client):
    concurrent, release = [0, 0, 0], asyncio.Event()
    backend = await start_backend(_parking_backend(concurrent, release))
    proxy = start_proxy(backend.url, FILEPROXY_ACTIVE_REQUESTS="1")
    async with client.get(f"{proxy.url}/stream") as stream:
        assert stream.status == 200
        assert await stream.content.readline() == b"data: first\n"
        # the stream is open and relayed; a second request still gets the one place
        health = await get_json(client, f"{proxy.url}/health")
        assert health["active_requests"]["active"] == 0
        parked = asyncio.create_task(client.get(f"{proxy.url}/park?n=7"))
        await _wait_until(lambda: concurrent[0] == 1)
        release.set()
        resp = await parked
        assert await resp.text() == "7"
        resp.release()
        rest = await stream.content.read()
        assert rest == b"\ndata: last\n\n"


async def test_a_client_gone_while_waiting_frees_nothing_twice(start_backend, start_proxy, client):
    concurrent, release = [0, 0, 0], asyncio.Event()
    backend = await start_backend(_parking_backend(concurrent, release))
    proxy = start_proxy(backend.url, FILEPROXY_ACTIVE_REQUESTS="1")
    first = asyncio.create_task(client.get(f"{proxy.url}/park?n=1"))
    await _wait_until(lambda: concurrent[0] == 1)
    # three clients queue behind it and go away before their turn
    for n in range(3):
        waiting = asyncio.create_task(client.get(f"{proxy.url}/park?n=w{n}"))
        await asyncio.sleep(0.1)
        waiting.cancel()
    last = asyncio.create_task(client.get(f"{proxy.url}/park?n=2"))
    await asyncio.sleep(0.3)
    release.set()
    for task, body in ((first, "1"), (last, "2")):
        resp = await task
        assert await resp.text() == body
        resp.release()
    await _wait_until(lambda: concurrent[0] == 0)
    health = await get_json(client, f"{proxy.url}/health")
    assert health["active_requests"] == {"limit": 1, "active": 0, "waiting": 0}
    assert concurrent[1] == 1


async def test_no_limit_reports_none(sample_upstream, start_proxy, client):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_ACTIVE_REQUESTS="0")
    health = await get_json(client, f"{proxy.url}/health")
    assert health["active_requests"] is None
