"""Bytes that are not UTF-8 in what a client sends, against the real daemon and a raw socket.

aiohttp hands a header value or target that is not UTF-8 over as a string with lone
surrogates, which neither orjson nor a UTF-8 encoder writes. Every such byte is logged
as ``\\xHH``; the line of such a request is written like any other, and neither it nor
the requests after it (on the same keep-alive connection or others) lose their lines.
A method or target with such bytes is refused by the parser: a 400, logged too.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

from tests.conftest import Process

HIGH = bytes(range(0x80, 0x100))  # every byte above ASCII, none of them UTF-8 as a run
ESCAPED = "".join(f"\\x{b:02x}" for b in HIGH)  # how the access line writes them
HEADERS = ("User-Agent", "Referer", "X-Forwarded-For", "X-Request-ID", "Host", "Cookie")
NORMAL = b"GET /files/hello.txt HTTP/1.1\r\nHost: proxy\r\nUser-Agent: plain\r\n\r\n"


def request_with(header: str, value: bytes) -> bytes:
    head = b"GET /files/hello.txt HTTP/1.1\r\n"
    if header != "Host":
        head += b"Host: proxy\r\n"
    return head + header.encode() + b": " + value + b"\r\n\r\n"


def exchange(sock: socket.socket, request: bytes) -> int:
    """Send one request and read its whole response; its status, or 0 if the connection
    was closed before a whole response arrived."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        body += chunk
    assert len(body) == length, "a pipelined answer arrived: only one request at a time here"
    return int(lines[0].split()[1])


def still_open(sock: socket.socket) -> bool:
    """No EOF and no reset waiting on the connection."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        sock.setblocking(True)


def access_lines(proxy: Process, fmt: str) -> list[str]:
    text = proxy.log_path.read_bytes().decode()  # strict: a log line is always UTF-8
    if fmt == "json":
        lines = [line for line in text.splitlines() if line.startswith("{")]
        return [line for line in lines if json.loads(line)["logger"] == "fileproxy.access"]
    return [line for line in text.splitlines() if " INFO fileproxy.access: " in line]


def wait_for_lines(proxy: Process, fmt: str, count: int) -> list[str]:
    deadline = time.monotonic() + 20  # lines are written in batches, ~1 s apart
    while len(lines := access_lines(proxy, fmt)) < count:
        assert time.monotonic() < deadline, (
            f"{len(lines)} access lines of {count}:\n{proxy.log_text()[-3000:]}"
        )
        time.sleep(0.2)
    return lines


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_bytes_that_are_not_utf8_are_escaped_and_block_no_line(start_proxy, sample_upstream, fmt):
    proxy = start_proxy(sample_upstream.url, FILEPROXY_LOG_FORMAT=fmt)
    address = ("127.0.0.1", proxy.port)
    expected = 0  # access lines
    # every header with every high byte, each followed by a plain request, and then
    # enough plain requests to pass the 32 KiB batch, all on one keep-alive connection
    with socket.create_connection(address, timeout=10) as kept:
        for header in HEADERS:
            value = b"caf" + HIGH
            assert exchange(kept, request_with(header, value)) == 200, header
            assert exchange(kept, NORMAL) == 200, f"after {header}"
            expected += 2
        for i in range(150):
            assert exchange(kept, NORMAL) == 200, f"plain request {i} after the bytes"
            expected += 1
        # a method or a target that is not a token / not ASCII: the parser's 400 (and close)
        for bad in (b"G" + HIGH[:8] + b"T /files/hello.txt", b"GET /files/" + HIGH):
            with socket.create_connection(address, timeout=10) as other:
                assert exchange(other, bad + b" HTTP/1.1\r\nHost: proxy\r\n\r\n") == 400
                expected += 1
        # other connections, then the kept one again: logged, never force-closed
        for _ in range(3):
            with socket.create_connection(address, timeout=10) as other:
                assert exchange(other, NORMAL) == 200
                expected += 1
        assert exchange(kept, NORMAL) == 200
        expected += 1
        lines = wait_for_lines(proxy, fmt, expected)
        assert still_open(kept), "the keep-alive connection was closed by the proxy"
    assert len(lines) == expected, lines[expected:]

    log = proxy.log_text()
    assert "Traceback" not in log and "Unhandled exception" not in log, log[-3000:]
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        agents = [r["user_agent"] for r in records if r["user_agent"] not in (None, "plain")]
        assert agents == ["caf" + ESCAPED], agents
        assert sum(r["status"] == 400 for r in records) == 2
        assert sum(r["status"] == 200 for r in records) == expected - 2
    else:
        assert sum(f"user_agent=caf{ESCAPED} " in line for line in lines) == 1
        assert sum(" status=400 " in line for line in lines) == 2


def test_header_bytes_that_are_not_utf8_reach_the_upstream_unchanged(start_proxy, sample_upstream):
    """A header value is forwarded byte for byte, as nginx does: aiohttp's serializer
    dropped every byte that is not UTF-8 (``User-Agent: caf\\xe9`` arrived as ``caf``)."""
    proxy = start_proxy(sample_upstream.url)
    value = b"caf" + HIGH + b" \xc3\xa9 end"  # the high bytes, then valid UTF-8 after them
    request = (
        b"GET /echo HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"User-Agent: " + value + b"\r\nReferer: http://x/" + HIGH[:4] + b"\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = {name.lower(): v.encode("latin-1") for name, v in json.loads(body)["headers"]}
    assert seen["user-agent"] == value
    assert seen["referer"] == b"http://x/" + HIGH[:4]


def test_header_bytes_that_are_not_utf8_reach_the_client_unchanged(start_proxy):
    """A backend's header value is relayed byte for byte, as nginx does: a Latin-1 file
    name in ``Content-Disposition`` reached the client as ``caf.txt``."""
    disposition = b'attachment; filename="caf' + HIGH[:4] + b'.txt"'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Disposition: "
        + disposition
        + b"\r\nConnection: close\r\n\r\nok"
    )
    listener = socket.create_server(("127.0.0.1", 0))

    def backend() -> None:  # answers every request on every connection (probes get EOF)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    received = b""
                    while b"\r\n\r\n" not in received and (chunk := conn.recv(65536)):
                        received += chunk
                    if b"\r\n\r\n" in received:
                        conn.sendall(answer)

    threading.Thread(target=backend, daemon=True).start()
    try:
        proxy = start_proxy(f"http://127.0.0.1:{listener.getsockname()[1]}")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"GET /file HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    finally:
        listener.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"\r\nContent-Disposition: " + disposition + b"\r\n" in head + b"\r\n", head
    assert body == b"ok"
