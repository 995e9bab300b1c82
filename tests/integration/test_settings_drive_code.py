"""Each of the seed's variables drives the code it names, observed from outside."""

import asyncio
import time

from aiohttp import web

from fileproxy.settings import Settings
from fileproxy.state.redis_store import RedisStore
from fileproxy.upstream.client import UpstreamClient
from tests.conftest import get_json, parking_backend


async def _peak_concurrency(start_backend, start_proxy, client, requests: int, **env: str) -> int:
    concurrent, release = [0, 0], asyncio.Event()
    backend = await start_backend(parking_backend(concurrent, release))
    proxy = start_proxy(backend.url, **env)
    tasks = [asyncio.create_task(client.get(f"{proxy.url}/park")) for _ in range(requests)]
    deadline = time.monotonic() + 10
    while not concurrent[1] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # time for the proxy to send more, were it not limited
    peak = concurrent[1]
    release.set()
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 200
        resp.release()
    return peak


async def test_connector_limit_per_host_caps_concurrent_upstream_requests(
    start_backend, start_proxy, client
):
    peak = await _peak_concurrency(
        start_backend, start_proxy, client, 6, HTTP_CONNECTOR_LIMIT_PER_HOST="2"
    )
    assert peak == 2


async def test_connector_limit_caps_concurrent_upstream_requests(
    start_backend, start_proxy, client
):
    peak = await _peak_concurrency(
        start_backend,
        start_proxy,
        client,
        6,
        HTTP_CONNECTOR_LIMIT="3",
        HTTP_CONNECTOR_LIMIT_PER_HOST="0",
    )
    assert peak == 3


async def _idle_connections(client, proxy_url: str) -> int:
    health = await get_json(client, f"{proxy_url}/health")
    return int(health["upstream"]["connections"]["idle"])


async def test_keepalive_timeout_closes_idle_upstream_connections(
    start_backend, start_proxy, client, sample_upstream
):
    short = start_proxy(sample_upstream.url, HTTP_KEEPALIVE_TIMEOUT="1")
    default = start_proxy(sample_upstream.url)
    for proxy in (short, default):
        async with client.get(f"{proxy.url}/files/4k.bin") as resp:
            assert resp.status == 200
            await resp.read()
        assert await _idle_connections(client, proxy.url) == 1
    deadline = time.monotonic() + 15
    while await _idle_connections(client, short.url) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await _idle_connections(client, short.url) == 0
    assert await _idle_connections(client, default.url) == 1  # 60 s default: still pooled


async def _chunk_sizes_through(proxy_port: int, path: str) -> list[int]:
    """Read a chunked response over a raw socket and return its chunk sizes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    sizes = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            break
        await reader.readexactly(size + 2)
        sizes.append(size)
    writer.close()
    return sizes


async def test_stream_chunk_size_bounds_each_write(start_backend, start_proxy):
    async def bulk(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # no length: the proxy re-chunks what it writes
        await resp.prepare(request)
        for _ in range(8):
            await resp.write(b"x" * 1024 * 1024)
        return resp

    app = web.Application()
    app.router.add_get("/bulk", bulk)
    backend = await start_backend(app)
    for chunk_size in (4096, 65536):
        proxy = start_proxy(backend.url, STREAM_CHUNK_SIZE=str(chunk_size))
        sizes = await _chunk_sizes_through(proxy.port, "/bulk")
        assert sum(sizes) == 8 * 1024 * 1024
        assert max(sizes) == chunk_size


async def _bytes_written_while_client_stalls(start_backend, start_proxy, **env: str) -> int:
    written = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(1 << 30)})
        await resp.prepare(request)
        block = b"y" * 65536
        while written[0] < 1 << 30:
            await resp.write(block)
            written[0] += len(block)
        return resp

    app = web.Application()
    app.router.add_get("/endless", endless)
    backend = await start_backend(app)
    # the relay's own backpressure: with the spool on, a stalled client's response would
    # spill to disk instead (bounded by FILEPROXY_SPOOL_MAX_FILE, see test_spool.py)
    proxy = start_proxy(backend.url, FILEPROXY_SPOOL="off", **env)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    previous = -1
    while written[0] != previous:  # until the upstream is paused by backpressure
        previous = written[0]
        await asyncio.sleep(1.0)
    writer.close()
    return written[0]


async def test_buffer_size_bounds_what_is_buffered_per_stream(start_backend, start_proxy):
    small = await _bytes_written_while_client_stalls(
        start_backend, start_proxy, BUFFER_SIZE="65536"
    )
    large = await _bytes_written_while_client_stalls(
        start_backend, start_proxy, BUFFER_SIZE=str(32 * 1024 * 1024)
    )
    # Kernel socket buffers hold a few MiB either way; a 32 MiB buffer lets the
    # proxy hold tens of MiB more of the stalled stream than a 64 KiB one.
    assert small < 48 * 1024 * 1024
    assert large - small > 24 * 1024 * 1024


async def test_dns_cache_ttl_and_pool_settings_reach_the_pool():
    settings = Settings.from_env(
        {
            "HTTP_DNS_CACHE_TTL": "123",
            "BUFFER_SIZE": "65536",
            "HTTP_CONNECTOR_LIMIT": "7",
            "HTTP_CONNECTOR_LIMIT_PER_HOST": "5",
            "HTTP_KEEPALIVE_TIMEOUT": "9",
        }
    )
    upstream = UpstreamClient(settings)
    try:
        assert upstream.pool._dns_ttl == 123
        assert upstream.pool._limit == 5  # one upstream host: the smaller of the two
        assert upstream.pool._keepalive == 9
        assert upstream.read_bufsize == 65536
    finally:
        await upstream.close()
    unlimited_per_host = UpstreamClient(
        Settings.from_env({"HTTP_CONNECTOR_LIMIT": "7", "HTTP_CONNECTOR_LIMIT_PER_HOST": "0"})
    )
    try:
        assert unlimited_per_host.pool._limit == 7
    finally:
        await unlimited_per_host.close()


async def test_redis_settings_shape_the_client():
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "REDIS_POOL_SIZE": "7",
            "FILEPROXY_REDIS_TIMEOUT": "0.3",
        }
    )
    store = RedisStore(settings)
    try:
        pool = store.client.connection_pool
        assert pool.max_connections == 7
        assert pool.timeout == 0.3  # a full pool makes a caller wait this long, not forever
        assert pool.connection_kwargs["socket_timeout"] == 0.3
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.3
    finally:
        await store.close()
