"""A client of CacheService as a data plane would be one, for the cache service's tests;
also a process of its own for the tests with several processes on one cache directory:

    python -m tests.cache_service_worker '<json>'

The JSON names ``dir``, ``upstream``, ``target``, ``readers`` (how many requests at once)
and ``delay`` (seconds between them); the process prints one JSON line per event:
``ready``, ``first_byte`` (per reader), ``done`` (per reader: sha256, bytes, log word,
takeovers seen), ``error``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from fileproxy.delivery.cache import (
    CONDITIONAL_FIELDS,
    Answer,
    CacheService,
    Fetch,
    Outcome,
    UpstreamAnswer,
)
from fileproxy.settings import Settings
from fileproxy.upstream.client import UpstreamClient


def cache_settings(directory: str, upstream: str, **env: str) -> Settings:
    return Settings.from_env(
        {
            "FILEPROXY_UPSTREAM": upstream,
            "FILEPROXY_CACHE_DIR": directory,
            "FILEPROXY_CACHE_MIN_FREE": "0",
            **env,
        }
    )


def make_fetch(
    client: UpstreamClient, target: str, headers: Sequence[tuple[str, str]], log: list[Any]
) -> Fetch:
    """What the data plane gives the cache: the client's request without its conditional
    fields, plus the cache's."""

    async def fetch(conditions: Sequence[tuple[str, str]]) -> UpstreamAnswer:
        sent = CIMultiDict((n, v) for n, v in headers if n.lower() not in CONDITIONAL_FIELDS)
        for name, value in conditions:
            sent[name] = value
        log.append(list(conditions))
        return await client.send("GET", target, sent, None, connect_timeout=5, read_timeout=30)

    return fetch


@dataclass
class Got:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    word: str
    cache_status: str
    aborted: str | None = None
    first_byte: float | None = None
    fetches: list[Any] = field(default_factory=list)
    sha256: str = ""  # of the body, also when it was not kept
    size: int = 0

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.decode("latin-1").lower() == name.lower():
                return v.decode("latin-1")
        return None


async def get(
    cache: CacheService,
    client: UpstreamClient,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    pace: float = 0.0,
    leave_after: int | None = None,
    zero_copy: bool = False,
    later: float = 0.0,
    keep_body: bool = True,
) -> Got:
    """One request through the cache, the body read to its end (or ``leave_after`` bytes:
    the client leaves), ``pace`` seconds between blocks."""
    fetches: list[Any] = []
    began = time.monotonic()
    decision = await cache.lookup(method, target, headers, now=time.time() + later)
    if decision.outcome is Outcome.BYPASS:
        sent = CIMultiDict(headers)
        response = await client.send(method, target, sent, None, connect_timeout=5, read_timeout=30)
        try:
            body = await response.content.read() if method == "GET" else b""
        finally:
            response.close()
        return Got(
            response.status, list(response.raw_headers), body, "bypass", decision.cache_status
        )
    answer: Answer = await cache.respond(decision, make_fetch(client, target, headers, fetches))
    got = Got(answer.status, answer.headers, b"", answer.log_word, answer.cache_status)
    got.fetches = fetches
    try:
        if answer.upstream is not None:
            got.status = answer.upstream.status
            got.headers = list(answer.upstream.raw_headers)
            got.body = await answer.upstream.content.read()
            return got
        if answer.body is None:
            return got
        parts = []
        received = 0
        digest = hashlib.sha256()
        try:
            if zero_copy and answer.body.in_memory is not None:  # a small object: no file
                parts.append(answer.body.in_memory)
                digest.update(answer.body.in_memory)
                received = len(answer.body.in_memory)
                got.first_byte = time.monotonic() - began
            elif zero_copy:
                async for run in answer.body.runs():
                    if isinstance(run, bytes):  # the uncached rest of a fill out of room
                        data = run
                    else:
                        fd, offset, count = run
                        data = os.pread(fd, count, offset)
                        if len(data) < count:  # the file was given back under us
                            answer.body.shorter(offset + len(data))
                    digest.update(data)
                    if keep_body:
                        parts.append(data)
                    received += len(data)
                    got.first_byte = got.first_byte or time.monotonic() - began
            else:
                async for block in answer.body:
                    digest.update(block)
                    if keep_body:
                        parts.append(block)
                    received += len(block)
                    got.first_byte = got.first_byte or time.monotonic() - began
                    if leave_after is not None and received >= leave_after:
                        break
                    if pace:
                        await asyncio.sleep(pace)
        except Exception as error:  # CacheAborted: the data plane aborts the client
            got.aborted = f"{type(error).__name__}: {error}"
        got.body = b"".join(parts)
        got.sha256, got.size = digest.hexdigest(), received
        return got
    finally:
        answer.close()


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), "pid": os.getpid(), **fields}))
    sys.stdout.flush()


async def main(job: dict[str, Any]) -> None:
    settings = cache_settings(job["dir"], job["upstream"])
    client = UpstreamClient(settings)
    try:
        await serve(job, settings, client)
    finally:
        await client.close()  # after the cache: its fills use the client to the end


async def serve(job: dict[str, Any], settings: Settings, client: UpstreamClient) -> None:
    async with CacheService(settings, durable=False) as cache:
        emit("ready")

        async def one(index: int) -> None:
            await asyncio.sleep(index * job.get("delay", 0.0))
            got = await get(cache, client, job["target"])
            emit(
                "done",
                index=index,
                status=got.status,
                sha256=hashlib.sha256(got.body).hexdigest(),
                bytes=len(got.body),
                word=got.word,
                aborted=got.aborted,
                first_byte=got.first_byte,
                takeovers=cache.counters["takeovers"],
            )

        await asyncio.gather(*(one(i) for i in range(job.get("readers", 1))))
        # a process lives on after its clients: the fills they caused end (as stored)
        deadline = time.monotonic() + 30
        while cache._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        emit("finished", report=await cache.report())


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
