"""A replica for the tests of several upstreams: the sample upstream's files (ETag, Range,
If-Range), with faults a test asks for on the command line.

    python -m tests.replica_backend --port PORT [--seed N] [--ttfb S] [--reset-after BYTES]
        [--pace BYTES_PER_S] [--status CODE] [--range-ttfb S] [--first-ttfb S]

- ``--ttfb``: seconds before every response head.
- ``--reset-after``: every body is cut (connection aborted) after this many bytes.
- ``--pace``: bodies are sent at about this many bytes per second.
- ``--status``: every request under /files is answered with this status (and its body read).
- ``--range-ttfb``: seconds before the head of a request with ``Range`` (a resume's ask).
- ``--first-ttfb``: seconds before the head of the first request under /files (one slow
  answer, as from a cold start).
- ``GET /_count``: JSON of the requests under /files received so far, by method.
- ``GET /_arrivals``: JSON list of their arrival times (``time.monotonic``, which is one
  clock for every process of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from aiohttp import web

from fileproxy.sample_upstream import FILES, etag_for, file_bytes

CHUNK = 64 * 1024


def create_app(args: argparse.Namespace) -> web.Application:
    counts: Counter[str] = Counter()
    arrivals: list[float] = []

    async def count(request: web.Request) -> web.Response:
        return web.json_response(dict(counts))

    async def arrived(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def serve(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        counts[request.method] += 1
        if args.first_ttfb and len(arrivals) == 1:
            await asyncio.sleep(args.first_ttfb)
        if request.can_read_body:
            await request.read()
        if args.ttfb:
            await asyncio.sleep(args.ttfb)
        if args.range_ttfb and "Range" in request.headers:
            await asyncio.sleep(args.range_ttfb)
        if args.status:
            return web.json_response({"status": args.status}, status=args.status)
        if request.method == "POST":
            await request.read()  # as a real backend: the whole upload, then the answer
            return web.json_response({"posted": True})
        name = request.match_info["name"]
        size = FILES.get(name)
        if size is None:
            raise web.HTTPNotFound()
        etag = etag_for(name, args.seed)
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        start, end, status = 0, size, 200
        wanted = request.headers.get("Range", "")
        if_range = request.headers.get("If-Range")
        if wanted.startswith("bytes=") and (if_range is None or if_range == etag):
            first, _, last = wanted[len("bytes=") :].partition("-")
            start = int(first)
            end = int(last) + 1 if last else size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        sent, began = 0, time.monotonic()
        pending = b""
        for block in file_bytes(name, start, end, args.seed):
            pending += block
            while len(pending) >= CHUNK or (pending and sent + len(pending) == end - start):
                piece, pending = pending[:CHUNK], pending[CHUNK:]
                if args.reset_after is not None and sent + len(piece) > args.reset_after:
                    await response.write(piece[: max(0, args.reset_after - sent)])
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(piece)
                sent += len(piece)
                if args.pace:
                    ahead = sent / args.pace - (time.monotonic() - began)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        return response

    app = web.Application()
    app.router.add_get("/_count", count)
    app.router.add_get("/_arrivals", arrived)
    app.router.add_route("*", "/files/{name}", serve)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttfb", type=float, default=0.0)
    parser.add_argument("--reset-after", type=int, default=None)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=0)
    parser.add_argument("--range-ttfb", type=float, default=0.0)
    parser.add_argument("--first-ttfb", type=float, default=0.0)
    args = parser.parse_args()
    web.run_app(create_app(args), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
