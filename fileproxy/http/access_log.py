"""The access line: one per request, what the client asked and got, what the proxy saw."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from fileproxy.exchange import CLIENT_ABORT, EXCHANGE, Exchange

ACCESS_LOGGER = "fileproxy.access"


def log_access(
    logger: logging.Logger,
    request: web.BaseRequest,
    status: int,
    response_bytes: int,
    duration_s: float,
) -> None:
    """One access line: what the client asked, what it got, and what the proxy saw."""
    exchange = request.get(EXCHANGE)
    fields: dict[str, Any] = {
        "remote": request.remote,
        "method": request.method,
        "path": request.raw_path,
        "status": status,
        "response_bytes": response_bytes,
        "duration_ms": round(duration_s * 1000, 3),
        "user_agent": request.headers.get("User-Agent"),
    }
    message = "request"
    if isinstance(exchange, Exchange):
        fields.update(
            request_id=exchange.request_id,
            upstream=exchange.upstream,
            upstream_status=exchange.upstream_status,
            ttfb_ms=None if exchange.ttfb_s is None else round(exchange.ttfb_s * 1000, 3),
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            cause=exchange.cause,
        )
        if exchange.error:
            fields["error"] = exchange.error
        if exchange.tries > 1:
            fields["tries"] = exchange.tries
        if exchange.resumes:
            fields["resumes"] = exchange.resumes
        if exchange.cause == CLIENT_ABORT:
            message = "client disconnected"
    if logger.isEnabledFor(logging.INFO):
        # logger.info() would also look up the caller's file and line in the stack,
        # which no access line shows.
        logger.handle(
            logger.makeRecord(logger.name, logging.INFO, "", 0, message, (), None, extra=fields)
        )


class AccessLogger(AbstractAccessLogger):
    """aiohttp's hook for finished requests; aborted ones are logged by the proxy handler."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        # response_bytes: body bytes handed to the client's connection; for a proxied
        # response the relay's count (aiohttp's stays 0 for a body cut by an abort)
        exchange = request.get(EXCHANGE)
        sent = exchange.bytes_out if isinstance(exchange, Exchange) else response.body_length
        log_access(self.logger, request, response.status, sent, time_s)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
