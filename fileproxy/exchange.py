"""The record of one proxied request, shared by the handler, the stats and the access log."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from aiohttp import web

from . import errors

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

EXCHANGE = "fileproxy.exchange"  # key of the record in the aiohttp request


@dataclass
class Exchange:
    """What happened to one proxied request, for the stats and the access log."""

    request_id: str
    upstream: str
    upstream_status: int | None = None
    status_sent: int | None = None  # the status line the client was sent, once it was
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


def request_id_for(request: web.BaseRequest) -> str:
    """The client's X-Request-ID when it is sane, else 32 random hex digits.

    An id needs to be unique, not secret: ``random`` (reseeded in every forked
    worker) instead of ``uuid4``, which reads the kernel's entropy on every request.
    """
    incoming = request.headers.get("X-Request-ID", "")
    return incoming if _REQUEST_ID.fullmatch(incoming) else f"{random.getrandbits(128):032x}"
