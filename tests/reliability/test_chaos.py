"""Chaos: steady load while the backend and Redis are killed and restarted and gunicorn reloads.

fileproxy under gunicorn (two workers, Redis with a password for the shared state) in
front of the sample upstream; twelve clients loop over full files, a Range, a slow
streamed body and a small file, each request on a new connection with its own
X-Request-ID. Meanwhile the test kills (SIGKILL) and restarts the backend, kills and
restarts Redis, does both at once, and sends HUP to gunicorn twice.

Every request must end as one of: the exact bytes asked for; a clear error status
(502/503/504 with a JSON body); or an aborted connection that the proxy logged
under the request's id. Zero truncated bodies delivered as complete, zero requests
without an answer, zero 500s. The counts are printed.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from fileproxy.sample_upstream import file_bytes
from tests.conftest import Process, free_port, start_process
from tests.integration.test_deployment import WORKERS, start_gunicorn

pytestmark = pytest.mark.slow

CLIENTS = 12
LOAD_S = 40.0
ANSWER_TIMEOUT_S = 30.0
RANGE = (1000, 200_999)
SLOW_CHUNKS, SLOW_CHUNK = 20, 16384  # a 320 KiB body streamed over ~1 s


def _sha(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    status: int
    sha256: str
    headers: tuple[tuple[str, str], ...] = ()


KINDS = (
    Kind("file 1 MiB", "/files/1m.bin", 200, _sha(file_bytes("1m.bin"))),
    Kind(
        "range",
        "/files/1m.bin",
        206,
        _sha(file_bytes("1m.bin", RANGE[0], RANGE[1] + 1)),
        (("Range", f"bytes={RANGE[0]}-{RANGE[1]}"),),
    ),
    Kind(
        "slow stream",
        f"/slow?delay=0&body_delay=0.05&chunks={SLOW_CHUNKS}&chunk_size={SLOW_CHUNK}",
        200,
        _sha(bytes([ord("a") + k % 26]) * SLOW_CHUNK for k in range(SLOW_CHUNKS)),
    ),
    Kind("file 4 KiB", "/files/4k.bin", 200, _sha(file_bytes("4k.bin"))),
)


@dataclass
class Result:
    kind: str
    request_id: str
    outcome: (
        str  # complete | error_status | aborted | truncated_as_complete | bad_status | no_answer
    )
    detail: str = ""


async def one_request(session: aiohttp.ClientSession, base: str, kind: Kind) -> Result:
    request_id = uuid.uuid4().hex
    headers = {"X-Request-ID": request_id, **dict(kind.headers)}
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            async with session.get(base + kind.path, headers=headers) as resp:
                body = await resp.read()
                if resp.status == kind.status:
                    if hashlib.sha256(body).hexdigest() == kind.sha256:
                        return Result(kind.name, request_id, "complete")
                    return Result(kind.name, request_id, "truncated_as_complete", f"{len(body)} B")
                if resp.status in (502, 503, 504) and resp.content_type == "application/json":
                    return Result(kind.name, request_id, "error_status", str(resp.status))
                return Result(kind.name, request_id, "bad_status", f"{resp.status} {body[:200]!r}")
    except TimeoutError:
        return Result(kind.name, request_id, "no_answer")
    except aiohttp.ClientError as exc:
        return Result(kind.name, request_id, "aborted", type(exc).__name__)


def start_backend(port: int, tmp_dir: Path) -> Process:
    args = [sys.executable, "-m", "fileproxy", "sample-upstream", "--bind", f"127.0.0.1:{port}"]
    return start_process(args, port, {}, tmp_dir / f"backend-{time.monotonic_ns()}.log")


async def test_chaos_every_request_ends_clearly(redis_server, tmp_dir: Path):
    backend_port = free_port()
    backend = [start_backend(backend_port, tmp_dir)]
    proxy = start_gunicorn(tmp_dir, f"http://127.0.0.1:{backend_port}", REDIS_URL=redis_server.url)
    results: list[Result] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, offset: int) -> None:
        for kind in itertools.islice(itertools.cycle(KINDS), offset, None):
            if stop.is_set():
                return
            result = await one_request(session, proxy.url, kind)
            results.append(result)
            if result.outcome != "complete":
                await asyncio.sleep(0.05)  # as a client would before it tries again

    def kill_backend() -> None:
        backend[0].popen.kill()
        backend[0].popen.wait(10)

    def restart_backend() -> None:
        backend[0] = start_backend(backend_port, tmp_dir)

    def hup() -> None:
        proxy.popen.send_signal(signal.SIGHUP)

    schedule: list[tuple[float, str, Callable[[], None]]] = [
        (4, "kill backend", kill_backend),
        (7, "restart backend", restart_backend),
        (11, "kill redis", redis_server.kill),
        (15, "restart redis", redis_server.restart),
        (19, "HUP gunicorn", hup),
        (25, "kill backend and redis", lambda: (kill_backend(), redis_server.kill())),
        (29, "restart backend and redis", lambda: (restart_backend(), redis_server.restart())),
        (33, "HUP gunicorn", hup),
    ]
    connector = aiohttp.TCPConnector(force_close=True, limit=CLIENTS)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            started = time.monotonic()
            clients = [asyncio.create_task(client(session, i)) for i in range(CLIENTS)]
            for at, what, action in schedule:
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                await asyncio.to_thread(action)
                print(f"{time.monotonic() - started:5.1f} s  {what}")
            await asyncio.sleep(max(0.0, started + LOAD_S - time.monotonic()))
            stop.set()
            await asyncio.gather(*clients)

            # afterwards it serves normally, with shared state again
            async with session.get(f"{proxy.url}/files/4k.bin") as resp:
                assert resp.status == 200
                assert hashlib.sha256(await resp.read()).hexdigest() == KINDS[3].sha256
            deadline = time.monotonic() + 10
            while True:
                async with session.get(f"{proxy.url}/health") as resp:
                    health = await resp.json()
                if health["state_store"]["state"] == "up":
                    break
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.2)
        log = proxy.log_text()
        worker_starts = log.count("fileproxy worker started")
    finally:
        proxy.stop()
        backend[0].stop()

    counts = Counter((r.kind, r.outcome, r.detail) for r in results)
    print(f"{len(results)} requests; gunicorn worker starts: {worker_starts}")
    for (kind, outcome, detail), count in sorted(counts.items()):
        print(f"  {kind:12} {outcome:22} {detail:24} {count}")
    outcomes = Counter(r.outcome for r in results)
    assert outcomes["complete"] > 100, outcomes  # the load really ran
    assert outcomes["error_status"] > 0, outcomes  # and the faults really bit
    assert worker_starts >= 3 * WORKERS, worker_starts  # both HUPs replaced the workers
    bad = [r for r in results if r.outcome not in ("complete", "error_status", "aborted")]
    assert not bad, bad[:10]
    unlogged = [r for r in results if r.outcome == "aborted" and r.request_id not in log]
    assert not unlogged, unlogged[:10]  # every abort is in the proxy's log under its id
