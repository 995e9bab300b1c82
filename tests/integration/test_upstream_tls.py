"""https upstreams: certificates verified, failures named, a private CA trusted on request.

A CA and server certificates are made here with the ``openssl`` command; the backend is
an aiohttp app serving TLS on port 0; the proxy is the real daemon (``fileproxy serve``)
and the diagnostics the real ``fileproxy check``.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ROOT, clean_env, require_binary

CERT_DAYS = "2"


@dataclass(frozen=True)
class Certificates:
    """A CA, server certificates it issued, and one that signed itself."""

    ca: Path  # the CA's certificate (PEM): what FILEPROXY_UPSTREAM_CA names
    localhost: tuple[Path, Path]  # (cert, key) for DNS:localhost and IP:127.0.0.1
    elsewhere: tuple[Path, Path]  # (cert, key) for DNS:backend.example only
    self_signed: tuple[Path, Path]  # (cert, key) for localhost, issued by itself


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [require_binary("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def _issue(directory: Path, name: str, subject_alt_names: str) -> tuple[Path, Path]:
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={subject_alt_names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", CERT_DAYS, "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.pem", directory / f"{name}.key"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", CERT_DAYS,
        "-subj", "/CN=fileproxy test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "self.key", "-out", "self.pem", "-days", CERT_DAYS, "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    return Certificates(
        ca=directory / "ca.pem",
        localhost=_issue(directory, "localhost", "DNS:localhost,IP:127.0.0.1"),
        elsewhere=_issue(directory, "backend.example", "DNS:backend.example"),
        self_signed=(directory / "self.pem", directory / "self.key"),
    )


StartHttps = Callable[[tuple[Path, Path]], Awaitable[int]]


@pytest.fixture
async def https_backend() -> AsyncIterator[StartHttps]:
    """``await https_backend((cert, key))``: the port of an aiohttp backend serving TLS."""
    runners: list[web.AppRunner] = []

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello over tls")

    async def start(cert_and_key: tuple[Path, Path]) -> int:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*cert_and_key)
        app = web.Application()
        app.router.add_get("/{tail:.*}", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str] | str]:
    async with client.get(url) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def test_an_untrusted_certificate_is_a_502_that_says_so(
    certificates, https_backend, start_proxy, client
):
    port = await https_backend(certificates.localhost)
    proxy = start_proxy(f"https://127.0.0.1:{port}")
    status, body = await _get(client, f"{proxy.url}/file")
    assert status == 502, body
    assert isinstance(body, dict)
    assert body["error"] == "upstream_certificate_invalid", body
    assert body["detail"] == (
        "upstream certificate verify failed: unable to get local issuer certificate "
        "(issued by a CA not trusted here)"
    ), body
    assert "EPERM" not in proxy.log_text()


async def test_the_ca_file_makes_a_private_ca_trusted(
    certificates, https_backend, start_proxy, client
):
    port = await https_backend(certificates.localhost)
    proxy = start_proxy(f"https://127.0.0.1:{port}", FILEPROXY_UPSTREAM_CA=str(certificates.ca))
    assert await _get(client, f"{proxy.url}/file") == (200, "hello over tls")
    assert "not verified" not in proxy.log_text()


async def test_a_certificate_for_another_host_is_a_hostname_mismatch(
    certificates, https_backend, start_proxy, client
):
    port = await https_backend(certificates.elsewhere)
    proxy = start_proxy(f"https://localhost:{port}", FILEPROXY_UPSTREAM_CA=str(certificates.ca))
    status, body = await _get(client, f"{proxy.url}/file")
    assert status == 502, body
    assert isinstance(body, dict)
    assert body["error"] == "upstream_certificate_invalid", body
    assert body["detail"] == (
        "upstream certificate verify failed: hostname mismatch "
        "(the certificate does not name the upstream's host)"
    ), body


async def test_verification_off_serves_and_warns_at_start(
    certificates, https_backend, start_proxy, client
):
    port = await https_backend(certificates.self_signed)
    proxy = start_proxy(f"https://127.0.0.1:{port}", FILEPROXY_UPSTREAM_TLS_VERIFY="off")
    assert await _get(client, f"{proxy.url}/file") == (200, "hello over tls")
    warnings = [line for line in proxy.log_text().splitlines() if '"level":"warning"' in line]
    assert any("FILEPROXY_UPSTREAM_TLS_VERIFY=off" in line for line in warnings), warnings


async def _check(**env: str) -> tuple[int, str]:
    """``fileproxy check`` as a process (the backend runs in this test's loop meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fileproxy", "check",
        env=clean_env(**env), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


def _upstream_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line[5:].startswith("upstream:")]
    assert len(lines) == 1, out
    return lines[0]


async def test_check_reports_the_certificate_and_what_failed(certificates, https_backend):
    trusted = await https_backend(certificates.localhost)
    self_signed = await https_backend(certificates.self_signed)
    elsewhere = await https_backend(certificates.elsewhere)
    ca = str(certificates.ca)

    code, out = await _check(FILEPROXY_UPSTREAM=f"https://127.0.0.1:{trusted}")
    line = _upstream_line(out)
    assert code == 1 and line.startswith("FAIL"), out
    assert "certificate verify failed: unable to get local issuer certificate" in line
    assert "FILEPROXY_UPSTREAM_CA" in line and "start the backend" not in line

    code, out = await _check(FILEPROXY_UPSTREAM=f"https://127.0.0.1:{self_signed}")
    line = _upstream_line(out)
    assert code == 1 and "certificate verify failed: self-signed certificate;" in line, out

    code, out = await _check(
        FILEPROXY_UPSTREAM=f"https://localhost:{elsewhere}", FILEPROXY_UPSTREAM_CA=ca
    )
    line = _upstream_line(out)
    assert code == 1, out
    assert "Hostname mismatch, certificate is not valid for 'localhost'" in line, line

    code, out = await _check(
        FILEPROXY_UPSTREAM=f"https://127.0.0.1:{trusted}", FILEPROXY_UPSTREAM_CA=ca
    )
    line = _upstream_line(out)
    assert code == 0 and line.startswith("PASS"), out
    assert "answered 200" in line
    assert "certificate verified against FILEPROXY_UPSTREAM_CA: CN=localhost" in line, line
    assert "issued by CN=fileproxy test CA, valid until" in line, line

    code, out = await _check(
        FILEPROXY_UPSTREAM=f"https://127.0.0.1:{self_signed}", FILEPROXY_UPSTREAM_TLS_VERIFY="off"
    )
    line = _upstream_line(out)
    assert code == 0 and line.startswith("WARN"), out
    assert "certificate NOT verified (FILEPROXY_UPSTREAM_TLS_VERIFY=off)" in line
