"""FILEPROXY_ACTIVE_REQUESTS: requests beyond it wait their turn; probes go first."""

import asyncio
import time

from aiohttp import web

from tests.conftest import get_json, parking_backend


def _parking_backend(concurrent: list[int], release: asyncio.Event) -> web.Application:
    """conftest's /park, and /stream: SSE, its second event after ``release``."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: last\n\n")
        return response

    app = parking_backend(concurrent, release)
    app.router.add_get("/stream", stream)
    return app


async def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _gate(client, proxy) -> dict:
    return (await get_json(client, f"{proxy.url}/health"))["active_requests"]


async def test_requests_waiting_on_a_slow_upstream_hold_no_place(
    start_backend, start_proxy, client
):
    concurrent, release = [0, 0], asyncio.Event()
    backend = await start_backend(_parking_backend(concurrent, release))
    proxy = start_proxy(backend.url, FILEPROXY_ACTIVE_REQUESTS="1")
    tasks = [asyncio.create_task(client.get(f"{proxy.url}/park?n={n}")) for n in range(6)]
    # one place, yet all six reach the backend: each gives its place to the next
    # once it has waited UPSTREAM_HOLD_S for its upstream
    await _wait_until(lambda: concurrent[0] == 6)
    gate = await _gate(client, proxy)  # /health is answered meanwhile
    assert (gate["limit"], gate["waiting"]) == (1, 0)
    assert gate["active"] <= 1  # the last one keeps its place until someone needs it
    release.set()
    for n, resp in enumerate(await asyncio.gather(*tasks)):
        assert resp.status == 200 and await resp.text() == str(n)
        resp.release()


async def test_a_relayed_stream_holds_no_place(start_backend, start_proxy, client):
    concurrent, release = [0, 0], asyncio.Event()
    backend = await start_backend(_parking_backend(concurrent, release))
    proxy = start_proxy(backend.url, FILEPROXY_ACTIVE_REQUESTS="1")
    async with client.get(f"{proxy.url}/stream") as stream:
        assert stream.status == 200
        assert await stream.content.readline() == b"data: first\n"
        assert (await _gate(client, proxy))["active"] == 0
        parked = asyncio.create_task(client.get(f"{proxy.url}/park?n=7"))
        await _wait_until(lambda: concurrent[0] == 1)
        release.set()
        resp = await parked
        assert await resp.text() == "7"
        resp.release()
        assert await stream.content.read() == b"\ndata: last\n\n"


async def _hang_up_after_sending(port: int, path: str) -> None:
    """A client that sends its request and goes away without reading the answer."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    writer.transport.abort()


async def test_under_load_requests_queue_for_one_place_and_all_complete(
    sample_upstream, start_proxy, client
):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_ACTIVE_REQUESTS="1")
    expected = await (await client.get(f"{sample_upstream.url}/files/4k.bin")).read()

    async def fetch_ten() -> None:
        for _ in range(10):
            async with client.get(f"{proxy.url}/files/4k.bin") as resp:
                assert resp.status == 200
                assert await resp.read() == expected

    async def hang_up_five() -> None:
        for _ in range(5):
            await _hang_up_after_sending(proxy.port, "/files/4k.bin")

    await asyncio.wait_for(
        asyncio.gather(*(fetch_ten() for _ in range(40)), *(hang_up_five() for _ in range(10))),
        60,
    )
    await asyncio.sleep(0.5)  # the last hung-up connections are noticed
    gate = await _gate(client, proxy)
    assert (gate["active"], gate["waiting"]) == (0, 0)  # no place lost or leaked
    assert gate["waited_total"] > 0  # 50 clients on one place: some waited their turn


async def test_no_limit_reports_none(sample_upstream, start_proxy, client):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_ACTIVE_REQUESTS="0")
    assert (await get_json(client, f"{proxy.url}/health"))["active_requests"] is None
