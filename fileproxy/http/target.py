"""Request targets nginx refuses with 400, refused here the same way: pure, no I/O.

nginx decodes the path of every target (``ngx_http_parse_complex_uri``) and answers 400
when it cannot: a ``%`` not followed by two hex digits, an encoded NUL (``%00``), or
dot segments that climb above the root (``/../x``, ``/a/%2e%2e/%2e%2e``, and with ``%2f``
decoded to ``/``: ``/..%2fx``). The query is not decoded, so anything goes there.
Checked against nginx 1.22 (tests/integration/test_proxy_semantics.py asks a real nginx
the same targets). A target that passes is forwarded exactly as received.
"""

from __future__ import annotations

from urllib.parse import unquote

_HEX = frozenset("0123456789abcdefABCDEF")


def path_problem(target: str) -> str | None:
    """Why the path of an origin- or absolute-form ``target`` is refused, or None."""
    if not target.startswith("/"):
        _, sep, rest = target.partition("://")
        slash = rest.find("/")
        if not sep or slash < 0:
            return None  # no path: nothing to decode (the proxy handler judges the rest)
        target = rest[slash:]
    end = len(target)
    for stop in ("?", "#"):
        cut = target.find(stop, 0, end)
        if cut >= 0:
            end = cut
    path = target[:end]
    percent = path.find("%")
    if percent < 0 and "/." not in path:
        return None  # the usual case: nothing encoded, no dot segment
    while percent >= 0:
        escape = path[percent + 1 : percent + 3]
        if len(escape) < 2 or escape[0] not in _HEX or escape[1] not in _HEX:
            return "malformed percent-encoding in the request path"
        if escape == "00":
            return "encoded NUL (%00) in the request path"
        percent = path.find("%", percent + 3)
    depth = 0
    for segment in unquote(path, errors="surrogateescape").split("/"):
        if segment == "..":
            if depth == 0:
                return "the request path climbs above the root (..)"
            depth -= 1
        elif segment not in ("", "."):
            depth += 1
    return None
