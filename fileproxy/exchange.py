"""The record of one proxied request, shared by the handler, the adaptation, the stats and
the access log, and the causes that can end it."""

from __future__ import annotations

from dataclasses import dataclass

# Termination causes of a proxied request (access log, /stats, /metrics).
OK = "ok"
CLIENT_ABORT = "client_abort"  # the client went away or sent a broken body
UPSTREAM_ERROR = "upstream_error"  # refused, reset, invalid response, broke mid-body
TIMEOUT = "timeout"  # connect, response headers or idle read took too long
REJECTED = "rejected"  # refused by the proxy itself (bad target, body too large, ...)
SHUTDOWN = "shutdown"  # cut by a stop or reload (a tunnel at its drain, else its timeout)
SEND_TIMEOUT = "send_timeout"  # the client took no bytes for FILEPROXY_SEND_TIMEOUT: aborted
IDLE_TIMEOUT = "idle_timeout"  # a tunnel silent both ways for FILEPROXY_READ_TIMEOUT: closed
CAUSES = (OK, CLIENT_ABORT, UPSTREAM_ERROR, TIMEOUT, REJECTED, SHUTDOWN, SEND_TIMEOUT, IDLE_TIMEOUT)

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
    cause: str = OK  # termination cause, see CAUSES
    error: str | None = None
    tries: int = 1  # upstream tries before the response head (retries on other replicas)
    resumes: int = 0  # times the body was continued from a replica after a failure
    # the body's end is in its framing (Content-Length, chunked), not the connection's end
    framed: bool = True
    path: str = ""  # the request target's path, without its query (the limiter's evidence)
    cache: str | None = None  # what the cache did: hit, miss, revalidated, stale, bypass

    @property
    def failed(self) -> bool:
        """Not delivered, or the upstream answered with a server error."""
        upstream_error = self.upstream_status is not None and self.upstream_status >= 500
        return upstream_error or self.cause in (UPSTREAM_ERROR, TIMEOUT)
