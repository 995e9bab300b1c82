"""The benchmark network: two namespaces joined by a veth pair, impaired on demand.

    client namespace  fpb<pid>c  10.201.0.1/24  dev fpb<pid>c0
            |  veth, TSO/GSO/GRO off on both ends (else one "packet" is a 64 KB burst)
    server namespace  fpb<pid>s  10.201.0.2/24  dev fpb<pid>s0

Nothing outside the two namespaces is touched: the veth pair is created inside
them, every qdisc and iptables rule lives in them, and deleting them removes it
all. Every process started here is tracked and stopped by its process group id.

Impairment, per direction (server -> client and client -> server alike):

- netem when the kernel has it (``tc qdisc ... netem delay D J rate R loss L``);
- otherwise (this VM: no netem, fq or cake):
  - rate: ``tbf`` on the egress of each veth end;
  - loss: iptables ``-m statistic --mode random --probability L -j DROP`` on the
    receiving namespace's INPUT;
  - delay +- jitter: iptables ``-j NFQUEUE --queue-num 1 --queue-bypass`` on the
    client namespace's OUTPUT and INPUT, and ``bench/delayer.py`` there, which
    releases each packet after D +- J, first-in-first-out per flow. Both
    directions are delayed on the client side: holding the server's outgoing
    data in a queue would count against its TCP small-queues budget, holding
    arriving packets does not.

``verify()`` measures what was built: ping and TCP connect RTT, a rate probe
(one HTTP download of a large file, goodput over its last 60%, so slow start is
left out), and the drop counters.

    python -m bench.netem poor          # build, apply, verify, print, tear down
    python -m bench.netem very_poor --hold 60   # keep it up 60 s to poke at it
    python -m bench.netem cleanup-stale   # namespaces left by a bench that was SIGKILLed
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
QUEUE_NUM = 1
SUBNET = "10.201.0"
CLIENT_IP = f"{SUBNET}.1"
SERVER_IP = f"{SUBNET}.2"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    delay_ms: float  # one way, each direction: RTT = 2 x delay
    jitter_ms: float  # +- per packet, each direction
    rate_mbit: float  # each direction; 0: not shaped
    loss: float  # probability per packet, each direction
    tbf_latency_ms: float  # tbf queue: rate x latency bytes may wait

    @property
    def rtt_range_ms(self) -> tuple[float, float]:
        return (2 * (self.delay_ms - self.jitter_ms), 2 * (self.delay_ms + self.jitter_ms))

    def describe(self) -> str:
        if not (self.delay_ms or self.rate_mbit or self.loss):
            return "no impairment: the bare veth pair (offloads off)"
        low, high = self.rtt_range_ms
        rtt = f"{low:g} ms" if low == high else f"{low:g}-{high:g} ms"
        return f"RTT {rtt}, {self.rate_mbit:g} Mbit/s, {self.loss * 100:g}% loss each way"


SCENARIOS = {
    s.name: s
    for s in (
        # not one of the seed's: what the proxies themselves can relay, without emulation
        Scenario("clean", "clean", 0, 0, 0, 0.0, 0),
        Scenario("normal", "normal", 5, 0, 1000, 0.0, 20),
        Scenario("poor", "poor", 75, 25, 10, 0.015, 100),
        Scenario("very_poor", "very poor", 200, 50, 1, 0.05, 200),
    )
}


def run(
    argv: list[str], check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def netem_available() -> bool:
    """Try netem on the loopback of a scratch namespace (nothing outside changes)."""
    name = f"fpb{os.getpid()}x"
    if run(["ip", "netns", "add", name], check=False).returncode != 0:
        return False
    try:
        probe = run(
            [
                "ip",
                "netns",
                "exec",
                name,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "1ms",
            ],
            check=False,
        )
        return probe.returncode == 0
    finally:
        run(["ip", "netns", "del", name], check=False)


class Process:
    """A process started in its own session; stopped by signalling its group."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path | None) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        # workers of the group that outlived their master
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode


class Testbed:
    def __init__(self, workdir: Path | None = None, log: TextIO = sys.stdout) -> None:
        tag = str(os.getpid())
        self.client_ns = f"fpb{tag}c"
        self.server_ns = f"fpb{tag}s"
        self.client_dev = f"fpb{tag}c0"
        self.server_dev = f"fpb{tag}s0"
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fpb-net-"))
        self._own_workdir = workdir is None
        self.log = log
        self.processes: list[Process] = []
        self.delayer: Process | None = None
        self.scenario: Scenario | None = None
        self.method = "none"
        self.created: list[str] = []
        self._torn_down = False
        atexit.register(self.teardown)

    # -- plumbing ---------------------------------------------------------------

    def ns_argv(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def sh(self, ns: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
        done = run(self.ns_argv(ns, list(argv)), check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{ns}: {' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def spawn(
        self,
        ns: str,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stdout: int | None = None,
    ) -> Process:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as sink:
            popen = subprocess.Popen(
                self.ns_argv(ns, argv),
                stdout=stdout if stdout is not None else sink,
                stderr=sink,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def stop(self, process: Process, timeout: float = 10.0) -> int | None:
        code = process.stop(timeout)
        if process in self.processes:
            self.processes.remove(process)
        return code

    # -- build and tear down ----------------------------------------------------

    def setup(self) -> None:
        for ns in (self.client_ns, self.server_ns):
            run(["ip", "netns", "add", ns])
            self.created.append(ns)
        run(
            [
                "ip",
                "link",
                "add",
                self.client_dev,
                "netns",
                self.client_ns,
                "type",
                "veth",
                "peer",
                "name",
                self.server_dev,
                "netns",
                self.server_ns,
            ]
        )
        for ns, dev, ip in (
            (self.client_ns, self.client_dev, CLIENT_IP),
            (self.server_ns, self.server_dev, SERVER_IP),
        ):
            self.sh(ns, "ip", "link", "set", "lo", "up")
            self.sh(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            self.sh(ns, "ip", "link", "set", dev, "up")
            self.sh(ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off")
            # many short connections from wrk and to the backends
            self.sh(ns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000")
            self.sh(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
        self.method = "netem" if netem_available() else "tbf+iptables+nfqueue"

    def teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        for process in reversed(self.processes):
            try:
                process.stop(5)
            except Exception as exc:  # keep tearing down
                print(f"netem: stopping {process.name}: {exc}", file=sys.stderr)
        self.processes.clear()
        for ns in self.created:
            # anything still running inside our own namespaces was started by us
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
        self.created.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- impairment -------------------------------------------------------------

    def clear(self) -> None:
        if self.delayer is not None:
            stats = self._stop_delayer()
            if stats:
                print(f"  delayer: {json.dumps(stats)}", file=self.log)
        for ns, dev in ((self.client_ns, self.client_dev), (self.server_ns, self.server_dev)):
            self.sh(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            self.sh(ns, "iptables", "-w", "-F", check=False)
        self.scenario = None

    def _stop_delayer(self) -> dict[str, Any] | None:
        delayer, self.delayer = self.delayer, None
        if delayer is None:
            return None
        self.stop(delayer)
        return self.delayer_stats(delayer)

    @staticmethod
    def delayer_stats(delayer: Process) -> dict[str, Any] | None:
        if delayer.log is None:
            return None
        out = delayer.log.with_suffix(".out")
        if not out.exists():
            return None
        lines = [line for line in out.read_text().splitlines() if line.startswith("{")]
        for line in reversed(lines):
            data: dict[str, Any] = json.loads(line)
            if "packets" in data:
                return data
        return None

    def apply(self, scenario: Scenario) -> None:
        self.clear()
        sides = ((self.client_ns, self.client_dev), (self.server_ns, self.server_dev))
        if self.method == "netem":
            for ns, dev in sides:
                argv = f"tc qdisc add dev {dev} root netem delay {scenario.delay_ms}ms".split()
                if scenario.jitter_ms:
                    argv.append(f"{scenario.jitter_ms}ms")
                if scenario.rate_mbit:
                    argv += ["rate", f"{scenario.rate_mbit}mbit"]
                if scenario.loss:
                    argv += ["loss", f"{scenario.loss * 100}%"]
                self.sh(ns, *argv)
            self.scenario = scenario
            return
        burst = max(32 * 1024, int(scenario.rate_mbit * 1e6 / 8 * 0.004))
        for ns, dev in sides:
            if scenario.rate_mbit:
                self.sh(ns, *f"tc qdisc add dev {dev} root tbf rate {scenario.rate_mbit:g}mbit "
                        f"burst {burst} latency {scenario.tbf_latency_ms:g}ms".split())  # fmt: skip
            # a counting rule (no target) first, then the random drop
            self.sh(ns, *f"iptables -w -A INPUT -i {dev} -m comment --comment fpb-count".split())
            if scenario.loss:
                self.sh(ns, *f"iptables -w -A INPUT -i {dev} -m statistic --mode random "
                        f"--probability {scenario.loss:.4f} -m comment --comment fpb-drop "
                        "-j DROP".split())  # fmt: skip
        if scenario.delay_ms:
            out = self.workdir / "delayer.out"
            out.unlink(missing_ok=True)
            with open(out, "wb") as sink:
                self.delayer = self.spawn(
                    self.client_ns,
                    "delayer",
                    [
                        PYTHON,
                        "-m",
                        "bench.delayer",
                        "--queue",
                        str(QUEUE_NUM),
                        "--delay-ms",
                        f"{scenario.delay_ms:g}",
                        "--jitter-ms",
                        f"{scenario.jitter_ms:g}",
                    ],
                    stdout=sink.fileno(),
                )
            deadline = time.monotonic() + 10
            while "ready" not in out.read_text():
                if self.delayer.popen.poll() is not None or time.monotonic() > deadline:
                    log = self.delayer.log.read_text() if self.delayer.log else ""
                    raise RuntimeError(f"the NFQUEUE delayer did not start: {log[-2000:]}")
                time.sleep(0.05)
            for chain, flag in (("OUTPUT", "-o"), ("INPUT", "-i")):
                self.sh(
                    self.client_ns,
                    "iptables",
                    "-w",
                    "-A",
                    chain,
                    flag,
                    self.client_dev,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    str(QUEUE_NUM),
                    "--queue-bypass",
                )
        self.scenario = scenario

    # -- measuring the emulation ------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Packets that arrived on each side and packets dropped there (iptables)."""
        result: dict[str, Any] = {}
        for side, ns in (("client", self.client_ns), ("server", self.server_ns)):
            text = self.sh(ns, "iptables", "-w", "-L", "INPUT", "-n", "-v", "-x")
            seen = dropped = 0
            for line in text.splitlines():
                fields = line.split()
                if not fields or not fields[0].isdigit():
                    continue
                if "fpb-count" in line:
                    seen = int(fields[0])
                elif "fpb-drop" in line:
                    dropped = int(fields[0])
            result[side] = {"arrived": seen, "dropped": dropped}
        queue = self.sh(
            self.client_ns, "cat", "/proc/net/netfilter/nfnetlink_queue", check=False
        ).split()
        if len(queue) >= 7:
            # queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped
            result["nfqueue"] = {
                "queued_now": int(queue[2]),
                "queue_dropped": int(queue[5]),
                "user_dropped": int(queue[6]),
            }
        return result

    def ping(self, count: int = 20, interval: float = 0.05) -> dict[str, Any]:
        text = self.sh(
            self.client_ns,
            "ping",
            "-n",
            "-q",
            "-U",
            "-c",
            str(count),
            "-i",
            str(interval),
            "-W",
            "2",
            SERVER_IP,
            check=False,
            timeout=count * interval + 30,
        )
        result: dict[str, Any] = {"sent": count}
        loss = re.search(r"([\d.]+)% packet loss", text)
        if loss:
            result["loss_pct"] = float(loss.group(1))
        rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", text)
        if rtt:
            result.update(
                zip(
                    ("min_ms", "avg_ms", "max_ms", "mdev_ms"), map(float, rtt.groups()), strict=True
                )
            )
        return result

    def tcp_connect(self, port: int, count: int = 20) -> dict[str, Any]:
        code = (
            "import socket,time,json,sys\n"
            "out=[]\n"
            f"for _ in range({count}):\n"
            "    t=time.perf_counter()\n"
            f"    s=socket.create_connection(('{SERVER_IP}',{port}),10)\n"
            "    out.append((time.perf_counter()-t)*1000); s.close(); time.sleep(0.02)\n"
            "print(json.dumps(out))\n"
        )
        text = self.sh(self.client_ns, PYTHON, "-c", code, timeout=count * 12 + 10)
        samples = sorted(json.loads(text))
        return {
            "count": count,
            "min_ms": round(samples[0], 2),
            "median_ms": round(statistics.median(samples), 2),
            "max_ms": round(samples[-1], 2),
        }

    def rate_probe(self, url: str, seconds: float) -> dict[str, Any]:
        """Goodput of one HTTP download over its last 60% (slow start excluded).

        A download that ends sooner is measured from its first byte to its last.
        """
        host_port, _, path = url.split("://", 1)[1].partition("/")
        host, _, port = host_port.partition(":")
        code = (
            "import socket,time,json\n"
            f"s=socket.create_connection(('{host}',{port or 80}),10)\n"
            f"s.sendall(b'GET /{path} HTTP/1.1\\r\\nHost: {host}\\r\\n"
            "Connection: close\\r\\n\\r\\n')\n"
            f"t0=time.monotonic(); end=t0+{seconds}; mark=t0+{seconds * 0.4}\n"
            "total=0; first=None; at_mark=None; s.settimeout(0.5)\n"
            "while True:\n"
            "    now=time.monotonic()\n"
            "    if now>=end: break\n"
            "    if at_mark is None and now>=mark: at_mark=(now,total)\n"
            "    try: d=s.recv(262144)\n"
            "    except socket.timeout: continue\n"
            "    if not d: break\n"
            "    if first is None: first=(time.monotonic(),len(d))\n"
            "    total+=len(d)\n"
            "now=time.monotonic()\n"
            "m=at_mark if at_mark and total>at_mark[1] else (first or (t0,0))\n"
            "print(json.dumps([total,now-t0,(total-m[1])*8/max(now-m[0],1e-6)/1e6]))\n"
        )
        text = self.sh(self.client_ns, PYTHON, "-c", code, timeout=seconds + 30)
        size, elapsed, mbit = json.loads(text)
        return {
            "bytes": int(size),
            "seconds": round(elapsed, 2),
            "goodput_mbit": round(mbit, 2),
        }

    def verify(self, port: int, probe_url: str) -> dict[str, Any]:
        """Measure RTT, rate and loss of the current scenario; print and return them."""
        scenario = self.scenario
        assert scenario is not None
        before = self.counters()
        ping = self.ping()
        connect = self.tcp_connect(port, 20 if scenario.delay_ms < 50 else 10)
        probe_s = {"poor": 4.0, "very_poor": 6.0}.get(scenario.name, 3.0)
        rate = self.rate_probe(probe_url, probe_s)
        after = self.counters()
        drops: dict[str, Any] = {}
        for side in ("client", "server"):
            arrived = after[side]["arrived"] - before[side]["arrived"]
            dropped = after[side]["dropped"] - before[side]["dropped"]
            drops[side] = {
                "arrived": arrived,
                "dropped": dropped,
                "drop_pct": round(dropped / arrived * 100, 2) if arrived else None,
            }
        loss_ok = scenario.loss == 0 or all(d["dropped"] > 0 for d in drops.values())
        low, high = scenario.rtt_range_ms
        rtt_ok = "avg_ms" in ping and low * 0.9 <= ping["avg_ms"] <= high * 1.25 + 2
        # one flow on a lossy long link does not fill it; a missing or broken shaper shows
        if scenario.rate_mbit:
            rate["of_nominal"] = round(rate["goodput_mbit"] / scenario.rate_mbit, 3)
            rate_ok = 0.6 <= rate["of_nominal"] <= 1.05
        else:
            rate["of_nominal"] = None
            rate_ok = True
        report = {
            "scenario": scenario.name,
            "target": scenario.describe(),
            "method": self.method,
            "ping": ping,
            "tcp_connect": connect,
            "rate_probe": rate,
            "drops": drops,
            "nfqueue": after.get("nfqueue"),
            "checks": {"rtt": rtt_ok, "rate": rate_ok, "loss_counter_moved": loss_ok},
        }
        print(self.format_verification(report), file=self.log, flush=True)
        return report

    @staticmethod
    def format_verification(report: dict[str, Any]) -> str:
        ping, connect, rate, drops = (
            report[k] for k in ("ping", "tcp_connect", "rate_probe", "drops")
        )
        checks = ", ".join(f"{k} {'ok' if v else 'OFF'}" for k, v in report["checks"].items())
        lines = [
            f"  emulation [{report['method']}] target: {report['target']}",
            f"    ping: {ping.get('min_ms')}/{ping.get('avg_ms')}/{ping.get('max_ms')} ms "
            f"min/avg/max, {ping.get('loss_pct')}% lost of {ping['sent']}",
            f"    tcp connect: {connect['min_ms']}/{connect['median_ms']}/{connect['max_ms']} ms "
            f"min/median/max of {connect['count']}",
            f"    rate probe: {rate['goodput_mbit']} Mbit/s goodput"
            + (f" ({rate['of_nominal']:.2f}x nominal)" if rate["of_nominal"] else "")
            + ", one download "
            f"({rate['bytes']} bytes in {rate['seconds']} s, slow start left out)",
            "    drops: "
            + "; ".join(
                f"{side} side {d['dropped']} of {d['arrived']} ({d['drop_pct']}%)"
                for side, d in drops.items()
            ),
            f"    checks: {checks}",
        ]
        if report.get("nfqueue"):
            lines.insert(-1, f"    nfqueue: {report['nfqueue']}")
        return "\n".join(lines)


def write_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as sink:
        left = size
        while left > 0:
            sink.write(block[: min(left, len(block))])
            left -= len(block)


def cleanup_stale() -> list[str]:
    """Delete fpb<pid>c/s/x namespaces whose creating process is gone (it was SIGKILLed).

    Only namespaces this module names (fpb<digits><c|s|x>) of a pid that no longer
    exists; the processes still inside them are killed first.
    """
    removed = []
    listing = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    for line in listing:
        name = line.split(" ", 1)[0]
        found = re.fullmatch(r"fpb(\d+)[csx]", name)
        if not found or Path(f"/proc/{found.group(1)}").exists():
            continue
        for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*sorted(SCENARIOS), "cleanup-stale"])
    parser.add_argument("--hold", type=float, default=0, help="seconds to keep it up")
    args = parser.parse_args()
    if args.scenario == "cleanup-stale":
        print("removed:", " ".join(cleanup_stale()) or "nothing")
        return
    bed = Testbed()
    try:
        bed.setup()
        www = bed.workdir / "www"
        www.mkdir()
        write_file(www / "64m.bin", 64 << 20)
        conf = bed.workdir / "nginx.conf"
        conf.write_text(
            f"daemon off; user root; worker_processes 1; pid {bed.workdir}/nginx.pid;\n"
            f"error_log {bed.workdir}/nginx-error.log; events {{}}\n"
            f"http {{ access_log off; sendfile on; server {{ listen 8080; root {www}; }} }}\n"
        )
        bed.spawn(
            bed.server_ns,
            "nginx",
            [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(bed.workdir)],
        )
        time.sleep(0.5)
        bed.apply(SCENARIOS[args.scenario])
        print(json.dumps(asdict(SCENARIOS[args.scenario])))
        bed.verify(8080, f"http://{SERVER_IP}:8080/64m.bin")
        if args.hold:
            print(f"holding {args.hold:g} s: ip netns exec {bed.client_ns} ... ", flush=True)
            time.sleep(args.hold)
        bed.clear()
    finally:
        bed.teardown()


if __name__ == "__main__":
    main()
