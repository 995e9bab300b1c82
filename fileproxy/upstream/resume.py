"""A response body that survives its upstream: read on from a replica by Range.

``ResumableBody`` stands in for ``UpstreamResponse.content`` with the two calls the
relay makes (``read(n)``, ``is_eof()``), so the relay does not change. When a read
fails (reset, idle-read timeout, premature close) it asks a replica — the others
first, then the one that failed — for the missing bytes with ``Range`` and
``If-Range`` on the first response's strong ETag, and carries on only when the
answer is the exact continuation (``adaptive.resume``: a 206 with the same ETag and
exactly the Content-Range asked). Otherwise the original error is raised and the
client connection is aborted as before: two different contents are never spliced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from multidict import CIMultiDict

from fileproxy.adaptive.resume import ResumePlan
from fileproxy.adaptive.retry_budget import CONNECT
from fileproxy.upstream.client import UpstreamResponse
from fileproxy.upstream.pool import CONNECT_ERRORS
from fileproxy.upstream.protocol import ResponseBody
from fileproxy.upstream.replicas import Attempt, Replica, ReplicaSet

log = logging.getLogger("fileproxy.upstream.resume")

READ_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
# conditions of the client's request that must not decide the continuation
_DROPPED = ("Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since",
            "If-Unmodified-Since")  # fmt: skip


class ResumableBody:
    def __init__(
        self,
        response: UpstreamResponse,
        plan: ResumePlan,
        *,
        replicas: ReplicaSet,
        attempt: Attempt,
        target: str,
        headers: CIMultiDict[str],
        max_resumes: int,
        connect_timeout: float | None,
        headers_timeout: float | None,
        read_timeout: float | None,
        on_resume: Callable[[str, str], None] | None = None,
    ) -> None:
        self.response, self.plan, self.replicas = response, plan, replicas
        self.attempt = attempt  # the try that owns the body's replica (moves on a resume)
        self.inner: ResponseBody = response.content
        self.target = target
        self.headers = headers  # the request's headers as the proxy first built them
        self.max_resumes = max_resumes
        self.timeouts = (connect_timeout, headers_timeout, read_timeout)
        self.on_resume = on_resume
        self.delivered = 0
        self.resumes = 0
        self.expected = plan.last - plan.first + 1

    @property
    def replica(self) -> Replica:
        """The replica the body comes from now."""
        return self.attempt.replica

    def is_eof(self) -> bool:
        return self.inner.is_eof()

    async def read(self, n: int = -1) -> bytes | memoryview:
        while True:
            try:
                chunk = await self.inner.read(n)
                if not chunk and self.delivered < self.expected:
                    raise aiohttp.ClientPayloadError("upstream body ended early")
            except READ_ERRORS as exc:
                if self.resumes >= self.max_resumes:
                    self._gave_up("FILEPROXY_RESUMES reached")
                    raise
                if not await self._resume(exc):
                    raise
                continue
            self.delivered += len(chunk)
            return chunk

    async def _resume(self, error: BaseException) -> bool:
        """Switch to a replica's exact continuation; False when none gives it."""
        failed = self.replica
        now = time.monotonic()
        self.replicas.failed(now, failed, f"mid-body: {type(error).__name__}")
        self.response.close()  # the broken connection is never reused
        for candidate in self.replicas.others_first(now, failed):
            with self.replicas.attempt(candidate) as asking:  # ends it unless taken over
                answer = await self._ask(asking)
                if answer is None:
                    continue
                self.response.take_over(answer)
                self.attempt.take_over(asking)  # the failed replica's try ends here
            self.inner = answer.content
            self.resumes += 1
            self.replicas.resumes["ok"] += 1
            if self.on_resume is not None:
                self.on_resume(failed.name, candidate.name)
            log.info(
                "download resumed from a replica",
                extra={
                    "from": failed.name,
                    "to": candidate.name,
                    "offset": self.plan.first + self.delivered,
                    "error": type(error).__name__,
                },
            )
            return True
        self._gave_up("no replica has the exact continuation")
        return False

    def _gave_up(self, why: str) -> None:
        self.replicas.resumes["failed"] += 1
        self.response.close()
        log.warning(
            "download could not be resumed",
            extra={
                "upstream": self.replica.name,
                "offset": self.plan.first + self.delivered,
                "why": why,
            },
        )

    async def _ask(self, asking: Attempt) -> UpstreamResponse | None:
        """The exact continuation from ``asking``'s replica (its response, owned by
        ``asking``), or None."""
        candidate = asking.replica
        headers = CIMultiDict(self.headers)
        for name in _DROPPED:
            headers.popall(name, None)
        headers.update(self.plan.range_headers(self.delivered))
        authorization = candidate.client.authorization
        if authorization is not None:
            headers["Authorization"] = authorization
        connect_timeout, headers_timeout, read_timeout = self.timeouts
        try:
            async with asyncio.timeout(headers_timeout):
                answer = await candidate.client.send(
                    "GET",
                    self.target,
                    headers,
                    None,
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                )
        except READ_ERRORS as exc:
            # a connect failure reached no upstream: it costs the retry throttle nothing
            reason = CONNECT if isinstance(exc, CONNECT_ERRORS) else type(exc).__name__
            self.replicas.failed(time.monotonic(), candidate, reason)
            return None
        asking.response = answer
        now = time.monotonic()
        self.replicas.headers(now, candidate, now - answer.sent_at)
        why = self.plan.accepts(self.delivered, answer.status, answer.headers)
        if why is not None:
            log.warning(
                "replica's continuation refused", extra={"upstream": candidate.name, "why": why}
            )
            return None
        candidate.client.mark_response(time.time())
        candidate.counts["resumes"] += 1
        return answer
