"""Sequential GET /health latency, as a load balancer's health checker sees it.

Each sample opens a new TCP connection (so both gunicorn workers are sampled),
sends ``GET /health HTTP/1.1`` with ``Connection: close``, reads the whole
response and closes; the latency is from connect() to the last byte. Samples
are spaced by --interval-ms. Prints one JSON line: count, failures, p50, p90,
p99, max (ms) and the statuses seen. ``--collect-stats`` prints the /stats of
every worker instead (new connections until each worker answered once).

    python -m bench.health_probe --port 8083 --count 200 --delay 1.0
"""

from __future__ import annotations

import argparse
import json
import socket
import time


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def one(host: str, port: int, path: str, timeout: float) -> tuple[float, int]:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        "User-Agent: bench-health-probe\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    elapsed = time.perf_counter() - started
    head = b"".join(chunks)[:16]
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    return elapsed * 1000, status


def get_json(host: str, port: int, path: str, timeout: float) -> dict[str, object]:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, port), timeout) as sock:
        sock.sendall(request.encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        raise ValueError("chunked response")
    data: dict[str, object] = json.loads(body)
    return data


def collect_stats(host: str, port: int, workers: int, timeout: float) -> None:
    """/stats of every worker: one JSON line {"workers": {pid: stats}}."""
    seen: dict[str, object] = {}
    for _ in range(60):
        stats = get_json(host, port, "/stats", timeout)
        seen[str(stats.get("pid"))] = stats
        if len(seen) >= workers:
            break
    print(json.dumps({"workers": seen}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/health")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait first")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument(
        "--collect-stats", action="store_true", help="print /stats of every worker instead"
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.collect_stats:
        collect_stats(args.host, args.port, args.workers, args.timeout)
        return
    time.sleep(args.delay)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    failures = 0
    for _ in range(args.count):
        try:
            ms, status = one(args.host, args.port, args.path, args.timeout)
        except OSError:
            failures += 1
            continue
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status == 200:
            latencies.append(ms)
        else:
            failures += 1
        time.sleep(args.interval_ms / 1000)
    latencies.sort()
    print(
        json.dumps(
            {
                "count": args.count,
                "ok": len(latencies),
                "failures": failures,
                "statuses": statuses,
                **{
                    f"p{q:g}_ms": None if (v := percentile(latencies, q)) is None else round(v, 3)
                    for q in (50, 90, 99)
                },
                "max_ms": round(latencies[-1], 3) if latencies else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
