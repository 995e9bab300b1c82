"""The wall around aiohttp's client internals: every one fileproxy uses is here, and only here.

The upstream connections are a protocol of our own since 2026-12-07
(``upstream.protocol``: ``asyncio.Protocol`` + httptools' llhttp); aiohttp's client
protocol (``ResponseHandler`` and the five private calls that drove it) is no longer
used. What remains, each name, why, and what public API would replace it:

``aiohttp.http_writer._serialize_headers(status_line, headers)``
    A request head to the upstream as bytes, in C, refusing CR/LF in names and values
    (header injection). It drops lone surrogates (bytes that are not UTF-8), so a head
    with a value that is not ASCII is written again in Python (``serialize_head``).
    Replacement:
    ``StreamWriter.write_headers`` of a ``ClientRequest``.
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

import ssl

import aiohttp
from multidict import CIMultiDict

PINNED = "3.14.5"


class AiohttpMoved(RuntimeError):
    """An aiohttp internal that fileproxy relies on is gone or changed."""


try:
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
    "check",
    "connection_key",
    "serialize_head",
]

_CONNECTION_KEY_FIELDS = ("host", "port", "is_ssl", "ssl", "proxy", "proxy_auth")


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
