"""The pooled HTTP client that talks to the upstream, built from the settings."""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from .settings import Settings

# Headers aiohttp would invent that the real client never sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class UpstreamClient:
    """One pooled session to the configured upstream; ``url_for`` maps a raw request target."""

    def __init__(self, settings: Settings) -> None:
        upstream = settings.upstream
        self.origin = upstream.origin()
        self.name = f"{upstream.host}:{upstream.port}"
        self.last_response_at: float | None = None  # wall clock of the last response headers
        self.last_failure_at: float | None = None
        self.last_failure: str | None = None
        self._prefix = upstream.raw_path.rstrip("/")
        self.authorization = (
            aiohttp.BasicAuth(upstream.user or "", upstream.password or "").encode()
            if upstream.user is not None or upstream.password is not None
            else None
        )
        connector = aiohttp.TCPConnector(
            limit=settings.connector_limit,
            limit_per_host=settings.connector_limit_per_host,
            keepalive_timeout=settings.keepalive_timeout,
            use_dns_cache=settings.dns_cache_ttl > 0,
            ttl_dns_cache=settings.dns_cache_ttl or None,
        )
        self.connector = connector
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,  # a download that keeps moving is never cut
                connect=None,  # waiting for a pool slot is bounded by the headers timeout
                sock_connect=settings.connect_timeout,
                sock_read=settings.read_timeout,  # idle time between two reads
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=settings.buffer_size,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,
        )

    def url_for(self, raw_target: str) -> URL:
        """The upstream URL for a raw origin-form target, byte for byte (no decoding)."""
        return URL(f"{self.origin}{self._prefix}{raw_target}", encoded=True)

    def mark_response(self, now: float) -> None:
        self.last_response_at = now

    def mark_failure(self, now: float, error: str) -> None:
        self.last_failure_at, self.last_failure = now, error

    async def probe(self, timeout: float) -> bool:
        """Whether a TCP connection to the upstream opens within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(self.origin.host, self.origin.port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    def pool_size(self) -> dict[str, int]:
        """Open upstream connections: in use and idle in the pool."""
        acquired = len(self.connector._acquired)
        idle = sum(len(conns) for conns in self.connector._conns.values())
        return {"in_use": acquired, "idle": idle}

    async def close(self) -> None:
        await self.session.close()
