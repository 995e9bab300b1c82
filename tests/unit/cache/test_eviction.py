"""Eviction policies: exact victim sequences for small hand traces, and the interface's
invariants (bytes counted, pinned objects never victims) over random operations."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fileproxy.cache.eviction import (
    DEFAULT_EVICTION,
    EVICTION_POLICIES,
    EvictionPolicy,
    LruEviction,
    S3FifoEviction,
    SieveEviction,
    new_eviction_policy,
)


def admit_all(policy: EvictionPolicy[str], keys: str, size: int = 1) -> None:
    for key in keys:
        policy.admit(key, size)


# ---------------------------------------------------------------- LRU


def test_lru_evicts_the_least_recently_used_first() -> None:
    lru: LruEviction[str] = LruEviction()
    admit_all(lru, "abc")
    lru.hit("a")
    lru.admit("d", 1)
    assert lru.evict(3) == ["b"]
    assert lru.evict(1) == ["c", "a"]
    assert list(lru_keys(lru)) == ["d"]
    assert lru.used == 1


def lru_keys(lru: LruEviction[str]) -> list[str]:
    return [k for k in "abcdefg" if k in lru]


def test_lru_counts_bytes_not_objects() -> None:
    lru: LruEviction[str] = LruEviction()
    lru.admit("big", 5)
    lru.admit("x", 1)
    lru.admit("y", 1)
    assert lru.evict(2) == ["big"]
    assert lru.used == 2


def test_lru_skips_pinned_objects_and_stops_when_only_pinned_are_left() -> None:
    lru: LruEviction[str] = LruEviction()
    admit_all(lru, "abc")
    lru.pin("a")
    assert lru.evict(1) == ["b", "c"]
    assert lru.evict(0) == []
    assert lru.used == 1  # over the budget: the shell refuses new fills
    lru.unpin("a")
    assert lru.evict(0) == ["a"]


# ---------------------------------------------------------------- SIEVE


def test_sieve_hand_clears_visited_bits_and_evicts_the_first_unvisited() -> None:
    sieve: SieveEviction[str] = SieveEviction()
    admit_all(sieve, "ABCD")  # oldest A .. newest D
    sieve.hit("A")
    sieve.hit("C")
    # hand from the oldest: A visited (cleared, passed), B not visited: evicted
    assert sieve.evict(3) == ["B"]
    sieve.admit("E", 1)  # A C D E, hand at C
    # C visited (cleared), D evicted; the hand stays where it was, not at the tail
    assert sieve.evict(3) == ["D"]
    sieve.hit("A")
    sieve.admit("F", 1)  # A C E F, hand at E
    assert sieve.evict(2) == ["E", "F"]
    # the hand wraps to the oldest: A visited (cleared), C evicted, wraps again, A evicted
    assert sieve.evict(0) == ["C", "A"]
    assert sieve.used == 0
    assert len(sieve) == 0


def test_sieve_hit_does_not_move_an_object() -> None:
    sieve: SieveEviction[str] = SieveEviction()
    admit_all(sieve, "abc")
    sieve.hit("c")  # the newest; a hit leaves it where it is
    assert sieve.evict(1) == ["a", "b"]


def test_sieve_never_evicts_pinned_objects() -> None:
    sieve: SieveEviction[str] = SieveEviction()
    admit_all(sieve, "abc")
    sieve.pin("a")
    assert sieve.evict(1) == ["b", "c"]
    assert sieve.evict(0) == []
    assert sieve.used == 1
    sieve.unpin("a")
    assert sieve.evict(0) == ["a"]


def test_sieve_remove_under_the_hand_moves_the_hand_on() -> None:
    sieve: SieveEviction[str] = SieveEviction()
    admit_all(sieve, "abcd")
    sieve.hit("a")
    assert sieve.evict(3) == ["b"]  # hand now at c
    assert sieve.remove("c")
    assert sieve.evict(1) == ["d"]  # the hand went on to d, not back to a


# ---------------------------------------------------------------- S3-FIFO


def test_s3fifo_small_fifo_filters_one_hit_wonders_and_promotes_hit_objects() -> None:
    s3: S3FifoEviction[str] = S3FifoEviction()
    admit_all(s3, "abcd")  # all enter the small FIFO
    s3.hit("b")
    s3.admit("e", 1)
    # budget 4: small target 0.4 bytes, small holds 5: its tail a was never hit
    assert s3.evict(4) == ["a"]
    assert s3.queue_of("a") == "ghost"
    s3.admit("f", 1)
    # b was hit while small: it moves to main (not a victim); c leaves
    assert s3.evict(4) == ["c"]
    assert s3.queue_of("b") == "main"
    assert s3.queue_of("c") == "ghost"


def test_s3fifo_ghost_hit_admits_straight_to_main() -> None:
    s3: S3FifoEviction[str] = S3FifoEviction()
    admit_all(s3, "abcd")
    s3.hit("b")
    s3.admit("e", 1)
    assert s3.evict(4) == ["a"]
    s3.admit("f", 1)
    assert s3.evict(4) == ["c"]
    s3.admit("a", 1)  # remembered by the ghost: into main
    assert s3.queue_of("a") == "main"
    assert s3.evict(4) == ["d"]  # small (d e f) is over its share: its tail goes
    s3.hit("a")
    s3.hit("a")
    s3.hit("b")
    s3.admit("g", 1)  # small e f g, main b(1) a(2): 5 bytes
    assert s3.evict(3) == ["e", "f"]
    # small's g goes first; then small is empty: main's tail b has frequency 1 ->
    # reinserted with 0; a has 2 -> reinserted with 1; b again, now 0: evicted
    assert s3.evict(1) == ["g", "b"]
    assert s3.queue_of("a") == "main"
    # the ghost remembers at most 90% of the budget's bytes
    assert s3.queue_of("g") is None


def main_x_then_m(x_hits: int, m_hits: int) -> S3FifoEviction[str]:
    """x and m in the main FIFO (x older), nothing in the small one; budget 3 bytes."""
    s3: S3FifoEviction[str] = S3FifoEviction()
    admit_all(s3, "xmyz")
    assert s3.evict(3) == ["x"]  # small tail, never hit: to the ghost
    s3.admit("x", 1)  # remembered: straight into main
    assert s3.evict(3) == ["m"]
    s3.admit("m", 1)
    assert (s3.queue_of("x"), s3.queue_of("m")) == ("main", "main")
    assert s3.evict(2) == ["y", "z"]  # the small FIFO is over its share: emptied first
    for _ in range(x_hits):
        s3.hit("x")
    for _ in range(m_hits):
        s3.hit("m")
    return s3


def test_s3fifo_main_reinserts_with_one_less_frequency() -> None:
    # x 2 -> 1, m 1 -> 0, x 1 -> 0, m evicted
    assert main_x_then_m(x_hits=2, m_hits=1).evict(1) == ["m"]


def test_s3fifo_frequency_saturates_at_three() -> None:
    # x counted 3, not 10: both go round three times, then x, the older, leaves
    assert main_x_then_m(x_hits=10, m_hits=3).evict(1) == ["x"]


def test_s3fifo_never_evicts_pinned_objects() -> None:
    s3: S3FifoEviction[str] = S3FifoEviction()
    admit_all(s3, "ab")
    s3.pin("a")
    assert s3.evict(1) == ["b"]
    assert s3.evict(0) == []
    assert s3.used == 1
    s3.unpin("a")
    assert s3.evict(0) == ["a"]


# ---------------------------------------------------------------- the interface


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_admit_of_a_known_key_replaces_its_size(name: str) -> None:
    policy = new_eviction_policy(name)
    policy.admit("a", 10)
    policy.admit("a", 3)
    assert policy.used == 3
    assert len(policy) == 1


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_remove_and_hit_of_unknown_keys(name: str) -> None:
    policy = new_eviction_policy(name)
    policy.admit("a", 10)
    assert policy.hit("a") is True
    assert policy.hit("b") is False
    assert policy.remove("a") is True
    assert policy.remove("a") is False
    assert policy.used == 0
    assert "a" not in policy
    assert policy.evict(0) == []


def test_unknown_policy_name_is_refused_and_default_is_known() -> None:
    assert DEFAULT_EVICTION in EVICTION_POLICIES
    with pytest.raises(ValueError, match="unknown eviction policy 'arc'"):
        new_eviction_policy("arc")
    with pytest.raises(ValueError, match="at least 0 bytes"):
        new_eviction_policy("lru").admit("a", -1)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "hit", "remove", "pin", "unpin", "evict"]),
        st.integers(0, 12),
        st.integers(0, 50),
    ),
    max_size=120,
)


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_bytes_add_up_and_pinned_objects_survive(
    name: str, ops: list[tuple[str, int, int]]
) -> None:
    policy: EvictionPolicy[Hashable] = new_eviction_policy(name)
    sizes: dict[int, int] = {}
    pins: dict[int, int] = {}
    for op, key, number in ops:
        if op == "admit":
            policy.admit(key, number)
            sizes[key] = number
        elif op == "hit":
            assert policy.hit(key) is (key in sizes)
        elif op == "remove":
            assert policy.remove(key) is (key in sizes)
            sizes.pop(key, None)
        elif op == "pin":
            policy.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin":
            policy.unpin(key)
            if pins.get(key, 0) <= 1:
                pins.pop(key, None)
            else:
                pins[key] -= 1
        else:
            budget = number * 4
            victims = policy.evict(budget)
            assert len(set(victims)) == len(victims)
            for victim in victims:
                assert victim not in pins
                del sizes[victim]
            assert policy.used <= budget or all(k in pins for k in sizes)
        assert policy.used == sum(sizes.values())
        assert len(policy) == len(sizes)
        assert all(k in policy for k in sizes)


# ---------------------------------------------------------------- state kept in a shared index


OPS_NO_PINS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "hit", "remove", "evict", "handover"]),
        st.integers(0, 12),
        st.integers(0, 50),
    ),
    max_size=120,
)


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
@settings(max_examples=150, deadline=None)
@given(ops=OPS_NO_PINS)
def test_a_restored_snapshot_decides_exactly_as_the_original(
    name: str, ops: list[tuple[str, int, int]]
) -> None:
    """Processes hand the policy's state to each other through the index at any point
    ("handover": snapshot, through JSON's lists, into a fresh policy): the victims never
    differ from one policy kept in memory all along."""
    kept: EvictionPolicy[Hashable] = new_eviction_policy(name)
    handed: EvictionPolicy[Hashable] = new_eviction_policy(name)
    for op, key, number in ops:
        if op == "handover":
            state = [list(entry) for entry in handed.snapshot()]
            handed = new_eviction_policy(name)
            handed.restore(state)
            assert handed.snapshot() == kept.snapshot()
        elif op == "admit":
            kept.admit(key, number)
            handed.admit(key, number)
        elif op == "hit":
            assert kept.hit(key) == handed.hit(key)
        elif op == "remove":
            assert kept.remove(key) == handed.remove(key)
        else:
            assert kept.evict(number * 4) == handed.evict(number * 4)
        assert kept.used == handed.used and len(kept) == len(handed)


def test_snapshots_name_the_queues() -> None:
    s3: S3FifoEviction[str] = S3FifoEviction()
    admit_all(s3, "abc", 10)
    s3.hit("a")
    s3.evict(25)  # a moves to main, b leaves for the ghost
    assert s3.snapshot() == [("small", "c", 10, 0), ("main", "a", 10, 0), ("ghost", "b", 10, 0)]
    sieve: SieveEviction[str] = SieveEviction()
    admit_all(sieve, "ab")
    sieve.hit("a")
    sieve.evict(1)  # a's bit cleared, b evicted; the hand moves past b
    assert sieve.snapshot() == [("fifo", "a", 1, 0)]
    lru: LruEviction[str] = LruEviction()
    admit_all(lru, "ab")
    lru.hit("a")
    assert lru.snapshot() == [("lru", "b", 1, 0), ("lru", "a", 1, 0)]


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_restore_refuses_a_policy_in_use_and_foreign_entries(name: str) -> None:
    policy = new_eviction_policy(name)
    with pytest.raises(ValueError, match="not an entry"):
        policy.restore([("nowhere", "a", 1, 0)])
    with pytest.raises(ValueError, match="not an entry"):
        policy.restore([("lru", "a")])
    policy.admit("a", 1)
    with pytest.raises(ValueError, match="empty"):
        policy.restore(policy.snapshot())
