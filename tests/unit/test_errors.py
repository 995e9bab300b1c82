import aiohttp
import pytest
from aiohttp import http_exceptions

from fileproxy.http import errors
from fileproxy.http.errors import ClientRequestError, classify


@pytest.mark.parametrize(
    ("exc", "status", "error"),
    [
        (TimeoutError(), 504, "upstream_timeout"),
        (aiohttp.ConnectionTimeoutError(), 504, "upstream_timeout"),
        (aiohttp.SocketTimeoutError(), 504, "upstream_timeout"),
        (aiohttp.ServerDisconnectedError(), 502, "upstream_disconnected"),
        (aiohttp.ClientPayloadError("short"), 502, "upstream_bad_response"),
        (ConnectionResetError(), 502, "upstream_failed"),
        (ClientRequestError(413, "body_too_large", "too big"), 413, "body_too_large"),
        (ValueError("bug"), 500, "internal_error"),
    ],
)
def test_one_place_maps_failures_to_statuses(exc, status, error):
    failure = classify(exc)
    assert (failure.status, failure.error) == (status, error)


@pytest.mark.parametrize(
    ("exc", "in_line", "status", "error"),
    [
        (http_exceptions.LineTooLong(b"/aaaa", 8190), True, 414, "uri_too_long"),
        (http_exceptions.LineTooLong(b"X-Big", 8190), False, 431, "header_too_large"),
        (http_exceptions.BadHttpMessage("Too many headers"), False, 431, "too_many_headers"),
        (http_exceptions.BadHttpMethod("G(T"), True, 400, "bad_method"),
        (http_exceptions.BadStatusLine("GET / HTTP/1.1 x"), True, 400, "bad_request_line"),
        (http_exceptions.InvalidHeader(b"X A"), False, 400, "bad_header"),
        (
            http_exceptions.BadHttpMessage("Transfer-Encoding and Content-Length"),
            False, 400, "bad_framing",
        ),
        (errors.RequestHeadTimeout(), False, 408, "request_timeout"),
        (errors.TooManyConnections(), False, 503, "too_many_connections"),
        (RuntimeError("boom <script>"), False, 500, "internal_error"),
    ],
)  # fmt: skip
def test_edge_failures_map_to_statuses_without_echoing_input(exc, in_line, status, error):
    failure = errors.classify_edge(400 if status < 500 else 500, exc, in_request_line=in_line)
    assert (failure.status, failure.error) == (status, error)
    for echoed in ("aaaa", "X-Big", "G(T", "X A", "script"):
        assert echoed not in failure.detail
