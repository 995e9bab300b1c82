"""The edge behaves the same under gunicorn's aiohttp worker as under `fileproxy serve`.

gunicorn's worker builds its own AppRunner from the app; the JSON parser errors,
414/431 and the request head timeout must still be in place there.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.integration.test_deployment import start_gunicorn
from tests.reliability.rawhttp import (
    RecordingBackend,
    assert_json_error,
    exchange,
    parse_response,
)

H = b"Host: fileproxy.test\r\n"


async def test_edge_errors_and_head_timeout_under_gunicorn(start_backend, tmp_dir: Path):
    backend = RecordingBackend()
    server = await start_backend(backend.app())
    gunicorn = start_gunicorn(tmp_dir, server.url, FILEPROXY_HEADER_TIMEOUT="1")
    try:
        cases = [
            (b"GET / HTTP/1.1 junk\r\n" + H + b"\r\n", 400, "bad_request_line"),
            (b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n  folded\r\n\r\n", 400, None),
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, "uri_too_long"),
            (b"GET / HTTP/1.1\r\n" + H + b"X: " + b"v" * 9000 + b"\r\n\r\n", 431, None),
            (b"GET / HTTP/1.1\r\n" + H + b"X-Slow: a", 408, "request_timeout"),
            (b"CONNECT /x HTTP/1.1\r\n" + H + b"\r\n", 405, "method_not_allowed"),
        ]
        for raw, status, error in cases:
            body = assert_json_error(parse_response(await exchange(gunicorn.port, raw)), status)
            assert error is None or body["error"] == error, body
        assert backend.seen == []
        raw = b"GET /ok HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
        assert parse_response(await exchange(gunicorn.port, raw)).status == 200
    finally:
        gunicorn.stop()


def test_listener_keeps_the_backlog_of_gunicorn_conf(start_backend, tmp_dir: Path):
    """aiohttp's worker listens with a backlog of 128; gunicorn.conf.py asks for 2048."""
    ss = shutil.which("ss") or "/usr/sbin/ss"
    assert Path(ss).exists(), "ss is missing: apt-get install -y iproute2"
    gunicorn = start_gunicorn(tmp_dir, "http://127.0.0.1:9")
    try:
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run(
                [ss, "-ltnH", f"sport = :{gunicorn.port}"], capture_output=True, text=True
            ).stdout.split()
            backlog = int(out[2])  # State Recv-Q Send-Q ...: Send-Q of a listener is its backlog
            if backlog == 2048 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert backlog == 2048
    finally:
        gunicorn.stop()
