"""Several upstreams side by side: fileproxy and nginx over three replica processes.

    .venv/bin/python -m bench.replicas [--runs 1]

No root. Three replicas (tests/replica_backend.py: the sample upstream's files with
strong ETags and Range) on loopback; in front of them fileproxy (`fileproxy serve`,
FILEPROXY_UPSTREAM=a,b,c) or nginx (an upstream block of the three servers,
`proxy_next_upstream error timeout http_502 http_503`). Workloads:

- slow: one replica answers 10x later (200 ms vs 20 ms); 4 clients x 60 requests;
  the slow replica's share of the requests.
- even: three identical replicas; 90 requests one at a time, then 4 clients x 45;
  each replica's share.
- recovery: three identical replicas, one of which answers its first request 200 ms
  late (one slow sample); requests one at a time for 5 s; when that replica got a
  request again after its slow answer, and its share.
- reset: one replica cuts every body after 1 MiB; 12 downloads of 16 MiB, 4 at a time;
  downloads complete and byte-exact.
- kill: replicas paced at 16 MiB/s; 6 concurrent 64 MiB downloads; the busiest replica
  is SIGKILLed after 1.5 s; downloads complete and byte-exact.
- budget: one replica's port closed, two answer 503 after 50 ms; 60 concurrent GETs;
  requests the replicas received per client request.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from bench.procs import free_port, wait_port
from bench.run import clean_env, nginx_conf
from fileproxy.sample_upstream import FILES, file_bytes

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MIB = 1024 * 1024


class Procs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.popens: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None):
        log = open(self.root / f"{name}-{port}.log", "wb")  # noqa: SIM115
        popen = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env or clean_env({})
        )
        self.popens.append(popen)
        wait_port(port)
        return popen

    def replica(self, **options: object) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        argv = [PYTHON, "-m", "tests.replica_backend", "--port", str(port)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return port, self.spawn("replica", argv, port)

    def proxy(self, contender: str, ports: list[int]) -> int:
        port = free_port()
        if contender == "fileproxy":
            env = clean_env(
                {
                    "FILEPROXY_BIND": f"127.0.0.1:{port}",
                    "FILEPROXY_UPSTREAM": ",".join(f"http://127.0.0.1:{p}" for p in ports),
                    "FILEPROXY_CACHE": "off",  # the relay: nginx proxy_pass has no cache either
                    "FILEPROXY_ACCESS_LOG": "off",
                    "FILEPROXY_LOG_LEVEL": "warning",
                    "FILEPROXY_DRAIN_DELAY": "0",
                }
            )
            self.spawn(contender, [PYTHON, "-m", "fileproxy", "serve"], port, env)
        else:
            servers = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
            body = f"""    upstream replicas {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503;
        }}
    }}"""
            conf = nginx_conf(self.root, f"nginx-{port}", body, workers=1)
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            self.spawn(contender, [nginx, "-c", str(conf)], port)
        return port

    def stop(self) -> None:
        for popen in self.popens:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for popen in self.popens:
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        self.popens.clear()


@contextmanager
def procs(root: Path) -> Iterator[Procs]:
    p = Procs(root)
    try:
        yield p
    finally:
        p.stop()


def digest(name: str) -> str:
    h = hashlib.sha256()
    for chunk in file_bytes(name):
        h.update(chunk)
    return h.hexdigest()


async def download(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the whole body arrived byte-exact."""
    name = url.rsplit("/", 1)[1]
    h, size = hashlib.sha256(), 0
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return False
            async for chunk in resp.content.iter_chunked(256 * 1024):
                h.update(chunk)
                size += len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        return False
    return size == FILES[name] and h.hexdigest() == DIGESTS[name]


DIGESTS: dict[str, str] = {}


async def counts(session: aiohttp.ClientSession, port: int) -> dict[str, int]:
    try:
        async with session.get(f"http://127.0.0.1:{port}/_count") as resp:
            return await resp.json()  # type: ignore[no-any-return]
    except aiohttp.ClientError:
        return {}


async def slow(p: Procs, contender: str, session: aiohttp.ClientSession) -> str:
    ports = [p.replica(ttfb=0.02)[0], p.replica(ttfb=0.02)[0], p.replica(ttfb=0.2)[0]]
    proxy = p.proxy(contender, ports)
    began = time.monotonic()

    async def client() -> None:
        for _ in range(60):
            async with session.get(f"http://127.0.0.1:{proxy}/files/4k.bin") as resp:
                await resp.read()

    await asyncio.gather(*(client() for _ in range(4)))
    took = time.monotonic() - began
    got = [(await counts(session, port)).get("GET", 0) for port in ports]
    return f"slow replica {got[2] / sum(got):.1%} of {sum(got)} requests, {240 / took:.0f} req/s"


async def reset(p: Procs, contender: str, session: aiohttp.ClientSession) -> str:
    ports = [p.replica(reset_after=MIB)[0], p.replica()[0], p.replica()[0]]
    proxy = p.proxy(contender, ports)
    gate = asyncio.Semaphore(4)

    async def one() -> bool:
        async with gate:
            return await download(session, f"http://127.0.0.1:{proxy}/files/16m.bin")

    ok = await asyncio.gather(*(one() for _ in range(12)))
    return f"{sum(ok)}/12 downloads of 16 MiB complete and byte-exact"


async def kill(p: Procs, contender: str, session: aiohttp.ClientSession) -> str:
    replicas = [p.replica(pace=16 * MIB) for _ in range(3)]
    proxy = p.proxy(contender, [port for port, _ in replicas])
    url = f"http://127.0.0.1:{proxy}/files/64m.bin"
    tasks = [asyncio.create_task(download(session, url)) for _ in range(6)]
    await asyncio.sleep(1.5)
    served = [(await counts(session, port)).get("GET", 0) for port, _ in replicas]
    victim = replicas[max(range(3), key=lambda i: served[i])][1]
    os.kill(victim.pid, signal.SIGKILL)
    ok = await asyncio.gather(*tasks)
    on_victim = max(served)
    return f"{sum(ok)}/6 downloads of 64 MiB complete and byte-exact ({on_victim} on the victim)"


async def budget(p: Procs, contender: str, session: aiohttp.ClientSession) -> str:
    closed = free_port()
    ports = [p.replica(status=503, ttfb=0.05)[0] for _ in range(2)]
    proxy = p.proxy(contender, [closed, *ports])
    n = 60

    async def get() -> int:
        async with session.get(f"http://127.0.0.1:{proxy}/files/4k.bin") as resp:
            await resp.read()
            return resp.status

    await asyncio.gather(*(get() for _ in range(n)))
    reached = sum([(await counts(session, port)).get("GET", 0) for port in ports])
    return f"{reached / n:.2f} upstream requests per client request ({reached} for {n})"


async def even(p: Procs, contender: str, session: aiohttp.ClientSession) -> str:
    ports = [p.replica()[0] for _ in range(3)]
    proxy = p.proxy(contender, ports)

    async def client(n: int) -> None:
        for _ in range(n):
            async with session.get(f"http://127.0.0.1:{proxy}/files/4k.bin") as resp:
                await resp.read()

    async def served() -> list[int]:
        return [(await counts(session, port)).get("GET", 0) for port in ports]

    await client(90)
    sequential = await served()
    await asyncio.gather(*(client(45) for _ in range(4)))
    concurrent = [n - before for n, before in zip(await served(), sequential, strict=True)]
    return f"sequential {sequential} of 90, concurrent {concurrent} of 180"


async def recovery(p: Procs, contender: str, session: aiohttp.ClientSession) -> str:
    ports = [p.replica(first_ttfb=0.2)[0], p.replica()[0], p.replica()[0]]
    proxy = p.proxy(contender, ports)
    began = time.monotonic()
    while time.monotonic() - began < 5:
        async with session.get(f"http://127.0.0.1:{proxy}/files/4k.bin") as resp:
            await resp.read()
    async with session.get(f"http://127.0.0.1:{ports[0]}/_arrivals") as resp:
        arrivals = await resp.json()
    got = [(await counts(session, port)).get("GET", 0) for port in ports]
    if len(arrivals) < 2:
        back = "never within 5 s"
    else:
        back = f"{arrivals[1] - arrivals[0] - 0.2:.2f} s after its slow answer"
    return f"picked again {back}; share {got[0] / sum(got):.1%} of {sum(got)} requests"


WORKLOADS = {
    "slow": slow,
    "even": even,
    "recovery": recovery,
    "reset": reset,
    "kill": kill,
    "budget": budget,
}


async def main_async(args: argparse.Namespace) -> None:
    for name in ("16m.bin", "64m.bin"):
        DIGESTS[name] = digest(name)
    print(f"# bench.replicas — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}\n")
    print("| workload | contender | result |")
    print("|---|---|---|")
    timeout = aiohttp.ClientTimeout(total=120)
    for workload in args.workloads.split(","):
        for contender in args.contenders.split(","):
            for _ in range(args.runs):
                with (
                    tempfile.TemporaryDirectory(prefix="bench-replicas-") as root,
                    procs(Path(root)) as p,
                ):
                    async with aiohttp.ClientSession(timeout=timeout) as session:
                        result = await WORKLOADS[workload](p, contender, session)
                print(f"| {workload} | {contender} | {result} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--contenders", default="fileproxy,nginx")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
