"""What the request's handlers ask of the client connection's end: the send timeout's
verdict, and how a connection whose response was cut short ends.

The connection itself (head timeout, limits, the gate, JSON errors) is
``data_plane.ClientProtocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any


def watch_sending(request: Any) -> None:
    """Bytes of ``request``'s response may still wait for its client (a response that
    ended with its tail buffered): the send timeout watches them."""
    request.protocol.watch_sending()


def send_timed_out(request: Any) -> bool:
    """Whether ``request``'s connection was aborted for taking no bytes (send timeout)."""
    return bool(request.protocol.send_timed_out)


def abort_send_timed_out(request: Any) -> None:
    """Abort ``request``'s client, which took no bytes for the send timeout as another
    watcher saw it (sendfile's, whose bytes wait in the kernel, not the transport)."""
    request.protocol.send_timed_out = True
    if request.transport is not None:
        reset(request.transport)


def end_cut_short(transport: asyncio.Transport, framed: bool) -> None:
    """End a connection whose response body was cut short. Where the framing says how long
    the body is (``framed``: Content-Length, chunked), a close: the kernel sends what it
    holds, then a FIN, and the client sees a short body (curl: "partial file") with every
    byte sent. Where the body ends at the connection's end (HTTP/1.0 without a length), a
    reset: a FIN would make the cut body look complete."""
    if framed:
        transport.abort()
    else:
        reset(transport)


def reset(transport: asyncio.Transport) -> None:
    """Abort with a RST: a plain abort() closes the socket, and the kernel would send
    what it holds and a FIN, an end the client could take for the body's."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


__all__ = ["abort_send_timed_out", "end_cut_short", "reset", "send_timed_out", "watch_sending"]
