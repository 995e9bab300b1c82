"""bench.cache_eviction: the trace is seeded and the replay counts what it should."""

from __future__ import annotations

import pytest

from bench.cache_eviction import SIZE_MAX, SIZE_MIN, Trace, replay, zipf_trace
from fileproxy.cache.eviction import EVICTION_POLICIES


def test_trace_is_seeded_zipf_with_clipped_log_normal_sizes() -> None:
    trace = zipf_trace(5000, 500, 1.0, seed=7)
    assert trace == zipf_trace(5000, 500, 1.0, seed=7)
    assert trace != zipf_trace(5000, 500, 1.0, seed=8)
    assert all(SIZE_MIN <= s <= SIZE_MAX for s in trace.sizes)
    counts = [trace.keys.count(k) for k in (0, 1, 9)]
    assert counts[0] > counts[1] > counts[2]  # rank 1 the most popular


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_replay_counts_hits_and_bytes(name: str) -> None:
    trace = Trace(keys=[0, 1, 0, 2, 0, 1], sizes=[10, 20, 30])
    everything = replay(name, trace, budget=60)
    assert (everything.hits, everything.bytes_hit, everything.bytes_requested) == (3, 40, 100)
    # an object larger than the budget is never admitted
    too_small = replay(name, trace, budget=5)
    assert (too_small.hits, too_small.bytes_hit) == (0, 0)
