"""The send timeout's rule, exact: progress is the buffer shrinking; none for the timeout
while bytes wait is a stall; an empty buffer ends the watch."""

from __future__ import annotations

from fileproxy.adaptive.send_watch import SendVerdict, SendWatch


def test_nothing_buffered_needs_no_watch() -> None:
    watch = SendWatch(2.0)
    assert watch.start(10.0, 0) is None
    assert not watch.watching


def test_a_buffer_that_never_shrinks_is_a_stall_after_the_timeout() -> None:
    watch = SendWatch(2.0)
    assert watch.start(10.0, 5000) == 12.0
    assert watch.start(11.0, 9000) == 12.0  # already watching: its own time kept
    assert watch.check(11.5, 9000) == SendVerdict(False, 12.0)
    assert watch.check(12.0, 9000) == SendVerdict(True, None)


def test_progress_starts_the_timeout_again() -> None:
    watch = SendWatch(2.0)
    watch.start(10.0, 5000)
    assert watch.check(12.0, 4000) == SendVerdict(False, 14.0)
    assert watch.check(14.0, 4000) == SendVerdict(True, None)


def test_a_buffer_that_grew_counts_progress_from_its_new_size() -> None:
    watch = SendWatch(2.0)
    watch.start(10.0, 5000)
    assert watch.check(11.0, 8000) == SendVerdict(False, 12.0)  # more written, none taken
    assert watch.check(12.0, 7000) == SendVerdict(False, 14.0)  # then some taken


def test_an_emptied_buffer_ends_the_watch() -> None:
    watch = SendWatch(2.0)
    watch.start(10.0, 5000)
    assert watch.check(13.0, 0) == SendVerdict(False, None)
    assert not watch.watching
    assert watch.start(20.0, 100) == 22.0  # a new wait, a new watch
