"""The disk store's records: chunk map, written ranges, the stored head's encoding, the
fill's progress record. Exact cases, and round trips over any bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fileproxy.cache.manifest import ByteRanges, ChunkMap, FillProgress, FillState, StoredHead

MIB = 1 << 20


def test_chunk_map_counts_aligned_chunks_and_the_short_last_one() -> None:
    chunks = ChunkMap(10 * MIB + 1, 4 * MIB)
    assert chunks.count == 3
    assert chunks.bounds(2) == (8 * MIB, 10 * MIB + 1)
    assert ChunkMap(0, 4 * MIB).count == 0 and ChunkMap(0, 4 * MIB).complete
    with pytest.raises(IndexError):
        chunks.bounds(3)


def test_chunk_map_missing_merges_neighbours_and_covers_a_range_far_in() -> None:
    chunks = ChunkMap(40 * MIB, 4 * MIB)
    # a cold Range of 1 MiB near the end: only its chunk is fetched first
    assert chunks.missing(37 * MIB, 38 * MIB) == [(36 * MIB, 40 * MIB)]
    assert chunks.mark(9) and not chunks.mark(9)
    assert chunks.missing(37 * MIB, 38 * MIB) == []
    chunks.mark(1)
    assert chunks.missing() == [(0, 4 * MIB), (8 * MIB, 36 * MIB)]
    assert chunks.missing(5 * MIB, 5 * MIB) == []


def test_chunk_map_run_end_follows_present_chunks() -> None:
    chunks = ChunkMap(10 * MIB, 4 * MIB)
    assert chunks.run_end(0) == 0
    chunks.mark(1)
    chunks.mark(2)
    assert chunks.run_end(5 * MIB) == 10 * MIB
    assert chunks.run_end(3 * MIB) == 3 * MIB
    chunks.mark(0)
    assert chunks.run_end(0) == 10 * MIB and chunks.complete


def test_chunk_map_bytes_round_trip_and_refuse_a_wrong_size() -> None:
    chunks = ChunkMap(9 * MIB, MIB)
    for index in (0, 3, 8):
        chunks.mark(index)
    again = ChunkMap(9 * MIB, MIB, chunks.to_bytes())
    assert list(again.present()) == [0, 3, 8]
    with pytest.raises(ValueError):
        ChunkMap(9 * MIB, MIB, b"\x00")
    with pytest.raises(ValueError, match="past the last"):
        ChunkMap(9 * MIB, MIB, b"\x00\x02")


def test_byte_ranges_merge_touching_and_overlapping() -> None:
    ranges = ByteRanges()
    ranges.add(10, 20)
    ranges.add(30, 40)
    assert list(ranges) == [(10, 20), (30, 40)] and ranges.prefix() == 0
    ranges.add(0, 10)
    assert ranges.prefix() == 20
    ranges.add(15, 35)
    assert list(ranges) == [(0, 40)]
    assert ranges.covers(5, 40) and not ranges.covers(5, 41)
    assert ranges.end_from(39) == 40 and ranges.end_from(40) == 40


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=30))
def test_byte_ranges_cover_exactly_what_was_added(pieces: list[tuple[int, int]]) -> None:
    ranges = ByteRanges()
    written = set()
    for start, size in pieces:
        ranges.add(start, start + size)
        written.update(range(start, start + size))
    assert {i for first, last in ranges for i in range(first, last)} == written
    spans = list(ranges)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))


def test_stored_head_keeps_any_bytes_and_repeated_names() -> None:
    head = StoredHead(
        206,
        ((b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=\xff\x00"), (b"X-\x80", b"")),
        1.5,
        2.25,
    )
    assert StoredHead.decode(head.encode()) == head


@given(
    st.integers(100, 999),
    st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=200)), max_size=20),
    st.floats(allow_nan=False),
    st.floats(allow_nan=False),
)
def test_stored_head_round_trips_losslessly(
    status: int, headers: list[tuple[bytes, bytes]], sent: float, received: float
) -> None:
    head = StoredHead(status, tuple(headers), sent, received)
    assert StoredHead.decode(head.encode()) == head


def test_stored_head_refuses_anything_cut_or_foreign() -> None:
    encoded = StoredHead(200, ((b"a", b"b"),)).encode()
    for cut in range(len(encoded)):
        with pytest.raises(ValueError):
            StoredHead.decode(encoded[:cut])
    with pytest.raises(ValueError, match="after"):
        StoredHead.decode(encoded + b"x")
    with pytest.raises(ValueError, match="not a stored head"):
        StoredHead.decode(b"XXXX" + encoded[4:])
    with pytest.raises(TypeError):
        StoredHead(200, (("a", "b"),))  # type: ignore[arg-type]


def test_fill_progress_round_trips_and_a_torn_record_reads_as_none() -> None:
    progress = FillProgress(7, 3 * MIB, 8 * MIB, 9 * MIB, 4, FillState.FILLING, 1234)
    encoded = progress.encode()
    assert len(encoded) == FillProgress.SIZE
    assert FillProgress.decode(encoded) == progress
    assert FillProgress.decode(b"") is None
    torn = encoded[:10] + bytes([encoded[10] ^ 1]) + encoded[11:]
    assert FillProgress.decode(torn) is None


def test_fill_progress_says_what_is_readable_from_an_offset() -> None:
    progress = FillProgress(1, 100, 400, 450, 0, FillState.FILLING, 1)
    assert progress.available_end(0) == 100
    assert progress.available_end(99) == 100
    assert progress.available_end(100) == 100  # not yet
    assert progress.available_end(420) == 450
    assert progress.available_end(450) == 450
