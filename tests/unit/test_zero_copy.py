"""http/zero_copy.py on real sockets under uvloop: a file range goes out by sendfile on a
dup of the transport's socket, after what the transport holds, in bounded pieces with a
turn of the loop between them; the dup is given back on every exit; TLS and sockets
sendfile cannot take are refused (the caller keeps the copy path)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from fileproxy.http import zero_copy
from tests.conftest import require_binary

MIB = 1 << 20


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def body_file() -> Iterator[tuple[int, bytes]]:
    body = os.urandom(6 * MIB + 12345)
    with tempfile.TemporaryFile() as file:
        file.write(body)
        file.flush()
        yield file.fileno(), body


class Reader:
    """A client in a thread: reads the socket (at ``delay`` per 16 KiB) into ``data``."""

    def __init__(self, sock: socket.socket, delay: float = 0.0, stop_after: int = -1) -> None:
        """``stop_after``: reset the connection once that many bytes arrived."""
        self.sock, self.delay, self.stop_after = sock, delay, stop_after
        self.data = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                got = self.sock.recv(16384)
            except OSError:
                return
            if not got:
                return
            self.data += got
            if 0 <= self.stop_after <= len(self.data):  # then gone, with a RST
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.sock.close()
                return
            if self.delay:
                time.sleep(self.delay)

    def join(self) -> bytes:
        self.thread.join(30)
        assert not self.thread.is_alive()
        return bytes(self.data)


async def _connected(
    rcvbuf: int = 0,
) -> tuple[asyncio.Transport, socket.socket]:
    """A server-side transport (uvloop) and the client's blocking socket."""
    loop = asyncio.get_running_loop()
    server_sock, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    transport, _ = await loop.connect_accepted_socket(_Sink, server_sock)
    return cast(asyncio.Transport, transport), client


async def _tcp_connected() -> tuple[asyncio.Transport, socket.socket]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    server_sock.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(_Sink, server_sock)
    return cast(asyncio.Transport, transport), client


def _in_thread() -> Callable[..., Awaitable[Any]]:
    async def run(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    return run


def test_a_range_goes_out_by_sendfile_after_what_the_transport_holds(
    body_file: tuple[int, bytes],
) -> None:
    fd, body = body_file

    async def main() -> tuple[bytes, zero_copy.ZeroCopyStats, int]:
        transport, client = await _tcp_connected()
        reader = Reader(client, delay=0.0005)
        stats = zero_copy.ZeroCopyStats()
        head = b"HEAD" * 100_000  # buffered in the transport: it must go first
        transport.write(head)
        sent: list[int] = []
        await zero_copy.send_file(
            transport,
            fd,
            1000,
            len(body) - 2000,
            stall_timeout=30,
            stats=stats,
            run_in_thread=_in_thread(),
            on_sent=sent.append,
        )
        transport.write(b"TAIL")
        await asyncio.sleep(0.1)
        transport.close()
        data = await asyncio.to_thread(reader.join)
        return data, stats, sum(sent)

    data, stats, reported = uvloop.run(main())
    expected = b"HEAD" * 100_000 + body[1000:-1000] + b"TAIL"
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert stats.bytes == reported == len(body) - 2000
    assert stats.sends == 1 and stats.calls >= 1


def test_pieces_are_bounded_and_the_loop_turns_between_them(body_file: tuple[int, bytes]) -> None:
    """A reader that keeps up with everything: the loop still gets a turn per piece."""
    fd, body = body_file

    async def main() -> tuple[int, zero_copy.ZeroCopyStats]:
        transport, client = await _tcp_connected()
        reader = Reader(client)
        stats = zero_copy.ZeroCopyStats()
        turns = 0
        done = False

        async def count_turns() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count_turns())
        for _ in range(8):  # 8 x 6 MiB
            await zero_copy.send_file(
                transport,
                fd,
                0,
                len(body),
                stall_timeout=30,
                stats=stats,
                run_in_thread=_in_thread(),
            )
        done = True
        await counter
        transport.close()
        await asyncio.to_thread(reader.join)
        return turns, stats

    old = zero_copy.PIECE
    zero_copy.PIECE = 256 * 1024
    try:
        turns, stats = uvloop.run(main())
    finally:
        zero_copy.PIECE = old
    assert stats.bytes == 8 * len(body)
    assert stats.calls >= 8 * len(body) // (256 * 1024)  # never more than a piece a call
    assert turns >= stats.calls // 2, (turns, stats.calls)  # a turn for others per piece


def test_a_file_shorter_than_the_range_raises_and_gives_the_socket_back(
    body_file: tuple[int, bytes],
) -> None:
    fd, body = body_file

    async def main() -> None:
        transport, client = await _connected()
        reader = Reader(client)
        before = _open_fds()
        with pytest.raises(zero_copy.FileShorter):
            await zero_copy.send_file(
                transport,
                fd,
                len(body) - 100,
                1000,
                stall_timeout=30,
                stats=zero_copy.ZeroCopyStats(),
                run_in_thread=_in_thread(),
            )
        assert _open_fds() == before
        transport.close()
        await asyncio.to_thread(reader.join)

    uvloop.run(main())


def test_a_client_that_takes_nothing_stalls_out_and_cancellation_gives_the_socket_back(
    body_file: tuple[int, bytes],
) -> None:
    fd, body = body_file

    async def main() -> None:
        transport, client = await _connected(rcvbuf=16384)  # never read
        before = _open_fds()
        stats = zero_copy.ZeroCopyStats()
        with pytest.raises(zero_copy.SendStalled):
            await zero_copy.send_file(
                transport,
                fd,
                0,
                len(body),
                stall_timeout=0.3,
                stats=stats,
                run_in_thread=_in_thread(),
            )
        assert _open_fds() == before
        assert 0 < stats.bytes < len(body)
        task = asyncio.ensure_future(
            zero_copy.send_file(
                transport,
                fd,
                0,
                len(body),
                stall_timeout=30,
                stats=stats,
                run_in_thread=_in_thread(),
            )
        )
        await asyncio.sleep(0.2)
        assert len(_open_fds()) == len(before) + 1  # the dup, while it waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _open_fds() == before
        # the transport still owns a working socket: the client reads what was sent
        transport.close()
        client.close()

    uvloop.run(main())


def test_a_client_gone_mid_file_is_a_connection_error(body_file: tuple[int, bytes]) -> None:
    fd, body = body_file

    async def main() -> None:
        transport, client = await _tcp_connected()
        reader = Reader(client, delay=0.001, stop_after=MIB)
        before = _open_fds()
        with pytest.raises(ConnectionError):
            for _ in range(20):
                await zero_copy.send_file(
                    transport,
                    fd,
                    0,
                    len(body),
                    stall_timeout=5,
                    stats=zero_copy.ZeroCopyStats(),
                    run_in_thread=_in_thread(),
                )
        assert _open_fds() <= before  # no dup left (the client closed its own socket)
        assert len(await asyncio.to_thread(reader.join)) >= MIB
        transport.abort()

    uvloop.run(main())


def test_cold_pieces_are_read_into_the_page_cache_off_the_loop(tmp_path: Path) -> None:
    """A file dropped from the page cache (POSIX_FADV_DONTNEED on clean pages): the probe
    sees it cold and the warm-up runs in the thread, the bytes are still exact."""
    body = os.urandom(4 * MIB)
    path = tmp_path / "cold.bin"
    path.write_bytes(body)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        threads: list[str] = []

        async def main() -> tuple[bytes, zero_copy.ZeroCopyStats]:
            transport, client = await _tcp_connected()
            reader = Reader(client)
            loop = asyncio.get_running_loop()

            async def in_thread(fn: Any, *args: Any) -> Any:
                def run() -> Any:
                    threads.append(threading.current_thread().name)
                    return fn(*args)

                return await loop.run_in_executor(None, run)

            stats = zero_copy.ZeroCopyStats()
            await zero_copy.send_file(
                transport, fd, 0, len(body), stall_timeout=30, stats=stats, run_in_thread=in_thread
            )
            transport.close()
            return await asyncio.to_thread(reader.join), stats

        data, stats = uvloop.run(main())
    finally:
        os.close(fd)
    assert data == body
    if not zero_copy.page_cache_probe_available():
        pytest.fail("preadv RWF_NOWAIT is not available here (Linux >= 4.14 and Python >= 3.7)")
    assert stats.cold_pieces >= 1 and threads and threading.main_thread().name not in threads


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            require_binary("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_pipes_and_datagrams_keep_the_copy_path(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)

    async def main() -> dict[str, int | None]:
        loop = asyncio.get_running_loop()
        found: dict[str, int | None] = {}
        # TLS: the socket is there (get_extra_info("socket")), but bytes must be encrypted
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        accepted: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

        class Tls(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.set_result(transport)

        server = await loop.create_server(Tls, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        client_ctx = ssl.create_default_context()
        client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
        client_transport, _ = await loop.create_connection(
            asyncio.Protocol, "127.0.0.1", port, ssl=client_ctx
        )
        tls = await asyncio.wait_for(accepted, 10)
        assert tls.get_extra_info("socket") is not None
        found["tls_server"] = zero_copy.sendfile_socket(tls)
        found["tls_client"] = zero_copy.sendfile_socket(client_transport)
        client_transport.close()
        tls.close()
        server.close()
        # a pipe
        read_end, write_end = os.pipe()
        pipe_transport, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(write_end, "wb")
        )
        found["pipe"] = zero_copy.sendfile_socket(pipe_transport)
        pipe_transport.close()
        os.close(read_end)
        # a datagram socket
        udp, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        found["udp"] = zero_copy.sendfile_socket(udp)
        udp.close()
        # plain TCP and unix stream sockets: yes
        tcp, client = await _tcp_connected()
        found["tcp"] = zero_copy.sendfile_socket(tcp)
        tcp.close()
        client.close()
        unix, client = await _connected()
        found["unix"] = zero_copy.sendfile_socket(unix)
        unix.close()
        found["closing"] = zero_copy.sendfile_socket(unix)
        client.close()
        found["none"] = zero_copy.sendfile_socket(None)
        return found

    found = uvloop.run(main())
    refused = {name for name, fd in found.items() if fd is None}
    assert refused == {"tls_server", "tls_client", "pipe", "udp", "closing", "none"}, found
