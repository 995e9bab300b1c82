import ipaddress

from multidict import CIMultiDict

from fileproxy.http.headers import (
    client_response_headers,
    end_to_end,
    tunnel_response_headers,
    upstream_request_headers,
    websocket_upgrade,
)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def _request_headers(incoming, peer="127.0.0.1", trusted=LOOPBACK, **kw):
    args = dict(
        peer=peer,
        scheme="http",
        host="files.example",
        request_id="rid",
        trusted=trusted,
        has_body=False,
        content_length=None,
    )
    args.update(kw)
    return upstream_request_headers(CIMultiDict(incoming), **args)


def test_hop_by_hop_and_connection_listed_fields_are_removed():
    out = end_to_end(
        CIMultiDict(
            [
                ("Connection", "keep-alive, X-Hop"),
                ("Connection", "X-Other"),
                ("X-Hop", "1"),
                ("X-Other", "2"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Trailer", "X-T"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Connection", "keep-alive"),
                ("Proxy-Authorization", "Basic x"),
                ("Accept", "*/*"),
            ]
        )
    )
    assert list(out.items()) == [("Accept", "*/*")]


def test_connection_cannot_remove_fields_the_proxy_needs():
    out = end_to_end(
        CIMultiDict(
            [
                ("Connection", "Content-Length, Authorization"),
                ("Content-Length", "3"),
                ("Authorization", "Bearer t"),
            ]
        )
    )
    assert out["Content-Length"] == "3"
    assert out["Authorization"] == "Bearer t"


def test_duplicates_keep_their_order():
    out = client_response_headers(
        CIMultiDict([("Set-Cookie", "a=1"), ("X-A", "x"), ("Set-Cookie", "b=2")]), "rid"
    )
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]


def test_forwarded_headers_for_an_untrusted_peer():
    out = _request_headers(
        [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil"),
            ("Host", "files.example"),
        ],
        peer="203.0.113.9",
    )
    assert out["X-Forwarded-For"] == "1.2.3.4, 203.0.113.9"
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "files.example"
    assert "Host" not in out  # the client library sets the upstream's Host


def test_forwarded_headers_from_a_trusted_proxy_are_kept():
    out = _request_headers(
        [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "cdn.example"),
        ]
    )
    assert out["X-Forwarded-For"] == "1.2.3.4, 127.0.0.1"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "cdn.example"


def test_several_x_forwarded_for_lines_are_joined():
    out = _request_headers([("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")])
    assert out.getall("X-Forwarded-For") == ["1.1.1.1, 2.2.2.2, 127.0.0.1"]


def test_framing_is_regenerated_not_copied():
    out = _request_headers(
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked"), ("Expect", "100-continue")],
        has_body=True,
        content_length=5,
    )
    assert out["Content-Length"] == "5"
    assert "Transfer-Encoding" not in out
    assert "Expect" not in out


def test_a_response_without_length_is_marked_unbuffered():
    assert client_response_headers(CIMultiDict(), "r")["X-Accel-Buffering"] == "no"
    with_length = client_response_headers(CIMultiDict([("Content-Length", "3")]), "r")
    assert "X-Accel-Buffering" not in with_length
    assert with_length["X-Request-ID"] == "r"


def test_a_unix_socket_peer_is_a_trusted_local_process():
    out = _request_headers(
        [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "cdn.example")],
        peer="",
        trusted=(),
        local_socket=True,
    )
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "cdn.example"
    assert "X-Forwarded-For" not in out  # no address to append


def test_names_are_copied_as_the_sender_spelled_them():
    # as aiohttp's parser gives them: its own spelling for the names it knows
    parsed = CIMultiDict(
        [("Etag", '"v1"'), ("Connection", "X-Hop"), ("X-Hop", "1"), ("x-mine", "2")]
    )
    raw = ((b"ETag", b'"v1"'), (b"connection", b"X-Hop"), (b"x-hop", b"1"), (b"x-mine", b"2"))
    out = client_response_headers(parsed, "rid", status=200, spelled=raw)
    assert list(out.items()) == [
        ("ETag", '"v1"'),
        ("x-mine", "2"),
        ("X-Accel-Buffering", "no"),
        ("X-Request-ID", "rid"),
    ]


def test_hop_by_hop_fields_are_removed_whatever_their_case():
    out = end_to_end(
        CIMultiDict(
            [
                ("connection", "x-hop"),
                ("X-HOP", "1"),
                ("upgrade", "websocket"),
                ("KEEP-ALIVE", "timeout=5"),
                ("te", "trailers"),
                ("Accept", "*/*"),
            ]
        )
    )
    assert list(out.items()) == [("Accept", "*/*")]
    request = _request_headers([("host", "evil.example"), ("expect", "100-continue")])
    assert "Expect" not in request and "Host" not in request


def test_only_a_websocket_upgrade_is_forwarded():
    asked = CIMultiDict([("Upgrade", "WebSocket"), ("Connection", "keep-alive, Upgrade")])
    assert websocket_upgrade("GET", asked)
    assert not websocket_upgrade("POST", asked)
    other = CIMultiDict([("Upgrade", "h2c"), ("Connection", "upgrade")])
    assert not websocket_upgrade("GET", other)
    assert not websocket_upgrade("GET", CIMultiDict([("Upgrade", "websocket")]))
    out = _request_headers(list(asked.items()), upgrade=True)
    assert (out["Upgrade"], out["Connection"]) == ("websocket", "upgrade")
    assert "Upgrade" not in _request_headers(list(asked.items()))  # not tunnelled: dropped


def test_a_101_to_the_client_names_the_switch_and_keeps_the_handshake():
    upstream = CIMultiDict(
        [("Upgrade", "websocket"), ("Connection", "upgrade"), ("Sec-WebSocket-Accept", "k=")]
    )
    out = tunnel_response_headers(upstream, "rid")
    assert out["Upgrade"] == "websocket" and out["Connection"] == "Upgrade"
    assert out["Sec-WebSocket-Accept"] == "k=" and out["X-Request-ID"] == "rid"
