"""bench.client_trials: what it parses and compares, and its upload sink (a real process)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

from bench.client_trials import EXPLAINED, REPO, _multipart_parts, render
from tests.conftest import free_port, wait_for_port


def test_multipart_parts_are_the_exact_bytes_of_each_range() -> None:
    # as nginx writes multipart/byteranges: CRLF before each boundary, none in the data
    body = (
        b"\r\n--00000000000000000001\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Range: bytes 0-3/100\r\n\r\nab\r\n"
        b"\r\n--00000000000000000001\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Range: bytes 10-11/100\r\n\r\nxy"
        b"\r\n--00000000000000000001--\r\n"
    )
    parts = _multipart_parts("multipart/byteranges; boundary=00000000000000000001", body)
    assert parts == [("bytes 0-3/100", b"ab\r\n"), ("bytes 10-11/100", b"xy")]


def test_each_difference_is_listed_with_its_reason_or_as_not_explained() -> None:
    meta = dict.fromkeys(
        ("command", "date", "commit", "old", "machine", "load_before", "load_after", "clients"),
        "x",
    )
    explained = next(key for key in EXPLAINED if key[2] == "nginx")
    trial, entry, _ = explained
    results = {
        trial: {
            "nginx": ({entry: 1, "other": "a"}, {}),
            "fp": ({entry: 2, "other": "b"}, {}),
            "old": ({entry: 2, "other": "b"}, {}),
        }
    }
    report = render(results, ["nginx", "fp", "old"], meta)
    row = next(line for line in report.splitlines() if line.startswith(f"| {trial} | {entry} |"))
    assert EXPLAINED[explained] in row
    other = next(line for line in report.splitlines() if line.startswith(f"| {trial} | other |"))
    assert "**not explained**" in other
    table_row = next(
        line for line in report.splitlines() if line.startswith("| ") and "same" in line
    )
    assert table_row.endswith(
        "| **different**: " + ", ".join(sorted([entry, "other"])) + " | same |"
    )


def test_the_upload_sink_counts_and_hashes_content_length_and_chunked_bodies() -> None:
    port = free_port()
    popen = subprocess.Popen(
        [sys.executable, "-m", "bench.client_trials", "--upload-sink", str(port)],
        cwd=REPO,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        data = os.urandom(300_000)
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(piece), piece)
            for piece in (data[:100_000], data[100_000:250_000], data[250_000:])
        )
        for framing, body in (
            (b"Content-Length: %d" % len(data), data),
            (b"Transfer-Encoding: chunked", chunked + b"0\r\n\r\n"),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    b"PUT /x%%20y HTTP/1.1\r\nHost: h\r\nConnection: close\r\n%s\r\n\r\n%s"
                    % (framing, body)
                )
                answer = b""
                while piece := sock.recv(65536):
                    answer += piece
            seen = json.loads(answer.partition(b"\r\n\r\n")[2])
            assert seen["raw_path"] == "/x%20y"
            assert seen["bytes"] == len(data)
            assert seen["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        os.killpg(popen.pid, signal.SIGTERM)
        popen.wait(10)
