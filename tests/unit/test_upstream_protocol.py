"""The upstream connection's protocol (fileproxy/upstream/protocol.py): framing, a response
split anywhere, the keep-alive decision, flow control and failures.

The protocol is driven as its transport drives it (``data_received``, ``connection_lost``)
with a recording transport, so a response can be cut at every byte; the last tests run
it on real loopback sockets (flow control of a real transport, the read timeout).
"""

from __future__ import annotations

import asyncio
import itertools
import socket

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fileproxy.upstream.protocol import MAX_HEADER_BYTES, UpstreamProtocol


class RecordingTransport:
    """What the protocol asks of its transport, recorded."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.reading = True
        self.pauses = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def connection(
    *, head_only: bool = False, bufsize: int = 1 << 20, read_timeout: float | None = None
) -> tuple[UpstreamProtocol, RecordingTransport]:
    protocol = UpstreamProtocol(asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.expect_response(head_only=head_only, read_timeout=read_timeout, bufsize=bufsize)
    return protocol, transport


async def exchange(
    pieces: list[bytes], *, head_only: bool = False, eof: bool = False
) -> tuple[UpstreamProtocol, int, list[tuple[bytes, bytes]], bytes]:
    """Feed ``pieces``; return the protocol, the final status, its fields and its body."""
    protocol, _ = connection(head_only=head_only)
    for piece in pieces:
        protocol.data_received(piece)
    if eof:
        protocol.connection_lost(None)
    head, body = await asyncio.wait_for(protocol.read_head(), 1)
    data = await asyncio.wait_for(body.read(), 1)
    return protocol, head.status, list(head.raw_headers), data


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p for p in points if 0 < p < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# --- framing -------------------------------------------------------------------------


async def test_a_content_length_body_is_handed_on_as_received_and_the_connection_kept():
    protocol, _ = connection()
    protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: 1\r\n\r\nhello")
    head, body = await protocol.read_head()
    assert (head.status, head.reason, head.version) == (200, "OK", (1, 1))
    assert head.headers["x-a"] == "1" and not body.is_eof()
    piece = b"world"
    protocol.data_received(piece)
    assert body.is_eof()
    assert await body.read(100) == b"hello"
    assert await body.read(100) is piece  # the received piece itself: never copied, joined
    assert await body.read(100) == b""
    assert not protocol.should_close


async def test_a_body_that_came_with_its_head_is_read_in_parts():
    protocol, _ = connection()
    protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world")
    _, body = await protocol.read_head()
    assert body.is_eof() and not protocol.should_close
    parts = [await body.read(4) for _ in range(4)]
    assert parts == [b"hell", b"o wo", b"rld", b""]


async def test_a_chunked_body_is_decoded():
    _, status, _, body = await exchange(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ]
    )
    assert (status, body) == (200, b"hello world")


async def test_a_body_without_framing_ends_with_the_connection_which_is_never_reused():
    protocol, status, _, body = await exchange([b"HTTP/1.1 200 OK\r\n\r\nall of it"], eof=True)
    assert (status, body) == (200, b"all of it")
    assert protocol.should_close


@pytest.mark.parametrize(
    ("response", "head_only"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True),  # HEAD
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", False),
    ],
)
async def test_heads_without_a_body_leave_the_connection_reusable(response, head_only):
    protocol, _, fields, body = await exchange([response], head_only=head_only)
    assert body == b"" and fields
    assert not protocol.should_close


async def test_1xx_heads_are_skipped_and_the_final_one_answers():
    _, status, fields, body = await exchange(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        ]
    )
    assert (status, fields, body) == (201, [(b"Content-Length", b"2")], b"ok")


@pytest.mark.parametrize("connection_field", [b"", b"Connection: Upgrade\r\n"])
async def test_after_a_101_the_bytes_past_its_head_go_to_the_tunnel(connection_field):
    protocol, _ = connection()
    protocol.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n%s\r\n\x81\x01a"
        % connection_field
    )
    head, body = await protocol.read_head()
    assert head.status == 101 and body.is_eof()
    protocol.data_received(b"\x81\x01b")
    got: list[bytes] = []

    class Tunnel:
        def feed_data(self, data: bytes) -> tuple[bool, bytes]:
            got.append(data)
            return False, b""

        def feed_eof(self) -> None:
            got.append(b"EOF")

    protocol.take_upgraded(Tunnel(), None)
    protocol.data_received(b"\x81\x01c")
    protocol.connection_lost(None)
    assert got == [b"\x81\x01a\x81\x01b", b"\x81\x01c", b"EOF"]
    assert protocol.should_close


async def test_header_bytes_that_are_not_utf8_are_kept_as_surrogates_and_raw():
    protocol, _ = connection()
    protocol.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename=caf\xe9.txt\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    head, _ = await protocol.read_head()
    value = head.headers["content-disposition"]
    assert value == "attachment; filename=caf\udce9.txt"
    assert value.encode("utf-8", "surrogateescape") == b"attachment; filename=caf\xe9.txt"
    assert head.raw_headers[0] == (b"Content-Disposition", b"attachment; filename=caf\xe9.txt")


# --- a response split at every byte ------------------------------------------------------

RESPONSES = [
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Name: a\r\n\r\n"
    b"hello world",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Name: a\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
]


@pytest.mark.parametrize("response", RESPONSES)
async def test_a_response_split_at_any_one_byte_reads_the_same(response):
    expected = await exchange([response])
    for point in range(1, len(response)):
        got = await exchange([response[:point], response[point:]])
        assert got[1:] == expected[1:], point
        assert not got[0].should_close
    assert expected[1:] == (200, expected[2], b"hello world")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(RESPONSES) - 1),
    points=st.lists(st.integers(1, 200), max_size=30),
)
async def test_a_response_cut_in_any_pieces_reads_the_same(which, points):
    response = RESPONSES[which]
    got = await exchange(cut(response, points))
    assert got[1] == 200 and got[3] == b"hello world"
    assert (b"X-Name", b"a") in got[2]
    assert not got[0].should_close


# --- the keep-alive decision ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", False),  # beyond the body
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\n\r\n",  # a response nobody asked for
            False,
        ),
    ],
)
async def test_the_connection_is_reused_only_after_a_whole_keep_alive_response(response, reusable):
    protocol, status, _, body = await exchange([response])
    assert (status, body) == (200, b"ok")
    assert protocol.should_close is not reusable


async def test_a_response_not_read_to_its_end_is_never_reused():
    protocol, _ = connection()
    protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    await protocol.read_head()
    assert protocol.should_close


# --- flow control --------------------------------------------------------------------------


async def test_reading_pauses_over_the_buffer_limit_and_resumes_once_read():
    protocol, transport = connection(bufsize=8)
    protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n12345")
    _, body = await protocol.read_head()
    assert transport.reading
    protocol.data_received(b"6789abcdef")  # 15 unread > 8
    assert not transport.reading
    assert await body.read(5) == b"12345"  # 10 unread: still over
    assert not transport.reading
    assert await body.read(5) == b"6789a"  # 5 unread
    assert transport.reading
    protocol.data_received(b"x" * 15)  # the rest: at its end, reading is never held
    assert transport.reading and body.is_eof()


# --- failures ------------------------------------------------------------------------------


async def test_closed_before_the_head_is_server_disconnected():
    protocol, _ = connection()
    protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-")
    protocol.connection_lost(None)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await protocol.read_head()


async def test_reset_before_the_head_is_a_client_os_error():
    protocol, _ = connection()
    protocol.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    with pytest.raises(aiohttp.ClientOSError):
        await protocol.read_head()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
)
async def test_a_body_cut_short_fails_after_the_bytes_received(response):
    protocol, _ = connection()
    protocol.data_received(response)
    _, body = await protocol.read_head()
    protocol.connection_lost(None)
    assert await body.read(100) == b"hello"  # every byte received is handed on
    with pytest.raises(aiohttp.ClientPayloadError):
        await body.read(100)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 60) for i in range(1200)),
    ],
)
async def test_a_head_llhttp_or_the_bounds_refuse_is_a_response_error(response):
    protocol, transport = connection()
    protocol.data_received(response)
    with pytest.raises(aiohttp.ClientResponseError):
        await asyncio.wait_for(protocol.read_head(), 1)
    assert transport.closing and protocol.should_close
    assert len(response) < 100 or len(response) > MAX_HEADER_BYTES or b"X-Big" in response


# --- on real sockets -----------------------------------------------------------------------


async def _serve(answer: bytes, *, hold: float = 0.0) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(hold)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _open(port: int) -> UpstreamProtocol:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: UpstreamProtocol(loop), "127.0.0.1", port, family=socket.AF_INET
    )
    return protocol


async def test_a_real_transport_is_paused_while_the_body_waits_and_the_body_arrives_whole():
    size = 8 << 20
    server, port = await _serve(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size, hold=2
    )
    async with server:
        protocol = await _open(port)
        try:
            protocol.expect_response(head_only=False, read_timeout=0.3, bufsize=64 * 1024)
            assert protocol.transport is not None
            protocol.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            protocol.start_read_timeout()
            _, body = await asyncio.wait_for(protocol.read_head(), 5)
            # nobody reads: the transport stops reading, and the idle-read timeout (0.3 s)
            # does not count the wait (it is ours, not the upstream's)
            await asyncio.sleep(0.8)
            assert not protocol.transport.is_reading()
            total = 0
            while chunk := await asyncio.wait_for(body.read(1 << 20), 5):
                total += len(chunk)
            assert total == size and not protocol.should_close
        finally:
            protocol.close()


async def test_the_idle_read_timeout_fails_a_silent_upstream():
    server, port = await _serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", hold=3)
    async with server:
        protocol = await _open(port)
        try:
            protocol.expect_response(head_only=False, read_timeout=0.3, bufsize=1 << 20)
            assert protocol.transport is not None
            protocol.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            protocol.start_read_timeout()
            _, body = await asyncio.wait_for(protocol.read_head(), 2)
            assert await body.read(10) == b"abc"
            with pytest.raises(aiohttp.SocketTimeoutError):
                await asyncio.wait_for(body.read(10), 2)
        finally:
            protocol.close()
