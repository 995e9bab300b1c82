"""CORS for the proxied paths (``FILEPROXY_CORS_ORIGINS``): preflights answered, the file
headers a page's script may read exposed. Pure: the data plane asks, then writes.

As the Fetch standard describes it: a preflight
(``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from an allowed
origin gets ``200`` with the methods, the headers it asked for and ``Max-Age``; from any
other origin ``403``; an actual request from an allowed origin gets its
``Access-Control-Allow-Origin`` and ``Access-Control-Expose-Headers``. Credentials are
never allowed.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
EXPOSE_HEADERS = (
    "Content-Length", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified", "X-Request-ID",
)  # fmt: skip
MAX_AGE_S = 600


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.origins = frozenset(origins)
        self.any_origin = "*" in self.origins

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin in self.origins)

    @staticmethod
    def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
        return (
            method == "OPTIONS"
            and "Origin" in headers
            and "Access-Control-Request-Method" in headers
        )

    def preflight(self, headers: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """The status and headers of the answer to a preflight."""
        origin = headers.get("Origin")
        method = headers.get("Access-Control-Request-Method", "").upper()
        if not self.allowed(origin) or method not in METHODS:
            return 403, {}
        assert origin is not None
        answer = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ", ".join(METHODS),
            "Access-Control-Max-Age": str(MAX_AGE_S),
            "Vary": "Origin",
        }
        asked = headers.get("Access-Control-Request-Headers", "")
        if asked.strip():
            answer["Access-Control-Allow-Headers"] = asked
        return 200, answer

    def add_headers(
        self, request_headers: Mapping[str, str], out: MutableMapping[str, str]
    ) -> None:
        """An actual request's response: what a page from an allowed origin may read."""
        origin = request_headers.get("Origin")
        if not self.allowed(origin):
            return
        assert origin is not None
        out["Access-Control-Allow-Origin"] = origin
        out["Access-Control-Expose-Headers"] = ",".join(EXPOSE_HEADERS)
