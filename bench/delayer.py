"""NFQUEUE packet delayer: delay +- jitter, first-in-first-out per flow.

The kernel here has no netem qdisc, so delay and jitter are emulated in user
space: iptables sends every packet of the benchmark link to an NFQUEUE
(``-j NFQUEUE --queue-num N --queue-bypass``), and this program gives each
packet a release time ``now + delay + uniform(-jitter, +jitter)`` and accepts
it when that time has come. A packet is never released before an earlier
packet of the same flow (same addresses, ports and protocol, one direction),
so TCP sees jitter but no reordering: one global queue would pile the delays
toward the maximum for everybody, per-flow order only within a flow.

One thread, no asyncio: poll() on the queue's netlink socket with the time to
the next release as timeout, read every pending packet without blocking, then
accept every packet whose time has come. Only the first 64 bytes of each packet
are copied to user space (enough for the IPv4 and TCP/UDP headers).

On SIGTERM/SIGINT it accepts what it still holds, prints one JSON line of
statistics on stdout and exits 0.

    ip netns exec NS python -m bench.delayer --queue 1 --delay-ms 75 --jitter-ms 25
"""

from __future__ import annotations

import argparse
import collections
import errno
import heapq
import json
import random
import select
import signal
import socket
import sys
import time
import warnings
from typing import Any

from netfilterqueue import COPY_META, COPY_PACKET, NetfilterQueue, Packet

COPY_RANGE = 64
MAX_QUEUE = 200_000
RCVBUF = 64 * 1024 * 1024
BATCH = 256  # packets read per pass before due packets are released again
EARLY_S = 0.0005  # poll() sleeps whole milliseconds: release up to 0.5 ms early, on average on time


class _BoundedSocket:
    """A non-blocking socket whose recv() reports EAGAIN after `budget` reads.

    NetfilterQueue.run_socket() reads until EAGAIN; under a packet flood that
    would starve the releases, so each pass reads at most BATCH packets.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.budget = 0
        self.enobufs = 0  # the kernel could not queue a packet to us (it was dropped)

    def recv(self, size: int) -> bytes:
        if self.budget <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.budget -= 1
        try:
            return self.sock.recv(size)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.enobufs += 1
            raise


class Delayer:
    def __init__(self, delay_s: float, jitter_s: float, seed: int) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.rng = random.Random(seed)
        self.heap: list[tuple[float, int, Packet]] = []
        self.last_release: dict[bytes, float] = {}
        self.seq = 0
        self.packets = 0
        self.max_backlog = 0
        self.late_sum = 0.0
        self.late_max = 0.0
        self.delay_sum = 0.0
        self.clamped = 0

    def on_packet(self, packet: Packet) -> None:
        now = time.monotonic()
        payload = packet.get_payload()
        if len(payload) >= 20 and payload[0] >> 4 == 4:
            ihl = (payload[0] & 0x0F) * 4
            # protocol, source and destination address, then both ports (TCP/UDP)
            key = payload[9:10] + payload[12:20] + payload[ihl : ihl + 4]
        else:
            key = b""
        delay = self.delay_s
        if self.jitter_s:
            delay += self.rng.uniform(-self.jitter_s, self.jitter_s)
        release = now + delay
        previous = self.last_release.get(key)
        if previous is not None and previous > release:
            release = previous
            self.clamped += 1
        self.last_release[key] = release
        self.delay_sum += release - now
        self.seq += 1
        heapq.heappush(self.heap, (release, self.seq, packet))
        self.packets += 1
        if len(self.heap) > self.max_backlog:
            self.max_backlog = len(self.heap)

    def release_due(self) -> float | None:
        """Accept every due packet; seconds until the next one (None: nothing held)."""
        heap = self.heap
        now = time.monotonic()
        horizon = now + EARLY_S
        while heap and heap[0][0] <= horizon:
            release, _, packet = heapq.heappop(heap)
            late = now - release
            self.late_sum += late
            if late > self.late_max:
                self.late_max = late
            packet.accept()
        if len(self.last_release) > 50_000:
            self.last_release = {k: v for k, v in self.last_release.items() if v > now}
        return heap[0][0] - now if heap else None

    def flush(self) -> None:
        while self.heap:
            heapq.heappop(self.heap)[2].accept()

    def stats(self) -> dict[str, Any]:
        n = max(self.packets, 1)
        return {
            "packets": self.packets,
            "max_backlog": self.max_backlog,
            "mean_delay_ms": round(self.delay_sum / n * 1000, 3),
            "mean_late_ms": round(self.late_sum / n * 1000, 3),
            "max_late_ms": round(self.late_max * 1000, 3),
            "fifo_clamped": self.clamped,
        }


class ConstantDelayer(Delayer):
    """No jitter: arrival order is release order, so one FIFO keeps every flow's order.

    No header parsing, no per-flow table, no heap, and the kernel copies no
    payload (COPY_META): about a third less CPU per packet on the 1 Gbit/s link.
    """

    def __init__(self, delay_s: float, seed: int) -> None:
        super().__init__(delay_s, 0.0, seed)
        self.fifo: collections.deque[tuple[float, Packet]] = collections.deque()

    def on_packet(self, packet: Packet) -> None:
        self.fifo.append((time.monotonic() + self.delay_s, packet))
        self.packets += 1

    def release_due(self) -> float | None:
        fifo = self.fifo
        if len(fifo) > self.max_backlog:
            self.max_backlog = len(fifo)
        now = time.monotonic()
        horizon = now + EARLY_S
        while fifo and fifo[0][0] <= horizon:
            release, packet = fifo.popleft()
            late = now - release
            self.late_sum += late
            if late > self.late_max:
                self.late_max = late
            packet.accept()
        return fifo[0][0] - now if fifo else None

    def flush(self) -> None:
        while self.fifo:
            self.fifo.popleft()[1].accept()

    def stats(self) -> dict[str, Any]:
        self.delay_sum = self.delay_s * self.packets
        return super().stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=1)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.jitter_ms > args.delay_ms:
        parser.error("--jitter-ms must not exceed --delay-ms")

    delayer: Delayer
    if args.jitter_ms:
        delayer = Delayer(args.delay_ms / 1000, args.jitter_ms / 1000, args.seed)
        mode = COPY_PACKET
    else:
        delayer = ConstantDelayer(args.delay_ms / 1000, args.seed)
        mode = COPY_META
    queue = NetfilterQueue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf size notice
        queue.bind(
            args.queue,
            delayer.on_packet,
            max_len=MAX_QUEUE,
            mode=mode,
            range=COPY_RANGE,
            sock_len=RCVBUF,
        )
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    nl_sock = socket.socket(fileno=queue.get_fd())
    nl_sock.setblocking(False)
    reader = _BoundedSocket(nl_sock)
    poller = select.poll()
    poller.register(queue.get_fd(), select.POLLIN)
    cpu_started = time.process_time()
    print(json.dumps({"ready": True, "queue": args.queue}), flush=True)
    try:
        wait: float | None = None
        while not stopping:
            # poll() rounds its timeout up to whole milliseconds
            timeout_ms = 200.0 if wait is None else max((wait - EARLY_S) * 1000, 0.0)
            try:
                events = poller.poll(timeout_ms)
            except InterruptedError:
                events = []
            if events:
                reader.budget = BATCH
                queue.run_socket(reader)
            wait = delayer.release_due()
    finally:
        delayer.flush()
        queue.unbind()
        nl_sock.detach()
        stats = delayer.stats()
        stats["enobufs"] = reader.enobufs
        stats["cpu_s"] = round(time.process_time() - cpu_started, 3)
        print(json.dumps(stats), flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
