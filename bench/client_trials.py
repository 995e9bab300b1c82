"""Real clients through each contender, side by side: do they get the same answers?

    .venv/bin/python -m bench.client_trials [--trials aria2c,wget,...] [--contenders nginx,fp,old]
                                            [--old DIR | --old-commit 923ef08]
                                            [--slowloris 500] [--slowloris-seconds 70]
                                            [--upload-gib 2] [--out FILE.md]

Contenders, each in front of the same backends, one worker each, on ephemeral loopback
ports (no root needed):

- ``nginx``: nginx ``proxy_pass`` (``proxy_http_version 1.1``, upstream keepalive, the
  defaults otherwise: response and request buffering on, ``client_max_body_size 0`` so
  that the 2 GiB upload passes);
- ``fp``: fileproxy from this tree (``gunicorn -c gunicorn.conf.py``, ``FILEPROXY_WORKERS=1``,
  the cache off: nginx ``proxy_pass`` has none, ``FILEPROXY_MAX_BODY_SIZE=0`` for the upload);
- ``old``: fileproxy from another tree (``--old DIR``, or ``--old-commit C``: ``git archive C``
  into the run's directory; by default 923ef08, the last commit whose proxied path ran on
  aiohttp.web), run with this tree's virtualenv.

Backends: nginx static (a 256 MiB and a 16 MiB random file, ETag / Range / multipart),
httpbin under gunicorn (``--httpbin-venv``: a virtualenv with ``pip install httpbin
gunicorn``; one is made under /tmp if missing), ``bench/sse_backend.py``, and an upload
sink of this module (``--upload-sink PORT``) that counts and hashes what it receives.

Clients: aria2c, wget, curl, ab (apache2-utils), chromium, and raw sockets for the
pipelined burst, slowloris and SSE. Every trial records, per contender, a *signature*
(what must be the same: exit status, status codes, bytes, SHA-256 against the source, the
headers that matter) and notes (timings, memory, descriptors); the report's table says
whether each fileproxy's signature equals nginx's and the old tree's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import PeakMemory, free_port, group_pids

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_OLD_COMMIT = "923ef08"
# what 923ef08 imports that this tree's virtualenv no longer has (pip install --target)
OLD_EXTRA_PACKAGES = ("aiohttp-cors",)
OLD_DEPS = Path("/tmp/trials-old-deps")
BACKENDS = ("static", "httpbin", "sse", "upload")
CONTENDER_NAMES = {"nginx": "nginx proxy_pass", "fp": "fileproxy now", "old": "fileproxy old"}
PROGRAMS = {  # program: Debian package
    "nginx": "nginx",
    "curl": "curl",
    "wget": "wget",
    "aria2c": "aria2",
    "ab": "apache2-utils",
    "chromium": "chromium",
}
BIG = 256 << 20
MEDIUM = 16 << 20
PIPELINED = 50

PAGE = """<!doctype html>
<html><head><title>client trials</title></head>
<body><h1>through the proxy</h1><img id="img" src="/pipe/1.txt" alt="x">
<p id="out">pending</p>
<script>
fetch('/16m.bin').then(r => r.arrayBuffer().then(b => crypto.subtle.digest('SHA-256', b)
  .then(h => {
    const hex = Array.from(new Uint8Array(h)).map(x => x.toString(16).padStart(2, '0')).join('');
    document.getElementById('out').textContent = r.status + ' ' + b.byteLength + ' ' + hex;
  })))
  .catch(e => { document.getElementById('out').textContent = 'error ' + e; });
</script></body></html>
"""


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    prefixes = ("FILEPROXY_", "HTTP_", "REDIS_", "BASELINE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


class Procs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env or clean_env({}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: memory, descriptors, clean stop
        )
        self.running[name] = popen
        return popen

    def stop_all(self) -> None:
        for popen in self.running.values():
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGTERM)
        for popen in self.running.values():
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()


def wait_http(port: int, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise SystemExit(f"{name} exited at start:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as sock:
                sock.sendall(
                    b"GET /health-of-bench HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                if sock.recv(16).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{name} does not answer on 127.0.0.1:{port}")


def nginx_conf(root: Path, name: str, servers: str) -> Path:
    temp = root / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    conf = root / f"{name}.conf"
    conf.write_text(
        f"""daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
worker_rlimit_nofile 20000;
pid {root}/{name}.pid;
error_log {root}/{name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    default_type application/octet-stream;
    types {{ text/html html; text/plain txt; }}
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{servers}
}}
"""
    )
    return conf


@dataclass
class Contender:
    key: str
    ports: dict[str, int]  # backend -> the contender's port in front of it
    pgids: dict[str, int]  # backend -> process group of what listens there

    @property
    def name(self) -> str:
        return CONTENDER_NAMES[self.key]


@dataclass
class Bed:
    root: Path
    procs: Procs
    www: Path
    backend_ports: dict[str, int] = field(default_factory=dict)
    contenders: list[Contender] = field(default_factory=list)
    sha: dict[str, str] = field(default_factory=dict)
    etag: str = ""

    def source(self, name: str) -> Path:
        return self.www / name


def make_files(www: Path) -> dict[str, str]:
    (www / "pipe").mkdir(parents=True)
    sha = {}
    for name, size in (("256m.bin", BIG), ("16m.bin", MEDIUM), ("1k.bin", 1024)):
        digest = hashlib.sha256()
        with open(www / name, "wb") as out:
            left = size
            while left:
                piece = os.urandom(min(left, 4 << 20))
                out.write(piece)
                digest.update(piece)
                left -= len(piece)
        sha[name] = digest.hexdigest()
    for i in range(PIPELINED):
        (www / "pipe" / f"{i}.txt").write_bytes(b"answer %d " % i + b"." * i + b"\n")
    (www / "index.html").write_text(PAGE)
    for path in (www.parent, www, www / "pipe"):
        path.chmod(0o755)  # nginx's workers may not be root
    return sha


def start_backends(bed: Bed, httpbin_venv: Path) -> None:
    ports = {b: free_port() for b in BACKENDS}
    bed.backend_ports = ports
    conf = nginx_conf(
        bed.root, "static", f"    server {{ listen 127.0.0.1:{ports['static']}; root {bed.www}; }}"
    )
    started = {"static": bed.procs.spawn("static", ["nginx", "-c", str(conf)])}
    gunicorn = httpbin_venv / "bin" / "gunicorn"
    started["httpbin"] = bed.procs.spawn(
        "httpbin",
        [
            str(gunicorn),
            "-w",
            "4",
            "-b",
            f"127.0.0.1:{ports['httpbin']}",
            "httpbin:app",
            "--log-level",
            "warning",
        ],
        clean_env({}),
        cwd=bed.root,
    )
    started["sse"] = bed.procs.spawn(
        "sse",
        [
            PYTHON,
            "-m",
            "bench.sse_backend",
            "--bind",
            f"127.0.0.1:{ports['sse']}",
            "--workers",
            "1",
        ],
    )
    started["upload"] = bed.procs.spawn(
        "upload", [PYTHON, "-m", "bench.client_trials", "--upload-sink", str(ports["upload"])]
    )
    for name, popen in started.items():
        wait_http(ports[name], name, popen, bed.root / f"{name}.log")


def start_contender(bed: Bed, key: str, old_tree: Path | None) -> Contender:
    ports = {b: free_port() for b in BACKENDS}
    if key == "nginx":
        servers = []
        for backend, port in ports.items():
            servers.append(
                f"""    upstream {backend} {{ server 127.0.0.1:{bed.backend_ports[backend]};
                           keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
            )
        conf = nginx_conf(bed.root, "nginx", "\n".join(servers))
        popen = bed.procs.spawn("nginx", ["nginx", "-c", str(conf)])
        for port in ports.values():
            wait_http(port, "nginx", popen, bed.root / "nginx.log")
        return Contender(key, ports, {b: popen.pid for b in BACKENDS})
    pgids = {}
    for backend, port in ports.items():
        env = {
            "FILEPROXY_BIND": f"127.0.0.1:{port}",
            "FILEPROXY_UPSTREAM": f"http://127.0.0.1:{bed.backend_ports[backend]}",
            "FILEPROXY_WORKERS": "1",
            "FILEPROXY_MAX_BODY_SIZE": "0",  # nginx: client_max_body_size 0
            "FILEPROXY_LOG_DIR": str(bed.root / f"{key}-{backend}-logs"),
            "FILEPROXY_DRAIN_DELAY": "0",
            "FILEPROXY_GRACEFUL_TIMEOUT": "3",
        }
        cwd = REPO
        if key == "fp":
            env["FILEPROXY_CACHE"] = "off"  # the relay, as nginx proxy_pass
        else:
            assert old_tree is not None
            env["PYTHONPATH"] = f"{old_tree}:{OLD_DEPS}"
            cwd = old_tree
        name = f"{key}-{backend}"
        popen = bed.procs.spawn(
            name, [PYTHON, "-m", "gunicorn", "-c", "gunicorn.conf.py"], clean_env(env), cwd
        )
        wait_http(port, name, popen, bed.root / f"{name}.log")
        pgids[backend] = popen.pid
    return Contender(key, ports, pgids)


# --------------------------------------------------------------------------------------------
# the upload sink: counts and hashes what it receives
# --------------------------------------------------------------------------------------------


def upload_sink(port: int) -> None:
    from aiohttp import web

    async def sink(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        count = 0
        raw_headers = request.raw_headers
        while chunk := await request.content.readany():
            digest.update(chunk)
            count += len(chunk)
        return web.json_response(
            {
                "raw_path": request.raw_path,
                "version": f"{request.version.major}.{request.version.minor}",
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in raw_headers],
                "bytes": count,
                "sha256": digest.hexdigest(),
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
                "expect": request.headers.get("Expect"),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", sink)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --------------------------------------------------------------------------------------------
# client helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float


def run(argv: list[str], timeout: float = 120, stdin: bytes | None = None) -> Run:
    start = time.monotonic()
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
        return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - start)
    except subprocess.TimeoutExpired as exc:
        return Run(-999, exc.stdout or b"", exc.stderr or b"", time.monotonic() - start)


@dataclass
class CurlResult:
    rc: int
    statuses: list[int]
    headers: list[tuple[str, bytes]]  # of the last response
    body: bytes
    info: dict[str, str]
    stderr: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value.decode("latin-1")
        return None

    def all(self, name: str) -> list[bytes]:
        return [value for key, value in self.headers if key == name.lower()]


WRITE_OUT = "%{time_starttransfer} %{time_total} %{num_redirects} %{size_download} %{url_effective}"


def curl(url: str, *args: str, timeout: float = 120, stdin: bytes | None = None) -> CurlResult:
    with tempfile.TemporaryDirectory(prefix="trials-curl-") as tmp:
        head, body = Path(tmp, "head"), Path(tmp, "body")
        done = run(
            ["curl", "-sS", "-D", str(head), "-o", str(body), "-w", WRITE_OUT, *args, url],
            timeout,
            stdin,
        )
        raw = head.read_bytes() if head.exists() else b""
        content = body.read_bytes() if body.exists() else b""
    statuses: list[int] = []
    headers: list[tuple[str, bytes]] = []
    for block in re.split(rb"\r?\n\r?\n", raw):
        lines = block.split(b"\r\n") if b"\r\n" in block else block.split(b"\n")
        if not lines or not lines[0].startswith(b"HTTP/"):
            continue
        statuses.append(int(lines[0].split()[1]))
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower().decode("latin-1"), value.strip()))
    fields = done.stdout.decode("latin-1").split(" ", 4)
    keys = ("ttfb", "total", "redirects", "size", "url")
    info = dict(zip(keys, fields, strict=False))
    return CurlResult(done.rc, statuses, headers, content, info, done.stderr[-500:])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(4 << 20):
            digest.update(piece)
    return digest.hexdigest()


def group_fds(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def group_sockets(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        total += 1
    return total


# --------------------------------------------------------------------------------------------
# trials: each returns (signature: what must be the same, notes: what is measured)
# --------------------------------------------------------------------------------------------

Result = tuple[dict[str, Any], dict[str, Any]]


def trial_aria2c(bed: Bed, c: Contender) -> Result:
    out = bed.root / f"aria2c-{c.key}"
    out.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{c.ports['static']}/256m.bin"
    done = run(
        [
            "aria2c",
            "-x16",
            "-s16",
            "-k1M",
            "-d",
            str(out),
            "-o",
            "256m.bin",
            "--allow-overwrite=true",
            "--file-allocation=none",
            "--console-log-level=warn",
            "--summary-interval=0",
            "--download-result=hide",
            url,
        ],
        timeout=300,
    )
    path = out / "256m.bin"
    got = file_sha(path) if path.exists() else ""
    size = path.stat().st_size if path.exists() else 0
    shutil.rmtree(out)
    sig = {"exit": done.rc, "bytes": size, "sha256 same": got == bed.sha["256m.bin"]}
    mibs = size / (1 << 20) / done.seconds if done.seconds else 0
    return sig, {"seconds": round(done.seconds, 2), "MiB/s": round(mibs), "err": done.stderr[-200:]}


def trial_wget_c(bed: Bed, c: Contender) -> Result:
    out = bed.root / f"wget-{c.key}"
    out.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{c.ports['static']}/256m.bin"
    first = subprocess.Popen(
        ["wget", "-q", "--limit-rate=40m", "-P", str(out), url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    first.kill()  # SIGKILL: a partial file, as after a crash or a pulled cable
    first.wait()
    path = out / "256m.bin"
    partial = path.stat().st_size if path.exists() else 0
    done = run(["wget", "-c", "-S", "-P", str(out), url], timeout=300)
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3})", done.stderr)]
    got = file_sha(path) if path.exists() else ""
    size = path.stat().st_size if path.exists() else 0
    content_range = re.findall(rb"Content-Range: ([^\r\n]*)", done.stderr)
    again = run(["wget", "-c", "-S", "-P", str(out), url], timeout=60)
    again_statuses = [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3})", again.stderr)]
    shutil.rmtree(out)
    sig = {
        "exit": done.rc,
        "partial before": "some" if 0 < partial < BIG else partial,
        "resume statuses": statuses,
        "resume Content-Range": bool(content_range)
        and content_range[0].decode() == f"bytes {partial}-{BIG - 1}/{BIG}",
        "bytes": size,
        "sha256 same": got == bed.sha["256m.bin"],
        "wget -c once complete": (again.rc, again_statuses),
    }
    return sig, {"partial bytes": partial, "resume seconds": round(done.seconds, 2)}


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    match = re.search(r"boundary=\"?([^\";]+)", content_type or "")
    if not match:
        return []
    parts = []
    for chunk in body.split(b"--" + match.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.partition(b"\r\n\r\n")
        cr = re.search(rb"Content-Range: ([^\r\n]*)", head, re.I)
        parts.append((cr.group(1).decode() if cr else "", data[:-2]))  # the CRLF before --
    return parts


def trial_curl_ranges(bed: Bed, c: Contender) -> Result:
    base = f"http://127.0.0.1:{c.ports['static']}/16m.bin"
    src = bed.source("16m.bin").read_bytes()
    single = curl(base, "-r", "0-9")
    multi = curl(base, "-r", "0-9,100-199")
    parts = _multipart_parts(multi.header("content-type") or "", multi.body)
    head = curl(base, "-I")
    etag = head.header("etag") or ""
    if_range = curl(base, "-r", "10-19", "-H", f"If-Range: {etag}")
    if_range_stale = curl(base, "-r", "10-19", "-H", 'If-Range: "stale"')
    not_modified = curl(base, "-H", f"If-None-Match: {etag}")
    suffix = curl(base, "-r", "-5")
    unsatisfiable = curl(base, "-r", f"{MEDIUM + 10}-")
    sig = {
        "single": (
            single.rc,
            single.statuses,
            single.header("content-range"),
            single.body == src[0:10],
        ),
        "multi": (
            multi.rc,
            multi.statuses,
            (multi.header("content-type") or "").split(";")[0],
            [
                (
                    cr,
                    data
                    == src[
                        int(cr.split()[1].split("-")[0]) : int(
                            cr.split()[1].split("-")[1].split("/")[0]
                        )
                        + 1
                    ],
                )
                for cr, data in parts
            ],
        ),
        "HEAD": (
            head.rc,
            head.statuses,
            head.header("content-length"),
            head.header("accept-ranges"),
            etag == bed.etag,
            head.header("last-modified"),
        ),
        "If-Range match": (
            if_range.statuses,
            if_range.header("content-range"),
            if_range.body == src[10:20],
        ),
        "If-Range stale": (if_range_stale.statuses, len(if_range_stale.body) == MEDIUM),
        "If-None-Match": (not_modified.statuses, not_modified.body),
        "suffix -5": (suffix.statuses, suffix.header("content-range"), suffix.body == src[-5:]),
        "416": (unsatisfiable.statuses, unsatisfiable.header("content-range")),
    }
    return sig, {"multipart parts": len(parts)}


def _httpbin_json(result: CurlResult) -> dict[str, Any]:
    try:
        value = json.loads(result.body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def trial_httpbin(bed: Bed, c: Contender) -> Result:
    port = c.ports["httpbin"]
    base = f"http://127.0.0.1:{port}"
    sig: dict[str, Any] = {}
    notes: dict[str, Any] = {}

    got = curl(f"{base}/get?a=1&b=%C3%A9")
    body = _httpbin_json(got)
    sig["/get"] = (got.rc, got.statuses, body.get("args"))
    seen = body.get("headers", {})
    notes["/get backend saw"] = {k: seen.get(k) for k in ("Host", "X-Forwarded-For", "Connection")}

    payload = (b"0123456789abcdef" * 6400)[:100_000]
    post = curl(
        f"{base}/post", "--data-binary", "@-", "-H", "Content-Type: text/plain", stdin=payload
    )
    body = _httpbin_json(post)
    sig["/post 100 kB"] = (
        post.rc,
        post.statuses,
        body.get("data") == payload.decode(),
        body.get("headers", {}).get("Content-Length"),
    )

    teapot = curl(f"{base}/status/418")
    sig["/status/418"] = (teapot.rc, teapot.statuses, sha(teapot.body)[:12])

    redirect = curl(f"{base}/redirect/3")
    followed = curl(f"{base}/redirect/3", "-L")
    absolute = curl(f"{base}/absolute-redirect/3")
    absolute_l = curl(f"{base}/absolute-redirect/3", "-L")

    def where(location: str | None) -> str | None:
        if location is None:
            return None
        return location.replace(f"127.0.0.1:{port}", "PROXY").replace(
            f"127.0.0.1:{bed.backend_ports['httpbin']}", "BACKEND"
        )

    sig["/redirect/3"] = (
        redirect.statuses,
        where(redirect.header("location")),
        followed.statuses,
        followed.info.get("redirects"),
        where(followed.info.get("url")),
    )
    sig["/absolute-redirect/3"] = (
        absolute.statuses,
        where(absolute.header("location")),
        absolute_l.statuses,
        where(absolute_l.info.get("url")),
    )

    gz = curl(f"{base}/gzip", "--compressed")
    raw_gz = curl(f"{base}/gzip", "-H", "Accept-Encoding: gzip")
    sig["/gzip"] = (
        gz.rc,
        gz.statuses,
        raw_gz.header("content-encoding"),
        _httpbin_json(gz).get("gzipped"),
        raw_gz.body[:2] == b"\x1f\x8b",
    )

    stream = curl(f"{base}/stream/20", "-N")
    lines = stream.body.splitlines()
    ids = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError):
            ids.append(json.loads(line)["id"])
    sig["/stream/20"] = (
        stream.rc,
        stream.statuses,
        len(lines),
        ids == list(range(20)),
        stream.header("transfer-encoding"),
    )

    drip = asyncio.run(timed_get(port, "/drip?duration=2&numbytes=5&code=200&delay=0"))
    sig["/drip 5 B over 2 s"] = (
        drip["status"],
        drip["body_bytes"],
        "spread" if drip["body_spread_s"] > 1.0 else "bunched",
    )
    notes["/drip body arrival s"] = drip["arrivals"]

    odd = asyncio.run(
        raw_exchange(
            port,
            b"GET /response-headers?X-Odd=caf%C3%A9&X-Tab=a%09b HTTP/1.1\r\n"
            b"Host: h\r\nConnection: close\r\n\r\n",
        )
    )
    odd_head = odd.split(b"\r\n\r\n", 1)[0]
    sig["/response-headers odd bytes"] = (
        odd_head.split(b" ", 2)[1:2],
        re.findall(rb"(?im)^x-odd:[^\r\n]*", odd_head),
        re.findall(rb"(?im)^x-tab:[^\r\n]*", odd_head),
    )

    cookies = curl(f"{base}/cookies/set?a=1&b=2")
    jar = bed.root / f"jar-{c.key}"
    cookies_l = curl(f"{base}/cookies/set?a=1&b=2", "-L", "-c", str(jar), "-b", str(jar))
    sig["/cookies/set"] = (
        cookies.statuses,
        sorted(v.split(b";")[0] for v in cookies.all("set-cookie")),
        cookies_l.statuses,
        _httpbin_json(cookies_l).get("cookies"),
    )

    chunk_body = os.urandom(48_000).hex().encode()  # 96 kB of text
    chunked = curl(
        f"{base}/post",
        "-T",
        "-",
        "-X",
        "POST",
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Content-Type: text/plain",
        stdin=chunk_body,
    )
    body = _httpbin_json(chunked)
    sig["chunked upload /post"] = (
        chunked.rc,
        chunked.statuses,
        body.get("data") == chunk_body.decode(),
    )
    seen = body.get("headers", {})
    notes["chunked: backend saw"] = {
        "Content-Length": seen.get("Content-Length"),
        "Transfer-Encoding": seen.get("Transfer-Encoding"),
        "data bytes": len(body.get("data") or ""),
    }

    for code in (204, 304):
        got = curl(f"{base}/status/{code}")
        sig[f"/status/{code}"] = (
            got.rc,
            got.statuses,
            got.body,
            got.header("content-length"),
            got.header("transfer-encoding"),
        )
    got = curl(f"{base}/get", "-I")
    sig["HEAD /get"] = (got.rc, got.statuses, got.header("content-type"))
    # its length is that of the JSON of the request headers httpbin saw (the proxies differ)
    notes["HEAD /get Content-Length"] = got.header("content-length")
    for method in ("PUT", "PATCH", "DELETE"):
        got = curl(f"{base}/anything/x", "-X", method, "--data-binary", "abc")
        sig[f"{method} /anything"] = (
            got.rc,
            got.statuses,
            _httpbin_json(got).get("method"),
            _httpbin_json(got).get("data"),
        )
    got = curl(f"{base}/anything", "-X", "OPTIONS", "-H", "Origin: http://o.example")
    sig["OPTIONS /anything"] = (got.rc, got.statuses, got.header("allow"))
    got = curl(f"{base}/delay/1")
    sig["/delay/1"] = (got.rc, got.statuses)
    got = curl(f"{base}/bytes/65536?seed=7")
    sig["/bytes/65536?seed=7"] = (got.rc, got.statuses, len(got.body), sha(got.body)[:12])
    got = curl(f"{base}/range/1024", "-r", "10-19")
    sig["/range/1024 -r 10-19"] = (got.statuses, got.header("content-range"), got.body)
    upstream = f"http://127.0.0.1:{bed.backend_ports['httpbin']}/get?x=1"
    got = curl(f"{base}/redirect-to?url={upstream}&status_code=307")
    sig["/redirect-to the backend 307"] = (got.statuses, where(got.header("location")))
    got = curl(f"{base}/redirect-to?url=http://elsewhere.example/&status_code=302")
    sig["/redirect-to elsewhere"] = (got.statuses, where(got.header("location")))
    got = curl(f"{base}/etag/abc", "-H", 'If-None-Match: "abc"')
    sig["/etag/abc If-None-Match"] = (got.statuses, got.body, got.header("etag"))
    got = curl(f"{base}/basic-auth/u/p")
    good = curl(f"{base}/basic-auth/u/p", "-u", "u:p")
    sig["/basic-auth"] = (got.statuses, got.header("www-authenticate"), good.statuses)
    for encoding in ("deflate", "brotli"):
        got = curl(f"{base}/{encoding}", "--compressed")
        sig[f"/{encoding}"] = (
            got.rc,
            got.statuses,
            _httpbin_json(got).get("deflated" if encoding == "deflate" else "brotli"),
        )
    got = curl(f"{base}/stream/20", "--http1.0")
    sig["/stream/20 --http1.0"] = (
        got.rc,
        got.statuses,
        len(got.body.splitlines()),
        got.header("transfer-encoding"),
        got.header("connection"),
    )

    big = b"e" * (2 << 20)
    refused = curl(
        f"{base}/status/418",
        "-X",
        "POST",
        "--data-binary",
        "@-",
        "-H",
        "Expect: 100-continue",
        stdin=big,
    )
    # httpbin (gunicorn's sync worker) answers 418 and closes with the body unread: the
    # proxy relays the 418 or, when the backend's reset reaches its write before its read
    # of the answer, says 502 (a race for every contender: see the "early" trial)
    sig["Expect: 100-continue 2 MiB to /status/418: 100, then 418 or 502"] = refused.rc == 0 and (
        refused.statuses in ([100, 418], [100, 502])
    )
    notes["Expect to 418: statuses, total s"] = (refused.statuses, refused.info.get("total"))
    expect = curl(
        f"{base}/post",
        "--data-binary",
        "@-",
        "-H",
        "Expect: 100-continue",
        "-H",
        "Content-Type: text/plain",
        "-v",
        stdin=big,
    )
    body = _httpbin_json(expect)
    sig["Expect: 100-continue 2 MiB"] = (
        expect.rc,
        expect.statuses,
        len(body.get("data") or "") == len(big),
    )
    notes["Expect total s"] = expect.info.get("total")
    return sig, notes


async def raw_exchange(port: int, request: bytes, timeout: float = 15) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


async def timed_get(port: int, path: str, timeout: float = 30) -> dict[str, Any]:
    """One GET with Connection: close; when each piece of the body arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    data = bytearray()
    head_end = -1
    arrivals: list[float] = []
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
        while True:
            piece = await asyncio.wait_for(reader.read(65536), timeout)
            if not piece:
                break
            data += piece
            if head_end < 0:
                head_end = data.find(b"\r\n\r\n")
                if head_end >= 0 and len(data) > head_end + 4:
                    arrivals.append(time.monotonic() - start)
            else:
                arrivals.append(time.monotonic() - start)
    finally:
        writer.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if re.search(rb"(?i)transfer-encoding: *chunked", head):
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return {
        "status": status,
        "body_bytes": len(body),
        "arrivals": [round(a, 2) for a in arrivals],
        "body_spread_s": (arrivals[-1] - arrivals[0]) if arrivals else 0.0,
    }


def trial_ab(bed: Bed, c: Contender, keep_alive: bool = True) -> Result:
    url = f"http://127.0.0.1:{c.ports['static']}/1k.bin"
    argv = ["ab", "-k", "-n", "20000"] if keep_alive else ["ab", "-n", "5000"]
    done = run([*argv, "-c", "50", "-r", url], timeout=300)
    text = done.stdout.decode("latin-1")

    def figure(label: str) -> str | None:
        match = re.search(rf"{label}:\s+([\d.]+)", text)
        return match.group(1) if match else None

    sig = {
        "exit": done.rc,
        "complete": figure("Complete requests"),
        "failed": figure("Failed requests"),
        "non-2xx": figure("Non-2xx responses") or "0",
        "keep-alive": figure("Keep-Alive requests") or "0",
    }
    notes: dict[str, Any] = {
        "req/s": figure("Requests per second"),
        "ms/req (mean)": figure("Time per request"),
    }
    if done.rc:
        notes["err"] = done.stderr[-300:]
    return sig, notes


def trial_pipelined(bed: Bed, c: Contender) -> Result:
    sig, notes = asyncio.run(_pipelined(bed, c.ports["static"]))
    posts, post_notes = asyncio.run(_pipelined_posts(c.ports["upload"]))
    sig.update(posts)
    sig.update(asyncio.run(_pipelined_httpbin(c.ports["httpbin"]))[0])
    notes.update(post_notes)
    return sig, notes


async def _pipelined_httpbin(port: int) -> Result:
    """A slow answer, chunked answers and a HEAD of a chunked one, pipelined: in order."""
    paths = [
        ("GET", "/drip?duration=1&numbytes=3&delay=0"),
        ("GET", "/stream/3"),
        ("HEAD", "/stream/2"),
        ("GET", "/get?i=3"),
        ("GET", "/stream/2"),
        ("GET", "/status/204"),
        ("GET", "/get?i=6"),
    ]
    close = "Connection: close\r\n"
    burst = b"".join(
        f"{m} {p} HTTP/1.1\r\nHost: h\r\n{close if i == len(paths) - 1 else ''}\r\n".encode()
        for i, (m, p) in enumerate(paths)
    )
    data = await raw_exchange(port, burst, timeout=30)
    rest, seen = data, []
    for method, _ in paths:
        if not rest.startswith(b"HTTP/1."):
            break
        head, _, rest = rest.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = b""
        if method == "HEAD" or status in (204, 304):
            pass
        elif length:
            body, rest = rest[: int(length.group(1))], rest[int(length.group(1)) :]
        elif re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                if size == 0:
                    rest = rest[2:]  # the empty trailer section
                    break
                body, rest = body + rest[:size], rest[size + 2 :]
        if body.startswith(b"{"):  # a JSON document per line (/stream) or one (/get)
            try:
                seen.append((status, "one JSON document", json.loads(body).get("args")))
            except ValueError:
                seen.append((status, "JSON lines", body.count(b"\n")))
        else:
            seen.append((status, "bytes", len(body)))
    sig = {"httpbin burst (drip, stream, HEAD, 204) answers": seen, "left over": len(rest)}
    return sig, {}


async def _pipelined_posts(port: int, n: int = 20, size: int = 100_000) -> Result:
    """POSTs with bodies and GETs, written at once to the sink: each answer tells what the
    sink received, in order."""
    bodies = [os.urandom(size) if i % 2 == 0 else b"" for i in range(n)]
    burst = b"".join(
        (b"POST /p%d HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (i, size, body))
        if body
        else b"GET /g%d HTTP/1.1\r\nHost: h\r\n%s\r\n"
        % (i, b"Connection: close\r\n" if i == n - 1 else b"")
        for i, body in enumerate(bodies)
    )
    start = time.monotonic()
    data = await raw_exchange(port, burst, timeout=30)
    seconds = time.monotonic() - start
    seen = []
    rest = data
    while rest.startswith(b"HTTP/1."):
        head, _, rest = rest.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        size_ = int(length.group(1)) if length else 0
        with contextlib.suppress(ValueError):
            answer = json.loads(rest[:size_])
            seen.append((answer.get("raw_path"), answer.get("bytes"), answer.get("sha256")))
        rest = rest[size_:]
    expected = [
        (f"/p{i}" if body else f"/g{i}", len(body), sha(body)) for i, body in enumerate(bodies)
    ]
    sig = {
        "POST+GET burst: answers": len(seen),
        "POST+GET burst: in order, bodies whole": seen == expected,
    }
    return sig, {"POST+GET burst seconds": round(seconds, 3)}


def trial_early_answer(bed: Bed, c: Contender, tries: int = 10) -> Result:
    """A backend that answers before reading the request body (httpbin /status/401 under
    gunicorn's sync worker, to a 64 MiB POST without Expect: it answers and closes with the
    body unread), ``tries`` times; a reader at 4 MiB/s."""
    base = f"http://127.0.0.1:{c.ports['httpbin']}"
    body = b"z" * (64 << 20)
    early = []
    for _ in range(tries):
        got = curl(
            f"{base}/status/401",
            "-X",
            "POST",
            "--data-binary",
            "@-",
            "-H",
            "Expect:",
            "-H",
            "Content-Type: application/octet-stream",
            stdin=body,
            timeout=60,
        )
        early.append((got.rc, tuple(got.statuses)))
    slow = curl(f"http://127.0.0.1:{c.ports['static']}/16m.bin", "--limit-rate", "4M", timeout=60)
    sig = {
        # which of the two each try gets is a race (the backend's reset against the
        # proxy's read of the answer) for every contender: the counts are in the notes
        f"POST 64 MiB to /status/401 without Expect, {tries} tries: curl exit 0, 401 or 502": all(
            rc == 0 and statuses in ((401,), (502,)) for rc, statuses in early
        ),
        "curl --limit-rate 4M of 16 MiB": (
            slow.rc,
            slow.statuses,
            sha(slow.body) == bed.sha["16m.bin"],
        ),
    }
    notes = {
        "401 tries (curl exit, statuses): count": {
            str(k): early.count(k) for k in sorted(set(early))
        },
        "4M/s s": slow.info.get("total"),
    }
    return sig, notes


async def _pipelined(bed: Bed, port: int) -> Result:
    def method(i: int) -> bytes:
        return b"HEAD" if i % 10 == 5 else b"GET"

    def extra(i: int) -> bytes:
        if i == PIPELINED - 1:
            return b"Connection: close\r\n"
        return b"Range: bytes=2-5\r\n" if i % 10 == 7 else b""

    burst = b"".join(
        b"%s /pipe/%d.txt HTTP/1.1\r\nHost: h\r\n%s\r\n" % (method(i), i, extra(i))
        for i in range(PIPELINED)
    )
    start = time.monotonic()
    data = await raw_exchange(port, burst, timeout=30)
    seconds = time.monotonic() - start
    statuses, bodies, rest = [], [], data
    while rest.startswith(b"HTTP/1."):
        head, _, rest = rest.partition(b"\r\n\r\n")
        statuses.append(int(head.split(b" ", 2)[1]))
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        size = int(length.group(1)) if length and method(len(statuses) - 1) == b"GET" else 0
        bodies.append(rest[:size])
        rest = rest[size:]
    expected = []
    for i in range(PIPELINED):
        whole = (bed.www / "pipe" / f"{i}.txt").read_bytes()
        expected.append(b"" if method(i) == b"HEAD" else whole[2:6] if i % 10 == 7 else whole)
    sig = {
        "answers": len(statuses),
        "statuses": sorted(set(statuses)),
        "206 where a Range was": [i for i, st in enumerate(statuses) if st == 206],
        "in order and whole": bodies == expected,
        "bytes left over": len(rest),
    }
    return sig, {"seconds": round(seconds, 3)}


async def raw_sequence(port: int, requests: list[bytes], timeout: float = 10) -> list[bytes]:
    """Each request in turn on one connection; the raw answer to each (b"" once closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                partial = getattr(exc, "partial", b"")
                answers.append(partial)
                break
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length and not request.startswith(b"HEAD"):
                body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), timeout)
            elif length or head.split(b" ", 2)[1] in (b"204", b"304"):
                body = b""
            else:
                body = await asyncio.wait_for(reader.read(-1), timeout)
            answers.append(head + body)
    finally:
        writer.close()
    return answers


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def _field(answer: bytes, name: bytes) -> str | None:
    head = answer.split(b"\r\n\r\n", 1)[0]
    found = re.search(rb"(?im)^" + re.escape(name) + rb": *([^\r\n]*)", head)
    return found.group(1).decode("latin-1") if found else None


def trial_raw(bed: Bed, c: Contender) -> Result:
    static, sink = c.ports["static"], c.ports["upload"]
    sig: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    ten = b"GET /1k.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    answers = asyncio.run(raw_sequence(static, [ten, ten, b"GET /1k.bin HTTP/1.0\r\n\r\n", ten]))
    sig["HTTP/1.0 keep-alive x2, then without"] = [
        (
            a.split(b" ", 1)[0].decode(),
            _status(a),
            _field(a, b"Connection"),
            len(a.split(b"\r\n\r\n", 1)[-1]),
        )
        for a in answers
    ]
    odd = b"/a%2Fb/./c/../d//e?x=%20&y=%ZZ&z=caf%C3%A9&w=a+b"
    answers = asyncio.run(
        raw_sequence(sink, [b"GET " + odd + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"])
    )
    try:
        seen = json.loads(answers[0].split(b"\r\n\r\n", 1)[1]) if answers else {}
    except ValueError:
        seen = {"raw_path": f"not JSON: {answers[0][:80]!r}"}
    sig["raw target reaches the backend"] = (
        _status(answers[0]) if answers else 0,
        seen.get("raw_path"),
    )
    notes["sink saw"] = {
        k: v
        for k, v in seen.get("headers", [])
        if k.lower()
        in (
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "via",
            "connection",
            "x-real-ip",
            "forwarded",
        )
    }
    for size in (4000, 8000, 9000, 20000):
        request = b"GET /1k.bin HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * size + b"\r\n\r\n"
        answers = asyncio.run(raw_sequence(static, [request]))
        sig[f"{size} B header field"] = _status(answers[0]) if answers else "closed"
    long_url = b"GET /1k.bin?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    answers = asyncio.run(raw_sequence(static, [long_url]))
    sig["9000 B request target"] = _status(answers[0]) if answers else "closed"
    bad = (
        b"GET /1k.bin HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    answers = asyncio.run(raw_sequence(static, [bad]))
    sig["CL and TE both"] = _status(answers[0]) if answers else "closed"
    cases = {
        "no Host (HTTP/1.1)": b"GET /1k.bin HTTP/1.1\r\n\r\n",
        "two Hosts": b"GET /1k.bin HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "absolute-form target naming the proxy": b"GET http://127.0.0.1:%d/1k.bin HTTP/1.1\r\n"
        b"Host: h\r\n\r\n" % static,
        "absolute-form target naming another host": b"GET http://elsewhere.example/1k.bin "
        b"HTTP/1.1\r\nHost: h\r\n\r\n",
        "obs-fold": b"GET /1k.bin HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
        "space before colon": b"GET /1k.bin HTTP/1.1\r\nHost: h\r\nX-A : a\r\n\r\n",
        "NUL in a value": b"GET /1k.bin HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
        "LF only": b"GET /1k.bin HTTP/1.1\nHost: h\n\n",
        "HTTP/2.0 in a request line": b"GET /1k.bin HTTP/2.0\r\nHost: h\r\n\r\n",
        "HTTP/0.9": b"GET /1k.bin\r\n\r\n",
        "TE gzip, chunked": b"POST /1k.bin HTTP/1.1\r\nHost: h\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "bad chunk size": b"POST /1k.bin HTTP/1.1\r\nHost: h\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        "negative Content-Length": b"POST /1k.bin HTTP/1.1\r\nHost: h\r\n"
        b"Content-Length: -1\r\n\r\n",
        "two Content-Lengths differing": b"POST /1k.bin HTTP/1.1\r\nHost: h\r\n"
        b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "lowercase method": b"get /1k.bin HTTP/1.1\r\nHost: h\r\n\r\n",
        "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
        "unknown method": b"FOO /1k.bin HTTP/1.1\r\nHost: h\r\n\r\n",
    }
    for label, request in cases.items():
        answers = asyncio.run(raw_sequence(static, [request]))
        sig[label] = _status(answers[0]) if answers and answers[0] else "closed"
    # Connection: close, and another request written right behind it (RFC 9112 9.6: the
    # first is answered, nothing after it is processed)
    both = b"GET /1k.bin HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    both += b"GET /1k.bin HTTP/1.1\r\nHost: h\r\n\r\n"
    answer = asyncio.run(raw_exchange(static, both))
    sig["Connection: close, then a request behind it"] = [
        int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3})", answer)
    ]
    # a client that half-closes (shutdown(SHUT_WR), as `nc -N` does) after a whole request
    httpbin = c.ports["httpbin"]
    for label, port, request in (
        (
            "half-close after GET (1.1), fast answer",
            static,
            b"GET /1k.bin HTTP/1.1\r\nHost: h\r\n\r\n",
        ),
        ("half-close after GET (1.0), fast answer", static, b"GET /1k.bin HTTP/1.0\r\n\r\n"),
        (
            "half-close after GET (1.1), answer in 1 s",
            httpbin,
            b"GET /delay/1 HTTP/1.1\r\nHost: h\r\n\r\n",
        ),
    ):
        answer = asyncio.run(half_closed(port, request))
        outcome = _status(answer) if answer else "closed, no answer"
        if "fast" in label:
            # a race for nginx and the old fileproxy (which the FIN or the answer comes
            # first): a note, not a signature
            notes[label] = outcome
        else:
            sig[label] = outcome
    return sig, notes


async def half_closed(port: int, request: bytes, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), timeout)
    except (ConnectionError, TimeoutError):
        return b""
    finally:
        writer.close()


def trial_chromium(bed: Bed, c: Contender) -> Result:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    url = f"http://127.0.0.1:{c.ports['static']}/index.html"
    with tempfile.TemporaryDirectory(prefix="trials-chromium-") as profile:
        argv = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ]
        start = time.monotonic()
        popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            out, _err = popen.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, _err = popen.communicate()
        seconds = time.monotonic() - start
    dom = out.decode("utf-8", "replace")
    found = re.search(r'<p id="out">([^<]*)</p>', dom)
    text = found.group(1) if found else ""
    fields = text.split()
    sig = {
        "exit": popen.returncode,
        "title": "<title>client trials</title>" in dom,
        "fetch status": fields[0] if fields else text,
        "fetch bytes": fields[1] if len(fields) > 1 else None,
        "fetch sha256 same": len(fields) > 2 and fields[2] == bed.sha["16m.bin"],
    }
    return sig, {"seconds": round(seconds, 1)}


def trial_slowloris(bed: Bed, c: Contender, n: int, seconds: float) -> Result:
    return asyncio.run(_slowloris(bed, c, n, seconds))


async def _slowloris(bed: Bed, c: Contender, n: int, seconds: float) -> Result:
    port, pgid = c.ports["static"], c.pgids["static"]
    sockets_before = group_sockets(pgid)
    fds_before = group_fds(pgid)
    loop = asyncio.get_running_loop()
    start = loop.time()
    outcome: list[tuple[str, float, bytes]] = []  # (how it ended, when, first bytes received)

    async def slow(i: int) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            outcome.append(("connect failed " + type(exc).__name__, loop.time() - start, b""))
            return
        head = b"GET /1k.bin HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 4000
        got = b""
        try:
            await asyncio.sleep(i * 0.002)
            writer.write(head[:16])
            sent = 16
            read = asyncio.ensure_future(reader.read(65536))
            while loop.time() - start < seconds:
                done, _ = await asyncio.wait({read}, timeout=2.0)
                if done:
                    got = read.result()
                    outcome.append(("closed by server", loop.time() - start, got[:40]))
                    return
                writer.write(head[sent : sent + 1])  # a byte every 2 s
                sent += 1
            read.cancel()
            outcome.append(("open at the end", loop.time() - start, b""))
        except OSError as exc:
            outcome.append(("reset " + type(exc).__name__, loop.time() - start, got[:40]))
        finally:
            writer.close()

    async def normal() -> list[float]:
        latencies = []
        await asyncio.sleep(1.0)
        while loop.time() - start < seconds - 1:
            t0 = loop.time()
            try:
                result = await timed_get(port, "/16m.bin", timeout=20)
                ok = result["status"] == 200 and result["body_bytes"] == MEDIUM
            except (OSError, TimeoutError):
                ok = False
            latencies.append(loop.time() - t0 if ok else float("inf"))
            await asyncio.sleep(0.5)
        return latencies

    async def watch() -> list[int]:
        samples = []
        while loop.time() - start < seconds:
            samples.append(group_sockets(pgid))
            await asyncio.sleep(1.0)
        return samples

    slow_tasks = [asyncio.ensure_future(slow(i)) for i in range(n)]
    latencies, socket_samples = await asyncio.gather(normal(), watch())
    await asyncio.gather(*slow_tasks)
    await asyncio.sleep(1.0)
    sockets_after = group_sockets(pgid)
    fds_after = group_fds(pgid)
    kinds: dict[str, int] = {}
    for kind, _, _ in outcome:
        kinds[kind] = kinds.get(kind, 0) + 1
    closed_at = [when for kind, when, _ in outcome if kind != "open at the end"]
    first_bytes = sorted({got[:12].decode("latin-1") for _, _, got in outcome if got})
    finite = [x for x in latencies if x != float("inf")]
    sig = {
        "normal downloads all served": bool(latencies) and len(finite) == len(latencies),
        "descriptors back to the start": fds_after <= fds_before + 2,
    }
    notes = {
        "slow ones": kinds,
        "closed at s (median)": round(statistics.median(closed_at), 1) if closed_at else None,
        "answer to the slow ones": first_bytes,
        "16 MiB downloads": len(latencies),
        "download s p50/max": (round(statistics.median(finite), 3), round(max(finite), 3))
        if finite
        else None,
        "sockets before/peak/after": (sockets_before, max(socket_samples or [0]), sockets_after),
        "fds before/after": (fds_before, fds_after),
    }
    return sig, notes


def trial_upload(bed: Bed, c: Contender, gib: float) -> Result:
    size = int(gib * (1 << 30))
    source = bed.root / "upload.bin"
    if not source.exists() or source.stat().st_size != size:
        with open(source, "wb") as f:
            f.truncate(size)  # sparse: zeros, no disk, no time to make
    want = bed.sha.get("upload")
    if want is None:
        want = bed.sha["upload"] = file_sha(source)
    url = f"http://127.0.0.1:{c.ports['upload']}/sink"
    sig: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    for label, extra in (
        ("Content-Length", []),
        ("chunked", ["-H", "Transfer-Encoding: chunked"]),
    ):
        with PeakMemory(c.pgids["upload"]) as memory:
            result = curl(url, "-T", str(source), *extra, timeout=600)
        body = _httpbin_json(result)
        sig[label] = (
            result.rc,
            result.statuses,
            body.get("bytes") == size,
            body.get("sha256") == want,
        )
        notes[label] = {
            "s": result.info.get("total"),
            "RSS MiB start/peak/end": tuple(memory.result().values()),
            "backend saw CL/TE": (body.get("content_length"), body.get("transfer_encoding")),
        }
    # a client SIGKILLed 1 s into the upload: the proxy lets go of both sides
    pgid = c.pgids["upload"]
    sockets_before = group_sockets(pgid)
    client = subprocess.Popen(
        ["curl", "-sS", "-o", "/dev/null", "--limit-rate", "50M", "-T", str(source), url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    sockets_during = group_sockets(pgid)
    client.kill()
    client.wait()
    deadline = time.monotonic() + 10
    while group_sockets(pgid) > sockets_before and time.monotonic() < deadline:
        time.sleep(0.2)
    sockets_after = group_sockets(pgid)
    sig["client killed mid-upload: sockets back within 10 s"] = sockets_after <= sockets_before
    notes["killed upload: sockets before/during/after"] = (
        sockets_before,
        sockets_during,
        sockets_after,
    )
    return sig, notes


def trial_sse(bed: Bed, c: Contender) -> Result:
    sig, notes = asyncio.run(_sse(c.ports["sse"]))
    abandoned, more = asyncio.run(_sse_abandoned(c.ports["sse"], c.pgids["sse"]))
    sig.update(abandoned)
    notes.update(more)
    return sig, notes


async def _sse_abandoned(port: int, pgid: int, n: int = 50) -> Result:
    """n endless streams opened, read for 2 s, then closed by their clients: the proxy's
    sockets come back (its upstream streams are closed too)."""
    before = group_sockets(pgid)
    streams = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /sse?interval_ms=50&count=0 HTTP/1.1\r\nHost: h\r\n\r\n")
        streams.append((reader, writer))
    got = await asyncio.gather(*(asyncio.wait_for(r.read(65536), 10) for r, _ in streams))
    await asyncio.sleep(2.0)
    during = group_sockets(pgid)
    for _, writer in streams:
        writer.transport.abort()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while group_sockets(pgid) > before and loop.time() < deadline:
        await asyncio.sleep(0.2)
    after = group_sockets(pgid)
    sig = {
        f"{n} streams answered": sum(1 for g in got if g.startswith(b"HTTP/1.1 200")),
        f"{n} streams abandoned: sockets back within 10 s": after <= before,
    }
    return sig, {"abandoned streams: sockets before/during/after": (before, during, after)}


async def _sse(port: int, count: int = 30, interval_ms: int = 100) -> Result:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    delays: list[float] = []
    ids: list[int] = []
    status = 0
    try:
        writer.write(
            f"GET /sse?interval_ms={interval_ms}&count={count} HTTP/1.1\r\nHost: h\r\n"
            f"Accept: text/event-stream\r\n\r\n".encode()
        )
        buffer = b""
        while len(ids) < count:
            piece = await asyncio.wait_for(reader.read(65536), 10)
            if not piece:
                break
            now_ms = time.time() * 1000
            buffer += piece
            if not status and b"\r\n\r\n" in buffer:
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
            for match in re.finditer(rb"data: (\d+) (\d+)", buffer):
                ids.append(int(match.group(1)))
                delays.append(now_ms - int(match.group(2)))
            buffer = buffer[buffer.rfind(b"\n\n") + 2 :] if b"\n\n" in buffer else buffer
    finally:
        writer.close()
    sig = {
        "status": status,
        "events": len(ids),
        "in order": ids == list(range(1, count + 1)),
        "every event within 100 ms": bool(delays) and max(delays) < 100,
    }
    notes = {
        "delay ms p50/max": (round(statistics.median(delays), 1), round(max(delays), 1))
        if delays
        else None
    }
    return sig, notes


TRIALS: dict[str, tuple[str, Callable[..., Result]]] = {
    "aria2c": ("aria2c -x16 -s16 of 256 MiB", trial_aria2c),
    "wget": ("wget -c after a SIGKILLed partial download (256 MiB)", trial_wget_c),
    "ranges": (
        "curl -r 0-9, -r 0-9,100-199, -I, If-Range, If-None-Match, -r -5, 416",
        trial_curl_ranges,
    ),
    "httpbin": ("curl against httpbin (13 endpoints)", trial_httpbin),
    "ab": ("ab -k -n 20000 -c 50 of 1 KiB", trial_ab),
    "pipelined": (
        f"{PIPELINED} GETs / HEADs / Ranges written at once on one socket; "
        "20 POSTs and GETs likewise",
        trial_pipelined,
    ),
    "early": (
        "a backend answering 401 before the 64 MiB body; a reader at 4 MiB/s",
        trial_early_answer,
    ),
    "chromium": (
        "chromium --headless --dump-dom: a page whose script fetches 16 MiB and hashes it",
        trial_chromium,
    ),
    "slowloris": ("slowloris beside 16 MiB downloads", trial_slowloris),
    "upload": ("curl -T of a big file to a counting, hashing sink", trial_upload),
    "sse": ("SSE, 30 events 100 ms apart", trial_sse),
    "raw": (
        "raw requests: HTTP/1.0 keep-alive, an odd target, big header fields, CL+TE",
        trial_raw,
    ),
    "ab-close": (
        "ab -n 5000 -c 50 of 1 KiB (HTTP/1.0, a connection per request)",
        lambda bed, c: trial_ab(bed, c, keep_alive=False),
    ),
}


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def short(value: Any) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=True)
    return text.replace("|", "\\|")


# (trial, signature entry, the other contender): why fileproxy now answers differently
EXPLAINED: dict[tuple[str, str, str], str] = {
    ("httpbin", "/drip 5 B over 2 s", "nginx"): "nginx's `proxy_buffering on` (its default) "
    "holds httpbin's dripped body until it ends (httpbin sends no `X-Accel-Buffering: no`); "
    "fileproxy relays bytes as they come, as before",
    ("httpbin", "/redirect-to the backend 307", "nginx"): "a Location naming the backend's "
    "address: fileproxy rewrites it to its own, as before; nginx's `proxy_redirect default` "
    "rewrites only the proxy_pass URL, here the upstream block's name (`http://httpbin/`), "
    "not 127.0.0.1:PORT: nginx's configuration, not a behaviour",
    ("httpbin", "/stream/20 --http1.0", "old"): "to an HTTP/1.0 client, a response whose end "
    "is the close now says `Connection: close`, as nginx does; before it said nothing (both "
    "closed)",
    ("raw", "HTTP/1.0 keep-alive x2, then without", "old"): "the same: `Connection: close` "
    "said to an HTTP/1.0 request without keep-alive, as nginx does",
    ("raw", "HTTP/1.0 keep-alive x2, then without", "nginx"): "nginx answers HTTP/1.0 "
    "requests with an HTTP/1.1 status line (allowed); keep-alive and close are the same",
    ("raw", "9000 B header field", "nginx"): "a field over FILEPROXY_MAX_HEADER_SIZE (8190): "
    "431, as before; nginx's `large_client_header_buffers` answers 400",
    ("raw", "20000 B header field", "nginx"): "the same: 431, as before; nginx 400",
    ("raw", "HTTP/0.9", "nginx"): "nginx answers HTTP/0.9 (a bare body); fileproxy refuses "
    "it with 400, as before",
    ("raw", "LF only", "nginx"): "bare-LF line ends: nginx accepts them; fileproxy's parser "
    "refuses them with 400, as aiohttp's did",
    ("raw", "TE gzip, chunked", "old"): "a request transfer coding other than chunked: now "
    "501, as nginx (RFC 9112 6.1: a server that does not understand it answers 501); before "
    "it was passed to the backend (nginx static: 405)",
    ("raw", "absolute-form target naming another host", "nginx"): "fileproxy accepts an "
    "absolute-form target only when it names fileproxy (never an open proxy), as before; "
    "nginx passes it on",
    ("raw", "unknown method", "nginx"): "a method the parser does not know (`FOO`): 400, as "
    "before (aiohttp's parser then, llhttp now); nginx passes it on (nginx static: 405)",
    ("raw", "Connection: close, then a request behind it", "old"): "before, aiohttp's server "
    "answered the first, valid request with 400 (it parsed the bytes behind a last request); "
    "now the first is answered and nothing after it is read (RFC 9112 9.6), as nginx does",
}


def render(results: dict[str, dict[str, Result]], keys: list[str], meta: dict[str, Any]) -> str:
    lines = [
        "# Real clients through nginx and fileproxy, side by side",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; commit {meta['commit']} (fileproxy now), old: {meta['old']}",
        f"- machine: {meta['machine']}; load average before {meta['load_before']}, "
        f"after {meta['load_after']}",
        f"- clients: {meta['clients']}",
        "- every contender is one worker in front of the same backends on loopback: nginx "
        "static (256 MiB / 16 MiB random files), httpbin under gunicorn, bench/sse_backend.py, "
        "an upload sink that counts and hashes",
        "",
        "Same = the signature (exit status, statuses, bytes, SHA-256, the headers that matter) "
        "equals the other contender's; the notes are measurements (not compared).",
        "",
        "| client | "
        + " | ".join(f"{CONTENDER_NAMES[k]}: notes" for k in keys)
        + " | fp = nginx | fp = old |",
        "|---|" + "---|" * len(keys) + "---|---|",
    ]
    differences = []
    for trial, per in results.items():
        label = TRIALS[trial][0]
        cells = [short(per[k][1]) if k in per else "-" for k in keys]

        def same(other: str, trial: str = trial, per: dict[str, Result] = per) -> str:
            if "fp" not in per or other not in per:
                return "-"
            if per["fp"][0] == per[other][0]:
                return "same"
            diff = sorted(
                name for name in per["fp"][0] if per["fp"][0].get(name) != per[other][0].get(name)
            )
            differences.append((trial, other, diff))
            return "**different**: " + ", ".join(diff)

        lines.append(f"| {label} | " + " | ".join(cells) + f" | {same('nginx')} | {same('old')} |")
    lines += [
        "",
        "## Each difference",
        "",
        "Every signature entry where fileproxy now differs from nginx or from the old "
        "fileproxy, with why (EXPLAINED in bench/client_trials.py; none: not explained yet).",
        "",
        "| client | entry | fileproxy now | other | why |",
        "|---|---|---|---|---|",
    ]
    for trial, other, names in differences:
        per = results[trial]
        for name in names:
            why = EXPLAINED.get((trial, name, other), "**not explained**")
            lines.append(
                f"| {trial} | {name} | {short(per['fp'][0].get(name))} | "
                f"{CONTENDER_NAMES[other]}: {short(per[other][0].get(name))} | {why} |"
            )
    lines += ["", "## Signatures", ""]
    for trial, per in results.items():
        lines.append(f"### {trial}")
        lines.append("")
        for k in keys:
            if k in per:
                lines.append(f"- {CONTENDER_NAMES[k]}: `{short(per[k][0])}`")
        lines.append("")
    return "\n".join(lines) + "\n"


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    kernel, python = platform.release(), platform.python_version()
    return f"{model}, {os.cpu_count()} cores, kernel {kernel}, Python {python}"


def client_versions() -> str:
    out = []
    for argv in (
        ["curl", "--version"],
        ["wget", "--version"],
        ["aria2c", "--version"],
        ["ab", "-V"],
        ["chromium", "--version"],
        ["nginx", "-v"],
    ):
        done = run(argv, timeout=30)
        text = (done.stdout or done.stderr).decode("latin-1").strip().splitlines()
        out.append(text[0] if text else argv[0])
    return "; ".join(out)


def ensure_httpbin(venv: Path) -> None:
    if (venv / "bin" / "gunicorn").exists():
        return
    print(f"making {venv}: pip install httpbin gunicorn", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "httpbin", "gunicorn"], check=True)


def ensure_old_deps() -> None:
    if all((OLD_DEPS / p.replace("-", "_")).is_dir() for p in OLD_EXTRA_PACKAGES):
        return
    pip = [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", str(OLD_DEPS)]
    subprocess.run([*pip, *OLD_EXTRA_PACKAGES], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", default=",".join(TRIALS))
    parser.add_argument("--contenders", default="nginx,fp,old")
    parser.add_argument("--old", type=Path, help="the old fileproxy's source tree")
    parser.add_argument("--old-commit", default=DEFAULT_OLD_COMMIT)
    parser.add_argument("--httpbin-venv", type=Path, default=Path("/tmp/trials-httpbin"))
    parser.add_argument("--slowloris", type=int, default=500, help="slow connections")
    parser.add_argument("--slowloris-seconds", type=float, default=70.0)
    parser.add_argument("--upload-gib", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--upload-sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upload_sink:
        upload_sink(args.upload_sink)
        return
    missing = [f"{p} ({pkg})" for p, pkg in PROGRAMS.items() if not shutil.which(p)]
    if missing:
        raise SystemExit(
            "missing: "
            + ", ".join(missing)
            + "; apt-get install -y "
            + " ".join(PROGRAMS[m.split()[0]] for m in missing)
        )
    ensure_httpbin(args.httpbin_venv)
    keys = [k for k in args.contenders.split(",") if k]
    trials = [t for t in args.trials.split(",") if t]
    root = Path(tempfile.mkdtemp(prefix="client-trials-"))
    old_tree = args.old
    if "old" in keys:
        ensure_old_deps()
    if "old" in keys and old_tree is None:
        old_tree = root / "old-tree"
        old_tree.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.old_commit], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "command": " ".join(["python -m bench.client_trials", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "old": f"{args.old_commit} ({old_tree})" if "old" in keys else "-",
        "machine": machine(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "clients": client_versions(),
    }
    print(f"run directory: {root}", flush=True)
    procs = Procs(root)
    results: dict[str, dict[str, Result]] = {}
    try:
        www = root / "www"
        bed = Bed(root, procs, www, sha=make_files(www))
        start_backends(bed, args.httpbin_venv)
        bed.etag = (
            curl(f"http://127.0.0.1:{bed.backend_ports['static']}/16m.bin", "-I").header("etag")
            or ""
        )
        for key in keys:
            bed.contenders.append(start_contender(bed, key, old_tree))
        for trial in trials:
            function = TRIALS[trial][1]
            results[trial] = {}
            for contender in bed.contenders:
                extra: list[Any] = []
                if trial == "slowloris":
                    extra = [args.slowloris, args.slowloris_seconds]
                elif trial == "upload":
                    extra = [args.upload_gib]
                began = time.monotonic()
                try:
                    outcome = function(bed, contender, *extra)
                except Exception as exc:  # a trial that breaks is a result too
                    outcome = ({"error": f"{type(exc).__name__}: {exc}"}, {})
                results[trial][contender.key] = outcome
                print(
                    f"{trial:10} {contender.key:6} {time.monotonic() - began:6.1f}s "
                    f"{short(outcome[0])[:300]}  {short(outcome[1])[:300]}",
                    flush=True,
                )
    finally:
        procs.stop_all()
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report = render(results, keys, meta)
    if args.out:
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "results": results}, default=repr, indent=1)
        )
    print(report)
    shutil.rmtree(root / "www", ignore_errors=True)
    with contextlib.suppress(OSError):
        (root / "upload.bin").unlink()


if __name__ == "__main__":
    main()
