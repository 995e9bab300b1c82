"""The pure pieces of fileproxy/delivery/cache.py: which range a client gets, which chunks a
cold Range fetches, what a fill lacks, a client's conditions on a stored response, the
``auto`` disk budget."""

from __future__ import annotations

import pytest

from fileproxy.delivery.cache import (
    _cold_range,
    _if_range_allows,
    _not_modified,
    _single_range,
    auto_max_size,
    decode_variant,
    encode_variant,
    strong_etag,
)

GIB = 1 << 30


@pytest.mark.parametrize(
    ("value", "length", "expected"),
    [
        (None, 100, None),
        (b"bytes=0-9", 100, (0, 10)),
        (b"bytes=90-", 100, (90, 100)),
        (b"bytes=90-1000", 100, (90, 100)),
        (b"bytes=-10", 100, (90, 100)),
        (b"bytes=-1000", 100, (0, 100)),
        (b"bytes=100-", 100, "unsatisfiable"),
        (b"bytes=-0", 100, "unsatisfiable"),
        (b"bytes=9-0", 100, None),  # invalid: ignored, the whole
        (b"bytes=0-1,5-6", 100, None),  # several ranges: the whole
        (b"items=0-1", 100, None),
        (b"bytes=\xff-1", 100, None),  # not ASCII: ignored, never a crash
    ],
)
def test_a_single_range_of_a_stored_object(
    value: bytes | None, length: int, expected: object
) -> None:
    assert _single_range(value, length) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (b"bytes=5-9", (5, 10)),
        (b"bytes=5-", (5, None)),
        (b"bytes=-5", None),  # a suffix needs the length: fetched whole
        (b"bytes=9-5", None),
        (b"bytes=1-2,4-5", None),
    ],
)
def test_the_range_a_cold_miss_fetches_by_chunks(
    value: bytes | None, expected: tuple[int, int | None] | None
) -> None:
    assert _cold_range(value) == expected


def test_a_clients_if_none_match_and_if_modified_since_against_what_is_stored() -> None:
    stored = [(b"ETag", b'"a"'), (b"Last-Modified", b"Mon, 07 Dec 2026 10:00:00 GMT")]
    assert _not_modified([(b"If-None-Match", b'"b", "a"')], stored)
    assert _not_modified([(b"If-None-Match", b'W/"a"')], stored)  # weak comparison
    assert _not_modified([(b"If-None-Match", b"*")], stored)
    assert not _not_modified([(b"If-None-Match", b'"b"')], stored)
    # If-None-Match decides alone when present (RFC 9110 13.2.2)
    assert not _not_modified(
        [(b"If-None-Match", b'"b"'), (b"If-Modified-Since", b"Tue, 08 Dec 2026 10:00:00 GMT")],
        stored,
    )
    assert _not_modified([(b"If-Modified-Since", b"Mon, 07 Dec 2026 10:00:00 GMT")], stored)
    assert not _not_modified([(b"If-Modified-Since", b"Mon, 07 Dec 2026 09:59:59 GMT")], stored)
    assert not _not_modified([(b"If-Modified-Since", b"garbage")], stored)


def test_if_range_needs_a_strong_match() -> None:
    stored = [(b"ETag", b'"a"'), (b"Last-Modified", b"Mon, 07 Dec 2026 10:00:00 GMT")]
    assert _if_range_allows([], stored)
    assert _if_range_allows([(b"If-Range", b'"a"')], stored)
    assert not _if_range_allows([(b"If-Range", b'"b"')], stored)
    assert not _if_range_allows([(b"If-Range", b'W/"a"')], [(b"ETag", b'W/"a"')])
    assert _if_range_allows([(b"If-Range", b"Mon, 07 Dec 2026 10:00:00 GMT")], stored)
    assert strong_etag([(b"ETag", b'W/"a"')]) is None
    assert strong_etag([(b"etag", b' "a" ')]) == b'"a"'


def test_auto_max_size_is_half_the_filesystem_within_free_space_above_the_watermark() -> None:
    assert auto_max_size(100 * GIB, 80 * GIB, 0, GIB) == 50 * GIB
    assert auto_max_size(100 * GIB, 10 * GIB, 0, GIB) == 9 * GIB
    assert auto_max_size(100 * GIB, 10 * GIB, 30 * GIB, GIB) == 39 * GIB  # what it holds counts
    assert auto_max_size(100 * GIB, GIB // 2, 0, GIB) == 0


def test_a_vary_key_goes_through_its_encoding_unchanged() -> None:
    key = (("accept-encoding", "gzip"), ("accept-language", None), ("x", "caf\xe9"))
    assert decode_variant(encode_variant(key)) == key
    assert encode_variant(()) == b"" and decode_variant(b"") == ()
