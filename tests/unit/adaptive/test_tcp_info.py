"""TCP_INFO parsing: synthetic buffers of every length a kernel returns, and a live socket."""

from __future__ import annotations

import socket
import struct

import pytest

from fileproxy.adaptive.tcp_info import TcpInfo, parse_tcp_info
from fileproxy.upstream.tcp_info import read_tcp_info

# Offsets written out from include/uapi/linux/tcp.h, independently of the parser's table.
U64 = 0x0102_0304_0506_0000
FULL = bytearray(280)
for offset, fmt, value in [
    (0, "B", 1),  # state
    (1, "B", 0xEE),  # ca_state: must not leak into retransmits
    (2, "B", 3),  # retransmits
    (8, "I", 204_000),  # rto
    (68, "I", 12_345),  # rtt
    (72, "I", 678),  # rttvar
    (80, "I", 10),  # snd_cwnd
    (100, "I", 7),  # total_retrans
    (104, "Q", U64 + 1),  # pacing_rate
    (136, "I", 1_000),  # segs_out
    (148, "I", 9_999),  # min_rtt
    (160, "Q", U64 + 2),  # delivery_rate
    (168, "Q", U64 + 3),  # busy_time
    (176, "Q", U64 + 4),  # rwnd_limited
    (184, "Q", U64 + 5),  # sndbuf_limited
    (200, "Q", 4_000_000),  # bytes_sent
    (208, "Q", 40_000),  # bytes_retrans
]:
    struct.pack_into("=" + fmt, FULL, offset, value)

UP_TO_104 = {
    "state": 1,
    "retransmits": 3,
    "rto_us": 204_000,
    "rtt_us": 12_345,
    "rttvar_us": 678,
    "snd_cwnd": 10,
    "total_retrans": 7,
}
UP_TO_168 = {
    **UP_TO_104,
    "pacing_rate": U64 + 1,
    "segs_out": 1_000,
    "min_rtt_us": 9_999,
    "delivery_rate": U64 + 2,
}
UP_TO_192 = {
    **UP_TO_168,
    "busy_time_us": U64 + 3,
    "rwnd_limited_us": U64 + 4,
    "sndbuf_limited_us": U64 + 5,
}
ALL = {**UP_TO_192, "bytes_sent": 4_000_000, "bytes_retrans": 40_000}


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (104, UP_TO_104),  # Linux 2.6 .. 3.14
        (168, UP_TO_168),  # 4.9
        (192, UP_TO_192),  # 4.10 .. 4.18
        (232, ALL),  # 5.x
        (248, ALL),
        (280, ALL),  # 6.18 (this machine)
    ],
)
def test_fields_within_the_buffer_are_parsed_the_rest_are_none(
    length: int, expected: dict[str, int]
) -> None:
    info = parse_tcp_info(bytes(FULL[:length]))
    assert info == TcpInfo(length=length, **expected)


def test_a_field_cut_by_the_end_of_the_buffer_is_none() -> None:
    info = parse_tcp_info(bytes(FULL[:71]))  # rtt (68..72) is one byte short
    assert info.rto_us == 204_000
    assert info.rtt_us is None
    assert info.rttvar_us is None


def test_empty_buffer() -> None:
    assert parse_tcp_info(b"") == TcpInfo(length=0)


def test_derived_figures() -> None:
    info = parse_tcp_info(bytes(FULL))
    assert info.rtt_ms == 12.345
    assert info.min_rtt_ms == 9.999
    assert info.retransmit_rate == 0.01  # bytes_retrans / bytes_sent
    older = parse_tcp_info(bytes(FULL[:168]))
    assert older.retransmit_rate == 0.007  # total_retrans / segs_out
    assert parse_tcp_info(bytes(FULL[:104])).retransmit_rate is None
    assert TcpInfo(length=232, bytes_sent=0, bytes_retrans=0).retransmit_rate == 0.0


def test_live_loopback_connection_has_an_rtt() -> None:
    payload = b"x" * 100_000
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        peer, _ = server.accept()
        with peer:
            client.sendall(payload)
            received = 0
            while received < len(payload):
                received += len(peer.recv(65536))
            peer.sendall(b"ok")
            assert client.recv(2) == b"ok"
            info = read_tcp_info(client)
    assert info is not None
    assert info.length >= 104
    assert info.state == 1  # TCP_ESTABLISHED
    assert info.rtt_us is not None and info.rtt_us > 0
    if info.bytes_sent is not None:  # kernel 4.19+
        assert info.bytes_sent == len(payload)
        assert info.bytes_retrans == 0


def test_read_tcp_info_is_none_when_getsockopt_fails() -> None:
    closed = socket.socket()
    closed.close()
    assert read_tcp_info(closed) is None

    class Failing:
        def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes:
            raise OSError("not a TCP socket")

    assert read_tcp_info(Failing()) is None
