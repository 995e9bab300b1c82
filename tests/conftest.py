"""Shared test harness: real processes on ephemeral loopback ports, stopped by PID.

- ``start_proxy(**env)`` starts ``python -m fileproxy serve`` as a subprocess and waits
  until /health answers; its log lines are in ``proxy.log_text()``.
- ``start_backend(app)`` runs an aiohttp app written in a test, in the test's own loop.
- ``sample_upstream`` runs ``fileproxy sample-upstream`` as a subprocess.
- ``require_binary`` fails (never skips) with the install command when a tool is missing.
- ``redis_server`` / ``redis_cluster`` / ``redis_backend``: real redis-server processes
  (one node, or a 3-master Redis Cluster) from tests/redis_servers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web

if TYPE_CHECKING:
    from tests.redis_servers import RedisBackend, RedisClusterServers, RedisServer

ROOT = Path(__file__).resolve().parent.parent

APT_PACKAGES = {
    "curl": "curl",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "nginx": "nginx",
}


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        package = APT_PACKAGES.get(name, name)
        pytest.fail(
            f"{name} is required: apt-get install -y {package} (or run `make test` as root)"
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Process:
    """A daemon started by a test; stopped with SIGTERM (then SIGKILL) by its PID."""

    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_line(self, path: str) -> dict[str, Any] | None:
        """The first JSON access line of a request for ``path`` in its log, or None."""
        for raw in self.log_text().splitlines():
            access = raw.startswith("{") and '"logger":"fileproxy.access"' in raw
            if access and f'"path":"{path}"' in raw:
                line: dict[str, Any] = json.loads(raw)
                return line
        return None

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Until ``text`` occurs ``count`` times in the log (e.g. every worker booted)."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged {count} times:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int:
        return stop_popen(self.popen, timeout)


def stop_popen(popen: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
    return popen.returncode


# the cache directories of the daemons tests start, removed when the test run ends
_CACHE_DIRS = tempfile.TemporaryDirectory(prefix="fileproxy-test-caches-")


def own_cache_dir(env: dict[str, str]) -> dict[str, str]:
    """``env`` with a FILEPROXY_CACHE_DIR of its own unless it names one: the default,
    under the system temp dir, is shared by every daemon on the host, so a test would
    find what another test (or another run) stored there and never reach its backend."""
    if "FILEPROXY_CACHE_DIR" not in env:
        env["FILEPROXY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cache-", dir=_CACHE_DIRS.name)
    return env


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without fileproxy's variables, plus ``extra``, and a
    cache directory of its own (``own_cache_dir``)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FILEPROXY_", "HTTP_", "REDIS_"))
    }
    # The suites test the relay, which is what fileproxy does with FILEPROXY_CACHE=off
    # and for everything the cache does not keep; the cache's own suites
    # (test_cache*.py) turn it on, each with a directory of its own. On by default
    # here, every GET of a cacheable test file would be answered by the cache, and
    # every test would share the default directory under the system temp dir.
    env.setdefault("FILEPROXY_CACHE", "off")
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return own_cache_dir(env)


def start_process(
    args: list[str], port: int, env: dict[str, str], log_path: Path, timeout: float = 15.0
) -> Process:
    """Start ``args`` (output to ``log_path``) and wait until it listens on ``port``."""
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(
            args, env=clean_env(**env), stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT
        )
    process = Process(popen, port, log_path, env)
    try:
        wait_for_port(port, timeout=timeout, process=popen)
    except Exception:
        process.stop()
        raise RuntimeError(f"{args[0]} did not start:\n{process.log_text()}") from None
    return process


def _start(args: list[str], port: int, env: dict[str, str], tmp: Path, name: str) -> Process:
    return start_process(args, port, env, tmp / f"{name}-{port}.log")


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fileproxy-test-") as path:
        yield Path(path)


@pytest.fixture
def start_proxy(tmp_dir: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(upstream: str, **env: str) -> Process:
        port = free_port()
        env = {
            "FILEPROXY_BIND": f"127.0.0.1:{port}",
            "FILEPROXY_UPSTREAM": upstream,
            "FILEPROXY_LOG_FORMAT": "json",
            "FILEPROXY_DRAIN_DELAY": "0",  # tests of the drain set their own
            **{k: str(v) for k, v in env.items()},
        }
        process = _start([sys.executable, "-m", "fileproxy", "serve"], port, env, tmp_dir, "proxy")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_replica(tmp_dir: Path) -> Iterator[Callable[..., Process]]:
    """``start_replica(**options)`` starts tests/replica_backend.py (options as its flags)."""
    started: list[Process] = []

    def start(**options: object) -> Process:
        port = free_port()
        args = [sys.executable, "-m", "tests.replica_backend", "--port", str(port)]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        process = _start(args, port, {}, tmp_dir, "replica")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def sample_upstream(tmp_dir: Path) -> Iterator[Process]:
    port = free_port()
    args = [sys.executable, "-m", "fileproxy", "sample-upstream", "--bind", f"127.0.0.1:{port}"]
    process = _start(args, port, {}, tmp_dir, "sample-upstream")
    yield process
    process.stop()


@dataclass
class Backend:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def start_backend() -> AsyncIterator[Callable[[web.Application], asyncio.Future[Backend]]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> Backend:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return Backend(runner, port)

    yield start  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that changes nothing: no decompression, no cookie jar, no redirects."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        yield session


def parking_backend(concurrent: list[int], release: asyncio.Event) -> web.Application:
    """/park waits until ``release`` and answers its ``n`` query (or "done");
    concurrent[0] is the current, [1] the peak count of requests waiting there."""

    async def park(request: web.Request) -> web.Response:
        concurrent[0] += 1
        concurrent[1] = max(concurrent[1], concurrent[0])
        try:
            await release.wait()
        finally:
            concurrent[0] -= 1
        return web.Response(text=request.query.get("n", "done"))

    app = web.Application()
    app.router.add_get("/park", park)
    return app


async def get_json(session: aiohttp.ClientSession, url: str) -> dict:  # type: ignore[type-arg]
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


# Real Redis for the shared state store. tests/redis_servers.py imports the helpers above,
# so it is imported inside the fixtures, not at the top of this module.


@pytest.fixture
def redis_server(tmp_dir: Path) -> Iterator[RedisServer]:
    """One redis-server with a password on a free loopback port; stopped at teardown."""
    from tests.redis_servers import RedisServer

    server = RedisServer(tmp_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_cluster(tmp_dir: Path) -> Iterator[RedisClusterServers]:
    """A 3-master Redis Cluster with a password on free loopback ports; stopped at teardown."""
    from tests.redis_servers import RedisClusterServers

    cluster = RedisClusterServers(tmp_dir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def session_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole run, for tests that only add keys under a prefix of
    their own (``unique_prefix``) and never stop, flush or fill it."""
    from tests.redis_servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def session_redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterServers]:
    """One 3-master Redis Cluster for the whole run (starting one takes ~2 s), on the
    terms of ``session_redis_server``."""
    from tests.redis_servers import RedisClusterServers

    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def unique_prefix() -> str:
    """A Redis key prefix of this test's own, on a server shared by the run."""
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["single", "cluster"])
def redis_backend(request: pytest.FixtureRequest, tmp_dir: Path) -> Iterator[RedisBackend]:
    """The same test against one node and against a 3-master cluster (``backend.cluster``)."""
    from tests.redis_servers import RedisClusterServers, RedisServer

    backend: RedisBackend = (
        RedisServer(tmp_dir) if request.param == "single" else RedisClusterServers(tmp_dir)
    )
    try:
        yield backend
    finally:
        backend.stop()
