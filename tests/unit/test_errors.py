import aiohttp
import httptools
import pytest

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


class _Quiet:
    """A parser's protocol that wants no callback."""


def _parse_error(head: bytes) -> httptools.HttpParserError:
    """What llhttp (the data plane's parser) raises for ``head``."""
    try:
        httptools.HttpRequestParser(_Quiet()).feed_data(head)
    except httptools.HttpParserError as exc:
        return exc
    raise AssertionError(f"llhttp took {head!r}")


@pytest.mark.parametrize(
    ("head", "in_line", "status", "error"),
    [
        (b"G(T / HTTP/1.1\r\n\r\n", True, 400, "bad_method"),
        (b"GET /a\x01b HTTP/1.1\r\n\r\n", True, 400, "bad_target"),
        (b"GET / HTTP/1.1 x\r\n\r\n", True, 400, "bad_request_line"),
        (b"GET / HTTP/1.1\r\nX A: 1\r\n\r\n", False, 400, "bad_header"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            False, 400, "bad_framing",
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, 400, "bad_framing"),
    ],
)  # fmt: skip
def test_parse_errors_map_to_statuses_without_echoing_input(head, in_line, status, error):
    failure = errors.classify_parse_error(_parse_error(head), in_request_line=in_line)
    assert (failure.status, failure.error) == (status, error)
    for echoed in ("G(T", "X A", "zz", "/a"):
        assert echoed not in failure.detail


@pytest.mark.parametrize(
    ("refusal", "error"),
    [
        (413, "body_too_large"),
        (417, "expectation_failed"),
        (501, "not_implemented"),
        (505, "http_version_not_supported"),
        (400, "bad_framing"),
    ],
)
def test_the_machines_refusals_are_answered_with_their_status(refusal, error):
    failure = errors.classify_refusal(refusal)
    assert (failure.status, failure.error) == (refusal, error)


def test_an_exception_escaping_a_handler_is_a_500_without_its_text():
    failure = errors.classify_unexpected(RuntimeError("boom <script>"))
    assert (failure.status, failure.error) == (500, "internal_error")
    assert "script" not in failure.detail
    assert errors.classify_unexpected(TimeoutError()).status == 504
