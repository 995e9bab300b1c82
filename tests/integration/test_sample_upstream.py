"""The bundled sample upstream, tested in-process over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from fileproxy.sample_upstream import (
    BLOCK_SIZE,
    FILES,
    LAST_MODIFIED,
    create_app,
    etag_for,
    file_bytes,
)

SEED = 7
SIZE_1M = FILES["1m.bin"]


def expected(name: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(file_bytes(name, start, end, seed=SEED))


def sha256_of(name: str, seed: int = SEED) -> str:
    digest = hashlib.sha256()
    for chunk in file_bytes(name, seed=seed):
        digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
async def runner() -> AsyncIterator[web.AppRunner]:
    app_runner = web.AppRunner(create_app(seed=SEED), shutdown_timeout=2.0)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    yield app_runner
    await app_runner.cleanup()


@pytest.fixture
def base_url(runner: web.AppRunner) -> URL:
    host, port = runner.addresses[0][:2]
    return URL.build(scheme="http", host=host, port=port)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


# -- the pure helpers ----------------------------------------------------------------------------


def test_catalogue() -> None:
    assert FILES["4k.bin"] == 4096
    assert FILES["256m.bin"] == 268435456
    assert FILES["1g.bin"] == 1024**3
    assert "hello.txt" in FILES
    assert expected("hello.txt").decode().startswith("Hello")


def test_file_bytes_is_deterministic_and_random_access() -> None:
    full = expected("odd.bin")
    assert len(full) == FILES["odd.bin"]
    assert full == expected("odd.bin")
    assert full != b"".join(file_bytes("odd.bin", seed=SEED + 1))
    for start, end in [(0, 1), (BLOCK_SIZE - 3, BLOCK_SIZE + 3), (123_456, 999_999), (5, 5)]:
        assert expected("odd.bin", start, end) == full[start:end]
    assert all(len(c) <= BLOCK_SIZE for c in file_bytes("odd.bin", 7, None, seed=SEED))
    # distinct blocks, and random access deep into the biggest file
    blocks = {full[i : i + BLOCK_SIZE] for i in range(0, 15 * BLOCK_SIZE, BLOCK_SIZE)}
    assert len(blocks) == 15
    tail = expected("1g.bin", FILES["1g.bin"] - 10)
    assert len(tail) == 10


def test_file_bytes_validates() -> None:
    with pytest.raises(KeyError):
        file_bytes("nope.bin", 0, 1)
    with pytest.raises(ValueError):
        file_bytes("4k.bin", 0, 4097)
    with pytest.raises(ValueError):
        file_bytes("4k.bin", 10, 5)


# -- /files/{name} -------------------------------------------------------------------------------


async def test_full_get(session: aiohttp.ClientSession, base_url: URL) -> None:
    async with session.get(base_url / "files/1m.bin") as resp:
        assert resp.status == 200
        body = await resp.read()
        assert resp.headers["Content-Length"] == str(SIZE_1M)
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert resp.headers["ETag"] == etag_for("1m.bin", SEED)
        assert resp.headers["Last-Modified"] == LAST_MODIFIED
    assert hashlib.sha256(body).hexdigest() == sha256_of("1m.bin")


async def test_text_file_and_empty_file(session: aiohttp.ClientSession, base_url: URL) -> None:
    async with session.get(base_url / "files/hello.txt") as resp:
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await resp.read() == expected("hello.txt")
    async with session.get(base_url / "files/empty.bin", headers={"Range": "bytes=0-"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "0"
        assert await resp.read() == b""


def test_etag_depends_on_seed() -> None:
    assert etag_for("1m.bin", 0) != etag_for("1m.bin", 1)
    assert etag_for("1m.bin", 0).startswith('"')


async def test_unknown_file_is_json_404(session: aiohttp.ClientSession, base_url: URL) -> None:
    async with session.get(base_url / "files/nope.bin") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]


@pytest.mark.parametrize(
    ("range_value", "start", "end"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=65530-65545", 65530, 65546),  # across a block boundary
        ("bytes=1000-", 1000, SIZE_1M),
        ("bytes=-500", SIZE_1M - 500, SIZE_1M),
        ("bytes=-99999999", 0, SIZE_1M),  # suffix longer than the file
        ("bytes=100-99999999999999999999999", 100, SIZE_1M),  # last-pos clamped
        ("BYTES=5-5", 5, 6),
        ("bytes=7-8,", 7, 9),  # empty list elements are allowed
    ],
)
async def test_range(
    session: aiohttp.ClientSession, base_url: URL, range_value: str, start: int, end: int
) -> None:
    async with session.get(base_url / "files/1m.bin", headers={"Range": range_value}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE_1M}"
        assert resp.headers["Content-Length"] == str(end - start)
        assert await resp.read() == expected("1m.bin", start, end)


async def test_range_deep_in_big_file(session: aiohttp.ClientSession, base_url: URL) -> None:
    size = FILES["1g.bin"]
    headers = {"Range": f"bytes={size - 70000}-"}
    async with session.get(base_url / "files/1g.bin", headers=headers) as resp:
        assert resp.status == 206
        assert await resp.read() == expected("1g.bin", size - 70000)


@pytest.mark.parametrize("range_value", ["bytes=1048576-", "bytes=2000000-3000000", "bytes=-0"])
async def test_range_not_satisfiable(
    session: aiohttp.ClientSession, base_url: URL, range_value: str
) -> None:
    async with session.get(base_url / "files/1m.bin", headers={"Range": range_value}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{SIZE_1M}"


@pytest.mark.parametrize(
    "range_value",
    ["bytes=5-1", "items=0-1", "bytes=abc", "bytes=0-1,5-6", "bytes=-", "bytes=1", "bytes=+1-2"],
)
async def test_invalid_or_multiple_range_serves_full(
    session: aiohttp.ClientSession, base_url: URL, range_value: str
) -> None:
    async with session.get(base_url / "files/64k.bin", headers={"Range": range_value}) as resp:
        assert resp.status == 200
        assert "Content-Range" not in resp.headers
        assert await resp.read() == expected("64k.bin")


@pytest.mark.parametrize(
    ("if_range", "honoured"),
    [
        (etag_for("1m.bin", SEED), True),
        (LAST_MODIFIED, True),
        ('"something-else"', False),
        ("W/" + etag_for("1m.bin", SEED), False),  # If-Range needs a strong match
        ("Tue, 02 Jan 2024 00:00:00 GMT", False),
        ("garbage", False),
    ],
)
async def test_if_range(
    session: aiohttp.ClientSession, base_url: URL, if_range: str, honoured: bool
) -> None:
    headers = {"Range": "bytes=10-19", "If-Range": if_range}
    async with session.get(base_url / "files/1m.bin", headers=headers) as resp:
        body = await resp.read()
    if honoured:
        assert resp.status == 206
        assert body == expected("1m.bin", 10, 20)
    else:
        assert resp.status == 200
        assert len(body) == SIZE_1M


async def test_head(session: aiohttp.ClientSession, base_url: URL) -> None:
    for headers in ({}, {"Range": "bytes=0-9"}):  # Range only applies to GET
        async with session.head(base_url / "files/16m.bin", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(FILES["16m.bin"])
            assert resp.headers["ETag"] == etag_for("16m.bin", SEED)
            assert await resp.read() == b""


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"If-None-Match": etag_for("1m.bin", SEED)}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": f'"other", W/{etag_for("1m.bin", SEED)}'}, 304),  # weak comparison
        ({"If-None-Match": '"other"'}, 200),
        ({"If-Modified-Since": LAST_MODIFIED}, 304),
        ({"If-Modified-Since": "Sun, 31 Dec 2023 00:00:00 GMT"}, 200),
        # If-Modified-Since is ignored when If-None-Match is present
        ({"If-None-Match": '"other"', "If-Modified-Since": LAST_MODIFIED}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"If-Match": etag_for("1m.bin", SEED)}, 200),
        ({"If-Unmodified-Since": "Sun, 31 Dec 2023 00:00:00 GMT"}, 412),
    ],
)
async def test_conditional_get(
    session: aiohttp.ClientSession, base_url: URL, headers: dict[str, str], status: int
) -> None:
    async with session.get(base_url / "files/1m.bin", headers=headers) as resp:
        body = await resp.read()
        assert resp.status == status
    if status == 304:
        assert body == b""
        assert resp.headers["ETag"] == etag_for("1m.bin", SEED)
    elif status == 200:
        assert len(body) == SIZE_1M


async def test_client_abort_is_quiet(
    session: aiohttp.ClientSession,
    base_url: URL,
    runner: web.AppRunner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    resp = await session.get(base_url / "files/256m.bin")
    await resp.content.readexactly(1024 * 1024)
    resp.close()  # drops the connection mid-body
    assert runner.server is not None
    deadline = time.monotonic() + 5
    while runner.server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not runner.server.connections
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    async with session.get(base_url / "files/4k.bin") as again:
        assert await again.read() == expected("4k.bin")


# -- listings ------------------------------------------------------------------------------------


async def test_index_and_listing(session: aiohttp.ClientSession, base_url: URL) -> None:
    async with session.get(base_url) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    assert 'href="/files/1m.bin"' in page
    for endpoint in ("/sse", "/slow", "/echo", "/status/", "/headers/set-cookie"):
        assert endpoint in page
    async with session.get(base_url / "files") as resp:
        listing = await resp.json()
    by_name = {item["name"]: item for item in listing}
    assert set(by_name) == set(FILES)
    assert by_name["1m.bin"] == {
        "name": "1m.bin",
        "size": SIZE_1M,
        "etag": etag_for("1m.bin", SEED),
        "url": "/files/1m.bin",
    }


# -- /sse ----------------------------------------------------------------------------------------


def parse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append(fields)
    return events


async def test_sse(session: aiohttp.ClientSession, base_url: URL) -> None:
    started = time.monotonic()
    async with session.get(base_url / "sse", params={"interval": "0.05", "count": "3"}) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert "Content-Length" not in resp.headers
        assert resp.headers["Transfer-Encoding"] == "chunked"
        first = await resp.content.readuntil(b"\n\n")  # the first event comes at once
        rest = await resp.read()  # ends after count events
    elapsed = time.monotonic() - started
    events = parse_events((first + rest).decode())
    assert [e["id"] for e in events] == ["1", "2", "3"]
    assert {e["event"] for e in events} == {"tick"}
    assert [json.loads(e["data"])["n"] for e in events] == [1, 2, 3]
    assert 0.09 <= elapsed < 2


async def test_sse_last_event_id(session: aiohttp.ClientSession, base_url: URL) -> None:
    url = base_url / "sse"
    params = {"interval": "0.01", "count": "2"}
    async with session.get(url, params=params, headers={"Last-Event-ID": "41"}) as resp:
        events = parse_events(await resp.text())
    assert [e["id"] for e in events] == ["42", "43"]
    assert abs(json.loads(events[0]["data"])["time"] - time.time()) < 60


# -- /slow ---------------------------------------------------------------------------------------


async def test_slow_headers(session: aiohttp.ClientSession, base_url: URL) -> None:
    started = time.monotonic()
    async with session.get(base_url / "slow", params={"delay": "0.3"}) as resp:
        time_to_headers = time.monotonic() - started
        body = await resp.read()
    assert time_to_headers >= 0.29
    assert body == b"a" * 1024


async def test_slow_body(session: aiohttp.ClientSession, base_url: URL) -> None:
    params = {"delay": "0", "body_delay": "0.1", "chunks": "3", "chunk_size": "10"}
    started = time.monotonic()
    async with session.get(base_url / "slow", params=params) as resp:
        time_to_headers = time.monotonic() - started
        assert resp.headers["Content-Length"] == "30"
        body = await resp.read()
    assert time_to_headers < 0.19
    assert time.monotonic() - started >= 0.19
    assert body == b"a" * 10 + b"b" * 10 + b"c" * 10


async def test_slow_rejects_garbage(session: aiohttp.ClientSession, base_url: URL) -> None:
    for params in ({"delay": "soon"}, {"delay": "nan"}, {"chunks": "1.5"}):
        async with session.get(base_url / "slow", params=params) as resp:
            assert resp.status == 400


# -- /echo ---------------------------------------------------------------------------------------


async def test_echo_streamed_upload(session: aiohttp.ClientSession, base_url: URL) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB
    count = 48  # 3 MiB

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield piece

    headers = CIMultiDict([("X-Dup", "1"), ("X-Other", "x"), ("X-Dup", "2")])
    url = URL(str(base_url) + "/echo?a=%2F&b=%7e", encoded=True)
    async with session.put(url, data=body(), headers=headers) as resp:
        assert resp.status == 200
        echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/echo?a=%2F&b=%7e"
    assert echo["body_length"] == len(piece) * count
    assert echo["body_sha256"] == hashlib.sha256(piece * count).hexdigest()
    sent = [[k, v] for k, v in echo["headers"] if k.lower().startswith("x-")]
    assert sent == [["X-Dup", "1"], ["X-Other", "x"], ["X-Dup", "2"]]
    assert any(k.lower() == "transfer-encoding" for k, _ in echo["headers"])


async def test_echo_any_method(session: aiohttp.ClientSession, base_url: URL) -> None:
    async with session.request("PROPFIND", base_url / "echo") as resp:
        echo = await resp.json()
    assert echo["method"] == "PROPFIND"
    assert echo["body_length"] == 0
    assert echo["body_sha256"] == hashlib.sha256().hexdigest()


# -- /status and /headers ------------------------------------------------------------------------


async def test_status(session: aiohttp.ClientSession, base_url: URL) -> None:
    async with session.get(base_url / "status/418") as resp:
        assert resp.status == 418
        assert (await resp.json())["status"] == 418
    async with session.get(base_url / "status/302", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/files/hello.txt"
    async with session.get(base_url / "status/204") as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    async with session.get(base_url / "status/100") as resp:
        assert resp.status == 400


async def test_duplicate_set_cookie(session: aiohttp.ClientSession, base_url: URL) -> None:
    async with session.get(base_url / "headers/set-cookie") as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


# -- run() ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    code = (
        "import logging; logging.basicConfig(level=logging.INFO);"
        "from fileproxy.sample_upstream import run; run('127.0.0.1', 0)"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],  # python -c imports from the working directory
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert "sample upstream listening on http://127.0.0.1:" in line
        url = line.strip().rsplit(" ", 1)[1]
        async with (
            aiohttp.ClientSession() as client,
            client.get(url + "/files/hello.txt") as resp,
        ):
            assert await resp.read() == expected("hello.txt")
        proc.send_signal(sig)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert stdout == b""
    assert b"Traceback" not in stderr
