"""The server side of one HTTP/1.1 connection as a sans-IO state machine (h11's shape).

The protocol of a client connection feeds it what its C parser saw and what it is
about to write, and asks it what to do: read or pause, which timer to arm, whether the
connection stays open for the next request, closes, or is handed over after a switch.
Nothing here reads a clock, a socket or a byte of a body: bodies are counted, never
held (the data plane forwards them as received).

Two sides, each with its own state and one transition table, as h11's
``_state.py``: the *reader* (the client's requests, ``Reader``) and the *writer* (our
responses, ``Writer``). Unlike h11 the reader may run ahead of the writer: requests
that arrive while a response is in progress are queued as ``Exchange`` records and
answered strictly in order (pipelining); past ``pipeline_limit`` queued requests the
machine says "pause reading". Keep-alive is h11's cycle: the writer ends a response in
``IDLE`` (the next queued request becomes current) or ``MUST_CLOSE``.

The tables (READER_TRANSITIONS, WRITER_TRANSITIONS) in short::

    reader, the client's requests
      IDLE --head_start--> HEAD --head--> BODY --data--> BODY
      BODY --end--> IDLE (keep-alive) | DONE (the last request) | MIGHT_SWITCH (Upgrade, CONNECT)
      MIGHT_SWITCH --101 / 2xx to CONNECT--> SWITCHED | --refused--> IDLE | DONE
      a head refused with 413 / 417 --> DONE; a parse error or refused framing --> ERROR
      eof --> CLOSED; DONE and ERROR absorb whatever the parser still reports
    writer, our responses
      IDLE --a request is queued--> SEND_RESPONSE --1xx--> SEND_RESPONSE
      SEND_RESPONSE --head--> SEND_BODY --data--> SEND_BODY --end--> IDLE | MUST_CLOSE
      SEND_RESPONSE --101 / 2xx to CONNECT--> SWITCHED
      IDLE --the reader is DONE, CLOSED or ERROR--> MUST_CLOSE; abort --> CLOSED

An input a state has no row for is a bug of our own side (the shell fed the machine
wrongly, or tried to send what HTTP forbids): ``LocalProtocolError``, raised before
anything changes. The client's mistakes are never exceptions: they become a refusal
(``Exchange.refusal``, a 4xx/5xx status the shell answers through fileproxy/http/errors.py,
after which the connection closes).

The upstream side reuses the same pieces with the roles swapped: ``request_framing`` and
``response_framing`` classify any message (a backend's response framing depends on the
method of the request it answers, which an upstream connection's queue of sent requests
knows), ``keep_alive_requested`` is the same rule for either direction, and the writer
and reader tables describe a client connection once "request" and "response" trade
places (the upstream connection writes one request, reads 1xx until a final head, reads
its body, and goes back to its pool only on ``IDLE``).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# a Content-Length longer than this is no size anyone sends (and no int we want to build)
MAX_LENGTH_DIGITS = 18


class LocalProtocolError(Exception):
    """Our own side broke HTTP or fed the machine out of order: a bug, never the client's."""


class Sentinel(enum.Enum):
    """An enum hashed by identity: the tables are looked up several times per request, and
    ``Enum.__hash__`` (hash of the name, in Python) would be most of their cost."""

    __hash__ = object.__hash__


class Reader(Sentinel):
    """What the client is sending."""

    IDLE = "idle"  # between requests (nothing of the next one read yet)
    HEAD = "head"  # part of a request head read
    BODY = "body"  # a head read, its body (possibly empty) not yet complete
    MIGHT_SWITCH = "might-switch"  # an Upgrade/CONNECT request read: wait for the answer
    DONE = "done"  # the last request was read; anything more is not parsed
    SWITCHED = "switched"  # the bytes belong to another protocol now
    CLOSED = "closed"  # the client closed its side (EOF)
    ERROR = "error"  # the stream is broken (parse error, refused framing)


class Writer(Sentinel):
    """What we are sending."""

    IDLE = "idle"  # no request to answer yet
    SEND_RESPONSE = "send-response"  # a request is current: its final head not sent yet
    SEND_BODY = "send-body"  # the current response's head sent, its body going out
    MUST_CLOSE = "must-close"  # the last response is complete: close once written
    SWITCHED = "switched"  # a 101 / a CONNECT tunnel: no more HTTP
    CLOSED = "closed"  # the transport is gone (or aborted)


State = TypeVar("State", Reader, Writer)


class Input(Sentinel):
    """What happened, as the transition tables see it."""

    HEAD_START = "head-start"
    HEAD = "head"
    DATA = "data"
    END_KEEP = "end-keep"  # a message ended and another may follow
    END_LAST = "end-last"  # a message ended and the connection closes after it
    END_SWITCH = "end-switch"  # a request ended that asks to switch protocols
    INFORMATIONAL = "informational"
    SWITCH = "switch"
    REFUSE_SWITCH_KEEP = "refuse-switch-keep"
    REFUSE_SWITCH_LAST = "refuse-switch-last"
    REQUEST_QUEUED = "request-queued"
    NOTHING_LEFT = "nothing-left"
    BROKEN = "broken"
    EOF = "eof"
    CLOSE = "close"


class Timer(Sentinel):
    """The one timer the shell arms in the current state."""

    NONE = "none"  # waiting on our own side (the handler, the upstream): its timers apply
    HEADER = "header"  # a request head is being read
    BODY = "body"  # a request body is being read
    KEEP_ALIVE = "keep-alive"  # idle between requests
    SEND = "send"  # our writes are blocked by the client (the transport paused us)


class Body(Sentinel):
    """How a message's body is delimited (RFC 9112 6.3)."""

    NONE = "none"  # no body at all (bodiless status, HEAD, a request without framing)
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"  # a response without framing: the close ends it
    TUNNEL = "tunnel"  # a 2xx answer to CONNECT: the bytes after the head are a tunnel


class Switch(Sentinel):
    NONE = "none"
    UPGRADE = "upgrade"  # Connection: upgrade + Upgrade (HTTP/1.1)
    CONNECT = "connect"


class Framing(NamedTuple):
    body: Body
    length: int | None = None  # with Body.LENGTH


NO_BODY = Framing(Body.NONE)
CHUNKED = Framing(Body.CHUNKED)
UNTIL_CLOSE = Framing(Body.UNTIL_CLOSE)
TUNNEL = Framing(Body.TUNNEL)

READER_TRANSITIONS: dict[Reader, dict[Input, Reader]] = {
    Reader.IDLE: {
        Input.HEAD_START: Reader.HEAD,
        Input.HEAD: Reader.BODY,
        Input.BROKEN: Reader.ERROR,
        Input.EOF: Reader.CLOSED,
        Input.CLOSE: Reader.DONE,
    },
    Reader.HEAD: {
        Input.HEAD_START: Reader.HEAD,
        Input.HEAD: Reader.BODY,
        Input.BROKEN: Reader.ERROR,
        Input.EOF: Reader.CLOSED,
        Input.CLOSE: Reader.DONE,
    },
    Reader.BODY: {
        Input.DATA: Reader.BODY,
        Input.END_KEEP: Reader.IDLE,
        Input.END_LAST: Reader.DONE,
        Input.END_SWITCH: Reader.MIGHT_SWITCH,
        Input.BROKEN: Reader.ERROR,
        Input.EOF: Reader.CLOSED,
        Input.CLOSE: Reader.DONE,
    },
    Reader.MIGHT_SWITCH: {
        Input.SWITCH: Reader.SWITCHED,
        Input.REFUSE_SWITCH_KEEP: Reader.IDLE,
        Input.REFUSE_SWITCH_LAST: Reader.DONE,
        Input.EOF: Reader.CLOSED,
        Input.CLOSE: Reader.DONE,
    },
    # after the last request the parser may still report what the client sent on:
    # it is not parsed as requests (RFC 9112 9.6), so every input is absorbed
    Reader.DONE: {
        Input.HEAD_START: Reader.DONE,
        Input.HEAD: Reader.DONE,
        Input.DATA: Reader.DONE,
        Input.END_KEEP: Reader.DONE,
        Input.END_LAST: Reader.DONE,
        Input.END_SWITCH: Reader.DONE,
        Input.BROKEN: Reader.DONE,
        Input.EOF: Reader.CLOSED,
        Input.CLOSE: Reader.DONE,
    },
    Reader.SWITCHED: {Input.EOF: Reader.SWITCHED, Input.CLOSE: Reader.SWITCHED},
    Reader.CLOSED: {Input.EOF: Reader.CLOSED, Input.CLOSE: Reader.CLOSED},
    Reader.ERROR: {
        Input.HEAD_START: Reader.ERROR,
        Input.HEAD: Reader.ERROR,
        Input.DATA: Reader.ERROR,
        Input.END_KEEP: Reader.ERROR,
        Input.END_LAST: Reader.ERROR,
        Input.END_SWITCH: Reader.ERROR,
        Input.BROKEN: Reader.ERROR,
        Input.EOF: Reader.ERROR,
        Input.CLOSE: Reader.ERROR,
    },
}

WRITER_TRANSITIONS: dict[Writer, dict[Input, Writer]] = {
    Writer.IDLE: {
        Input.REQUEST_QUEUED: Writer.SEND_RESPONSE,
        Input.NOTHING_LEFT: Writer.MUST_CLOSE,
        Input.CLOSE: Writer.CLOSED,
    },
    Writer.SEND_RESPONSE: {
        Input.INFORMATIONAL: Writer.SEND_RESPONSE,
        Input.HEAD: Writer.SEND_BODY,
        Input.SWITCH: Writer.SWITCHED,
        Input.CLOSE: Writer.CLOSED,
    },
    Writer.SEND_BODY: {
        Input.DATA: Writer.SEND_BODY,
        Input.END_KEEP: Writer.IDLE,
        Input.END_LAST: Writer.MUST_CLOSE,
        Input.CLOSE: Writer.CLOSED,
    },
    Writer.MUST_CLOSE: {Input.CLOSE: Writer.CLOSED},
    Writer.SWITCHED: {Input.CLOSE: Writer.SWITCHED},
    Writer.CLOSED: {Input.CLOSE: Writer.CLOSED},
}

# the timer of a reader state while the writer is not blocked (see Connection.timer)
READER_TIMERS = {Reader.HEAD: Timer.HEADER, Reader.BODY: Timer.BODY}
# reader states in which the shell feeds the parser (more conditions in Connection.reading)
READING_STATES = frozenset({Reader.IDLE, Reader.HEAD, Reader.BODY})
# reader states after which no request will come: the writer closes once the queue is empty
FINAL_READER_STATES = frozenset({Reader.DONE, Reader.CLOSED, Reader.ERROR})
BODILESS_STATUSES = frozenset({204, 304})
# a well-formed request we refuse ends the requests (DONE); any other refusal means the
# stream is broken (ERROR)
READER_AFTER_REFUSAL = {413: Reader.DONE, 417: Reader.DONE}
SUPPORTED_VERSIONS = frozenset({(1, 0), (1, 1)})


class HeadFields(NamedTuple):
    """What one pass over a message's header fields found (names compared lowercased)."""

    content_length: tuple[bytes, ...] = ()
    transfer_encoding: tuple[bytes, ...] = ()  # the codings, lowercased, in order
    connection: frozenset[bytes] = frozenset()  # the Connection options, lowercased
    expect: tuple[bytes, ...] = ()
    hosts: int = 0
    upgrade: bool = False
    bad_value: bool = False  # CR, LF or NUL in a value: obs-fold or an injection


# the fields scan_fields interprets; every other one is only checked for CR, LF and NUL
CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION, EXPECT, HOST, UPGRADE = range(6)
FRAMING_FIELDS = {
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"expect": EXPECT,
    b"host": HOST,
    b"upgrade": UPGRADE,
}


# CR, LF or NUL: never in a field value (obs-fold, response splitting); one regex search is
# several times cheaper here than three ``in`` tests
control_character = re.compile(rb"[\r\n\0]").search


Fields = list[tuple[bytes, bytes]]


def encode_fields(headers: Iterable[tuple[str, str]]) -> Fields:
    """Header fields as the bytes they go out as: a value's bytes that are not UTF-8 came
    in decoded with surrogateescape and go out as they came (as nginx passes them); a
    surrogate that stands for no byte is written as "?"."""
    fields = []
    for name, value in headers:
        try:
            encoded = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            encoded = value.encode("utf-8", "replace")
        fields.append((name.encode("latin-1", "replace"), encoded))
    return fields


def encode_head(start_line: bytes, fields: Fields) -> bytes:
    """A message head: ``start_line``, then ``fields``. CR, LF or NUL in a name or a value
    (response splitting, request smuggling by our own hand) raises ``LocalProtocolError``."""
    lines = [b"%b: %b" % field for field in fields]
    if control_character(b"".join(lines)) or control_character(start_line):
        raise LocalProtocolError("CR, LF or NUL in a header field")
    lines.insert(0, start_line)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _items(value: bytes) -> list[bytes]:
    """A comma-separated field value's non-empty elements, stripped and lowercased."""
    return [v.strip(b" \t").lower() for v in value.split(b",") if v.strip(b" \t")]


def scan_fields(headers: list[tuple[bytes, bytes]]) -> HeadFields:
    content_length: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    expect: list[bytes] = []
    hosts = 0
    upgrade = bad_value = False
    for raw_name, value in headers:
        if control_character(value):
            bad_value = True
        kind = FRAMING_FIELDS.get(raw_name.lower())
        if kind is None:
            continue
        if kind == HOST:
            hosts += 1
        elif kind == CONTENT_LENGTH:
            # every element, empty ones too: "5," is no length
            content_length.extend(v.strip(b" \t") for v in value.split(b","))
        elif kind == TRANSFER_ENCODING:
            codings.extend(_items(value) or [b""])  # an empty field is there, and no coding
        elif kind == CONNECTION:
            connection.extend(_items(value))
        elif kind == EXPECT:
            expect.append(value.strip(b" \t").lower())
        else:
            upgrade = True
    return HeadFields(
        tuple(content_length),
        tuple(codings),
        frozenset(connection) if connection else NO_OPTIONS,
        tuple(expect),
        hosts,
        upgrade,
        bad_value,
    )


NO_OPTIONS: frozenset[bytes] = frozenset()


class FramingError(ValueError):
    """A message whose body cannot be delimited safely; ``status`` is the answer to it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _length(values: tuple[bytes, ...]) -> int:
    """The one Content-Length (RFC 9112 6.3 rule 5): repeated or invalid is refused."""
    if len(values) != 1:
        raise FramingError(400, "repeated Content-Length")
    value = values[0]
    if not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:  # isdigit: ASCII bytes only
        raise FramingError(400, "invalid Content-Length")
    return int(value)


def request_framing(version: tuple[int, int], fields: HeadFields) -> Framing:
    """How a request's body is delimited, or FramingError (RFC 9112 6.1, 6.3)."""
    if fields.transfer_encoding:
        if fields.content_length:
            raise FramingError(400, "Content-Length with Transfer-Encoding")
        if version < (1, 1):
            raise FramingError(400, "Transfer-Encoding in HTTP/1.0")
        if fields.transfer_encoding[-1] != b"chunked":
            raise FramingError(400, "Transfer-Encoding not ending in chunked")
        if len(fields.transfer_encoding) > 1:
            if b"chunked" in fields.transfer_encoding[:-1]:
                raise FramingError(400, "chunked twice")
            raise FramingError(501, "transfer coding not implemented")
        return CHUNKED
    if fields.content_length:
        length = _length(fields.content_length)
        return Framing(Body.LENGTH, length) if length else NO_BODY
    return NO_BODY


def response_framing(method: bytes, status: int, fields: HeadFields) -> Framing:
    """How a response's body is delimited (RFC 9112 6.3), for either side of a proxy."""
    if status < 200 or status in BODILESS_STATUSES or method == b"HEAD":
        return NO_BODY
    if method == b"CONNECT" and status < 300:
        return TUNNEL
    if fields.transfer_encoding:
        if fields.content_length:
            raise FramingError(502, "Content-Length with Transfer-Encoding")
        if fields.transfer_encoding[-1] == b"chunked":
            if fields.transfer_encoding.count(b"chunked") > 1:
                raise FramingError(502, "chunked twice")
            return CHUNKED
        return UNTIL_CLOSE
    if fields.content_length:
        return Framing(Body.LENGTH, _length(fields.content_length))
    return UNTIL_CLOSE


def keep_alive_requested(version: tuple[int, int], connection: frozenset[bytes]) -> bool:
    """HTTP/1.1 keeps unless ``Connection: close``; HTTP/1.0 closes unless ``keep-alive``."""
    if b"close" in connection:
        return False
    return version >= (1, 1) or b"keep-alive" in connection


@dataclass(slots=True, eq=False)
class Exchange:
    """One request and the bookkeeping of its response, in arrival order."""

    number: int  # 0, 1, 2 ... on this connection
    method: bytes
    target: bytes
    version: tuple[int, int]
    framing: Framing
    keep_alive: bool  # what the request allows (our side may still close)
    switch: Switch = Switch.NONE
    expects_continue: bool = False
    refusal: int | None = None  # the client's mistake: answer with this status, then close
    received: int = 0  # body bytes counted
    request_complete: bool = False
    continue_sent: bool = False
    truncated: bool = False  # the client closed or broke the stream inside the body
    status: int | None = None  # of the final response, once its head is sent
    response_framing: Framing | None = None
    sent: int = 0  # response body bytes counted
    informational: list[int] = field(default_factory=list)


class ResponseStart(NamedTuple):
    """What the shell needs to write a response head the machine accepted."""

    framing: Framing
    # the Connection field the head must carry: b"close", b"keep-alive" (an HTTP/1.0 client
    # that asked for it) or None (HTTP/1.1's default)
    connection: bytes | None


class Connection:
    """The server side of one client connection: feed it events, ask it what to do."""

    def __init__(self, pipeline_limit: int = 8, max_body_size: int | None = None) -> None:
        if pipeline_limit < 0:
            raise ValueError("pipeline_limit must be >= 0")
        self.pipeline_limit = pipeline_limit  # requests queued behind the one being answered
        self.max_body_size = max_body_size  # a declared length over it is refused with 413
        self.reader = Reader.IDLE
        self.writer = Writer.IDLE
        self.writing_paused = False  # the transport's pause_writing/resume_writing
        self.queue: deque[Exchange] = deque()  # received, response not complete; [0] current
        self.answered = 0  # responses completed (their exchanges left the queue)
        self._next_number = 0

    # --- what the shell asks -------------------------------------------------------------

    @property
    def current(self) -> Exchange | None:
        """The exchange whose response may be written now (strictly the oldest)."""
        if self.writer in (Writer.SEND_RESPONSE, Writer.SEND_BODY):
            return self.queue[0]
        return None

    @property
    def reading(self) -> bool:
        """Whether the shell reads from the client now (False: pause_reading)."""
        if self.reader not in READING_STATES or self.writer not in (
            Writer.IDLE,
            Writer.SEND_RESPONSE,
            Writer.SEND_BODY,
        ):
            return False
        if self.reader is Reader.BODY:
            # a body is read for the request being answered; a pipelined one's waits its turn
            return len(self.queue) == 1
        return len(self.queue) <= self.pipeline_limit

    @property
    def timer(self) -> Timer:
        if self.writing_paused and self.writer in (
            Writer.SEND_RESPONSE,
            Writer.SEND_BODY,
            Writer.MUST_CLOSE,
        ):
            return Timer.SEND
        if self.reading and self.reader in READER_TIMERS:
            return READER_TIMERS[self.reader]
        if self.reader is Reader.IDLE and self.writer is Writer.IDLE:
            return Timer.KEEP_ALIVE
        return Timer.NONE

    @property
    def must_close(self) -> bool:
        """The shell closes the transport once what it wrote is flushed."""
        return self.writer is Writer.MUST_CLOSE

    @property
    def switched(self) -> bool:
        """HTTP is over: the shell hands the transport (and unparsed bytes) to a tunnel."""
        return self.writer is Writer.SWITCHED

    # --- what the client sent (the parser's events) -----------------------------------------

    def receive_head_start(self) -> None:
        """The first bytes of a request head arrived (the header timer starts)."""
        self.reader = self._step(READER_TRANSITIONS, self.reader, Input.HEAD_START, "reader")

    def receive_head(
        self,
        method: bytes,
        target: bytes,
        version: tuple[int, int],
        headers: list[tuple[bytes, bytes]],
    ) -> Exchange | None:
        """A complete request head; the exchange it opens (None once requests are over)."""
        reader = self._step(READER_TRANSITIONS, self.reader, Input.HEAD, "reader")
        if reader is not Reader.BODY:  # absorbed: after the last request or a broken stream
            self.reader = reader
            return None
        exchange = self._exchange(method, target, version, headers)
        self.queue.append(exchange)
        if exchange.refusal is None:
            self.reader = Reader.BODY
        else:
            # nothing after a refused head is parsed: its body may be anything
            self.reader = READER_AFTER_REFUSAL.get(exchange.refusal, Reader.ERROR)
        self._settle()
        return exchange

    def receive_data(self, size: int) -> None:
        """``size`` bytes of the request body arrived (counted, never held here)."""
        reader = self._step(READER_TRANSITIONS, self.reader, Input.DATA, "reader")
        if reader is Reader.BODY:
            exchange = self.queue[-1]
            framing = exchange.framing
            if framing.body is Body.NONE or (
                framing.body is Body.LENGTH
                and framing.length is not None
                and exchange.received + size > framing.length
            ):
                raise LocalProtocolError("request body data beyond its framing")
            exchange.received += size
        self.reader = reader

    def receive_end(self) -> None:
        """The request's body is complete (the parser's message-complete)."""
        if self.reader is not Reader.BODY:
            self.reader = self._step(READER_TRANSITIONS, self.reader, Input.END_KEEP, "reader")
            return
        exchange = self.queue[-1]
        framing = exchange.framing
        if framing.body is Body.LENGTH and exchange.received != framing.length:
            raise LocalProtocolError("request ended before its Content-Length")
        exchange.request_complete = True
        if exchange.switch is not Switch.NONE and exchange.status is None:
            step = Input.END_SWITCH
        elif exchange.keep_alive:
            step = Input.END_KEEP
        else:
            step = Input.END_LAST
        self.reader = self._step(READER_TRANSITIONS, self.reader, step, "reader")
        self._settle()

    def receive_error(self, status: int = 400) -> Exchange | None:
        """The parser refused what the client sent (status 400, 413, 414, 431 ...).

        Before a response to the broken request started, it is answered with ``status``
        (in order, after the responses owed before it) and the connection closes; after,
        the connection closes once that response ends (the shell aborts the upstream side).
        """
        if not 400 <= status < 600:
            raise LocalProtocolError(f"an error status is 4xx or 5xx, not {status}")
        reader = self._step(READER_TRANSITIONS, self.reader, Input.BROKEN, "reader")
        broken: Exchange | None = None
        if self.reader is Reader.BODY:
            broken = self.queue[-1]
            broken.keep_alive = False
            broken.truncated = True
            if broken.status is None and broken.refusal is None:
                broken.refusal = status
        elif self.reader in (Reader.IDLE, Reader.HEAD):
            broken = self._new_exchange(b"", b"", (1, 1), NO_BODY, False)
            broken.refusal = status
            self.queue.append(broken)
        self.reader = reader
        self._settle()
        return broken

    def receive_eof(self) -> None:
        """The client closed its side: owed responses still go out, then the connection closes."""
        reader = self._step(READER_TRANSITIONS, self.reader, Input.EOF, "reader")
        if self.reader is Reader.BODY:
            self.queue[-1].truncated = True
            self.queue[-1].keep_alive = False
        self.reader = reader
        self._settle()

    # --- what we send ------------------------------------------------------------------------

    def want_body(self, exchange: Exchange) -> bool:
        """The handler wants the current request's body: True when ``100 Continue`` is due.

        Only when the client asked for it, nothing of the body arrived yet, and no final
        response was sent (RFC 9110 10.1.1); the shell then writes ``CONTINUE``.
        """
        self._require_current(exchange)
        due = (
            exchange.expects_continue
            and not exchange.continue_sent
            and exchange.received == 0
            and not exchange.request_complete
            and exchange.status is None
            and self.reader is Reader.BODY
            and self.writer is Writer.SEND_RESPONSE
        )
        if due:
            exchange.continue_sent = True
            exchange.informational.append(100)
        return due

    def start_response(
        self, exchange: Exchange, status: int, headers: list[tuple[bytes, bytes]]
    ) -> ResponseStart:
        """The shell is about to write this response head; what framing it has and implies."""
        self._require_current(exchange)
        if not 100 <= status <= 999:
            raise LocalProtocolError(f"status {status} is no HTTP status")
        if exchange.refusal is not None and status < 400:
            raise LocalProtocolError(f"request refused with {exchange.refusal}: answered {status}")
        if status < 200:
            return self._informational(exchange, status)
        fields = scan_fields(headers)
        if fields.bad_value:
            raise LocalProtocolError("CR, LF or NUL in a response header value")
        try:
            framing = response_framing(exchange.method, status, fields)
        except FramingError as e:
            raise LocalProtocolError(str(e)) from None
        if framing.body is Body.TUNNEL:
            if exchange.switch is not Switch.CONNECT or self.reader is not Reader.MIGHT_SWITCH:
                raise LocalProtocolError("a tunnel needs a CONNECT request read to its end")
            self._switch(exchange, status, framing)
            return ResponseStart(framing, None)
        if framing.body is Body.CHUNKED and exchange.version < (1, 1):
            raise LocalProtocolError("chunked response to an HTTP/1.0 client")
        self.writer = self._step(WRITER_TRANSITIONS, self.writer, Input.HEAD, "writer")
        exchange.status = status
        exchange.response_framing = framing
        if exchange.switch is not Switch.NONE:
            exchange.switch = Switch.NONE  # refused: HTTP goes on
            if self.reader is Reader.MIGHT_SWITCH:
                keep = exchange.keep_alive
                step = Input.REFUSE_SWITCH_KEEP if keep else Input.REFUSE_SWITCH_LAST
                self.reader = self._step(READER_TRANSITIONS, self.reader, step, "reader")
        if b"close" in fields.connection or framing.body is Body.UNTIL_CLOSE:
            exchange.keep_alive = False
        if exchange.refusal is not None:
            exchange.keep_alive = False
        if not exchange.keep_alive:
            connection: bytes | None = b"close"
        elif exchange.version < (1, 1):
            connection = b"keep-alive"
        else:
            connection = None
        return ResponseStart(framing, connection)

    def send_data(self, exchange: Exchange, size: int) -> None:
        """``size`` bytes of the response body are about to be written."""
        self._require_current(exchange)
        self._step(WRITER_TRANSITIONS, self.writer, Input.DATA, "writer")
        framing = exchange.response_framing
        assert framing is not None  # SEND_BODY: the head was sent
        if framing.body is Body.NONE and size:
            raise LocalProtocolError(f"a body to a {exchange.method!r} / {exchange.status}")
        if framing.body is Body.LENGTH and exchange.sent + size > (framing.length or 0):
            raise LocalProtocolError("response body beyond its Content-Length")
        exchange.sent += size

    def end_response(self, exchange: Exchange) -> None:
        """The response is complete: the next request becomes current, or the connection closes.

        It closes when the request or the response said so, when the response had no
        framing, when the request's body was not read to its end (never parse the rest of
        a body as a request), or when the client will send nothing more.
        """
        self._require_current(exchange)
        self._step(WRITER_TRANSITIONS, self.writer, Input.END_KEEP, "writer")
        framing = exchange.response_framing
        assert framing is not None
        if framing.body is Body.LENGTH and exchange.sent != framing.length:
            raise LocalProtocolError("response ended before its Content-Length: truncated")
        keep = exchange.keep_alive and exchange.request_complete
        self.writer = self._step(
            WRITER_TRANSITIONS, self.writer, Input.END_KEEP if keep else Input.END_LAST, "writer"
        )
        self.queue.popleft()
        self.answered += 1
        if self.writer is Writer.MUST_CLOSE:
            self.reader = self._step(READER_TRANSITIONS, self.reader, Input.CLOSE, "reader")
        self._settle()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False

    def abort(self) -> None:
        """The shell aborts (a failed upstream mid-body) or the transport is lost: all over."""
        self.writer = self._step(WRITER_TRANSITIONS, self.writer, Input.CLOSE, "writer")
        self.reader = self._step(READER_TRANSITIONS, self.reader, Input.CLOSE, "reader")

    connection_lost = abort

    # --- the machinery -----------------------------------------------------------------------

    @staticmethod
    def _step(
        table: dict[State, dict[Input, State]], state: State, step: Input, side: str
    ) -> State:
        try:
            return table[state][step]
        except KeyError:
            raise LocalProtocolError(
                f"{side} in {state.value}: no transition on {step.value}"
            ) from None

    def _require_current(self, exchange: Exchange) -> None:
        if exchange is not self.current:
            raise LocalProtocolError(
                f"request {exchange.number} is not the one being answered (writer "
                f"{self.writer.value}, {len(self.queue)} queued): responses go in order"
            )

    def _informational(self, exchange: Exchange, status: int) -> ResponseStart:
        if exchange.version < (1, 1):
            raise LocalProtocolError("no 1xx to an HTTP/1.0 client")
        if status == 101:
            if exchange.switch is not Switch.UPGRADE or self.reader is not Reader.MIGHT_SWITCH:
                raise LocalProtocolError("101 needs an Upgrade request read to its end")
            self._switch(exchange, status, NO_BODY)
            return ResponseStart(NO_BODY, b"upgrade")
        if status == 100:
            raise LocalProtocolError("100 Continue goes through want_body")
        self.writer = self._step(WRITER_TRANSITIONS, self.writer, Input.INFORMATIONAL, "writer")
        exchange.informational.append(status)
        return ResponseStart(NO_BODY, None)

    def _switch(self, exchange: Exchange, status: int, framing: Framing) -> None:
        self._step(READER_TRANSITIONS, self.reader, Input.SWITCH, "reader")
        self.writer = self._step(WRITER_TRANSITIONS, self.writer, Input.SWITCH, "writer")
        self.reader = Reader.SWITCHED
        exchange.status = status
        exchange.response_framing = framing

    def _settle(self) -> None:
        """State-triggered transitions (h11's ``_fire_state_triggered_transitions``)."""
        if self.writer is Writer.IDLE:
            if self.queue:
                self.writer = WRITER_TRANSITIONS[Writer.IDLE][Input.REQUEST_QUEUED]
            elif self.reader in FINAL_READER_STATES:
                self.writer = WRITER_TRANSITIONS[Writer.IDLE][Input.NOTHING_LEFT]

    def _new_exchange(
        self,
        method: bytes,
        target: bytes,
        version: tuple[int, int],
        framing: Framing,
        keep_alive: bool,
    ) -> Exchange:
        exchange = Exchange(self._next_number, method, target, version, framing, keep_alive)
        self._next_number += 1
        return exchange

    def _exchange(
        self,
        method: bytes,
        target: bytes,
        version: tuple[int, int],
        headers: list[tuple[bytes, bytes]],
    ) -> Exchange:
        fields = scan_fields(headers)
        keep = keep_alive_requested(version, fields.connection)
        exchange = self._new_exchange(method, target, version, NO_BODY, keep)
        refusal = self._classify(method, version, fields, exchange)
        if refusal is not None:
            exchange.refusal = refusal
            exchange.keep_alive = False
        return exchange

    def _classify(
        self, method: bytes, version: tuple[int, int], fields: HeadFields, exchange: Exchange
    ) -> int | None:
        """Fills in the exchange's framing, switch and expectation; returns the status its
        head is refused with (None: accepted), the checks in the order they matter."""
        if version not in SUPPORTED_VERSIONS:
            return 505
        if fields.bad_value:
            return 400  # obs-fold (RFC 9112 5.2) or a CR/LF/NUL smuggled into a value
        try:
            exchange.framing = request_framing(version, fields)
        except FramingError as e:
            return e.status
        if version >= (1, 1) and fields.hosts != 1:
            return 400  # RFC 9112 3.2: exactly one Host
        if method == b"CONNECT":
            exchange.switch = Switch.CONNECT
        elif version >= (1, 1) and fields.upgrade and b"upgrade" in fields.connection:
            exchange.switch = Switch.UPGRADE  # an HTTP/1.0 Upgrade is ignored (RFC 9110 7.8)
        if fields.expect:
            if version >= (1, 1) and fields.expect != (b"100-continue",):
                return 417
            # an HTTP/1.0 client's 100-continue is ignored (RFC 9110 10.1.1)
            exchange.expects_continue = version >= (1, 1) and exchange.framing.body is not Body.NONE
        framing = exchange.framing
        if (
            self.max_body_size is not None
            and framing.body is Body.LENGTH
            and (framing.length or 0) > self.max_body_size
        ):
            return 413
        return None
