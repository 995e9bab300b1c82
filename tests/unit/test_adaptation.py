"""UpstreamAdaptation's sampling of the upstream socket (time passed in), what counts as a
limiter error, and who a client is for the fair share."""

import ipaddress

import pytest

from fileproxy.adaptive import Outcome, TcpInfo
from fileproxy.exchange import Exchange
from fileproxy.http.errors import CLIENT_ABORT, OK, SHUTDOWN, TIMEOUT, UPSTREAM_ERROR
from fileproxy.http.headers import client_key
from fileproxy.settings import Settings
from fileproxy.state.adaptation import (
    TRANSPORT_SAMPLE_INTERVAL_S,
    UpstreamAdaptation,
    limiter_outcome,
)
from fileproxy.state.link import StoreLink
from fileproxy.state.store import EmbeddedStore


def _adaptation(**env: str) -> UpstreamAdaptation:
    return UpstreamAdaptation(Settings.from_env(env), "u:1", StoreLink(EmbeddedStore()))


def _reader(reads: list[float]):
    def read() -> TcpInfo:
        reads.append(1.0)
        return TcpInfo(length=232, rtt_us=20_000, min_rtt_us=19_000)

    return read


def test_tcp_info_is_read_at_most_once_per_interval():
    adaptation, reads = _adaptation(), []
    step = TRANSPORT_SAMPLE_INTERVAL_S / 10
    for i in range(100):  # ten intervals, ten responses in each
        adaptation.observe_headers(i * step, 0.01, _reader(reads))
    assert len(reads) == 10
    assert len(adaptation.classifier._transport.samples) == 10
    assert len(adaptation.classifier._http.samples) == 100  # every HTTP RTT counts


def test_a_quiet_worker_reads_every_response():
    adaptation, reads = _adaptation(), []
    for i in range(5):
        adaptation.observe_headers(i * 2 * TRANSPORT_SAMPLE_INTERVAL_S, 0.01, _reader(reads))
    assert len(reads) == 5


def test_optimizer_off_reads_nothing():
    adaptation, reads = _adaptation(FILEPROXY_OPTIMIZER="off"), []
    adaptation.observe_headers(0.0, 0.01, _reader(reads))
    assert reads == []


# -- what counts as an error for the limiter, and who a client is ---------------------


def _exchange(status: int | None, cause: str = OK) -> Exchange:
    exchange = Exchange("r", "u:1")
    exchange.upstream_status = status
    exchange.cause = cause
    return exchange


@pytest.mark.parametrize(
    ("status", "cause", "outcome"),
    [
        (200, OK, Outcome.SUCCESS),
        (404, OK, Outcome.SUCCESS),
        (500, OK, Outcome.SUCCESS),  # one broken URL: the upstream answered
        (501, OK, Outcome.SUCCESS),
        (505, OK, Outcome.SUCCESS),
        (429, OK, Outcome.SUCCESS),  # the backend limiting one user (issue 20.1)
        (502, OK, Outcome.ERROR),
        (503, OK, Outcome.ERROR),
        (504, OK, Outcome.ERROR),
        (None, UPSTREAM_ERROR, Outcome.ERROR),  # connect failure, reset
        (None, TIMEOUT, Outcome.ERROR),
        (200, CLIENT_ABORT, Outcome.IGNORED),
        (None, CLIENT_ABORT, None),
        (200, SHUTDOWN, Outcome.IGNORED),  # cut by the graceful timeout of a stop
    ],
)
def test_only_overload_signals_are_limiter_errors(status, cause, outcome):
    assert limiter_outcome(_exchange(status, cause)) is outcome


def test_the_error_statuses_are_configurable():
    adaptation = _adaptation(FILEPROXY_LIMIT_ERROR_STATUSES="500")
    assert limiter_outcome(_exchange(500), adaptation.error_statuses) is Outcome.ERROR
    assert limiter_outcome(_exchange(503), adaptation.error_statuses) is Outcome.SUCCESS
    assert limiter_outcome(_exchange(None, TIMEOUT), ()) is Outcome.ERROR  # always


def _fed(adaptation: UpstreamAdaptation, now: float, status: int, path: str, n: int) -> None:
    for _ in range(n):
        exchange = _exchange(status)
        exchange.path = path
        adaptation.observe_exchange(now, exchange)


def test_one_paths_503s_while_the_others_answer_are_not_counted():
    """Issue 20.1: the failure statuses wait for the sync, which weighs them."""
    adaptation = _adaptation()
    _fed(adaptation, 10.0, 200, "/get", 5)
    _fed(adaptation, 10.1, 503, "/status/503", 200)
    adaptation._settle(10.2)
    counts = adaptation._take_counts()
    assert (counts.successes, counts.errors, counts.admitted) == (5, 0, 205)
    assert adaptation.snapshot()["limiter"]["failure_statuses"]["discounted"] == 200


def test_503s_everywhere_are_counted():
    adaptation = _adaptation()
    _fed(adaptation, 10.0, 503, "/get", 20)
    _fed(adaptation, 10.1, 503, "/status/503", 200)
    adaptation._settle(10.2)
    counts = adaptation._take_counts()
    assert (counts.successes, counts.errors, counts.admitted) == (0, 220, 220)


def test_transport_failures_count_at_once():
    adaptation = _adaptation()
    _fed(adaptation, 10.0, 200, "/get", 5)
    exchange = _exchange(None, TIMEOUT)
    exchange.path = "/slow"
    adaptation.observe_exchange(10.1, exchange)
    counts = adaptation._take_counts()
    assert (counts.successes, counts.errors, counts.admitted) == (5, 1, 6)


TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "key"),
    [
        ("192.0.2.7", None, "192.0.2.7"),
        ("192.0.2.7", "198.51.100.1", "192.0.2.7"),  # an untrusted peer names nobody
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # the fronting nginx does
        ("127.0.0.1", "203.0.113.9, 198.51.100.1, 10.1.2.3", "198.51.100.1"),  # rightmost
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),  # every hop trusted: the first
        ("127.0.0.1", None, "127.0.0.1"),
        (None, "198.51.100.1", "198.51.100.1"),  # unix socket: a local process
        (None, None, "local"),
        ("127.0.0.1", "x" * 200, "x" * 64),  # bounded
    ],
)
def test_client_key(peer, forwarded, key):
    assert client_key(peer, forwarded, TRUSTED) == key
