"""The one configuration object, built once from the environment.

Every setting is one field of ``Settings``, declared with its row of the settings table
(``setting(...)``): its environment variable, default, parser (type and bounds) and one
line of help; ``SETTINGS_TABLE`` is those rows in order. Validation, ``fileproxy
config``, ``/health`` and the README table all come from it; nothing else reads
``os.environ``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
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


def _float(lo: float, hi: float, unit: str = "seconds") -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number of {unit} from {lo:g} to {hi:g}") from None
        if not lo <= value <= hi:  # also rejects nan
            raise ValueError(f"expected a number of {unit} from {lo:g} to {hi:g}")
        return value

    parse.allowed = f"{unit} {lo:g}..{hi:g}"  # type: ignore[attr-defined]
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
class ReplicaSpec:
    """One replica of FILEPROXY_UPSTREAM: its base URL, weight and backup flag."""

    url: URL
    weight: int = 1
    backup: bool = False

    @property
    def name(self) -> str:
        """How the replica is named in /stats, metrics and the shared store's keys."""
        return f"{self.url.host}:{self.url.port}"

    def __str__(self) -> str:
        text = redact_url(self.url)
        if self.weight != 1:
            text += f";weight={self.weight}"
        return text + (";backup" if self.backup else "")


MAX_REPLICAS = 64
MAX_WEIGHT = 100


def _replicas(raw: str) -> tuple[ReplicaSpec, ...]:
    """FILEPROXY_UPSTREAM: URL[;weight=N][;backup], comma-separated."""
    parse_url = _url("http", "https")
    parts = [part.strip() for part in raw.split(",")]
    if not any(parts):
        raise ValueError("expected one or more base URLs, comma-separated")
    if not all(parts):
        # a trailing or doubled comma is a typo (a replica left out?), not a list to tidy
        raise ValueError("an empty entry (a stray comma): expected base URLs, comma-separated")
    if len(parts) > MAX_REPLICAS:
        raise ValueError(f"expected at most {MAX_REPLICAS} replicas")
    specs: list[ReplicaSpec] = []
    for number, part in enumerate(parts, 1):
        where = f"replica {number}: " if len(parts) > 1 else ""
        text, *options = (piece.strip() for piece in part.split(";"))
        try:
            url = parse_url(text)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        assert url is not None
        weight, backup = 1, False
        for option in options:
            key, sep, value = option.partition("=")
            if key == "weight" and sep and value.isdigit() and 1 <= int(value) <= MAX_WEIGHT:
                weight = int(value)
            elif option == "backup":
                backup = True
            else:
                raise ValueError(
                    f"{where}unknown option {option!r}, expected ;weight=1..{MAX_WEIGHT} or ;backup"
                )
        spec = ReplicaSpec(url, weight, backup)
        if any(other.name == spec.name for other in specs):
            raise ValueError(f"{where}{spec.name} is listed twice")
        specs.append(spec)
    if all(spec.backup for spec in specs):
        raise ValueError("expected at least one replica that is not ;backup")
    return tuple(specs)


_replicas.allowed = "URL[;weight=N][;backup], comma-separated; scheme http | https"  # type: ignore[attr-defined]


def _ca_file(raw: str) -> str:
    """FILEPROXY_UPSTREAM_CA: a PEM file with at least one CA certificate, loaded here once
    so that a missing or unreadable file stops the daemon at start, not its first request."""
    path = raw.strip()
    if not path:
        return ""
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ValueError("no such file; expected a PEM file of CA certificates") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"expected a PEM file of CA certificates ({reason})") from None
    return path


_ca_file.allowed = "empty | path to a PEM file"  # type: ignore[attr-defined]


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


def _statuses(raw: str) -> tuple[int, ...]:
    """Comma-separated HTTP statuses 400..599, e.g. 429,502,503,504; empty: none."""
    values: set[int] = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not (part.isdigit() and 400 <= int(part) <= 599):
            raise ValueError(f"expected comma-separated HTTP statuses 400..599, got {part!r}")
        values.add(int(part))
    return tuple(sorted(values))


_statuses.allowed = "statuses 400..599, comma-separated"  # type: ignore[attr-defined]


def _text(raw: str) -> str:
    return raw.strip()


_text.allowed = "text"  # type: ignore[attr-defined]


def _health_path(raw: str) -> str:
    raw = raw.strip()
    if raw and (not raw.startswith("/") or any(c.isspace() for c in raw)):
        raise ValueError("expected an origin-form path starting with /, like /healthz")
    return raw


_health_path.allowed = "empty | /path"  # type: ignore[attr-defined]


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
    from fileproxy.adaptive.quality_classifier import PROFILE_PRESETS, profile_table

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
    """auto (resolved per worker at start, see fileproxy.delivery.spool.auto_max_total) or bytes."""
    if raw.strip().lower() == "auto":
        return "auto"
    return _int(0, 1 << 50)(raw)


_spool_total.allowed = "auto | integer 0..1125899906842624"  # type: ignore[attr-defined]


def _cache_size(raw: str) -> int | str:
    """auto (resolved when the cache opens, see fileproxy.delivery.cache.auto_max_size) or
    bytes."""
    if raw.strip().lower() == "auto":
        return "auto"
    return _int(0, 1 << 50)(raw)


_cache_size.allowed = "auto | integer 0..1125899906842624"  # type: ignore[attr-defined]


def _cache_dir(raw: str) -> str:
    raw = raw.strip()
    if raw and not os.path.isabs(raw):
        raise ValueError("expected an absolute path (or empty: under the system temp dir)")
    return raw


_cache_dir.allowed = "empty | /absolute/path"  # type: ignore[attr-defined]


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


def setting(
    env: str,
    default: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    secret_url: bool = False,
    secret: bool = False,
) -> Any:
    """A field of ``Settings`` and its row of the settings table, declared together."""
    spec = SettingSpec(env, "", default, parse, help, secret_url, secret)
    return field(metadata={"spec": spec})


@dataclass(frozen=True)
class Settings:
    """Effective configuration; build with ``Settings.from_env``."""

    # where it listens and what it proxies
    bind: BindAddress = setting(
        "FILEPROXY_BIND",
        "127.0.0.1:10080",
        _bind,
        "Listen address: HOST:PORT or unix:/path/to.sock.",
    )
    upstreams: tuple[ReplicaSpec, ...] = setting(
        "FILEPROXY_UPSTREAM",
        "http://127.0.0.1:27804",
        _replicas,
        "Backend base URL, or several comma-separated (replicas serving the same content, "
        "balanced, retried and resumed across; URL;weight=N weighs one, URL;backup serves "
        "only when no other can); its path is prefixed to every request path; credentials "
        "are sent as Basic auth and never shown.",
        secret_url=True,
    )
    upstream_ca: str = setting(
        "FILEPROXY_UPSTREAM_CA",
        "",
        _ca_file,
        "PEM file of the CA certificates an https upstream's certificate must chain to, "
        "instead of the system's trust store (a private CA); empty: the system's.",
    )
    upstream_tls_verify: bool = setting(
        "FILEPROXY_UPSTREAM_TLS_VERIFY",
        "on",
        _bool,
        "Verify an https upstream's certificate and host name; off accepts any certificate, "
        "so anyone on the path can pose as the upstream (a warning is logged at start).",
    )
    redis_url: URL | None = setting(
        "REDIS_URL",
        "",
        _url("redis", "rediss", "unix", optional=True),
        "Shared state store; empty keeps state in-process (one worker's scope).",
        secret_url=True,
    )
    redis_pool_size: int = setting(
        "REDIS_POOL_SIZE",
        "150",
        _int(1, 10000),
        "Maximum connections in the Redis connection pool of each worker.",
    )
    redis_cluster: bool = setting(
        "FILEPROXY_REDIS_CLUSTER",
        "off",
        _bool,
        "on: REDIS_URL names a node of a Redis Cluster (redis-py's cluster client).",
    )
    redis_prefix: str = setting(
        "FILEPROXY_REDIS_PREFIX",
        "fileproxy:",
        _key_prefix,
        "Start of every Redis key, so several deployments can share one Redis.",
    )
    redis_timeout: float = setting(
        "FILEPROXY_REDIS_TIMEOUT",
        "0.25",
        _float(0.01, 10),
        "Seconds a Redis call may take (connect, pool slot, answer) before the local "
        "fallback serves.",
    )
    # upstream client (the seed's names and defaults)
    connector_limit: int = setting(
        "HTTP_CONNECTOR_LIMIT",
        "200",
        _int(1, 100000),
        "Maximum concurrent upstream connections per worker.",
    )
    connector_limit_per_host: int = setting(
        "HTTP_CONNECTOR_LIMIT_PER_HOST",
        "50",
        _int(0, 100000),
        "Maximum concurrent upstream connections per upstream host and port (0: no limit).",
    )
    keepalive_timeout: float = setting(
        "HTTP_KEEPALIVE_TIMEOUT",
        "60",
        _float(0, 3600),
        "Seconds an idle upstream connection stays in the pool for reuse.",
    )
    connect_timeout: float = setting(
        "HTTP_CONNECT_TIMEOUT",
        "15",
        _float(0.05, 600),
        "Seconds to establish an upstream connection (then 504).",
    )
    headers_timeout: float = setting(
        "HTTP_TOTAL_TIMEOUT",
        "90",
        _float(0.05, 86400),
        "Seconds from sending the request (after its body) to the upstream's response "
        "headers (then 504); never cuts a body that is still flowing.",
    )
    read_timeout: float = setting(
        "FILEPROXY_READ_TIMEOUT",
        "60",
        _float(0.05, 86400),
        "Seconds the upstream may stay silent between two reads of a body (then abort).",
    )
    dns_cache_ttl: int = setting(
        "HTTP_DNS_CACHE_TTL",
        "600",
        _int(0, 86400),
        "Seconds upstream DNS answers are cached (0: no cache).",
    )
    # several replicas: retries, outlier ejection, slow start, resume (issue 15)
    retries: int = setting(
        "FILEPROXY_RETRIES",
        "2",
        _int(0, 10),
        "Further tries of a request on other replicas, only before anything was sent to the "
        "client: any method that never reached an upstream (connect failed), an idempotent "
        "one whose body (if any) was not sent on a reset, a headers timeout or a "
        "FILEPROXY_RETRY_STATUSES answer.",
    )
    retry_statuses: tuple[int, ...] = setting(
        "FILEPROXY_RETRY_STATUSES",
        "502,503,504",
        _statuses,
        "Upstream statuses an idempotent request is retried on, at another replica (empty: none).",
    )
    retry_budget: float = setting(
        "FILEPROXY_RETRY_BUDGET",
        "20",
        _float(0, 100, "percent"),
        "Retries in progress at most this percentage of the requests in progress (Envoy's "
        "retry budget), with FILEPROXY_RETRY_MIN_CONCURRENCY as a floor: a cap on bursts of "
        "retries; FILEPROXY_RETRY_TOKENS limits them over time.",
    )
    retry_min_concurrency: int = setting(
        "FILEPROXY_RETRY_MIN_CONCURRENCY",
        "3",
        _int(0, 10000),
        "Retries in progress always allowed whatever the budget (Envoy's min_retry_concurrency).",
    )
    retry_tokens: float = setting(
        "FILEPROXY_RETRY_TOKENS",
        "20",
        _float(0, 1000, "tokens"),
        "gRPC's retry throttling: tokens start at this maximum, a failed try (reset, timeout, "
        "502-504) costs 1, an answer gives 0.1 back, and a request is retried only while more "
        "than half are left: with every replica failing, about 1 try per request after the "
        "first few (0: no throttle, the budget alone).",
    )
    eject_after: int = setting(
        "FILEPROXY_EJECT_AFTER",
        "5",
        _int(0, 1000),
        "Consecutive failures (connect failure, reset, timeout, 502-504) that eject a replica "
        "from balancing (0: never); never more than half the replicas are out.",
    )
    eject_time: float = setting(
        "FILEPROXY_EJECT_TIME",
        "30",
        _float(0.1, 3600),
        "Seconds a replica stays ejected, times the number of its ejections (at most 10x).",
    )
    slow_start: float = setting(
        "FILEPROXY_SLOW_START",
        "10",
        _float(0, 3600),
        "Seconds over which a replica back from ejection ramps up to its full share.",
    )
    health_path: str = setting(
        "FILEPROXY_HEALTH_PATH",
        "",
        _health_path,
        "Active health checks: GET this path of every replica each FILEPROXY_HEALTH_INTERVAL; "
        "a failed check counts as a failure (ejection), a passing one ends an ejection "
        "(empty: passive health only).",
    )
    health_interval: float = setting(
        "FILEPROXY_HEALTH_INTERVAL",
        "5",
        _float(0.1, 3600),
        "Seconds between two active health checks of a replica.",
    )
    health_timeout: float = setting(
        "FILEPROXY_HEALTH_TIMEOUT",
        "2",
        _float(0.05, 600),
        "Seconds an active health check may take (connect and response head; then it failed).",
    )
    resumes: int = setting(
        "FILEPROXY_RESUMES",
        "3",
        _int(0, 100),
        "Times a download whose upstream failed after the response head may continue from "
        "a replica by Range + If-Range on its strong ETag (0: never; the client is cut).",
    )
    chunk_size: int = setting(
        "STREAM_CHUNK_SIZE",
        "16384",
        _int(KIB, 16 * MIB),
        "Largest piece of a body read from one side and written to the other at once.",
    )
    buffer_size: int = setting(
        "BUFFER_SIZE",
        "131072",
        _int(4 * KIB, 64 * MIB),
        "Bytes buffered per stream and direction before the sender is paused (backpressure).",
    )
    # slow clients: the spool (fileproxy.delivery.spool, fileproxy.adaptive.spill)
    spool: bool = setting(
        "FILEPROXY_SPOOL",
        "on",
        _bool,
        "Spill the rest of a response a slow client cannot keep up with to a spool (memory up "
        "to BUFFER_SIZE, then a temp file) and free its upstream connection; off: the upstream "
        "waits for the client.",
    )
    spool_dir: str = setting(
        "FILEPROXY_SPOOL_DIR",
        "",
        _text,
        "Directory of the spool's unlinked temp files (empty: a private directory under the "
        "system temp dir); not writable: responses fall back to waiting for the client.",
    )
    spool_max_file: int = setting(
        "FILEPROXY_SPOOL_MAX_FILE",
        str(GIB),
        _int(0, 1 << 50),
        "Bytes one response may hold on disk; beyond, the rest waits for the client "
        "(nginx's proxy_max_temp_file_size; 0: memory only).",
    )
    spool_max_total: int | str = setting(
        "FILEPROXY_SPOOL_MAX_TOTAL",
        "auto",
        _spool_total,
        "Bytes all spooled responses of a worker may hold on disk (auto: half the spool "
        "filesystem's free space at start, shared among the workers).",
    )
    # the cache of large files (fileproxy.delivery.cache, README "The cache")
    cache: bool = setting(
        "FILEPROXY_CACHE",
        "on",
        _bool,
        "Keep cacheable GET responses (RFC 9111, shared cache) on disk and serve them from "
        "there: one upstream fetch per object per host, streamed to every waiter as it "
        "arrives; off: every request goes upstream, as before.",
    )
    cache_dir: str = setting(
        "FILEPROXY_CACHE_DIR",
        "",
        _cache_dir,
        "Directory of the cache's index, bodies and fill locks, shared by every worker and "
        "process on the host that names it (empty: fileproxy-cache under the system temp dir; "
        "the systemd unit sets /var/cache/fileproxy/cache).",
    )
    cache_max_size: int | str = setting(
        "FILEPROXY_CACHE_MAX_SIZE",
        "auto",
        _cache_size,
        "Bytes the cached objects may take on disk (each counts its full length from the "
        "start of its fill); auto: half the cache filesystem's size, at most what is free "
        "at start (plus what the cache holds) less FILEPROXY_CACHE_MIN_FREE, computed by "
        "the first process to open the directory and used by every process on it.",
    )
    cache_min_free: int = setting(
        "FILEPROXY_CACHE_MIN_FREE",
        str(GIB),
        _int(0, 1 << 50),
        "Bytes of the cache filesystem a new fill must leave free (it evicts, else the "
        "response is proxied uncached).",
    )
    cache_max_object: int = setting(
        "FILEPROXY_CACHE_MAX_OBJECT",
        str(64 * GIB),
        _int(0, 1 << 50),
        "Largest body in bytes that is cached; a larger one is proxied uncached.",
    )
    cache_range_fill: bool = setting(
        "FILEPROXY_CACHE_RANGE_FILL",
        "off",
        _bool,
        "A Range on an object not cached fetches the aligned 4 MiB chunks that cover it; on: "
        "the rest of the object is then fetched in the background too; off: only what is "
        "asked (a later request fetches the chunks it lacks), sparing the backend link.",
    )
    # the edge: clients
    client_keepalive_timeout: float = setting(
        "FILEPROXY_CLIENT_KEEPALIVE_TIMEOUT",
        "75",
        _float(0, 3600),
        "Seconds an idle client connection is kept open; above nginx's upstream "
        "keepalive_timeout (60) so nginx never reuses a connection we are closing.",
    )
    max_body_size: int = setting(
        "FILEPROXY_MAX_BODY_SIZE",
        str(GIB),
        _int(0, 1 << 50),
        "Largest request body in bytes, counted while streaming (then 413; 0: no limit).",
    )
    max_header_size: int = setting(
        "FILEPROXY_MAX_HEADER_SIZE",
        "8190",
        _int(256, 1 * MIB),
        "Longest request line and longest header field in bytes (then 414 / 431).",
    )
    client_header_timeout: float = setting(
        "FILEPROXY_HEADER_TIMEOUT",
        "15",
        _float(0.05, 3600),
        "Seconds a client may take to send a complete request head, counted from accept or "
        "from its first byte on a kept-alive connection (then 408 and close; slowloris).",
    )
    client_body_timeout: float = setting(
        "FILEPROXY_BODY_TIMEOUT",
        "60",
        _float(0.05, 86400),
        "Seconds a client may stay silent between two reads of its request body "
        "(then 408 and close, nginx's client_body_timeout).",
    )
    send_timeout: float = setting(
        "FILEPROXY_SEND_TIMEOUT",
        "60",
        _float(0.05, 86400),
        "Seconds a client may take none of the bytes waiting to be sent to it (then the "
        "connection is aborted, nginx's send_timeout): a client that stops reading frees "
        "what it held.",
    )
    max_connections: int = setting(
        "FILEPROXY_MAX_CONNECTIONS",
        "auto",
        _max_connections,
        "Client connections per worker; requests on connections beyond it get 503 and a close "
        "(auto: half the open-files limit, each request also holds an upstream socket).",
    )
    active_requests: int = setting(
        "FILEPROXY_ACTIVE_REQUESTS",
        "16",
        _int(0, 1048576),
        "Requests one worker works on at once, each until its response head is sent (after "
        "10 ms waiting for its upstream it no longer counts; relayed responses never do); "
        "the next wait their turn in arrival order, /health and /ready go first (0: no limit).",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        "FILEPROXY_TRUSTED_PROXIES",
        "127.0.0.1/32,::1/128",
        _networks,
        "Peers whose X-Forwarded-Proto/-Host are kept (e.g. the fronting nginx); "
        "for others they are overwritten.",
    )
    admin_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        "FILEPROXY_ADMIN_ALLOW",
        "127.0.0.1/32,::1/128",
        _networks,
        "Peers that may read /stats and /metrics (/health and /ready are open to all).",
    )
    admin_token: str = setting(
        "FILEPROXY_ADMIN_TOKEN",
        "",
        _text,
        "Bearer token that also opens /stats and /metrics (empty: peers only).",
        secret=True,
    )
    cors_origins: tuple[str, ...] = setting(
        "FILEPROXY_CORS_ORIGINS",
        "",
        _origins,
        "Origins allowed to fetch across origins (* for any); empty: no CORS headers.",
    )
    # adaptation
    optimizer: bool = setting(
        "FILEPROXY_OPTIMIZER",
        "on",
        _bool,
        "Adapt chunk sizes and timeouts to each upstream's network quality and its admission "
        "rate to its errors; off: the static settings above, no admission limit.",
    )
    quality_boundaries_ms: tuple[float, float, float] = setting(
        "FILEPROXY_QUALITY_BOUNDARIES",
        "50,150,300",
        _boundaries,
        "RTT boundaries (ms) between the levels good / medium / poor / very poor.",
    )
    profiles: str = setting(
        "FILEPROXY_PROFILES",
        "throughput",
        _profiles,
        "Chunk size and connect/headers/idle-read timeouts per level: a preset "
        "(throughput, seed) or good=CHUNK:CONNECT:HEADERS:READ,medium=...,poor=...,very_poor=...",
    )
    limit_min: float = setting(
        "FILEPROXY_LIMIT_MIN",
        "10",
        _float(0.1, 1e7, "req/s"),
        "Lowest admission rate (req/s per upstream and worker) the AIMD limiter may set.",
    )
    limit_max: float = setting(
        "FILEPROXY_LIMIT_MAX",
        "1000",
        _float(0.1, 1e7, "req/s"),
        "Highest admission rate (req/s per upstream and worker).",
    )
    limit_initial: float = setting(
        "FILEPROXY_LIMIT_INITIAL",
        "100",
        _float(0.1, 1e7, "req/s"),
        "Admission rate at start (req/s per upstream and worker).",
    )
    limit_window: float = setting(
        "FILEPROXY_LIMIT_WINDOW",
        "1",
        _float(0.05, 60),
        "Seconds per AIMD decision window.",
    )
    limit_burst: int = setting(
        "FILEPROXY_LIMIT_BURST",
        "20",
        _int(1, 100000),
        "Requests admitted at once above the rate (GCRA burst).",
    )
    limit_error_statuses: tuple[int, ...] = setting(
        "FILEPROXY_LIMIT_ERROR_STATUSES",
        "502,503,504",
        _statuses,
        "Upstream statuses the limiter counts as overload (with connect failures, resets and "
        "timeouts, always), unless one path fails while the other paths answer (that path's "
        "failures are passed on, not counted); any other status, 500 and 429 included, "
        "counts as an answer.",
    )
    limit_status: str = setting(
        "FILEPROXY_LIMIT_STATUS",
        "503",
        _choice("503", "429"),
        "Status for requests over the admission rate (with Retry-After and a JSON body).",
    )
    limit_enforce: str = setting(
        "FILEPROXY_LIMIT_ENFORCE",
        "after-cut",
        _choice("after-cut", "always"),
        "after-cut: the limit admits only from the first cut until it is back at the maximum "
        "(a healthy upstream is never throttled, nor is one whose failures are one path's); "
        "always: a fixed ceiling "
        "(e.g. LIMIT_MIN = LIMIT_INITIAL = LIMIT_MAX).",
    )
    # TCP options: on the listening socket (inherited by accepted sockets) and on
    # every upstream socket
    tcp_nodelay: bool = setting(
        "FILEPROXY_TCP_NODELAY",
        "on",
        _bool,
        "TCP_NODELAY: send small writes at once (what nginx and Envoy do).",
    )
    tcp_quickack: bool = setting(
        "FILEPROXY_TCP_QUICKACK",
        "off",
        _bool,
        "TCP_QUICKACK at connect/accept; the kernel clears it after a few exchanges.",
    )
    so_keepalive: bool = setting(
        "FILEPROXY_SO_KEEPALIVE",
        "on",
        _bool,
        "SO_KEEPALIVE: detect dead peers of idle connections.",
    )
    tcp_keepidle: int = setting(
        "FILEPROXY_TCP_KEEPIDLE",
        "60",
        _int(1, 32767),
        "Seconds idle before the first keepalive probe (Linux default 7200).",
    )
    tcp_keepintvl: int = setting(
        "FILEPROXY_TCP_KEEPINTVL",
        "10",
        _int(1, 32767),
        "Seconds between keepalive probes.",
    )
    tcp_keepcnt: int = setting(
        "FILEPROXY_TCP_KEEPCNT",
        "6",
        _int(1, 127),
        "Unanswered keepalive probes before the connection is dropped.",
    )
    tcp_user_timeout_ms: int = setting(
        "FILEPROXY_TCP_USER_TIMEOUT",
        "0",
        _int(0, 1 << 31),
        "TCP_USER_TIMEOUT in ms: drop a connection whose sent data stays unacknowledged "
        "this long (0: kernel default).",
    )
    so_sndbuf: int = setting(
        "FILEPROXY_SO_SNDBUF",
        "0",
        _int(0, 1 << 30),
        "SO_SNDBUF bytes (0: kernel autotuning; a fixed size disables it).",
    )
    so_rcvbuf: int = setting(
        "FILEPROXY_SO_RCVBUF",
        "0",
        _int(0, 1 << 30),
        "SO_RCVBUF bytes (0: kernel autotuning; a fixed size disables it).",
    )
    tcp_notsent_lowat: int = setting(
        "FILEPROXY_TCP_NOTSENT_LOWAT",
        "0",
        _int(0, 1 << 30),
        "TCP_NOTSENT_LOWAT bytes: bound unsent data queued in the kernel (0: unset).",
    )
    # production process model
    workers: int = setting(
        "FILEPROXY_WORKERS",
        "auto",
        _workers,
        "gunicorn worker processes (auto: the CPU count).",
    )
    graceful_timeout: float = setting(
        "FILEPROXY_GRACEFUL_TIMEOUT",
        "300",
        _float(1, 86400),
        "Seconds in-flight downloads may run after SIGTERM / reload before workers exit.",
    )
    drain_delay: float = setting(
        "FILEPROXY_DRAIN_DELAY",
        "2",
        _float(0, 300),
        "Seconds between SIGTERM (/ready turns 503) and closing the listener, so load "
        "balancers stop sending first.",
    )
    # reporting
    stats_window: int = setting(
        "FILEPROXY_STATS_WINDOW",
        "60",
        _int(1, 3600),
        "Seconds of traffic that /stats rates and percentiles cover.",
    )
    log_level: str = setting(
        "FILEPROXY_LOG_LEVEL",
        "info",
        _choice("debug", "info", "warning", "error"),
        "Log level.",
    )
    log_format: str = setting(
        "FILEPROXY_LOG_FORMAT",
        "json",
        _choice("json", "text"),
        "Log lines as JSON (production) or plain text.",
    )
    access_log: bool = setting(
        "FILEPROXY_ACCESS_LOG",
        "on",
        _bool,
        "One JSON line per request, on stdout (other logs go to stderr).",
    )
    log_dir: str = setting(
        "FILEPROXY_LOG_DIR",
        "",
        _text,
        "Also write access.log and error.log into this directory (reopened after rotation).",
    )
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def upstream(self) -> URL:
        """The first replica's base URL (the one upstream of a single-URL setting)."""
        return self.upstreams[0].url

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


#: The settings table, in the order of Settings' fields: names, defaults, parsers, help.
SETTINGS_TABLE: tuple[SettingSpec, ...] = tuple(
    replace(f.metadata["spec"], attr=f.name) for f in fields(Settings) if "spec" in f.metadata
)


def redact_url(url: URL) -> str:
    """The URL as text with any user or password replaced by ***."""
    if url.user is None and url.password is None:
        return str(url)
    return str(url.with_user(None)).replace("://", f"://{REDACTED}@", 1)


def redact_url_text(text: str) -> str:
    """Redact credentials from a string that may or may not parse as a URL (or several,
    comma-separated)."""
    if "," in text:
        return ",".join(redact_url_text(part) for part in text.split(","))
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
