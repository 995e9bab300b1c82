"""The policy against hishel's RFC 9111 state machine (``hishel/_core/_spec.py``, BSD-3)
as an oracle, on the cases it covers: storability for a shared cache (RFC 9111 3, 3.5),
explicit freshness lifetime (4.2.1) and Vary matching (4.1).

Where the policy deliberately differs, the grid stays out of it: hishel stores a
``Set-Cookie`` response, a response it could never reuse, and no 206; its heuristic
freshness reads the clock; its Vary comparison does not normalise whitespace. Every
response here carries an ETag, so "could never reuse" never arises.
"""

from __future__ import annotations

import itertools
from email.utils import formatdate

import pytest

try:
    from hishel._core._headers import Headers as HishelHeaders
    from hishel._core._spec import (
        CacheMiss,
        CacheOptions,
        StoreAndUse,
        get_freshness_lifetime,
        vary_headers_match,
    )
    from hishel._core.models import Entry, Request, Response
except ImportError as missing:  # a test dependency: fail loudly, never skip
    raise ImportError(
        "hishel is the test oracle: .venv/bin/pip install -e '.[test]' (hishel>=2,<3)"
    ) from missing

from fileproxy.cache.policy import (
    StoredResponse,
    freshness_lifetime,
    storable,
    variant_matches,
)

T0 = 1_796_000_000.0
DIRECTIVES = [
    "no-store",
    "private",
    "public",
    "max-age=60",
    "s-maxage=30",
    "must-revalidate",
    "no-cache",
    "proxy-revalidate",
]
STATUSES = [200, 203, 301, 302, 307, 404, 410, 500, 503]


def grid() -> list[tuple[tuple[str, ...], bool, int, bool]]:
    cases = []
    for n in range(len(DIRECTIVES) + 1):
        for combo in itertools.combinations(DIRECTIVES, n):
            for auth, status, expires in itertools.product((False, True), STATUSES, (False, True)):
                cases.append((combo, auth, status, expires))
    return cases


def response_headers(combo: tuple[str, ...], expires: bool) -> dict[str, str]:
    headers = {"date": formatdate(T0, usegmt=True), "etag": '"a"'}
    if combo:
        headers["cache-control"] = ", ".join(combo)
    if expires:
        headers["expires"] = formatdate(T0 + 100, usegmt=True)
    return headers


def test_rfc9111_3_storability_agrees_with_hishel_on_a_grid_of_directives() -> None:
    cases = grid()
    assert len(cases) > 9000
    disagreements = []
    for combo, auth, status, expires in cases:
        request = {"authorization": "Basic dTpw"} if auth else {}
        response = response_headers(combo, expires)
        oracle = CacheMiss(
            request=Request(method="GET", url="http://o/f", headers=HishelHeaders(request)),
            options=CacheOptions(shared=True),
        ).next(Response(status_code=status, headers=HishelHeaders(response)))
        ours = storable("GET", list(request.items()), status, list(response.items()))
        if isinstance(oracle, StoreAndUse) != ours.stored:
            disagreements.append((combo, auth, status, expires, type(oracle).__name__, ours))
    assert disagreements == []


def test_rfc9111_4_2_1_explicit_freshness_agrees_with_hishel() -> None:
    checked = 0
    for combo, _, status, expires in grid():
        response = response_headers(combo, expires)
        explicit = expires or any(d.startswith(("max-age", "s-maxage")) for d in combo)
        if not explicit:
            continue  # hishel's heuristic reads the clock
        oracle = get_freshness_lifetime(
            Response(status_code=status, headers=HishelHeaders(response)), True
        )
        assert oracle is not None
        ours = freshness_lifetime(status, list(response.items()), response_time=T0)
        assert ours == max(0, oracle), (combo, status, expires)
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("vary", ["", "Accept-Encoding", "accept-encoding, X-A", "X-A", "*"])
def test_rfc9111_4_1_vary_matching_agrees_with_hishel(vary: str) -> None:
    values = [None, "gzip", "br", "gzip, br"]
    for stored_ae, stored_xa, new_ae, new_xa in itertools.product(values, repeat=4):
        stored_request = {
            k: v for k, v in (("accept-encoding", stored_ae), ("x-a", stored_xa)) if v is not None
        }
        new_request = {
            k: v for k, v in (("accept-encoding", new_ae), ("x-a", new_xa)) if v is not None
        }
        response = {"cache-control": "max-age=60"} | ({"vary": vary} if vary else {})
        entry = Entry(
            id=None,  # type: ignore[arg-type]
            request=Request(method="GET", url="http://o/f", headers=HishelHeaders(stored_request)),
            response=Response(status_code=200, headers=HishelHeaders(response)),
        )
        oracle = vary_headers_match(
            Request(method="GET", url="http://o/f", headers=HishelHeaders(new_request)), entry
        )
        stored = StoredResponse.of(
            200, list(response.items()), list(stored_request.items()), T0, T0
        )
        assert variant_matches(stored, list(new_request.items())) == oracle, (
            vary,
            stored_request,
            new_request,
        )
