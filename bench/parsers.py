"""Which C parser the data plane should use: httptools (llhttp) or aiohttp's own, in a full path.

Each contender is the same minimal protocol-level proxy (one process, uvloop): an
``asyncio.Protocol`` per client connection parses the request head with the parser
under test, rebuilds it without hop-by-hop fields and writes it to a keep-alive
upstream connection from a pool; the upstream protocol finds the end of the response
head, parses that head with the parser under test, rebuilds it the same way for the
client, and forwards the body exactly as received, counting Content-Length (no body
byte ever goes through a parser). Flow control both ways: a paused client transport
pauses the upstream's reading. Only the parsing differs between

- ``httptools``: ``httptools.HttpRequestParser`` (one per client connection) and a
  fresh ``httptools.HttpResponseParser`` per response head (llhttp would otherwise wait
  for the body it was not fed),
- ``aiohttp``: ``aiohttp.http_parser.HttpRequestParser`` / ``HttpResponseParser`` (C,
  ``response_with_body=False`` so one parser per upstream connection takes every head),

plus ``nginx`` (``proxy_pass``, upstream keepalive, 1 worker) as the reference. The
backend is nginx (1 worker) serving static 1 KiB and 1 MiB files. Each contender and
size is measured with ``wrk -t1 -c32 -d5s`` (by default), contenders alternating run by
run (A B C, C B A, ...), 3 runs each; the table gives the medians and the spread of
req/s and of the CPU the contender's process group used per request (utime + stime).

    .venv/bin/python -m bench.parsers [--runs 3] [--duration 5] [--connections 32]
                                      [--sizes 1k,1m] [--contenders httptools,aiohttp,nginx]
                                      [--out bench/results/FILE.md]

One contender alone, for a test or a profile:

    .venv/bin/python -m bench.parsers --serve httptools --port P --upstream-port U
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
PARSERS = ("httptools", "aiohttp")
LABELS = {
    "httptools": "Protocol + httptools (llhttp)",
    "aiohttp": "Protocol + aiohttp's C parsers",
    "nginx": "nginx proxy_pass (reference)",
}
SIZES = {"1k": 1024, "1m": 1 << 20}
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
HEAD_END = b"\r\n\r\n"
REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}  # llhttp keeps no reason

# --- the proxy (one process per contender) ---------------------------------------------


def build_head(first_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A head without hop-by-hop fields (the same work for both parsers)."""
    parts = [first_line]
    for name, value in headers:
        if name.lower() not in HOP_BY_HOP:
            parts.append(name + b": " + value + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class HttptoolsRequestHeads:
    """Feeds client bytes to llhttp; calls ``on_head(method, target, version, headers)``."""

    def __init__(self, on_head: Callable[[bytes, bytes, bytes, list[tuple[bytes, bytes]]], None]):
        import httptools

        self._on_head = on_head
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers, self._headers = self._headers, []
        url, self._url = self._url, b""
        version = parser.get_http_version().encode()
        self._on_head(parser.get_method(), url, version, headers)

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)


class AiohttpRequestHeads:
    """Feeds client bytes to aiohttp's C request parser (bodiless GETs: the heads only)."""

    def __init__(
        self,
        on_head: Callable[[bytes, bytes, bytes, list[tuple[bytes, bytes]]], None],
        protocol: Any,
        loop: asyncio.AbstractEventLoop,
    ):
        from aiohttp.http_parser import HttpRequestParser

        self._on_head = on_head
        self._parser = HttpRequestParser(protocol, loop, 2**16)

    def feed(self, data: bytes) -> None:
        messages, _upgraded, _tail = self._parser.feed_data(data)
        for message, _payload in messages:
            version = f"{message.version[0]}.{message.version[1]}".encode()
            self._on_head(
                message.method.encode(), message.path.encode(), version, list(message.raw_headers)
            )


class HttptoolsResponseHeads:
    """One response head at a time: (status, Content-Length, the head for the client).

    A fresh llhttp parser per head (0.3 µs here): fed the head alone, the previous one
    still waits for the body it was never given.
    """

    def __init__(self) -> None:
        import httptools

        self._new_parser = httptools.HttpResponseParser
        self._headers: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def __call__(self, head: bytes) -> tuple[int, int, bytes]:
        parser = self._new_parser(self)
        parser.feed_data(head)
        headers, self._headers = self._headers, []
        status = parser.get_status_code()
        length = -1
        for name, value in headers:
            if name.lower() == b"content-length":
                length = int(value)
        reason = REASONS.get(status, b"X")
        return status, length, build_head(b"HTTP/1.1 %d %s\r\n" % (status, reason), headers)


class AiohttpResponseHeads:
    def __init__(self, protocol: Any, loop: asyncio.AbstractEventLoop) -> None:
        from aiohttp.http_parser import HttpResponseParser

        self._parser = HttpResponseParser(protocol, loop, 2**16, response_with_body=False)

    def __call__(self, head: bytes) -> tuple[int, int, bytes]:
        messages, _upgraded, _tail = self._parser.feed_data(head)
        message = messages[0][0]
        value = message.headers.get("Content-Length")
        length = int(value) if value is not None else -1
        first = b"HTTP/1.1 %d %s\r\n" % (message.code, message.reason.encode())
        return message.code, length, build_head(first, list(message.raw_headers))


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the backend; leased for one exchange at a time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.head = b""
        self.remaining = -1  # body bytes still to forward; -1: reading a head
        loop = asyncio.get_running_loop()
        self.parse_head: HttptoolsResponseHeads | AiohttpResponseHeads = (
            HttptoolsResponseHeads()
            if proxy.parser == "httptools"
            else AiohttpResponseHeads(self, loop)
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass of it

    def send(self, client: Client, head: bytes) -> None:
        assert self.transport is not None
        self.client = client
        self.transport.write(head)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        if self.remaining < 0:
            data = self.head + data
            end = data.find(HEAD_END)
            if end < 0:
                self.head = data
                return
            self.head = b""
            end += len(HEAD_END)
            _status, length, head = self.parse_head(data[:end])
            if length < 0:
                raise RuntimeError("the bench's backend answers with Content-Length")
            self.remaining = length
            client.transport.write(head)
            data = data[end:]
        if data:
            if len(data) > self.remaining:
                raise RuntimeError("more body than Content-Length")
            client.transport.write(data)  # as received: never through a parser
            self.remaining -= len(data)
        if self.remaining == 0:
            self.remaining = -1
            self.client = None
            self.proxy.idle.append(self)
            client.exchange_done()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.proxy.idle:
            self.proxy.idle.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.abort()  # never a truncated body that looks complete

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class Client(asyncio.Protocol):
    """One client connection: heads in order, one exchange at a time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.pending: deque[bytes] = deque()  # pipelined heads waiting for their turn
        self.upstream: Upstream | None = None
        self.busy = False
        loop = asyncio.get_running_loop()
        self.heads: HttptoolsRequestHeads | AiohttpRequestHeads = (
            HttptoolsRequestHeads(self.on_head)
            if proxy.parser == "httptools"
            else AiohttpRequestHeads(self.on_head, self, loop)
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass of it

    def data_received(self, data: bytes) -> None:
        try:
            self.heads.feed(data)
        except Exception:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()

    def on_head(
        self, method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.pending.append(build_head(method + b" " + target + b" HTTP/1.1\r\n", headers))
        if not self.busy:
            self.next_exchange()

    def next_exchange(self) -> None:
        if not self.pending or self.transport is None:
            return
        head = self.pending.popleft()
        self.busy = True  # one exchange at a time, from the lease to the last body byte
        if self.proxy.idle:
            self.upstream = self.proxy.idle.pop()
            self.upstream.send(self, head)
        else:
            asyncio.get_running_loop().create_task(self.connect_and_send(head))

    async def connect_and_send(self, head: bytes) -> None:
        upstream = await self.proxy.connect()
        self.upstream = upstream
        upstream.send(self, head)

    def exchange_done(self) -> None:
        self.upstream = None
        self.busy = False
        self.next_exchange()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()  # mid-exchange: its rest is nobody's


class Proxy:
    def __init__(self, parser: str, upstream_port: int) -> None:
        self.parser = parser
        self.upstream_port = upstream_port
        self.idle: list[Upstream] = []

    async def connect(self) -> Upstream:
        loop = asyncio.get_running_loop()
        _transport, upstream = await loop.create_connection(
            lambda: Upstream(self), "127.0.0.1", self.upstream_port
        )
        return upstream


async def serve(parser: str, port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    proxy = Proxy(parser, upstream_port)
    server = await loop.create_server(lambda: Client(proxy), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- the measurement ---------------------------------------------------------------------

# what wrk sends and nginx answers, byte for byte but the date
WRK_REQUEST = b"GET /1k.bin HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
NGINX_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 19:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Mon, 07 Dec 2026 18:59:59 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6935cd1f-400"\r\nAccept-Ranges: bytes\r\n\r\n'
)


def connection_cost(iterations: int = 50_000, repeats: int = 5) -> float:
    """µs per exchange of fileproxy/http/connection.py driven as the data plane will drive it
    (head start, wrk's head, end, nginx's response head, body, end; reading and timer asked)."""
    from fileproxy.http.connection import Connection

    request_fields = [(b"Host", b"127.0.0.1:8080")]
    response_fields = [
        (name, value)
        for name, _, value in (line.partition(b": ") for line in NGINX_HEAD.split(b"\r\n")[1:])
        if name
    ]
    conn = Connection()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            conn.receive_head_start()
            exchange = conn.receive_head(b"GET", b"/1k.bin", (1, 1), request_fields)
            assert exchange is not None
            conn.receive_end()
            conn.start_response(exchange, 200, response_fields)
            conn.send_data(exchange, 1024)
            conn.end_response(exchange)
            if not conn.reading or conn.timer is None:
                raise AssertionError("the connection should read, idle")
        best = min(best, time.perf_counter() - started)
    return best / iterations * 1e6


def parse_cost(parser: str, iterations: int = 50_000, repeats: int = 5) -> tuple[float, float]:
    """µs per request head and per response head, each the proxy's own code path
    (parse + rebuild), in this process: the best of ``repeats`` (no event loop runs)."""
    loop = asyncio.new_event_loop()
    try:
        seen: list[int] = []

        def on_head(*_args: object) -> None:
            seen.append(1)

        requests: HttptoolsRequestHeads | AiohttpRequestHeads = (
            HttptoolsRequestHeads(on_head)
            if parser == "httptools"
            else AiohttpRequestHeads(on_head, None, loop)
        )
        responses = (
            HttptoolsResponseHeads() if parser == "httptools" else AiohttpResponseHeads(None, loop)
        )
        best_request = best_response = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(iterations):
                requests.feed(WRK_REQUEST)
            best_request = min(best_request, time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(iterations):
                responses(NGINX_HEAD)
            best_response = min(best_response, time.perf_counter() - started)
        assert len(seen) == iterations * repeats
        return best_request / iterations * 1e6, best_response / iterations * 1e6
    finally:
        loop.close()


def wrk(port: int, path: str, connections: int, duration: int) -> dict[str, float]:
    from bench.hot_path import REPO as _repo

    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "-s", str(_repo / "bench" / "wrk_report.lua"), f"http://127.0.0.1:{port}{path}",
    ]  # fmt: skip
    import json

    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    data = json.loads(line.removeprefix("WRK_JSON "))
    return {
        "rps": data["requests_per_s"],
        "requests": data["requests"],
        "errors": data["errors_total"],
    }


def start_contender(
    key: str, root: Path, backend_port: int, spawn: Callable[..., subprocess.Popen[bytes]]
) -> tuple[int, subprocess.Popen[bytes]]:
    from bench.procs import free_port
    from bench.run import nginx_conf

    port = free_port()
    if key == "nginx":
        body = f"""    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
        conf = nginx_conf(root, "nginx-proxy", body, workers=1)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return port, spawn(key, [nginx, "-c", str(conf)])
    argv = [sys.executable, "-m", "bench.parsers", "--serve", key, "--port", str(port),
            "--upstream-port", str(backend_port)]  # fmt: skip
    return port, spawn(key, argv)


def table(results: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace) -> str:
    import aiohttp
    import httptools
    import uvloop

    from bench.hot_path import cpu_model, git_commit

    lines = [
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; commit {git_commit()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}; "
        f"Python {platform.python_version()}, uvloop {uvloop.__version__}, "
        f"aiohttp {aiohttp.__version__}, httptools {httptools.__version__}",
        f"- command: `.venv/bin/python -m bench.parsers --runs {args.runs} --duration "
        f"{args.duration} --connections {args.connections} --sizes {args.sizes} "
        f"--contenders {args.contenders}`",
        f"- `wrk -t1 -c{args.connections} -d{args.duration}s` on 127.0.0.1, backend nginx "
        f"(1 worker) static files; one process per contender; {args.runs} runs each, "
        "alternating; medians, min-max in brackets",
        "",
        "| size | contender | req/s | CPU µs/req | CPU µs/MiB | errors |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size in args.sizes.split(","):
        for key in args.contenders.split(","):
            runs = results[(key, size)]
            rps = [r["rps"] for r in runs]
            cpu = [r["cpu_us_per_req"] for r in runs]
            per_mib = statistics.median(cpu) * (1 << 20) / SIZES[size] if size != "1k" else None
            lines.append(
                f"| {size.upper().replace('K', ' KiB').replace('M', ' MiB')} | {LABELS[key]} "
                f"| {statistics.median(rps):,.0f} [{min(rps):,.0f}-{max(rps):,.0f}] "
                f"| {statistics.median(cpu):.1f} [{min(cpu):.1f}-{max(cpu):.1f}] "
                f"| {f'{per_mib:,.0f}' if per_mib is not None else '-'} "
                f"| {sum(r['errors'] for r in runs):.0f} |"
            )
    parsers = [k for k in args.contenders.split(",") if k in PARSERS]
    if len(parsers) == 2:
        # the steadier figure on a shared machine: the two parsers measured next to each
        # other in each round, their difference taken round by round
        lines += [
            "",
            "Paired by round (the two runs next to each other), aiohttp minus httptools:",
            "",
        ]
        for size in args.sizes.split(","):
            extra = [
                a["cpu_us_per_req"] - h["cpu_us_per_req"]
                for h, a in zip(
                    results[("httptools", size)], results[("aiohttp", size)], strict=True
                )
            ]
            ratio = [
                h["rps"] / a["rps"]
                for h, a in zip(
                    results[("httptools", size)], results[("aiohttp", size)], strict=True
                )
            ]
            lines.append(
                f"- {size}: CPU {statistics.median(extra):+.1f} µs/req "
                f"[{min(extra):+.1f} to {max(extra):+.1f}]; httptools' req/s "
                f"{statistics.median(ratio):.2f}x aiohttp's [{min(ratio):.2f}-{max(ratio):.2f}]"
            )
    if parsers:
        lines += [
            "",
            "The parsing alone, in one process without the loop (`parse_cost`: the proxy's code",
            "path for wrk's request head and nginx's response head, parse + rebuild, best of 5",
            "x 50,000):",
            "",
            "| parser | µs per request head | µs per response head | µs per exchange |",
            "|---|---:|---:|---:|",
        ]
        for key in parsers:
            request_us, response_us = parse_cost(key)
            lines.append(
                f"| {key} | {request_us:.2f} | {response_us:.2f} | {request_us + response_us:.2f} |"
            )
        lines += [
            "",
            f"The connection state machine (fileproxy/http/connection.py) beside them: "
            f"{connection_cost():.2f} µs per exchange (`connection_cost`, best of 5 x 50,000).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sizes", default="1k,1m")
    parser.add_argument("--contenders", default="httptools,aiohttp,nginx")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--serve", choices=PARSERS, help="run one proxy (no measurement)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--upstream-port", type=int)
    args = parser.parse_args()
    if args.serve:
        if args.port is None or args.upstream_port is None:
            parser.error("--serve needs --port and --upstream-port")
        import uvloop

        uvloop.run(serve(args.serve, args.port, args.upstream_port))
        return
    measure(args)


def measure(args: argparse.Namespace) -> None:
    from bench.hot_path import Bench
    from bench.procs import group_cpu_seconds, wait_port

    keys = [k for k in args.contenders.split(",") if k]
    sizes = [s for s in args.sizes.split(",") if s]
    if set(keys) - set(LABELS) or set(sizes) - set(SIZES):
        sys.exit(f"contenders among {', '.join(LABELS)}; sizes among {', '.join(SIZES)}")
    for program in ("wrk", "nginx"):
        if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
            sys.exit(f"missing {program}: apt-get install -y {program}")
    results: dict[tuple[str, str], list[dict[str, float]]] = {
        (k, s): [] for k in keys for s in sizes
    }
    with tempfile.TemporaryDirectory(prefix="fileproxy-parsers-") as tmp:
        root = Path(tmp)
        bench = Bench(root)  # nginx backend on a free port, root/www/1k.bin
        (root / "www" / "1m.bin").write_bytes(os.urandom(1 << 20))
        started: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
        try:
            wait_port(bench.backend_port)
            for key in keys:
                started[key] = start_contender(key, root, bench.backend_port, bench._spawn)
            for key in keys:
                wait_port(started[key][0])
                for size in sizes:  # warm up: pools, allocator
                    wrk(started[key][0], f"/{size}.bin", args.connections, 1)
            for round_ in range(args.runs):
                order = keys if round_ % 2 == 0 else keys[::-1]
                print(f"round {round_ + 1}/{args.runs}", file=sys.stderr, flush=True)
                for size in sizes:
                    for key in order:
                        port, popen = started[key]
                        cpu0 = group_cpu_seconds(popen.pid)
                        result = wrk(port, f"/{size}.bin", args.connections, args.duration)
                        cpu1 = group_cpu_seconds(popen.pid)
                        result["cpu_us_per_req"] = (cpu1 - cpu0) / max(1, result["requests"]) * 1e6
                        results[(key, size)].append(result)
                        print(
                            f"  {size} {key:9} {result['rps']:9.0f} req/s  "
                            f"cpu {result['cpu_us_per_req']:7.1f} us/req  "
                            f"errors {result['errors']:.0f}",
                            file=sys.stderr,
                            flush=True,
                        )
                        time.sleep(0.2)
        finally:
            for _port, popen in started.values():
                bench.stop(popen)
            bench.stop(bench.backend)
    text = table(results, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
