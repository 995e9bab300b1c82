"""The proxy as the real ``curl`` binary sees it.

curl runs through ``asyncio.create_subprocess_exec`` so that a backend written in the test
keeps being served by the test's loop while curl talks to the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

from aiohttp import web

from fileproxy.sample_upstream import FILES, file_bytes
from tests.conftest import require_binary

CURL_PARTIAL_FILE = 18  # "Partial file. Only a part of the file was transferred."


async def run(
    *args: str, stdin: int | None = None, timeout: float = 60.0
) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout, stderr


def expected_sha256(name: str, start: int = 0, end: int | None = None) -> str:
    digest = hashlib.sha256()
    for chunk in file_bytes(name, start, end):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_curl_downloads_a_16m_file_byte_exact(sample_upstream, start_proxy, tmp_dir):
    curl = require_binary("curl")
    proxy = start_proxy(sample_upstream.url)
    out = tmp_dir / "16m.bin"
    rc, _, stderr = await run(curl, "-sS", "--fail", "-o", str(out), f"{proxy.url}/files/16m.bin")
    assert rc == 0, stderr.decode(errors="replace")
    assert out.stat().st_size == FILES["16m.bin"]
    assert file_sha256(out) == expected_sha256("16m.bin")


async def test_curl_range_request(sample_upstream, start_proxy, tmp_dir):
    curl = require_binary("curl")
    proxy = start_proxy(sample_upstream.url)
    out = tmp_dir / "range.bin"
    rc, stdout, stderr = await run(
        curl,
        "-sS",
        "--fail",
        "-r",
        "0-1023",
        "-o",
        str(out),
        "-w",
        "%{http_code}",
        f"{proxy.url}/files/16m.bin",
    )
    assert rc == 0, stderr.decode(errors="replace")
    assert stdout == b"206"
    assert out.read_bytes() == b"".join(file_bytes("16m.bin", 0, 1024))


async def test_curl_health_is_valid_json_with_uvloop(start_backend, start_proxy):
    curl = require_binary("curl")
    backend = await start_backend(web.Application())
    proxy = start_proxy(backend.url)
    # curl -sS --fail URL | python -m json.tool, as an operator would check it
    read_fd, write_fd = os.pipe()
    try:
        curl_proc = await asyncio.create_subprocess_exec(
            curl,
            "-sS",
            "--fail",
            f"{proxy.url}/health",
            stdout=write_fd,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(write_fd)
        write_fd = -1
        tool_rc, tool_out, tool_err = await run(sys.executable, "-m", "json.tool", stdin=read_fd)
        async with asyncio.timeout(30):
            _, curl_err = await curl_proc.communicate()
    finally:
        os.close(read_fd)
        if write_fd != -1:
            os.close(write_fd)
    assert curl_proc.returncode == 0, curl_err.decode(errors="replace")
    assert tool_rc == 0, tool_err.decode(errors="replace")
    health = json.loads(tool_out)
    assert health["performance_optimization"]["uvloop_enabled"] is True


async def test_curl_sees_a_truncated_upstream_body_as_a_failure(
    start_backend, start_proxy, tmp_dir
):
    curl = require_binary("curl")
    declared, sent = 1_000_000, 100_000

    async def breaks_mid_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = declared
        await resp.prepare(request)
        await resp.write(b"z" * sent)
        assert request.transport is not None
        request.transport.close()  # flushes what was written, then FIN: a short body
        return resp

    app = web.Application()
    app.router.add_get("/broken", breaks_mid_body)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)
    out = tmp_dir / "broken.bin"
    rc, _, stderr = await run(curl, "-sS", "--fail", "-o", str(out), f"{proxy.url}/broken")
    assert rc == CURL_PARTIAL_FILE, (rc, stderr.decode(errors="replace"))
    assert out.stat().st_size < declared
