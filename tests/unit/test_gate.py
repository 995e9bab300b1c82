"""ActiveRequestGate: places, first come first served, the upstream hold, gone connections."""

from fileproxy.http.gate import ActiveRequestGate


class _Connection:
    def __init__(self, name: str, order: list[str], alive: bool = True) -> None:
        self.name, self.order, self.alive = name, order, alive

    def go_ahead(self) -> bool:
        if self.alive:
            self.order.append(self.name)
        return self.alive


def _connections(names: str, order: list[str]) -> list[_Connection]:
    return [_Connection(name, order) for name in names]


def test_places_up_to_the_limit_then_waiting_in_arrival_order():
    gate, order = ActiveRequestGate(2, hold_s=0.01), []
    first, second, third, *waiting = _connections("xyzabc", order)
    assert gate.enter(first, 0.0) and gate.enter(second, 0.0)
    assert not gate.enter(third, 0.0)
    for connection in [third, *waiting]:
        gate.wait(connection)
    assert (gate.active, gate.waiting, gate.waited) == (2, 4, 4)
    gate.leave(first)
    assert order == ["z"] and gate.holds(third) and not gate.holds(first)
    gate.leave(first)  # twice: nothing more is let in
    assert order == ["z"]
    for connection in (second, third):
        gate.leave(connection)
    assert order == ["z", "a", "b"] and (gate.active, gate.waiting) == (2, 1)
    assert not gate.enter(_Connection("late", order), 0.0)  # "c" came first


def test_a_request_waiting_on_its_upstream_gives_its_place_back_after_the_hold():
    gate, order = ActiveRequestGate(1, hold_s=0.01), []
    slow, fast = _connections("sf", order)
    assert gate.enter(slow, 0.0)
    gate.wait(fast)
    assert gate.next_check() is None  # the holder is still this worker's work
    gate.upstream_wait(slow, 1.0)
    assert gate.next_check() == 1.01
    gate.expire(1.005)
    assert order == [] and gate.holds(slow)
    gate.expire(1.01)
    assert order == ["f"] and not gate.holds(slow) and gate.holds(fast)
    gate.leave(slow)  # its response head went out later: nothing to give back
    assert gate.holds(fast) and gate.active == 1
    assert gate.next_check() is None  # nobody waits


def test_enter_frees_stale_places_itself():
    gate, order = ActiveRequestGate(1, hold_s=0.01), []
    slow, new = _connections("sn", order)
    assert gate.enter(slow, 0.0)
    gate.upstream_wait(slow, 0.0)
    assert gate.enter(new, 0.02)
    assert gate.holds(new) and not gate.holds(slow)


def test_a_connection_gone_is_skipped_and_its_place_goes_on():
    gate, order = ActiveRequestGate(1), []
    holder, gone, left, kept = _connections("hglk", order)
    gone.alive = False
    assert gate.enter(holder, 0.0)
    for connection in (gone, left, kept):
        gate.wait(connection)
    gate.forget(left)  # its client went away while it waited
    gate.forget(left)  # twice is harmless
    gate.leave(holder)
    assert order == ["k"]
    assert (gate.active, gate.waiting) == (1, 0)
