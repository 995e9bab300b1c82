"""The shipped deployment, for real: conf/nginx/fileproxy.conf and conf/fileproxy.service.

The nginx site is rendered for ephemeral loopback ports (listen port, upstream
address, log paths: nothing else changes) and run by a real nginx in front of
gunicorn (`gunicorn -c gunicorn.conf.py`, 2 workers) in front of the sample
upstream. The systemd unit is checked with `systemd-analyze verify` and
`systemd-analyze security --offline` after its /opt/fileproxy paths are pointed at
this checkout (verify insists that ExecStart exists).

Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fileproxy.lifecycle import CUT_OFF_MARGIN_S
from fileproxy.sample_upstream import file_bytes
from fileproxy.settings import Settings
from tests.conftest import (
    ROOT,
    Process,
    clean_env,
    free_port,
    own_cache_dir,
    require_binary,
    wait_for_port,
)

SITE = ROOT / "conf" / "nginx" / "fileproxy.conf"
UNIT = ROOT / "conf" / "fileproxy.service"
VENV_BIN = Path(sys.executable).parent
DEFAULTS = Settings.from_env({})

WORKERS = 2
DRAIN_DELAY = 1.0
GRACEFUL_TIMEOUT = 60.0
# 30 chunks of 64 KiB, one every 0.2 s: a download in flight for about 6 s
SLOW_CHUNKS, SLOW_CHUNK_SIZE, SLOW_GAP = 30, 65536, 0.2
SLOW_PATH = f"/slow?delay=0&body_delay={SLOW_GAP}&chunks={SLOW_CHUNKS}&chunk_size={SLOW_CHUNK_SIZE}"
SLOW_BODY = b"".join(bytes([ord("a") + k % 26]) * SLOW_CHUNK_SIZE for k in range(SLOW_CHUNKS))


# --------------------------------------------------------------------------------------------
# programs
# --------------------------------------------------------------------------------------------


def _sbin(name: str) -> str:
    """A program that may live in /usr/sbin, which a normal user's PATH lacks."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in ("/usr/sbin", "/sbin"):
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return require_binary(name)  # fails with the install command


def nginx_binary() -> str:
    return _sbin("nginx")


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze is required: apt-get install -y systemd (or run `make test` as root)"
        )
    return path


# --------------------------------------------------------------------------------------------
# rendering the shipped files for a test
# --------------------------------------------------------------------------------------------


def _replace_once(text: str, old: str, new: str) -> str:
    """Substitute a line the test relies on; a changed config fails loudly here."""
    assert text.count(old) == 1, f"expected exactly one {old!r} in the shipped config"
    return text.replace(old, new)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def render_site(listen_port: int, upstream: str, log_dir: Path, text: str | None = None) -> str:
    """The shipped site with only its listen port, upstream address and log paths changed."""
    site = SITE.read_text() if text is None else text
    site = _replace_once(site, "listen 80;", f"listen 127.0.0.1:{listen_port};")
    ipv6 = f"listen [::1]:{listen_port};" if _ipv6_loopback() else ""
    site = _replace_once(site, "listen [::]:80;", ipv6)
    site = _replace_once(site, "    server 127.0.0.1:10080;", f"    server {upstream};")
    assert "/var/log/nginx/" in site
    return site.replace("/var/log/nginx/", f"{log_dir}/")


def write_nginx_conf(directory: Path, site: str) -> Path:
    """A minimal top-level nginx.conf in `directory` whose http { } includes the site."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fileproxy.conf").write_text(site)
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy_temp;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    access_log {directory}/access.log;
    include {directory}/fileproxy.conf;
}}
"""
    )
    return conf


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    directory = conf.parent
    return subprocess.run(
        [
            nginx_binary(),
            "-t",
            "-c",
            str(conf),
            "-p",
            str(directory),
            "-e",
            f"{directory}/error.log",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def render_unit(text: str | None = None) -> str:
    """The shipped unit with /opt/fileproxy pointed at this checkout and its venv.

    Nothing else changes: verify insists that ExecStart exists, but it does not
    resolve User=/Group= (checked: a made-up user passes), so User=fileproxy stays,
    and `systemd-analyze security` rates the unit as shipped.
    """
    unit = UNIT.read_text() if text is None else text
    assert "/opt/fileproxy/.venv/bin/gunicorn" in unit
    unit = unit.replace("/opt/fileproxy/.venv/bin/", f"{VENV_BIN}/")
    return unit.replace("/opt/fileproxy", str(ROOT))


def analyze(tmp: Path, unit_text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze on a unit file named fileproxy.service (the name matters)."""
    directory = tmp / f"unit-{time.monotonic_ns()}"
    directory.mkdir()
    path = directory / "fileproxy.service"
    path.write_text(unit_text)
    return subprocess.run(
        [systemd_analyze(), *args, str(path)], capture_output=True, text=True, timeout=60
    )


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order (keys may repeat)."""
    section, entries = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def nginx_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2) or "s"]


def nginx_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG])?", value)
    assert match, value
    return (
        int(match.group(1))
        * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[(match.group(2) or "").lower()]
    )


def site_directive(name: str, text: str | None = None) -> str:
    """The value of a directive the site sets once."""
    values = re.findall(rf"^\s*{name}\s+([^;]+);", SITE.read_text() if text is None else text, re.M)
    assert len(values) == 1, f"{name}: {values}"
    return values[0].strip()


# --------------------------------------------------------------------------------------------
# the stack: sample upstream <- gunicorn (2 workers) <- nginx
# --------------------------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FILEPROXY_", "HTTP_", "REDIS_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return own_cache_dir(env)


def _spawn(args: list[str], env: dict[str, str], log: Path, port: int | None) -> Process:
    with open(log, "wb") as out:
        popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    process = Process(popen, port or 0, log)
    if port is not None:
        try:
            wait_for_port(port, timeout=60, process=popen)
        except Exception:
            process.stop()
            raise AssertionError(f"{args[0]} did not start:\n{log.read_text()}") from None
    return process


def start_gunicorn(tmp: Path, upstream: str, bind: str | None = None, **env: str) -> Process:
    """`gunicorn -c gunicorn.conf.py` as ExecStart runs it, waited for until every worker runs."""
    port = free_port()
    settings = {
        "FILEPROXY_BIND": bind or f"127.0.0.1:{port}",
        "FILEPROXY_UPSTREAM": upstream,
        "FILEPROXY_WORKERS": str(WORKERS),
        "FILEPROXY_DRAIN_DELAY": str(DRAIN_DELAY),
        "FILEPROXY_GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT),
        "FILEPROXY_LOG_FORMAT": "json",
        # the relay, as everywhere in the suites but the cache's (see conftest.clean_env)
        "FILEPROXY_CACHE": "off",
        **env,
    }
    args = [str(VENV_BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
    log = tmp / f"gunicorn-{port}.log"
    process = _spawn(args, _clean_env(**settings), log, None if bind else port)
    try:
        # gunicorn loses a SIGTERM that reaches a worker before it installed its handlers
        process.wait_for_log("fileproxy worker started", count=WORKERS, timeout=60)
    except Exception:
        process.stop()
        raise
    return process


def start_nginx(directory: Path, upstream: str, site_text: str | None = None) -> Process:
    port = free_port()
    conf = write_nginx_conf(directory, render_site(port, upstream, directory, site_text))
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr
    args = [nginx_binary(), "-c", str(conf), "-p", str(directory), "-e", f"{directory}/error.log"]
    return _spawn(args, _clean_env(), directory / "nginx-stdout.log", port)


@dataclass
class Stack:
    sample: Process
    gunicorn: Process
    nginx: Process
    nginx_dir: Path

    def nginx_error_log(self) -> str:
        path = self.nginx_dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_pids(self) -> list[int]:
        return [
            int(pid)
            for pid in re.findall(r"Booting worker with pid: (\d+)", self.gunicorn.log_text())
        ]


@pytest.fixture
def stack(sample_upstream: Process, tmp_dir: Path) -> Iterator[Stack]:
    gunicorn = start_gunicorn(tmp_dir, sample_upstream.url)
    nginx = None
    try:
        nginx = start_nginx(tmp_dir / "nginx", f"127.0.0.1:{gunicorn.port}")
        yield Stack(sample_upstream, gunicorn, nginx, tmp_dir / "nginx")
    finally:
        if nginx is not None:
            nginx.stop()
        gunicorn.stop(timeout=GRACEFUL_TIMEOUT + 10)


def session(**connector: object) -> aiohttp.ClientSession:
    """A client that changes nothing (no decompression, cookies or redirects)."""
    return aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
        connector=aiohttp.TCPConnector(**connector),  # type: ignore[arg-type]
    )


async def download(
    client: aiohttp.ClientSession, url: str, started: asyncio.Event | None = None
) -> tuple[int, bytes]:
    """Status and body, read as it arrives; `started` is set at the first body bytes."""
    async with client.get(url) as resp:
        parts = []
        async for chunk in resp.content.iter_any():
            parts.append(chunk)
            if started is not None:
                started.set()
        return resp.status, b"".join(parts)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until `condition()` holds: for log lines, written just after a response is sent."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def sha256_of(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# f) the files themselves
# --------------------------------------------------------------------------------------------


def test_nginx_site_passes_nginx_t(tmp_dir):
    conf = write_nginx_conf(tmp_dir / "ok", render_site(free_port(), "127.0.0.1:10080", tmp_dir))
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr and "test is successful" in checked.stderr
    # clean: no [warn] (duplicate directives, buffer sizes nginx had to adjust...)
    assert "[warn]" not in checked.stderr and "[emerg]" not in checked.stderr, checked.stderr

    # and nginx -t really checks what we ship: a misspelt directive fails it
    broken = SITE.read_text().replace("proxy_request_buffering off;", "proxy_request_bufering off;")
    conf = write_nginx_conf(
        tmp_dir / "typo", render_site(free_port(), "127.0.0.1:10080", tmp_dir, broken)
    )
    checked = nginx_test(conf)
    assert checked.returncode != 0
    assert 'unknown directive "proxy_request_bufering"' in checked.stderr


def test_nginx_site_fits_the_distribution_nginx_conf(tmp_dir):
    """Included from Debian's /etc/nginx/nginx.conf next to the default site, as installed.

    That http { } turns gzip on and sets its own logs: the site must still parse,
    with its listen 80 as shipped (nginx -t does not bind). Only paths nginx -t
    would write to are moved into the test's directory.
    """
    system_conf = Path("/etc/nginx/nginx.conf")
    if not system_conf.exists():
        pytest.fail("/etc/nginx/nginx.conf is missing: apt-get install -y nginx")
    site = SITE.read_text().replace("/var/log/nginx/", f"{tmp_dir}/")
    (tmp_dir / "fileproxy.conf").write_text(site)
    conf = system_conf.read_text()
    conf = re.sub(r"^pid .*;$", f"pid {tmp_dir}/nginx.pid;", conf, flags=re.M)
    conf = re.sub(
        r"^(\s*)(error_log|access_log) [^;]*;", rf"\1\2 {tmp_dir}/\2.log;", conf, flags=re.M
    )
    temp_paths = "".join(
        f"\n    {kind}_temp_path {tmp_dir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = _replace_once(conf, "http {", "http {" + temp_paths)
    conf = _replace_once(
        conf,
        "include /etc/nginx/sites-enabled/*;",
        f"include /etc/nginx/sites-enabled/*;\n    include {tmp_dir}/fileproxy.conf;",
    )
    path = tmp_dir / "nginx.conf"
    path.write_text(conf)
    checked = nginx_test(path)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    assert "[emerg]" not in checked.stderr and "conflicting" not in checked.stderr, checked.stderr


def test_nginx_site_matches_fileproxy_settings():
    """Each nginx timeout and size relates to fileproxy's setting as its comment claims."""
    site = SITE.read_text()
    upstream_block = re.search(r"upstream fileproxy \{(.*?)\n\}", site, re.S)
    assert upstream_block
    block = upstream_block.group(1)
    assert re.search(r"^\s*server 127\.0\.0\.1:10080;", block, re.M)
    assert str(DEFAULTS.bind) == "127.0.0.1:10080"
    assert site_directive("keepalive", block) == "64"
    # nginx closes idle upstream connections before fileproxy does (the 502 race)
    assert nginx_seconds(site_directive("keepalive_timeout", block)) < (
        DEFAULTS.client_keepalive_timeout
    )
    # fileproxy's own 504 (time to headers, idle body) comes before nginx gives up
    read_timeout = nginx_seconds(site_directive("proxy_read_timeout"))
    assert read_timeout > DEFAULTS.connect_timeout + DEFAULTS.headers_timeout
    assert read_timeout > DEFAULTS.read_timeout
    assert nginx_seconds(site_directive("proxy_send_timeout")) >= read_timeout
    assert nginx_bytes(site_directive("client_max_body_size")) == DEFAULTS.max_body_size
    assert site_directive("proxy_request_buffering") == "off"
    assert site_directive("proxy_http_version") == "1.1"
    assert site_directive("proxy_max_temp_file_size") == "0"
    assert nginx_bytes(site_directive("client_body_buffer_size")) == DEFAULTS.buffer_size
    # X-Accel-Buffering must stay honoured: streams depend on it
    assert "X-Accel-Buffering" not in site_directive("proxy_ignore_headers")
    headers = dict(re.findall(r"^\s*proxy_set_header\s+(\S+)\s+([^;]+);", site, re.M))
    assert headers == {
        "Connection": "$fileproxy_connection",  # "" (keepalive), "upgrade" for a WebSocket
        "Upgrade": "$http_upgrade",
        "Host": "$host",
        "X-Forwarded-For": "$proxy_add_x_forwarded_for",
        "X-Forwarded-Proto": "$scheme",
        "X-Forwarded-Host": "$host",
        "X-Request-ID": "$fileproxy_request_id",
    }
    for path in ("/stats", "/metrics"):
        location = re.search(rf"location = {path} \{{(.*?)\}}", site, re.S)
        assert location, path
        rules = re.findall(r"^\s*(allow|deny)\s+([^;]+);", location.group(1), re.M)
        assert rules == [("allow", "127.0.0.1"), ("allow", "::1"), ("deny", "all")]


def test_systemd_unit_verifies(tmp_dir):
    rendered = render_unit()
    result = analyze(tmp_dir, rendered, "verify")
    # verify exits 0 even for unknown keys and unparsable values (it only warns):
    # clean means no output at all
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr

    # it really checks the file: a typo'd directive, a bad value, a missing program
    typo = rendered.replace("ProtectSystem=strict", "ProtectSytem=strict")
    result = analyze(tmp_dir, typo, "verify")
    assert "Unknown key 'ProtectSytem' in section [Service]" in result.stderr, result.stderr
    bad_value = rendered.replace("TimeoutStopSec=330", "TimeoutStopSec=33o")
    result = analyze(tmp_dir, bad_value, "verify")
    assert "Failed to parse" in result.stderr and "33o" in result.stderr, result.stderr
    # the shipped file as is, on a host without /opt/fileproxy
    result = analyze(tmp_dir, UNIT.read_text(), "verify")
    assert result.returncode != 0
    assert "/opt/fileproxy/.venv/bin/gunicorn is not executable" in result.stderr


def test_systemd_unit_is_sandboxed(tmp_dir):
    """`systemd-analyze security` rates the unit; the sandbox lines are what keeps it low."""
    rendered = render_unit()
    result = analyze(tmp_dir, rendered, "security", "--offline=true", "--threshold=20")
    assert result.returncode == 0, result.stdout + result.stderr
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)[1])
    assert exposure <= 2.0

    sandbox_keys = (
        "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "ProtectKernel", "ProtectControlGroups", "RestrictAddressFamilies", "LockPersonality",
        "RestrictRealtime", "SystemCallArchitectures", "SystemCallFilter",
        "CapabilityBoundingSet", "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset",
        "RestrictNamespaces", "RestrictSUIDSGID", "PrivateMounts", "RemoveIPC",
    )  # fmt: skip
    unsandboxed = "\n".join(
        line for line in rendered.splitlines() if not line.startswith(sandbox_keys)
    )
    result = analyze(tmp_dir, unsandboxed, "security", "--offline=true", "--threshold=20")
    assert result.returncode != 0  # the threshold above is not met by accident


def test_systemd_unit_matches_gunicorn_and_fileproxy():
    entries = unit_entries(UNIT.read_text())
    service = {}
    for section, key, value in entries:
        if section == "Service":
            assert key not in service, f"{key} set twice"
            service[key] = value
    assert service["Type"] == "notify"
    assert service["EnvironmentFile"] in (
        "/etc/fileproxy/fileproxy.env",
        "-/etc/fileproxy/fileproxy.env",
    )
    assert service["WorkingDirectory"] == "/opt/fileproxy"
    assert (
        service["ExecStart"]
        == "/opt/fileproxy/.venv/bin/gunicorn -c /opt/fileproxy/gunicorn.conf.py"
    )
    assert service["ExecReload"] == "/bin/kill -s HUP $MAINPID"
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    assert service["LimitNOFILE"] == "65536"
    assert service["User"] == "fileproxy" and service["Group"] == "fileproxy"
    assert service["RuntimeDirectory"] == "fileproxy"
    assert service["CapabilityBoundingSet"] == ""
    assert service["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert service["ProtectSystem"] == "strict"
    for key in (
        "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectControlGroups", "LockPersonality", "RestrictRealtime",
    ):  # fmt: skip
        assert service[key] == "yes", key
    assert service["SystemCallArchitectures"] == "native"
    # systemd must not SIGKILL what gunicorn still lets finish: gunicorn's own
    # graceful_timeout is ceil(DRAIN_DELAY + GRACEFUL_TIMEOUT) + the cut-off's margin
    gunicorn_graceful = (
        math.ceil(DEFAULTS.drain_delay + DEFAULTS.graceful_timeout) + CUT_OFF_MARGIN_S
    )
    assert int(service["TimeoutStopSec"]) >= gunicorn_graceful + 10
    # a configuration error (exit 2) is not retried forever
    assert service["RestartPreventExitStatus"] == "2"
    # the env file docs/deployment.md tells operators to copy lists what the unit reads
    assert (ROOT / "conf" / "fileproxy.env").read_text().count("#FILEPROXY_GRACEFUL_TIMEOUT=300")


# --------------------------------------------------------------------------------------------
# a) - e) the whole chain
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_256m_download_through_nginx_is_byte_exact(stack):
    name = "256m.bin"
    async with session() as client:
        started = time.monotonic()
        async with client.get(f"{stack.nginx.url}/files/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(256 << 20)
            assert "X-Request-ID" in resp.headers
            digest, size = hashlib.sha256(), 0
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        elapsed = time.monotonic() - started
    assert size == 256 << 20
    assert digest.hexdigest() == sha256_of(file_bytes(name))
    # proxy_max_temp_file_size 0: nothing was spooled to disk on the way
    temp = stack.nginx_dir / "proxy_temp"
    assert not temp.exists() or not any(p.is_file() for p in temp.rglob("*"))
    assert "temporary file" not in stack.nginx_error_log()
    print(f"256 MiB through nginx and gunicorn in {elapsed:.2f} s")


async def _sse_arrivals(url: str) -> tuple[dict[str, str], list[tuple[float, int]]]:
    arrivals: list[tuple[float, int]] = []
    async with session() as client, client.get(url) as resp:
        assert resp.status == 200
        headers = dict(resp.headers)
        buffer = b""
        async for chunk in resp.content.iter_any():
            now = time.monotonic()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in event.decode().splitlines())
                arrivals.append((now, int(fields["id"])))
    return headers, arrivals


async def test_sse_through_nginx_arrives_event_by_event(stack, tmp_dir):
    url = f"{stack.nginx.url}/sse?interval=0.3&count=5"
    headers, arrivals = await _sse_arrivals(url)
    assert [n for _, n in arrivals] == [1, 2, 3, 4, 5]
    assert headers["Content-Type"].startswith("text/event-stream")
    # nginx consumed X-Accel-Buffering (it hides X-Accel-* from clients)
    assert "X-Accel-Buffering" not in headers
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert all(gap > 0.15 for gap in gaps), gaps  # one by one, about 0.3 s apart
    assert arrivals[-1][0] - arrivals[0][0] > 0.9

    # nginx honours the header: this stream took nginx's unbuffered path, while a
    # file (Content-Length, no X-Accel-Buffering) takes the buffered one. The
    # arrival times alone cannot tell: nginx's buffered path also passes on what
    # it has read, unless gzip or a cache hold it. nginx's debug log shows the path.
    debug_dir = tmp_dir / "nginx-debug"
    shipped = SITE.read_text()
    debug_site = _replace_once(
        shipped,
        "error_log /var/log/nginx/fileproxy.error.log;",
        "error_log /var/log/nginx/fileproxy.error.log debug;",
    )
    debug = start_nginx(debug_dir, f"127.0.0.1:{stack.gunicorn.port}", debug_site)
    debug_log = debug_dir / "fileproxy.error.log"
    try:
        _, again = await _sse_arrivals(f"{debug.url}/sse?interval=0.05&count=3")
        assert [n for _, n in again] == [1, 2, 3]
        sse_log = debug_log.read_text(errors="replace")
        async with session() as client:
            status, body = await download(client, f"{debug.url}/files/1m.bin")
        assert status == 200 and len(body) == 1 << 20
        file_log = debug_log.read_text(errors="replace")[len(sse_log) :]
    finally:
        debug.stop()
    assert 'http proxy header: "X-Accel-Buffering: no"' in sse_log
    assert "http upstream process non buffered upstream" in sse_log
    assert "pipe read upstream" not in sse_log
    assert "http upstream process non buffered" not in file_log
    assert "pipe read upstream" in file_log  # the buffered event pipe


@pytest.mark.timeout(90)
async def test_reload_replaces_workers_while_a_download_completes(stack):
    old_workers = stack.worker_pids()
    assert len(old_workers) == WORKERS
    statuses: list[int] = []
    async with session() as client, session() as other:
        started = asyncio.Event()
        slow = asyncio.create_task(download(client, f"{stack.nginx.url}{SLOW_PATH}", started))
        await asyncio.wait_for(started.wait(), 10)

        async def keep_asking() -> None:
            while not slow.done():
                async with other.get(f"{stack.nginx.url}/files/4k.bin") as resp:
                    await resp.read()
                    statuses.append(resp.status)
                await asyncio.sleep(0.05)

        asker = asyncio.create_task(keep_asking())
        os.kill(stack.gunicorn.pid, signal.SIGHUP)  # = systemctl reload fileproxy
        await asyncio.to_thread(stack.gunicorn.wait_for_log, "Booting worker", 2 * WORKERS)
        await asyncio.to_thread(
            stack.gunicorn.wait_for_log, "fileproxy worker started", 2 * WORKERS
        )
        assert not slow.done()  # the new workers run while the old one still sends
        status, body = await asyncio.wait_for(slow, 30)
        await asker
    assert status == 200
    assert len(body) == len(SLOW_BODY) and body == SLOW_BODY
    # clients never noticed: every request during the reload was answered
    assert statuses and set(statuses) == {200}, statuses
    new_workers = [pid for pid in stack.worker_pids() if pid not in old_workers]
    assert len(new_workers) == WORKERS
    # the old workers are gone once their downloads finished; the master stayed
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in old_workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(_alive(pid) for pid in old_workers)
    assert all(_alive(pid) for pid in new_workers)
    log = stack.gunicorn.log_text()
    assert "draining" in log and "Traceback" not in log and "WORKER TIMEOUT" not in log
    assert stack.gunicorn.stop(timeout=GRACEFUL_TIMEOUT + 10) == 0, log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited but is not reaped yet
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(90)
async def test_sigterm_drains_ready_503_and_finishes_the_download(stack):
    gunicorn = stack.gunicorn
    async with session() as client, session(force_close=True) as fresh:
        started = asyncio.Event()
        slow = asyncio.create_task(download(client, f"{stack.nginx.url}{SLOW_PATH}", started))
        await asyncio.wait_for(started.wait(), 10)
        async with fresh.get(f"{gunicorn.url}/ready") as resp:
            assert resp.status == 200, await resp.text()

        os.kill(gunicorn.pid, signal.SIGTERM)  # = systemctl stop fileproxy (KillMode=mixed)
        signalled = time.monotonic()
        # during FILEPROXY_DRAIN_DELAY the listener is open and /ready says 503,
        # on a new connection straight to gunicorn (what a load balancer does)
        answers = []
        while time.monotonic() - signalled < DRAIN_DELAY * 0.8:
            async with fresh.get(f"{gunicorn.url}/ready") as resp:
                answers.append((resp.status, await resp.json()))
            if resp.status == 503:
                break
            await asyncio.sleep(0.02)
        assert answers and answers[-1] == (503, {"ready": False, "reason": "draining"}), answers
        # then the listener closes: no new connections.
        refused_after = None
        while refused_after is None:
            waited = time.monotonic() - signalled
            assert waited < DRAIN_DELAY + 1.5, "the listener stayed open"
            try:
                async with fresh.get(f"{gunicorn.url}/ready") as resp:
                    assert resp.status == 503, await resp.text()
                    await resp.read()
            except aiohttp.ClientConnectionError:
                refused_after = waited
            await asyncio.sleep(0.05)
        assert refused_after >= DRAIN_DELAY * 0.9  # open for the whole drain delay
        assert gunicorn.popen.poll() is None  # still finishing the download
        assert not slow.done()
        status, body = await asyncio.wait_for(slow, 30)
    assert status == 200 and body == SLOW_BODY
    code = await asyncio.to_thread(gunicorn.popen.wait, GRACEFUL_TIMEOUT)
    log = gunicorn.log_text()
    assert code == 0, log
    assert log.count("draining: /ready is 503") == WORKERS
    assert "Traceback" not in log


async def test_metrics_and_stats_through_nginx_from_loopback(stack):
    base = stack.nginx.url
    caused = {"2xx": 5, "4xx": 3, "5xx": 2}
    async with session() as client:
        for _ in range(caused["2xx"]):
            async with client.get(f"{base}/files/4k.bin") as resp:
                assert resp.status == 200 and len(await resp.read()) == 4096
        for _ in range(caused["4xx"]):
            async with client.get(f"{base}/files/no-such.bin") as resp:
                assert resp.status == 404
                await resp.read()
        for _ in range(caused["5xx"]):
            async with client.get(f"{base}/status/503") as resp:
                assert resp.status == 503
                await resp.read()

        # /metrics is per worker (label pid): scrape through nginx until every
        # worker answered once, concurrently so nginx opens several connections
        workers = set(stack.worker_pids())
        scraped: dict[str, dict[str, list]] = {}
        deadline = time.monotonic() + 30
        while set(map(int, scraped)) != workers:
            assert time.monotonic() < deadline, f"scraped {sorted(scraped)} of {workers}"

            async def scrape() -> str:
                async with client.get(f"{base}/metrics") as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    return await resp.text()

            for text in await asyncio.gather(*(scrape() for _ in range(8))):
                families = {f.name: f.samples for f in text_string_to_metric_families(text)}
                pid = families["fileproxy_uvloop_enabled"][0].labels["pid"]
                scraped[pid] = families

        async with client.get(f"{base}/stats") as resp:
            assert resp.status == 200
            stats = await resp.json()
        async with client.get(f"{base}/health") as resp:
            assert resp.status == 200
        async with client.get(f"{base}/ready") as resp:
            assert resp.status == 200

    def total(metric: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for families in scraped.values()
            for s in families[metric]
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    for status_class, count in caused.items():
        got = total("fileproxy_requests", "fileproxy_requests_total", status_class=status_class)
        assert got == count, (status_class, got)
    assert (
        total("fileproxy_request_duration_seconds", "fileproxy_request_duration_seconds_count")
        == 10
    )
    assert total("fileproxy_response_bytes", "fileproxy_response_bytes_total") >= 5 * 4096
    assert total("fileproxy_in_flight_requests", "fileproxy_in_flight_requests") == 0
    assert total("fileproxy_draining", "fileproxy_draining") == 0
    for families in scraped.values():
        assert families["fileproxy_uvloop_enabled"][0].value == 1
    assert stats["scope"] == "worker" and stats["pid"] in workers
    assert stats["performance_optimizer"]["metrics"]["uvloop_enabled"] is True


async def test_stats_and_metrics_are_refused_to_other_addresses(stack):
    """fileproxy sees every request coming from nginx (loopback): nginx must filter."""
    # 127.0.0.2 is a loopback address, but not one the site allows
    async with session(local_addr=("127.0.0.2", 0)) as outsider:
        for path in ("/stats", "/metrics", "/%73tats", "//metrics"):
            async with outsider.get(f"{stack.nginx.url}{path}") as resp:
                body = await resp.text()
                assert resp.status == 403, (path, resp.status, body)
                assert "nginx" in body  # nginx's page: fileproxy was never asked
        for path in ("/health", "/ready", "/files/hello.txt"):
            async with outsider.get(f"{stack.nginx.url}{path}") as resp:
                assert resp.status == 200, path
        # fileproxy itself also refuses them to a non-admin peer (FILEPROXY_ADMIN_ALLOW)
        async with outsider.get(f"{stack.gunicorn.url}/stats") as resp:
            assert resp.status == 403
            assert (await resp.json())["error"] == "forbidden"
    # fileproxy's access log: nginx (127.0.0.1) never passed an admin request on
    await eventually(
        lambda: ("127.0.0.2", "/stats") in _fileproxy_requests(stack.gunicorn.log_text())
    )
    seen = _fileproxy_requests(stack.gunicorn.log_text())
    assert not [path for remote, path in seen if remote == "127.0.0.1" and "ats" in path], seen


def _fileproxy_requests(log: str) -> list[tuple[str, str]]:
    """(remote, path) of every line of fileproxy's access log."""
    requests = []
    for line in log.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "fileproxy.access":
                requests.append((record["remote"], record["path"]))
    return requests


async def test_forwarded_headers_and_request_id_through_nginx(stack):
    async with session() as client:
        # the client's own claims about X-Forwarded-* are not believed by nginx
        async with client.get(
            f"{stack.nginx.url}/echo",
            headers={
                "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.example",
                "X-Request-ID": "client-id-42",
                "Host": "files.example.com",
            },
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-ID"] == "client-id-42"
            echo = await resp.json()
        async with client.get(f"{stack.nginx.url}/echo") as resp:
            generated = resp.headers["X-Request-ID"]
            plain = await resp.json()
        async with client.get(
            f"{stack.nginx.url}/echo", headers={"X-Request-ID": "not valid!"}
        ) as resp:
            replaced = resp.headers["X-Request-ID"]
            await resp.read()
    headers = dict(echo["headers"])
    # nginx appends the client address, fileproxy appends nginx's
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"  # nginx's $scheme, kept by fileproxy
    assert headers["X-Forwarded-Host"] == "files.example.com"
    assert headers["X-Request-ID"] == "client-id-42"
    assert "Connection" not in headers and "Keep-Alive" not in headers
    # absent or invalid: nginx's $request_id, which fileproxy keeps and the backend sees
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert dict(plain["headers"])["X-Request-ID"] == generated
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)
    # nginx's access log carries the same ID (written just after the response)
    access_log = stack.nginx_dir / "fileproxy.access.log"

    def logged_ids() -> set[str]:
        return {json.loads(line)["request_id"] for line in access_log.read_text().splitlines()}

    await eventually(lambda: {"client-id-42", generated, replaced} <= logged_ids())


async def test_unix_socket_deployment(sample_upstream, tmp_dir):
    """FILEPROXY_BIND=unix:/run/fileproxy/... (RuntimeDirectory=) with nginx's `server unix:`.

    nginx on the same host is the only peer of the socket, so it must count as the
    fronting proxy exactly as loopback does: /stats and /metrics open to it.
    """
    sock = tmp_dir / "run" / "fileproxy.sock"
    sock.parent.mkdir()
    # like RuntimeDirectoryMode=0755: nginx's workers (another user when run as
    # root) must reach the socket
    for directory in (tmp_dir, sock.parent):
        directory.chmod(0o755)
    gunicorn = start_gunicorn(tmp_dir, sample_upstream.url, bind=f"unix:{sock}")
    nginx = None
    try:
        nginx = start_nginx(tmp_dir / "nginx-unix", f"unix:{sock}")
        async with session() as client:
            async with client.get(f"{nginx.url}/files/1m.bin") as resp:
                assert resp.status == 200
                body = await resp.read()
            assert body == b"".join(file_bytes("1m.bin"))
            async with client.get(f"{nginx.url}/ready") as resp:
                assert resp.status == 200
            async with client.get(f"{nginx.url}/stats") as resp:
                assert resp.status == 200, await resp.text()
            async with client.get(f"{nginx.url}/metrics") as resp:
                assert resp.status == 200, await resp.text()
        # what nginx with a TLS listener sends ($scheme https) must reach the backend
        unix = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))
        async with (
            unix,
            unix.get(
                "http://files.example.com/echo",
                headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"},
            ) as resp,
        ):
            assert resp.status == 200
            headers = dict((await resp.json())["headers"])
        assert headers["X-Forwarded-Proto"] == "https", headers
    finally:
        if nginx is not None:
            nginx.stop()
        assert gunicorn.stop(timeout=GRACEFUL_TIMEOUT + 10) == 0


def test_check_fails_on_a_spool_directory_that_takes_no_file(sample_upstream, tmp_dir):
    """Without a usable directory the daemon runs without a spool (slow clients hold their
    upstream connections): `fileproxy check` must say so, not pass."""

    def spool_line(**env: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "fileproxy", "check"],
            env=clean_env(FILEPROXY_UPSTREAM=sample_upstream.url, **env),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line[5:].startswith("spool:")]
        assert len(lines) == 1, done.stdout
        return done.returncode, lines[0]

    code, line = spool_line(FILEPROXY_SPOOL_DIR="/nonexistent")
    assert code == 1, line
    assert line.startswith("FAIL spool: FILEPROXY_SPOOL_DIR=/nonexistent: cannot create a file"), (
        line
    )
    a_file = tmp_dir / "not-a-directory"
    a_file.write_bytes(b"")
    code, line = spool_line(FILEPROXY_SPOOL_DIR=str(a_file))
    assert code == 1 and line.startswith("FAIL spool:"), line

    code, line = spool_line(FILEPROXY_SPOOL_DIR=str(tmp_dir))
    assert code == 0 and line.startswith(f"PASS spool: FILEPROXY_SPOOL_DIR={tmp_dir}, "), line
    code, line = spool_line(FILEPROXY_SPOOL="off")
    assert code == 0 and line == "PASS spool: off (FILEPROXY_SPOOL=off)", line
