"""UpstreamAdaptation's sampling of the upstream socket, with time passed in."""

from fileproxy.adaptation import TRANSPORT_SAMPLE_INTERVAL_S, UpstreamAdaptation
from fileproxy.adaptive import TcpInfo
from fileproxy.settings import Settings
from fileproxy.state_store import EmbeddedStore
from fileproxy.store_link import StoreLink


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
