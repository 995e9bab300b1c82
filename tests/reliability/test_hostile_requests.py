"""Hostile and malformed requests, sent over raw sockets to the real daemon.

Each must get a 4xx JSON error ``{error, detail, request_id}`` and reach the backend
never: a recording backend proves nothing (and no smuggled second request) got
through, and a normal request afterwards proves the daemon still serves.
"""

from __future__ import annotations

import pytest

from tests.conftest import free_port
from tests.reliability.rawhttp import (
    RecordingBackend,
    assert_json_error,
    exchange,
    parse_response,
)

H = b"Host: fileproxy.test\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"

# (id, raw request, status); none of them may reach the backend
MALFORMED = [
    ("no-target", b"GET\r\n" + H + b"\r\n", 400),
    ("bad-version", b"GET / HTTX/1.1\r\n" + H + b"\r\n", 400),
    # llhttp reads a line without a version as HTTP/0.9; CONNECT so got no answer at all
    ("no-version", b"GET /a\r\n\r\n", 400),
    ("connect-without-version", b"CONNECT   \r\n\r\n", 400),
    ("http-2-line", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("junk-after-version", b"GET / HTTP/1.1 junk\r\n" + H + b"\r\n", 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("ctl-in-target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("tls-on-http-port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),
    ("binary-garbage", b"\x00\xff\xfe\r\n\r\n", 400),
    ("invalid-method-token", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("method-with-nul", b"GE\x00T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bare-lf", b"GET / HTTP/1.1\nHost: fileproxy.test\n\n", 400),
    ("bare-lf-in-headers", b"GET / HTTP/1.1\r\nHost: fileproxy.test\nX-A: b\r\n\r\n", 400),
    ("bare-cr", b"GET / HTTP/1.1\r\nHost: fileproxy.test\rX-A: b\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n  folded\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : fileproxy.test\r\n\r\n", 400),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n", 400),
    ("separator-in-name", b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n", 400),
    ("no-colon", b"GET / HTTP/1.1\r\n" + H + b"XA b\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("missing-host-1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
]

SMUGGLING = [
    (
        "cl-and-te",
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "te-and-cl",
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "two-content-lengths",
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 41\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "two-equal-content-lengths",
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    (
        "content-length-list",
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc",
        400,
    ),
    (
        "content-length-sign",
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc",
        400,
    ),
    (
        "te-chunked-identity",
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "te-identity",
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "te-xchunked",
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "te-twice",
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "te-with-space-before-colon",
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
    (
        "te-in-http-1.0",
        b"POST /a HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        400,
    ),
]

# invalid chunk sizes: the head is fine, the body is not; the request may start
# upstream, but must fail (the client gets 400 or a cut) and nothing behind it is parsed
BAD_CHUNKS = [
    ("chunk-size-not-hex", b"zz\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-overflow", b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"-3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-0x", b"0x3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-space", b"3 \r\nabc\r\n0\r\n\r\n"),
    ("chunk-data-too-long", b"3\r\nabcdef\r\n0\r\n\r\n"),
    ("chunk-bare-lf", b"3\nabc\n0\n\n"),
]


async def _daemon(start_backend, start_proxy):  # type: ignore[no-untyped-def]
    backend = RecordingBackend()
    server = await start_backend(backend.app())
    proxy = start_proxy(server.url)
    return backend, proxy


async def _serves_normally(port: int, backend: RecordingBackend) -> None:
    before = len(backend.seen)
    raw = await exchange(port, b"GET /after HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    resp = parse_response(raw)
    assert resp.status == 200 and resp.body == b"backend ok"
    assert backend.seen[before:] == [("GET", "/after", b"")]


@pytest.mark.parametrize(
    ("raw", "status"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
async def test_malformed_request_is_400_json_and_never_forwarded(
    start_backend, start_proxy, raw, status
):
    backend, proxy = await _daemon(start_backend, start_proxy)
    resp = parse_response(await exchange(proxy.port, raw))
    assert_json_error(resp, status)
    assert backend.seen == []
    await _serves_normally(proxy.port, backend)


@pytest.mark.parametrize(
    ("raw", "status"), [c[1:] for c in SMUGGLING], ids=[c[0] for c in SMUGGLING]
)
async def test_ambiguous_framing_is_rejected_and_hides_no_second_request(
    start_backend, start_proxy, raw, status
):
    backend, proxy = await _daemon(start_backend, start_proxy)
    resp = parse_response(await exchange(proxy.port, raw))
    assert_json_error(resp, status)
    assert backend.seen == []
    await _serves_normally(proxy.port, backend)


@pytest.mark.parametrize("body", [c[1] for c in BAD_CHUNKS], ids=[c[0] for c in BAD_CHUNKS])
async def test_invalid_chunk_sizes_never_deliver_a_body_or_a_hidden_request(
    start_backend, start_proxy, body
):
    backend, proxy = await _daemon(start_backend, start_proxy)
    head = b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    raw = await exchange(proxy.port, head + body + SMUGGLED)
    if raw:  # 400 JSON, or the connection cut: never a 2xx
        assert_json_error(parse_response(raw), 400)
    # the backend may have seen the POST begin, but never completed with a body, and
    # never the request hidden behind it
    assert all(path != "/smuggled" for _, path, _ in backend.seen), backend.seen
    assert all(not (m == "POST" and body) for m, _, body in backend.seen), backend.seen
    await _serves_normally(proxy.port, backend)


async def test_absolute_form_for_another_host_is_refused(start_backend, start_proxy):
    backend, proxy = await _daemon(start_backend, start_proxy)
    other = RecordingBackend()
    other_server = await start_backend(other.app())
    for target in (
        f"http://127.0.0.1:{other_server.port}/x".encode(),
        b"https://example.com/",
    ):
        raw = b"GET " + target + b" HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
        body = assert_json_error(parse_response(await exchange(proxy.port, raw)), 400)
        assert body["error"] in ("bad_target", "bad_request_line")
    assert backend.seen == [] and other.seen == []  # (our own authority is served: RFC 9112)
    await _serves_normally(proxy.port, backend)


async def test_connect_is_refused(start_backend, start_proxy):
    backend, proxy = await _daemon(start_backend, start_proxy)
    other_port = free_port()
    for raw, statuses in (
        (
            f"CONNECT 127.0.0.1:{other_port} HTTP/1.1\r\nHost: x:{other_port}\r\n\r\n".encode(),
            (400, 405),
        ),
        (b"CONNECT /tunnel HTTP/1.1\r\n" + H + b"\r\n" + SMUGGLED, (400, 405)),
    ):
        resp = parse_response(await exchange(proxy.port, raw))
        assert resp.status in statuses, resp
        assert_json_error(resp, resp.status)
    assert backend.seen == []
    await _serves_normally(proxy.port, backend)


async def test_host_header_never_chooses_the_destination(start_backend, start_proxy):
    backend, proxy = await _daemon(start_backend, start_proxy)
    other = RecordingBackend()
    other_server = await start_backend(other.app())
    for host in (f"127.0.0.1:{other_server.port}", "evil.example", "localhost:1"):
        raw = f"GET /h HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        assert parse_response(await exchange(proxy.port, raw)).status == 200
    # a network-path target is a path of the configured upstream, not another host
    raw = (
        f"GET //127.0.0.1:{other_server.port}/n HTTP/1.1\r\n".encode()
        + H
        + b"Connection: close\r\n\r\n"
    )
    assert parse_response(await exchange(proxy.port, raw)).status == 200
    assert other.seen == []
    assert [path for _, path, _ in backend.seen] == [
        "/h",
        "/h",
        "/h",
        f"//127.0.0.1:{other_server.port}/n",
    ]


async def test_limits_414_431_are_json(start_backend, start_proxy):
    backend, proxy = await _daemon(start_backend, start_proxy)
    cases = [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, "uri_too_long"),
        (
            b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 9000 + b"\r\n\r\n",
            431,
            "header_too_large",
        ),
        (b"GET / HTTP/1.1\r\n" + H + b"X-" + b"n" * 9000 + b": v\r\n\r\n", 431, "header_too_large"),
        (
            b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n",
            431,
            "too_many_headers",
        ),
    ]
    for raw, status, error in cases:
        body = assert_json_error(parse_response(await exchange(proxy.port, raw)), status)
        assert body["error"] == error
    assert backend.seen == []
    await _serves_normally(proxy.port, backend)


async def test_error_bodies_never_echo_request_content(start_backend, start_proxy):
    backend, proxy = await _daemon(start_backend, start_proxy)
    payload = b"<script>alert(1)</script>"
    for raw in (
        b"GET /" + payload + b" HTTP/1.1 junk\r\n" + H + b"\r\n",
        b"G<script> / HTTP/1.1\r\n" + H + b"\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"X-A: " + payload + b"\r\n  fold\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"<script>: v\r\n\r\n",
        b"GET /" + payload + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
    ):
        resp = parse_response(await exchange(proxy.port, raw))
        assert 400 <= resp.status < 500
        assert b"<" not in resp.body and b"script" not in resp.body, resp.body
    assert backend.seen == []
