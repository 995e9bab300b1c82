import aiohttp
import pytest

from fileproxy.errors import ClientRequestError, classify


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
