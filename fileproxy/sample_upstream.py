"""Bundled sample backend: a small aiohttp file server for trying and testing the proxy.

Nothing is stored on disk. Every file in :data:`FILES` is generated on the fly, deterministically
from the seed and the file name, and any byte range can be computed without generating the
bytes before it (see :func:`file_bytes`), so tests can compute expected hashes without HTTP.

Endpoints (all answers to GET also answer HEAD):

``/``                     HTML index of files and endpoints
``/files``                JSON list of files: name, size, etag, url
``/files/{name}``         the file; ETag, Last-Modified, single byte ranges, If-Range,
                          If-None-Match / If-Modified-Since (304), If-Match /
                          If-Unmodified-Since (412)
``/sse``                  server-sent events; ``interval`` (s, default 1), ``count`` (default
                          unlimited); honours ``Last-Event-ID``
``/slow``                 ``delay`` (s before headers, default 2), ``body_delay`` (s between
                          chunks, default 0), ``chunks`` (default 1), ``chunk_size`` (default
                          1024); chunk k is ``chunk_size`` copies of ``"abc...z"[k % 26]``
``/echo``                 any method: JSON with method, raw path, headers in order, body hash
``/status/{code}``        answers with that status (200-599); 3xx redirect to /files/hello.txt
``/headers/set-cookie``   two separate Set-Cookie headers

Run it with ``fileproxy sample-upstream --bind HOST:PORT`` or :func:`run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import html
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Final

from aiohttp import ETag, hdrs, web

__all__ = [
    "BLOCK_SIZE",
    "FILES",
    "LAST_MODIFIED",
    "SEED",
    "create_app",
    "etag_for",
    "file_bytes",
    "run",
]

logger = logging.getLogger(__name__)

#: Generated content is made of blocks of this size; each is computable on its own.
BLOCK_SIZE: Final = 64 * 1024
#: Bump when the content generator changes, so that ETags change with the content.
_GENERATOR_VERSION: Final = 1

_TEXT_FILES: Final[dict[str, bytes]] = {
    "hello.txt": b"Hello from the fileproxy sample upstream!\n",
}
_GENERATED_FILES: Final[dict[str, int]] = {
    "empty.bin": 0,
    "4k.bin": 4 * 1024,
    "64k.bin": 64 * 1024,
    "odd.bin": 1_000_003,  # not a multiple of BLOCK_SIZE
    "1m.bin": 1024**2,
    "16m.bin": 16 * 1024**2,
    "64m.bin": 64 * 1024**2,
    "256m.bin": 256 * 1024**2,
    "1g.bin": 1024**3,
}
#: The catalogue: file name -> size in bytes.
FILES: Final[dict[str, int]] = {
    **{name: len(body) for name, body in _TEXT_FILES.items()},
    **_GENERATED_FILES,
}

_LAST_MODIFIED_DT: Final = datetime(2024, 1, 1, tzinfo=UTC)
#: The fixed Last-Modified of every file, as an HTTP-date.
LAST_MODIFIED: Final = format_datetime(_LAST_MODIFIED_DT, usegmt=True)

#: Application key holding the content seed.
SEED: Final = web.AppKey("seed", int)
_STOPPING: Final = web.AppKey("stopping", asyncio.Event)

_JSON: Final = "application/json"


# --------------------------------------------------------------------------------------------
# Content generation
#
# Block i of a file is a per-file random 64 KiB key, rotated by r and passed through a byte
# permutation T (bytes.translate), with r and T chosen by hashing (seed, name, i). Rotation and
# translate run at memory-ish speed, unlike hashing every output byte; blocks are pairwise
# distinct with overwhelming probability (2**32 variants) and not LZ-compressible.
# --------------------------------------------------------------------------------------------


@functools.cache
def _byte_permutations() -> tuple[bytes, ...]:
    """256 fixed pseudo-random permutations of 0..255 (Fisher-Yates fed by SHAKE-128)."""
    stream = hashlib.shake_128(b"fileproxy sample upstream permutations").digest(256 * 255 * 4)
    perms = []
    pos = 0
    for _ in range(256):
        perm = list(range(256))
        for k in range(255, 0, -1):
            j = int.from_bytes(stream[pos : pos + 4], "big") % (k + 1)
            pos += 4
            perm[k], perm[j] = perm[j], perm[k]
        perms.append(bytes(perm))
    return tuple(perms)


@functools.lru_cache(maxsize=16)
def _file_key(seed: int, name: str) -> bytes:
    return hashlib.shake_128(f"{seed}:{name}".encode()).digest(BLOCK_SIZE)


@functools.lru_cache(maxsize=64)  # 4 MiB at most; helps concurrent readers of one file
def _block(seed: int, name: str, index: int) -> bytes:
    digest = hashlib.shake_128(f"{seed}:{name}:{index}".encode()).digest(4)
    rotation = int.from_bytes(digest[:2], "big")
    perms = _byte_permutations()
    table = perms[digest[2]].translate(perms[digest[3]])
    key = _file_key(seed, name)
    return (key[rotation:] + key[:rotation]).translate(table)


def file_bytes(name: str, start: int = 0, end: int | None = None, seed: int = 0) -> Iterator[bytes]:
    """Return the bytes ``[start, end)`` of file ``name`` as an iterator of chunks.

    Chunks are at most :data:`BLOCK_SIZE` long; ``end`` defaults to the file size. Raises
    ``KeyError`` for an unknown name and ``ValueError`` for a range outside the file.
    """
    size = FILES[name]
    if end is None:
        end = size
    if not 0 <= start <= end <= size:
        raise ValueError(f"range [{start}, {end}) is outside {name} (size {size})")
    text = _TEXT_FILES.get(name)
    if text is not None:
        return iter([text[start:end]] if start < end else [])
    return _generated_bytes(seed, name, start, end)


def _generated_bytes(seed: int, name: str, start: int, end: int) -> Iterator[bytes]:
    index, offset = divmod(start, BLOCK_SIZE)
    pos = start
    while pos < end:
        block = _block(seed, name, index)
        take = min(BLOCK_SIZE - offset, end - pos)
        yield block if take == BLOCK_SIZE else block[offset : offset + take]
        pos += take
        index += 1
        offset = 0


def etag_for(name: str, seed: int = 0) -> str:
    """The strong ETag (with quotes) of file ``name`` served with ``seed``."""
    tag = f"v{_GENERATOR_VERSION}:{seed}:{name}:{FILES[name]}"
    return '"' + hashlib.sha256(tag.encode()).hexdigest()[:32] + '"'


# --------------------------------------------------------------------------------------------
# Conditional requests and ranges (RFC 9110 sections 13 and 14)
# --------------------------------------------------------------------------------------------


class _RangeNotSatisfiable(Exception):
    pass


def _digits_to_int(digits: str) -> int:
    """Parse ASCII digits; absurdly long numbers become 10**18 (bigger than any file)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18


def _is_digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """Parse a Range header value into ``(start, end)``, end exclusive.

    Returns None when the Range must be ignored (syntactically invalid, not ``bytes``, more
    than one range, or an empty file) and raises _RangeNotSatisfiable for a valid single range
    that selects nothing.
    """
    unit, sep, range_set = value.partition("=")
    if not sep or unit.lower() != "bytes" or size == 0:
        return None
    specs = [spec.strip(" \t") for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]  # the list syntax allows empty elements
    if len(specs) != 1:
        return None
    first, dash, last = specs[0].partition("-")
    if not dash or (first and not _is_digits(first)) or (last and not _is_digits(last)):
        return None
    if first:  # int-range: first-last or first-
        start = _digits_to_int(first)
        if last and _digits_to_int(last) < start:
            return None
        if start >= size:
            raise _RangeNotSatisfiable
        end = size if not last else min(_digits_to_int(last) + 1, size)
        return start, end
    if not last:  # a lone "-"
        return None
    suffix = _digits_to_int(last)
    if suffix == 0:
        raise _RangeNotSatisfiable
    return max(size - suffix, 0), size


def _etag_matches(etag: str, candidates: tuple[ETag, ...], *, weak: bool) -> bool:
    """Compare ``etag`` against aiohttp ETag objects (their values come without quotes)."""
    for candidate in candidates:
        if candidate.value == "*":
            return True
        if candidate.is_weak and not weak:
            continue
        if f'"{candidate.value}"' == etag:
            return True
    return False


def _precondition_status(request: web.Request, etag: str) -> int | None:
    """Evaluate If-Match, If-Unmodified-Since, If-None-Match, If-Modified-Since in RFC order.

    Returns 412, 304 or None (carry on).
    """
    if_match = request.if_match
    if if_match is not None:
        if not _etag_matches(etag, if_match, weak=False):
            return 412
    else:
        unmodified_since = request.if_unmodified_since
        if unmodified_since is not None and unmodified_since < _LAST_MODIFIED_DT:
            return 412
    if_none_match = request.if_none_match
    if if_none_match is not None:
        return 304 if _etag_matches(etag, if_none_match, weak=True) else None
    modified_since = request.if_modified_since
    if modified_since is not None and modified_since >= _LAST_MODIFIED_DT:
        return 304
    return None


def _if_range_allows_range(request: web.Request, etag: str) -> bool:
    value = request.headers.get(hdrs.IF_RANGE)
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag  # strong comparison: a weak tag never matches
    return request.if_range == _LAST_MODIFIED_DT  # None (not a date) never matches


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


def _json_response(
    status: int, payload: Any, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(payload, status=status, headers=headers)


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type=_JSON)


def _float_param(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad_request(f"{name} must be a number") from None
    if not math.isfinite(value):
        raise _bad_request(f"{name} must be finite")
    return min(max(value, lo), hi)


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    negative = raw.startswith("-")
    digits = raw[1:] if negative else raw
    if not _is_digits(digits):
        raise _bad_request(f"{name} must be an integer")
    value = -_digits_to_int(digits) if negative else _digits_to_int(digits)
    return min(max(value, lo), hi)


async def _sleep_or_stop(app: web.Application, seconds: float) -> bool:
    """Sleep; return True early if the server is shutting down."""
    stopping = app[_STOPPING]
    if stopping.is_set():
        return True
    if seconds <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()


async def handle_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    size = FILES.get(name)
    if size is None:
        return _json_response(404, {"error": "no such file", "name": name})
    etag = etag_for(name, request.app[SEED])
    headers: dict[str, str] = {
        hdrs.ETAG: etag,
        hdrs.LAST_MODIFIED: LAST_MODIFIED,
        hdrs.ACCEPT_RANGES: "bytes",
    }

    precondition = _precondition_status(request, etag)
    if precondition == 304:
        return web.Response(status=304, headers=headers)
    if precondition == 412:
        return _json_response(412, {"error": "precondition failed"}, headers)

    start, end, status = 0, size, 200
    range_values = request.headers.getall(hdrs.RANGE, [])
    # Range is defined for GET only (RFC 9110 14.2); several Range fields act as a list.
    if range_values and request.method == hdrs.METH_GET and _if_range_allows_range(request, etag):
        try:
            selected = _parse_range(",".join(range_values), size)
        except _RangeNotSatisfiable:
            headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
            return _json_response(416, {"error": "range not satisfiable", "size": size}, headers)
        if selected is not None:
            start, end = selected
            status = 206
            headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/{size}"

    resp = web.StreamResponse(status=status, headers=headers)
    resp.headers[hdrs.CONTENT_TYPE] = (
        "text/plain; charset=utf-8" if name.endswith(".txt") else "application/octet-stream"
    )
    resp.content_length = end - start
    await resp.prepare(request)
    if request.method == hdrs.METH_HEAD:
        return resp
    stopping = request.app[_STOPPING]
    try:
        for chunk in file_bytes(name, start, end, request.app[SEED]):
            if stopping.is_set():
                resp.force_close()  # short body + closed connection: the client sees an abort
                break
            await resp.write(chunk)  # waits for the transport to drain: backpressure
    except ConnectionError:  # the client went away; nothing to log
        resp.force_close()
    return resp


async def handle_file_list(request: web.Request) -> web.Response:
    seed = request.app[SEED]
    return web.json_response(
        [
            {"name": name, "size": size, "etag": etag_for(name, seed), "url": f"/files/{name}"}
            for name, size in FILES.items()
        ]
    )


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.4g} {unit}"
        value /= 1024
    return f"{value:.4g} GiB"


_ENDPOINTS: Final = [
    ("/files", "JSON list of the files (name, size, etag, url)"),
    ("/sse?interval=1&count=10", "server-sent events, one tick per interval; Last-Event-ID"),
    ("/slow?delay=2&body_delay=0.5&chunks=4&chunk_size=1024", "slow headers and body"),
    ("/echo", "any method: echoes method, raw path, headers and the body's sha256 as JSON"),
    ("/status/404", "any status code 200-599; 3xx redirect to /files/hello.txt"),
    ("/headers/set-cookie", "two separate Set-Cookie headers"),
]


async def handle_index(request: web.Request) -> web.Response:
    esc = html.escape
    files = "\n".join(
        f'<tr><td><a href="/files/{esc(name)}">{esc(name)}</a></td>'
        f"<td>{esc(_human_size(size))}</td><td>{size}</td></tr>"
        for name, size in FILES.items()
    )
    endpoints = "\n".join(
        f'<li><a href="{esc(url)}"><code>{esc(url)}</code></a> &mdash; {esc(text)}</li>'
        for url, text in _ENDPOINTS
    )
    page = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>fileproxy sample upstream</title></head>
<body>
<h1>fileproxy sample upstream</h1>
<p>Generated files (seed {request.app[SEED]}); they support Range, ETag and Last-Modified.</p>
<table>
<tr><th>name</th><th>size</th><th>bytes</th></tr>
{files}
</table>
<h2>Other endpoints</h2>
<ul>
{endpoints}
</ul>
</body>
</html>
"""
    return web.Response(text=page, content_type="text/html")


async def handle_sse(request: web.Request) -> web.StreamResponse:
    interval = _float_param(request, "interval", 1.0, 0.01, 3600.0)
    count: int | None = None  # unlimited
    if "count" in request.query:
        count = _int_param(request, "count", 0, 0, 10**18)
    last_event_id = request.headers.get("Last-Event-ID", "").strip()
    n = _digits_to_int(last_event_id) if _is_digits(last_event_id) else 0

    resp = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)  # headers go out now; the body is chunked
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    sent = 0
    try:
        while count is None or sent < count:
            if sent:
                next_at += interval
                if await _sleep_or_stop(request.app, next_at - loop.time()):
                    break
            n += 1
            data = json.dumps({"n": n, "time": time.time()})
            await resp.write(f"id: {n}\nevent: tick\ndata: {data}\n\n".encode())
            sent += 1
    except ConnectionError:
        resp.force_close()
    return resp


async def handle_slow(request: web.Request) -> web.StreamResponse:
    delay = _float_param(request, "delay", 2.0, 0.0, 600.0)
    body_delay = _float_param(request, "body_delay", 0.0, 0.0, 600.0)
    chunks = _int_param(request, "chunks", 1, 0, 1_000_000)
    chunk_size = _int_param(request, "chunk_size", 1024, 1, 1024 * 1024)
    if await _sleep_or_stop(request.app, delay):
        return _json_response(503, {"error": "shutting down"})
    resp = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
    resp.content_length = chunks * chunk_size
    await resp.prepare(request)
    if request.method == hdrs.METH_HEAD:
        return resp
    try:
        for k in range(chunks):
            if k and await _sleep_or_stop(request.app, body_delay):
                resp.force_close()
                break
            await resp.write(bytes([ord("a") + k % 26]) * chunk_size)
    except ConnectionError:
        resp.force_close()
    return resp


async def handle_echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            # latin-1 maps header octets 1:1 to characters
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_sha256": digest.hexdigest(),
            "body_length": length,
        }
    )


async def handle_status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    # 1xx are interim responses: sending one as the final answer would hang the client.
    if not 200 <= code <= 599:
        raise _bad_request("status code must be between 200 and 599")
    headers: dict[str, str] = {}
    if 300 <= code <= 399:
        headers[hdrs.LOCATION] = "/files/hello.txt"
    elif code == 401:
        headers[hdrs.WWW_AUTHENTICATE] = 'Basic realm="sample upstream"'
    if code in (204, 205, 304):  # no content allowed
        return web.Response(status=code, headers=headers)
    return _json_response(code, {"status": code}, headers)


async def handle_set_cookie(request: web.Request) -> web.Response:
    resp = web.json_response({"cookies": ["a", "b"]})
    resp.headers.add(hdrs.SET_COOKIE, "a=1; Path=/")
    resp.headers.add(hdrs.SET_COOKIE, "b=2; Path=/")
    return resp


async def _on_shutdown(app: web.Application) -> None:
    app[_STOPPING].set()  # lets SSE streams and slow responses end instead of being cancelled


def create_app(seed: int = 0) -> web.Application:
    """Build the sample upstream application; ``seed`` selects the generated content."""
    app = web.Application()
    app[SEED] = seed
    app[_STOPPING] = asyncio.Event()
    app.on_shutdown.append(_on_shutdown)
    app.add_routes(
        [
            web.get("/", handle_index),
            web.get("/files", handle_file_list),
            web.get("/files/{name}", handle_file),
            web.get("/sse", handle_sse),
            web.get("/slow", handle_slow),
            web.route("*", "/echo", handle_echo),
            web.route("*", r"/status/{code:\d{1,3}}", handle_status),
            web.get("/headers/set-cookie", handle_set_cookie),
        ]
    )
    return app


# --------------------------------------------------------------------------------------------
# Running standalone
# --------------------------------------------------------------------------------------------


async def _serve(host: str, port: int, seed: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    runner = web.AppRunner(create_app(seed), shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        shown_host = f"[{host}]" if ":" in host else host
        logger.info("sample upstream listening on http://%s:%d", shown_host, bound_port)
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in handled:
            loop.remove_signal_handler(sig)


def run(host: str, port: int, seed: int = 0) -> None:
    """Serve the sample upstream on ``host:port`` until SIGINT or SIGTERM, then return.

    Uses uvloop when it is installed. Raises OSError if the address cannot be bound.
    """
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    # A signal before the handlers are installed surfaces as KeyboardInterrupt: still a clean stop.
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        runner.run(_serve(host, port, seed))
