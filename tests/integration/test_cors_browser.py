"""CORS proven in a real browser: headless Chromium fetches through the proxy across origins.

A page served from another origin (a small aiohttp app on its own port) fetches a byte
range of a sample file through the proxy with a custom header, so the browser must send
a preflight; the page writes what it got (the bytes as hex, Content-Range and ETag, which
are readable only when exposed) into the DOM, which Chromium dumps. From an origin that
is not allowed the same fetch fails; without FILEPROXY_CORS_ORIGINS no Access-Control-*
header is ever sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import json
import os
import re
import shutil
import signal
import tempfile
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fileproxy.sample_upstream import FILES, etag_for, file_bytes
from tests.conftest import Process

CHROMIUM_TIMEOUT_S = 60.0
RANGE_START, RANGE_END = 100, 199  # inclusive, as in the Range header

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pending</title></head>
<body><pre id="result">pending</pre>
<script>
const PROXY = {proxy};
function hex(bytes) {{
  return Array.from(bytes, b => b.toString(16).padStart(2, '0')).join('');
}}
(async () => {{
  const out = document.getElementById('result');
  try {{
    const resp = await fetch(PROXY + '/files/64k.bin', {{
      headers: {{'Range': 'bytes={start}-{end}', 'X-Test': '1'}},
    }});
    const bytes = new Uint8Array(await resp.arrayBuffer());
    let sha256 = null;
    if (window.crypto && crypto.subtle) {{
      sha256 = hex(new Uint8Array(await crypto.subtle.digest('SHA-256', bytes)));
    }}
    out.textContent = JSON.stringify({{
      ok: true,
      status: resp.status,
      length: bytes.length,
      hex: hex(bytes),
      sha256: sha256,
      contentRange: resp.headers.get('Content-Range'),
      etag: resp.headers.get('ETag'),
      requestId: resp.headers.get('X-Request-ID'),
      secure: window.isSecureContext,
    }});
    document.title = 'done';
  }} catch (e) {{
    out.textContent = JSON.stringify({{ok: false, error: String(e)}});
    document.title = 'failed';
  }}
}})();
</script>
</body></html>
"""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    pytest.fail("chromium is required: apt-get install -y chromium")


async def dump_dom(url: str) -> str:
    """Load ``url`` in headless Chromium (as the probe on this machine does); the final DOM."""
    with tempfile.TemporaryDirectory(prefix="fileproxy-chromium-") as user_data_dir:
        proc = await asyncio.create_subprocess_exec(
            chromium_path(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={user_data_dir}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its helper processes share our child's group
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group of the process we started
            await proc.wait()
            raise AssertionError(f"chromium did not finish within {CHROMIUM_TIMEOUT_S}s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    dom = stdout.decode(errors="replace")
    assert proc.returncode == 0 and "<pre" in dom, (
        f"chromium exited {proc.returncode}\nstdout:\n{dom}\nstderr:\n"
        f"{stderr.decode(errors='replace')[-3000:]}"
    )
    return dom


def page_result(dom: str) -> dict[str, Any]:
    match = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert match, dom
    text = html.unescape(match.group(1))
    assert text != "pending", f"the page's script did not finish:\n{dom}"
    result: dict[str, Any] = json.loads(text)
    return result


async def start_page_server(start_backend: Any, target: dict[str, str]) -> Any:
    """An aiohttp app on its own port (its own origin) serving the page that fetches."""

    async def page(request: web.Request) -> web.Response:
        body = PAGE.format(proxy=json.dumps(target["proxy"]), start=RANGE_START, end=RANGE_END)
        return web.Response(
            text=body, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    app = web.Application()
    app.router.add_get("/", page)
    return await start_backend(app)


def access_lines(proxy: Process) -> list[dict[str, Any]]:
    lines = []
    for raw in proxy.log_text().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("logger") == "fileproxy.access":
            lines.append(line)
    return lines


def requests_for(proxy: Process, method: str, path: str) -> list[dict[str, Any]]:
    return [
        line
        for line in access_lines(proxy)
        if line.get("method") == method and line.get("path") == path
    ]


async def wait_for_requests(
    proxy: Process, method: str, path: str, count: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(found := requests_for(proxy, method, path)) < count:
        if loop.time() > deadline:
            raise AssertionError(
                f"{count} {method} {path} access lines expected:\n{proxy.log_text()}"
            )
        await asyncio.sleep(0.05)
    return found


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


async def test_cross_origin_range_fetch_in_chromium(
    start_backend, start_proxy, sample_upstream, client
):
    target: dict[str, str] = {}
    page_server = await start_page_server(start_backend, target)
    page_origin = f"http://127.0.0.1:{page_server.port}"
    proxy = start_proxy(sample_upstream.url, FILEPROXY_CORS_ORIGINS=page_origin)
    target["proxy"] = proxy.url

    expected = b"".join(file_bytes("64k.bin", RANGE_START, RANGE_END + 1))
    assert len(expected) == 100

    result = page_result(await dump_dom(f"{page_origin}/"))
    assert result["ok"] is True, result
    assert result["status"] == 206, result
    assert result["length"] == 100, result
    assert result["hex"] == expected.hex(), result
    assert result["secure"] is True, result  # 127.0.0.1 is a secure context: crypto.subtle
    assert result["sha256"] == hashlib.sha256(expected).hexdigest(), result
    # readable from JS only because the proxy exposes them
    assert result["contentRange"] == f"bytes {RANGE_START}-{RANGE_END}/{FILES['64k.bin']}"
    assert result["etag"] == etag_for("64k.bin"), result
    assert result["requestId"], result

    # the custom X-Test header forced a preflight, which the proxy answered with success
    preflights = await wait_for_requests(proxy, "OPTIONS", "/files/64k.bin", 1)
    assert len(preflights) == 1, preflights
    assert 200 <= preflights[0]["status"] < 300, preflights
    gets = await wait_for_requests(proxy, "GET", "/files/64k.bin", 1)
    assert len(gets) == 1, gets
    assert gets[0]["status"] == 206
    assert gets[0]["request_id"] == result["requestId"]
    assert gets[0]["cause"] == "ok"

    # the same preflight from a plain client: what the browser was told
    async with client.options(
        f"{proxy.url}/files/64k.bin",
        headers={
            "Origin": page_origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "range,x-test",
        },
    ) as resp:
        assert 200 <= resp.status < 300, await resp.text()
        assert resp.headers["Access-Control-Allow-Origin"] == page_origin
        allowed = resp.headers.get("Access-Control-Allow-Headers", "").lower()
        assert "x-test" in allowed and "range" in allowed, resp.headers
    async with client.get(
        f"{proxy.url}/files/64k.bin", headers={"Origin": page_origin, "Range": "bytes=0-9"}
    ) as resp:
        assert resp.status == 206
        assert resp.headers["Access-Control-Allow-Origin"] == page_origin
        exposed = {
            h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"].split(",")
        }
        assert {"content-range", "etag"} <= exposed, exposed


async def test_cross_origin_fetch_from_an_origin_not_allowed_fails_in_chromium(
    start_backend, start_proxy, sample_upstream
):
    target: dict[str, str] = {}
    allowed_page = await start_page_server(start_backend, target)
    other_page = await start_page_server(start_backend, target)  # another port: another origin
    assert other_page.port != allowed_page.port
    proxy = start_proxy(
        sample_upstream.url, FILEPROXY_CORS_ORIGINS=f"http://127.0.0.1:{allowed_page.port}"
    )
    target["proxy"] = proxy.url

    result = page_result(await dump_dom(f"http://127.0.0.1:{other_page.port}/"))
    assert result["ok"] is False, result
    assert "fetch" in result["error"].lower() or "TypeError" in result["error"], result

    # the browser asked (preflight) and was refused, so it never sent the GET
    preflights = await wait_for_requests(proxy, "OPTIONS", "/files/64k.bin", 1)
    assert not any(200 <= line["status"] < 300 for line in preflights), preflights
    await asyncio.sleep(0.5)
    assert requests_for(proxy, "GET", "/files/64k.bin") == [], proxy.log_text()


async def test_without_cors_origins_no_access_control_headers(start_proxy, sample_upstream, client):
    proxy = start_proxy(sample_upstream.url)
    origin = "http://127.0.0.1:1"

    def access_control(resp: aiohttp.ClientResponse) -> dict[str, str]:
        return {k: v for k, v in resp.headers.items() if k.lower().startswith("access-control-")}

    async with client.get(
        f"{proxy.url}/files/64k.bin", headers={"Origin": origin, "Range": "bytes=100-199"}
    ) as resp:
        assert resp.status == 206
        assert await resp.read() == b"".join(file_bytes("64k.bin", 100, 200))
        assert access_control(resp) == {}, dict(resp.headers)
    async with client.options(
        f"{proxy.url}/files/64k.bin",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "range,x-test",
        },
    ) as resp:
        await resp.read()
        assert access_control(resp) == {}, (resp.status, dict(resp.headers))
    for path in ("/health", "/ready", "/stats", "/metrics"):
        async with client.get(f"{proxy.url}{path}", headers={"Origin": origin}) as resp:
            await resp.read()
            assert access_control(resp) == {}, (path, dict(resp.headers))
