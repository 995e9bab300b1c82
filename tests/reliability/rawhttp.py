"""Raw-socket HTTP for the reliability tests: send bytes no client library would send."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> RawResponse:
    """The first response in ``raw`` (Content-Length framed; our error bodies always are)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head in {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return RawResponse(status, headers, rest[:length])


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection and read until the daemon closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    except ConnectionResetError:
        return b"".join(chunks) if "chunks" in locals() else b""
    finally:
        writer.close()


@dataclass
class RecordingBackend:
    """An aiohttp backend that records every request it receives (method, path, body)."""

    seen: list[tuple[str, str, bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            body = await request.read()
            self.seen.append((request.method, request.raw_path, body))
            return web.Response(text="backend ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        return app


def assert_json_error(resp: RawResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error", "detail", "request_id"}, body
    assert resp.headers["x-request-id"] == body["request_id"]
    return body  # type: ignore[no-any-return]
