"""Many concurrent downloads of one file from one process: the client of bench.run's ``many``.

bench.run starts it in the client namespace
(``ip netns exec <client_ns> python -m bench.many_clients ...``): ``--clients``
downloads of ``--path`` start at once, each on its own connection
(``bench.slow_clients.slow_get``: a raw asyncio socket with a small ``SO_RCVBUF``,
the body read as fast as it arrives: the impaired link is what makes these
clients slow). It prints one JSON line: the wall time and, per client, a compact
record that bench.report aggregates (completion, errors by kind, time to first
byte).

    python -m bench.many_clients --host 10.77.0.2 --port 8084 --path /many.bin \\
        --clients 120 --sha256 HEX [--rcvbuf 32768] [--deadline 600] [--keep-alive]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time

from bench.slow_clients import Download, slow_get


def kind(download: Download, sha256: str) -> str:
    """``ok``, or what went wrong: status_N, reset, short_body, timeout, no_head, bytes, ..."""
    error = download.error
    if error is None:
        if download.status != 200:
            return f"status_{download.status}"
        if download.length is None or download.received != download.length:
            return "short_body"
        return "ok" if download.sha256 == sha256 else "bytes"
    if error.startswith("short body"):
        return "short_body"
    if error.startswith("not done after"):
        return "timeout"
    if error.startswith("closed before the response head"):
        return "no_head"
    if error.startswith(("ConnectionResetError", "BrokenPipeError")):
        return "reset"
    if error.startswith("ConnectionRefusedError"):
        return "refused"
    return error.split(":")[0][:40] or "error"


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            slow_get(
                args.port,
                args.path,
                rate=None,
                rcvbuf=args.rcvbuf,
                deadline_s=args.deadline,
                host=args.host,
                close=not args.keep_alive,
            )
            for _ in range(args.clients)
        )
    )
    wall = time.monotonic() - started
    return {
        "wall_s": round(wall, 2),
        # per client: kind, status, time to first byte s, done s, bytes received
        "clients": [
            [
                kind(r, args.sha256),
                r.status,
                None if r.ttfb_s is None else round(r.ttfb_s, 3),
                None if r.done_s is None else round(r.done_s, 2),
                r.received,
            ]
            for r in results
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--rcvbuf", type=int, default=32768)
    parser.add_argument("--deadline", type=float, default=600)
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        help="no Connection: close (the client closes after the body; see slow_get)",
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
