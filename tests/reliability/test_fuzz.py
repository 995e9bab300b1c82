"""A hypothesis-driven fuzzer against the running daemon, for a bounded time.

Random request lines and header blocks (valid, nearly valid and garbage) go to
the real daemon over raw sockets. Every one must end within a few seconds with a
response other than 500 or with a close — never a hang — and afterwards the
daemon is alive, logged no unhandled exception and serves a file normally.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S", "45"))

TOKEN = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=10)
NAME = st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True)
METHODS = st.one_of(
    st.sampled_from(
        ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PRI"]
    ),
    st.sampled_from(["GET", "HEAD"]),
    TOKEN,
)
TARGETS = st.one_of(
    st.sampled_from(
        ["/", "/files/4k.bin", "*", "http://evil.example/", "evil.example:443", "//evil/x",
         "/%2e%2e/%2f%00", "/a?b=c#d", ""]
    ),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(
        lambda t: "/" + t
    ),
    st.text(max_size=20).map(lambda t: "/" + t),
    TOKEN,
)  # fmt: skip
VERSIONS = st.sampled_from(
    ["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "http/1.1", "", "HTTP/11"]
)
# framing headers are left out: a random Content-Length would wait for its body, by design
NAMES = st.one_of(
    st.sampled_from(
        ["Host", "Connection", "Upgrade", "Expect", "Range", "X-Request-ID", "Cookie",
         "Accept-Encoding", "Forwarded", "X-Forwarded-For", "Sec-WebSocket-Key1", "TE"]
    ),
    NAME,
    NAME,
    TOKEN,
).filter(lambda n: n.strip().lower() not in ("content-length", "transfer-encoding"))  # fmt: skip
ASCII = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
SPECIAL = st.sampled_from(
    ["close", "keep-alive", "100-continue", "websocket", "bytes=0-1,5-", "h2c"]
)
VALUES = st.one_of(ASCII, ASCII, ASCII, st.text(max_size=20), SPECIAL)
SEPS = st.sampled_from(["\r\n"] * 20 + ["\n", "\r", "\r\n ", "\r\n\t"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    sep = draw(SEPS)
    line = f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}"
    if draw(st.integers(0, 9)) == 0:
        line = line.replace(" ", draw(st.sampled_from(["  ", "\t", ""])), 1)
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    if draw(st.integers(0, 4)):
        headers.insert(0, ("Host", "fuzz.test"))
    head = line + sep + "".join(f"{n}: {v}{draw(SEPS)}" for n, v in headers) + "\r\n"
    raw = head.encode("utf-8", "surrogateescape")
    if draw(st.integers(0, 9)) == 0:
        raw = draw(st.binary(min_size=1, max_size=200))
    return raw


def _exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``; return the response head (or what came before the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            return b""
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            except TimeoutError:
                raise AssertionError(f"no answer and no close within 5 s for {raw!r}") from None
            if not chunk:
                return data
            data += chunk
        return data


@pytest.mark.slow
def test_fuzzed_requests_never_500_hang_or_crash(start_proxy, sample_upstream):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_HEADER_TIMEOUT="0.2")
    deadline = time.monotonic() + BUDGET_S
    statuses: dict[int, int] = {}

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def one(raw: bytes) -> None:
        if time.monotonic() > deadline:
            return
        head = _exchange(proxy.port, raw)
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        statuses[status] = statuses.get(status, 0) + 1
        if status:
            assert status != 500, (raw, head)
        assert proxy.popen.poll() is None, "the daemon died"

    while time.monotonic() < deadline:
        one()  # a fresh random batch each time (no database, not derandomized)
    print("statuses:", dict(sorted(statuses.items())))
    assert sum(statuses.values()) > 100
    assert proxy.popen.poll() is None
    with urllib.request.urlopen(f"{proxy.url}/files/4k.bin", timeout=10) as resp:
        assert resp.status == 200 and len(resp.read()) == 4096
    log = proxy.log_text()
    assert "Traceback" not in log and "Unhandled exception" not in log, log[-3000:]
