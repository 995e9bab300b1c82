"""RFC 9111 rules for a shared cache, strictly; pure (no I/O, no clock: times are passed in).

Headers are what a data plane parsing with httptools has: raw ``(name, value)`` pairs,
``str`` or ``bytes``, in the order received, repeated names allowed. Values are decoded
as Latin-1 (lossless for any byte) to be parsed and compared; pairs the policy returns
(a merged stored response, a conditional request's validators) keep the caller's values
as they came. Times are seconds since the epoch (floats), like the ``Date`` header.

The questions the cache's shell asks, in the order of an exchange:

- ``reuse(method, request headers, stored, now)``: serve the stored response fresh,
  revalidate it, serve it stale while revalidating in the background, forward (miss),
  or answer 504 (``only-if-cached``). ``stored`` is the variant ``variant_matches``
  selected, or None.
- ``conditional_headers(stored)``: the validators to send when revalidating.
- ``storable(method, request headers, status, response headers)``: whether the answer
  may be stored for sharing, and if not why.
- ``StoredResponse.of(...)``: what the cache keeps besides the body (status, headers,
  request/response times, the Vary secondary key).
- ``freshen(stored, 304 headers, ...)``: the 304 merge, or None when the 304 does not
  select the stored response.
- ``stale_if_error_allowed(...)``: whether an error (500/502/503/504 or no answer) may
  be covered with the stale stored response.
- ``invalidated_uris(...)``: what a successful unsafe request invalidates.
- ``age_value(stored, now)`` and ``ReuseDecision.cache_status(...)``: the ``Age`` and RFC 9211
  ``Cache-Status`` of what is sent.
- ``freshness(stored)`` once per stored response, then ``reuse_fresh(freshness, now)`` per
  request without directives (``REUSE_REQUEST_FIELDS``): ``reuse``'s answer when it is a
  fresh hit, with no parsing per request (a cache's hot path).

Choices where RFC 9111 leaves room, all on the safe side for a shared cache:

- A response with ``Set-Cookie`` is never stored (nginx and Varnish refuse it by default):
  one user's session must never reach another.
- Qualified ``private="..."`` and ``no-cache="..."`` act as their unqualified forms
  (RFC 9111 5.2.2.4 and 5.2.2.7 note that caches commonly do so).
- A directive given twice with different arguments, an invalid ``max-age``/``s-maxage``
  argument, or a second ``Expires`` that differs makes the response stale (RFC 9111
  4.2.1 allows "first occurrence" or "stale"; stale is the conservative one).
- Heuristic freshness: 10% of ``Date - Last-Modified``, capped at one day: RFC 7234
  required a warning beyond 24 hours of heuristic freshness, so a day is the RFC's own
  bound, and for large files a revalidation costs only a bodiless 304.
- A response with neither freshness nor a validator (nor ``stale-if-error``) is not
  stored: it could never be reused.
- A ``206`` is ``STORE_PARTIAL``: the storage rules of a 200 apply, and the cache's
  chunk map merges the range into the representation it has (RFC 9111 3.3, 3.4).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urljoin, urlsplit

__all__ = [
    "HEURISTIC_FRACTION",
    "HEURISTIC_MAX_S",
    "REUSE_REQUEST_FIELDS",
    "CacheControl",
    "Forward",
    "Freshness",
    "HeaderField",
    "Headers",
    "Reuse",
    "ReuseDecision",
    "Storability",
    "StoredResponse",
    "VaryKey",
    "age_text",
    "age_value",
    "cache_status",
    "conditional_headers",
    "current_age",
    "freshen",
    "freshness",
    "freshness_lifetime",
    "has_validator",
    "invalidated_uris",
    "parse_cache_control",
    "parse_http_date",
    "reuse",
    "reuse_fresh",
    "secondary_key",
    "stale_if_error_allowed",
    "storable",
    "variant_matches",
    "vary_fields",
]

HeaderField = tuple[str | bytes, str | bytes]
Headers = Sequence[HeaderField]
#: the Vary secondary key: (lower-case field name, normalised value or None if absent)
VaryKey = tuple[tuple[str, str | None], ...]

#: RFC 9111 1.2.2: delta-seconds that overflow count as 2^31
DELTA_SECONDS_MAX = 2**31
HEURISTIC_FRACTION = 0.10
HEURISTIC_MAX_S = 86_400.0
#: RFC 9110 15.1: status codes heuristically cacheable
HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: status codes this cache understands (RFC 9111 3: needed for 206 and ``must-understand``)
UNDERSTOOD = HEURISTICALLY_CACHEABLE | {302, 303, 307}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: RFC 5861 4: the errors stale-if-error may cover (and no answer at all)
ERROR_STATUSES = frozenset({500, 502, 503, 504})
#: RFC 9111 3.2: never taken from a 304 into the stored response (hop-by-hop, framing,
#: the body's coding), nor Set-Cookie: it is for the client that got the 304 alone
_NOT_MERGED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-range",
        "content-encoding",
        "set-cookie",
    }
)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _values(headers: Headers, name: str) -> list[str]:
    """Every field line of ``name`` (lower case), decoded, in order."""
    return [_text(v) for n, v in headers if _text(n).strip().lower() == name]


def _has(headers: Headers, name: str) -> bool:
    return any(_text(n).strip().lower() == name for n, _ in headers)


def _list_members(values: Iterable[str]) -> list[str]:
    """The members of a list-based field over all its lines (empty members dropped)."""
    return [m.strip() for value in values for m in value.split(",") if m.strip()]


# ---------------------------------------------------------------- Cache-Control


@dataclass(frozen=True)
class CacheControl:
    """Parsed ``Cache-Control`` directives (request or response), RFC 9111 5.2.

    Numbers are ``None`` when absent; ``invalid`` is set when a freshness directive
    was malformed or given twice with different arguments (the response is then stale).
    ``max_stale`` is ``DELTA_SECONDS_MAX`` for a bare ``max-stale`` (any staleness).
    """

    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    must_understand: bool = False
    only_if_cached: bool = False
    max_age: int | None = None
    s_maxage: int | None = None
    max_stale: int | None = None
    min_fresh: int | None = None
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None
    invalid: bool = False


_DIRECTIVE = re.compile(
    r"""[ \t]*([!#$%&'*+.^_`|~0-9A-Za-z-]+)   # name (a token); OWS is space and tab only
        [ \t]*(?:=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^," \t]*)))?  # =token or ="quoted string"
        [ \t]*(?:,|$)""",
    re.VERBOSE,
)
_DELTA = re.compile(r"[0-9]+")
_BOOLEAN = {
    "no-store": "no_store",
    "no-cache": "no_cache",
    "private": "private",
    "public": "public",
    "must-revalidate": "must_revalidate",
    "proxy-revalidate": "proxy_revalidate",
    "must-understand": "must_understand",
    "only-if-cached": "only_if_cached",
}
_NUMERIC = {
    "max-age": "max_age",
    "s-maxage": "s_maxage",
    "max-stale": "max_stale",
    "min-fresh": "min_fresh",
    "stale-while-revalidate": "stale_while_revalidate",
    "stale-if-error": "stale_if_error",
}
#: an invalid argument to these makes the response stale (RFC 9111 4.2.1); to the
#: others the directive is ignored
_FRESHNESS = {"max-age", "s-maxage"}


def _delta_seconds(argument: str | None) -> int | None:
    """RFC 9111 1.2.2: a non-negative integer; overflow counts as 2^31."""
    if argument is None or not _DELTA.fullmatch(argument):
        return None
    digits = argument.lstrip("0") or "0"
    return DELTA_SECONDS_MAX if len(digits) > 10 else min(int(digits), DELTA_SECONDS_MAX)


def parse_cache_control(values: Iterable[str | bytes]) -> CacheControl:
    """The directives of all ``Cache-Control`` field lines; unknown ones ignored.

    Names are case-insensitive; arguments may be tokens or quoted strings; a malformed
    member is skipped up to the next comma.
    """
    fields: dict[str, object] = {}
    invalid = False
    seen: dict[str, str | None] = {}
    for raw in values:
        text = _text(raw)
        pos = 0
        while pos < len(text):
            match = _DIRECTIVE.match(text, pos)
            if match is None or match.end() == pos:
                comma = text.find(",", pos)  # malformed member: skip it
                pos = len(text) if comma < 0 else comma + 1
                continue
            pos = match.end()
            name = match.group(1).lower()
            quoted, token = match.group(2), match.group(3)
            argument = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token
            if name in _FRESHNESS and name in seen and seen[name] != argument:
                invalid = True  # given twice, differently: stale (RFC 9111 4.2.1)
            seen.setdefault(name, argument)
            if name in _BOOLEAN:
                fields[_BOOLEAN[name]] = True
            elif name in _NUMERIC:
                if name == "max-stale" and argument in (None, ""):
                    number: int | None = DELTA_SECONDS_MAX
                else:
                    number = _delta_seconds(argument)
                if number is None:
                    if name in _FRESHNESS:
                        invalid = True
                    continue
                attr = _NUMERIC[name]
                previous = fields.get(attr)
                # duplicates: the smaller number is the more restrictive one, except
                # min-fresh where the larger one is
                if isinstance(previous, int):
                    number = max(previous, number) if name == "min-fresh" else min(previous, number)
                fields[attr] = number
    return CacheControl(invalid=invalid, **fields)  # type: ignore[arg-type]


def _cache_control(headers: Headers) -> CacheControl:
    return parse_cache_control(_values(headers, "cache-control"))


def _request_cache_control(headers: Headers) -> CacheControl:
    """RFC 9111 5.4: without Cache-Control, ``Pragma: no-cache`` means ``no-cache``."""
    if _has(headers, "cache-control"):
        return _cache_control(headers)
    pragma = {m.lower() for m in _list_members(_values(headers, "pragma"))}
    return CacheControl(no_cache="no-cache" in pragma)


# ---------------------------------------------------------------- dates and numbers

_MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
_IMF = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) ([A-Z][a-z]{2}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT"
)
_RFC850 = re.compile(
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    r"(\d{2})-([A-Z][a-z]{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT"
)
_ASCTIME = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([A-Z][a-z]{2}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})"
)


def parse_http_date(value: str | bytes) -> float | None:
    """RFC 9110 5.6.7: IMF-fixdate, rfc850-date or asctime-date; None if invalid."""
    text = _text(value).strip()
    if match := _IMF.fullmatch(text):
        day, month, year, hh, mm, ss = match.groups()
    elif match := _RFC850.fullmatch(text):
        day, month, yy, hh, mm, ss = match.groups()
        year = str(2000 + int(yy) if int(yy) < 70 else 1900 + int(yy))
    elif match := _ASCTIME.fullmatch(text):
        month, day, hh, mm, ss, year = match.groups()
    else:
        return None
    if month not in _MONTHS:
        return None
    try:
        fields = (int(year), _MONTHS[month], int(day), int(hh), int(mm), int(ss))
        if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
            return None
        return float(calendar.timegm((*fields, 0, 0, 0)))
    except (ValueError, OverflowError):
        return None


def _date(headers: Headers, name: str) -> float | None:
    """A date field; the first line when repeated (None if absent or invalid)."""
    values = _values(headers, name)
    return parse_http_date(values[0]) if values else None


def _age_header(headers: Headers) -> int:
    """RFC 9111 5.1: the first member of Age; an invalid one is ignored (0)."""
    members = _list_members(_values(headers, "age"))
    if not members:
        return 0
    return _delta_seconds(members[0]) or 0


# ---------------------------------------------------------------- the stored response


@dataclass(frozen=True)
class StoredResponse:
    """What the cache keeps besides the body (RFC 9111 3, 4.2.3).

    ``request_time`` is when the request that got this response was sent,
    ``response_time`` when its header section was received; ``vary_key`` the secondary
    key of that request (``secondary_key``).
    """

    status: int
    headers: tuple[HeaderField, ...]
    request_time: float
    response_time: float
    vary_key: VaryKey = ()

    @classmethod
    def of(
        cls,
        status: int,
        headers: Headers,
        request_headers: Headers,
        request_time: float,
        response_time: float,
    ) -> StoredResponse:
        fields = vary_fields(headers)
        key = secondary_key(fields, request_headers) if fields is not None else ()
        return cls(status, tuple(headers), request_time, response_time, key)

    @property
    def date_value(self) -> float:
        """RFC 9110 6.6.1: without a valid Date, the time it was received."""
        date = _date(self.headers, "date")
        return self.response_time if date is None else date


# ---------------------------------------------------------------- storing (RFC 9111 3)


class Storability(StrEnum):
    """Whether a response may be stored for sharing, and if not why (RFC 9111 3)."""

    STORE = "store"
    #: a 206: stored by the chunk map, merged into the representation (RFC 9111 3.3)
    STORE_PARTIAL = "store-partial"
    METHOD = "method"  # only GET responses are stored (HEAD is answered from them)
    STATUS = "status"  # not final, not understood, or not cacheable without freshness
    NO_STORE = "no-store"  # in the request or the response
    PRIVATE = "private"
    AUTHORIZATION = "authorization"  # the request had credentials, nothing allows sharing
    VARY_STAR = "vary-star"
    SET_COOKIE = "set-cookie"
    UNUSABLE = "unusable"  # no freshness and no validator: it could never be reused

    @property
    def stored(self) -> bool:
        return self in (Storability.STORE, Storability.STORE_PARTIAL)


def _explicit_expiry(headers: Headers, cc: CacheControl) -> bool:
    return cc.s_maxage is not None or cc.max_age is not None or _has(headers, "expires")


def storable(
    method: str | bytes,
    request_headers: Headers,
    status: int,
    response_headers: Headers,
    *,
    response_time: float | None = None,
) -> Storability:
    """RFC 9111 3 and 3.5 for a shared cache, plus the refusal of ``Set-Cookie``.

    ``response_time`` stands in for a missing Date when judging whether the response
    has any freshness at all (without either, a valid Expires counts as future).
    """
    if _text(method).upper() != "GET":
        return Storability.METHOD
    if status < 200 or status == 304:
        return Storability.STATUS
    cc = _cache_control(response_headers)
    if cc.must_understand and status not in UNDERSTOOD:
        return Storability.STATUS
    # RFC 9111 5.2.2.3: must-understand with an understood status overrides no-store
    if cc.no_store and not (cc.must_understand and status in UNDERSTOOD):
        return Storability.NO_STORE
    if _request_cache_control(request_headers).no_store:
        return Storability.NO_STORE
    if cc.private:
        return Storability.PRIVATE
    if _has(request_headers, "authorization") and not (
        cc.public or cc.s_maxage is not None or cc.must_revalidate
    ):
        return Storability.AUTHORIZATION
    if vary_fields(response_headers) is None:
        return Storability.VARY_STAR
    if _has(response_headers, "set-cookie"):
        return Storability.SET_COOKIE
    explicit = _explicit_expiry(response_headers, cc)
    if not (explicit or cc.public or status in HEURISTICALLY_CACHEABLE):
        return Storability.STATUS
    if not has_validator(response_headers) and cc.stale_if_error is None:
        stand_in = float("-inf") if response_time is None else response_time
        if freshness_lifetime(status, response_headers, response_time=stand_in) <= 0:
            return Storability.UNUSABLE
    return Storability.STORE_PARTIAL if status == 206 else Storability.STORE


# ---------------------------------------------------------------- freshness (RFC 9111 4.2)


def freshness_lifetime(status: int, headers: Headers, *, response_time: float) -> float:
    """RFC 9111 4.2.1/4.2.2: s-maxage, else max-age, else Expires - Date, else heuristic.

    ``response_time`` stands in for a missing Date. Invalid explicit freshness (a bad
    max-age, an invalid or repeated-and-different Expires) gives 0: stale.
    """
    cc = _cache_control(headers)
    if cc.invalid:
        return 0.0
    if cc.s_maxage is not None:
        return float(cc.s_maxage)
    if cc.max_age is not None:
        return float(cc.max_age)
    date = _date(headers, "date")
    date_value = response_time if date is None else date
    expires_lines = _values(headers, "expires")
    if expires_lines:
        if len({v.strip() for v in expires_lines}) > 1:
            return 0.0
        expires = parse_http_date(expires_lines[0])
        if expires is None:  # "0" and other invalid dates: already expired
            return 0.0
        return max(0.0, expires - date_value)
    if status not in HEURISTICALLY_CACHEABLE and not cc.public:
        return 0.0
    last_modified = _date(headers, "last-modified")
    if last_modified is None or last_modified > date_value:
        return 0.0
    return min(HEURISTIC_FRACTION * (date_value - last_modified), HEURISTIC_MAX_S)


def current_age(stored: StoredResponse, now: float) -> float:
    """RFC 9111 4.2.3, the full formula (``Age`` as the first hop said it)."""
    apparent_age = max(0.0, stored.response_time - stored.date_value)
    response_delay = stored.response_time - stored.request_time
    corrected_age_value = _age_header(stored.headers) + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = now - stored.response_time
    return corrected_initial_age + resident_time


def _lifetime(stored: StoredResponse) -> float:
    return freshness_lifetime(stored.status, stored.headers, response_time=stored.response_time)


def age_value(stored: StoredResponse, now: float) -> str:
    """The ``Age`` to send with ``stored`` at ``now`` (RFC 9111 5.1: whole seconds)."""
    return age_text(current_age(stored, now))


def age_text(age: float) -> str:
    """An age in seconds as the ``Age`` field says it (RFC 9111 5.1: whole seconds)."""
    return str(min(int(max(0.0, age)), DELTA_SECONDS_MAX))


@dataclass(frozen=True)
class Freshness:
    """What a stored response's freshness depends on, worked out once (RFC 9111 4.2):
    per request only the resident time changes. ``no_cache``: the response's own
    ``no-cache`` (every use is revalidated)."""

    lifetime: float
    initial_age: float  # corrected_initial_age, 4.2.3
    response_time: float
    no_cache: bool

    def age(self, now: float) -> float:
        """``current_age`` at ``now``."""
        return self.initial_age + (now - self.response_time)


def freshness(stored: StoredResponse) -> Freshness:
    """``stored``'s ``Freshness`` (the parts of ``current_age`` and ``_lifetime`` that do
    not depend on the time)."""
    apparent_age = max(0.0, stored.response_time - stored.date_value)
    response_delay = stored.response_time - stored.request_time
    corrected_age_value = _age_header(stored.headers) + response_delay
    return Freshness(
        _lifetime(stored),
        max(apparent_age, corrected_age_value),
        stored.response_time,
        _cache_control(stored.headers).no_cache,
    )


#: request fields that can change ``reuse``'s answer for a GET or HEAD (5.2.1 directives,
#: 5.4 Pragma): a request with none of them may take ``reuse_fresh``
REUSE_REQUEST_FIELDS = frozenset({"cache-control", "pragma"})


# ---------------------------------------------------------------- reuse (RFC 9111 4)


class Reuse(StrEnum):
    """What to do with a request, given the stored response selected for it."""

    FRESH = "fresh"  # serve the stored response
    STALE = "stale"  # serve it stale: the request's max-stale allows it (RFC 9111 4.2.4)
    REVALIDATE = "revalidate"  # send ``conditional_headers``; 304 -> ``freshen``
    #: serve the stale response now, revalidate in the background (RFC 5861 3)
    STALE_WHILE_REVALIDATE = "stale-while-revalidate"
    MISS = "miss"  # forward unconditionally (nothing usable stored)
    GATEWAY_TIMEOUT = "gateway-timeout"  # only-if-cached and nothing usable: 504


class Forward(StrEnum):
    """RFC 9211 2.2 ``fwd`` values: why the request went forward."""

    BYPASS = "bypass"
    METHOD = "method"
    URI_MISS = "uri-miss"
    VARY_MISS = "vary-miss"
    MISS = "miss"
    REQUEST = "request"
    STALE = "stale"
    PARTIAL = "partial"


@dataclass(frozen=True)
class ReuseDecision:
    """``reuse``'s answer: the action, with the figures for ``Age`` and ``Cache-Status``.

    ``ttl`` is the remaining freshness (negative when stale); ``fwd`` what Cache-Status
    says when the request goes forward (None when served from the cache).
    """

    action: Reuse
    age: float = 0.0
    ttl: float = 0.0
    fwd: Forward | None = None
    detail: str | None = None

    @property
    def served_from_cache(self) -> bool:
        """The stored response is sent now (fresh, or stale where allowed)."""
        return self.action in (Reuse.FRESH, Reuse.STALE, Reuse.STALE_WHILE_REVALIDATE)

    def cache_status(
        self, *, fwd_status: int | None = None, stored: bool = False, ttl: float | None = None
    ) -> str:
        """The ``Cache-Status`` of the response sent for this decision (RFC 9211).

        Served from the cache: ``hit`` with the stored response's ttl (negative when
        stale, with the detail that allowed it). Forwarded: ``fwd``, and what the shell
        knows after the exchange: the upstream's status, whether the answer was stored
        (or a 304 freshened the stored one), and its ttl then.
        """
        if self.served_from_cache:
            detail = None if self.action is Reuse.FRESH else self.detail
            return cache_status(hit=True, ttl=self.ttl, detail=detail)
        if self.action is Reuse.GATEWAY_TIMEOUT:
            return cache_status(detail="only-if-cached")
        detail = self.detail if self.fwd is None or self.detail != self.fwd.value else None
        return cache_status(
            fwd=self.fwd, fwd_status=fwd_status, stored=stored, ttl=ttl, detail=detail
        )


def has_validator(headers: Headers) -> bool:
    """An ETag (strong or weak) or a Last-Modified date (RFC 9110 8.8)."""
    return _etag(headers) is not None or _date(headers, "last-modified") is not None


_ETAG = re.compile(r'(W/)?"[\x21\x23-\x7e\x80-\xff]*"')


def _etag(headers: Headers) -> tuple[bool, str] | None:
    """``(weak, opaque-tag)`` of the first valid ETag line, or None."""
    values = _values(headers, "etag")
    if not values:
        return None
    text = values[0].strip()
    if not _ETAG.fullmatch(text):
        return None
    return (True, text[2:]) if text.startswith("W/") else (False, text)


def reuse(
    method: str | bytes,
    request_headers: Headers,
    stored: StoredResponse | None,
    now: float,
    *,
    fwd_when_absent: Forward = Forward.URI_MISS,
) -> ReuseDecision:
    """RFC 9111 4 (with 5.2.1 request directives and RFC 5861 stale-while-revalidate).

    ``stored`` is the selected variant (None: nothing stored for this request;
    ``fwd_when_absent`` says whether nothing was stored for the URI or no variant
    matched). GET and HEAD are answered from a stored GET; any other method goes
    forward (``fwd=method``).
    """
    request_cc = _request_cache_control(request_headers)
    if _text(method).upper() not in ("GET", "HEAD"):
        return ReuseDecision(Reuse.MISS, fwd=Forward.METHOD)
    if stored is None:
        if request_cc.only_if_cached:
            return ReuseDecision(Reuse.GATEWAY_TIMEOUT, fwd=fwd_when_absent)
        return ReuseDecision(Reuse.MISS, fwd=fwd_when_absent)

    cc = _cache_control(stored.headers)
    age = current_age(stored, now)
    lifetime = _lifetime(stored)
    ttl = lifetime - age
    fresh = ttl > 0
    validator = has_validator(stored.headers)

    def forward(fwd: Forward, detail: str) -> ReuseDecision:
        if request_cc.only_if_cached:
            return ReuseDecision(Reuse.GATEWAY_TIMEOUT, age, ttl, fwd, detail)
        action = Reuse.REVALIDATE if validator else Reuse.MISS
        return ReuseDecision(action, age, ttl, fwd, detail)

    if request_cc.no_cache:
        return forward(Forward.REQUEST, "request-no-cache")
    if cc.no_cache:
        return forward(Forward.STALE, "no-cache")
    if request_cc.max_age is not None and age > request_cc.max_age:
        return forward(Forward.REQUEST, "request-max-age")
    if request_cc.min_fresh is not None and ttl < request_cc.min_fresh:
        return forward(Forward.REQUEST, "request-min-fresh")
    if fresh:
        return ReuseDecision(Reuse.FRESH, age, ttl)

    staleness = -ttl
    # RFC 9111 4.2.4, 5.2.2.2, 5.2.2.8, 5.2.2.10: these forbid serving it stale
    no_stale = cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None
    if not no_stale:
        if request_cc.max_stale is not None and staleness <= request_cc.max_stale:
            return ReuseDecision(Reuse.STALE, age, ttl, detail="max-stale")
        if (
            cc.stale_while_revalidate is not None
            and staleness <= cc.stale_while_revalidate
            and not request_cc.only_if_cached
        ):
            return ReuseDecision(
                Reuse.STALE_WHILE_REVALIDATE, age, ttl, Forward.STALE, "stale-while-revalidate"
            )
    return forward(Forward.STALE, "stale")


def reuse_fresh(fresh: Freshness, now: float) -> ReuseDecision | None:
    """``reuse`` for a GET or HEAD with none of ``REUSE_REQUEST_FIELDS`` and a stored
    response (of ``fresh``) selected for it, when that is a fresh hit: ``Reuse.FRESH``
    with its age and ttl; None for everything else (stale, ``no-cache``): ask ``reuse``."""
    if fresh.no_cache:
        return None
    age = fresh.age(now)
    ttl = fresh.lifetime - age
    if ttl > 0:
        return ReuseDecision(Reuse.FRESH, age, ttl)
    return None


def stale_if_error_allowed(
    request_headers: Headers, stored: StoredResponse, now: float, error_status: int | None
) -> bool:
    """RFC 5861 4: may a failed refresh (``error_status`` 500/502/503/504, or None for
    no answer at all) be answered with ``stored``, stale?

    The response's or the request's ``stale-if-error`` (the request's wins when both)
    must cover the staleness; never against ``must-revalidate``, ``proxy-revalidate``,
    ``s-maxage`` or ``no-cache`` in the response, nor a request's ``no-cache``.
    """
    if error_status is not None and error_status not in ERROR_STATUSES:
        return False
    cc = _cache_control(stored.headers)
    if cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None or cc.no_cache:
        return False
    request_cc = _request_cache_control(request_headers)
    if request_cc.no_cache:
        return False
    window = request_cc.stale_if_error
    if window is None:
        window = cc.stale_if_error
    if window is None:
        return False
    staleness = current_age(stored, now) - _lifetime(stored)
    return staleness <= window


# ---------------------------------------------------------------- validation (RFC 9111 4.3)


def conditional_headers(stored: StoredResponse) -> list[HeaderField]:
    """RFC 9111 4.3.1: If-None-Match from the ETag (strong or weak, as received) and
    If-Modified-Since from Last-Modified; empty without a validator."""
    fields: list[HeaderField] = []
    for name, value in stored.headers:
        if _text(name).strip().lower() == "etag" and _etag(((name, value),)) is not None:
            fields.append(("If-None-Match", value))
            break
    for name, value in stored.headers:
        if _text(name).strip().lower() == "last-modified" and parse_http_date(value) is not None:
            fields.append(("If-Modified-Since", value))
            break
    return fields


def _selects(stored: StoredResponse, headers_304: Headers) -> bool:
    """RFC 9111 4.3.4: does this 304 select the stored response for update?"""
    new_tag = _etag(headers_304)
    old_tag = _etag(stored.headers)
    if new_tag is not None and not new_tag[0]:  # a strong validator: strong comparison
        return old_tag is not None and not old_tag[0] and old_tag[1] == new_tag[1]
    new_modified = _date(headers_304, "last-modified")
    if new_tag is not None or new_modified is not None:
        if new_tag is not None and old_tag is not None and new_tag[1] == old_tag[1]:
            return True  # weak comparison
        old_modified = _date(stored.headers, "last-modified")
        return new_modified is not None and new_modified == old_modified
    return not has_validator(stored.headers)


def freshen(
    stored: StoredResponse,
    headers_304: Headers,
    request_time: float,
    response_time: float,
) -> StoredResponse | None:
    """RFC 9111 4.3.4 and 3.2: the stored response updated by a 304, or None when the
    304 does not select it (then fetch unconditionally).

    Each field of the 304 replaces the stored lines of that name, except hop-by-hop
    fields, fields named in the 304's Connection, framing (Content-Length,
    Content-Range), Content-Encoding (the stored body's coding) and Set-Cookie. The
    times become the revalidation's. Check ``storable`` on the result's headers: a 304
    that says ``no-store`` or ``private`` ends the storage.
    """
    if not _selects(stored, headers_304):
        return None
    skip = set(_NOT_MERGED) | {m.lower() for m in _list_members(_values(headers_304, "connection"))}
    updates = [(n, v) for n, v in headers_304 if _text(n).strip().lower() not in skip]
    replaced = {_text(n).strip().lower() for n, _ in updates}
    kept = [(n, v) for n, v in stored.headers if _text(n).strip().lower() not in replaced]
    return StoredResponse(
        stored.status,
        tuple(kept + updates),
        request_time,
        response_time,
        stored.vary_key,
    )


# ---------------------------------------------------------------- Vary (RFC 9111 4.1)


def vary_fields(headers: Headers) -> tuple[str, ...] | None:
    """The field names a response varies on (lower case, sorted, unique); None for ``*``."""
    names = {m.lower() for m in _list_members(_values(headers, "vary"))}
    if "*" in names:
        return None
    return tuple(sorted(names))


def secondary_key(fields: Sequence[str], request_headers: Headers) -> VaryKey:
    """The request's values of the Vary fields, normalised (RFC 9111 4.1): lines
    combined, whitespace around members and at the ends trimmed; None when absent."""
    key: list[tuple[str, str | None]] = []
    for name in fields:
        lines = _values(request_headers, name.lower())
        if not lines:
            key.append((name.lower(), None))
            continue
        members = [m.strip() for line in lines for m in line.split(",")]
        key.append((name.lower(), ",".join(m for m in members if m)))
    return tuple(key)


def variant_matches(stored: StoredResponse, request_headers: Headers) -> bool:
    """May ``stored`` be selected for this request? ``Vary: *`` never matches."""
    fields = vary_fields(stored.headers)
    if fields is None:
        return False
    return secondary_key(fields, request_headers) == stored.vary_key


# ---------------------------------------------------------------- invalidation (RFC 9111 4.4)


def _origin(uri: str) -> tuple[str, str, int | None]:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def invalidated_uris(
    method: str | bytes, target_uri: str, status: int, response_headers: Headers
) -> list[str]:
    """RFC 9111 4.4: an unsafe method answered 2xx/3xx invalidates the target URI, and
    Location / Content-Location when they are on the same origin (relative ones are
    resolved against the target)."""
    if _text(method).upper() in SAFE_METHODS or not 200 <= status < 400:
        return []
    uris = [target_uri]
    origin = _origin(target_uri)
    for name in ("location", "content-location"):
        for value in _values(response_headers, name)[:1]:
            try:
                resolved = urljoin(target_uri, value.strip())
            except ValueError:  # not a URI (e.g. an unclosed IPv6 literal): nothing to drop
                continue
            if _origin(resolved) == origin and resolved not in uris:
                uris.append(resolved)
    return uris


# ---------------------------------------------------------------- Cache-Status (RFC 9211)

_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")


def _sf_item(text: str) -> str:
    """An RFC 8941 token when it is one, else a string (non-printable bytes dropped)."""
    if _SF_TOKEN.fullmatch(text):
        return text
    printable = "".join(c for c in text if " " <= c <= "~")
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cache_status(
    *,
    hit: bool = False,
    fwd: Forward | None = None,
    fwd_status: int | None = None,
    stored: bool = False,
    ttl: float | None = None,
    detail: str | None = None,
    cache: str = "fileproxy",
) -> str:
    """The ``Cache-Status`` member this cache adds (RFC 9211 2), e.g.
    ``fileproxy; hit; ttl=42`` or ``fileproxy; fwd=miss; stored``."""
    params = [cache]
    if hit:
        params.append("hit")
    if fwd is not None:
        params.append(f"fwd={fwd.value}")
    if fwd_status is not None:
        params.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        params.append(f"ttl={int(ttl)}")
    if stored:
        params.append("stored")
    if detail:
        params.append(f"detail={_sf_item(detail)}")
    return "; ".join(params)
