"""The production start: `gunicorn -c gunicorn.conf.py` and `./run_optimized.sh`."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fileproxy.sample_upstream import file_bytes
from tests.conftest import ROOT, clean_env, free_port, get_json, start_process, wait_for_port

VENV_BIN = Path(sys.executable).parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_gunicorn_serves_with_uvloop_workers(client, sample_upstream, tmp_dir):
    port = free_port()
    env = clean_env(
        FILEPROXY_BIND=f"127.0.0.1:{port}",
        FILEPROXY_UPSTREAM=sample_upstream.url,
        FILEPROXY_WORKERS="2",
    )
    gunicorn = start_process(
        [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py"], port, env, tmp_dir / "g.log", 60
    )
    # gunicorn loses a SIGTERM that reaches a worker before it installed its handlers
    gunicorn.wait_for_log("fileproxy worker started", count=2)
    try:
        health = await get_json(client, f"{gunicorn.url}/health")
        assert health["performance_optimization"]["uvloop_enabled"] is True
        # options set on gunicorn's listening socket reach the accepted socket
        assert health["tcp"]["listen_refused"] == []
        assert health["tcp"]["client_socket"]["TCP_KEEPIDLE"] == 60
        async with client.get(f"{gunicorn.url}/files/1m.bin") as resp:
            assert resp.status == 200
            body = await resp.read()
        assert body == b"".join(file_bytes("1m.bin", 0, 1 << 20))
    finally:
        assert gunicorn.stop() == 0, gunicorn.log_text()
    log = gunicorn.log_text()
    assert "GunicornUVLoopWebWorker" in log or "Booting worker" in log
    assert "Traceback" not in log


def test_gunicorn_refuses_a_bad_setting_with_one_line(tmp_dir):
    result = subprocess.run(
        [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py"],
        env=clean_env(HTTP_TOTAL_TIMEOUT="forever"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fileproxy: invalid HTTP_TOTAL_TIMEOUT='forever': "
        "expected a number of seconds from 0.05 to 86400"
    ]


async def test_run_optimized_starts_the_sample_backend_and_proxies_it(client, tmp_dir):
    port, sample_port = free_port(), free_port()
    env = clean_env(
        FILEPROXY_VENV=str(VENV_BIN.parent),
        FILEPROXY_BIND=f"127.0.0.1:{port}",
        FILEPROXY_SAMPLE_BIND=f"127.0.0.1:{sample_port}",
        FILEPROXY_WORKERS="1",
    )
    script = start_process(
        [str(ROOT / "run_optimized.sh")], port, env, tmp_dir / "run.log", timeout=60
    )
    script.wait_for_log("fileproxy worker started")
    try:
        wait_for_port(sample_port)
        async with client.get(f"{script.url}/files/1m.bin") as resp:
            assert resp.status == 200
            digest = hashlib.sha256(await resp.read()).hexdigest()
        expected = hashlib.sha256(b"".join(file_bytes("1m.bin", 0, 1 << 20))).hexdigest()
        assert digest == expected
        health = await get_json(client, f"{script.url}/health")
        assert health["upstream"]["url"] == f"http://127.0.0.1:{sample_port}"
        sample_pids = subprocess.run(
            ["pgrep", "-f", f"sample-upstream --bind 127.0.0.1:{sample_port}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        assert len(sample_pids) == 1
    finally:
        # the script exec'd gunicorn: its PID is gunicorn's master, SIGTERM reaches it
        script.popen.send_signal(signal.SIGTERM)
        assert script.popen.wait(30) == 0
    log = script.log_text()
    assert "uvloop: active" in log
    assert f"curl -s http://127.0.0.1:{port}/health" in log
    # the sample backend stops with the daemon that started it
    deadline = time.monotonic() + 10
    while _pid_alive(int(sample_pids[0])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(int(sample_pids[0]))


def test_run_optimized_check_runs_fileproxy_check(sample_upstream, tmp_dir):
    env_file = tmp_dir / "fileproxy.env"
    env_file.write_text(f"# an operator's env file\nFILEPROXY_UPSTREAM={sample_upstream.url}\n")
    result = subprocess.run(
        [str(ROOT / "run_optimized.sh"), "--check", str(env_file)],
        env=clean_env(FILEPROXY_VENV=str(VENV_BIN.parent)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"loaded {env_file}" in result.stderr
    assert f"PASS upstream: {sample_upstream.url} answered" in result.stdout
    assert result.stdout.splitlines()[-1] == "all checks passed"
    # the environment wins over the file
    overridden = subprocess.run(
        [str(ROOT / "run_optimized.sh"), "--check", str(env_file)],
        env=clean_env(FILEPROXY_VENV=str(VENV_BIN.parent), FILEPROXY_UPSTREAM="http://127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert overridden.returncode == 1
    assert "FAIL upstream: http://127.0.0.1:1" in overridden.stdout
