"""bench.cache: its client counts a short body as a failure and times the first body byte;
the backend's bytes are read from its access log; the report puts fileproxy against nginx."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from pathlib import Path

from bench.cache import backend_bytes, fetch, report

BODY = bytes(range(256)) * 4


async def _serve(handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_body_shorter_than_its_length_is_an_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + BODY[:500])
        await writer.drain()
        writer.close()

    server, port = await _serve(cut)
    async with server:
        got = await fetch(port, "/x", deadline_s=10)
    assert got.status == 200
    assert got.received == 500
    assert got.error == "short body: 500 of 1024"


async def test_first_byte_is_the_first_body_byte_and_the_body_is_hashed() -> None:
    async def slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nCache-Status: x; hit\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # the head at once, the body later: nginx's lock waiters
        writer.write(BODY)
        await writer.drain()
        writer.close()

    server, port = await _serve(slow_body)
    async with server:
        got = await fetch(port, "/x", keep=True, deadline_s=10)
    assert got.error is None
    assert got.body == BODY
    assert got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert got.cache == "x; hit"
    assert got.head_s is not None and got.first_s is not None
    assert got.first_s - got.head_s >= 0.25


def test_backend_bytes_sums_the_object_lines_of_the_access_log(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("/obj.bin 200 8388608\n/not-there 404 153\n/obj.bin 206 4194304\n")
    assert backend_bytes(log) == (2, 8388608 + 4194304)
    assert backend_bytes(tmp_path / "none.log") == (0, 0)


def test_the_hits_table_gives_the_ratio_to_nginx() -> None:
    def run(rps: float, cpu: float) -> dict[str, float]:
        return {"rps": rps, "mib_per_s": rps, "p99_ms": 1.0, "cpu_us_per_req": cpu,
                "cpu_pct": 90.0, "errors": 0}  # fmt: skip

    results = {
        "load_start": "0.10",
        "hits": {
            "runs": {
                "nginx": {"1m": [run(2000, 100), run(2200, 110), run(1800, 90)]},
                "fileproxy": {"1m": [run(1000, 300), run(1100, 330), run(900, 270)]},
            },
            "backend_bytes_during": {"/1m.bin": 0},
            "warm_cache_status": {},
        },
    }
    args = argparse.Namespace(rate=16.0, connections=16, duration=5.0, runs=3, sizes=["1m"])
    text = report(results, args, "python -m bench.cache --workloads hits")
    row = next(line for line in text.splitlines() if line.startswith("| 1 MiB | fileproxy"))
    assert "| 1,000 (900-1,100) |" in row
    assert row.endswith("| 0.50x | 3.00x |")
