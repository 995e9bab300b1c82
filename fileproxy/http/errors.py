"""The one place that maps failures to HTTP statuses and JSON error bodies.

Before response headers are sent a failure becomes a status with a JSON body
``{"error", "detail", "request_id"}``; after that the proxy can only abort the
client connection (see proxy_handler), so a truncated body never looks complete.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass

import aiohttp
import httptools
import orjson
from aiohttp import web

from fileproxy.exchange import (  # the causes, named here too: errors.CLIENT_ABORT ...
    CAUSES as CAUSES,
)
from fileproxy.exchange import (
    CLIENT_ABORT as CLIENT_ABORT,
)
from fileproxy.exchange import (
    IDLE_TIMEOUT as IDLE_TIMEOUT,
)
from fileproxy.exchange import (
    OK as OK,
)
from fileproxy.exchange import (
    REJECTED as REJECTED,
)
from fileproxy.exchange import (
    SEND_TIMEOUT as SEND_TIMEOUT,
)
from fileproxy.exchange import (
    SHUTDOWN as SHUTDOWN,
)
from fileproxy.exchange import (
    TIMEOUT as TIMEOUT,
)
from fileproxy.exchange import (
    UPSTREAM_ERROR as UPSTREAM_ERROR,
)
from fileproxy.upstream.pool import CONNECT_ERRORS


@dataclass(frozen=True)
class Failure:
    status: int
    error: str
    detail: str

    @property
    def cause(self) -> str:
        if self.status == 504:
            return TIMEOUT
        return UPSTREAM_ERROR if self.status >= 500 else REJECTED


class ClientRequestError(Exception):
    """The client's request cannot be served (e.g. body too large)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.failure = Failure(status, error, detail)


def classify(exc: BaseException) -> Failure:
    """Status, error code and a safe one-line detail for an exception met while proxying."""
    if isinstance(exc, ClientRequestError):
        return exc.failure
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return Failure(504, "upstream_timeout", _timeout_detail(exc))
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = certificate_failure(exc.certificate_error)
        return Failure(
            502, "upstream_certificate_invalid", f"upstream certificate verify failed: {reason}"
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        reason = getattr(exc.os_error, "reason", None) or type(exc.os_error).__name__
        return Failure(502, "upstream_tls_failed", f"TLS handshake with upstream failed ({reason})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        # errno name only: the OS message would show the upstream's address to the client
        reason = errno.errorcode.get(exc.os_error.errno or 0, type(exc.os_error).__name__)
        return Failure(502, "upstream_connect_failed", f"cannot connect to upstream ({reason})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Failure(502, "upstream_disconnected", "upstream closed the connection early")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return Failure(502, "upstream_bad_response", "upstream sent an invalid response")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return Failure(502, "upstream_failed", f"upstream connection failed ({type(exc).__name__})")
    return Failure(500, "internal_error", "internal error")


# OpenSSL's X509_V_ERR_* codes whose words need a gloss: the host-name checks (OpenSSL's
# message quotes the upstream's host, never shown to a client), and the chain that ends
# at a CA this machine does not trust.
_NAME_MISMATCH = {62: "hostname mismatch", 64: "IP address mismatch"}
_UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21})


def certificate_failure(error: BaseException) -> str:
    """Why a certificate did not verify, in OpenSSL's words (``self-signed certificate``,
    ``certificate has expired``...), without the upstream's address."""
    code = getattr(error, "verify_code", None)
    if code in _NAME_MISMATCH:
        return f"{_NAME_MISMATCH[code]} (the certificate does not name the upstream's host)"
    message = getattr(error, "verify_message", None) or "certificate not trusted"
    if code in _UNTRUSTED_ISSUER:
        return f"{message} (issued by a CA not trusted here)"
    return str(message)


def try_failure_kind(exc: BaseException) -> str:
    """How a try at an upstream failed, for the retry rule (``adaptive.retry_budget``):
    ``connect`` (the request never left), ``timeout`` (no response head in time),
    ``reset`` (closed before the head), else ``other``."""
    if isinstance(exc, CONNECT_ERRORS):
        return "connect"
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "reset"
    return "other"


# What the data plane answers itself, before any handler: the client's mistakes in its
# request head (or the machine's limits). The detail is a fixed text per kind: the
# parser's own messages quote the client's bytes, never echoed back.
HEAD_TIMEOUT = Failure(408, "request_timeout", "request head not received in time")
TOO_MANY_CONNECTIONS = Failure(
    503, "too_many_connections", "too many client connections; retry later"
)
REQUEST_LINE_TOO_LONG = Failure(414, "uri_too_long", "request line too long")
FIELD_TOO_LARGE = Failure(431, "header_too_large", "request header field too large")
TOO_MANY_FIELDS = Failure(431, "too_many_headers", "too many request header fields")
BAD_REQUEST_LINE = Failure(400, "bad_request_line", "malformed request line")
BAD_METHOD = Failure(400, "bad_method", "invalid request method")
BAD_TARGET = Failure(400, "bad_target", "malformed request target")
BAD_HEADER = Failure(400, "bad_header", "invalid request header")
BAD_FRAMING = Failure(400, "bad_framing", "invalid request framing (length or chunking)")
MALFORMED_REQUEST = Failure(400, "bad_request", "malformed request")
# the connection machine's refusals (connection.Exchange.refusal) other than framing
_REFUSALS = {
    413: Failure(413, "body_too_large", "request body too large"),
    417: Failure(417, "expectation_failed", "only 100-continue is supported"),
    501: Failure(501, "not_implemented", "transfer coding not implemented"),
    505: Failure(505, "http_version_not_supported", "only HTTP/1.0 and 1.1"),
}


def classify_parse_error(exc: httptools.HttpParserError, *, in_request_line: bool) -> Failure:
    """llhttp's refusal of a request head (or of its chunked framing)."""
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return BAD_METHOD
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return BAD_TARGET
    text = str(exc)
    if "header" in text.lower():
        return BAD_HEADER
    if any(word in text for word in ("Content-Length", "chunk", "Transfer-Encoding")):
        return BAD_FRAMING
    return BAD_REQUEST_LINE if in_request_line else MALFORMED_REQUEST


def classify_refusal(status: int) -> Failure:
    """The connection machine refused a request with ``status``: its answer."""
    return _REFUSALS.get(status, BAD_FRAMING)


def classify_unexpected(exc: BaseException) -> Failure:
    """An exception that escaped a handler: a bug of ours, answered without its text."""
    if isinstance(exc, asyncio.TimeoutError):
        return Failure(504, "timeout", "request timed out")
    return Failure(500, "internal_error", "internal error")


def _timeout_detail(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "upstream connect timed out"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "upstream stopped sending"
    return "upstream did not send response headers in time"


def error_response(
    failure: Failure, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = orjson.dumps(
        {"error": failure.error, "detail": failure.detail, "request_id": request_id}
    )
    return web.Response(
        status=failure.status,
        body=body,
        content_type="application/json",
        headers={"X-Request-ID": request_id, "Cache-Control": "no-store", **(headers or {})},
    )
