"""The wall around aiohttp's client internals: every one fileproxy uses is here, and only here.

The upstream client (``upstream_client``, ``upstream_pool``) drives aiohttp's client
protocol directly instead of a ``ClientSession``: the same llhttp parser, idle-read
timeout, read flow control and exceptions, without the session's per-request object
graph (a fifth to a third of the proxy's CPU per small request, ``bench.hot_path``).
aiohttp documents none of what that takes. Each name, why, and what public API
would replace it:

``aiohttp.client_proto.ResponseHandler``
    The client connection's protocol (parser, read timeout, flow control). Public
    replacement: none below ``ClientSession``/``TCPConnector``.
``ResponseHandler.set_response_params(...)``
    Sets the parser up for the next response (HEAD, limits, read timeout, buffer).
    Replacement: ``ClientSession``'s per-request arguments.
``ResponseHandler.start_timeout()``
    Starts the idle-read timeout once the request (and its body) was sent.
    Replacement: ``ClientTimeout(sock_read=...)``, applied by the session.
``ResponseHandler.read()``
    The next parsed (message, payload) pair. Replacement: ``ClientResponse.start``.
``ResponseHandler.set_parser(parser, payload)``, ``ResponseHandler.read_timeout``
    After a ``101`` (a WebSocket tunnel, ``take_upgraded``) the connection's bytes, those
    read with the head included, go to a parser object of ours, as aiohttp's own
    ``ws_connect`` takes them (``set_parser``, undocumented); the idle-read timeout is
    switched off, the tunnel has its own. Replacement: ``ClientSession.ws_connect``,
    which decodes WebSocket frames a tunnel must pass untouched.
``BaseProtocol._drain_helper()``
    Waits while the transport's write buffer is above its high-water mark (the
    request body's backpressure). Replacement: ``StreamWriter.drain`` inside a
    ``ClientRequest``.
``aiohttp.http_writer._serialize_headers(status_line, headers)``
    The request head as bytes, in C, refusing CR/LF in names and values (header
    injection). It drops lone surrogates (bytes that are not UTF-8), so a head with
    a value that is not ASCII is written again in Python (``serialize_head``).
    Replacement: ``StreamWriter.write_headers`` of a ``ClientRequest``.
``aiohttp.client_reqrep.ConnectionKey``
    What ``ClientConnectorError`` names as the failed connection (its ``str`` is
    the address in errors and logs). Built with keywords here, so a reordered or
    added field fails at once instead of shifting meaning.

``check()`` verifies all of them against the installed aiohttp and raises
``AiohttpMoved`` naming what moved; the application calls it at startup, and
tests/unit/test_aiohttp_walls.py runs it. ``PINNED`` is the release these were
checked against (pyproject.toml pins the same).
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
from typing import Any

import aiohttp
from multidict import CIMultiDict

PINNED = "3.14.5"


class AiohttpMoved(RuntimeError):
    """An aiohttp internal that fileproxy relies on is gone or changed."""


try:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.http_writer import _serialize_headers
except ImportError as exc:  # pragma: no cover - only with another aiohttp
    raise AiohttpMoved(
        f"aiohttp {aiohttp.__version__}: {exc} (fileproxy.upstream.aiohttp_client was checked "
        f"against aiohttp {PINNED})"
    ) from exc

__all__ = [
    "PINNED",
    "AiohttpMoved",
    "ResponseHandler",
    "check",
    "connection_key",
    "new_protocol",
    "prepare_for_response",
    "read_response",
    "serialize_head",
    "start_read_timeout",
    "take_upgraded",
    "wait_writable",
]

#: Keyword arguments of ``set_response_params`` that fileproxy passes.
_RESPONSE_PARAMS = (
    "skip_payload",
    "read_until_eof",
    "auto_decompress",
    "read_timeout",
    "read_bufsize",
    "max_line_size",
    "max_field_size",
    "max_headers",
)
_CONNECTION_KEY_FIELDS = ("host", "port", "is_ssl", "ssl", "proxy", "proxy_auth")


def new_protocol(loop: asyncio.AbstractEventLoop) -> ResponseHandler:
    return ResponseHandler(loop)


def prepare_for_response(
    protocol: ResponseHandler,
    *,
    head_only: bool,
    read_timeout: float | None,
    read_bufsize: int,
    max_line_size: int,
    max_field_size: int,
    max_headers: int,
) -> None:
    """Parse the next response as a proxy must: no decoding, EOF-delimited bodies kept."""
    protocol.set_response_params(
        skip_payload=head_only,
        read_until_eof=True,  # a response without a length ends with the connection
        auto_decompress=False,
        read_timeout=read_timeout,
        read_bufsize=read_bufsize,
        max_line_size=max_line_size,
        max_field_size=max_field_size,
        max_headers=max_headers,
    )


def take_upgraded(protocol: ResponseHandler, parser: Any, payload: Any) -> None:
    """After a 101: the connection's bytes go to ``parser.feed_data`` (its end to
    ``feed_eof``), its failures to ``payload.set_exception``; no idle-read timeout."""
    protocol.read_timeout = None
    protocol.set_parser(parser, payload)


def start_read_timeout(protocol: ResponseHandler) -> None:
    protocol.start_timeout()


async def read_response(
    protocol: ResponseHandler,
) -> tuple[aiohttp.http.RawResponseMessage, aiohttp.StreamReader]:
    message, payload = await protocol.read()
    return message, payload


async def wait_writable(protocol: ResponseHandler) -> None:
    """Return once the connection's write buffer is below its high-water mark."""
    await protocol._drain_helper()


def serialize_head(status_line: str, headers: CIMultiDict[str]) -> bytes:
    """A head as bytes: ``status_line`` (a request or a status line), then ``headers``
    (aiohttp's serializer's signature: the server side puts this in its place)."""
    head = _serialize_headers(status_line, headers)  # refuses CR/LF (header injection)
    if all(value.isascii() for value in headers.values()):
        return head
    # aiohttp's serializer drops each lone surrogate, i.e. each byte a client or backend
    # sent that is not UTF-8 (the parser decodes with surrogateescape): those bytes are
    # written back as they came, like nginx passes them.
    lines = [status_line, *(f"{name}: {value}" for name, value in headers.items())]
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte: aiohttp's
        return head


def connection_key(host: str, port: int, tls: ssl.SSLContext | None) -> ConnectionKey:
    return ConnectionKey(
        host=host,
        port=port,
        is_ssl=tls is not None,
        ssl=True,  # aiohttp's default verification: the context is the pool's own
        proxy=None,
        proxy_auth=None,
        proxy_headers_hash=None,
    )


def check() -> None:
    """Raise ``AiohttpMoved`` naming every internal above that is missing or changed."""
    problems = []
    for name in ("set_response_params", "start_timeout", "read", "_drain_helper", "set_parser"):
        if not callable(getattr(ResponseHandler, name, None)):
            problems.append(f"ResponseHandler.{name}")
    if callable(getattr(ResponseHandler, "set_response_params", None)):
        params = inspect.signature(ResponseHandler.set_response_params).parameters
        missing = [p for p in _RESPONSE_PARAMS if p not in params]
        if missing:
            problems.append(f"ResponseHandler.set_response_params({', '.join(missing)})")
    if not inspect.iscoroutinefunction(getattr(ResponseHandler, "_drain_helper", None)):
        problems.append("ResponseHandler._drain_helper (no longer a coroutine)")
    if not isinstance(getattr(ResponseHandler, "read_timeout", None), property):
        problems.append("ResponseHandler.read_timeout (no longer a property)")
    fields = getattr(ConnectionKey, "_fields", ())
    if any(f not in fields for f in _CONNECTION_KEY_FIELDS):
        problems.append(f"ConnectionKey fields {fields}")
    if not callable(_serialize_headers):
        problems.append("http_writer._serialize_headers")
    if problems:
        raise AiohttpMoved(
            f"aiohttp {aiohttp.__version__} moved internals fileproxy relies on "
            f"(checked against {PINNED}): {'; '.join(problems)}"
        )
