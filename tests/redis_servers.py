"""Real redis-server processes on ephemeral loopback ports, for integration tests.

Never touches a Redis already running on the machine: every server here listens on a
port just found free on 127.0.0.1, with its own random password and its own temporary
directory, and is stopped by its PID.

- ``RedisServer(tmp_dir)``: one node with ``requirepass``.
- ``RedisClusterServers(tmp_dir)``: a 3-master Redis Cluster (no replicas).

Both have the same test-facing API (``url``, ``password``, ``kill()``, ``restart()``,
``stop()``, ``client()``, ``cluster``) so one suite can run against either
(see the ``redis_backend`` fixture in tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import free_port, require_binary, stop_popen

START_TIMEOUT = 20.0
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's bus listens on port + 10000
MAX_CLUSTER_PORT = 65535 - CLUSTER_BUS_OFFSET  # bus port must be a valid port too
CLUSTER_SLOTS = 16384


class RedisBackend(Protocol):
    """What the ``redis_backend`` fixture yields, whichever topology it is."""

    cluster: bool

    @property
    def url(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def ports(self) -> list[int]: ...
    def kill(self) -> None: ...
    def stop(self) -> None: ...
    def restart(self) -> None: ...
    def client(self) -> Any: ...


def no_retry() -> Retry:
    """For probes and negative assertions: redis-py 8 retries connection errors by default
    (AuthenticationError is one), which only slows a probe or an expected failure down."""
    return Retry(NoBackoff(), 0)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A free loopback port below 55535 whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = free_port()
        if (
            port <= MAX_CLUSTER_PORT
            and port not in exclude
            and port + CLUSTER_BUS_OFFSET not in exclude
            and _port_is_free(port + CLUSTER_BUS_OFFSET)
        ):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) on 127.0.0.1")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class _Node:
    """One redis-server process; restartable on the same port with the same arguments."""

    def __init__(self, port: int, password: str, extra_args: list[str], work_dir: Path) -> None:
        self.port = port
        self.password = password
        self.extra_args = extra_args
        self.work_dir = work_dir
        self.log_path = work_dir / f"redis-{port}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self) -> None:
        if self.running():
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        args = [
            require_binary("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.work_dir),
            "--requirepass",
            self.password,
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log_file:  # appended across restarts
            self.popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
            )

    def client(self, **kwargs: Any) -> redis.Redis:
        options: dict[str, Any] = {
            "socket_timeout": 5.0,
            "socket_connect_timeout": 2.0,
            "decode_responses": True,
            **kwargs,
        }
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **options)

    def wait_ready(self, deadline: float) -> None:
        """Until the server answers PING with its password; fails with the log's tail."""
        probe = self.client(socket_timeout=1.0, socket_connect_timeout=0.5, retry=no_retry())
        last_error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                if not self.running():
                    code = None if self.popen is None else self.popen.returncode
                    raise RuntimeError(
                        f"redis-server on 127.0.0.1:{self.port} exited with {code}:\n"
                        f"{log_tail(self.log_path)}"
                    )
                try:
                    if probe.ping():
                        return
                except redis.RedisError as exc:
                    last_error = exc
                time.sleep(0.05)
        finally:
            probe.close()
        raise TimeoutError(
            f"redis-server on 127.0.0.1:{self.port} did not answer PING in time "
            f"(last error: {last_error!r}):\n{log_tail(self.log_path)}"
        )

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self) -> None:
        """SIGTERM, wait; SIGKILL if it does not exit."""
        if self.popen is not None:
            stop_popen(self.popen, timeout=10)


def _address_in_use(node: _Node) -> bool:
    return "Address already in use" in log_tail(node.log_path)


class RedisServer:
    """One redis-server with ``requirepass`` on a free 127.0.0.1 port, in ``tmp_dir``."""

    cluster = False

    def __init__(self, tmp_dir: Path, *, start_timeout: float = START_TIMEOUT) -> None:
        self.start_timeout = start_timeout
        self._password = secrets.token_hex(16)
        self._node: _Node | None = None
        for attempt in range(3):  # another process may take the port between probe and bind
            work_dir = tmp_dir / f"redis-single-{attempt}"
            work_dir.mkdir(parents=True, exist_ok=True)
            node = _Node(free_port(), self._password, [], work_dir)
            self._node = node
            node.spawn()
            try:
                node.wait_ready(time.monotonic() + start_timeout)
                return
            except Exception:
                node.stop()
                if attempt < 2 and _address_in_use(node):
                    continue
                raise

    @property
    def node(self) -> _Node:
        assert self._node is not None
        return self._node

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def ports(self) -> list[int]:
        return [self.port]

    @property
    def password(self) -> str:
        return self._password

    @property
    def url(self) -> str:
        return f"redis://:{self._password}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.node.pid

    @property
    def log_path(self) -> Path:
        return self.node.log_path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the server crashes (no persistence: its data is gone)."""
        self.node.kill()

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 10 s)."""
        self.node.stop()

    def restart(self) -> None:
        """Start again on the same port (stopping it first if it still runs); wait for PING."""
        self.node.stop()
        self.node.spawn()
        try:
            self.node.wait_ready(time.monotonic() + self.start_timeout)
        except Exception:
            self.node.stop()
            raise

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client for assertions: password set, decode_responses, short timeouts."""
        return self.node.client(**kwargs)


class RedisClusterServers:
    """A real 3-master Redis Cluster (no replicas) on free 127.0.0.1 ports, in ``tmp_dir``."""

    cluster = True

    def __init__(
        self, tmp_dir: Path, *, masters: int = 3, start_timeout: float = START_TIMEOUT
    ) -> None:
        self.start_timeout = start_timeout
        self._password = secrets.token_hex(16)
        self.work_dir = tmp_dir / "redis-cluster"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.create_log_path = self.work_dir / "cluster-create.log"
        self.nodes: list[_Node] = []
        try:
            self._start_nodes(masters)
            self._create_cluster()
            self.wait_cluster_ok()
        except BaseException:
            self.stop()
            raise

    def _node_args(self, port: int) -> list[str]:
        return [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.work_dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout",
            "2000",
            "--masterauth",
            self._password,
        ]

    def _start_nodes(self, masters: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        used: set[int] = set()
        while len(self.nodes) < masters:
            port = free_cluster_port(used)
            used.update((port, port + CLUSTER_BUS_OFFSET))
            node = _Node(port, self._password, self._node_args(port), self.work_dir)
            node.spawn()
            try:
                node.wait_ready(deadline)
            except Exception:
                node.stop()
                if _address_in_use(node) and time.monotonic() < deadline:
                    continue  # the port (or its bus port) was taken meanwhile: another one
                raise
            self.nodes.append(node)

    def _create_cluster(self) -> None:
        args = [
            require_binary("redis-cli"),
            "-a",
            self._password,
            "--no-auth-warning",
            "--cluster",
            "create",
            *(f"127.0.0.1:{port}" for port in self.ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        with open(self.create_log_path, "ab") as log_file:
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    timeout=self.start_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:  # run() has killed it
                raise TimeoutError(
                    f"redis-cli --cluster create did not finish in {self.start_timeout}s:\n"
                    f"{log_tail(self.create_log_path)}"
                ) from None
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create exited with {result.returncode}:\n"
                f"{log_tail(self.create_log_path)}"
            )

    def _cluster_state(self, node: _Node) -> str:
        """``cluster_state`` from ``CLUSTER INFO`` on one node (or the error, as text)."""
        probe = node.client(socket_timeout=1.0, socket_connect_timeout=0.5, retry=no_retry())
        try:
            info = probe.execute_command("CLUSTER INFO")
        except redis.RedisError as exc:
            return f"error: {exc!r}"
        finally:
            probe.close()
        if isinstance(info, dict):
            return str(info.get("cluster_state"))
        for line in str(info).splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    def cluster_states(self) -> dict[int, str]:
        """Port -> ``cluster_state`` as each node reports it (``ok`` when all is well)."""
        return {node.port: self._cluster_state(node) for node in self.nodes}

    def wait_cluster_ok(self, timeout: float | None = None) -> None:
        """Until ``CLUSTER INFO`` on every node says ``cluster_state:ok``."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        states: dict[int, str] = {}
        while True:
            for node in self.nodes:
                if not node.running():
                    raise RuntimeError(
                        f"cluster node 127.0.0.1:{node.port} exited:\n{log_tail(node.log_path)}"
                    )
            states = self.cluster_states()
            if all(state == "ok" for state in states.values()):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        tails = "\n".join(
            f"--- 127.0.0.1:{node.port} ---\n{log_tail(node.log_path, 20)}" for node in self.nodes
        )
        raise TimeoutError(f"cluster not ok in time: {states}\n{tails}")

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def port(self) -> int:
        """The first node's port (the one in ``url``)."""
        return self.ports[0]

    @property
    def password(self) -> str:
        return self._password

    @property
    def url(self) -> str:
        """The first node, with the password; for ``RedisCluster.from_url``."""
        return f"redis://:{self._password}@127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int | None]:
        return [node.pid for node in self.nodes]

    def log_text(self) -> str:
        parts = [self.create_log_path, *(node.log_path for node in self.nodes)]
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')}"
            for path in parts
            if path.exists()
        )

    def kill_all(self) -> None:
        """SIGKILL every node: the whole cluster crashes (data is lost, nodes.conf stays)."""
        for node in self.nodes:
            node.kill()

    def stop(self) -> None:
        """SIGTERM every node and wait (SIGKILL after 10 s)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def restart_all(self) -> None:
        """Every node again on its port with its nodes.conf; wait for cluster_state:ok."""
        self.stop()
        deadline = time.monotonic() + self.start_timeout
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_ready(deadline)
            self.wait_cluster_ok()  # its own bound: nodes reconnect over the bus first
        except BaseException:
            self.stop()
            raise

    # The common API of RedisBackend
    kill = kill_all
    restart = restart_all

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A synchronous cluster client for assertions (password set, decode_responses)."""
        options: dict[str, Any] = {
            "socket_timeout": 5.0,
            "socket_connect_timeout": 2.0,
            "decode_responses": True,
            **kwargs,
        }
        return redis.cluster.RedisCluster(
            host="127.0.0.1", port=self.port, password=self._password, **options
        )
