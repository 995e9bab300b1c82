"""Parse Linux ``struct tcp_info`` (``getsockopt(IPPROTO_TCP, TCP_INFO)``) by offset.

The kernel copies ``min(len, sizeof(struct tcp_info))`` bytes, so an older kernel returns
a shorter buffer; a field that does not fit in the returned bytes is ``None``. Offsets
are those of ``include/uapi/linux/tcp.h`` (checked against the header installed on the
development machine and against a live loopback socket on Linux 6.18, which returns 280
bytes). Integers are in the host's byte order, as the kernel writes them.

=====================  ======  ====  ===========================  ======
field                  offset  type  unit                         kernel
=====================  ======  ====  ===========================  ======
state                  0       u8    TCP_ESTABLISHED = 1, ...     2.6
retransmits            2       u8    unrecovered RTO timeouts     2.6
rto_us                 8       u32   microseconds                 2.6
rtt_us                 68      u32   microseconds (smoothed)      2.6
rttvar_us              72      u32   microseconds                 2.6
snd_cwnd               80      u32   segments                     2.6
total_retrans          100     u32   segments                     2.6
pacing_rate            104     u64   bytes/s                      3.15
segs_out               136     u32   segments                     4.2
min_rtt_us             148     u32   microseconds                 4.6
delivery_rate          160     u64   bytes/s                      4.9
busy_time_us           168     u64   microseconds                 4.10
rwnd_limited_us        176     u64   microseconds                 4.10
sndbuf_limited_us      184     u64   microseconds                 4.10
bytes_sent             200     u64   bytes (incl. retransmits)    4.19
bytes_retrans          208     u64   bytes                        4.19
=====================  ======  ====  ===========================  ======

``rtt_us`` is the kernel's smoothed RTT; it only moves when data was acknowledged since
the previous read, so read it after an exchange.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

#: Buffer size asked of the kernel: larger than any ``struct tcp_info`` so far.
TCP_INFO_BUFFER = 512

# name -> (offset, struct format); the one table the parser reads.
_FIELDS: dict[str, tuple[int, str]] = {
    "state": (0, "B"),
    "retransmits": (2, "B"),
    "rto_us": (8, "I"),
    "rtt_us": (68, "I"),
    "rttvar_us": (72, "I"),
    "snd_cwnd": (80, "I"),
    "total_retrans": (100, "I"),
    "pacing_rate": (104, "Q"),
    "segs_out": (136, "I"),
    "min_rtt_us": (148, "I"),
    "delivery_rate": (160, "Q"),
    "busy_time_us": (168, "Q"),
    "rwnd_limited_us": (176, "Q"),
    "sndbuf_limited_us": (184, "Q"),
    "bytes_sent": (200, "Q"),
    "bytes_retrans": (208, "Q"),
}


@dataclass(frozen=True)
class TcpInfo:
    """The fields of ``struct tcp_info`` fileproxy uses; ``None`` = not returned."""

    length: int
    state: int | None = None
    retransmits: int | None = None
    rto_us: int | None = None
    rtt_us: int | None = None
    rttvar_us: int | None = None
    snd_cwnd: int | None = None
    total_retrans: int | None = None
    pacing_rate: int | None = None
    segs_out: int | None = None
    min_rtt_us: int | None = None
    delivery_rate: int | None = None
    busy_time_us: int | None = None
    rwnd_limited_us: int | None = None
    sndbuf_limited_us: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None

    @property
    def rtt_ms(self) -> float | None:
        return None if self.rtt_us is None else self.rtt_us / 1000.0

    @property
    def min_rtt_ms(self) -> float | None:
        return None if self.min_rtt_us is None else self.min_rtt_us / 1000.0

    @property
    def retransmit_rate(self) -> float | None:
        """Share of data retransmitted: bytes when known (4.19+), else segments."""
        if self.bytes_sent is not None and self.bytes_retrans is not None:
            return self.bytes_retrans / self.bytes_sent if self.bytes_sent else 0.0
        if self.segs_out is not None and self.total_retrans is not None:
            return self.total_retrans / self.segs_out if self.segs_out else 0.0
        return None


def _layout(fields: dict[str, tuple[int, str]]) -> struct.Struct:
    """One struct for all the fields, by offset, with pad bytes between them."""
    code, position = "=", 0
    for offset, fmt in fields.values():
        code += f"{offset - position}x{fmt}"
        position = offset + struct.calcsize("=" + fmt)
    return struct.Struct(code)


# A buffer of at least _ALL.size bytes holds every field: one unpack reads them all,
# in TcpInfo's field order (checked below), instead of one unpack per field.
_ALL = _layout(_FIELDS)
assert [f.name for f in dataclasses.fields(TcpInfo)][1:] == list(_FIELDS)


def parse_tcp_info(buf: bytes) -> TcpInfo:
    """Parse as many fields as ``buf`` holds; the others are ``None``."""
    if len(buf) >= _ALL.size:
        return TcpInfo(len(buf), *_ALL.unpack_from(buf))
    values: dict[str, int] = {}
    for name, (offset, fmt) in _FIELDS.items():
        code = "=" + fmt
        if offset + struct.calcsize(code) <= len(buf):
            values[name] = struct.unpack_from(code, buf, offset)[0]
    return TcpInfo(length=len(buf), **values)
