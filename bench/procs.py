"""Memory and CPU of process groups, read from /proc (every contender runs in its own group),
and the free loopback port every bench script starts its processes on."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Until something accepts connections on 127.0.0.1:``port``; else the bench stops."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _group_stats(pgid: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, /proc/pid/stat fields after the command) of every live process in a group."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        # fields[0] is state (field 3): pgrp is field 5, utime 14, stime 15
        if int(fields[2]) == pgid:
            yield int(entry.name), fields


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in a process group."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in _group_stats(pgid))
    return ticks / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def group_pids(pgid: int) -> list[int]:
    return [pid for pid, _ in _group_stats(pgid)]


def group_memory(pgid: int, pss: bool = False) -> dict[str, Any]:
    """RSS summed over every live process of a group (bytes); PSS too when asked.

    RSS counts pages shared by forked workers once per process; PSS divides them
    among the sharers (slower to read: /proc/PID/smaps_rollup).
    """
    out: dict[str, Any] = {"rss": 0, "processes": 0, "per_process": []}
    if pss:
        out["pss"] = 0
    for pid in sorted(group_pids(pgid)):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    out["rss"] += rss
                    out["per_process"].append(rss)
                    out["processes"] += 1
                    break
            if pss:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        out["pss"] += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return out


class PeakMemory:
    """Samples the summed RSS of a process group every `period` s in a thread; keeps the peak."""

    def __init__(self, pgid: int, period: float = 0.25) -> None:
        self.pgid = pgid
        self.period = period
        self.start_rss = group_memory(pgid)["rss"]
        self.peak_rss = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak_rss = max(self.peak_rss, group_memory(self.pgid)["rss"])

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end_rss = group_memory(self.pgid)["rss"]
        self.peak_rss = max(self.peak_rss, self.end_rss)

    def result(self) -> dict[str, float]:
        mib = 1 << 20
        return {
            "start_mib": round(self.start_rss / mib, 1),
            "peak_mib": round(self.peak_rss / mib, 1),
            "end_mib": round(self.end_rss / mib, 1),
        }
