"""RFC 9111 (and RFC 5861, RFC 9211) rules for a shared cache: one test per rule, each
naming its section. Times are whole seconds from T0; headers are raw pairs."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fileproxy.cache.policy import (
    DELTA_SECONDS_MAX,
    HEURISTIC_MAX_S,
    HEURISTICALLY_CACHEABLE,
    REUSE_REQUEST_FIELDS,
    Forward,
    HeaderField,
    Reuse,
    Storability,
    StoredResponse,
    age_value,
    cache_status,
    conditional_headers,
    current_age,
    freshen,
    freshness,
    freshness_lifetime,
    invalidated_uris,
    parse_cache_control,
    parse_http_date,
    reuse,
    reuse_fresh,
    secondary_key,
    stale_if_error_allowed,
    storable,
    variant_matches,
    vary_fields,
)

T0 = 1_796_000_000.0  # a whole second, in 2026
DATE = formatdate(T0, usegmt=True)


def http_date(t: float) -> str:
    return formatdate(t, usegmt=True)


def stored(
    *headers: HeaderField,
    status: int = 200,
    request_time: float = T0,
    response_time: float = T0,
    request_headers: tuple[HeaderField, ...] = (),
    date: bool = True,
) -> StoredResponse:
    fields = ((("Date", DATE),) if date else ()) + headers
    return StoredResponse.of(status, fields, request_headers, request_time, response_time)


def lifetime(*headers: HeaderField, status: int = 200, response_time: float = T0) -> float:
    return freshness_lifetime(status, [("Date", DATE), *headers], response_time=response_time)


def store_verdict(
    *headers: HeaderField, status: int = 200, request: tuple[HeaderField, ...] = ()
) -> Storability:
    return storable("GET", request, status, [("Date", DATE), *headers])


MAX_AGE_60 = ("Cache-Control", "max-age=60")
ETAG = ("ETag", '"v1"')
LAST_MODIFIED = ("Last-Modified", http_date(T0 - 10_000))

# ---------------------------------------------------------------- storing (RFC 9111 3)


def test_rfc9111_3_only_get_responses_are_stored() -> None:
    for method in ("HEAD", "POST", "PUT", b"post", "OPTIONS"):
        assert storable(method, [], 200, [MAX_AGE_60]) is Storability.METHOD
    assert storable(b"get", [], 200, [MAX_AGE_60]) is Storability.STORE


def test_rfc9111_3_heuristically_cacheable_statuses_need_no_explicit_freshness() -> None:
    """RFC 9110 15.1's list; 206 is stored by the chunk map (STORE_PARTIAL)."""
    for status in HEURISTICALLY_CACHEABLE:
        expected = Storability.STORE_PARTIAL if status == 206 else Storability.STORE
        assert store_verdict(LAST_MODIFIED, status=status) is expected, status
    for status in (201, 302, 307, 400, 403, 500, 502, 503):
        assert store_verdict(LAST_MODIFIED, status=status) is Storability.STATUS, status


def test_rfc9111_3_other_statuses_only_with_explicit_freshness_or_public() -> None:
    assert store_verdict(MAX_AGE_60, status=302) is Storability.STORE
    assert store_verdict(("Expires", http_date(T0 + 60)), status=503) is Storability.STORE
    assert store_verdict(("Cache-Control", "s-maxage=5"), status=500) is Storability.STORE
    assert store_verdict(("Cache-Control", "public"), ETAG, status=307) is Storability.STORE


def test_rfc9111_3_interim_and_304_responses_are_not_stored() -> None:
    for status in (100, 103, 304):
        assert store_verdict(MAX_AGE_60, status=status) is Storability.STATUS


def test_rfc9111_5_2_2_5_response_no_store_is_never_stored() -> None:
    assert store_verdict(("Cache-Control", "max-age=60, No-Store")) is Storability.NO_STORE
    assert store_verdict(("cache-control", "public"), ("Cache-Control", "no-store")) is (
        Storability.NO_STORE
    )


def test_rfc9111_5_2_1_5_request_no_store_forbids_storing_the_response() -> None:
    verdict = store_verdict(MAX_AGE_60, request=(("Cache-Control", "no-store"),))
    assert verdict is Storability.NO_STORE


def test_rfc9111_5_2_2_3_must_understand_overrides_no_store_only_for_understood_statuses() -> None:
    both = ("Cache-Control", "must-understand, no-store, max-age=60")
    assert store_verdict(both) is Storability.STORE
    assert store_verdict(both, status=299) is Storability.STATUS


def test_rfc9111_5_2_2_7_private_is_never_stored_by_a_shared_cache() -> None:
    assert store_verdict(("Cache-Control", "private, max-age=60")) is Storability.PRIVATE
    # the qualified form acts as the unqualified one
    qualified = ("Cache-Control", 'private="X-User", max-age=60')
    assert store_verdict(qualified) is Storability.PRIVATE


def test_rfc9111_3_5_authorization_needs_public_s_maxage_or_must_revalidate() -> None:
    credentials = ((b"authorization", b"Basic dTpw"),)
    assert store_verdict(MAX_AGE_60, request=credentials) is Storability.AUTHORIZATION
    for allowing in ("public", "s-maxage=60", "must-revalidate, max-age=60"):
        verdict = store_verdict(("Cache-Control", allowing), ETAG, request=credentials)
        assert verdict is Storability.STORE, allowing


def test_rfc9111_4_1_vary_star_is_never_stored() -> None:
    assert store_verdict(MAX_AGE_60, ("Vary", "Accept-Encoding, *")) is Storability.VARY_STAR
    assert store_verdict(MAX_AGE_60, ("Vary", "*")) is Storability.VARY_STAR


def test_set_cookie_responses_are_never_stored_for_sharing() -> None:
    """Beyond RFC 9111 (which allows it): nginx and Varnish refuse them by default."""
    cookie = (b"Set-Cookie", b"session=\xff\x01; HttpOnly")
    assert store_verdict(MAX_AGE_60, cookie) is Storability.SET_COOKIE


def test_rfc9111_3_response_without_freshness_or_validator_is_not_stored() -> None:
    """It could never be reused (stale on arrival, nothing to revalidate with)."""
    assert store_verdict() is Storability.UNUSABLE
    assert store_verdict(("Cache-Control", "max-age=0")) is Storability.UNUSABLE
    assert store_verdict(ETAG) is Storability.STORE
    assert store_verdict(LAST_MODIFIED) is Storability.STORE
    assert store_verdict(("Cache-Control", "stale-if-error=60")) is Storability.STORE
    # no Date: a valid Expires counts as future unless the response time says otherwise
    assert storable("GET", [], 200, [("Expires", http_date(T0))]) is Storability.STORE
    late = storable("GET", [], 200, [("Expires", http_date(T0))], response_time=T0 + 1)
    assert late is Storability.UNUSABLE


def test_rfc9111_5_2_2_4_response_no_cache_does_not_prevent_storing() -> None:
    assert store_verdict(("Cache-Control", "no-cache"), ETAG) is Storability.STORE


# ---------------------------------------------------------------- freshness (RFC 9111 4.2.1)


def test_rfc9111_4_2_1_s_maxage_wins_over_max_age_and_expires() -> None:
    expires = ("Expires", http_date(T0 + 1000))
    assert lifetime(("Cache-Control", "max-age=60, s-maxage=30"), expires) == 30
    assert lifetime(("Cache-Control", "max-age=60"), expires) == 60
    assert lifetime(expires) == 1000


def test_rfc9111_4_2_1_expires_minus_date_or_the_response_time_without_date() -> None:
    assert lifetime(("Expires", http_date(T0 - 5))) == 0
    dated = [("Date", DATE), ("Expires", http_date(T0 + 100))]
    assert freshness_lifetime(200, dated, response_time=T0 + 40) == 100
    no_date = [("Expires", http_date(T0 + 100))]
    assert freshness_lifetime(200, no_date, response_time=T0 + 40) == 60


def test_rfc9111_5_3_invalid_expires_such_as_0_is_already_expired() -> None:
    assert lifetime(("Expires", "0")) == 0
    assert lifetime(("Expires", "tomorrow")) == 0
    # two different Expires lines: stale (RFC 9111 4.2.1)
    assert lifetime(("Expires", http_date(T0 + 60)), ("Expires", http_date(T0 + 90))) == 0
    assert lifetime(("Expires", http_date(T0 + 60)), ("Expires", http_date(T0 + 60))) == 60


def test_rfc9111_4_2_1_invalid_or_conflicting_max_age_makes_the_response_stale() -> None:
    expires = ("Expires", http_date(T0 + 1000))
    for bad in ("max-age=abc", "max-age=-5", "max-age=1.5", "max-age=", "max-age=60, max-age=30"):
        assert lifetime(("Cache-Control", bad), expires) == 0, bad
    assert lifetime(("Cache-Control", "s-maxage=x, max-age=60")) == 0
    # the same value twice is no conflict
    assert lifetime(("Cache-Control", "max-age=60"), ("Cache-Control", "max-age=60")) == 60


def test_rfc9111_1_2_2_delta_seconds_overflow_is_2_to_the_31() -> None:
    assert lifetime(("Cache-Control", "max-age=99999999999999999999")) == DELTA_SECONDS_MAX
    assert lifetime(("Cache-Control", "max-age=0000000000000005")) == 5


def test_rfc9111_5_2_directive_arguments_may_be_quoted_and_unknown_ones_are_ignored() -> None:
    assert lifetime(("Cache-Control", 'max-age="60"')) == 60
    assert lifetime(("Cache-Control", 'community="UCI", x-ext=1, max-age=7')) == 7
    # a malformed member is skipped up to the next comma
    assert lifetime(("Cache-Control", 'foo="unterminated, max-age=60')) == 60
    assert lifetime(("Cache-Control", "max-age=60, ,, =oops, public")) == 60
    # bytes from the backend: only space and tab are whitespace; a 0xA0 spoils the number
    assert lifetime((b"Cache-Control", b" max-age=60 ,\tpublic")) == 60
    assert lifetime((b"Cache-Control", b"max-age=60\xa0")) == 0
    cc = parse_cache_control([b"Public, MAX-AGE=10", 'no-cache="Set-Cookie, X-A"'])
    assert (cc.public, cc.max_age, cc.no_cache, cc.invalid) == (True, 10, True, False)


def test_rfc9111_4_2_1_conflicting_request_limits_take_the_most_restrictive() -> None:
    cc = parse_cache_control(["max-stale=10, max-stale=100, min-fresh=50, min-fresh=5"])
    assert (cc.max_stale, cc.min_fresh) == (10, 50)
    assert parse_cache_control(["max-stale"]).max_stale == DELTA_SECONDS_MAX


def test_rfc9111_4_2_2_heuristic_is_ten_percent_of_date_minus_last_modified_capped() -> None:
    assert lifetime(("Last-Modified", http_date(T0 - 10_000))) == 1000
    assert lifetime(("Last-Modified", http_date(T0 - 100 * 86_400))) == HEURISTIC_MAX_S
    # not without Last-Modified, nor with one in the future
    assert lifetime(ETAG) == 0
    assert lifetime(("Last-Modified", http_date(T0 + 10))) == 0


def test_rfc9111_4_2_2_no_heuristic_with_explicit_expiry_or_uncacheable_status() -> None:
    assert lifetime(("Cache-Control", "max-age=5"), LAST_MODIFIED) == 5
    assert lifetime(("Expires", "0"), LAST_MODIFIED) == 0
    assert lifetime(LAST_MODIFIED, status=302) == 0
    assert lifetime(LAST_MODIFIED, ("Cache-Control", "public"), status=302) == 1000


def test_rfc9110_5_6_7_http_dates_in_the_three_formats() -> None:
    expected = 784111777.0
    for text in (
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        b"Sun, 06 Nov 1994 08:49:37 GMT",
    ):
        assert parse_http_date(text) == expected, text
    for bad in ("0", "", "Sun, 06 Nov 1994 08:49:37 PST", "Sun, 32 Nov 1994 08:49:37 GMT", "\xff"):
        assert parse_http_date(bad) is None, bad


# ---------------------------------------------------------------- age (RFC 9111 4.2.3)


def test_rfc9111_4_2_3_age_header_plus_response_delay_plus_resident_time() -> None:
    response = stored(("Age", "100"), request_time=T0 - 2, response_time=T0)
    # corrected_age_value = 100 + 2 > apparent_age 0; resident 30
    assert current_age(response, T0 + 30) == 132


def test_rfc9111_4_2_3_apparent_age_when_date_is_older_than_age_says() -> None:
    response = stored(("Age", "5"), request_time=T0 + 49, response_time=T0 + 50)
    # apparent_age = 50 > corrected_age_value 5 + 1
    assert current_age(response, T0 + 60) == 60


def test_rfc9111_4_2_3_date_in_the_future_gives_no_negative_age() -> None:
    response = stored(request_time=T0 - 100, response_time=T0 - 100)
    assert current_age(response, T0 - 100) == 0
    assert age_value(response, T0 - 100) == "0"


def test_rfc9111_5_1_invalid_age_is_ignored_and_a_list_uses_its_first_member() -> None:
    assert current_age(stored(("Age", "abc")), T0) == 0
    assert current_age(stored(("Age", "-5")), T0) == 0
    assert current_age(stored(("Age", "10, 20")), T0) == 10
    assert current_age(stored(("Age", "10"), ("Age", "20")), T0) == 10


def test_rfc9111_5_1_age_sent_is_whole_seconds() -> None:
    response = stored(("Age", "7"), MAX_AGE_60, request_time=T0 - 0.25)
    assert age_value(response, T0 + 12.9) == "20"  # 7 + 0.25 + 12.9


# ---------------------------------------------------------------- reuse (RFC 9111 4)


def test_rfc9111_4_2_fresh_response_is_served_with_its_age_and_ttl() -> None:
    decision = reuse("GET", [], stored(MAX_AGE_60), T0 + 20)
    assert (decision.action, decision.age, decision.ttl, decision.fwd) == (
        Reuse.FRESH,
        20,
        40,
        None,
    )


def test_rfc9111_4_head_is_answered_from_a_stored_get() -> None:
    assert reuse("HEAD", [], stored(MAX_AGE_60), T0).action is Reuse.FRESH


def test_rfc9111_4_other_methods_go_forward() -> None:
    decision = reuse("POST", [], stored(MAX_AGE_60), T0)
    assert (decision.action, decision.fwd) == (Reuse.MISS, Forward.METHOD)


def test_rfc9111_4_nothing_stored_is_a_miss() -> None:
    assert reuse("GET", [], None, T0).fwd is Forward.URI_MISS
    vary_miss = reuse("GET", [], None, T0, fwd_when_absent=Forward.VARY_MISS)
    assert (vary_miss.action, vary_miss.fwd) == (Reuse.MISS, Forward.VARY_MISS)


def test_rfc9111_4_3_stale_with_a_validator_is_revalidated_without_one_forwarded() -> None:
    decision = reuse("GET", [], stored(MAX_AGE_60, ETAG), T0 + 61)
    assert (decision.action, decision.fwd, decision.ttl) == (Reuse.REVALIDATE, Forward.STALE, -1)
    decision = reuse("GET", [], stored(MAX_AGE_60), T0 + 61)
    assert (decision.action, decision.fwd) == (Reuse.MISS, Forward.STALE)


def test_rfc9111_4_2_without_freshness_but_with_a_validator_revalidate_on_every_use() -> None:
    response = stored(ETAG)
    assert store_verdict(ETAG) is Storability.STORE
    for now in (T0, T0 + 1, T0 + 86_400):
        assert reuse("GET", [], response, now).action is Reuse.REVALIDATE


def test_rfc9111_5_2_2_4_response_no_cache_revalidates_even_when_fresh() -> None:
    response = stored(("Cache-Control", "no-cache, max-age=600"), ETAG)
    assert reuse("GET", [], response, T0 + 1).action is Reuse.REVALIDATE


def test_rfc9111_5_2_1_4_request_no_cache_revalidates() -> None:
    decision = reuse("GET", [("Cache-Control", "no-cache")], stored(MAX_AGE_60, ETAG), T0)
    assert (decision.action, decision.fwd) == (Reuse.REVALIDATE, Forward.REQUEST)


def test_rfc9111_5_4_pragma_no_cache_counts_only_without_cache_control() -> None:
    response = stored(MAX_AGE_60, ETAG)
    assert reuse("GET", [("Pragma", "no-cache")], response, T0).action is Reuse.REVALIDATE
    both = [("Pragma", "no-cache"), ("Cache-Control", "max-stale=5")]
    assert reuse("GET", both, response, T0).action is Reuse.FRESH


def test_rfc9111_5_2_1_1_request_max_age_limits_the_age() -> None:
    response = stored(MAX_AGE_60, ETAG)
    assert reuse("GET", [("Cache-Control", "max-age=10")], response, T0 + 10).action is Reuse.FRESH
    just_older = reuse("GET", [("Cache-Control", "max-age=10")], response, T0 + 10.5)
    assert just_older.action is Reuse.REVALIDATE
    older = reuse("GET", [("Cache-Control", "max-age=10")], response, T0 + 11)
    assert (older.action, older.fwd) == (Reuse.REVALIDATE, Forward.REQUEST)
    assert reuse("GET", [("Cache-Control", "max-age=0")], response, T0 + 1).action is (
        Reuse.REVALIDATE
    )


def test_rfc9111_5_2_1_3_request_min_fresh_needs_that_much_freshness_left() -> None:
    response = stored(MAX_AGE_60, ETAG)
    headers = [("Cache-Control", "min-fresh=30")]
    assert reuse("GET", headers, response, T0 + 30).action is Reuse.FRESH
    assert reuse("GET", headers, response, T0 + 31).action is Reuse.REVALIDATE


def test_rfc9111_5_2_1_2_request_max_stale_accepts_that_much_staleness() -> None:
    response = stored(MAX_AGE_60, ETAG)
    decision = reuse("GET", [("Cache-Control", "max-stale=10")], response, T0 + 70)
    assert (decision.action, decision.ttl) == (Reuse.STALE, -10)
    assert reuse("GET", [("Cache-Control", "max-stale=10")], response, T0 + 71).action is (
        Reuse.REVALIDATE
    )
    assert reuse("GET", [("Cache-Control", "max-stale")], response, T0 + 10**6).action is (
        Reuse.STALE
    )


@pytest.mark.parametrize(
    "forbidding", ["must-revalidate", "proxy-revalidate", "s-maxage=60", "max-age=60, no-cache"]
)
def test_rfc9111_4_2_4_stale_is_never_served_against_revalidation_directives(
    forbidding: str,
) -> None:
    """5.2.2.2 must-revalidate, 5.2.2.8 proxy-revalidate, 5.2.2.10 s-maxage."""
    response = stored(
        ("Cache-Control", f"max-age=60, {forbidding}, stale-while-revalidate=99"), ETAG
    )
    assert reuse("GET", [("Cache-Control", "max-stale")], response, T0 + 61).action is (
        Reuse.REVALIDATE
    )
    assert reuse("GET", [], response, T0 + 61).action is Reuse.REVALIDATE
    assert not stale_if_error_allowed(
        [("Cache-Control", "stale-if-error=999")], response, T0 + 61, 503
    )


def test_rfc9111_5_2_1_7_only_if_cached_answers_504_when_nothing_usable() -> None:
    only = [("Cache-Control", "only-if-cached")]
    assert reuse("GET", only, None, T0).action is Reuse.GATEWAY_TIMEOUT
    response = stored(MAX_AGE_60, ETAG)
    assert reuse("GET", only, response, T0 + 1).action is Reuse.FRESH
    assert reuse("GET", only, response, T0 + 61).action is Reuse.GATEWAY_TIMEOUT
    with_stale = [("Cache-Control", "only-if-cached, max-stale=5")]
    assert reuse("GET", with_stale, response, T0 + 61).action is Reuse.STALE


def test_rfc9111_5_2_1_5_request_no_store_still_uses_a_stored_response() -> None:
    response = stored(MAX_AGE_60)
    assert reuse("GET", [("Cache-Control", "no-store")], response, T0).action is Reuse.FRESH


def test_rfc5861_3_stale_while_revalidate_serves_stale_within_its_window() -> None:
    response = stored(("Cache-Control", "max-age=60, stale-while-revalidate=30"), ETAG)
    decision = reuse("GET", [], response, T0 + 90)
    assert (decision.action, decision.fwd, decision.age) == (
        Reuse.STALE_WHILE_REVALIDATE,
        Forward.STALE,
        90,
    )
    assert reuse("GET", [], response, T0 + 91).action is Reuse.REVALIDATE
    assert reuse("GET", [("Cache-Control", "no-cache")], response, T0 + 61).action is (
        Reuse.REVALIDATE
    )


def test_rfc5861_4_stale_if_error_in_response_or_request() -> None:
    response = stored(("Cache-Control", "max-age=60, stale-if-error=100"), ETAG)
    assert stale_if_error_allowed([], response, T0 + 160, 503)
    assert stale_if_error_allowed([], response, T0 + 160, None)  # no answer at all
    assert not stale_if_error_allowed([], response, T0 + 161, 502)
    assert not stale_if_error_allowed([], response, T0 + 61, 404)  # not an error
    # the request's own window wins
    assert stale_if_error_allowed(
        [("Cache-Control", "stale-if-error=500")], response, T0 + 500, 500
    )
    assert not stale_if_error_allowed(
        [("Cache-Control", "stale-if-error=5")], response, T0 + 70, 500
    )
    plain = stored(MAX_AGE_60, ETAG)
    assert not stale_if_error_allowed([], plain, T0 + 61, 503)
    assert stale_if_error_allowed([("Cache-Control", "stale-if-error=10")], plain, T0 + 70, 503)
    assert not stale_if_error_allowed([("Cache-Control", "no-cache")], response, T0 + 61, 503)


# ---------------------------------------------------------------- validation (RFC 9111 4.3)


def test_rfc9111_4_3_1_conditional_request_carries_the_stored_validators() -> None:
    assert conditional_headers(stored(ETAG)) == [("If-None-Match", '"v1"')]
    weak = stored((b"etag", b'W/"\xffv"'))
    assert conditional_headers(weak) == [("If-None-Match", b'W/"\xffv"')]
    both = stored(ETAG, LAST_MODIFIED)
    assert conditional_headers(both) == [
        ("If-None-Match", '"v1"'),
        ("If-Modified-Since", LAST_MODIFIED[1]),
    ]
    assert conditional_headers(stored(("ETag", "unquoted"))) == []
    assert conditional_headers(stored(MAX_AGE_60)) == []


def test_rfc9111_4_3_4_and_3_2_a_304_updates_the_stored_headers_but_not_framing() -> None:
    response = stored(
        ("Content-Length", "1048576"),
        ("Content-Type", "application/octet-stream"),
        ("Cache-Control", "max-age=60"),
        ETAG,
        ("X-Old", "a"),
        ("X-Old", "b"),
        request_time=T0,
        response_time=T0,
    )
    later = T0 + 1000
    merged = freshen(
        response,
        [
            ("Date", http_date(later)),
            ("Cache-Control", "max-age=120"),
            ETAG,
            ("Content-Length", "0"),
            ("Set-Cookie", "s=1"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("X-Old", "c"),
        ],
        request_time=later - 1,
        response_time=later,
    )
    assert merged is not None
    names = [(str(n).lower(), v) for n, v in merged.headers]
    assert ("content-length", "1048576") in names
    assert ("content-type", "application/octet-stream") in names
    assert ("cache-control", "max-age=120") in names
    assert ("x-old", "c") in names and ("x-old", "a") not in names
    assert all(n not in ("set-cookie", "x-hop", "connection") for n, _ in names)
    assert [v for n, v in names if n == "content-length"] == ["1048576"]
    assert (merged.request_time, merged.response_time) == (later - 1, later)
    decision = reuse("GET", [], merged, later + 100)
    assert (decision.action, decision.age) == (Reuse.FRESH, 101)


def test_rfc9111_4_3_4_which_304_selects_the_stored_response() -> None:
    strong = stored(ETAG, LAST_MODIFIED)
    assert freshen(strong, [("ETag", '"v2"')], T0, T0) is None
    assert freshen(strong, [("ETag", 'W/"v1"')], T0, T0) is not None  # weak comparison
    assert freshen(strong, [LAST_MODIFIED], T0, T0) is not None
    assert freshen(strong, [("Last-Modified", DATE)], T0, T0) is None
    assert freshen(strong, [], T0, T0) is None  # no validator, but the stored one has one
    weak = stored(("ETag", 'W/"v1"'))
    assert freshen(weak, [ETAG], T0, T0) is None  # a strong tag needs a strong match
    assert freshen(stored(MAX_AGE_60), [("Cache-Control", "max-age=5")], T0, T0) is not None


def test_rfc9111_4_3_4_a_304_saying_no_store_ends_the_storage() -> None:
    merged = freshen(stored(ETAG), [ETAG, ("Cache-Control", "no-store")], T0, T0)
    assert merged is not None
    assert storable("GET", [], merged.status, merged.headers) is Storability.NO_STORE


# ---------------------------------------------------------------- Vary (RFC 9111 4.1)


def test_rfc9111_4_1_secondary_key_is_normalised() -> None:
    assert vary_fields([("Vary", "Accept-Encoding"), ("vary", " accept-language , X-A")]) == (
        "accept-encoding",
        "accept-language",
        "x-a",
    )
    fields = ("accept-encoding", "x-a")
    one = secondary_key(fields, [("Accept-Encoding", " gzip ,br "), ("X-A", "")])
    other = secondary_key(
        fields, [(b"accept-encoding", b"gzip"), (b"ACCEPT-ENCODING", b"br"), (b"x-a", b" ")]
    )
    assert one == other == (("accept-encoding", "gzip,br"), ("x-a", ""))
    assert secondary_key(fields, [("Accept-Encoding", "gzip")])[1] == ("x-a", None)


def test_rfc9111_4_1_variant_matching() -> None:
    response = stored(
        MAX_AGE_60, ("Vary", "Accept-Encoding"), request_headers=(("Accept-Encoding", "gzip"),)
    )
    assert variant_matches(response, [("accept-encoding", "  gzip")])
    assert not variant_matches(response, [("Accept-Encoding", "br")])
    assert not variant_matches(response, [])  # absent is not the same as a value
    assert variant_matches(stored(MAX_AGE_60), [("Accept-Encoding", "anything")])


def test_rfc9111_4_1_vary_star_never_matches() -> None:
    response = stored(MAX_AGE_60, ("Vary", "*"))
    assert vary_fields(response.headers) is None
    assert not variant_matches(response, [])


# ---------------------------------------------------------------- invalidation (RFC 9111 4.4)


def test_rfc9111_4_4_unsafe_methods_that_succeed_invalidate_the_target() -> None:
    target = "http://files.example/a/b.bin"
    for method in ("POST", "PUT", "DELETE", "PATCH", "PURGE", b"put"):
        assert invalidated_uris(method, target, 204, []) == [target], method
    for method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        assert invalidated_uris(method, target, 200, []) == []
    for status in (100, 400, 404, 500, 503):
        assert invalidated_uris("POST", target, status, []) == []


def test_rfc9111_4_4_location_and_content_location_only_on_the_same_origin() -> None:
    target = "http://files.example/a/b.bin"
    found = invalidated_uris(
        "POST",
        target,
        303,
        [("Location", "c.bin"), ("Content-Location", "http://FILES.example:80/d")],
    )
    assert found == [target, "http://files.example/a/c.bin", "http://FILES.example:80/d"]
    elsewhere = [
        ("Location", "http://other.example/x"),
        ("Content-Location", "https://files.example/y"),
    ]
    assert invalidated_uris("PUT", target, 201, elsewhere) == [target]
    not_uris = [("Location", "http://[::1/x"), ("Content-Location", "http://files.example:99999/")]
    assert invalidated_uris("DELETE", target, 200, not_uris) == [target]


# ---------------------------------------------------------------- Cache-Status (RFC 9211)


def test_rfc9211_2_cache_status_values() -> None:
    assert cache_status(hit=True, ttl=42.7) == "fileproxy; hit; ttl=42"
    assert cache_status(fwd=Forward.MISS, stored=True) == "fileproxy; fwd=miss; stored"
    assert cache_status(fwd=Forward.STALE, fwd_status=304, ttl=-3.5) == (
        "fileproxy; fwd=stale; fwd-status=304; ttl=-3"
    )
    assert cache_status(fwd=Forward.URI_MISS) == "fileproxy; fwd=uri-miss"
    assert cache_status(fwd=Forward.VARY_MISS) == "fileproxy; fwd=vary-miss"
    assert cache_status(hit=True, detail="max-stale") == "fileproxy; hit; detail=max-stale"
    assert cache_status(fwd=Forward.BYPASS, detail='no "room"\x01') == (
        'fileproxy; fwd=bypass; detail="no \\"room\\""'
    )


def test_rfc9211_2_cache_status_of_each_decision() -> None:
    response = stored(("Cache-Control", "max-age=60, stale-while-revalidate=30"), ETAG)
    assert reuse("GET", [], response, T0 + 20).cache_status() == "fileproxy; hit; ttl=40"
    assert reuse("GET", [], response, T0 + 70).cache_status() == (
        "fileproxy; hit; ttl=-10; detail=stale-while-revalidate"
    )
    max_stale = reuse("GET", [("Cache-Control", "max-stale=99")], stored(MAX_AGE_60), T0 + 61)
    assert max_stale.cache_status() == "fileproxy; hit; ttl=-1; detail=max-stale"
    revalidated = reuse("GET", [], response, T0 + 100)
    assert revalidated.cache_status(fwd_status=304, stored=True, ttl=60) == (
        "fileproxy; fwd=stale; fwd-status=304; ttl=60; stored"
    )
    no_cache = reuse("GET", [("Cache-Control", "no-cache")], response, T0)
    assert no_cache.cache_status(fwd_status=200) == (
        "fileproxy; fwd=request; fwd-status=200; detail=request-no-cache"
    )
    assert reuse("GET", [], None, T0).cache_status(fwd_status=200, stored=True, ttl=60) == (
        "fileproxy; fwd=uri-miss; fwd-status=200; ttl=60; stored"
    )
    assert reuse("PUT", [], None, T0).cache_status(fwd_status=201) == (
        "fileproxy; fwd=method; fwd-status=201"
    )
    only = reuse("GET", [("Cache-Control", "only-if-cached")], None, T0)
    assert only.cache_status() == "fileproxy; detail=only-if-cached"


# ---------------------------------------------------------------- robustness

FIELD_NAMES = st.sampled_from(
    [
        b"Cache-Control",
        b"cache-control",
        b"Pragma",
        b"Expires",
        b"Date",
        b"Age",
        b"Last-Modified",
        b"ETag",
        b"Vary",
        b"Authorization",
        b"Set-Cookie",
        b"Location",
        b"Content-Location",
        b"Connection",
        b"X-Other",
    ]
)
FIELD_VALUES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"max-age=60",
            b'max-age="60',
            b"s-maxage=99999999999999999999999",
            b"no-cache, max-stale, min-fresh=x",
            b"stale-while-revalidate=-1, stale-if-error=5",
            b"*",
            b'W/"\xff"',
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            b"http://[::1/x",
            b"http://h:99999/",
        ]
    ),
)
HEADERS = st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=8)


@settings(max_examples=200, deadline=None)
@given(request_headers=HEADERS, response_headers=HEADERS, status=st.integers(100, 599))
def test_any_bytes_from_clients_and_backends_get_an_answer(
    request_headers: list[HeaderField], response_headers: list[HeaderField], status: int
) -> None:
    """Malformed, duplicate, non-UTF-8 fields never raise: each rule answers."""
    verdict = storable("GET", request_headers, status, response_headers)
    assert isinstance(verdict, Storability)
    response = StoredResponse.of(status, response_headers, request_headers, T0, T0 + 1)
    assert freshness_lifetime(status, response_headers, response_time=T0) >= 0
    decision = reuse("GET", request_headers, response, T0 + 5)
    assert isinstance(decision.action, Reuse)
    assert int(age_value(response, T0 + 5)) >= 0
    stale_if_error_allowed(request_headers, response, T0 + 5, 503)
    conditional_headers(response)
    freshen(response, response_headers, T0 + 5, T0 + 6)
    variant_matches(response, request_headers)
    assert invalidated_uris("POST", "http://h/x", 201, response_headers)[0] == "http://h/x"
    status_field = cache_status(
        hit=True,
        ttl=decision.ttl,
        detail=bytes(response_headers[0][1]).decode("latin-1") if response_headers else None,
    )
    assert all(" " <= c <= "~" for c in status_field)  # always a valid field value


@settings(max_examples=300, deadline=None)
@given(
    request_headers=HEADERS,
    response_headers=HEADERS,
    status=st.sampled_from([200, 203, 206, 301, 404, 500]),
    delay=st.integers(0, 5),
    later=st.integers(-10, 100_000),
)
def test_the_hot_path_answers_exactly_as_reuse_for_requests_without_directives(
    request_headers: list[HeaderField],
    response_headers: list[HeaderField],
    status: int,
    delay: int,
    later: int,
) -> None:
    """``reuse_fresh`` (a stored response's ``freshness`` worked out once) gives the
    decision ``reuse`` gives, whenever it gives one: a fresh hit, same age, same ttl;
    it never answers where ``reuse`` says anything else."""
    plain = [
        (n, v) for n, v in request_headers
        if bytes(n).decode("latin-1").strip().lower() not in REUSE_REQUEST_FIELDS
    ]  # fmt: skip
    dated = [(b"Date", http_date(T0).encode()), *response_headers]
    response = StoredResponse.of(status, dated, plain, T0, T0 + delay)
    now = T0 + delay + later
    full = reuse("GET", plain, response, now)
    fast = reuse_fresh(freshness(response), now)
    if fast is not None:
        assert fast == full
    else:
        assert full.action is not Reuse.FRESH
    assert freshness(response).age(now) == current_age(response, now)


def test_the_hot_path_leaves_every_directive_and_stale_response_to_reuse() -> None:
    fresh = stored(("Cache-Control", "max-age=60"))
    assert reuse_fresh(freshness(fresh), T0 + 10) == reuse("GET", [], fresh, T0 + 10)
    assert reuse_fresh(freshness(fresh), T0 + 60) is None  # stale: reuse decides
    no_cache = stored(("Cache-Control", "max-age=60, no-cache"), ("ETag", '"a"'))
    assert reuse_fresh(freshness(no_cache), T0 + 1) is None
    assert reuse("GET", [], no_cache, T0 + 1).action is Reuse.REVALIDATE
    assert {"cache-control", "pragma"} == REUSE_REQUEST_FIELDS
