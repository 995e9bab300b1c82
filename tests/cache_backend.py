"""A backend for the cache's tests: objects whose headers, pace and failures a test sets, and
a count of the body bytes it sent for each (what the cache is there to save).

``CacheBackend().app()`` is an aiohttp application (run it with the ``start_backend``
fixture, or ``python -m tests.cache_backend PORT JSON`` in its own process). Each object
answers GET/HEAD with its ETag and Last-Modified, a single byte Range (with If-Range),
If-None-Match (304); ``rate`` paces its body (bytes/s); ``status`` makes it answer that
status instead (e.g. 503); ``cut`` closes the connection after that many body bytes. In
its own process it answers each line on its stdin with what it sent and was asked per
path, and when each path's last whole body ended (wall clock).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

PIECE = 64 * 1024


def object_bytes(seed: int, length: int) -> bytes:
    generator = random.Random(seed)
    piece = 64 * 1024 * 1024  # randbytes of more overflows
    return b"".join(generator.randbytes(min(piece, length - at)) for at in range(0, length, piece))


@dataclass
class Obj:
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = '"v1"'
    rate: float = 0.0  # bytes/s, 0: at once
    status: int = 0  # answer this instead
    cut: int | None = None  # close after this many body bytes
    extra: list[tuple[str, str]] = field(default_factory=list)  # repeated fields
    head_delay: float = 0.0  # seconds before the response head
    vary_on: str | None = None  # a request field that picks the body from ``variants``
    variants: dict[str, bytes] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class CacheBackend:
    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.sent: Counter[str] = Counter()  # body bytes sent per path
        self.requests: list[tuple[str, dict[str, str], int]] = []  # path, headers, status
        self.finished: dict[str, float] = {}  # path: wall time its last full body ended

    def add(self, path: str, obj: Obj) -> Obj:
        self.objects[path] = obj
        return obj

    def count(self, path: str, status: int | None = None) -> int:
        return sum(1 for p, _, s in self.requests if p == path and status in (None, s))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        obj = self.objects.get(path)
        if obj is not None and obj.head_delay:
            await asyncio.sleep(obj.head_delay)
        if obj is None:
            self.requests.append((path, dict(request.headers), 404))
            return web.Response(status=404)
        if obj.status:
            self.requests.append((path, dict(request.headers), obj.status))
            return web.Response(status=obj.status, text="failing on purpose\n")
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        data, etag = obj.data, obj.etag
        if obj.vary_on is not None:
            picked = request.headers.get(obj.vary_on, "")
            data = obj.variants.get(picked, obj.data)
            etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
            headers["Vary"] = obj.vary_on
        if etag is not None:
            headers["ETag"] = etag
        headers.update(obj.headers)
        inm = request.headers.get("If-None-Match")
        if inm is not None and etag is not None and etag in inm:
            self.requests.append((path, dict(request.headers), 304))
            return web.Response(status=304, headers=headers)
        length = len(data)
        start, end, status = 0, length, 200
        wanted = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        if match and (if_range is None or if_range == etag):
            start = int(match.group(1))
            end = min(length, int(match.group(2)) + 1) if match.group(2) else length
            if start >= length:
                self.requests.append((path, dict(request.headers), 416))
                return web.Response(status=416, headers={"Content-Range": f"bytes */{length}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{length}"
        self.requests.append((path, dict(request.headers), status))
        response = web.StreamResponse(status=status, headers=headers)
        for name, value in obj.extra:
            response.headers.add(name, value)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        began = time.monotonic()
        offset, sent = start, 0
        while offset < end:
            piece = data[offset : min(end, offset + PIECE)]
            if obj.cut is not None and sent + len(piece) > obj.cut:
                piece = piece[: obj.cut - sent]
                await response.write(piece)
                self.sent[path] += len(piece)
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(piece)
            offset += len(piece)
            sent += len(piece)
            self.sent[path] += len(piece)
            if obj.rate:
                ahead = sent / obj.rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await response.write_eof()
        self.finished[path] = time.time()
        return response


async def _serve(port: int, spec: dict[str, dict[str, object]]) -> None:
    backend = CacheBackend()
    for path, obj in spec.items():
        backend.add(
            path,
            Obj(
                object_bytes(int(obj["seed"]), int(obj["length"])),  # type: ignore[call-overload]
                rate=float(obj.get("rate", 0)),  # type: ignore[arg-type]
                headers=dict(obj.get("headers", {})),  # type: ignore[call-overload]
                cut=obj.get("cut"),  # type: ignore[arg-type]
            ),
        )
    runner = web.AppRunner(backend.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(json.dumps({"event": "listening", "port": port}), flush=True)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():  # a line on stdin: say what was sent, and asked
        asked = Counter(path for path, _, _ in backend.requests)
        log = [(path, headers.get("Range"), status) for path, headers, status in backend.requests]
        report = {
            "sent": dict(backend.sent),
            "requests": dict(asked),
            "finished": backend.finished,
            "log": log,  # path, Range, status of every request
        }
        print(json.dumps({"event": "sent", **report}), flush=True)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), json.loads(sys.argv[2])))
