"""bench.parsers: both contenders are real proxies (bytes in = bytes out), on a real nginx."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.parsers import PARSERS, parse_cost
from bench.run import nginx_conf
from tests.conftest import ROOT, free_port, require_binary, wait_for_port


def stop(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    nginx = require_binary("nginx")
    www = tmp_path / "www"
    www.mkdir()
    (www / "1k.bin").write_bytes(os.urandom(1024))
    (www / "1m.bin").write_bytes(os.urandom(1 << 20))
    port = free_port()
    conf = nginx_conf(tmp_path, "backend", f"server {{ listen 127.0.0.1:{port}; root {www}; }}", 1)
    popen = subprocess.Popen([nginx, "-c", str(conf)], start_new_session=True)
    try:
        wait_for_port(port, process=popen)
        yield port, www
    finally:
        stop(popen)


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """(status, body) of one Content-Length response; what follows stays in ``buffer``."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "closed before a response head"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end]).split(b"\r\n")
    del buffer[:end]
    length = next(
        int(line.split(b":")[1]) for line in head if line.lower().startswith(b"content-length:")
    )
    assert not any(line.lower().startswith(b"connection:") for line in head)  # hop-by-hop dropped
    while len(buffer) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed inside a body"
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return int(head[0].split()[1]), body


@pytest.mark.slow
@pytest.mark.parametrize("parser", PARSERS)
def test_each_contender_proxies_bytes_exactly(parser: str, backend: tuple[int, Path]) -> None:
    if importlib.util.find_spec(parser) is None:
        pytest.fail(f"{parser} is required: .venv/bin/pip install -e '.[test]'")
    backend_port, www = backend
    port = free_port()
    argv = [sys.executable, "-m", "bench.parsers", "--serve", parser, "--port", str(port),
            "--upstream-port", str(backend_port)]  # fmt: skip
    popen = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    try:
        wait_for_port(port, process=popen)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            buffer = bytearray()
            get = b"GET /%s HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
            # pipelined: answered in order on one connection, bodies as the files are
            sock.sendall(get % b"1k.bin" + get % b"1m.bin" + get % b"missing")
            assert read_response(sock, buffer) == (200, (www / "1k.bin").read_bytes())
            assert read_response(sock, buffer) == (200, (www / "1m.bin").read_bytes())
            assert read_response(sock, buffer)[0] == 404
            sock.sendall(get % b"1k.bin")  # the same connection, kept alive
            assert read_response(sock, buffer) == (200, (www / "1k.bin").read_bytes())
            assert buffer == bytearray()
    finally:
        stop(popen)


@pytest.mark.parametrize("parser", PARSERS)
def test_parse_cost_measures_the_proxy_code_path(parser: str) -> None:
    request_us, response_us = parse_cost(parser, iterations=200, repeats=1)
    assert 0 < request_us < 10_000 and 0 < response_us < 10_000
