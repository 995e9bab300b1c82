"""What serving a spooled body costs per MiB: read + write against zero-copy.

One process sends a page-cached file
over a loopback TCP connection to a reader process that drains it as fast as it
can; the figure is the sender's CPU (user + system) per MiB, median of ``--runs``:

- ``copy``: what ``delivery.spool`` did before zero-copy, and still does over TLS:
  uvloop, ``os.preadv`` of ``FILE_READ`` (64 KiB) on the spool's I/O threads into a
  buffer made on the loop's thread, then ``transport.write`` with the transport's flow
  control;
- ``read_write``: the same copy without the loop or the threads (``os.pread`` +
  ``socket.sendall`` on a blocking socket): the floor of any read + write;
- ``sendfile``: ``os.sendfile`` from the file to a blocking socket, 64 KiB a call:
  zero-copy, the floor of any server;
- ``zero_copy``: what ``delivery.spool`` does now: uvloop, ``http.zero_copy.send_file``
  (a dup of the transport's socket, ``os.sendfile`` of at most ``--piece`` bytes per
  turn of the loop from ``add_writer``, the page-cache probe before each piece).

    .venv/bin/python -m bench.spool_copy [--mib 512] [--runs 3] [--piece 2097152]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import uvloop

from fileproxy.delivery.spool import FILE_READ, IO_THREADS
from fileproxy.http import zero_copy

PIECE = 64 * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drain(port: int) -> subprocess.Popen[bytes]:
    """A reader process: connects, reads to EOF, prints the byte count."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('127.0.0.1',{port}))\n"
        "b=bytearray(1<<20);n=0\n"
        "while (k:=s.recv_into(b)): n+=k\n"
        "print(n)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def accept_one() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    listener = socket.create_server(("127.0.0.1", 0))
    reader = drain(listener.getsockname()[1])
    conn, _ = listener.accept()
    listener.close()
    return conn, reader


def read_write(fd: int, size: int) -> None:
    conn, reader = accept_one()
    offset = 0
    while offset < size:
        data = os.pread(fd, PIECE, offset)
        conn.sendall(data)
        offset += len(data)
    conn.close()
    reader.wait()


def sendfile(fd: int, size: int) -> None:
    conn, reader = accept_one()
    offset = 0
    while offset < size:
        offset += os.sendfile(conn.fileno(), fd, offset, PIECE)
    conn.close()
    reader.wait()


class _Writer(asyncio.Protocol):
    def __init__(self) -> None:
        self.can_write = asyncio.Event()
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


async def _copy(fd: int, size: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    reader = drain(listener.getsockname()[1])
    conn, _ = await loop.sock_accept(listener)
    listener.close()
    transport, protocol = await loop.connect_accepted_socket(_Writer, conn)
    with concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS) as executor:
        offset = 0
        while offset < size:
            buffer = bytearray(min(FILE_READ, size - offset))
            got = await asyncio.wrap_future(executor.submit(os.preadv, fd, [buffer], offset))
            offset += got
            transport.write(bytes(buffer) if got == len(buffer) else bytes(buffer[:got]))
            await protocol.can_write.wait()
    transport.close()
    await asyncio.to_thread(reader.wait)


def copy_way(fd: int, size: int) -> None:
    uvloop.run(_copy(fd, size))


async def _zero_copy(fd: int, size: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    reader = drain(listener.getsockname()[1])
    conn, _ = await loop.sock_accept(listener)
    listener.close()
    transport, _protocol = await loop.connect_accepted_socket(_Writer, conn)
    with concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS) as executor:

        async def in_thread(fn: object, *args: object) -> object:
            return await loop.run_in_executor(executor, fn, *args)  # type: ignore[arg-type]

        await zero_copy.send_file(
            transport,
            fd,
            0,
            size,
            stall_timeout=60,
            stats=zero_copy.ZeroCopyStats(),
            run_in_thread=in_thread,
        )
    transport.close()
    await asyncio.to_thread(reader.wait)


def zero_copy_way(fd: int, size: int) -> None:
    uvloop.run(_zero_copy(fd, size))


WAYS = {
    "copy": copy_way,
    "read_write": read_write,
    "sendfile": sendfile,
    "zero_copy": zero_copy_way,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--piece", type=int, default=zero_copy.PIECE, help="zero_copy's piece")
    args = parser.parse_args()
    zero_copy.PIECE = args.piece
    size = args.mib << 20
    with tempfile.TemporaryFile() as file:
        chunk = os.urandom(1 << 20)
        for _ in range(args.mib):
            file.write(chunk)
        file.flush()
        fd = file.fileno()
        os.pread(fd, size, 0)  # in the page cache, as a just-spooled body is
        figures: dict[str, list[float]] = {way: [] for way in WAYS}
        walls: dict[str, list[float]] = {way: [] for way in WAYS}
        for run in range(args.runs):
            for way in WAYS if run % 2 == 0 else reversed(WAYS):
                cpu0, wall0 = cpu_seconds(), time.monotonic()
                WAYS[way](fd, size)
                figures[way].append((cpu_seconds() - cpu0) / args.mib * 1e6)
                walls[way].append(args.mib / (time.monotonic() - wall0))
    print(f"{args.mib} MiB over loopback TCP, {args.runs} runs each, sender's CPU per MiB:")
    print("| way | CPU µs per MiB (median) | min-max | MiB/s (median) |")
    print("|---|---:|---:|---:|")
    for way in WAYS:
        cpu = figures[way]
        print(
            f"| {way} | {statistics.median(cpu):,.0f} | {min(cpu):,.0f}-{max(cpu):,.0f} "
            f"| {statistics.median(walls[way]):,.0f} |"
        )


if __name__ == "__main__":
    main()
