"""A bench-only server-sent-events backend: one event every N ms per stream.

    gunicorn bench.sse_backend:app -k aiohttp.GunicornUVLoopWebWorker -w 2 -b 127.0.0.1:8090

``GET /sse?interval_ms=100&count=0&pad=0``: ``text/event-stream``, chunked, with
``Cache-Control: no-cache`` and ``X-Accel-Buffering: no`` (so nginx relays each
event at once, as an operator serving SSE behind nginx would arrange). Event i
is ``id: i\\ndata: i T PAD\\n\\n`` where T is the backend's wall clock in
milliseconds when it was written (the client measures delivery delay from it;
both run on this machine) and PAD is ``pad`` bytes of "x". The first event goes
out right after the headers; the next ones on a fixed schedule (no drift).
``count`` 0 = until the client goes away. Any other path answers 200 with a
short body (the readiness check of bench.run asks for /1k.bin).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: not an integer\n") from None
    return min(max(value, low), high)


async def sse(request: web.Request) -> web.StreamResponse:
    interval = _int(request, "interval_ms", 100, 1, 3_600_000) / 1000
    count = _int(request, "count", 0, 0, 10**12)
    pad = b"x" * _int(request, "pad", 0, 0, 65536)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    sent = 0
    try:
        while not count or sent < count:
            if sent:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            sent += 1
            stamp = int(time.time() * 1000)
            await response.write(b"id: %d\ndata: %d %d %s\n\n" % (sent, sent, stamp, pad))
    except ConnectionError:  # the client (or the proxy) went away
        response.force_close()
    return response


async def other(request: web.Request) -> web.Response:
    return web.Response(body=b"sse backend\n", content_type="text/plain")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


app = make_app()
