"""ActiveRequestGate: places, first come first served, connections gone while waiting."""

from fileproxy.edge import ActiveRequestGate


class _Connection:
    def __init__(self, name: str, order: list[str], alive: bool = True) -> None:
        self.name, self.order, self.alive = name, order, alive

    def admit(self) -> bool:
        if self.alive:
            self.order.append(self.name)
        return self.alive


def test_places_up_to_the_limit_then_waiting_in_arrival_order():
    gate, order = ActiveRequestGate(2), []
    assert gate.enter() and gate.enter()
    assert not gate.enter()
    for name in "abc":
        gate.wait(_Connection(name, order))
    assert (gate.active, gate.waiting, gate.waited) == (2, 3, 3)
    gate.leave()
    assert order == ["a"] and gate.active == 2
    gate.leave()
    gate.leave()
    assert order == ["a", "b", "c"] and (gate.active, gate.waiting) == (2, 0)
    gate.leave()
    gate.leave()
    assert gate.active == 0
    assert gate.enter()  # free places are taken at once, nobody waiting


def test_a_connection_gone_is_skipped_and_its_place_goes_on():
    gate, order = ActiveRequestGate(1), []
    assert gate.enter()
    gone, kept = _Connection("gone", order, alive=False), _Connection("kept", order)
    left = _Connection("left", order)
    for connection in (gone, left, kept):
        gate.wait(connection)
    gate.forget(left)  # its client went away while it waited
    gate.forget(left)  # twice is harmless
    gate.leave()
    assert order == ["kept"]
    assert (gate.active, gate.waiting) == (1, 0)
