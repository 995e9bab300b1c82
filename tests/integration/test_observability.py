"""Observability against the real daemon: /ready and the drain, /metrics, admin access, logs.

- ``/ready`` follows the upstream's reachability (TCP probe) and turns 503 "draining" on
  SIGTERM while /health and proxying still work and in-flight downloads finish.
- ``/metrics`` is Prometheus text whose counters match the traffic the test sent.
- ``/stats`` and ``/metrics`` are for FILEPROXY_ADMIN_ALLOW peers or the bearer token;
  the token is never shown.
- The access log is one JSON line per request on stdout (everything else on stderr),
  with the request id, the upstream's answer, timings, byte counts and the cause.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from fileproxy.sample_upstream import file_bytes
from tests.conftest import ROOT, Process, clean_env, free_port, get_json, stop_popen, wait_for_port

ERROR_KEYS = {"error", "detail", "request_id"}
ACCESS_FIELDS = {
    "request_id",
    "method",
    "path",
    "status",
    "upstream",
    "upstream_status",
    "ttfb_ms",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "cause",
}
SLOW_DOWNLOAD = "/slow?delay=0&body_delay=0.2&chunks=20&chunk_size=65536"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


async def poll(
    check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15.0, every: float = 0.1
) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"not within {timeout}s: {what} (last: {last!r})")


async def ready_state(session: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{base}/ready") as resp:
        assert resp.content_type == "application/json", resp.headers
        return resp.status, await resp.json()


async def wait_ready(
    session: aiohttp.ClientSession, base: str, status: int, reason: str, timeout: float = 15.0
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        got_status, body = await ready_state(session, base)
        return body if got_status == status and body.get("reason") == reason else None

    body: dict[str, Any] = await poll(check, f"/ready {status} {reason!r}", timeout)
    assert body["ready"] is (status == 200), body
    return body


async def assert_error_json(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", resp.headers
    body = json.loads(text)
    assert set(body) == ERROR_KEYS, body
    assert body["request_id"] == resp.headers["X-Request-ID"], (body, dict(resp.headers))
    return body


def slow_expected() -> bytes:
    return b"".join(bytes([ord("a") + k % 26]) * 65536 for k in range(20))


def sample(name: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(file_bytes(name, start, end))


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send bytes as they are (``Connection: close`` expected); status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers, body


# --- a daemon with stdout and stderr in separate files ---


@dataclass
class SplitDaemon:
    popen: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def access_lines(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed; a line that is not JSON fails the test."""
        lines = []
        for raw in self.stdout_text().splitlines():
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    raise AssertionError(f"stdout line is not JSON: {raw!r}") from None
        return lines

    def lines_for(self, request_id: str) -> list[dict[str, Any]]:
        return [line for line in self.access_lines() if line.get("request_id") == request_id]

    async def wait_for_line(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            found = self.lines_for(request_id)
            return found[0] if found else None

        line: dict[str, Any] = await poll(
            check, f"access line for {request_id}\nstdout:\n{self.stdout_text()}", timeout, 0.05
        )
        return line

    def stop(self, timeout: float = 15.0) -> int:
        return stop_popen(self.popen, timeout)


@pytest.fixture
def start_split_proxy(tmp_dir: Path) -> Iterator[Callable[..., SplitDaemon]]:
    """`python -m fileproxy serve` with the fixture's environment, stdout and stderr apart."""
    started: list[SplitDaemon] = []

    def start(upstream: str, **env: str) -> SplitDaemon:
        port = free_port()
        full_env = clean_env(
            **{
                "FILEPROXY_BIND": f"127.0.0.1:{port}",
                "FILEPROXY_UPSTREAM": upstream,
                "FILEPROXY_LOG_FORMAT": "json",
                "FILEPROXY_DRAIN_DELAY": "0",
                **{k: str(v) for k, v in env.items()},
            }
        )
        stdout_path = tmp_dir / f"split-{port}.stdout"
        stderr_path = tmp_dir / f"split-{port}.stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                [sys.executable, "-m", "fileproxy", "serve"],
                env=full_env,
                stdout=out,
                stderr=err,
                cwd=ROOT,
            )
        daemon = SplitDaemon(popen, port, stdout_path, stderr_path)
        started.append(daemon)
        try:
            wait_for_port(port, process=popen)
        except Exception:
            daemon.stop()
            raise RuntimeError(
                f"daemon did not start:\n{daemon.stdout_text()}\n{daemon.stderr_text()}"
            ) from None
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def log_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for raw in text.splitlines():
        try:
            parsed = json.loads(raw)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            lines.append(parsed)
    return lines


# --------------------------------------------------------------------------------------------
# 1. /ready and the drain
# --------------------------------------------------------------------------------------------


async def test_ready_when_the_upstream_is_reachable(client, start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url)
    body = await wait_ready(client, proxy.url, 200, "ok", timeout=5)
    assert body["ready"] is True
    async with client.get(f"{proxy.url}/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["ready"] is True
        assert resp.headers.get("Cache-Control") == "no-store"
    async with client.head(f"{proxy.url}/ready") as resp:
        assert resp.status == 200


async def test_ready_follows_the_upstream_going_from_unreachable_to_listening(client, start_proxy):
    port = free_port()  # nobody listens here (yet)
    proxy = start_proxy(f"http://127.0.0.1:{port}")

    body = await wait_ready(client, proxy.url, 503, "upstream unreachable", timeout=15)
    assert body == {"ready": False, "reason": "upstream unreachable"}
    # liveness is not readiness: /health still answers, and says why it is not ready
    health = await get_json(client, f"{proxy.url}/health")
    assert health["ready"] is False
    assert health["ready_reason"] == "upstream unreachable"

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        body = await wait_ready(client, proxy.url, 200, "ok", timeout=15)
        assert body["ready"] is True
        async with client.get(f"{proxy.url}/hello") as resp:
            assert resp.status == 200
            assert await resp.text() == "hello"
    finally:
        await runner.cleanup()


async def test_drain_after_sigterm(client, start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_DRAIN_DELAY="3")
    await wait_ready(client, proxy.url, 200, "ok", timeout=5)

    # an in-flight download (about 3.8 s) on its own connection, started before SIGTERM
    download_session = aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
    )
    try:
        resp = await download_session.get(f"{proxy.url}{SLOW_DOWNLOAD}")
        assert resp.status == 200
        first = await resp.content.readexactly(65536)
        assert first == b"a" * 65536

        async def rest() -> bytes:
            return first + await resp.read()

        download = asyncio.create_task(rest())
        sigterm_at = time.monotonic()
        proxy.popen.send_signal(signal.SIGTERM)

        # during the drain: not ready, but alive and still proxying (fresh connections)
        async with aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=10),
        ) as fresh:
            body = await wait_ready(fresh, proxy.url, 503, "draining", timeout=2)
            assert body == {"ready": False, "reason": "draining"}
            async with fresh.get(f"{proxy.url}/health") as health:
                assert health.status == 200
                payload = await health.json()
                assert payload["ready"] is False and payload["ready_reason"] == "draining"
            async with fresh.get(f"{proxy.url}/files/64k.bin") as proxied:
                assert proxied.status == 200
                assert await proxied.read() == sample("64k.bin")
            assert time.monotonic() - sigterm_at < 3, "the checks ran after the drain delay"

        body_bytes = await asyncio.wait_for(download, 30)
        assert len(body_bytes) == 20 * 65536
        assert body_bytes == slow_expected()
        resp.release()
    finally:
        await download_session.close()

    returncode = await asyncio.get_running_loop().run_in_executor(
        None, lambda: proxy.popen.wait(30)
    )
    assert returncode == 0, proxy.log_text()
    assert time.monotonic() - sigterm_at >= 3, "exited before the drain delay"
    draining = [line for line in log_lines(proxy.log_text()) if line.get("msg") == "draining"]
    assert len(draining) == 1, proxy.log_text()
    assert "Traceback" not in proxy.log_text()


# --------------------------------------------------------------------------------------------
# 2. /metrics
# --------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, name: str, **labels: str) -> list[Any]:
    return [
        s
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(family: Any, name: str, **labels: str) -> float:
    found = samples(family, name, **labels)
    assert len(found) == 1, (name, labels, family.samples)
    return float(found[0].value)


def duration_counts(histogram: Any) -> dict[str, float]:
    """Requests per status class in the duration histogram."""
    return {
        s.labels["status_class"]: s.value
        for s in samples(histogram, "fileproxy_request_duration_seconds_count")
    }


async def scrape(session: aiohttp.ClientSession, base: str) -> tuple[str, dict[str, Any]]:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
        assert resp.status == 200, text
        content_type = resp.headers["Content-Type"]
        assert content_type.startswith("text/plain"), content_type
        assert "version=0.0.4" in content_type, content_type
        return text, parse_metrics(text)


async def test_metrics_count_what_happened(client, start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url, HTTP_TOTAL_TIMEOUT="1")
    n_ok, n_502 = 5, 3
    relayed = 0  # response body bytes the upstream sent and the client received
    received = 0  # every response body byte the client received
    # first the 504 (its upstream connection is closed), then the requests that leave a
    # kept-alive connection in the pool
    async with client.get(f"{proxy.url}/slow?delay=5") as resp:  # slower than the 1 s timeout
        await assert_error_json(resp, 504)
        received += len(await resp.read())
    for _ in range(n_ok):
        async with client.get(f"{proxy.url}/files/4k.bin") as resp:
            assert resp.status == 200
            body = await resp.read()
            assert body == sample("4k.bin")
            relayed += len(body)
            received += len(body)
    for _ in range(n_502):
        async with client.get(f"{proxy.url}/status/502") as resp:
            assert resp.status == 502
            body = await resp.read()
            assert json.loads(body) == {"status": 502}  # the upstream's own 502
            relayed += len(body)
            received += len(body)
    total = n_ok + n_502 + 1

    text, families = await scrape(client, proxy.url)

    requests = families["fileproxy_requests"]
    assert requests.type == "counter"
    assert value(requests, "fileproxy_requests_total", status_class="2xx") == n_ok
    assert value(requests, "fileproxy_requests_total", status_class="5xx") == n_502 + 1
    by_class = {
        s.labels["status_class"]: s.value for s in samples(requests, "fileproxy_requests_total")
    }
    assert set(by_class) == {"2xx", "5xx"}, by_class
    upstream_label = samples(requests, "fileproxy_requests_total")[0].labels["upstream"]
    assert upstream_label == f"127.0.0.1:{sample_upstream.port}"

    causes = families["fileproxy_request_terminations"]
    assert causes.type == "counter"
    # an upstream's 502 is delivered as sent: the request ended "ok"; the 504 is a timeout
    expected = {"ok": n_ok + n_502, "timeout": 1, "upstream_error": 0, "client_abort": 0,
                "rejected": 0, "shutdown": 0, "send_timeout": 0,
                "idle_timeout": 0}  # fmt: skip
    got = {
        s.labels["cause"]: s.value for s in samples(causes, "fileproxy_request_terminations_total")
    }
    assert got == expected, got

    histogram = families["fileproxy_request_duration_seconds"]
    assert histogram.type == "histogram"
    per_class = duration_counts(histogram)
    assert sum(per_class.values()) == total
    assert per_class["5xx"] == 4  # three upstream 502s and the 504
    for status_class, count in per_class.items():
        buckets = samples(
            histogram, "fileproxy_request_duration_seconds_bucket", status_class=status_class
        )
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count
        counts = [b.value for b in buckets]
        assert counts == sorted(counts), counts
    # the 504 alone took the 1 s headers timeout
    assert value(histogram, "fileproxy_request_duration_seconds_sum", status_class="5xx") >= 1.0
    fast_5xx = value(
        histogram, "fileproxy_request_duration_seconds_bucket", status_class="5xx", le="0.5"
    )
    assert fast_5xx <= per_class["5xx"] - 1

    sent = families["fileproxy_response_bytes"]
    assert sent.type == "counter"
    sent_total = value(sent, "fileproxy_response_bytes_total")
    assert sent_total >= relayed, (sent_total, relayed)
    assert value(families["fileproxy_request_bytes"], "fileproxy_request_bytes_total") == 0

    in_flight = families["fileproxy_in_flight_requests"]
    assert in_flight.type == "gauge"
    assert value(in_flight, "fileproxy_in_flight_requests") == 0

    connections = families["fileproxy_upstream_connections"]
    assert connections.type == "gauge"
    assert value(connections, "fileproxy_upstream_connections", state="in_use") == 0
    assert value(connections, "fileproxy_upstream_connections", state="idle") >= 1  # keep-alive

    assert value(families["fileproxy_draining"], "fileproxy_draining") == 0
    assert value(families["fileproxy_uvloop_enabled"], "fileproxy_uvloop_enabled") == 1

    # scraping is not traffic: a second scrape counts the same
    _, again = await scrape(client, proxy.url)
    assert sum(duration_counts(again["fileproxy_request_duration_seconds"]).values()) == total
    assert "fileproxy_requests_total" in text

    # every response body byte the client received, the proxy's own JSON error bodies too
    assert sent_total >= received, (
        f"fileproxy_response_bytes_total={sent_total:g} < {received} body bytes received "
        f"({relayed} relayed from the upstream + {received - relayed} of error JSON)"
    )


# --------------------------------------------------------------------------------------------
# 3. admin access
# --------------------------------------------------------------------------------------------

TOKEN = "adm1n-T0ken-for-the-test-4f9c2e"


async def test_admin_endpoints_answer_loopback_by_default(client, start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url)
    async with client.get(f"{proxy.url}/stats") as resp:
        assert resp.status == 200
        assert "performance_optimizer" in await resp.json()
    await scrape(client, proxy.url)


async def _open_endpoints_answer(client: aiohttp.ClientSession, proxy: Process, **headers: str):
    async with client.get(f"{proxy.url}/health", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    await wait_ready(client, proxy.url, 200, "ok", timeout=5)
    async with client.get(f"{proxy.url}/ready", headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def test_admin_endpoints_refuse_peers_outside_admin_allow(
    client, start_proxy, sample_upstream
):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_ADMIN_ALLOW="10.0.0.0/8")
    for path in ("/stats", "/metrics"):
        async with client.get(f"{proxy.url}{path}", headers={"X-Request-ID": "adm-1"}) as resp:
            body = await assert_error_json(resp, 403)
            assert body["request_id"] == "adm-1"
            assert body["error"] == "forbidden"
            assert "fileproxy_" not in json.dumps(body)
    await _open_endpoints_answer(client, proxy)


async def test_admin_token_opens_admin_endpoints_and_is_never_shown(
    client, start_proxy, sample_upstream
):
    proxy = start_proxy(
        sample_upstream.url, FILEPROXY_ADMIN_ALLOW="10.0.0.0/8", FILEPROXY_ADMIN_TOKEN=TOKEN
    )
    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/stats", "/metrics"):
        async with client.get(f"{proxy.url}{path}", headers=good) as resp:
            assert resp.status == 200, await resp.text()
        for bad in (f"Bearer {TOKEN}x", "Bearer wrong", f"Basic {TOKEN}", "Bearer"):
            async with client.get(f"{proxy.url}{path}", headers={"Authorization": bad}) as resp:
                await assert_error_json(resp, 403)
        async with client.get(f"{proxy.url}{path}") as resp:
            await assert_error_json(resp, 403)
    async with client.get(f"{proxy.url}/metrics", headers=good) as resp:
        families = parse_metrics(await resp.text())
        assert "fileproxy_requests" in families

    # /health and /ready are open with or without (any) token
    await _open_endpoints_answer(client, proxy)
    await _open_endpoints_answer(client, proxy, Authorization="Bearer wrong")

    async with client.get(f"{proxy.url}/health") as resp:
        health_text = await resp.text()
    assert TOKEN not in health_text
    assert json.loads(health_text)["config"]["FILEPROXY_ADMIN_TOKEN"] == "***"

    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FILEPROXY_", "HTTP_", "REDIS_"))
    }
    env.update(proxy.env)
    for fmt in ("env", "json"):
        result = subprocess.run(
            [sys.executable, "-m", "fileproxy", "config", "--format", fmt],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert TOKEN not in result.stdout + result.stderr
        assert "FILEPROXY_ADMIN_TOKEN" in result.stdout
        if fmt == "json":
            assert json.loads(result.stdout)["FILEPROXY_ADMIN_TOKEN"] == "***"
        else:
            assert "FILEPROXY_ADMIN_TOKEN=***" in result.stdout

    # a proxied request carrying the token, then the whole log
    async with client.get(f"{proxy.url}/files/hello.txt", headers=good) as resp:
        assert resp.status == 200
    proxy.stop()
    assert TOKEN not in proxy.log_text()
    # the log was written (the token-bearing requests are in it), so the check means something
    logged = [
        line for line in log_lines(proxy.log_text()) if line.get("logger") == "fileproxy.access"
    ]
    assert any(line.get("path") == "/files/hello.txt" for line in logged), proxy.log_text()
    assert any(line.get("path") == "/metrics" and line.get("status") == 200 for line in logged)


# --------------------------------------------------------------------------------------------
# 4. the access log
# --------------------------------------------------------------------------------------------


def assert_access_line(line: dict[str, Any]) -> None:
    missing = ACCESS_FIELDS - set(line)
    assert not missing, (missing, line)
    assert line["logger"] == "fileproxy.access", line
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0, line


async def test_access_log_on_stdout_other_logs_on_stderr_and_in_log_dir(
    client, start_split_proxy, sample_upstream, tmp_dir
):
    log_dir = tmp_dir / "logs"
    proxy = start_split_proxy(sample_upstream.url, FILEPROXY_LOG_DIR=str(log_dir))

    # a normal GET: the proxy makes up a request id
    async with client.get(f"{proxy.url}/files/64k.bin") as resp:
        assert resp.status == 200
        body = await resp.read()
        generated_id = resp.headers["X-Request-ID"]
    line = await proxy.wait_for_line(generated_id)
    assert_access_line(line)
    assert line["msg"] == "request"
    assert line["method"] == "GET"
    assert line["path"] == "/files/64k.bin"
    assert line["status"] == 200
    assert line["upstream"] == f"127.0.0.1:{sample_upstream.port}"
    assert line["upstream_status"] == 200
    assert isinstance(line["ttfb_ms"], int | float) and 0 < line["ttfb_ms"] <= line["duration_ms"]
    assert line["bytes_in"] == 0
    assert line["bytes_out"] == len(body) == 65536
    assert line["cause"] == "ok"

    # an upload with the client's own request id, which is forwarded upstream
    upload = b"u" * 1000
    async with client.post(
        f"{proxy.url}/echo?x=1", data=upload, headers={"X-Request-ID": "client-id-42"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "client-id-42"
        echoed = await resp.json()
        echo_bytes = len(await resp.read())
    upstream_saw = [v for k, v in echoed["headers"] if k.lower() == "x-request-id"]
    assert upstream_saw == ["client-id-42"], echoed["headers"]
    assert echoed["body_length"] == 1000
    line = await proxy.wait_for_line("client-id-42")
    assert_access_line(line)
    assert line["method"] == "POST"
    assert line["path"] == "/echo?x=1"
    assert line["status"] == 200 and line["upstream_status"] == 200
    assert line["bytes_in"] == 1000
    assert line["bytes_out"] == echo_bytes
    assert line["cause"] == "ok"

    # exactly one line per proxied request
    assert len(proxy.lines_for(generated_id)) == 1
    assert len(proxy.lines_for("client-id-42")) == 1

    returncode = proxy.stop()
    assert returncode == 0

    stdout_lines = proxy.stdout_text().splitlines()
    stderr_lines = proxy.stderr_text().splitlines()
    # stdout: access lines only
    for parsed in proxy.access_lines():
        assert parsed["logger"] == "fileproxy.access", parsed
    # stderr: the rest, never an access line
    stderr_parsed = log_lines(proxy.stderr_text())
    assert any(p.get("msg") == "fileproxy worker started" for p in stderr_parsed), stderr_lines
    assert not any(p.get("logger") == "fileproxy.access" for p in stderr_parsed), stderr_lines
    assert "fileproxy worker started" not in proxy.stdout_text()
    assert "client-id-42" not in proxy.stderr_text()

    # FILEPROXY_LOG_DIR: the same lines in access.log and error.log
    access_file = log_dir / "access.log"
    error_file = log_dir / "error.log"
    assert access_file.exists() and error_file.exists(), list(log_dir.iterdir())
    assert access_file.read_text().splitlines() == stdout_lines
    assert error_file.read_text().splitlines() == stderr_lines


async def test_access_log_causes(client, start_split_proxy, sample_upstream):
    proxy = start_split_proxy(
        sample_upstream.url, FILEPROXY_MAX_BODY_SIZE="1024", HTTP_TOTAL_TIMEOUT="1"
    )

    # ok
    async with client.get(f"{proxy.url}/files/hello.txt", headers={"X-Request-ID": "c-ok"}) as r:
        assert r.status == 200
        await r.read()
    line = await proxy.wait_for_line("c-ok")
    assert_access_line(line)
    assert (line["status"], line["cause"]) == (200, "ok")

    # rejected: a body over FILEPROXY_MAX_BODY_SIZE
    async with client.post(
        f"{proxy.url}/echo", data=b"x" * 5000, headers={"X-Request-ID": "c-413"}
    ) as resp:
        await assert_error_json(resp, 413)
    line = await proxy.wait_for_line("c-413")
    assert_access_line(line)
    assert (line["status"], line["cause"], line["method"]) == (413, "rejected", "POST")
    assert line["upstream_status"] is None

    # rejected: an absolute-form target, written on a raw socket
    status, headers, body = await raw_exchange(
        proxy.port,
        b"GET http://evil.example/secret HTTP/1.1\r\nHost: evil.example\r\n"
        b"X-Request-ID: c-absolute\r\nConnection: close\r\n\r\n",
    )
    assert status == 400, body
    assert set(json.loads(body)) == ERROR_KEYS
    assert headers["x-request-id"] == "c-absolute"
    line = await proxy.wait_for_line("c-absolute")
    assert_access_line(line)
    assert (line["status"], line["cause"]) == (400, "rejected")
    assert line["path"] == "http://evil.example/secret"
    assert line["upstream_status"] is None

    # timeout: the upstream is slower than HTTP_TOTAL_TIMEOUT
    async with client.get(f"{proxy.url}/slow?delay=5", headers={"X-Request-ID": "c-504"}) as resp:
        await assert_error_json(resp, 504)
    line = await proxy.wait_for_line("c-504")
    assert_access_line(line)
    assert (line["status"], line["cause"]) == (504, "timeout")
    assert line["upstream_status"] is None

    # client_abort: the client disconnects mid-download
    resp = await client.get(f"{proxy.url}/files/256m.bin", headers={"X-Request-ID": "c-abort"})
    assert resp.status == 200
    read = 0
    while read < 2 << 20:
        read += len(await resp.content.read(65536))
    resp.close()
    line = await proxy.wait_for_line("c-abort")
    await asyncio.sleep(1.0)  # time for a second line, which must not come
    lines = proxy.lines_for("c-abort")
    assert len(lines) == 1, lines
    line = lines[0]
    assert_access_line(line)
    assert line["msg"] == "client disconnected"
    assert line["cause"] == "client_abort"
    assert line["upstream_status"] == 200
    assert 0 < line["bytes_out"] < 256 << 20

    for request_id in ("c-ok", "c-413", "c-absolute", "c-504"):
        assert len(proxy.lines_for(request_id)) == 1, request_id
    for parsed in proxy.access_lines():
        assert parsed["logger"] == "fileproxy.access", parsed


async def test_access_log_upstream_error_on_connect_refused(client, start_split_proxy):
    dead_port = free_port()
    proxy = start_split_proxy(f"http://127.0.0.1:{dead_port}")
    async with client.get(f"{proxy.url}/files/a.bin", headers={"X-Request-ID": "c-502"}) as resp:
        body = await assert_error_json(resp, 502)
        assert body["request_id"] == "c-502"
    line = await proxy.wait_for_line("c-502")
    assert_access_line(line)
    assert (line["status"], line["cause"]) == (502, "upstream_error")
    assert line["upstream"] == f"127.0.0.1:{dead_port}"
    assert line["upstream_status"] is None
    assert line["ttfb_ms"] is None
    assert isinstance(line["bytes_out"], int) and line["bytes_in"] == 0
    assert len(proxy.lines_for("c-502")) == 1
    # the warning about the failure is on stderr, not in the access log
    warnings = [p for p in log_lines(proxy.stderr_text()) if p.get("request_id") == "c-502"]
    assert warnings and all(p["logger"] != "fileproxy.access" for p in warnings), warnings
