"""When a download may be resumed, what is asked, and which answer continues it exactly."""

from __future__ import annotations

import pytest

from fileproxy.adaptive.resume import (
    MIN_RESUMABLE_BYTES,
    ResumePlan,
    parse_content_range,
    plan,
    strong_etag,
)

OK_HEAD = {"ETag": '"abc"', "Accept-Ranges": "bytes", "Content-Length": "1000"}


def test_a_full_response_with_a_strong_etag_can_be_resumed():
    assert plan("GET", 200, OK_HEAD, min_length=1) == ResumePlan('"abc"', 0, 999, 1000)


def test_a_partial_response_resumes_within_its_range():
    head = {"ETag": '"abc"', "Content-Range": "bytes 100-199/1000", "Content-Length": "100"}
    resumable = plan("GET", 206, head, min_length=100)
    assert resumable == ResumePlan('"abc"', 100, 199, 1000)
    assert resumable.range_headers(40) == {"Range": "bytes=140-199", "If-Range": '"abc"'}


@pytest.mark.parametrize(
    ("method", "status", "change"),
    [
        ("HEAD", 200, {}),
        ("POST", 200, {}),
        ("GET", 404, {}),
        ("GET", 200, {"ETag": 'W/"abc"'}),
        ("GET", 200, {"ETag": None}),
        ("GET", 200, {"Accept-Ranges": None}),
        ("GET", 200, {"Accept-Ranges": "none"}),
        ("GET", 200, {"Content-Encoding": "gzip"}),
        ("GET", 200, {"Content-Length": None}),
        ("GET", 200, {"Content-Length": "0"}),
    ],
)
def test_no_plan_without_every_guarantee(method, status, change):
    head = {k: v for k, v in {**OK_HEAD, **change}.items() if v is not None}
    assert plan(method, status, head, min_length=1) is None


def test_small_bodies_are_not_resumed():
    assert plan("GET", 200, OK_HEAD, min_length=1001) is None
    assert plan("GET", 200, OK_HEAD) is None  # 1000 bytes: under MIN_RESUMABLE_BYTES
    big = {**OK_HEAD, "Content-Length": str(MIN_RESUMABLE_BYTES)}
    assert plan("GET", 200, big) == ResumePlan(
        '"abc"', 0, MIN_RESUMABLE_BYTES - 1, MIN_RESUMABLE_BYTES
    )


def test_only_the_exact_continuation_is_accepted():
    resumable = ResumePlan('"abc"', 0, 999, 1000)
    good = {"ETag": '"abc"', "Content-Range": "bytes 400-999/1000", "Content-Length": "600"}
    assert resumable.accepts(400, 206, good) is None
    assert resumable.accepts(400, 200, good) == "status 200, not 206"
    assert resumable.accepts(400, 206, {**good, "ETag": '"other"'}) == "another ETag"
    assert resumable.accepts(400, 206, {**good, "ETag": 'W/"abc"'}) == "another ETag"
    for wrong in ("bytes 401-999/1000", "bytes 400-999/1001", "bytes 400-998/1000"):
        assert resumable.accepts(400, 206, {**good, "Content-Range": wrong}) is not None
    assert resumable.accepts(400, 206, {**good, "Content-Encoding": "gzip"}) == "encoded"
    assert resumable.accepts(400, 206, {**good, "Content-Length": "599"}) is not None


def test_parsers():
    assert strong_etag('"x"') == '"x"'
    assert strong_etag('W/"x"') is None
    assert strong_etag("x") is None
    assert strong_etag('"a"b"') is None
    assert parse_content_range("bytes 0-9/10") == (0, 9, 10)
    assert parse_content_range("bytes 0-9/*") is None
    assert parse_content_range("bytes 9-0/10") is None
    assert parse_content_range("bytes 0-10/10") is None
    assert parse_content_range("items 0-9/10") is None
