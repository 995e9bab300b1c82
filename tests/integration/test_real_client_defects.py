"""What real clients and backends tripped over (issue 12, items 4-9 and the access line).

Each behaviour is checked the way nginx as a reverse proxy behaves with the same
client and backend; where framing matters the client is a raw socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import free_port, start_process
from tests.integration.test_deployment import nginx_binary
from tests.integration.test_proxy_semantics import Recorder, raw_http, raw_request


def _host(port: int) -> tuple[str, str]:
    return ("Host", f"127.0.0.1:{port}")


# --------------------------------------------------------------------------------------------
# 4. absolute redirects are rewritten to the client-facing address (nginx proxy_redirect default)
# --------------------------------------------------------------------------------------------


async def test_absolute_redirect_to_the_upstream_is_rewritten_to_the_proxy(
    start_backend, start_proxy
):
    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": f"{backend.url}/target?x=1#f"})

    async def elsewhere(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "https://other.example/x"})

    async def lookalike(request: web.Request) -> web.Response:
        # same host, another port: not the upstream
        return web.Response(status=302, headers={"Location": "http://127.0.0.1:1/x"})

    recorder = Recorder(routes={"/old": moved, "/away": elsewhere, "/lookalike": lookalike})
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    resp = await raw_http(proxy.port, raw_request("GET", "/old", [_host(proxy.port)]))
    assert resp.status == 302
    assert resp.get_all("Location") == [f"http://127.0.0.1:{proxy.port}/target?x=1#f"]
    # a trusted fronting proxy (loopback by default) says how clients reach us
    forwarded = [
        _host(proxy.port),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "files.example"),
    ]
    resp = await raw_http(proxy.port, raw_request("GET", "/old", forwarded))
    assert resp.get_all("Location") == ["https://files.example/target?x=1#f"]
    for path, location in (
        ("/away", "https://other.example/x"),
        ("/lookalike", "http://127.0.0.1:1/x"),
    ):
        resp = await raw_http(proxy.port, raw_request("GET", path, [_host(proxy.port)]))
        assert resp.get_all("Location") == [location]


@pytest.fixture
def nginx_static(tmp_dir: Path):
    """A real nginx serving tmp_dir/www; its directory redirects are absolute."""
    root = tmp_dir / "www"
    (root / "sub" / "dir").mkdir(parents=True)
    (root / "sub" / "dir" / "index.html").write_text("hello\n")
    for path in (tmp_dir, root, root / "sub", root / "sub" / "dir"):
        path.chmod(0o755)  # nginx's workers are not root
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
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
    )
    args = [nginx_binary(), "-c", str(conf), "-p", str(tmp_dir), "-e", f"{tmp_dir}/nginx-error.log"]
    process = start_process(args, port, {}, tmp_dir / "nginx-stdout.log")
    yield process
    process.stop()


async def test_nginx_directory_redirect_under_an_upstream_prefix(nginx_static, start_proxy):
    proxy = start_proxy(f"http://127.0.0.1:{nginx_static.port}/sub")
    resp = await raw_http(proxy.port, raw_request("GET", "/dir", [_host(proxy.port)]))
    assert resp.status == 301, resp.body
    assert resp.get_all("Location") == [f"http://127.0.0.1:{proxy.port}/dir/"]
    resp = await raw_http(proxy.port, raw_request("GET", "/dir/", [_host(proxy.port)]))
    assert (resp.status, resp.body) == (200, b"hello\n")


# --------------------------------------------------------------------------------------------
# 5. an upstream response with many header fields is passed, bounded by total size
# --------------------------------------------------------------------------------------------


async def test_many_upstream_header_fields_pass_through(start_backend, start_proxy):
    async def cookies(request: web.Request) -> web.Response:
        resp = web.Response(status=302, headers={"Location": "/cookies"})
        for i in range(int(request.query["n"])):
            resp.headers.add("Set-Cookie", f"c{i}=v{i}; Path=/")
        return resp

    backend = await start_backend(Recorder(routes={"/cookies/set": cookies}).app())
    proxy = start_proxy(backend.url)
    resp = await raw_http(proxy.port, raw_request("GET", "/cookies/set?n=130", [_host(proxy.port)]))
    assert resp.status == 302, resp.body
    assert resp.get_all("Set-Cookie") == [f"c{i}=v{i}; Path=/" for i in range(130)]
    # what is refused is a header block too large to be sane, with a JSON 502
    resp = await raw_http(
        proxy.port, raw_request("GET", "/cookies/set?n=6000", [_host(proxy.port)])
    )
    assert resp.status == 502, resp.status
    assert json.loads(resp.body)["error"]


# --------------------------------------------------------------------------------------------
# 6. no Content-Type is invented; 7. X-Accel-Buffering only where a body may stream
# --------------------------------------------------------------------------------------------


async def test_no_content_type_or_buffering_header_is_invented(start_backend, start_proxy):
    async def teapot(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=418)
        resp.content_length = 5
        await resp.prepare(request)
        await resp.write(b"short")
        return resp

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)  # no length: chunked, a stream
        await resp.prepare(request)
        await resp.write(b"tick\n")
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query["s"]))

    recorder = Recorder(routes={"/teapot": teapot, "/stream": stream, "/status": status})
    backend = await start_backend(recorder.app())
    # aiohttp's backend adds a Content-Type to a StreamResponse too; strip it at the source
    # by checking what the backend sent first
    proxy = start_proxy(backend.url)
    direct = await raw_http(backend.port, raw_request("GET", "/teapot", [_host(backend.port)]))
    resp = await raw_http(proxy.port, raw_request("GET", "/teapot", [_host(proxy.port)]))
    assert resp.status == 418
    assert resp.get_all("Content-Type") == direct.get_all("Content-Type")
    stream_resp = await raw_http(proxy.port, raw_request("GET", "/stream", [_host(proxy.port)]))
    assert stream_resp.get_all("X-Accel-Buffering") == ["no"]
    for code in (204, 304):
        request = raw_request(
            "GET", f"/status?s={code}", [_host(proxy.port), ("Connection", "close")]
        )
        resp = await raw_http(proxy.port, request)
        assert resp.status == code
        assert resp.get_all("X-Accel-Buffering") == [], resp.headers
        assert resp.get_all("Content-Type") == [], resp.headers


async def test_no_content_type_when_the_upstream_sent_none(start_proxy):
    """A raw backend that sends exactly a status line, a length and a body (httpbin /status/418)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 5\r\n\r\nshort")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = start_proxy(f"http://127.0.0.1:{port}")
        resp = await raw_http(proxy.port, raw_request("GET", "/status/418", [_host(proxy.port)]))
        assert (resp.status, resp.body) == (418, b"short")
        assert resp.get_all("Content-Type") == [], resp.headers
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# 7. Expect: 100-continue over the body limit: 413 at once, and the connection closes
# --------------------------------------------------------------------------------------------


async def test_expect_continue_over_the_limit_gets_413_and_close(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url, FILEPROXY_MAX_BODY_SIZE=str(10 * 1024 * 1024))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        head = raw_request(
            "PUT",
            "/big",
            [_host(proxy.port), ("Content-Length", "2147483648"), ("Expect", "100-continue")],
        )
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(10):
            first = await reader.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 413 "), first  # no 100 Continue before it
            assert b"connection: close" in first.lower(), first
            length = int(first.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
        assert json.loads(body)["error"] == "body_too_large"
    finally:
        writer.close()
    assert recorder.seen == []


async def test_expect_continue_within_the_limit_still_continues(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url, FILEPROXY_MAX_BODY_SIZE="1024")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            raw_request(
                "PUT",
                "/small",
                [_host(proxy.port), ("Content-Length", "5"), ("Expect", "100-continue")],
            )
        )
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"hello")
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        writer.close()
    assert recorder.last.body_length == 5


async def test_declared_body_over_the_limit_closes_the_connection(start_backend, start_proxy):
    """Without Expect too: the unread body must never be parsed as the next request."""
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url, FILEPROXY_MAX_BODY_SIZE="1024")
    # the declared body holds a request: it is read and dropped, never served
    body = raw_request("GET", "/smuggled", [_host(proxy.port)]) + b"x" * 2000
    request = raw_request("POST", "/up", [_host(proxy.port), ("Content-Length", str(len(body)))])
    resp = await raw_http(proxy.port, request + body, to_eof=True)
    assert resp.status == 413
    assert (resp.get("Connection") or "").lower() == "close"
    assert b"HTTP/1.1" not in resp.body  # one response only
    assert recorder.seen == []


# --------------------------------------------------------------------------------------------
# 8. absolute-form targets naming the proxy itself are served (RFC 9112 3.2.2)
# --------------------------------------------------------------------------------------------


async def test_absolute_form_naming_the_proxy_is_served(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    own = f"127.0.0.1:{proxy.port}"
    for target in (f"http://{own}/f?q=1", f"HTTP://{own}/f?q=1"):
        resp = await raw_http(proxy.port, raw_request("GET", target, [("Host", own)]))
        assert resp.status == 200, resp.body
        assert recorder.last.raw_path == "/f?q=1"
    served = len(recorder.seen)
    # another authority, even with a matching Host header, is refused: not an open proxy
    for target, host in (("http://evil.example/", own), ("http://127.0.0.1:1/f", own)):
        resp = await raw_http(proxy.port, raw_request("GET", target, [("Host", host)]))
        assert resp.status == 400, (target, resp.status)
        assert json.loads(resp.body)["error"] == "bad_target"
    assert len(recorder.seen) == served


# --------------------------------------------------------------------------------------------
# 9. TRACE is answered 405 and never forwarded
# --------------------------------------------------------------------------------------------


async def test_trace_is_refused_and_never_forwarded(start_backend, start_proxy):
    recorder = Recorder()
    backend = await start_backend(recorder.app())
    proxy = start_proxy(backend.url)
    request = raw_request("TRACE", "/", [_host(proxy.port), ("Cookie", "secret=1")])
    resp = await raw_http(proxy.port, request)
    assert resp.status == 405
    allow = {m.strip() for m in (resp.get("Allow") or "").split(",")}
    assert "GET" in allow and "TRACE" not in allow, allow
    assert json.loads(resp.body)["error"] == "method_not_allowed"
    assert recorder.seen == []


# --------------------------------------------------------------------------------------------
# the access line of a client that went away mid-body
# --------------------------------------------------------------------------------------------


async def test_access_line_of_a_client_abort_mid_body(start_backend, start_proxy):
    size = 64 * 1024 * 1024
    block = b"x" * 65536

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        for _ in range(size // len(block)):
            await resp.write(block)
        return resp

    backend = await start_backend(Recorder(routes={"/big": big}).app())
    proxy = start_proxy(backend.url, FILEPROXY_ACCESS_LOG="on")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(raw_request("GET", "/big", [_host(proxy.port)]))
    got = 0
    async with asyncio.timeout(20):
        while got < 4 * 1024 * 1024:
            got += len(await reader.read(65536))
    writer.transport.abort()
    lines: list[dict] = []  # type: ignore[type-arg]
    async with asyncio.timeout(20):
        while not lines:
            await asyncio.sleep(0.1)
            lines = [
                json.loads(line)
                for line in proxy.log_text().splitlines()
                if line.startswith("{") and '"path": "/big"' in line.replace('":"', '": "')
            ]
    line = lines[0]
    assert line["cause"] == "client_abort", line
    assert line["status"] == 200, line  # the status the client was sent
    assert line["response_bytes"] == line["bytes_out"] > 0, line
