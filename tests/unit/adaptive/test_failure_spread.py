"""FailureSpread: one exact test per rule (issue 20.1: one path's failures are its own)."""

from __future__ import annotations

from fileproxy.adaptive.failure_spread import FailureSpread, SpreadConfig


def spread(**changes: object) -> FailureSpread:
    return FailureSpread(SpreadConfig(**changes))  # type: ignore[arg-type]


def feed(s: FailureSpread, now: float, path: str, ok: int = 0, failed: int = 0) -> None:
    for _ in range(ok):
        s.answered(now, path)
    for _ in range(failed):
        s.fail(now, path)


def test_a_path_failing_while_the_others_answer_is_isolated():
    s = spread()
    feed(s, 0.1, "/get", ok=1)
    feed(s, 0.2, "/status/503", failed=3)
    assert s.isolated(0.3) == {"/status/503"}
    assert s.settle(0.3) == 0
    assert (s.counted, s.discounted) == (0, 3)


def test_fewer_than_min_failures_count():
    s = spread()
    feed(s, 0.1, "/get", ok=10)
    feed(s, 0.2, "/file-1", failed=2)
    assert s.isolated(0.3) == frozenset()
    assert s.settle(0.3) == 2


def test_a_path_failing_under_90_percent_is_no_suspect():
    s = spread()
    feed(s, 0.1, "/get", ok=100)
    feed(s, 0.2, "/hot", failed=8)
    s.answered(0.2, "/hot")  # 8 of 9: 88.9 % (a path is tracked from its first failure)
    assert s.settle(0.3) == 8
    feed(s, 0.4, "/hot", failed=1)  # 9 of 10: 90 %
    assert s.settle(0.5) == 1 - 1  # now a suspect: isolated


def test_with_no_other_path_answering_the_failures_count():
    s = spread()
    feed(s, 0.1, "/busy", failed=50)  # only path requested: nothing tells it apart
    assert s.settle(0.2) == 50
    feed(s, 0.3, "/get", failed=5)
    feed(s, 0.3, "/busy", failed=50)  # every path fails: the upstream's failures
    assert s.settle(0.4) == 55


def test_the_others_must_fail_at_most_half():
    s = spread()
    feed(s, 0.1, "/busy", failed=20)
    feed(s, 0.1, "/a", ok=1)
    feed(s, 0.1, "/b", failed=1)  # the rest: 1 of 2 failed, 50 %: they answer
    assert s.settle(0.2) == 1  # /b is no suspect (1 failure) and counts; /busy does not
    feed(s, 0.3, "/c", failed=1)  # the rest: 2 of 3 failed
    feed(s, 0.3, "/busy", failed=1)
    assert s.settle(0.4) == 2


def test_transport_failures_are_the_rests_failures_but_never_pending():
    s = spread()
    feed(s, 0.1, "/busy", failed=10)
    s.answered(0.1, "/get")
    for _ in range(2):
        s.fail(0.1, "/slow", pending=False)  # timeouts: counted by the shell already
    assert s.settle(0.2) == 10  # the rest fails 2 of 3: the upstream struggles


def test_the_horizon_is_two_buckets():
    s = spread(bucket_s=1.0)
    feed(s, 0.5, "/get", ok=1)
    feed(s, 1.5, "/busy", failed=3)  # the answer is one bucket back: still seen
    assert s.isolated(1.6) == {"/busy"}
    feed(s, 3.1, "/busy", failed=3)  # two buckets later the answer is gone
    assert s.isolated(3.2) == frozenset()
    assert s.settle(3.2) == 6  # the pending failures are weighed when settled


def test_paths_are_bounded_and_forgotten_once_they_stop_failing():
    s = spread(max_paths=2)
    feed(s, 0.1, "/a", failed=1)
    feed(s, 0.1, "/b", failed=1)
    feed(s, 0.1, "/c", failed=1)
    assert s.snapshot()["paths_tracked"] == 2  # /a evicted
    s.settle(0.1)
    s.answered(2.5, "/get")  # two buckets later: nothing failed lately
    assert s.snapshot()["paths_tracked"] == 0


def test_failing_names_a_suspect_path_even_with_nothing_else_answering():
    s = spread()
    feed(s, 0.1, "/status/503", failed=3)
    assert s.failing(0.2, "/status/503")  # alone: a suspect, though not isolated
    assert s.isolated(0.2) == frozenset()
    assert not s.failing(0.2, "/get")
    feed(s, 0.3, "/half", failed=3)
    s.answered(0.3, "/half")  # 3 of 4: under 90 %
    assert not s.failing(0.3, "/half")
    assert not s.failing(2.5, "/status/503")  # two buckets later: forgotten
