"""A bench-only server-sent-events backend: one event every N ms per stream.

    python -m bench.sse_backend --bind 0.0.0.0:8090 --workers 2 --backlog 4096

Each worker is a forked process with its own uvloop event loop and its own
listening socket (SO_REUSEPORT: the kernel spreads connections evenly), with
the backlog asked for. Not gunicorn's aiohttp worker: that one listens again
with aiohttp's default backlog of 128 (whatever gunicorn's --backlog says),
and the backend's accept queue would overflow in the SSE soak.

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

import argparse
import asyncio
import contextlib
import os
import resource
import signal
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


def serve(host: str, port: int, backlog: int) -> None:
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        make_app(), host=host, port=port, backlog=backlog, reuse_port=True, access_log=None,
        print=None, loop=loop, shutdown_timeout=1,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", default="127.0.0.1:8090")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                serve(host, int(port), args.backlog)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # SIGTERM / SIGINT to this parent stops the workers too (aiohttp shuts down)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue


if __name__ == "__main__":
    main()
