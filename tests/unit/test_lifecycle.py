"""Readiness and the cut-off (fileproxy/lifecycle.py): pure, time passed in."""

from __future__ import annotations

from fileproxy import app
from fileproxy.http import access_log
from fileproxy.lifecycle import CUT_OFF_MARGIN_S, Lifecycle


def test_draining_is_not_ready_and_the_cut_off_comes_once():
    state = Lifecycle(last_probe_ok_at=100.0)
    assert state.readiness(101.0, None) == (True, "ok")
    state.start_draining(102.0)
    assert state.readiness(103.0, None) == (False, "draining")
    assert not state.cutting_off
    state.cut_off(109.0)
    state.cut_off(110.0)
    assert state.cutting_off and state.cut_off_at == 109.0


def test_the_margin_before_gunicorns_kill_covers_the_bounded_waits_after_the_cut_off():
    """After the cut a worker still closes its state store and writes its access log,
    each bounded; gunicorn's master must not SIGKILL it in the middle."""
    assert isinstance(CUT_OFF_MARGIN_S, int)  # gunicorn's graceful_timeout: whole seconds
    assert CUT_OFF_MARGIN_S >= app.STOP_TIMEOUT_S + access_log.DRAIN_TIMEOUT_S + 2
