"""Resuming a download from a replica after the upstream failed mid-body (RFC 9110).

A response may be resumed only when a second request can name exactly the bytes
that are missing and prove they belong to the same representation: a GET
answered 200 or 206 with a strong ETag, ``Accept-Ranges: bytes``, no (or identity)
Content-Encoding and a known length (``plan``). The continuation is asked with
``Range: bytes=<next>-<last>`` and ``If-Range: <etag>`` (``range_headers``) and
accepted only as a 206 whose Content-Range is exactly ``bytes next-last/total``
and whose ETag is the same, character for character (``accepts``); anything else
(a 200 to the If-Range, another ETag, another length) is refused: two different
contents are never spliced. Pure: headers are passed in as a mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ResumePlan:
    """What the first response promised: bytes ``first``..``last`` of ``total``."""

    etag: str
    first: int
    last: int  # inclusive
    total: int

    def range_headers(self, delivered: int) -> dict[str, str]:
        """The headers that ask for what is missing after ``delivered`` body bytes."""
        return {"Range": f"bytes={self.first + delivered}-{self.last}", "If-Range": self.etag}

    def accepts(
        self, delivered: int, status: int, headers: Mapping[str, str]
    ) -> str | None:  # fmt: skip
        """None when the answer continues this body exactly; else why not."""
        if status != 206:
            return f"status {status}, not 206"
        if headers.get("ETag") != self.etag:
            return "another ETag"
        expected = f"bytes {self.first + delivered}-{self.last}/{self.total}"
        if headers.get("Content-Range") != expected:
            return "another Content-Range"
        if _encoded(headers):
            return "encoded"
        length = headers.get("Content-Length")
        if length is not None and length != str(self.last - self.first - delivered + 1):
            return "another Content-Length"
        return None


def strong_etag(value: str | None) -> str | None:
    """The ETag if it is strong (``"..."``, not ``W/"..."``), else None."""
    if not value or value.startswith("W/") or len(value) < 2:
        return None
    if not (value[0] == '"' and value[-1] == '"') or '"' in value[1:-1]:
        return None
    return value


def parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes first-last/total`` with a known total, else None."""
    if not value:
        return None
    unit, _, spec = value.strip().partition(" ")
    span, _, total_text = spec.partition("/")
    first_text, dash, last_text = span.partition("-")
    numbers = (first_text, last_text, total_text)
    if unit != "bytes" or not dash or not all(n.isdigit() and n.isascii() for n in numbers):
        return None
    first, last, total = (int(n) for n in numbers)
    if not first <= last < total:
        return None
    return first, last, total


def _encoded(headers: Mapping[str, str]) -> bool:
    encoding = headers.get("Content-Encoding", "").strip().lower()
    return encoding not in ("", "identity")


#: Smaller bodies are not worth the resume machinery (and are the hot path).
MIN_RESUMABLE_BYTES = 64 * 1024


def plan(
    method: str, status: int, headers: Mapping[str, str], min_length: int = MIN_RESUMABLE_BYTES
) -> ResumePlan | None:
    """How this response could be resumed, or None when it cannot be (safely), or when its
    body is shorter than ``min_length``."""
    if method != "GET" or status not in (200, 206):
        return None
    length_text = headers.get("Content-Length")
    if length_text is None or len(length_text) < len(str(min_length)):
        return None  # no length, or fewer digits than min_length has: shorter
    etag = strong_etag(headers.get("ETag"))
    if etag is None or _encoded(headers):
        return None
    if headers.get("Accept-Ranges", "").strip().lower() != "bytes" and status == 200:
        return None
    if not length_text.isdigit() or not length_text.isascii():
        return None
    length = int(length_text)
    if length < max(1, min_length):
        return None
    if status == 200:
        return ResumePlan(etag, 0, length - 1, length)
    span = parse_content_range(headers.get("Content-Range"))
    if span is None or span[1] - span[0] + 1 != length:
        return None
    return ResumePlan(etag, *span)
