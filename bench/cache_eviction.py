"""Eviction policies replayed on a synthetic Zipf trace of files of mixed size.

Seeded traces (one per seed): ``--requests`` requests over ``--objects`` objects whose popularity
follows Zipf(``alpha``) (independent reference model), each object's size drawn once
from a log-normal (median 1 MiB, sigma 2: a few KiB to hundreds of MiB, clipped to
4 KiB .. 512 MiB) independently of its popularity. Each policy of
``fileproxy.cache.eviction`` replays it for budgets that are fractions of the working
set (the bytes of all distinct objects requested): a request for a held object is a
hit; a miss admits the object (unless it alone exceeds the budget) and evicts until the
budget holds. The whole trace counts, cold start included.

Byte-hit ratio is the figure that matters for a cache in front of a backend with poor
I/O (bytes the backend does not send); request-hit ratio is beside it.

    .venv/bin/python -m bench.cache_eviction [--requests 100000] [--objects 10000]
        [--alphas 0.8,1.0] [--budgets 0.01,0.05,0.1,0.25] [--seeds 1,2,3,4,5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path

from fileproxy.cache.eviction import DEFAULT_EVICTION, EVICTION_POLICIES, new_eviction_policy

KIB = 1024
MIB = 1024 * KIB
SIZE_MEDIAN = 1 * MIB
SIZE_SIGMA = 2.0
SIZE_MIN = 4 * KIB
SIZE_MAX = 512 * MIB


@dataclass(frozen=True)
class Trace:
    keys: list[int]
    sizes: list[int]  # by key

    @property
    def working_set(self) -> int:
        return sum(self.sizes[k] for k in set(self.keys))


@dataclass(frozen=True)
class Replay:
    policy: str
    budget: int
    requests: int
    hits: int
    bytes_requested: int
    bytes_hit: int
    cpu_s: float

    @property
    def request_hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.bytes_hit / self.bytes_requested if self.bytes_requested else 0.0


def zipf_trace(requests: int, objects: int, alpha: float, seed: int) -> Trace:
    rng = random.Random(seed)
    sizes = [
        int(min(max(rng.lognormvariate(math.log(SIZE_MEDIAN), SIZE_SIGMA), SIZE_MIN), SIZE_MAX))
        for _ in range(objects)
    ]
    cum_weights = list(accumulate(1.0 / (rank + 1) ** alpha for rank in range(objects)))
    keys = rng.choices(range(objects), cum_weights=cum_weights, k=requests)
    return Trace(keys, sizes)


def replay(policy_name: str, trace: Trace, budget: int) -> Replay:
    policy = new_eviction_policy(policy_name)
    hits = bytes_hit = bytes_requested = 0
    started = time.process_time()
    for key in trace.keys:
        size = trace.sizes[key]
        bytes_requested += size
        hashable: Hashable = key
        if policy.hit(hashable):
            hits += 1
            bytes_hit += size
        elif size <= budget:
            policy.admit(hashable, size)
            policy.evict(budget)
    cpu = time.process_time() - started
    return Replay(policy_name, budget, len(trace.keys), hits, bytes_requested, bytes_hit, cpu)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def cell(values: Sequence[float]) -> str:
    """Mean in percent, with the range over seeds when there are several."""
    text = f"{100 * mean(values):.1f}"
    if len(values) > 1:
        text += f" ({100 * min(values):.1f}-{100 * max(values):.1f})"
    return text


def run(args: argparse.Namespace, argv: Sequence[str]) -> str:
    policies = sorted(EVICTION_POLICIES)
    seeds = args.seeds
    lines = [
        "# Cache eviction: byte-hit and request-hit ratio on a synthetic Zipf trace",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}; "
        f"Python {platform.python_version()}",
        f"- command: `{shlex.join(['.venv/bin/python', '-m', 'bench.cache_eviction', *argv])}`",
        f"- trace: {args.requests:,} requests over {args.objects:,} objects, Zipf, seeds "
        f"{', '.join(map(str, seeds))} (one trace each); sizes log-normal (median 1 MiB, "
        f"sigma {SIZE_SIGMA}, {SIZE_MIN // KIB} KiB .. {SIZE_MAX // MIB} MiB), independent "
        "of popularity; budgets are fractions of each trace's working set; cold start "
        "included",
        "- cells: mean over the seeds in percent (min-max); the delta is against LRU on the "
        "same traces, in percentage points",
        "",
    ]
    wins: dict[str, int] = dict.fromkeys(policies, 0)
    for alpha in args.alphas:
        traces = [zipf_trace(args.requests, args.objects, alpha, seed) for seed in seeds]
        sets = [t.working_set for t in traces]
        lines += [
            f"## alpha {alpha}: working set {gib(min(sets))} .. {gib(max(sets))}",
            "",
            "| budget | policy | byte-hit % | vs LRU | request-hit % | vs LRU | CPU s/trace |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for fraction in args.budgets:
            results = {
                name: [replay(name, t, int(t.working_set * fraction)) for t in traces]
                for name in policies
            }
            for i in range(len(traces)):
                best = max(policies, key=lambda name: results[name][i].byte_hit_ratio)
                wins[best] += 1
            lru_bytes = mean([r.byte_hit_ratio for r in results["lru"]])
            lru_requests = mean([r.request_hit_ratio for r in results["lru"]])
            for name in policies:
                rs = results[name]
                byte_hits = [r.byte_hit_ratio for r in rs]
                request_hits = [r.request_hit_ratio for r in rs]
                lines.append(
                    f"| {fraction:.0%} | {name} | {cell(byte_hits)} "
                    f"| {100 * (mean(byte_hits) - lru_bytes):+.1f} "
                    f"| {cell(request_hits)} "
                    f"| {100 * (mean(request_hits) - lru_requests):+.1f} "
                    f"| {mean([r.cpu_s for r in rs]):.2f} |"
                )
            print(f"alpha {alpha} budget {fraction:.0%}: done", file=sys.stderr)
        lines.append("")
    lines += [
        "## Best byte-hit ratio, counted per trace and budget",
        "",
        ", ".join(f"{name}: {count}" for name, count in sorted(wins.items()))
        + f" (the cache's default, `DEFAULT_EVICTION`, is `{DEFAULT_EVICTION}`)",
        "",
    ]
    return "\n".join(lines)


def parse_floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--alphas", type=parse_floats, default=[0.8, 1.0])
    parser.add_argument("--budgets", type=parse_floats, default=[0.01, 0.05, 0.1, 0.25])
    parser.add_argument("--seeds", type=parse_ints, default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    text = run(args, argv)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
