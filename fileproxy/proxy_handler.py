"""The proxy handler: stream one request to the upstream and its response back.

Bodies are streamed both ways, never read whole: at most ``STREAM_CHUNK_SIZE``
bytes move per step, and each write to the client is awaited, so a slow client
pauses the upstream read (backpressure) instead of filling memory.

Failures are mapped in ``errors``: before response headers a JSON 4xx/5xx, after
them the client connection is aborted, so a short body never looks complete.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from . import errors, logs
from .adaptive import LevelProfile
from .app_keys import ADAPTATION, SETTINGS, TRAFFIC, UPSTREAM
from .edge import waiting_on_upstream
from .exchange import EXCHANGE, Exchange, request_id_for
from .headers import client_response_headers, upstream_request_headers
from .settings import Settings
from .upstream_client import UpstreamClient, UpstreamResponse

log = logging.getLogger("fileproxy.proxy")
access_log = logging.getLogger(logs.ACCESS_LOGGER)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client gone before the response


def on_unix_socket(request: web.BaseRequest) -> bool:
    """Whether the client came through a unix socket (a local process, e.g. nginx)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


async def proxy(request: web.Request) -> web.StreamResponse:
    app = request.app
    traffic = app[TRAFFIC]
    started = time.monotonic()
    exchange = Exchange(request_id_for(request), app[UPSTREAM].name)
    request[EXCHANGE] = exchange
    traffic.in_flight += 1
    status = 500  # what aiohttp answers should an unexpected exception escape
    adaptation = app[ADAPTATION]
    try:
        admitted, retry_after = await adaptation.admit(started, request)
        if admitted:
            response = await _proxy(request, exchange, started)
        else:
            response = _over_limit(request, exchange, retry_after)
        if isinstance(response, web.Response) and request.method != "HEAD":
            exchange.bytes_out = response.content_length or 0  # our own JSON error body
        status = response.status
        return response
    except asyncio.CancelledError:
        # handler_cancellation: the client went away while we waited on something;
        # aiohttp writes no access line for a cancelled handler, so we do.
        exchange.cause = errors.CLIENT_ABORT
        status = CLIENT_CLOSED_REQUEST
        if app[SETTINGS].access_log:
            logs.log_access(access_log, request, status, 0, time.monotonic() - started)
        raise
    finally:
        # Synchronous on purpose: it must run even when the task is being cancelled.
        traffic.in_flight -= 1
        now = time.monotonic()
        adaptation.observe_exchange(now, exchange)
        traffic.record(
            now,
            duration_s=now - started,
            status=status,
            cause=exchange.cause,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            failed=exchange.failed,
        )


async def _proxy(request: web.Request, exchange: Exchange, started: float) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    upstream = app[UPSTREAM]
    adaptation = app[ADAPTATION]
    target = request.raw_path
    if not target.startswith("/"):
        # absolute-form or authority-form: we are a reverse proxy, not an open one
        return _fail(
            exchange,
            errors.ClientRequestError(
                400, "bad_target", "only origin-form request targets are accepted"
            ),
        )
    content_length = request.content_length
    if settings.max_body_size and content_length and content_length > settings.max_body_size:
        return _fail(exchange, _too_large(settings.max_body_size))

    has_body = request.body_exists
    peer = request.remote
    headers = upstream_request_headers(
        request.headers,
        peer=peer,
        scheme=request.scheme,
        host=request.host if "Host" in request.headers else None,
        request_id=exchange.request_id,
        trusted=settings.trusted_proxies,
        # a TCP client always has an address: only a peer without one can be on a unix socket
        local_socket=not peer and on_unix_socket(request),
        has_body=has_body,
        content_length=content_length,
    )
    authorization = upstream.authorization
    if authorization is not None:
        # credentials in FILEPROXY_UPSTREAM: the proxy authenticates itself to the backend
        headers["Authorization"] = authorization
    profile = adaptation.profile(started)
    body_errors: list[BaseException] = []
    try:
        upstream_resp = await _send_upstream(
            request, exchange, headers, has_body, body_errors, profile, upstream, settings
        )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if not body_errors:
            failure = _fail(exchange, exc)
            upstream.mark_failure(time.time(), exchange.error or "")
            return failure
        cause = body_errors[0]
        broken = not isinstance(cause, errors.ClientRequestError)
        if broken:
            cause = errors.ClientRequestError(
                400, "bad_request_body", "request body ended early or was malformed"
            )
        refusal = _fail(exchange, cause)
        if broken:
            exchange.cause = errors.CLIENT_ABORT  # the client's body broke off or was malformed
        refusal.force_close()  # the rest of the body is not read
        return refusal

    now = time.monotonic()
    exchange.ttfb_s = now - started
    adaptation.observe_headers(now, exchange.ttfb_s, upstream_resp.tcp_info)
    upstream.mark_response(time.time())
    try:
        exchange.upstream_status = upstream_resp.status
        # The whole body already arrived (a small file): its response head goes out in
        # the same write as the body. Else the head goes out at once (streams, SSE).
        response_class = _WholeResponse if upstream_resp.content.is_eof() else web.StreamResponse
        response = response_class(status=upstream_resp.status, reason=upstream_resp.reason)
        client_response_headers(upstream_resp.headers, exchange.request_id, response.headers)
        if request.transport is not None:
            request.transport.set_write_buffer_limits(high=settings.buffer_size)
        await response.prepare(request)
        await _relay(request, response, upstream_resp, exchange, profile.chunk_size)
        return response
    finally:
        upstream_resp.release()  # back to the pool only if the body was read to its end


class _WholeResponse(web.StreamResponse):
    """A response whose head is sent with its first body bytes, not on its own."""

    _send_headers_immediately = False


async def _send_upstream(
    request: web.Request,
    exchange: Exchange,
    headers: CIMultiDict[str],
    has_body: bool,
    body_errors: list[BaseException],
    profile: LevelProfile,
    upstream: UpstreamClient,
    settings: Settings,
) -> UpstreamResponse:
    """Send the request (streaming its body) and wait for the upstream's response headers.

    The headers timeout starts once the request body has been sent, so a long
    upload is not cut; it also bounds the wait for a free pooled connection.
    """
    loop = asyncio.get_running_loop()
    start_deadline = None if has_body else loop.time() + profile.headers_timeout_s
    async with asyncio.timeout_at(start_deadline) as deadline:

        async def request_body() -> AsyncIterator[bytes]:
            try:
                while chunk := await _read_body(request, profile.chunk_size):
                    exchange.bytes_in += len(chunk)
                    if settings.max_body_size and exchange.bytes_in > settings.max_body_size:
                        raise _too_large(settings.max_body_size)
                    yield chunk
            except Exception as exc:
                body_errors.append(exc)
                raise
            deadline.reschedule(loop.time() + profile.headers_timeout_s)

        waiting_on_upstream(request)  # see request_gate.UPSTREAM_HOLD_S
        return await upstream.send(
            request.method,
            request.raw_path,
            headers,
            request_body() if has_body else None,
            connect_timeout=profile.connect_timeout_s,
            read_timeout=profile.read_timeout_s,
        )


async def _relay(
    request: web.Request,
    response: web.StreamResponse,
    upstream_resp: UpstreamResponse,
    exchange: Exchange,
    chunk_size: int,
) -> None:
    read = upstream_resp.content.read
    while True:
        try:
            chunk = await read(chunk_size)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            failure = errors.classify(exc)
            exchange.cause, exchange.error = failure.cause, failure.error
            log.warning(
                "upstream failed mid-body, aborting client connection",
                extra={
                    "request_id": exchange.request_id,
                    "error": failure.error,
                    "bytes_out": exchange.bytes_out,
                },
            )
            upstream_resp.close()
            if request.transport is not None:
                request.transport.abort()
            return
        if not chunk:
            break
        try:
            await response.write(chunk)
        except ConnectionError:
            exchange.cause = errors.CLIENT_ABORT
            upstream_resp.close()  # do not pool a half-read connection
            return
        exchange.bytes_out += len(chunk)
    try:
        await response.write_eof()
    except ConnectionError:
        exchange.cause = errors.CLIENT_ABORT


async def _read_body(request: web.Request, chunk_size: int) -> bytes:
    """The next piece of the client's body; a client silent too long gets 408."""
    timeout = request.app[SETTINGS].client_body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.content.read(chunk_size)
    except TimeoutError:
        raise errors.ClientRequestError(
            408, "request_timeout", f"request body stalled for {timeout:g} s"
        ) from None


def _over_limit(request: web.Request, exchange: Exchange, retry_after: float) -> web.Response:
    """Over the upstream's admission rate: 503 (or 429) with Retry-After, counted."""
    settings = request.app[SETTINGS]
    failure = errors.Failure(
        int(settings.limit_status),
        "rate_limited",
        f"over the admission rate of {request.app[ADAPTATION].current_limit} req/s; retry later",
    )
    exchange.cause, exchange.error = errors.REJECTED, failure.error
    return errors.error_response(
        failure, exchange.request_id, {"Retry-After": str(max(1, math.ceil(retry_after)))}
    )


def _too_large(limit: int) -> errors.ClientRequestError:
    return errors.ClientRequestError(413, "body_too_large", f"request body exceeds {limit} bytes")


def _fail(exchange: Exchange, exc: BaseException) -> web.Response:
    failure = errors.classify(exc)
    exchange.cause, exchange.error = failure.cause, failure.error
    if failure.status >= 500:
        log.warning(
            "upstream request failed",
            extra={
                "request_id": exchange.request_id,
                "error": failure.error,
                "detail": failure.detail,
            },
        )
    return errors.error_response(failure, exchange.request_id)
