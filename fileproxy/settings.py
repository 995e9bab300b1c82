"""The one configuration object, built once from the environment.

Every setting is one row of ``SETTINGS_TABLE``: its environment variable, its type,
default, bounds and one line of help. Validation, ``fileproxy config``, ``/health``
and the README table all come from that table; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

REDACTED = "***"


class ConfigError(ValueError):
    """A setting has a value that is not allowed; the message is one line for the operator."""

    def __init__(self, env: str, value: str, allowed: str) -> None:
        super().__init__(f"invalid {env}={value!r}: {allowed}")
        self.env = env


# --- parsers: each turns the raw string into a typed value or raises ValueError(allowed) ---


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"expected an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}")
        return value

    parse.allowed = f"integer {lo}..{hi}"  # type: ignore[attr-defined]
    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds from {lo:g} to {hi:g}") from None
        if not lo <= value <= hi:  # also rejects nan
            raise ValueError(f"expected a number of seconds from {lo:g} to {hi:g}")
        return value

    parse.allowed = f"seconds {lo:g}..{hi:g}"  # type: ignore[attr-defined]
    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    parse.allowed = " | ".join(choices)  # type: ignore[attr-defined]
    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected on/off (also true/false, yes/no, 1/0)")


_bool.allowed = "on | off"  # type: ignore[attr-defined]


def _url(*schemes: str, optional: bool = False) -> Callable[[str], URL | None]:
    def parse(raw: str) -> URL | None:
        raw = raw.strip()
        if not raw and optional:
            return None
        try:
            url = URL(raw)
        except ValueError:
            raise ValueError(f"expected a URL with scheme {' or '.join(schemes)}") from None
        if url.scheme not in schemes:
            raise ValueError(f"unknown scheme {url.scheme!r}, expected {' or '.join(schemes)}")
        if url.scheme != "unix" and not url.host:
            raise ValueError(f"expected a URL with a host, like {schemes[0]}://127.0.0.1:PORT")
        if url.scheme in ("http", "https") and (url.query_string or url.fragment):
            raise ValueError("expected a URL without query or fragment")
        return url

    parse.allowed = "URL, scheme " + " | ".join(schemes)  # type: ignore[attr-defined]
    return parse


@dataclass(frozen=True)
class BindAddress:
    """Where the daemon listens: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def _bind(raw: str) -> BindAddress:
    raw = raw.strip()
    allowed = "expected HOST:PORT (port 0..65535) or unix:/absolute/path"
    if raw.startswith("unix:"):
        path = raw[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(allowed)
        return BindAddress(path=path)
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(allowed)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return BindAddress(host=host, port=int(port_text))


_bind.allowed = "HOST:PORT | unix:/path"  # type: ignore[attr-defined]


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for part in raw.replace(" ", "").split(","):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError("expected a comma-separated list of IP networks (CIDR)") from None
    return tuple(nets)


_networks.allowed = "comma-separated CIDRs"  # type: ignore[attr-defined]


def _text(raw: str) -> str:
    return raw.strip()


_text.allowed = "text"  # type: ignore[attr-defined]


def _key_prefix(raw: str) -> str:
    if not raw or any(c.isspace() or c in "{}" for c in raw):
        raise ValueError("non-empty, without spaces or braces (braces make Cluster hash tags)")
    return raw


_key_prefix.allowed = "non-empty text without spaces or braces"  # type: ignore[attr-defined]


def _origins(raw: str) -> tuple[str, ...]:
    origins = []
    for part in raw.replace(" ", "").split(","):
        if not part:
            continue
        if part != "*":
            url = URL(part)
            if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
                raise ValueError(
                    "expected * or comma-separated origins like https://app.example.com"
                )
            part = str(url.origin())
        origins.append(part)
    return tuple(origins)


_origins.allowed = "* | comma-separated origins"  # type: ignore[attr-defined]


def _boundaries(raw: str) -> tuple[float, float, float]:
    allowed = "expected three increasing milliseconds, like 50,150,300"
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(allowed) from None
    if len(values) != 3 or not 0 < values[0] < values[1] < values[2] < 1e6:
        raise ValueError(allowed)
    return values[0], values[1], values[2]


_boundaries.allowed = "ms,ms,ms"  # type: ignore[attr-defined]


def _profiles(raw: str) -> str:
    from .adaptive.quality_classifier import PROFILE_PRESETS, profile_table

    try:
        profile_table(raw)
    except ValueError as exc:
        raise ValueError(f"{exc}; presets: {', '.join(PROFILE_PRESETS)}") from None
    return raw.strip()


_profiles.allowed = "preset | table"  # type: ignore[attr-defined]


def _workers(raw: str) -> int:
    if raw.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _int(1, 1024)(raw)


_workers.allowed = "auto | integer 1..1024"  # type: ignore[attr-defined]


def _max_connections(raw: str) -> int:
    """auto: half the open-files limit, since each proxied request also holds an upstream socket."""
    if raw.strip().lower() == "auto":
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(16, (soft - 64) // 2)
    return _int(1, 1 << 20)(raw)


_max_connections.allowed = "auto | integer 1..1048576"  # type: ignore[attr-defined]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def _spool_total(raw: str) -> int | str:
    """auto (resolved per worker at start, see fileproxy.spool.auto_max_total) or bytes."""
    if raw.strip().lower() == "auto":
        return "auto"
    return _int(0, 1 << 50)(raw)


_spool_total.allowed = "auto | integer 0..1125899906842624"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SettingSpec:
    """One row of the settings table."""

    env: str
    attr: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret_url: bool = False  # a URL whose credentials are redacted when shown
    secret: bool = False  # a value never shown at all

    @property
    def allowed(self) -> str:
        return str(getattr(self.parse, "allowed", ""))


SETTINGS_TABLE: tuple[SettingSpec, ...] = (
    # where it listens and what it proxies
    SettingSpec(
        "FILEPROXY_BIND", "bind", "127.0.0.1:10080", _bind,
        "Listen address: HOST:PORT or unix:/path/to.sock.",
    ),
    SettingSpec(
        "FILEPROXY_UPSTREAM", "upstream", "http://127.0.0.1:27804", _url("http", "https"),
        "Backend base URL; its path is prefixed to every request path; credentials are sent "
        "as Basic auth and never shown.",
        secret_url=True,
    ),
    SettingSpec(
        "REDIS_URL", "redis_url", "", _url("redis", "rediss", "unix", optional=True),
        "Shared state store; empty keeps state in-process (one worker's scope).",
        secret_url=True,
    ),
    SettingSpec(
        "REDIS_POOL_SIZE", "redis_pool_size", "150", _int(1, 10000),
        "Maximum connections in the Redis connection pool of each worker.",
    ),
    SettingSpec(
        "FILEPROXY_REDIS_CLUSTER", "redis_cluster", "off", _bool,
        "on: REDIS_URL names a node of a Redis Cluster (redis-py's cluster client).",
    ),
    SettingSpec(
        "FILEPROXY_REDIS_PREFIX", "redis_prefix", "fileproxy:", _key_prefix,
        "Start of every Redis key, so several deployments can share one Redis.",
    ),
    SettingSpec(
        "FILEPROXY_REDIS_TIMEOUT", "redis_timeout", "0.25", _float(0.01, 10),
        "Seconds a Redis call may take (connect, pool slot, answer) before the local "
        "fallback serves.",
    ),
    # upstream client (the seed's names and defaults)
    SettingSpec(
        "HTTP_CONNECTOR_LIMIT", "connector_limit", "200", _int(1, 100000),
        "Maximum concurrent upstream connections per worker.",
    ),
    SettingSpec(
        "HTTP_CONNECTOR_LIMIT_PER_HOST", "connector_limit_per_host", "50", _int(0, 100000),
        "Maximum concurrent upstream connections per upstream host and port (0: no limit).",
    ),
    SettingSpec(
        "HTTP_KEEPALIVE_TIMEOUT", "keepalive_timeout", "60", _float(0, 3600),
        "Seconds an idle upstream connection stays in the pool for reuse.",
    ),
    SettingSpec(
        "HTTP_CONNECT_TIMEOUT", "connect_timeout", "15", _float(0.05, 600),
        "Seconds to establish an upstream connection (then 504).",
    ),
    SettingSpec(
        "HTTP_TOTAL_TIMEOUT", "headers_timeout", "90", _float(0.05, 86400),
        "Seconds from sending the request (after its body) to the upstream's response "
        "headers (then 504); never cuts a body that is still flowing.",
    ),
    SettingSpec(
        "FILEPROXY_READ_TIMEOUT", "read_timeout", "60", _float(0.05, 86400),
        "Seconds the upstream may stay silent between two reads of a body (then abort).",
    ),
    SettingSpec(
        "HTTP_DNS_CACHE_TTL", "dns_cache_ttl", "600", _int(0, 86400),
        "Seconds upstream DNS answers are cached (0: no cache).",
    ),
    SettingSpec(
        "STREAM_CHUNK_SIZE", "chunk_size", "16384", _int(KIB, 16 * MIB),
        "Largest piece of a body read from one side and written to the other at once.",
    ),
    SettingSpec(
        "BUFFER_SIZE", "buffer_size", "131072", _int(4 * KIB, 64 * MIB),
        "Bytes buffered per stream and direction before the sender is paused (backpressure).",
    ),
    # slow clients: the spool (fileproxy.spool, fileproxy.adaptive.spill)
    SettingSpec(
        "FILEPROXY_SPOOL", "spool", "on", _bool,
        "Spill the rest of a response a slow client cannot keep up with to a spool (memory up "
        "to BUFFER_SIZE, then a temp file) and free its upstream connection; off: the upstream "
        "waits for the client.",
    ),
    SettingSpec(
        "FILEPROXY_SPOOL_DIR", "spool_dir", "", _text,
        "Directory of the spool's unlinked temp files (empty: a private directory under the "
        "system temp dir); not writable: responses fall back to waiting for the client.",
    ),
    SettingSpec(
        "FILEPROXY_SPOOL_MAX_FILE", "spool_max_file", str(GIB), _int(0, 1 << 50),
        "Bytes one response may hold on disk; beyond, the rest waits for the client "
        "(nginx's proxy_max_temp_file_size; 0: memory only).",
    ),
    SettingSpec(
        "FILEPROXY_SPOOL_MAX_TOTAL", "spool_max_total", "auto", _spool_total,
        "Bytes all spooled responses of a worker may hold on disk (auto: half the spool "
        "filesystem's free space at start, shared among the workers).",
    ),
    # the edge: clients
    SettingSpec(
        "FILEPROXY_CLIENT_KEEPALIVE_TIMEOUT", "client_keepalive_timeout", "75", _float(0, 3600),
        "Seconds an idle client connection is kept open; above nginx's upstream "
        "keepalive_timeout (60) so nginx never reuses a connection we are closing.",
    ),
    SettingSpec(
        "FILEPROXY_MAX_BODY_SIZE", "max_body_size", str(GIB), _int(0, 1 << 50),
        "Largest request body in bytes, counted while streaming (then 413; 0: no limit).",
    ),
    SettingSpec(
        "FILEPROXY_MAX_HEADER_SIZE", "max_header_size", "8190", _int(256, 1 * MIB),
        "Longest request line and longest header field in bytes (then 414 / 431).",
    ),
    SettingSpec(
        "FILEPROXY_HEADER_TIMEOUT", "client_header_timeout", "15", _float(0.05, 3600),
        "Seconds a client may take to send a complete request head, counted from accept or "
        "from its first byte on a kept-alive connection (then 408 and close; slowloris).",
    ),
    SettingSpec(
        "FILEPROXY_BODY_TIMEOUT", "client_body_timeout", "60", _float(0.05, 86400),
        "Seconds a client may stay silent between two reads of its request body "
        "(then 408 and close, nginx's client_body_timeout).",
    ),
    SettingSpec(
        "FILEPROXY_MAX_CONNECTIONS", "max_connections", "auto", _max_connections,
        "Client connections per worker; requests on connections beyond it get 503 and a close "
        "(auto: half the open-files limit, each request also holds an upstream socket).",
    ),
    SettingSpec(
        "FILEPROXY_ACTIVE_REQUESTS", "active_requests", "16", _int(0, 1048576),
        "Requests one worker works on at once, each until its response head is sent (after "
        "10 ms waiting for its upstream it no longer counts; relayed responses never do); "
        "the next wait their turn in arrival order, /health and /ready go first (0: no limit).",
    ),
    SettingSpec(
        "FILEPROXY_TRUSTED_PROXIES", "trusted_proxies", "127.0.0.1/32,::1/128", _networks,
        "Peers whose X-Forwarded-Proto/-Host are kept (e.g. the fronting nginx); "
        "for others they are overwritten.",
    ),
    SettingSpec(
        "FILEPROXY_ADMIN_ALLOW", "admin_allow", "127.0.0.1/32,::1/128", _networks,
        "Peers that may read /stats and /metrics (/health and /ready are open to all).",
    ),
    SettingSpec(
        "FILEPROXY_ADMIN_TOKEN", "admin_token", "", _text,
        "Bearer token that also opens /stats and /metrics (empty: peers only).",
        secret=True,
    ),
    SettingSpec(
        "FILEPROXY_CORS_ORIGINS", "cors_origins", "", _origins,
        "Origins allowed to fetch across origins (* for any); empty: no CORS headers.",
    ),
    # adaptation
    SettingSpec(
        "FILEPROXY_OPTIMIZER", "optimizer", "on", _bool,
        "Adapt chunk sizes and timeouts to each upstream's network quality and its admission "
        "rate to its errors; off: the static settings above, no admission limit.",
    ),
    SettingSpec(
        "FILEPROXY_QUALITY_BOUNDARIES", "quality_boundaries_ms", "50,150,300", _boundaries,
        "RTT boundaries (ms) between the levels good / medium / poor / very poor.",
    ),
    SettingSpec(
        "FILEPROXY_PROFILES", "profiles", "throughput", _profiles,
        "Chunk size and connect/headers/idle-read timeouts per level: a preset "
        "(throughput, seed) or good=CHUNK:CONNECT:HEADERS:READ,medium=...,poor=...,very_poor=...",
    ),
    SettingSpec(
        "FILEPROXY_LIMIT_MIN", "limit_min", "10", _float(0.1, 1e7),
        "Lowest admission rate (req/s per upstream and worker) the AIMD limiter may set.",
    ),
    SettingSpec(
        "FILEPROXY_LIMIT_MAX", "limit_max", "1000", _float(0.1, 1e7),
        "Highest admission rate (req/s per upstream and worker).",
    ),
    SettingSpec(
        "FILEPROXY_LIMIT_INITIAL", "limit_initial", "100", _float(0.1, 1e7),
        "Admission rate at start (req/s per upstream and worker).",
    ),
    SettingSpec(
        "FILEPROXY_LIMIT_WINDOW", "limit_window", "1", _float(0.05, 60),
        "Seconds per AIMD decision window.",
    ),
    SettingSpec(
        "FILEPROXY_LIMIT_BURST", "limit_burst", "20", _int(1, 100000),
        "Requests admitted at once above the rate (GCRA burst).",
    ),
    SettingSpec(
        "FILEPROXY_LIMIT_STATUS", "limit_status", "503", _choice("503", "429"),
        "Status for requests over the admission rate (with Retry-After and a JSON body).",
    ),
    SettingSpec(
        "FILEPROXY_LIMIT_ENFORCE", "limit_enforce", "after-cut", _choice("after-cut", "always"),
        "after-cut: the limit admits only from the first cut until it is back at the maximum "
        "(a healthy upstream is never throttled); always: a fixed ceiling "
        "(e.g. LIMIT_MIN = LIMIT_INITIAL = LIMIT_MAX).",
    ),
    # TCP options: on the listening socket (inherited by accepted sockets) and on
    # every upstream socket
    SettingSpec(
        "FILEPROXY_TCP_NODELAY", "tcp_nodelay", "on", _bool,
        "TCP_NODELAY: send small writes at once (what nginx and Envoy do).",
    ),
    SettingSpec(
        "FILEPROXY_TCP_QUICKACK", "tcp_quickack", "off", _bool,
        "TCP_QUICKACK at connect/accept; the kernel clears it after a few exchanges.",
    ),
    SettingSpec(
        "FILEPROXY_SO_KEEPALIVE", "so_keepalive", "on", _bool,
        "SO_KEEPALIVE: detect dead peers of idle connections.",
    ),
    SettingSpec(
        "FILEPROXY_TCP_KEEPIDLE", "tcp_keepidle", "60", _int(1, 32767),
        "Seconds idle before the first keepalive probe (Linux default 7200).",
    ),
    SettingSpec(
        "FILEPROXY_TCP_KEEPINTVL", "tcp_keepintvl", "10", _int(1, 32767),
        "Seconds between keepalive probes.",
    ),
    SettingSpec(
        "FILEPROXY_TCP_KEEPCNT", "tcp_keepcnt", "6", _int(1, 127),
        "Unanswered keepalive probes before the connection is dropped.",
    ),
    SettingSpec(
        "FILEPROXY_TCP_USER_TIMEOUT", "tcp_user_timeout_ms", "0", _int(0, 1 << 31),
        "TCP_USER_TIMEOUT in ms: drop a connection whose sent data stays unacknowledged "
        "this long (0: kernel default).",
    ),
    SettingSpec(
        "FILEPROXY_SO_SNDBUF", "so_sndbuf", "0", _int(0, 1 << 30),
        "SO_SNDBUF bytes (0: kernel autotuning; a fixed size disables it).",
    ),
    SettingSpec(
        "FILEPROXY_SO_RCVBUF", "so_rcvbuf", "0", _int(0, 1 << 30),
        "SO_RCVBUF bytes (0: kernel autotuning; a fixed size disables it).",
    ),
    SettingSpec(
        "FILEPROXY_TCP_NOTSENT_LOWAT", "tcp_notsent_lowat", "0", _int(0, 1 << 30),
        "TCP_NOTSENT_LOWAT bytes: bound unsent data queued in the kernel (0: unset).",
    ),
    # production process model
    SettingSpec(
        "FILEPROXY_WORKERS", "workers", "auto", _workers,
        "gunicorn worker processes (auto: the CPU count).",
    ),
    SettingSpec(
        "FILEPROXY_GRACEFUL_TIMEOUT", "graceful_timeout", "300", _float(1, 86400),
        "Seconds in-flight downloads may run after SIGTERM / reload before workers exit.",
    ),
    SettingSpec(
        "FILEPROXY_DRAIN_DELAY", "drain_delay", "2", _float(0, 300),
        "Seconds between SIGTERM (/ready turns 503) and closing the listener, so load "
        "balancers stop sending first.",
    ),
    # reporting
    SettingSpec(
        "FILEPROXY_STATS_WINDOW", "stats_window", "60", _int(1, 3600),
        "Seconds of traffic that /stats rates and percentiles cover.",
    ),
    SettingSpec(
        "FILEPROXY_LOG_LEVEL", "log_level", "info",
        _choice("debug", "info", "warning", "error"),
        "Log level.",
    ),
    SettingSpec(
        "FILEPROXY_LOG_FORMAT", "log_format", "json", _choice("json", "text"),
        "Log lines as JSON (production) or plain text.",
    ),
    SettingSpec(
        "FILEPROXY_ACCESS_LOG", "access_log", "on", _bool,
        "One JSON line per request, on stdout (other logs go to stderr).",
    ),
    SettingSpec(
        "FILEPROXY_LOG_DIR", "log_dir", "", _text,
        "Also write access.log and error.log into this directory (reopened after rotation).",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """Effective configuration; build with ``Settings.from_env``."""

    bind: BindAddress
    upstream: URL
    redis_url: URL | None
    redis_pool_size: int
    redis_cluster: bool
    redis_prefix: str
    redis_timeout: float
    connector_limit: int
    connector_limit_per_host: int
    keepalive_timeout: float
    connect_timeout: float
    headers_timeout: float
    read_timeout: float
    dns_cache_ttl: int
    chunk_size: int
    buffer_size: int
    spool: bool
    spool_dir: str
    spool_max_file: int
    spool_max_total: int | str
    client_keepalive_timeout: float
    max_body_size: int
    max_header_size: int
    client_header_timeout: float
    client_body_timeout: float
    max_connections: int
    active_requests: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    admin_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    admin_token: str
    cors_origins: tuple[str, ...]
    workers: int
    optimizer: bool
    quality_boundaries_ms: tuple[float, float, float]
    profiles: str
    limit_min: float
    limit_max: float
    limit_initial: float
    limit_window: float
    limit_burst: int
    limit_status: str
    limit_enforce: str
    tcp_nodelay: bool
    tcp_quickack: bool
    so_keepalive: bool
    tcp_keepidle: int
    tcp_keepintvl: int
    tcp_keepcnt: int
    tcp_user_timeout_ms: int
    so_sndbuf: int
    so_rcvbuf: int
    tcp_notsent_lowat: int
    graceful_timeout: float
    drain_delay: float
    stats_window: int
    log_level: str
    log_format: str
    access_log: bool
    log_dir: str
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: str) -> Settings:
        """Validate every variable; raise ConfigError naming the first bad one."""
        env = dict(os.environ if environ is None else environ)
        env.update(overrides)
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for spec in SETTINGS_TABLE:
            raw = env.get(spec.env)
            sources[spec.env] = "env" if raw is not None else "default"
            text = spec.default if raw is None else raw
            try:
                values[spec.attr] = spec.parse(text)
            except ValueError as exc:
                shown = REDACTED if spec.secret else redact_url_text(text)
                raise ConfigError(spec.env, shown, str(exc)) from None
        if not values["limit_min"] <= values["limit_initial"] <= values["limit_max"]:
            raise ConfigError(
                "FILEPROXY_LIMIT_INITIAL",
                str(env.get("FILEPROXY_LIMIT_INITIAL", "100")),
                "expected FILEPROXY_LIMIT_MIN <= FILEPROXY_LIMIT_INITIAL <= FILEPROXY_LIMIT_MAX",
            )
        return cls(**values, sources=sources)

    def public_items(self) -> list[tuple[SettingSpec, str]]:
        """(spec, value as text) for every setting, secrets redacted."""
        return [(spec, _shown(spec, getattr(self, spec.attr))) for spec in SETTINGS_TABLE]

    def public_dict(self) -> dict[str, str]:
        return dict(self._public)

    @functools.cached_property
    def _public(self) -> dict[str, str]:
        # built once: /health shows it on every call, and settings never change
        return {spec.env: value for spec, value in self.public_items()}


def redact_url(url: URL) -> str:
    """The URL as text with any user or password replaced by ***."""
    if url.user is None and url.password is None:
        return str(url)
    return str(url.with_user(None)).replace("://", f"://{REDACTED}@", 1)


def redact_url_text(text: str) -> str:
    """Redact credentials from a string that may or may not parse as a URL."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = REDACTED + "@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{tail}"


def _shown(spec: SettingSpec, value: Any) -> str:
    if spec.secret and value:
        return REDACTED
    return display_value(value)


def display_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, URL):
        return redact_url(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def markdown_table() -> str:
    """The README's table of variables, generated from SETTINGS_TABLE."""
    lines = ["| Variable | Default | Allowed | Meaning |", "|---|---|---|---|"]
    for spec in SETTINGS_TABLE:
        default = f"`{spec.default}`" if spec.default else "(unset)"
        allowed = spec.allowed.replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| `{spec.env}` | {default} | {allowed} | {spec.help} |")
    return "\n".join(lines)


def env_file_template() -> str:
    """conf/fileproxy.env: every variable, commented out at its default, with its help."""
    lines = [
        "# fileproxy environment file: every variable at its default, commented out.",
        "# Uncomment and change what you need; the process environment wins over this file.",
        "# Generated by `fileproxy config --format env-template`.",
    ]
    for spec in SETTINGS_TABLE:
        lines += ["", f"# {spec.help} ({spec.allowed})", f"#{spec.env}={spec.default}"]
    return "\n".join(lines) + "\n"
