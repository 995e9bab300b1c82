"""Zero-copy from a file to a client's socket: the one place that takes the socket from
its transport while a file range goes out by ``os.sendfile``, and gives it back.

uvloop has no ``loop.sendfile`` (``NotImplementedError``), so aiohttp and asyncio's
fallbacks copy every byte through Python (read, then ``transport.write``). Here, as
aiohttp 3.6 did and nginx does:

1. wait until the transport's own buffer is empty (``get_write_buffer_size() == 0``:
   the response head and any earlier piece are in the kernel, in order);
2. ``os.dup`` the socket (``get_extra_info("socket").fileno()``, public, and under
   uvloop too) and drive ``os.sendfile`` on the dup from ``loop.add_writer``: one call
   of at most ``PIECE`` bytes (nginx's ``sendfile_max_chunk`` 2m) per turn of the loop,
   so one fast client cannot hold the loop;
3. before each call, probe whether the piece is in the page cache (``preadv`` of its
   first and last byte with ``RWF_NOWAIT``: ``EAGAIN`` = not in memory); a cold piece is
   read into the page cache on a thread first (``warm``), so ``sendfile`` on the loop
   never waits for the disk;
4. give the socket back on every exit, cancellation included, by construction
   (``taken_socket``: ``remove_writer`` BEFORE ``close``, since epoll tracks the open
   file description and a closed dup left registered is uvloop's old busy loop).

A client that takes no byte for ``stall_timeout`` seconds raises ``SendStalled``; a
file that ends before ``count`` raises ``FileShorter`` (the caller aborts the
connection: a short body must never look complete). The caller keeps the copy path
where ``sendfile_socket`` says no: TLS (the bytes must be encrypted in userspace),
and anything that is not a plain TCP or unix stream socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

# the most one os.sendfile call sends (nginx's sendfile_max_chunk); bench.spool_copy
PIECE = 2 * 1024 * 1024
# read size while warming a cold piece into the page cache (on a thread)
WARM_READ = 256 * 1024
_STREAM_FAMILIES = {socket.AF_INET, socket.AF_INET6, socket.AF_UNIX}
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class SendStalled(ConnectionError):
    """The client took no byte for the stall timeout."""


class FileShorter(OSError):
    """The file ended before the range asked for was sent."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "file shorter than the range being sent")


class ZeroCopyStats:
    """What went out by sendfile (one per owner, e.g. a worker's spool)."""

    __slots__ = ("bytes", "calls", "cold_pieces", "sends")

    def __init__(self) -> None:
        self.bytes = 0  # bytes the kernel took by sendfile
        self.calls = 0  # os.sendfile calls that sent something
        self.sends = 0  # ranges handed to send_file
        self.cold_pieces = 0  # pieces read into the page cache on a thread first

    def report(self) -> dict[str, int]:
        return {
            "sendfile_bytes": self.bytes,
            "sendfile_calls": self.calls,
            "sendfile_ranges": self.sends,
            "sendfile_cold_pieces": self.cold_pieces,
        }


def sendfile_socket(transport: asyncio.BaseTransport | None) -> int | None:
    """The socket's fd behind ``transport`` when a file may go to it by sendfile, else
    None: no transport, a closing one, TLS, or not a TCP/unix stream socket. Worked out
    once per transport (while it is not closing, its socket is its own)."""
    if transport is None or transport.is_closing() or not hasattr(os, "sendfile"):
        return None
    try:
        return _sockets[transport]
    except KeyError:
        pass
    except TypeError:  # a transport that takes no weak reference: asked each time
        return _sendfile_socket(transport)
    fd = _sockets[transport] = _sendfile_socket(transport)
    return fd


_sockets: weakref.WeakKeyDictionary[asyncio.BaseTransport, int | None] = weakref.WeakKeyDictionary()


def _sendfile_socket(transport: asyncio.BaseTransport) -> int | None:
    if transport.get_extra_info("sslcontext") is not None:
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    try:
        fd: int = sock.fileno()
        if fd < 0 or not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None  # uvloop's pipe transports answer "socket" with a pseudo-socket
        # the kernel's word on the descriptor, not the transport's (detached: not ours)
        probe = socket.socket(fileno=fd)
        try:
            family, kind = probe.family, probe.type
        finally:
            probe.detach()
    except (AttributeError, OSError):
        return None
    return fd if family in _STREAM_FAMILIES and kind == socket.SOCK_STREAM else None


def page_cache_probe_available() -> bool:
    """Whether ``in_page_cache`` can tell (``RWF_NOWAIT``: Linux >= 4.14)."""
    return bool(_NOWAIT)


def in_page_cache(fd: int, offset: int, count: int) -> bool:
    """Whether the first and last byte of ``[offset, offset + count)`` are in memory
    (readahead fills between them). True where the probe is not available."""
    if not _NOWAIT or count <= 0:
        return True
    probe = bytearray(1)
    for at in (offset, offset + count - 1):
        try:
            os.preadv(fd, [probe], at, _NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return True
            raise
    return True


def warm(fd: int, offset: int, count: int) -> None:
    """Read ``[offset, offset + count)`` into the page cache (blocking: on a thread)."""
    buffer = bytearray(min(count, WARM_READ))
    end = offset + count
    while offset < end:
        view = memoryview(buffer)[: min(len(buffer), end - offset)]
        got = os.preadv(fd, [view], offset)
        if not got:
            return
        offset += got


@contextlib.contextmanager
def taken_socket(loop: asyncio.AbstractEventLoop, sock_fd: int) -> Iterator[int]:
    """A dup of the client's socket for the duration; unregistered and closed on exit."""
    dup = os.dup(sock_fd)
    try:
        yield dup
    finally:
        loop.remove_writer(dup)  # before close: epoll tracks the open file description
        os.close(dup)


async def _writable(
    loop: asyncio.AbstractEventLoop,
    dup: int,
    transport: asyncio.BaseTransport,
    stall_timeout: float,
) -> None:
    """Until the socket can take bytes and the transport's own buffer is empty; raises
    ``SendStalled`` when that did not happen for ``stall_timeout`` seconds."""
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if transport.is_closing() or _buffered(transport) == 0:
            loop.remove_writer(dup)
            if not waiter.done():
                waiter.set_result(None)
        # else: the transport flushes its own buffer on this same writability

    loop.add_writer(dup, ready)
    try:
        async with asyncio.timeout(stall_timeout if stall_timeout > 0 else None):
            await waiter
    except TimeoutError:
        raise SendStalled(f"client took no bytes for {stall_timeout:g} s") from None
    finally:
        loop.remove_writer(dup)


def _buffered(transport: asyncio.BaseTransport) -> int:
    size: int = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    return size


async def send_file(
    transport: asyncio.BaseTransport,
    fd: int,
    offset: int,
    count: int,
    *,
    stall_timeout: float,
    stats: ZeroCopyStats,
    run_in_thread: Callable[..., Awaitable[Any]],
    on_sent: Callable[[int], None] | None = None,
) -> None:
    """Send ``count`` bytes of file ``fd`` from ``offset`` to the socket behind
    ``transport`` (one ``sendfile_socket`` accepts), after what the transport holds.

    ``run_in_thread(fn, *args)`` runs the page-cache warm-up off the loop (the caller
    keeps ``fd`` open until it is done). ``on_sent(n)`` is told every piece the kernel
    took. Raises ``ConnectionError`` (the client went away; ``SendStalled`` for the
    stall timeout), ``FileShorter``, or ``OSError``; the socket is given back first.
    """
    loop = asyncio.get_running_loop()
    # looked up right before the dup, with no await between: a closed transport's fd
    # number may already belong to another connection
    sock_fd = sendfile_socket(transport)
    if sock_fd is None:
        raise ConnectionResetError(errno.ECONNRESET, "client connection closed")
    stats.sends += 1
    end = offset + count
    with taken_socket(loop, sock_fd) as dup:
        if _buffered(transport):  # the head or an earlier piece first
            await _writable(loop, dup, transport, stall_timeout)
        while offset < end:
            if transport.is_closing():
                raise ConnectionResetError(errno.ECONNRESET, "client connection closed")
            piece = min(PIECE, end - offset)
            if not in_page_cache(fd, offset, piece):
                stats.cold_pieces += 1
                await run_in_thread(warm, fd, offset, piece)
            try:
                sent = os.sendfile(dup, fd, offset, piece)
            except BlockingIOError:
                await _writable(loop, dup, transport, stall_timeout)
                continue
            if sent == 0:
                raise FileShorter()
            offset += sent
            stats.bytes += sent
            stats.calls += 1
            if on_sent is not None:
                on_sent(sent)
            if sent < piece:  # the socket is full: wait until it takes more
                await _writable(loop, dup, transport, stall_timeout)
            else:
                await asyncio.sleep(0)  # fairness: a turn for the others
