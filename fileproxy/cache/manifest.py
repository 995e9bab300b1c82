"""What the cache's disk store records per object, and how; pure (no I/O).

- ``ChunkMap``: which aligned chunks of a body are present (a bitmap); a chunk counts only
  once all its bytes are written and made durable.
- ``ByteRanges``: the byte ranges a fill has written so far (disjoint, merged, in order).
- ``StoredHead``: the response head kept beside a body (status, raw header pairs as bytes,
  request and response times), with a lossless binary encoding: any byte in any name or
  value comes back as it went in, no assumption of UTF-8.
- ``FillProgress``: the fixed-size record a filling process publishes in the object's lock
  file for readers in other processes (generation, committed prefix, the current run of
  bytes written, the chunk map's version, state, owner pid), with a checksum so a reader
  never acts on a record torn by a concurrent write.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "ByteRanges",
    "ChunkMap",
    "FillProgress",
    "FillState",
    "StoredHead",
]


class ChunkMap:
    """Presence of the ``ceil(length / chunk_size)`` aligned chunks of a body of ``length``."""

    __slots__ = ("_bits", "chunk_size", "length")

    def __init__(self, length: int, chunk_size: int, bits: bytes | None = None) -> None:
        if length < 0 or chunk_size <= 0:
            raise ValueError(f"length {length} >= 0 and chunk size {chunk_size} > 0 needed")
        self.length = length
        self.chunk_size = chunk_size
        size = (self.count + 7) // 8
        if bits is None:
            self._bits = bytearray(size)
        elif len(bits) != size:
            raise ValueError(f"a map of {self.count} chunks has {size} bytes, got {len(bits)}")
        else:
            self._bits = bytearray(bits)
            if self.count % 8 and self._bits[-1] >> (self.count % 8):
                raise ValueError("bits set past the last chunk")

    @property
    def count(self) -> int:
        """How many chunks the body has."""
        return -(-self.length // self.chunk_size)

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def copy(self) -> ChunkMap:
        return ChunkMap(self.length, self.chunk_size, bytes(self._bits))

    def bounds(self, index: int) -> tuple[int, int]:
        """The bytes ``[start, end)`` of chunk ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} of {self.count}")
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.length)

    def index_of(self, offset: int) -> int:
        return offset // self.chunk_size

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.count:
            return False
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def mark(self, index: int) -> bool:
        """Chunk ``index`` is present; False if it already was."""
        self.bounds(index)
        if index in self:
            return False
        self._bits[index >> 3] |= 1 << (index & 7)
        return True

    def present(self) -> Iterator[int]:
        return (i for i in range(self.count) if i in self)

    @property
    def complete(self) -> bool:
        return all(i in self for i in range(self.count))

    def missing(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """The chunk-aligned byte ranges to fetch so that ``[start, end)`` is present,
        adjacent missing chunks merged into one range."""
        end = self.length if end is None else min(end, self.length)
        ranges: list[tuple[int, int]] = []
        if start >= end:
            return ranges
        for index in range(self.index_of(start), self.index_of(end - 1) + 1):
            if index in self:
                continue
            first, last = self.bounds(index)
            if ranges and ranges[-1][1] == first:
                ranges[-1] = (ranges[-1][0], last)
            else:
                ranges.append((first, last))
        return ranges

    def run_end(self, offset: int) -> int:
        """Where the present chunks from ``offset`` on end (``offset`` if its chunk is missing)."""
        if not 0 <= offset < self.length:
            return offset
        index = self.index_of(offset)
        while index in self:
            index += 1
        return max(offset, min(index * self.chunk_size, self.length))


class ByteRanges:
    """Disjoint ``[start, end)`` ranges in order; adding merges what touches or overlaps."""

    __slots__ = ("_ranges",)

    def __init__(self, ranges: Sequence[tuple[int, int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for start, end in ranges:
            self.add(start, end)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def add(self, start: int, end: int) -> None:
        if start < 0 or end < start:
            raise ValueError(f"not a range: [{start}, {end})")
        if start == end:
            return
        kept: list[tuple[int, int]] = []
        for first, last in self._ranges:
            if last < start or first > end:
                kept.append((first, last))
            else:
                start, end = min(start, first), max(end, last)
        kept.append((start, end))
        kept.sort()
        self._ranges = kept

    def covers(self, start: int, end: int) -> bool:
        if start >= end:
            return True
        return any(first <= start and end <= last for first, last in self._ranges)

    def end_from(self, offset: int) -> int:
        """The end of the range holding ``offset`` (``offset`` itself if none does)."""
        for first, last in self._ranges:
            if first <= offset < last:
                return last
        return offset

    def prefix(self) -> int:
        """How many bytes from 0 are written without a gap."""
        return self.end_from(0)


# ---------------------------------------------------------------- the stored head

_HEAD_MAGIC = b"FPH1"
_HEAD_FIXED = struct.Struct(">4sHddI")  # magic, status, request_time, response_time, pairs
_PAIR = struct.Struct(">II")


@dataclass(frozen=True)
class StoredHead:
    """A response head as stored: status, raw header pairs (bytes, as received, in order,
    repeats kept), when the request was sent and when the head arrived (epoch seconds)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    request_time: float = 0.0
    response_time: float = 0.0

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 999:
            raise ValueError(f"not a status code: {self.status}")
        for pair in self.headers:
            if len(pair) != 2 or not all(isinstance(part, bytes) for part in pair):
                raise TypeError(f"a header pair is two bytes objects, got {pair!r}")

    def encode(self) -> bytes:
        parts = [
            _HEAD_FIXED.pack(
                _HEAD_MAGIC, self.status, self.request_time, self.response_time, len(self.headers)
            )
        ]
        for name, value in self.headers:
            parts += [_PAIR.pack(len(name), len(value)), name, value]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> StoredHead:
        """The head ``encode`` wrote; ValueError for anything else (truncated, trailing)."""
        view = memoryview(data)
        if len(view) < _HEAD_FIXED.size:
            raise ValueError("a stored head too short")
        magic, status, request_time, response_time, count = _HEAD_FIXED.unpack_from(view)
        if magic != _HEAD_MAGIC:
            raise ValueError(f"not a stored head: {bytes(magic)!r}")
        at = _HEAD_FIXED.size
        headers = []
        for _ in range(count):
            if at + _PAIR.size > len(view):
                raise ValueError("a stored head cut in a header pair")
            name_len, value_len = _PAIR.unpack_from(view, at)
            at += _PAIR.size
            if at + name_len + value_len > len(view):
                raise ValueError("a stored head cut in a header pair")
            name = bytes(view[at : at + name_len])
            at += name_len
            value = bytes(view[at : at + value_len])
            at += value_len
            headers.append((name, value))
        if at != len(view):
            raise ValueError(f"{len(view) - at} bytes after a stored head")
        return cls(status, tuple(headers), request_time, response_time)


# ---------------------------------------------------------------- a fill's progress record


class FillState(IntEnum):
    """What a fill's progress record says about it."""

    FILLING = 1  # a process holds the lease and writes
    COMPLETE = 2  # every byte is written and durable; the object is complete
    PAUSED = 3  # the filler stopped on purpose; what is committed stays, resumable
    ABANDONED = 4  # the fill failed; the object is gone, readers must abort
    #: the disk (or its quota) had no room for the next bytes: the object is gone, but
    #: its upstream answered well; readers take the rest from the upstream uncached
    NO_ROOM = 5


_PROGRESS = struct.Struct("<4sQQQQQII")  # magic, generation, committed, run, version, state+pid
_CHECK = struct.Struct("<I")
_PROGRESS_MAGIC = b"FPP1"


@dataclass(frozen=True)
class FillProgress:
    """Published by the filling process after every write and commit.

    ``prefix`` bytes from 0 are written (not necessarily durable yet: the page cache
    keeps them for readers if the filler is killed; only a machine crash loses them, and
    readers with it); ``run_start``..``run_end`` is the range the filler writes now (a fill
    that started at a Range's chunk); ``chunks_version`` changes whenever the durable chunk
    map in the index does."""

    generation: int
    prefix: int
    run_start: int
    run_end: int
    chunks_version: int
    state: FillState
    owner: int

    SIZE = _PROGRESS.size + _CHECK.size

    def encode(self) -> bytes:
        body = _PROGRESS.pack(
            _PROGRESS_MAGIC,
            self.generation,
            self.prefix,
            self.run_start,
            self.run_end,
            self.chunks_version,
            int(self.state),
            self.owner,
        )
        return body + _CHECK.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes) -> FillProgress | None:
        """The record, or None when there is none yet or it is torn (read again)."""
        if len(data) < cls.SIZE:
            return None
        body = data[: _PROGRESS.size]
        (check,) = _CHECK.unpack_from(data, _PROGRESS.size)
        if zlib.crc32(body) != check:
            return None
        magic, generation, prefix, run_start, run_end, version, state, owner = _PROGRESS.unpack(
            body
        )
        if magic != _PROGRESS_MAGIC or state not in FillState._value2member_map_:
            return None
        return cls(generation, prefix, run_start, run_end, version, FillState(state), owner)

    def available_end(self, offset: int) -> int:
        """Where the bytes readable from ``offset`` end by this record alone."""
        if offset < self.prefix:
            return self.prefix
        if self.run_start <= offset < self.run_end:
            return self.run_end
        return offset
