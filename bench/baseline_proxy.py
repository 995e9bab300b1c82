"""The seed's "before": a plain aiohttp reverse proxy with the seed's original values.

What the old FileProxy measured its promised gains against, rebuilt for the
benchmark: one shared ClientSession per worker with

- TCPConnector(limit=100, limit_per_host=30, keepalive_timeout=30, ttl_dns_cache=500)
- ClientTimeout(total=45, connect=8)  -- a *total*: a download longer than 45 s dies
- response bodies relayed with ``iter_chunked(8192)`` (8 KiB chunks)
- a 64 KiB read buffer (``read_bufsize=65536``)

and nothing adaptive: no rate limit, no socket options, no /health or /stats.
Correct enough to be fair: hop-by-hop headers are dropped, Content-Length and
everything else passes through, redirects are not followed, bodies are not
decompressed and request bodies are streamed.

    BASELINE_UPSTREAM=http://127.0.0.1:8080 gunicorn bench.baseline_proxy:app \\
        -k aiohttp.GunicornWebWorker -w 2 -b 0.0.0.0:8082

(`GunicornWebWorker` is asyncio's own loop; ``-k aiohttp.GunicornUVLoopWebWorker``
for uvloop.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

UPSTREAM = os.environ.get("BASELINE_UPSTREAM", "http://127.0.0.1:8080").rstrip("/")

CONNECTOR_LIMIT = 100
CONNECTOR_LIMIT_PER_HOST = 30
KEEPALIVE_TIMEOUT = 30
CONNECT_TIMEOUT = 8
TOTAL_TIMEOUT = 45
DNS_CACHE_TTL = 500
CHUNK_SIZE = 8192
BUFFER_SIZE = 65536

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

SESSION = web.AppKey("session", aiohttp.ClientSession)


def _forwardable(source: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    named = {
        token.strip().lower()
        for value in source.getall("Connection", [])
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in source.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            out.add(name, value)
    return out


async def proxy(request: web.Request) -> web.StreamResponse:
    headers = _forwardable(request.headers)
    headers.popall("Host", None)
    body = request.content if request.body_exists else None
    async with request.app[SESSION].request(
        request.method,
        UPSTREAM + request.path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_forwardable(upstream.headers),
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK_SIZE):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(
        limit=CONNECTOR_LIMIT,
        limit_per_host=CONNECTOR_LIMIT_PER_HOST,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        ttl_dns_cache=DNS_CACHE_TTL,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT),
        read_bufsize=BUFFER_SIZE,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
    )
    app[SESSION] = session
    yield
    await session.close()


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


app = make_app()


if __name__ == "__main__":
    bind = os.environ.get("BASELINE_BIND", "127.0.0.1:8082")
    host, _, port = bind.rpartition(":")
    web.run_app(app, host=host, port=int(port), access_log=None)
