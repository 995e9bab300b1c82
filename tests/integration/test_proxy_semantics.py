"""HTTP semantics of the proxy, end to end: the real daemon between a client and a backend.

Each test starts ``fileproxy serve`` as a subprocess in front of either an aiohttp app
written here (running in the test's own loop) or the bundled sample upstream, and checks
one behaviour from the client's side and, where it matters, from the backend's side.
Requests the aiohttp client would refuse or normalise are written on a raw socket.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import yarl
from aiohttp import web

from fileproxy.sample_upstream import FILES, LAST_MODIFIED, etag_for, file_bytes

MIB = 1024 * 1024

# --------------------------------------------------------------------------------------------
# Helpers: a recording backend and a raw HTTP/1.1 client
# --------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the backend received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str
    body_length: int

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times to the backend: {values}"
        return values[0] if values else None


Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Recorder:
    """A catch-all backend that hashes each request body while reading it and records it."""

    seen: list[Seen] = field(default_factory=list)
    routes: dict[str, Responder] = field(default_factory=dict)
    body_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
            self.body_started.set()
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                digest.hexdigest(),
                length,
            )
        )
        responder = self.routes.get(request.path)
        if responder is not None:
            return await responder(request)
        return web.json_response({"method": request.method, "sha256": digest.hexdigest()})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    @property
    def last(self) -> Seen:
        assert self.seen, "the backend received no request"
        return self.seen[-1]


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None


def raw_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def raw_http(
    port: int, request: bytes, *, to_eof: bool = False, timeout: float = 5.0
) -> RawResponse:
    """Send bytes as they are; read one response.

    With ``to_eof`` everything after the header block up to EOF is the body (the request
    must say ``Connection: close``): that is how a body that must not exist is caught.
    Otherwise the body is framed by Content-Length or chunked encoding.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = []
            for line in header_lines:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
            response = RawResponse(status, headers, b"")
            if to_eof:
                response.body = await reader.read()
            elif (length := response.get("Content-Length")) is not None:
                response.body = await reader.readexactly(int(length))
            elif "chunked" in (response.get("Transfer-Encoding") or "").lower():
                body = bytearray()
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    body += await reader.readexactly(size)
                    await reader.readexactly(2)
                await reader.readuntil(b"\r\n")
                response.body = bytes(body)
            else:
                response.body = await reader.read()
            return response
    finally:
        writer.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_bytes(name: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(file_bytes(name, start, end))


# --------------------------------------------------------------------------------------------
# Methods and request bodies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
async def test_every_method_reaches_the_backend_intact(start_backend, start_proxy, client, method):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    body = b"" if method in ("GET", "OPTIONS", "DELETE") else f"body of {method}".encode()
    async with client.request(method, f"{proxy.url}/things/1", data=body or None) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["method"] == method
    assert len(recorder.seen) == 1
    seen = recorder.last
    assert seen.method == method
    assert seen.raw_path == "/things/1"
    assert seen.body_sha256 == sha256(body)


async def wait_for(event: asyncio.Event, what: str, timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        raise AssertionError(what) from None


async def test_upload_with_content_length_streams_byte_exact(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    payload = os.urandom(20 * MIB)

    async def body() -> AsyncIterator[bytes]:
        yield payload[:MIB]
        # Streamed, not buffered: the backend reads the start before the client sends the rest.
        await wait_for(recorder.body_started, "the proxy held back the start of the upload")
        for start in range(MIB, len(payload), MIB):
            yield payload[start : start + MIB]

    headers = {"Content-Length": str(len(payload))}
    async with client.put(f"{proxy.url}/upload", data=body(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    seen = recorder.last
    assert seen.body_length == len(payload)
    assert seen.body_sha256 == sha256(payload)
    assert seen.get("Content-Length") == str(len(payload))
    assert seen.get("Transfer-Encoding") is None


async def test_chunked_upload_streams_byte_exact(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    pieces = [os.urandom(size) for size in (1, 100, 65536, 3 * MIB + 7, 0x1000, 5 * MIB, 13)]
    expected = b"".join(pieces)

    async def body() -> AsyncIterator[bytes]:
        for index, piece in enumerate(pieces):
            yield piece
            if index == 2:
                await wait_for(recorder.body_started, "the proxy held back the chunked upload")

    async with client.post(f"{proxy.url}/upload", data=body()) as resp:
        assert resp.status == 200, await resp.text()
    seen = recorder.last
    assert seen.body_length == len(expected)
    assert seen.body_sha256 == sha256(expected)
    assert seen.get("Content-Length") is None
    assert "chunked" in (seen.get("Transfer-Encoding") or "").lower()


# --------------------------------------------------------------------------------------------
# Byte-exact passthrough of bodies and end-to-end headers
# --------------------------------------------------------------------------------------------


async def test_compressed_body_and_validators_pass_through_byte_exact(
    start_backend, start_proxy, client
):
    compressed = gzip.compress(b"the quick brown fox jumps over the lazy dog\n" * 2000, mtime=0)
    etag = '"gz-1234"'
    last_modified = "Mon, 01 Jan 2024 00:00:00 GMT"

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={
                "Content-Type": "text/plain; charset=utf-8",
                "Content-Encoding": "gzip",
                "ETag": etag,
                "Last-Modified": last_modified,
                "Vary": "Accept-Encoding",
            },
        )

    recorder = Recorder(routes={"/page": gzipped})
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/page", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert await resp.read() == compressed
        assert resp.headers.getall("Content-Encoding") == ["gzip"]
        assert resp.headers.getall("ETag") == [etag]
        assert resp.headers.getall("Last-Modified") == [last_modified]
        assert resp.headers.getall("Vary") == ["Accept-Encoding"]
        assert resp.headers.getall("Content-Length") == [str(len(compressed))]
    assert recorder.last.get("Accept-Encoding") == "gzip"


async def test_accept_encoding_is_not_invented(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(
        f"{proxy.url}/plain", skip_auto_headers=["Accept-Encoding", "User-Agent"]
    ) as resp:
        assert resp.status == 200
    seen = recorder.last
    assert seen.get_all("Accept-Encoding") == [], seen.headers
    assert seen.get_all("User-Agent") == [], seen.headers


async def test_no_request_header_is_invented(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    request = raw_request(
        "POST",
        "/bare",
        [("Host", f"127.0.0.1:{proxy.port}"), ("Content-Length", "5"), ("Connection", "close")],
        b"hello",
    )
    resp = await raw_http(proxy.port, request)
    assert resp.status == 200, resp.body
    seen = recorder.last
    assert seen.body_sha256 == sha256(b"hello")
    for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type", "Cookie"):
        assert seen.get_all(name) == [], f"the proxy invented {name}: {seen.headers}"


async def test_several_set_cookie_headers_stay_separate_and_ordered(
    start_backend, start_proxy, client
):
    cookies = [
        "a=1; Path=/",
        "b=2; HttpOnly; Secure",
        "c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/x",
    ]

    async def set_cookies(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        for cookie in cookies:
            resp.headers.add("Set-Cookie", cookie)
        return resp

    recorder = Recorder(routes={"/cookies": set_cookies})
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/cookies") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == cookies


# --------------------------------------------------------------------------------------------
# Hop-by-hop headers (RFC 9110 7.6.1), both directions
# --------------------------------------------------------------------------------------------

REQUEST_HOP_HEADERS = [
    ("Connection", "keep-alive, X-Secret-Hop"),
    ("X-Secret-Hop", "1"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Authorization", "x"),
    ("Proxy-Connection", "keep-alive"),
    ("Upgrade", "foo"),
]


async def test_hop_by_hop_request_headers_do_not_reach_the_backend(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    request = raw_request(
        "GET",
        "/hop",
        [
            ("Host", f"127.0.0.1:{proxy.port}"),
            *REQUEST_HOP_HEADERS,
            ("X-End-To-End", "yes"),
            ("Authorization", "Bearer token"),
            ("Accept", "application/json"),
        ],
    )
    resp = await raw_http(proxy.port, request)
    assert resp.status == 200, resp.body
    seen = recorder.last
    for name, _ in REQUEST_HOP_HEADERS:
        if name == "Connection":
            # the proxy's own connection may carry one, but never the client's list
            for value in seen.get_all("Connection"):
                assert "x-secret-hop" not in value.lower(), seen.headers
        else:
            assert seen.get_all(name) == [], f"{name} reached the backend: {seen.headers}"
    assert seen.get("X-End-To-End") == "yes"
    assert seen.get("Authorization") == "Bearer token"
    assert seen.get("Accept") == "application/json"


async def test_hop_by_hop_response_headers_do_not_reach_the_client(
    start_backend, start_proxy, client
):
    async def hop(request: web.Request) -> web.Response:
        return web.Response(
            text="hop",
            headers={
                "Connection": "X-Backend-Hop",
                "X-Backend-Hop": "1",
                "Keep-Alive": "timeout=5",
                "X-Backend-End-To-End": "kept",
            },
        )

    recorder = Recorder(routes={"/hop": hop})
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/hop") as resp:
        assert resp.status == 200
        assert await resp.read() == b"hop"
        names = [k.decode("latin-1").lower() for k, _ in resp.raw_headers]
        assert "x-backend-hop" not in names, resp.raw_headers
        assert "keep-alive" not in names, resp.raw_headers
        for value in resp.headers.getall("Connection", []):
            assert "x-backend-hop" not in value.lower(), resp.raw_headers
        assert resp.headers.getall("X-Backend-End-To-End") == ["kept"]


async def test_response_header_names_keep_the_backends_spelling(start_backend, start_proxy):
    """Byte for byte, as nginx passes them: aiohttp's parser spells the names it knows its
    own way (ETag arrives as "Etag", cache-control as "Cache-Control"); a client or script
    matching names case-sensitively must see what the backend sent."""
    spelled = {
        "ETag": '"v1"',
        "cache-control": "no-cache",
        "x-lower-case": "1",
        "X-UPPER-CASE": "2",
        "last-MODIFIED": "Mon, 07 Dec 2026 18:00:00 GMT",
    }
    recorder = Recorder()
    backend = await start_backend(recorder.app())

    async def named(request: web.Request) -> web.Response:
        moved = {"location": f"{backend.url}/next"}  # into the upstream: rewritten
        return web.Response(status=302, body=b"", headers={**spelled, **moved})

    recorder.routes["/named"] = named
    proxy = start_proxy(backend.url)
    request = raw_request(
        "GET", "/named", [("Host", f"127.0.0.1:{proxy.port}"), ("Connection", "close")]
    )
    resp = await raw_http(proxy.port, request)
    assert resp.status == 302, resp.body
    names = [name for name, _ in resp.headers]
    for name, value in spelled.items():
        assert (name, value) in resp.headers, (name, resp.headers)
    assert ("location", f"http://127.0.0.1:{proxy.port}/next") in resp.headers, resp.headers
    assert "Etag" not in names and "Location" not in names, names


# --------------------------------------------------------------------------------------------
# X-Forwarded-*, trusted proxies and X-Request-ID
# --------------------------------------------------------------------------------------------


async def test_forwarded_for_is_appended_and_proto_host_are_set(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/fwd", headers={"X-Forwarded-For": "1.2.3.4"}) as resp:
        assert resp.status == 200
    seen = recorder.last
    assert seen.get_all("X-Forwarded-For") == ["1.2.3.4, 127.0.0.1"]
    assert seen.get_all("X-Forwarded-Proto") == ["http"]
    assert seen.get_all("X-Forwarded-Host") == [f"127.0.0.1:{proxy.port}"]


async def test_forwarded_for_is_set_when_the_client_sent_none(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/fwd") as resp:
        assert resp.status == 200
    assert recorder.last.get_all("X-Forwarded-For") == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("env", "proto", "host"),
    [
        pytest.param({}, "https", "files.example.com", id="loopback-trusted-by-default"),
        pytest.param(
            {"FILEPROXY_TRUSTED_PROXIES": "10.0.0.0/8"}, "http", None, id="loopback-untrusted"
        ),
    ],
)
async def test_forwarded_proto_and_host_kept_only_from_trusted_peers(
    start_backend, start_proxy, client, env, proto, host
):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url, **env)
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "files.example.com"}
    async with client.get(f"{proxy.url}/fwd", headers=headers) as resp:
        assert resp.status == 200
    seen = recorder.last
    assert seen.get_all("X-Forwarded-Proto") == [proto]
    assert seen.get_all("X-Forwarded-Host") == [host or f"127.0.0.1:{proxy.port}"]


async def test_request_id_is_generated_returned_and_forwarded(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/rid") as resp:
        assert resp.status == 200
        returned = resp.headers.getall("X-Request-ID")
    assert len(returned) == 1 and returned[0], returned
    assert recorder.last.get_all("X-Request-ID") == returned


async def test_valid_client_request_id_is_kept(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    request_id = "client-req.42:abc_DEF"
    async with client.get(f"{proxy.url}/rid", headers={"X-Request-ID": request_id}) as resp:
        assert resp.status == 200
        assert resp.headers.getall("X-Request-ID") == [request_id]
    assert recorder.last.get_all("X-Request-ID") == [request_id]


async def test_invalid_client_request_id_is_replaced(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    bad = "no spaces <allowed>"
    async with client.get(f"{proxy.url}/rid", headers={"X-Request-ID": bad}) as resp:
        assert resp.status == 200
        returned = resp.headers.getall("X-Request-ID")
    assert len(returned) == 1 and returned[0] and returned[0] != bad
    assert recorder.last.get_all("X-Request-ID") == returned


# --------------------------------------------------------------------------------------------
# Ranges and conditional requests, against the bundled sample upstream
# --------------------------------------------------------------------------------------------

SAMPLE = "64k.bin"


async def test_range_request_gets_206_with_exact_bytes(sample_upstream, start_proxy, client):
    proxy = start_proxy(sample_upstream.url)
    async with client.get(
        f"{proxy.url}/files/{SAMPLE}", headers={"Range": "bytes=100-199"}
    ) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{FILES[SAMPLE]}"
        assert resp.headers["Content-Length"] == "100"
        assert await resp.read() == sample_bytes(SAMPLE, 100, 200)


async def test_if_range_with_matching_etag_gets_206(sample_upstream, start_proxy, client):
    proxy = start_proxy(sample_upstream.url)
    headers = {"Range": "bytes=100-199", "If-Range": etag_for(SAMPLE)}
    async with client.get(f"{proxy.url}/files/{SAMPLE}", headers=headers) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{FILES[SAMPLE]}"
        assert await resp.read() == sample_bytes(SAMPLE, 100, 200)


async def test_if_range_with_stale_etag_gets_200_full(sample_upstream, start_proxy, client):
    proxy = start_proxy(sample_upstream.url)
    headers = {"Range": "bytes=100-199", "If-Range": '"stale-etag"'}
    async with client.get(f"{proxy.url}/files/{SAMPLE}", headers=headers) as resp:
        assert resp.status == 200
        assert "Content-Range" not in resp.headers
        assert resp.headers["Content-Length"] == str(FILES[SAMPLE])
        assert await resp.read() == sample_bytes(SAMPLE)


async def test_if_none_match_gets_304_without_body(sample_upstream, start_proxy):
    proxy = start_proxy(sample_upstream.url)
    request = raw_request(
        "GET",
        f"/files/{SAMPLE}",
        [
            ("Host", f"127.0.0.1:{proxy.port}"),
            ("If-None-Match", etag_for(SAMPLE)),
            ("Connection", "close"),
        ],
    )
    resp = await raw_http(proxy.port, request, to_eof=True)
    assert resp.status == 304
    assert resp.get("ETag") == etag_for(SAMPLE)
    assert resp.body == b""


async def test_unsatisfiable_range_gets_416(sample_upstream, start_proxy, client):
    proxy = start_proxy(sample_upstream.url)
    size = FILES[SAMPLE]
    headers = {"Range": f"bytes={size}-"}
    async with client.get(f"{proxy.url}/files/{SAMPLE}", headers=headers) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{size}"


async def test_head_gets_headers_and_no_body(sample_upstream, start_proxy):
    proxy = start_proxy(sample_upstream.url)
    request = raw_request(
        "HEAD",
        f"/files/{SAMPLE}",
        [("Host", f"127.0.0.1:{proxy.port}"), ("Connection", "close")],
    )
    resp = await raw_http(proxy.port, request, to_eof=True)
    assert resp.status == 200
    assert resp.get_all("Content-Length") == [str(FILES[SAMPLE])]
    assert resp.get("ETag") == etag_for(SAMPLE)
    assert resp.get("Last-Modified") == LAST_MODIFIED
    assert resp.get("Accept-Ranges") == "bytes"
    assert resp.body == b""


# --------------------------------------------------------------------------------------------
# Redirects, cookies, paths and request targets
# --------------------------------------------------------------------------------------------


async def test_redirect_is_passed_not_followed(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    location = "https://elsewhere.example/target?from=old"  # not the upstream: kept as sent

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    recorder.routes["/old"] = moved
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/old", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers.getall("Location") == [location]
    assert [seen.raw_path for seen in recorder.seen] == ["/old"]


async def test_cookies_are_never_stored_or_replayed(start_backend, start_proxy, client):
    async def login(request: web.Request) -> web.Response:
        resp = web.Response(text="logged in")
        resp.headers["Set-Cookie"] = "session=abc; Path=/"
        return resp

    recorder = Recorder(routes={"/login": login})
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/login") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["session=abc; Path=/"]
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as other,
        other.get(f"{proxy.url}/check") as resp,
    ):
        assert resp.status == 200
    assert [seen.raw_path for seen in recorder.seen] == ["/login", "/check"]
    assert recorder.seen[1].get_all("Cookie") == [], recorder.seen[1].headers


async def test_path_reaches_the_backend_exactly_as_received(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    target = "/a/%2e%2e/b%2Fc?x=%20y"
    request = raw_request(
        "GET", target, [("Host", f"127.0.0.1:{proxy.port}"), ("Connection", "close")]
    )
    resp = await raw_http(proxy.port, request)
    assert resp.status == 200, resp.body
    assert recorder.last.raw_path == target


async def test_path_sent_by_aiohttp_with_encoded_url_is_kept(start_backend, start_proxy, client):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    target = "/files/%7Euser/with%20space/x%3By?q=a%26b&r=%2F"
    async with client.get(yarl.URL(f"{proxy.url}{target}", encoded=True)) as resp:
        assert resp.status == 200
    assert recorder.last.raw_path == target


# what nginx refuses (400) and what it passes: checked against a real nginx in the test
TARGETS_NGINX_JUDGES = [
    "/%zz", "/a%zzb", "/%", "/a%2", "/%1g", "/%%", "/%00", "/a/.%00",
    "/../x", "/..", "/a/../../b", "/%2e%2e/x", "/.%2e/x", "/..%2fx", "/a%2f..%2f..%2fx",
    "/a//../..", "/a/%zz/../b",
    "/ok", "/%2F", "/%e9", "/%25", "/%41", "/a%2fb", "/a/../b", "/a/..", "/./x", "/a/%2e%2e",
    "/a/.../b", "/?a=%zz", "/a/..?x=../..", "/a?%", "/a%23b", "/a%3fb",
]  # fmt: skip


@pytest.fixture
def nginx_answering(tmp_dir):
    """A real nginx whose every location answers 204: its 400s come from its request parser."""
    from tests.conftest import free_port, start_process
    from tests.integration.test_deployment import nginx_binary

    port = free_port()
    conf = tmp_dir / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {tmp_dir}/nginx.pid;
error_log {tmp_dir}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {tmp_dir}/cbt; proxy_temp_path {tmp_dir}/pt;
    fastcgi_temp_path {tmp_dir}/ft; uwsgi_temp_path {tmp_dir}/ut; scgi_temp_path {tmp_dir}/st;
    access_log off;
    server {{ listen 127.0.0.1:{port}; location / {{ return 204; }} }}
}}
"""
    )
    args = [nginx_binary(), "-c", str(conf), "-p", str(tmp_dir), "-e", f"{tmp_dir}/nginx-error.log"]
    process = start_process(args, port, {}, tmp_dir / "nginx-stdout.log")
    yield process
    process.stop()


async def test_targets_nginx_refuses_get_a_json_400_and_never_reach_the_backend(
    start_backend, start_proxy, nginx_answering
):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    passed = []
    for target in TARGETS_NGINX_JUDGES:
        request = raw_request("GET", target, [("Host", "files.example"), ("Connection", "close")])
        by_nginx = await raw_http(nginx_answering.port, request)
        assert by_nginx.status in (204, 400), (target, by_nginx.status)
        resp = await raw_http(proxy.port, request)
        if by_nginx.status == 400:
            assert resp.status == 400, (target, resp.status, resp.body)
            body = json.loads(resp.body)
            assert body["error"] == "bad_target", (target, body)
            assert "request path" in body["detail"], (target, body)
        else:
            assert resp.status == 200, (target, resp.status, resp.body)
            passed.append(target)
    assert "/%zz" not in passed and "/ok" in passed
    assert [seen.raw_path for seen in recorder.seen] == passed


async def test_absolute_form_target_is_refused(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    request = raw_request(
        "GET", "http://evil.example/", [("Host", "evil.example"), ("Connection", "close")]
    )
    resp = await raw_http(proxy.port, request)
    assert 400 <= resp.status < 500, (resp.status, resp.body)
    assert (resp.get("Content-Type") or "").startswith("application/json")
    assert "error" in json.loads(resp.body)
    assert recorder.seen == []


# --------------------------------------------------------------------------------------------
# Request body size limit
# --------------------------------------------------------------------------------------------

LIMIT = 1 * MIB


class SilentBackend:
    """A raw TCP backend: records the bytes of each connection until EOF, never answers.

    Unlike an aiohttp app it sees exactly what the proxy wrote, even a request cut short.
    """

    def __init__(self) -> None:
        self.connections: list[bytearray] = []
        self.ended = 0
        self._changed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SilentBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        received = bytearray()
        self.connections.append(received)
        try:
            while data := await reader.read(65536):
                received += data
        except ConnectionError:
            pass
        finally:
            self.ended += 1
            self._changed.set()
            writer.close()

    async def wait_requests_ended(self, timeout: float = 5.0) -> None:
        """Until a connection carried bytes (a request, not a probe) and every connection
        has ended. The proxy's connection may be accepted by the kernel before this loop
        ran its handler: with nothing recorded yet, there is nothing to call ended."""
        async with asyncio.timeout(timeout):
            while not any(self.connections) or self.ended < len(self.connections):
                self._changed.clear()
                await self._changed.wait()


def parse_chunked(body: bytes) -> tuple[bytes, bool]:
    """The data of a chunked body and whether its last (zero-size) chunk arrived."""
    data = bytearray()
    pos = 0
    while (eol := body.find(b"\r\n", pos)) != -1:
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(data), True
        data += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(data), False


async def test_declared_body_above_limit_is_refused_without_calling_backend(start_proxy):
    async with SilentBackend() as backend:
        proxy = start_proxy(backend.url, FILEPROXY_MAX_BODY_SIZE=str(LIMIT))
        # Only the head is sent: the answer must not wait for a body it will refuse anyway.
        request = raw_request(
            "POST",
            "/upload",
            [
                ("Host", f"127.0.0.1:{proxy.port}"),
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(LIMIT + 1)),
            ],
        )
        resp = await raw_http(proxy.port, request)
        assert resp.status == 413
        assert (resp.get("Content-Type") or "").startswith("application/json")
        assert json.loads(resp.body)["error"] == "body_too_large"
        # the readiness probe may open (and close) a bare TCP connection; no request is sent
        assert all(received == b"" for received in backend.connections)


async def test_chunked_body_above_limit_is_refused_and_never_completes_upstream(
    start_proxy, client
):
    async with SilentBackend() as backend:
        proxy = start_proxy(backend.url, FILEPROXY_MAX_BODY_SIZE=str(LIMIT))

        async def body() -> AsyncIterator[bytes]:
            for _ in range(32):  # 2 MiB in 64 KiB chunks, no Content-Length
                yield b"x" * 65536

        async with client.post(f"{proxy.url}/upload", data=body()) as resp:
            assert resp.status == 413, await resp.text()
            assert resp.content_type == "application/json"
            assert (await resp.json())["error"] == "body_too_large"
        # The proxy must cut the upstream request it had started: its connection ends
        # (EOF) in the middle of the chunked body, never after the last chunk.
        await backend.wait_requests_ended()
        requests = [received for received in backend.connections if received]  # not probes
        assert requests, "the proxy never started the upstream request"
        for received in requests:
            head, sep, rest = bytes(received).partition(b"\r\n\r\n")
            assert sep, f"incomplete request head upstream: {head[:200]!r}"
            assert b"transfer-encoding: chunked" in head.lower(), head
            data, complete = parse_chunked(rest)
            assert not complete, "the backend received a complete request body"
            assert len(data) <= LIMIT
