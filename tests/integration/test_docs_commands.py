"""The commands the docs show, run as they are written (only the ports are changed).

Each test finds its block by the ``<!-- runs: NAME -->`` marker before it
(tests/docs_blocks.py), runs every line in bash with the venv's ``fileproxy`` first on
PATH, and checks what the docs say comes out. The README's first session starts the
sample backend and fileproxy in the background (``&``); here they get ephemeral ports
in place of 27804 and 10080 and are stopped by their process group id.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fileproxy.sample_upstream import file_bytes
from tests.conftest import free_port, require_binary
from tests.docs_blocks import ROOT, Block, block_named

DOC_SAMPLE = "127.0.0.1:27804"
DOC_PROXY = "127.0.0.1:10080"


def shell_env() -> dict[str, str]:
    """The environment of a user's shell in the venv: none of fileproxy's settings set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FILEPROXY_", "HTTP_", "REDIS_"))
        and k not in {"STREAM_CHUNK_SIZE", "BUFFER_SIZE"}
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def run_line(line: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", line],
        cwd=cwd,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def prompted(block: Block) -> list[tuple[str, list[str]]]:
    """``$ command`` lines of a block with the output lines the docs show after each."""
    pairs: list[tuple[str, list[str]]] = []
    for line in block.lines:
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        elif pairs and line:
            pairs[-1][1].append(line)
    assert pairs, f"{block.where}: no `$ ` line"
    return pairs


def wait_for_port(port: int, procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a first-session process exited: {logs.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"nothing listens on {port} after 30 s: {logs.read_text()[-2000:]}")


@dataclass
class Session:
    cwd: Path
    sample: str
    proxy: str
    foreground: list[str]
    proxy_stdout: Path

    def here(self, line: str) -> str:
        return line.replace(DOC_SAMPLE, self.sample).replace(DOC_PROXY, self.proxy)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """The README's first session: its background lines started, its others left to run."""
    require_binary("curl")
    cwd = tmp_path_factory.mktemp("first-session")
    sample_port, proxy_port = free_port(), free_port()
    s = Session(cwd, f"127.0.0.1:{sample_port}", f"127.0.0.1:{proxy_port}", [], cwd / "out-0")
    block = block_named("first-session")
    background = [line for line in block.command_lines() if line.rstrip().endswith("&")]
    s.foreground = [line for line in block.command_lines() if not line.rstrip().endswith("&")]
    assert len(background) == 2, f"{block.where}: the sample backend and fileproxy, each with &"
    procs: list[subprocess.Popen[bytes]] = []
    logs = cwd / "stderr"
    try:
        with logs.open("wb") as err:
            for i, line in enumerate(background):
                with (cwd / f"out-{i}").open("wb") as out:
                    procs.append(
                        subprocess.Popen(
                            ["bash", "-c", s.here(line.rstrip().removesuffix("&"))],
                            cwd=cwd,
                            env=shell_env(),
                            stdout=out,
                            stderr=err,
                            start_new_session=True,
                        )
                    )
            serving = [i for i, line in enumerate(background) if "fileproxy serve" in line]
            assert len(serving) == 1, f"{block.where}: one `fileproxy serve &`"
            s.proxy_stdout = cwd / f"out-{serving[0]}"
            wait_for_port(sample_port, procs, logs)
            wait_for_port(proxy_port, procs, logs)
            yield s
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def test_first_session(session: Session):
    readme = (ROOT / "README.md").read_text()
    seen = set()
    for line in session.foreground:
        done = run_line(session.here(line), session.cwd)
        assert done.returncode == 0, f"`{line}`: {done.stderr}"
        if "/files/1m.bin" in line:
            seen.add("download")
            assert f"prints `{done.stdout.strip()}`" in readme, done.stdout
            body = (session.cwd / "1m.bin").read_bytes()
            assert (
                hashlib.sha256(body).digest()
                == hashlib.sha256(b"".join(file_bytes("1m.bin"))).digest()
            )
        elif line.rstrip().endswith("/files"):
            seen.add("files")
            assert "1m.bin" in {f["name"] for f in json.loads(done.stdout)}
        elif "/health" in line:
            seen.add("health")
            assert json.loads(done.stdout)["status"] == "ok"
        elif "/stats" in line:
            seen.add("stats")
            metrics = json.loads(done.stdout)["performance_optimizer"]["metrics"]
            assert metrics["total_requests"] >= 2
    assert seen == {"files", "download", "health", "stats"}
    # "Each request also wrote one JSON access line on fileproxy's stdout" (batched: <= 1 s)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        paths = [json.loads(x).get("path") for x in session.proxy_stdout.read_text().splitlines()]
        if "/files/1m.bin" in paths:
            break
        time.sleep(0.2)
    assert "/files/1m.bin" in paths and "/files" in paths


def test_endpoints_block(session: Session):
    doc = (ROOT / "docs" / "operations.md").read_text()
    seen = set()
    for line in block_named("endpoints").command_lines():
        done = run_line(session.here(line), session.cwd)
        assert done.returncode == 0, f"`{line}`: {done.stderr}"
        if line.rstrip().endswith("/ready"):
            seen.add("ready")
            assert f"`/ready` answers `{done.stdout.strip()}`" in doc, done.stdout
        elif "/metrics" in line:
            seen.add("metrics")
            assert done.stdout.startswith("fileproxy_requests_total{"), done.stdout
        elif "X-Request-ID" in line:
            seen.add("request id")
            assert "x-request-id: my-request-1" in done.stdout.lower(), done.stdout
        elif "fileproxy config" in line:
            seen.add("config")
            assert json.loads(done.stdout)["FILEPROXY_BIND"] == DOC_PROXY
    assert seen == {"ready", "metrics", "request id", "config"}


def test_check_block(session: Session):
    ((command, shown),) = prompted(block_named("check"))
    done = run_line(session.here(command), session.cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    real = done.stdout.splitlines()

    def checks(lines: list[str]) -> list[str]:
        return [x.split(":")[0].split(" ", 1)[1] for x in lines if x.startswith(("PASS", "WARN"))]

    assert checks(real) == checks(shown), "the docs show the checks `fileproxy check` makes"
    assert f"PASS upstream: http://{session.sample} answered 200" in done.stdout
    assert real[-1] == shown[-1] == "all checks passed"


def test_bad_setting_block(tmp_path: Path):
    ((command, shown),) = prompted(block_named("bad-setting"))
    done = run_line(command, tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == shown


def test_bind_in_use_block(tmp_path: Path):
    ((command, shown),) = prompted(block_named("bind-in-use"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        done = run_line(command.replace("127.0.0.1:8080", taken), tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [x.replace("127.0.0.1:8080", taken) for x in shown]
