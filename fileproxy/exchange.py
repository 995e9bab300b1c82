"""The record of one proxied request, shared by the handler, the stats and the access log."""

from __future__ import annotations

from dataclasses import dataclass

from . import errors

EXCHANGE = "fileproxy.exchange"  # key of the record in the aiohttp request


@dataclass
class Exchange:
    """What happened to one proxied request, for the stats and the access log."""

    request_id: str
    upstream: str
    upstream_status: int | None = None
    ttfb_s: float | None = None  # request start to upstream response headers
    bytes_in: int = 0  # request body bytes forwarded
    bytes_out: int = 0  # response body bytes delivered
    cause: str = errors.OK  # termination cause, see errors.CAUSES
    error: str | None = None

    @property
    def failed(self) -> bool:
        """Not delivered, or the upstream answered with a server error."""
        upstream_error = self.upstream_status is not None and self.upstream_status >= 500
        return upstream_error or self.cause in (errors.UPSTREAM_ERROR, errors.TIMEOUT)
