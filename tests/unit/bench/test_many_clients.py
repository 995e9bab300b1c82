"""bench.many_clients: what each download's outcome is called in the ``many`` rows."""

from __future__ import annotations

import pytest

from bench.many_clients import kind
from bench.slow_clients import Download

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("download", "expected"),
    [
        (Download(status=200, length=10, received=10, sha256=SHA), "ok"),
        (Download(status=200, length=10, received=10, sha256="00" * 32), "bytes"),
        (Download(status=504, length=160, received=160, sha256="x"), "status_504"),
        (Download(status=200, length=10, received=4, error="short body: 4 of 10"), "short_body"),
        (Download(status=200, received=4, error="not done after 120 s (4 bytes)"), "timeout"),
        (Download(error="closed before the response head"), "no_head"),
        (Download(error="ConnectionResetError: [Errno 104] Connection reset by peer"), "reset"),
        (Download(error="BrokenPipeError: [Errno 32] Broken pipe"), "reset"),
        (Download(error="ConnectionRefusedError: [Errno 111] refused"), "refused"),
        (Download(error="OSError: [Errno 113] No route to host"), "OSError"),
    ],
)
def test_kind(download, expected):
    assert kind(download, SHA) == expected
