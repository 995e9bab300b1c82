"""Streaming through the real daemon: SSE flushed as it arrives, backpressure, bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools

import pytest
from aiohttp import web

from fileproxy.sample_upstream import FILES, file_bytes
from tests.conftest import rss_bytes

MIB = 1024 * 1024


async def test_sse_events_are_flushed_as_they_arrive(start_backend, start_proxy, client):
    loop = asyncio.get_running_loop()
    emitted: list[float] = []

    async def events(request: web.Request) -> web.StreamResponse:
        # no X-Accel-Buffering here: the proxy must add it for a body without a length
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for n in range(5):
            if n:
                await asyncio.sleep(0.3)
            emitted.append(loop.time())
            await resp.write(f"id: {n}\nevent: tick\ndata: {n}\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_get("/events", events)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)

    arrivals: list[float] = []
    ids: list[str] = []
    async with client.get(f"{proxy.url}/events") as resp:
        assert resp.status == 200
        assert resp.headers.get("X-Accel-Buffering") == "no", resp.headers
        assert "Content-Length" not in resp.headers, resp.headers
        assert resp.content_type == "text/event-stream"
        event_id = None
        async for line in resp.content:
            if line.startswith(b"id: "):
                event_id = line[4:].strip().decode()
            elif line == b"\n":
                arrivals.append(loop.time())
                ids.append(str(event_id))

    assert ids == ["0", "1", "2", "3", "4"]
    # the first event was delivered long before the last one was even emitted
    assert arrivals[0] < emitted[-1] - 0.6, (arrivals, emitted)
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > 0.1 for gap in gaps), gaps


async def test_a_client_that_does_not_read_pauses_the_upstream(start_backend, start_proxy, client):
    written = 0
    piece = bytes(range(256)) * 256  # 64 KiB

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal written
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 1 << 30
        await resp.prepare(request)
        while written < 1 << 30:
            await resp.write(piece)  # returns once the transport has drained: backpressure
            written += len(piece)
        return resp

    app = web.Application()
    app.router.add_get("/huge", huge)
    backend = await start_backend(app)
    # a client that reads nothing spills to the spool (issue 14) until its per-response
    # cap, and then pauses the upstream as before
    proxy = start_proxy(backend.url, FILEPROXY_SPOOL_MAX_FILE=str(8 * MIB))
    rss_before = rss_bytes(proxy.pid)

    resp = await client.get(f"{proxy.url}/huge")
    try:
        assert resp.status == 200
        assert resp.content_length == 1 << 30
        await asyncio.sleep(3)  # the client does not read
        paused_at = written
        assert paused_at < 64 * MIB, f"the upstream wrote {paused_at / MIB:.1f} MiB unread"
        await asyncio.sleep(1)
        assert written < 64 * MIB, f"the upstream wrote {written / MIB:.1f} MiB unread"
        rss_growth = rss_bytes(proxy.pid) - rss_before
        assert rss_growth < 64 * MIB, f"proxy RSS grew {rss_growth / MIB:.1f} MiB"

        # reading again resumes the upstream
        received = 0
        while received < 32 * MIB:  # past what the spool and the buffers held
            chunk = await asyncio.wait_for(resp.content.read(256 * 1024), 10)
            assert chunk
            received += len(chunk)
        assert written > paused_at
    finally:
        resp.close()


def _sha256_of_file(name: str) -> str:
    digest = hashlib.sha256()
    for chunk in file_bytes(name, 0, FILES[name]):
        digest.update(chunk)
    return digest.hexdigest()


async def _sample_rss(pid: int, samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_bytes(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    samples.append(rss_bytes(pid))


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["fast", "slow-start"])
async def test_256m_download_is_intact_and_memory_bounded(
    sample_upstream, start_proxy, client, reader
):
    name = "256m.bin"
    size = FILES[name]
    assert size == 268435456
    proxy = start_proxy(sample_upstream.url)
    async with client.get(f"{proxy.url}/files/1m.bin") as warm_up:  # pools and buffers exist
        assert warm_up.status == 200
        await warm_up.read()

    expected = asyncio.ensure_future(asyncio.to_thread(_sha256_of_file, name))
    baseline = rss_bytes(proxy.pid)
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(proxy.pid, samples, stop))

    digest = hashlib.sha256()
    received = 0
    try:
        async with client.get(f"{proxy.url}/files/{name}") as resp:
            assert resp.status == 200
            assert resp.content_length == size
            while chunk := await resp.content.read(256 * 1024):
                digest.update(chunk)
                received += len(chunk)
                if reader == "slow-start" and received < 24 * MIB:
                    await asyncio.sleep(0.01)  # ~1 s of slow reading against a fast upstream
    finally:
        stop.set()
        await sampler

    assert received == size
    assert digest.hexdigest() == await expected
    growth = max(samples) - baseline
    assert len(samples) >= 3, samples
    assert growth < 64 * MIB, f"proxy RSS grew {growth / MIB:.1f} MiB while streaming {name}"
