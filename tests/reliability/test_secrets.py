"""Secrets never leak: error bodies and /metrics (besides /health, /stats, config, check, logs).

tests/integration/test_endpoints.py proves /health, /stats and the log with a real
Redis; here the same secrets are checked in every error body the proxy writes
(502, 504, edge 400/408/414/431), in /metrics, `fileproxy config` and `fileproxy check`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

from aiohttp import web

from tests.conftest import clean_env, free_port
from tests.reliability.rawhttp import exchange

PASSWORD = "hunter2-s3cret"
USER = "operat0r-name"


async def test_no_secret_in_error_bodies_metrics_config_or_check(
    start_backend, start_proxy, client
):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    backend = await start_backend(app)
    env = {
        "REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",
        "HTTP_TOTAL_TIMEOUT": "0.5",
        "FILEPROXY_HEADER_TIMEOUT": "1",
    }
    good = start_proxy(f"http://{USER}:{PASSWORD}@127.0.0.1:{backend.port}", **env)
    refused = start_proxy(f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}", **env)
    seen: list[bytes] = []
    for proxy in (good, refused):
        for path in ("/slow", "/x", "/health", "/stats", "/metrics"):
            async with client.get(f"{proxy.url}{path}") as resp:
                seen.append(await resp.read())
        host = b"Host: a\r\n"
        for raw in (
            b"GET / HTTP/1.1 junk\r\n" + host + b"\r\n",
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + host + b"X: " + b"a" * 9000 + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + host + b"X-Slow: a",  # 408 after 1 s
        ):
            seen.append(await exchange(proxy.port, raw))
    for args in (["config"], ["config", "--format", "json"], ["check"]):
        result = subprocess.run(
            [sys.executable, "-m", "fileproxy", *args],
            env=clean_env(**good.env),
            capture_output=True,
            timeout=60,
        )
        seen.append(result.stdout + result.stderr)
    seen += [good.log_text().encode(), refused.log_text().encode()]
    assert any(b"502" in s or b"upstream_connect_failed" in s for s in seen)
    assert any(b"upstream_timeout" in s for s in seen)
    assert any(b"request_timeout" in s for s in seen)
    for text in seen:
        assert PASSWORD.encode() not in text, text[:500]
        assert USER.encode() not in text, text[:500]
