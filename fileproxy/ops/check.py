"""`fileproxy check`: the operator's diagnostic, one PASS/WARN/FAIL line per item."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version

import aiohttp
from yarl import URL

from fileproxy.delivery.cache import check_cache_dir
from fileproxy.http.errors import classify
from fileproxy.runtime import new_event_loop
from fileproxy.settings import Settings, redact_url
from fileproxy.state.redis_store import RedisStore, connect
from fileproxy.state.store import StoreError
from fileproxy.upstream import tcp_options, tls

RECOMMENDED_NOFILE = 65536
MINIMUM_NOFILE = 4096


@dataclass(frozen=True)
class CheckResult:
    verdict: str  # PASS | WARN | FAIL
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.verdict:4} {self.name}: {self.detail}"


def check_uvloop() -> CheckResult:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return CheckResult(
            "WARN", "uvloop", "not installed: asyncio's loop is slower; pip install uvloop"
        )
    return CheckResult("PASS", "uvloop", f"installed ({version('uvloop')})")


def check_open_files() -> CheckResult:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    detail = f"soft {soft}, hard {hard}"
    if soft >= RECOMMENDED_NOFILE:
        return CheckResult("PASS", "open files limit", detail)
    if soft >= MINIMUM_NOFILE:
        return CheckResult(
            "WARN",
            "open files limit",
            f"{detail}; raise to {RECOMMENDED_NOFILE} (LimitNOFILE= in the unit, ulimit -n)",
        )
    return CheckResult(
        "FAIL",
        "open files limit",
        f"{detail}; each stream needs two descriptors: raise to {RECOMMENDED_NOFILE}",
    )


def check_socket_options(settings: Settings) -> CheckResult:
    """Apply the configured options to a fresh TCP socket and read them back."""
    options = tcp_options.socket_options(settings)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        refused = tcp_options.apply(sock, options)
        values = tcp_options.read_back(sock, options)
    shown = " ".join(f"{name}={value}" for name, value in values.items())
    if refused:
        return CheckResult(
            "FAIL", "socket options", f"the kernel refused {', '.join(refused)}; unset them"
        )
    return CheckResult("PASS", "socket options", shown)


def check_spool(settings: Settings) -> CheckResult:
    """The spool's directory takes a file (the daemon would otherwise run without a spool,
    slow clients holding their upstream connections, with one warning per worker)."""
    if not settings.spool:
        return CheckResult("PASS", "spool", "off (FILEPROXY_SPOOL=off)")
    if settings.spool_dir:
        directory, where = settings.spool_dir, f"FILEPROXY_SPOOL_DIR={settings.spool_dir}"
    else:
        directory = tempfile.gettempdir()
        where = f"private directories under {directory}"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass  # created and gone: the directory takes the spool's files
        stat = os.statvfs(directory)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return CheckResult(
            "FAIL",
            "spool",
            f"{where}: cannot create a file there ({reason}); make it a directory the "
            "daemon's user can write, unset FILEPROXY_SPOOL_DIR or set FILEPROXY_SPOOL=off",
        )
    free_gib = stat.f_bavail * stat.f_frsize / (1 << 30)
    return CheckResult("PASS", "spool", f"{where}, {free_gib:.1f} GiB free")


def check_cache(settings: Settings) -> CheckResult:
    """The cache's directory exists or can be made, takes a file, and has room beyond
    FILEPROXY_CACHE_MIN_FREE (else every response is proxied uncached)."""
    ok, line = check_cache_dir(settings)
    return CheckResult("PASS" if ok else "FAIL", "cache", line)


async def check_upstream(settings: Settings, upstream: URL | None = None) -> CheckResult:
    """One replica of FILEPROXY_UPSTREAM (default: the first); an https one with its
    certificate, verified as the daemon verifies it."""
    target = settings.upstream if upstream is None else upstream
    url = redact_url(target)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout)
    context = tls.client_context(settings) if target.scheme == "https" else None
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            async with asyncio.timeout(settings.headers_timeout):
                async with session.get(
                    target, allow_redirects=False, ssl=context if context is not None else True
                ) as resp:
                    ttfb_ms = (time.perf_counter() - started) * 1000
                    status = resp.status
    except aiohttp.ClientConnectorCertificateError as exc:
        return CheckResult("FAIL", "upstream", f"{url}: {_certificate_advice(exc)}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        failure = classify(exc)
        advice = "start the backend or set FILEPROXY_UPSTREAM"
        if failure.error == "upstream_tls_failed":
            advice = "does it speak TLS on that port? (http:// for plain HTTP)"
        return CheckResult("FAIL", "upstream", f"{url}: {failure.detail}; {advice}")
    detail = f"{url} answered {status}, time to first byte {ttfb_ms:.1f} ms"
    if context is None:
        return CheckResult("PASS", "upstream", detail)
    if not settings.upstream_tls_verify:
        return CheckResult(
            "WARN",
            "upstream",
            f"{detail}; certificate NOT verified (FILEPROXY_UPSTREAM_TLS_VERIFY=off)",
        )
    trusted = "FILEPROXY_UPSTREAM_CA" if settings.upstream_ca else "the system's CAs"
    certificate = describe_certificate(await _peer_certificate(target, context, settings))
    return CheckResult(
        "PASS", "upstream", f"{detail}; certificate verified against {trusted}: {certificate}"
    )


async def _peer_certificate(url: URL, context: ssl.SSLContext, settings: Settings) -> object:
    """The upstream's certificate as ``getpeercert()`` shows it (a connection of its own:
    the check's response has given its connection back by now); None if that fails."""
    try:
        async with asyncio.timeout(settings.connect_timeout):
            _, writer = await asyncio.open_connection(
                url.host, url.port, ssl=context, server_hostname=url.host
            )
    except (OSError, TimeoutError):
        return None
    try:
        return writer.get_extra_info("peercert")
    finally:
        writer.close()


def _certificate_advice(exc: aiohttp.ClientConnectorCertificateError) -> str:
    """What failed, in OpenSSL's words (the operator may see the host), and what to set."""
    error = exc.certificate_error
    message = str(getattr(error, "verify_message", None) or error).rstrip(".")
    if getattr(error, "verify_code", None) in (62, 64):  # host name / IP address mismatch
        advice = (
            "the certificate must name the host of FILEPROXY_UPSTREAM (subjectAltName); "
            "use the name it was issued for"
        )
    else:
        advice = (
            "set FILEPROXY_UPSTREAM_CA to the PEM file of the CA that issued it "
            "(or, unverified, FILEPROXY_UPSTREAM_TLS_VERIFY=off)"
        )
    return f"certificate verify failed: {message}; {advice}"


def describe_certificate(peercert: object) -> str:
    """``CN=..., issued by CN=..., valid until ...`` from ``getpeercert()``."""
    if not isinstance(peercert, dict) or not peercert:
        return "(no details)"

    def name(field: str) -> str:
        rdns = peercert.get(field, ())
        parts = [f"{_SHORT.get(k, k)}={v}" for rdn in rdns for k, v in rdn]
        return ",".join(parts) or "?"

    return f"{name('subject')}, issued by {name('issuer')}, valid until {peercert.get('notAfter')}"


_SHORT = {"commonName": "CN", "organizationName": "O", "countryName": "C"}


async def check_redis(settings: Settings) -> CheckResult:
    if settings.redis_url is None:
        return CheckResult("PASS", "redis", "not configured: state is kept in-process (embedded)")
    url = redact_url(settings.redis_url)
    store = RedisStore(settings, connect(settings, timeout_s=2.0))
    try:
        started = time.perf_counter()
        await store.ping()
        rtt_ms = (time.perf_counter() - started) * 1000
    except StoreError as exc:
        return CheckResult(
            "FAIL",
            "redis",
            f"{url}: {exc}; check REDIS_URL, FILEPROXY_REDIS_CLUSTER and that redis-server runs",
        )
    finally:
        await store.close()
    return CheckResult("PASS", "redis", f"{url} answered PING in {rtt_ms:.2f} ms")


async def _network_checks(settings: Settings) -> list[CheckResult]:
    *upstreams, redis = await asyncio.gather(
        *(check_upstream(settings, spec.url) for spec in settings.upstreams), check_redis(settings)
    )
    if any(result.verdict == "PASS" for result in upstreams):
        # one replica down of several: the others serve; a warning, not a failure
        upstreams = [
            CheckResult("WARN", r.name, r.detail) if r.verdict == "FAIL" else r for r in upstreams
        ]
    return [*upstreams, redis]


def run_checks(settings: Settings) -> int:
    results = [
        CheckResult("PASS", "configuration", "all variables valid"),
        check_uvloop(),
        check_open_files(),
        check_socket_options(settings),
        check_spool(settings),
        check_cache(settings),
    ]
    loop = new_event_loop()
    try:
        results += loop.run_until_complete(_network_checks(settings))
    finally:
        loop.close()
    for result in results:
        print(result.line())
    failed = [r for r in results if r.verdict == "FAIL"]
    print(f"{len(failed)} problem(s) found" if failed else "all checks passed")
    return 1 if failed else 0
