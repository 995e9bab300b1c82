"""Byte-weighted eviction for a disk index of objects of mixed size; pure (no I/O).

Three policies behind one interface (``EvictionPolicy``):

- ``LruEviction``: least recently used first; the baseline (nginx evicts its cache LRU).
- ``SieveEviction`` (NSDI'24): one FIFO, a visited bit per object, a hand that walks
  from the oldest object toward the newest, clearing bits and evicting the first object
  whose bit is clear; a hit only sets the bit (objects never move).
- ``S3FifoEviction`` (SOSP'23): a small FIFO (10% of the budget's bytes) that new objects
  enter, a main FIFO with a 2-bit frequency and reinsertion, and a ghost FIFO of keys
  recently evicted from the small one (at most 90% of the budget's bytes, as
  libCacheSim's defaults). An object hit while in the small FIFO moves to the main one
  when it reaches the small tail; one never hit leaves (its key goes to the ghost); a
  key admitted again while in the ghost goes straight to the main FIFO.

The shell tells the policy what happened (``admit`` after a fill, ``hit`` on a use,
``remove`` on a purge or invalidation, ``pin``/``unpin`` around a reader holding the
object open) and asks ``evict(budget)`` for victims until ``used <= budget``. Pinned
objects are never victims: when only pinned objects are left, ``evict`` returns what it
could and ``used`` stays above the budget (the shell then refuses new fills: it fails
soft). Sizes are bytes; keys are any hashable value.

``snapshot()`` lists a policy's whole state as plain ``(queue, key, size, mark)`` entries
in order, and ``restore(entries)`` rebuilds it in an empty policy of the same kind: several
processes sharing one disk index keep the policy's state in that index between uses (pins
are not part of the state: they belong to the process holding the reader).

``DEFAULT_EVICTION`` names the policy the cache uses, chosen by ``bench/cache_eviction.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

__all__ = [
    "DEFAULT_EVICTION",
    "EVICTION_POLICIES",
    "EvictionEntry",
    "EvictionPolicy",
    "LruEviction",
    "S3FifoEviction",
    "SieveEviction",
    "new_eviction_policy",
]

K = TypeVar("K", bound=Hashable)

#: one entry of a policy's state: (queue, key, size, mark); the mark is a frequency or a bit
EvictionEntry = tuple[str, K, int, int]

#: S3-FIFO's small queue: this share of the budget's bytes (the paper's 10%)
SMALL_SHARE = 0.10
#: S3-FIFO's ghost queue remembers keys worth this share of the budget's bytes
GHOST_SHARE = 0.90
#: S3-FIFO's frequency counter saturates here (two bits)
MAX_FREQ = 3


class EvictionPolicy(Protocol[K]):
    """What the cache index asks of an eviction policy."""

    @property
    def used(self) -> int:
        """Bytes of the objects held."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    def admit(self, key: K, size: int) -> None:
        """A new object of ``size`` bytes is stored (a known key: its size is replaced)."""
        ...

    def hit(self, key: K) -> bool:
        """``key`` was used; False if it is not held (nothing changes then)."""
        ...

    def remove(self, key: K) -> bool:
        """``key`` is gone (purged, invalidated, replaced); False if it was not held."""
        ...

    def pin(self, key: K) -> None:
        """A reader holds ``key`` open: never evict it until as many ``unpin`` calls."""
        ...

    def unpin(self, key: K) -> None: ...

    def evict(self, budget: int) -> list[K]:
        """Victims, in eviction order, until ``used <= budget`` or only pinned are left."""
        ...

    def snapshot(self) -> list[EvictionEntry[K]]:
        """The whole state (pins aside), in order, for ``restore`` in another process."""
        ...

    def restore(self, entries: Iterable[Sequence[Any]]) -> None:
        """Rebuild the state of ``snapshot`` in this empty policy (ValueError if not empty
        or an entry is not one of this policy's)."""
        ...


class _Pins(Generic[K]):
    """Counts of readers per key (kept apart from membership: a removed key may be pinned)."""

    def __init__(self) -> None:
        self._pins: dict[K, int] = {}

    def pin(self, key: K) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: K) -> None:
        count = self._pins.get(key, 0)
        if count <= 1:
            self._pins.pop(key, None)
        else:
            self._pins[key] = count - 1

    def pinned(self, key: K) -> bool:
        return key in self._pins


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"an object's size is at least 0 bytes, got {size}")


def _entries(
    entries: Iterable[Sequence[Any]], queues: tuple[str, ...], held: int
) -> list[tuple[str, Any, int, int]]:
    """Entries checked for ``restore``: four fields, a known queue, sizes of at least 0."""
    if held:
        raise ValueError("restore needs an empty policy")
    checked = []
    for entry in entries:
        if len(entry) != 4 or entry[0] not in queues:
            raise ValueError(f"not an entry of this policy: {entry!r}")
        queue, key, size, mark = entry
        _check_size(int(size))
        checked.append((str(queue), key, int(size), int(mark)))
    return checked


class LruEviction(Generic[K]):
    """Least recently used first: a hit moves the object to the young end."""

    name = "lru"

    def __init__(self) -> None:
        self._sizes: OrderedDict[K, int] = OrderedDict()  # oldest first
        self._pins: _Pins[K] = _Pins()
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def admit(self, key: K, size: int) -> None:
        _check_size(size)
        self._used += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        self._sizes.move_to_end(key)

    def hit(self, key: K) -> bool:
        if key not in self._sizes:
            return False
        self._sizes.move_to_end(key)
        return True

    def remove(self, key: K) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self._used -= size
        return True

    def pin(self, key: K) -> None:
        self._pins.pin(key)

    def unpin(self, key: K) -> None:
        self._pins.unpin(key)

    def evict(self, budget: int) -> list[K]:
        victims: list[K] = []
        if self._used <= budget:
            return victims
        used = self._used
        for key, size in self._sizes.items():  # oldest first; collect, then remove
            if self._pins.pinned(key):
                continue
            victims.append(key)
            used -= size
            if used <= budget:
                break
        for key in victims:
            del self._sizes[key]
        self._used = used
        return victims

    def snapshot(self) -> list[EvictionEntry[K]]:
        return [("lru", key, size, 0) for key, size in self._sizes.items()]

    def restore(self, entries: Iterable[Sequence[Any]]) -> None:
        for _, key, size, _ in _entries(entries, ("lru",), len(self)):
            self.admit(key, size)


class _Node(Generic[K]):
    __slots__ = ("key", "newer", "older", "size", "visited")

    def __init__(self, key: K, size: int) -> None:
        self.key = key
        self.size = size
        self.visited = False
        self.newer: _Node[K] | None = None
        self.older: _Node[K] | None = None


class SieveEviction(Generic[K]):
    """SIEVE: a FIFO whose hand skips (and clears) visited objects; hits never move."""

    name = "sieve"

    def __init__(self) -> None:
        self._nodes: dict[K, _Node[K]] = {}
        self._newest: _Node[K] | None = None
        self._oldest: _Node[K] | None = None
        self._hand: _Node[K] | None = None
        self._pins: _Pins[K] = _Pins()
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def admit(self, key: K, size: int) -> None:
        _check_size(size)
        node = self._nodes.get(key)
        if node is not None:
            self._used += size - node.size
            node.size = size
            return
        node = _Node(key, size)
        node.older = self._newest
        if self._newest is not None:
            self._newest.newer = node
        self._newest = node
        if self._oldest is None:
            self._oldest = node
        self._nodes[key] = node
        self._used += size

    def hit(self, key: K) -> bool:
        node = self._nodes.get(key)
        if node is None:
            return False
        node.visited = True
        return True

    def remove(self, key: K) -> bool:
        node = self._nodes.pop(key, None)
        if node is None:
            return False
        self._unlink(node)
        return True

    def _unlink(self, node: _Node[K]) -> None:
        if self._hand is node:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._newest = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._oldest = node.newer
        node.newer = node.older = None
        self._used -= node.size

    def pin(self, key: K) -> None:
        self._pins.pin(key)

    def unpin(self, key: K) -> None:
        self._pins.unpin(key)

    def evict(self, budget: int) -> list[K]:
        victims: list[K] = []
        # Each step either evicts or passes one object; two passes without a victim
        # (the first clears every bit) mean only pinned objects are left.
        passes_left = 2 * len(self._nodes)
        while self._used > budget and passes_left > 0:
            node = self._hand or self._oldest
            if node is None:
                break
            if node.visited or self._pins.pinned(node.key):
                node.visited = False
                self._hand = node.newer
                passes_left -= 1
                continue
            self._hand = node.newer
            del self._nodes[node.key]
            self._unlink(node)
            victims.append(node.key)
            passes_left = 2 * len(self._nodes)
        return victims

    def snapshot(self) -> list[EvictionEntry[K]]:
        entries: list[EvictionEntry[K]] = []
        node = self._oldest
        while node is not None:
            entries.append(("fifo", node.key, node.size, int(node.visited)))
            node = node.newer
        if self._hand is not None:
            entries.append(("hand", self._hand.key, 0, 0))
        return entries

    def restore(self, entries: Iterable[Sequence[Any]]) -> None:
        for queue, key, size, mark in _entries(entries, ("fifo", "hand"), len(self)):
            if queue == "hand":
                if key not in self._nodes:
                    raise ValueError(f"the hand points at no object: {key!r}")
                self._hand = self._nodes[key]
                continue
            self.admit(key, size)
            self._nodes[key].visited = bool(mark)


class S3FifoEviction(Generic[K]):
    """S3-FIFO: small FIFO (10% of the bytes), main FIFO with reinsertion, ghost FIFO."""

    name = "s3fifo"

    def __init__(self) -> None:
        self._small: OrderedDict[K, int] = OrderedDict()  # key -> size, oldest first
        self._main: OrderedDict[K, int] = OrderedDict()
        self._freq: dict[K, int] = {}
        self._ghost: OrderedDict[K, int] = OrderedDict()  # key -> size it had
        self._small_used = 0
        self._main_used = 0
        self._ghost_used = 0
        self._pins: _Pins[K] = _Pins()

    @property
    def used(self) -> int:
        return self._small_used + self._main_used

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def queue_of(self, key: K) -> Literal["small", "main", "ghost"] | None:
        """Where ``key`` is (for tests and the benchmark's curiosity)."""
        if key in self._small:
            return "small"
        if key in self._main:
            return "main"
        if key in self._ghost:
            return "ghost"
        return None

    def admit(self, key: K, size: int) -> None:
        _check_size(size)
        if key in self._small:
            self._small_used += size - self._small[key]
            self._small[key] = size
            return
        if key in self._main:
            self._main_used += size - self._main[key]
            self._main[key] = size
            return
        if key in self._ghost:
            self._ghost_used -= self._ghost.pop(key)
            self._main[key] = size
            self._main_used += size
        else:
            self._small[key] = size
            self._small_used += size
        self._freq[key] = 0

    def hit(self, key: K) -> bool:
        freq = self._freq.get(key)
        if freq is None:
            return False
        self._freq[key] = min(freq + 1, MAX_FREQ)
        return True

    def remove(self, key: K) -> bool:
        if self._freq.pop(key, None) is None:
            return False
        if key in self._small:
            self._small_used -= self._small.pop(key)
        else:
            self._main_used -= self._main.pop(key)
        return True

    def pin(self, key: K) -> None:
        self._pins.pin(key)

    def unpin(self, key: K) -> None:
        self._pins.unpin(key)

    def evict(self, budget: int) -> list[K]:
        victims: list[K] = []
        small_target = SMALL_SHARE * budget
        while self.used > budget:
            victim = None
            if self._small_used > small_target or not self._main:
                victim = self._evict_small()
            if victim is None:
                victim = self._evict_main()
            if victim is None and self._small:
                victim = self._evict_small()
            if victim is None:
                break  # only pinned objects are left
            victims.append(victim)
        self._trim_ghost(GHOST_SHARE * budget)
        return victims

    def _evict_small(self) -> K | None:
        """From the small tail: hit ones move to main, the first one never hit leaves."""
        for _ in range(len(self._small)):
            key, size = self._small.popitem(last=False)
            self._small_used -= size
            if self._freq[key] >= 1:
                self._freq[key] = 0
                self._main[key] = size
                self._main_used += size
            elif self._pins.pinned(key):
                self._small[key] = size  # stays, to the young end
                self._small_used += size
            else:
                del self._freq[key]
                self._ghost[key] = size
                self._ghost_used += size
                return key
        return None

    def _evict_main(self) -> K | None:
        """From the main tail: an object with frequency left goes round again, one less."""
        for _ in range((MAX_FREQ + 1) * len(self._main)):
            key, size = self._main.popitem(last=False)
            freq = self._freq[key]
            if freq > 0 or self._pins.pinned(key):
                self._freq[key] = max(freq - 1, 0)
                self._main[key] = size
                continue
            self._main_used -= size
            del self._freq[key]
            return key
        return None

    def _trim_ghost(self, limit: float) -> None:
        while self._ghost and self._ghost_used > limit:
            _, size = self._ghost.popitem(last=False)
            self._ghost_used -= size

    def snapshot(self) -> list[EvictionEntry[K]]:
        entries: list[EvictionEntry[K]] = []
        entries += [("small", key, size, self._freq[key]) for key, size in self._small.items()]
        entries += [("main", key, size, self._freq[key]) for key, size in self._main.items()]
        entries += [("ghost", key, size, 0) for key, size in self._ghost.items()]
        return entries

    def restore(self, entries: Iterable[Sequence[Any]]) -> None:
        held = len(self) + len(self._ghost)
        for queue, key, size, mark in _entries(entries, ("small", "main", "ghost"), held):
            if queue == "ghost":
                self._ghost[key] = size
                self._ghost_used += size
                continue
            if key in self._freq:
                raise ValueError(f"an object held twice: {key!r}")
            if queue == "small":
                self._small[key] = size
                self._small_used += size
            else:
                self._main[key] = size
                self._main_used += size
            self._freq[key] = min(max(mark, 0), MAX_FREQ)


EVICTION_POLICIES: dict[str, Callable[[], EvictionPolicy[Hashable]]] = {
    "lru": LruEviction[Hashable],
    "sieve": SieveEviction[Hashable],
    "s3fifo": S3FifoEviction[Hashable],
}

DEFAULT_EVICTION = "s3fifo"


def new_eviction_policy(name: str = DEFAULT_EVICTION) -> EvictionPolicy[Hashable]:
    """A fresh policy by its name in ``EVICTION_POLICIES``."""
    if name not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy {name!r} (one of {sorted(EVICTION_POLICIES)})")
    return EVICTION_POLICIES[name]()
