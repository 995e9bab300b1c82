"""The wall around aiohttp's client internals: every one fileproxy uses is here, and only here.

The upstream connections are a protocol of our own since 2026-12-07
(``upstream.protocol``: ``asyncio.Protocol`` + httptools' llhttp); aiohttp's client
protocol (``ResponseHandler`` and the five private calls that drove it) is no longer
used. What remains, each name, why, and what public API would replace it:

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

PINNED = "3.14.5"


class AiohttpMoved(RuntimeError):
    """An aiohttp internal that fileproxy relies on is gone or changed."""


try:
    from aiohttp.client_reqrep import ConnectionKey
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
]

_CONNECTION_KEY_FIELDS = ("host", "port", "is_ssl", "ssl", "proxy", "proxy_auth")


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
    if problems:
        raise AiohttpMoved(
            f"aiohttp {aiohttp.__version__} moved internals fileproxy relies on "
            f"(checked against {PINNED}): {'; '.join(problems)}"
        )
