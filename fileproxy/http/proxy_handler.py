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
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from fileproxy.adaptive import LevelProfile
from fileproxy.adaptive import resume as resume_rule
from fileproxy.adaptive.retry_budget import CONNECT, STATUS, retryable
from fileproxy.app_keys import (
    ADAPTATIONS,
    CACHE,
    IN_FLIGHT,
    LIFECYCLE,
    REPLICAS,
    SETTINGS,
    SPOOL,
    TRAFFIC,
    TUNNELS,
)
from fileproxy.delivery import spool, tunnel
from fileproxy.delivery.cache import (
    CONDITIONAL_FIELDS,
    SMALL_OBJECT_MAX,
    Answer,
    CacheAborted,
    Decision,
    Outcome,
)
from fileproxy.exchange import EXCHANGE, Exchange
from fileproxy.http import access_log as access_logs
from fileproxy.http import errors, zero_copy
from fileproxy.http.data_plane import ClientRequest, ClientResponse
from fileproxy.http.edge import abort_send_timed_out, end_cut_short, send_timed_out, watch_sending
from fileproxy.http.headers import (
    Redirect,
    client_facing_base,
    client_key,
    client_response_headers,
    request_id_for,
    upstream_request_headers,
)
from fileproxy.settings import Settings
from fileproxy.upstream.client import UpstreamClient, UpstreamResponse
from fileproxy.upstream.replicas import Attempt, Replica
from fileproxy.upstream.resume import ResumableBody

log = logging.getLogger("fileproxy.proxy")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client gone before the response

# A body relayed in either direction gives the loop a turn after this many bytes.
# Neither ``await read()`` (data already buffered) nor ``await write()`` (the client's
# transport below its high-water mark) suspends while the data flows, so without it a
# stream relays its whole read buffer (2 x BUFFER_SIZE) in one loop iteration, and with
# 64 streams one iteration took tens of ms: /health and /stats waited that long (issue
# 12). With it an iteration does at most this much per stream (bench.status_under_load).
RELAY_SLICE_BYTES = 64 * 1024

# upstream statuses that count as a replica's failure for outlier ejection
GATEWAY_FAILURES = frozenset({502, 503, 504})


def on_unix_socket(request: ClientRequest) -> bool:
    """Whether the client came through a unix socket (a local process, e.g. nginx)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


async def proxy(request: ClientRequest) -> ClientResponse | web.Response:
    app = request.app
    traffic = app[TRAFFIC]
    started = time.monotonic()
    replica = app[REPLICAS].choose(started, path=request.raw_path)
    assert replica is not None  # the first try always has one
    exchange = Exchange(request_id_for(request), replica.name, path=request.path)
    request[EXCHANGE] = exchange
    traffic.in_flight += 1
    task = asyncio.current_task()
    in_flight = app[IN_FLIGHT]
    if task is not None:
        in_flight.add(task)  # cut by the drain if still here at the graceful timeout
    status = 500  # what aiohttp answers should an unexpected exception escape
    adaptations = app[ADAPTATIONS]
    adaptation = adaptations[replica.name]
    try:
        cache, cached_as = app[CACHE], _cache_target(request)
        hit = None
        if cached_as is not None:  # (no thread hop, no index: see CacheService.hit)
            hit = cache.hit(request.method, cached_as, request.raw_headers, time.time())
        if hit is not None:
            # a fresh object held hot; it and any other hit are answered whatever the
            # admission rate, which protects the upstream they never reach
            exchange.cache, exchange.upstream_status = hit.log_word, None
            try:
                response: ClientResponse | web.Response = await _send_answer(request, exchange, hit)
            finally:
                hit.close()
            status = response.status
            return response
        decision = None
        if cached_as is not None:
            now = time.time()
            decision = await cache.lookup(request.method, cached_as, request.raw_headers, now=now)
        if decision is not None and decision.outcome is Outcome.HIT:
            admitted, retry_after = True, 0.0  # answered from the cache, not the upstream
        elif adaptation.admits_all:  # the usual case: no coroutine, no client key
            admitted, retry_after = True, 0.0
        else:
            admitted, retry_after = await adaptation.admit(
                started,
                lambda: client_key(
                    request.remote,
                    request.headers.get("X-Forwarded-For"),
                    app[SETTINGS].trusted_proxies,
                ),
                request.path,
            )
        if admitted:
            response = await _proxy(request, exchange, started, replica, decision)
        else:
            response = _over_limit(request, exchange, retry_after, adaptation.current_limit)
        if isinstance(response, web.Response) and request.method != "HEAD":
            exchange.bytes_out = response.content_length or 0  # our own JSON error body
        status = response.status
        return response
    except asyncio.CancelledError:
        # handler_cancellation: the client went away while we waited on something, or
        # the drain cut this request at the graceful timeout (server.DrainingRunner);
        # aiohttp writes no access line for a cancelled handler, so we do.
        # The access line's rule (nginx's): the status the client was sent, 499 only
        # when it left before the response head went out.
        if app[LIFECYCLE].cutting_off:
            exchange.cause = errors.SHUTDOWN
            if exchange.status_sent is not None and request.transport is not None:
                end_cut_short(request.transport, exchange.framed)
        elif send_timed_out(request):
            exchange.cause = errors.SEND_TIMEOUT
        else:
            exchange.cause = errors.CLIENT_ABORT
        status = exchange.status_sent or CLIENT_CLOSED_REQUEST
        if app[SETTINGS].access_log:
            access_logs.log_access(
                request, status, exchange.bytes_out, time.monotonic() - started, exchange
            )
        raise
    finally:
        # Synchronous on purpose: it must run even when the task is being cancelled.
        traffic.in_flight -= 1
        if task is not None:
            in_flight.discard(task)
        if send_timed_out(request):
            exchange.cause = errors.SEND_TIMEOUT  # the write that failed was a stalled client's
        else:
            watch_sending(request)  # the response's tail may still wait in the buffer
        now = time.monotonic()
        adaptations[exchange.upstream].observe_exchange(now, exchange)  # the replica that answered
        traffic.record(
            now,
            upstream=exchange.upstream,
            duration_s=now - started,
            status=status,
            cause=exchange.cause,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            failed=exchange.failed,
        )


def _target_of(request: ClientRequest) -> str | None:
    """The request's target in origin form; None for one naming another authority."""
    target = request.raw_path
    return target if target.startswith("/") else own_origin_form(request, target)


def _cache_target(request: ClientRequest) -> str | None:
    """The target the cache knows the request by; None when the cache never sees it
    (off, another method, a WebSocket, a target naming another authority)."""
    if not request.app[CACHE].active or request.method not in ("GET", "HEAD"):
        return None
    return None if tunnel.wanted(request) else _target_of(request)


async def _proxy(
    request: ClientRequest,
    exchange: Exchange,
    started: float,
    replica: Replica,
    decision: Decision | None,
) -> ClientResponse | web.Response:
    """``decision``: the cache's (``CacheService.lookup``), None when it does not see the
    request."""
    app = request.app
    settings = app[SETTINGS]
    replicas = app[REPLICAS]
    target = _target_of(request)
    if target is None:
        # another authority, or authority-form: a reverse proxy, not an open one
        return _fail(
            exchange,
            errors.ClientRequestError(
                400, "bad_target", "only origin-form request targets are accepted"
            ),
        )
    content_length = request.content_length
    if settings.max_body_size and content_length and content_length > settings.max_body_size:
        refusal = _fail(exchange, _too_large(settings.max_body_size))
        refusal.force_close()  # the body is not read: it must never be parsed as a request
        return refusal

    has_body = request.body_exists
    upgrade = tunnel.wanted(request)  # a WebSocket: asked upstream, tunnelled after its 101
    cache = app[CACHE]
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
        upgrade=upgrade,
    )
    cache_status: str | None = None  # a response the cache passed by: its Cache-Status
    if decision is not None:
        if decision.outcome is not Outcome.BYPASS:
            return await _from_cache(request, exchange, started, replica, target, headers, decision)
        exchange.cache, cache_status = decision.outcome.value, decision.cache_status
    # as built for the client's request, before a try adds its replica's Host and credentials
    pristine = CIMultiDict(headers) if len(replicas.replicas) > 1 else None
    tried: list[Replica] = []
    body_errors: list[BaseException] = []
    budgeted = False  # this try is a retry counted in the retry budget
    while True:  # a try per replica, until one answers or no retry is allowed
        upstream = replica.client
        adaptation = app[ADAPTATIONS][replica.name]
        if tried:
            assert pristine is not None
            headers = CIMultiDict(pristine)
        authorization = upstream.authorization
        if authorization is not None:
            # credentials in FILEPROXY_UPSTREAM: the proxy authenticates itself to the backend
            headers["Authorization"] = authorization
        profile = adaptation.profile(time.monotonic())
        # the try owns the replica's in_flight, its retry-budget slot and the upstream
        # response: whatever ends it (an answer relayed, a retry, an error, the client
        # gone), the block gives them back
        with replicas.attempt(replica, budgeted=budgeted) as attempt:
            try:
                upstream_resp = await _send_upstream(
                    request, exchange, target, headers, has_body, body_errors, profile, upstream,
                    settings,
                )  # fmt: skip
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                attempt.answered()
                if body_errors:
                    return _refuse_body(exchange, body_errors)  # not the replica's fault
                failure = errors.classify(exc)
                upstream.mark_failure(time.time(), failure.error)
                kind = errors.try_failure_kind(exc)
                replicas.failed(time.monotonic(), replica, kind)
                retry = _retry_to(request, exchange, replica, tried, kind, has_body)
                if retry is None:
                    return _fail(exchange, exc)
                _observe_try(request, exchange, replica, failure.cause, None)
                replica, budgeted = retry, kind != CONNECT
                continue
            attempt.response = upstream_resp
            attempt.answered()
            if body_errors:  # the upstream answered before the client's body broke off
                return _refuse_body(exchange, body_errors)
            upstream_status = upstream_resp.status
            if upstream_status in GATEWAY_FAILURES:
                replicas.failed(time.monotonic(), replica, f"status {upstream_status}")
            else:
                replicas.succeeded(replica)
            if upstream_status in settings.retry_statuses:
                retry = _retry_to(
                    request, exchange, replica, tried, STATUS, has_body, upstream_status
                )
                if retry is not None:
                    _observe_try(request, exchange, replica, errors.OK, upstream_status)
                    replica, budgeted = retry, True
                    continue
            if cache.active and request.method not in ("GET", "HEAD") and upstream_status < 400:
                # RFC 9111 4.4: a successful unsafe request invalidates what is stored, before
                # its client has the answer (its next GET must not find the old object)
                await cache.invalidate(
                    request.method, target, upstream_status, request.raw_headers,
                    upstream_resp.raw_headers,
                )  # fmt: skip
            return await _respond(
                request, exchange, started, attempt, upstream_resp, target,
                pristine if pristine is not None else headers, profile, upgrade, cache_status,
            )  # fmt: skip


def _refuse_body(exchange: Exchange, body_errors: list[BaseException]) -> web.Response:
    """The client's request body failed (too large, stalled, broken off): its 4xx."""
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


async def _respond(
    request: ClientRequest,
    exchange: Exchange,
    started: float,
    attempt: Attempt,
    upstream_resp: UpstreamResponse,
    target: str,
    headers: CIMultiDict[str],
    profile: LevelProfile,
    upgrade: bool,
    cache_status: str | None = None,
    observed: bool = False,
) -> ClientResponse | web.Response:
    """Relay the answer of ``attempt`` (which owns its replica and ``upstream_resp``);
    after a ``101`` to a WebSocket upgrade (``upgrade``), tunnel both connections.
    ``cache_status``: the cache passed this request by (its ``Cache-Status``);
    ``observed``: the cache's fetch already told the adaptation and the replica of its
    response head (counted once)."""
    app = request.app
    settings, replicas = app[SETTINGS], app[REPLICAS]
    replica, upstream = attempt.replica, attempt.replica.client
    headers_at = time.monotonic()
    exchange.ttfb_s = headers_at - started  # what the client waited
    # the try's own time to the response head, from its request write: not the
    # admission, the pool wait, the connect or the tries before it
    ttfb_s = headers_at - upstream_resp.sent_at
    if not observed:
        app[ADAPTATIONS][replica.name].observe_headers(headers_at, ttfb_s, upstream_resp.tcp_info)
        replicas.headers(headers_at, replica, ttfb_s)
        upstream.mark_response(time.time())
    if upstream_resp.status == 101:  # switching protocols: a tunnel (see delivery.tunnel)
        try:
            return await tunnel.relay(
                request, exchange, upstream_resp, upgrade, app[TUNNELS], settings.read_timeout
            )
        finally:
            upstream_resp.close()  # never back to the pool: it no longer speaks HTTP
    body = _resumable(request, exchange, upstream_resp, attempt, target, headers, profile)
    if body is not None:
        upstream_resp.content = body  # type: ignore[assignment]

    def upstream_body_complete(size: int) -> None:
        """The whole upstream body was read: the replica is done with this request, even
        while a slow client still reads it from the spool; its goodput is measured on
        the upstream's link, not the client's."""
        if replicas.several and request.method == "GET" and exchange.resumes == 0:
            now = time.monotonic()
            replicas.body_done(now, attempt.replica, target, size, now - headers_at)
        attempt.end()

    exchange.upstream_status = upstream_resp.status
    # The whole body already arrived (a small file): its response head goes out in
    # the same write as the body. Else the head goes out at once (streams, SSE).
    status = upstream_resp.status
    response = ClientResponse(
        status, upstream_resp.reason, head_with_body=upstream_resp.content.is_eof()
    )
    redirect = None
    if "Location" in upstream_resp.headers:
        redirect = Redirect(upstream.redirect_prefixes, _client_base(request))
    client_response_headers(
        upstream_resp.headers,
        exchange.request_id,
        response.headers,
        status=status,
        redirect=redirect,
        spelled=upstream_resp.raw_headers,
    )
    if cache_status is not None:
        response.headers["Cache-Status"] = cache_status
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=settings.buffer_size)
    await response.prepare(request)
    exchange.status_sent = status
    exchange.framed = response.content_length is not None or "Transfer-Encoding" in response.headers
    spill_store = app[SPOOL]
    length = spool.spill_length(spill_store, request.method, upstream_resp)
    if length is None:
        await _relay(
            request, response, upstream_resp, exchange, profile.chunk_size, upstream_body_complete
        )
    else:  # a slow client may get the rest from a spool (see delivery.spool)
        await spool.relay(
            request,
            response,
            upstream_resp,
            exchange,
            profile.chunk_size,
            length,
            spill_store,
            upstream.pool.waiting,
            upstream_body_complete,
        )
    return response


async def _from_cache(
    request: ClientRequest,
    exchange: Exchange,
    started: float,
    replica: Replica,
    target: str,
    headers: CIMultiDict[str],
    decision: Decision,
) -> ClientResponse | web.Response:
    """A GET or HEAD the cache answers: from what it holds, from a fill it streams to
    every reader, or by relaying an upstream answer it does not store."""
    cache = request.app[CACHE]
    if decision.outcome is Outcome.GATEWAY_TIMEOUT:
        return _fail(
            exchange, errors.ClientRequestError(504, "not_cached", "only-if-cached: not stored")
        )
    fetch = _CacheFetch(request, exchange, started, replica, target, headers)
    try:
        # a request waiting on another's miss waits on the upstream, as its own fetch would
        answer = await cache.respond(decision, fetch, waiting=request.protocol.wait_on_upstream)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return _fail(exchange, exc)  # every replica failed, and nothing stored may stand in
    exchange.cache = answer.log_word
    upstream = answer.upstream
    if upstream is None:
        exchange.upstream_status = None
        try:
            return await _send_answer(request, exchange, answer)
        finally:
            answer.close()
    assert isinstance(upstream, _CacheTry)  # fetch's
    try:
        if request.method == "HEAD":  # the cache asked for a GET: its head only
            return await _send_head_of(request, exchange, upstream, answer.cache_status)
        return await _respond(
            request, exchange, started, upstream.attempt, upstream.response, target, headers,
            fetch.profile, False, answer.cache_status, observed=True,
        )  # fmt: skip
    finally:
        upstream.close()


async def _send_answer(
    request: ClientRequest, exchange: Exchange, answer: Answer
) -> ClientResponse:
    """The cache's own answer: its head, then its body from memory or from the cache
    file (by sendfile where the client's socket allows, else in blocks), at the client's
    pace, following the fill while it is written. A small object is read in one block
    (which keeps it in memory for the next hits), never by sendfile."""
    body = answer.body
    small = body is None or body.in_memory is not None
    transport = request.transport
    by_sendfile = (
        body is not None
        and body.in_memory is None
        and request.method != "HEAD"
        and body.length > SMALL_OBJECT_MAX
        and zero_copy.sendfile_socket(transport) is not None
    )
    response = ClientResponse(answer.status, head_with_body=small)
    for name, value in answer.headers:
        response.headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
    response.headers["X-Request-ID"] = exchange.request_id
    response.raw_fields = answer.raw_fields
    exchange.status_sent = answer.status
    await response.prepare(request)
    if body is not None and request.method != "HEAD":
        try:
            if body.in_memory is not None:
                await response.write(body.in_memory)
                exchange.bytes_out += len(body.in_memory)
            elif by_sendfile:
                await _send_runs(request, response, exchange, body)
            else:
                async for block in body:
                    await response.write(block)
                    exchange.bytes_out += len(block)
        except CacheAborted:  # the fill failed beyond mending: never a short body
            exchange.cause, exchange.error = errors.UPSTREAM_ERROR, "cache_fill_failed"
            if transport is not None:
                end_cut_short(transport, framed=True)
            return response
        except zero_copy.SendStalled:
            exchange.cause = errors.SEND_TIMEOUT
            abort_send_timed_out(request)
            return response
        except ConnectionError:
            exchange.cause = errors.CLIENT_ABORT
            if transport is not None:
                transport.abort()
            return response
        except OSError as exc:  # the cache file failed or shrank under us: never short
            log.error("cache file read failed, aborting client connection", exc_info=exc)
            exchange.cause, exchange.error = errors.UPSTREAM_ERROR, "cache_read_failed"
            if transport is not None:
                end_cut_short(transport, framed=True)
            return response
    await response.write_eof()
    return response


async def _send_runs(
    request: ClientRequest, response: ClientResponse, exchange: Exchange, body: Any
) -> None:
    """A cached body by sendfile, run by run as the fill commits them (blocks of bytes
    when the fill ran out of room and the rest comes from the upstream uncached)."""
    cache = request.app[CACHE]
    settings = request.app[SETTINGS]
    transport = request.transport
    assert transport is not None
    reached = 0  # the end of what went out of the current run

    def sent(size: int) -> None:
        nonlocal reached
        reached += size
        response.sent_directly(size)
        exchange.bytes_out += size

    async for run in body.runs():
        if isinstance(run, bytes):
            await response.write(run)
            exchange.bytes_out += len(run)
            continue
        fd, offset, count = run
        reached = offset
        try:
            await zero_copy.send_file(
                transport, fd, offset, count,
                stall_timeout=settings.send_timeout, stats=cache.zero_copy,
                run_in_thread=_to_thread_holding_the_file, on_sent=sent,
            )  # fmt: skip
        except zero_copy.FileShorter:  # given back under us: the body says why, or aborts
            body.shorter(reached)


async def _to_thread_holding_the_file(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on a thread; cancelled, it still waits for the thread to end, so the
    file it reads is not closed under it (the caller closes the body after)."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait((future,))
        raise


async def _send_head_of(
    request: ClientRequest, exchange: Exchange, upstream: _CacheTry, cache_status: str
) -> ClientResponse:
    """A HEAD answered with the head of the GET the cache sent upstream (not stored)."""
    response = ClientResponse(upstream.status, upstream.reason, head_with_body=True)
    exchange.upstream_status = upstream.status
    client_response_headers(
        upstream.headers, exchange.request_id, response.headers, status=upstream.status,
        redirect=None, spelled=upstream.raw_headers,
    )  # fmt: skip
    response.headers["Cache-Status"] = cache_status
    exchange.status_sent = upstream.status
    await response.prepare(request)
    await response.write_eof()
    return response


class _CacheTry:
    """An upstream answer the cache asked for, with the try that owns it: the cache
    releases or closes it, as a fill may outlive the client that caused it."""

    def __init__(self, attempt: Attempt, response: UpstreamResponse) -> None:
        self.attempt, self.response = attempt, response
        self.status, self.reason = response.status, response.reason
        self.headers, self.raw_headers = response.headers, response.raw_headers

    @property
    def content(self) -> Any:
        return self.response.content

    def release(self) -> None:
        self.attempt.end()  # the response back to the pool when read to its end

    def close(self) -> None:
        self.response.close()
        self.attempt.end()


class _CacheFetch:
    """The cache's ``fetch`` for one client request: a GET of its target with the cache's
    conditions, tried at the replicas as a proxied GET is (retries, then a mid-body
    resume through ``ResumableBody``)."""

    def __init__(
        self,
        request: ClientRequest,
        exchange: Exchange,
        started: float,
        replica: Replica,
        target: str,
        headers: CIMultiDict[str],
    ) -> None:
        self.request, self.exchange, self.started = request, exchange, started
        self.first: Replica | None = replica
        self.target = target
        self.headers = CIMultiDict(
            (name, value) for name, value in headers.items()
            if name.lower() not in CONDITIONAL_FIELDS
        )  # fmt: skip
        app = request.app
        self.profile = app[ADAPTATIONS][replica.name].profile(time.monotonic())

    async def __call__(self, conditions: Any) -> _CacheTry:
        request, exchange = self.request, self.exchange
        app = request.app
        replicas = app[REPLICAS]
        replica = self.first or replicas.choose(time.monotonic(), path=request.raw_path)
        self.first = None
        if replica is None:
            raise aiohttp.ClientConnectionError("no replica is usable")
        tried: list[Replica] = []
        budgeted = False
        while True:
            upstream = replica.client
            headers = CIMultiDict(self.headers)
            for name, value in conditions:
                headers[name if isinstance(name, str) else name.decode("latin-1")] = (
                    value if isinstance(value, str) else value.decode("latin-1")
                )
            if upstream.authorization is not None:
                headers["Authorization"] = upstream.authorization
            profile = app[ADAPTATIONS][replica.name].profile(time.monotonic())
            attempt = replicas.attempt(replica, budgeted=budgeted).__enter__()
            request.protocol.wait_on_upstream()  # see gate.UPSTREAM_HOLD_S
            try:
                async with asyncio.timeout(profile.headers_timeout_s):
                    response = await upstream.send(
                        "GET", self.target, headers, None,
                        connect_timeout=profile.connect_timeout_s,
                        read_timeout=profile.read_timeout_s,
                    )  # fmt: skip
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                attempt.end()
                upstream.mark_failure(time.time(), errors.classify(exc).error)
                kind = errors.try_failure_kind(exc)
                replicas.failed(time.monotonic(), replica, kind)
                retry = _retry_to(request, exchange, replica, tried, kind, False)
                if retry is None:
                    raise
                replica, budgeted = retry, kind != CONNECT
                continue
            except BaseException:
                attempt.end()
                raise
            attempt.response = response
            attempt.answered()
            now = time.monotonic()
            if response.status in GATEWAY_FAILURES:
                replicas.failed(now, replica, f"status {response.status}")
            else:
                replicas.succeeded(replica)
            if response.status in app[SETTINGS].retry_statuses:  # as a relayed GET's try
                retry = _retry_to(request, exchange, replica, tried, STATUS, False, response.status)
                if retry is not None:
                    _observe_try(request, exchange, replica, errors.OK, response.status)
                    response.close()
                    attempt.end()
                    replica, budgeted = retry, True
                    continue
            ttfb_s = now - response.sent_at
            app[ADAPTATIONS][replica.name].observe_headers(now, ttfb_s, response.tcp_info)
            replicas.headers(now, replica, ttfb_s)
            upstream.mark_response(time.time())
            exchange.upstream, exchange.upstream_status = replica.name, response.status
            exchange.ttfb_s = now - self.started
            body = _resumable(request, exchange, response, attempt, self.target, headers,
                              profile, method="GET")  # fmt: skip
            if body is not None:
                response.content = body  # type: ignore[assignment]
            return _CacheTry(attempt, response)


def _retry_to(
    request: ClientRequest,
    exchange: Exchange,
    failed: Replica,
    tried: list[Replica],
    kind: str,
    has_body: bool,
    status: int | None = None,
) -> Replica | None:
    """The replica for another try after ``failed``, within the rule and the budget; None
    when the request must not (or cannot) be tried again."""
    app = request.app
    settings, replicas = app[SETTINGS], app[REPLICAS]
    tried.append(failed)
    if len(tried) > settings.retries:
        return None
    # a body is read only once: a request that has one is retried only if it never left
    if not retryable(
        request.method,
        kind,
        body_started=has_body and kind != CONNECT,
        status=status,
        statuses=settings.retry_statuses,
    ):
        return None
    now = time.monotonic()
    retry = replicas.choose(now, tuple(tried), path=request.raw_path)
    if retry is None:
        return None
    # counted until the retry has its answer (the caller's ``budgeted``); a connect
    # failure is free: that request reached no upstream
    if not replicas.budget.start(app[TRAFFIC].in_flight, counted=kind != CONNECT):
        return None
    exchange.tries += 1
    exchange.upstream = retry.name
    log.info(
        "retrying at another replica",
        extra={
            "request_id": exchange.request_id,
            "from": failed.name,
            "to": retry.name,
            "why": kind if status is None else f"status {status}",
        },
    )
    return retry


def _observe_try(
    request: ClientRequest, exchange: Exchange, replica: Replica, cause: str, status: int | None
) -> None:
    """A try that was retried elsewhere still tells its replica's adaptation how it went:
    a failing replica's errors cut its own limit, not the others'."""
    attempt = Exchange(
        exchange.request_id, replica.name, upstream_status=status, cause=cause, path=exchange.path
    )
    request.app[ADAPTATIONS][replica.name].observe_exchange(time.monotonic(), attempt)


def _resumable(
    request: ClientRequest,
    exchange: Exchange,
    upstream_resp: UpstreamResponse,
    attempt: Attempt,
    target: str,
    headers: CIMultiDict[str],
    profile: LevelProfile,
    method: str | None = None,
) -> ResumableBody | None:
    """The body that can continue from a replica should its upstream fail, or None (a body
    that has already arrived whole has nothing left to resume). ``method``: the one sent
    upstream when it is not the client's (the cache's GET for a HEAD)."""
    settings = request.app[SETTINGS]
    if not settings.resumes or upstream_resp.content.is_eof():
        return None
    plan = resume_rule.plan(method or request.method, upstream_resp.status, upstream_resp.headers)
    if plan is None:
        return None

    def resumed(failed: str, to: str) -> None:
        exchange.resumes += 1
        exchange.upstream = to  # the replica that delivers the rest

    return ResumableBody(
        upstream_resp,
        plan,
        replicas=request.app[REPLICAS],
        attempt=attempt,
        target=target,
        headers=headers,
        max_resumes=settings.resumes,
        connect_timeout=profile.connect_timeout_s,
        headers_timeout=profile.headers_timeout_s,
        read_timeout=profile.read_timeout_s,
        on_resume=resumed,
    )


def own_origin_form(request: ClientRequest, target: str) -> str | None:
    """The origin-form of an absolute-form target naming this proxy (RFC 9112 3.2.2:
    a server MUST accept it), else None.

    This proxy is the authority the connection was accepted on (its listening address
    as the client dialled it) or the bind address; any other is refused, so fileproxy
    never becomes an open proxy.
    """
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, path = rest[:cut].lower(), rest[cut:]
    if "@" in authority:
        return None
    if authority not in _own_authorities(request):
        return None
    if not path.startswith("/"):
        path = "/" + path
    return path.partition("#")[0]


def _own_authorities(request: ClientRequest) -> set[str]:
    names = set()
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host, port = sockname[0], sockname[1]
        names.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if host in ("127.0.0.1", "::1"):
            names.add(f"localhost:{port}")
    bind = request.app[SETTINGS].bind
    if bind.path is None:
        names.add(str(bind).lower())
    return names


def _client_base(request: ClientRequest) -> str:
    """``scheme://host`` the client used to reach the proxy (see headers.Redirect)."""
    peer = request.remote
    return client_facing_base(
        request.headers,
        peer=peer,
        scheme=request.scheme,
        host=request.host,
        trusted=request.app[SETTINGS].trusted_proxies,
        local_socket=not peer and on_unix_socket(request),
    )


async def _send_upstream(
    request: ClientRequest,
    exchange: Exchange,
    target: str,
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
            unyielded = 0  # as in _relay: an upload gives the loop a turn now and then
            try:
                while chunk := await _read_body(request, profile.chunk_size):
                    exchange.bytes_in += len(chunk)
                    if settings.max_body_size and exchange.bytes_in > settings.max_body_size:
                        raise _too_large(settings.max_body_size)
                    yield chunk
                    unyielded += len(chunk)
                    if unyielded >= RELAY_SLICE_BYTES:
                        unyielded = 0
                        await asyncio.sleep(0)
            except Exception as exc:
                body_errors.append(exc)
                raise
            deadline.reschedule(loop.time() + profile.headers_timeout_s)

        request.protocol.wait_on_upstream()  # see gate.UPSTREAM_HOLD_S
        return await upstream.send(
            request.method,
            target,
            headers,
            request_body() if has_body else None,
            connect_timeout=profile.connect_timeout_s,
            read_timeout=profile.read_timeout_s,
        )


async def _relay(
    request: ClientRequest,
    response: ClientResponse,
    upstream_resp: UpstreamResponse,
    exchange: Exchange,
    chunk_size: int,
    upstream_body_complete: Callable[[int], None],
) -> None:
    read = upstream_resp.content.read
    unyielded = 0  # bytes relayed since this stream last gave the loop a turn
    while True:
        chunk = await spool.read_or_abort(read, chunk_size, request, upstream_resp, exchange)
        if chunk is None:  # the upstream failed mid-body: the client connection is aborted
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
        unyielded += len(chunk)
        if unyielded >= RELAY_SLICE_BYTES:
            unyielded = 0
            await asyncio.sleep(0)  # the other streams, probes and new requests run
    upstream_body_complete(exchange.bytes_out)
    try:
        await response.write_eof()
    except ConnectionError:
        exchange.cause = errors.CLIENT_ABORT


async def _read_body(request: ClientRequest, chunk_size: int) -> bytes:
    """The next piece of the client's body; a client silent too long gets 408."""
    timeout = request.app[SETTINGS].client_body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.content.read(chunk_size)
    except TimeoutError:
        raise errors.ClientRequestError(
            408, "request_timeout", f"request body stalled for {timeout:g} s"
        ) from None


def _over_limit(
    request: ClientRequest, exchange: Exchange, retry_after: float, limit: float | None
) -> web.Response:
    """Over the upstream's admission rate: 503 (or 429) with Retry-After, counted."""
    settings = request.app[SETTINGS]
    failure = errors.Failure(
        int(settings.limit_status),
        "rate_limited",
        f"over the admission rate of {limit} req/s; retry later",
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
