"""Which STREAM_CHUNK_SIZE relays bulk data fastest and cheapest?

Relays one large file from nginx (static, the fastest backend here) through
`fileproxy serve` (optimizer off, so the chunk size is exactly STREAM_CHUNK_SIZE)
to curl, for each chunk size, in alternating order over several rounds.
Reports throughput and the proxy's CPU seconds per GiB (utime + stime from
/proc). Loopback only: this measures the proxy's cost per byte, not a network.

    .venv/bin/python -m bench.chunk_sizes [--size-mib 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import free_port, wait_port

SIZES = (8 * 1024, 16 * 1024, 32 * 1024, 64 * 1024, 256 * 1024)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_nginx(root: Path, port: int) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = root / "nginx.conf"
    conf.write_text(
        f"""daemon off; worker_processes 1; pid {root}/nginx.pid; error_log {root}/error.log;
events {{}}
http {{ access_log off; sendfile on; client_body_temp_path {root}; proxy_temp_path {root};
  fastcgi_temp_path {root}; uwsgi_temp_path {root}; scgi_temp_path {root};
  server {{ listen 127.0.0.1:{port}; root {root}/www; }} }}
"""
    )
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(root)])
    wait_port(port)
    return process


def relay(chunk: int, backend_port: int, size: int) -> tuple[float, float]:
    """(MB/s, proxy CPU seconds per GiB) for one download through a fresh proxy."""
    port = free_port()
    env = {
        **os.environ,
        "FILEPROXY_BIND": f"127.0.0.1:{port}",
        "FILEPROXY_UPSTREAM": f"http://127.0.0.1:{backend_port}",
        "FILEPROXY_CACHE": "off",  # the relay: nginx proxy_pass has no cache either
        "FILEPROXY_OPTIMIZER": "off",
        "FILEPROXY_ACCESS_LOG": "off",
        "FILEPROXY_DRAIN_DELAY": "0",
        "STREAM_CHUNK_SIZE": str(chunk),
    }
    proxy = subprocess.Popen(
        [sys.executable, "-m", "fileproxy", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        before = cpu_seconds(proxy.pid)
        started = time.perf_counter()
        subprocess.run(
            ["curl", "-sS", "--fail", "-o", "/dev/null", f"http://127.0.0.1:{port}/big.bin"],
            check=True,
        )
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(proxy.pid) - before
    finally:
        proxy.terminate()
        proxy.wait(10)
    return size / elapsed / 1e6, cpu / (size / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * 2**20
    with tempfile.TemporaryDirectory(prefix="fileproxy-bench-") as tmp:
        root = Path(tmp)
        (root / "www").mkdir()
        with open(root / "www" / "big.bin", "wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(2**20))
        backend_port = free_port()
        nginx = start_nginx(root, backend_port)
        results: dict[int, list[tuple[float, float]]] = {chunk: [] for chunk in SIZES}
        try:
            for round_ in range(args.rounds):
                order = SIZES if round_ % 2 == 0 else tuple(reversed(SIZES))
                for chunk in order:
                    results[chunk].append(relay(chunk, backend_port, size))
        finally:
            nginx.terminate()
            nginx.wait(10)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line),
        platform.processor(),
    )
    print(f"# chunk sizes: {args.size_mib} MiB via nginx -> fileproxy serve -> curl, loopback")
    print(
        f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu_model}, "
        f"kernel {platform.release()}, median of {args.rounds} rounds"
    )
    print("| STREAM_CHUNK_SIZE | MB/s | proxy CPU s/GiB |")
    print("|---|---|---|")
    for chunk in SIZES:
        rates = [r for r, _ in results[chunk]]
        cpus = [c for _, c in results[chunk]]
        print(
            f"| {chunk // 1024} KiB | {statistics.median(rates):.0f} | "
            f"{statistics.median(cpus):.2f} |"
        )


if __name__ == "__main__":
    main()
