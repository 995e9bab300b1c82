"""When a client that takes none of its bytes is timed out (nginx's ``send_timeout``): pure.

A connection's bytes wait in its transport's write buffer until the kernel takes them,
which it does as the client reads. The buffer shrinking is progress; a buffer that
has not shrunk for ``timeout_s`` while bytes wait means the client stopped reading
(a zero TCP window), and its connection is aborted. A buffer that empties ends the
watch: nothing waits for the client any more.

The shell looks at the buffer when a write waits for the client (the transport paused
writing) or a response ends with bytes still buffered, then at each ``due`` time.
"""

from __future__ import annotations

from typing import NamedTuple


class SendVerdict(NamedTuple):
    stalled: bool  # abort: no byte taken for timeout_s
    due: float | None  # when to look again; None: nothing waits, the watch ends


class SendWatch:
    __slots__ = ("_buffered", "_since", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._since: float | None = None  # when the buffer last shrank (or the watch began)
        self._buffered = 0

    @property
    def watching(self) -> bool:
        return self._since is not None

    def start(self, now: float, buffered: int) -> float | None:
        """Bytes wait for the client: when to look next (None: nothing waits). A watch
        already running keeps its own time."""
        if self._since is None:
            if buffered <= 0:
                return None
            self._since, self._buffered = now, buffered
        return self._since + self.timeout_s

    def check(self, now: float, buffered: int) -> SendVerdict:
        since = self._since
        if since is None or buffered <= 0:
            self._since = None
            return SendVerdict(False, None)
        if buffered < self._buffered:  # the client took some: the timeout starts again
            self._since, self._buffered = now, buffered
            return SendVerdict(False, now + self.timeout_s)
        self._buffered = buffered  # more was written meanwhile: progress counts from here
        if now - since >= self.timeout_s:
            return SendVerdict(True, None)
        return SendVerdict(False, since + self.timeout_s)
