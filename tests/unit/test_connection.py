"""fileproxy.http.connection: the sans-IO server connection, one test per rule.

Every test drives the machine as the data plane's protocol will (parser events in,
response steps out) and asserts exactly what it must then do: read or pause, which
timer, keep-alive or close, which exchange is answered, which status refuses what.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fileproxy.http.connection import (
    CONTINUE,
    NO_BODY,
    TUNNEL,
    UNTIL_CLOSE,
    Body,
    Connection,
    Exchange,
    Framing,
    FramingError,
    LocalProtocolError,
    Reader,
    Timer,
    Writer,
    encode_fields,
    encode_head,
    keep_alive_requested,
    response_framing,
    scan_fields,
)

HOST = (b"Host", b"example.org")


def request(
    conn: Connection,
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    version: tuple[int, int] = (1, 1),
    end: bool = True,
) -> Exchange:
    """A request head (with Host unless headers are given) and, by default, its end."""
    exchange = conn.receive_head(method, b"/f", version, [HOST] if headers is None else headers)
    assert exchange is not None
    if end and exchange.refusal is None:
        conn.receive_end()
    return exchange


def respond(
    conn: Connection,
    exchange: Exchange,
    status: int = 200,
    body: int = 5,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes | None:
    """A complete response with Content-Length ``body``; the Connection field it needs."""
    if headers is None:
        headers = [(b"Content-Length", str(body).encode())]
    start = conn.start_response(exchange, status, headers)
    if start.framing.body is not Body.NONE:
        conn.send_data(exchange, body)
    conn.end_response(exchange)
    return start.connection


def fields(*pairs: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [HOST, *pairs]


# --- the cycle and keep-alive -----------------------------------------------------------


def test_one_exchange_then_idle_for_the_next_request() -> None:
    conn = Connection()
    assert (conn.reader, conn.writer, conn.timer, conn.reading) == (
        Reader.IDLE,
        Writer.IDLE,
        Timer.KEEP_ALIVE,
        True,
    )
    conn.receive_head_start()
    assert (conn.reader, conn.timer) == (Reader.HEAD, Timer.HEADER)
    exchange = request(conn)
    assert exchange.number == 0 and exchange.framing == NO_BODY
    assert conn.current is exchange and conn.writer is Writer.SEND_RESPONSE
    assert respond(conn, exchange) is None  # HTTP/1.1 keeps by default: no Connection field
    assert (conn.reader, conn.writer, conn.timer, conn.must_close) == (
        Reader.IDLE,
        Writer.IDLE,
        Timer.KEEP_ALIVE,
        False,
    )
    assert conn.current is None and conn.answered == 1
    assert request(conn).number == 1


def test_http10_closes_without_keep_alive() -> None:
    conn = Connection()
    exchange = request(conn, headers=[], version=(1, 0))  # no Host needed in HTTP/1.0
    assert exchange.keep_alive is False
    assert conn.reader is Reader.DONE and not conn.reading
    assert respond(conn, exchange) == b"close"
    assert conn.must_close and conn.writer is Writer.MUST_CLOSE


def test_http10_keeps_with_connection_keep_alive() -> None:
    conn = Connection()
    exchange = request(conn, headers=[(b"Connection", b"Keep-Alive")], version=(1, 0))
    assert respond(conn, exchange) == b"keep-alive"  # an HTTP/1.0 client needs it said
    assert (conn.reader, conn.writer) == (Reader.IDLE, Writer.IDLE)


def test_http11_request_connection_close_closes() -> None:
    conn = Connection()
    exchange = request(conn, headers=fields((b"Connection", b"foo, Close")))
    assert conn.reader is Reader.DONE  # nothing after it is parsed
    assert conn.receive_head(b"GET", b"/x", (1, 1), [HOST]) is None
    assert respond(conn, exchange) == b"close"
    assert conn.must_close


def test_our_connection_close_closes() -> None:
    conn = Connection()
    exchange = request(conn)
    headers = [(b"Content-Length", b"5"), (b"Connection", b"close")]
    assert respond(conn, exchange, headers=headers) == b"close"
    assert conn.must_close and conn.reader is Reader.DONE


def test_response_without_framing_closes() -> None:
    conn = Connection()
    exchange = request(conn)
    start = conn.start_response(exchange, 200, [])
    assert start.framing == UNTIL_CLOSE and start.connection == b"close"
    conn.send_data(exchange, 1000)
    conn.end_response(exchange)
    assert conn.must_close


@pytest.mark.parametrize(("method", "status"), [(b"GET", 204), (b"GET", 304), (b"HEAD", 200)])
def test_bodiless_responses_keep_alive_without_framing(method: bytes, status: int) -> None:
    conn = Connection()
    exchange = request(conn, method=method)
    start = conn.start_response(exchange, status, [(b"Content-Length", b"100")])
    assert start.framing == NO_BODY
    with pytest.raises(LocalProtocolError):
        conn.send_data(exchange, 1)  # no body to a HEAD, a 204 or a 304
    conn.end_response(exchange)
    assert conn.writer is Writer.IDLE


def test_unread_request_body_closes_and_is_never_parsed() -> None:
    conn = Connection()
    exchange = request(conn, method=b"POST", headers=fields((b"Content-Length", b"10")), end=False)
    conn.receive_data(4)
    assert respond(conn, exchange, status=403) is None  # not known yet when the head goes
    assert conn.must_close and conn.reader is Reader.DONE and not conn.reading
    conn.receive_data(6)  # what the parser still reports is absorbed, never a request
    assert conn.receive_head(b"GET", b"/smuggled", (1, 1), [HOST]) is None
    assert not conn.queue


def test_request_body_read_to_its_end_keeps_alive() -> None:
    conn = Connection()
    exchange = request(conn, method=b"PUT", headers=fields((b"Content-Length", b"10")), end=False)
    assert exchange.framing == Framing(Body.LENGTH, 10)
    assert conn.timer is Timer.BODY
    conn.receive_data(10)
    conn.receive_end()
    assert conn.timer is Timer.NONE  # the handler and the upstream's timers apply now
    respond(conn, exchange)
    assert conn.writer is Writer.IDLE


# --- pipelining -------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order() -> None:
    conn = Connection()
    first, second, third = request(conn), request(conn), request(conn)
    assert conn.current is first and conn.reading
    with pytest.raises(LocalProtocolError, match="in order"):
        conn.start_response(second, 200, [(b"Content-Length", b"0")])
    respond(conn, first)
    assert conn.current is second
    respond(conn, second)
    respond(conn, third)
    assert conn.answered == 3 and conn.writer is Writer.IDLE


def test_pipeline_over_its_bound_pauses_reading() -> None:
    conn = Connection(pipeline_limit=2)
    first = request(conn)
    request(conn)
    assert conn.reading  # one queued behind the current
    request(conn)
    assert not conn.reading and conn.timer is Timer.NONE  # two behind: stop reading
    assert request(conn) is not None  # already received bytes are still taken
    respond(conn, first)
    assert not conn.reading  # still two behind
    second = conn.current
    assert second is not None and second.number == 1
    respond(conn, second)
    assert conn.reading


def test_pipeline_limit_zero_reads_only_between_exchanges() -> None:
    conn = Connection(pipeline_limit=0)
    exchange = request(conn)
    assert not conn.reading
    respond(conn, exchange)
    assert conn.reading


def test_pipelined_body_waits_for_its_turn() -> None:
    conn = Connection()
    first = request(conn)
    second = request(conn, method=b"POST", headers=fields((b"Content-Length", b"3")), end=False)
    assert conn.reader is Reader.BODY and not conn.reading  # not the one being answered
    respond(conn, first)
    assert conn.current is second and conn.reading and conn.timer is Timer.BODY


def test_a_close_in_the_middle_of_a_pipeline_drops_the_rest() -> None:
    conn = Connection()
    first = request(conn, headers=fields((b"Connection", b"close")))
    assert conn.receive_head(b"GET", b"/2", (1, 1), [HOST]) is None
    respond(conn, first)
    assert conn.must_close and conn.answered == 1


# --- Expect: 100-continue ----------------------------------------------------------------


def upload(conn: Connection, *extra: tuple[bytes, bytes], length: bytes = b"10") -> Exchange:
    headers = fields((b"Content-Length", length), *extra)
    return request(conn, method=b"PUT", headers=headers, end=False)


def test_continue_is_sent_once_when_the_body_is_wanted() -> None:
    conn = Connection()
    exchange = upload(conn, (b"Expect", b"100-Continue"))
    assert exchange.expects_continue and CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert conn.want_body(exchange) is True
    assert conn.want_body(exchange) is False
    conn.receive_data(10)
    conn.receive_end()
    respond(conn, exchange)
    assert conn.writer is Writer.IDLE  # the body was read: keep-alive


def test_no_continue_once_the_body_started() -> None:
    conn = Connection()
    exchange = upload(conn, (b"Expect", b"100-continue"))
    conn.receive_data(1)  # the client did not wait
    assert conn.want_body(exchange) is False


def test_no_continue_for_a_pipelined_request_before_its_turn() -> None:
    conn = Connection()
    request(conn)
    second = upload(conn, (b"Expect", b"100-continue"))
    with pytest.raises(LocalProtocolError):
        conn.want_body(second)


def test_no_continue_without_a_body_or_from_http10() -> None:
    conn = Connection()
    exchange = request(conn, headers=fields((b"Expect", b"100-continue")), end=False)
    assert exchange.expects_continue is False  # nothing to send
    conn.receive_end()
    respond(conn, exchange)
    old = request(
        conn,
        method=b"PUT",
        version=(1, 0),
        headers=[
            (b"Content-Length", b"3"),
            (b"Expect", b"100-continue"),
            (b"Connection", b"keep-alive"),
        ],
        end=False,
    )
    assert old.expects_continue is False  # RFC 9110 10.1.1: ignored in HTTP/1.0


def test_final_response_instead_of_continue_closes() -> None:
    conn = Connection()
    exchange = upload(conn, (b"Expect", b"100-continue"))
    assert respond(conn, exchange, status=401) is None
    assert conn.must_close and conn.reader is Reader.DONE  # the body never came: close
    assert exchange.continue_sent is False


def test_other_expectation_is_refused_with_417_then_close() -> None:
    conn = Connection()
    exchange = upload(conn, (b"Expect", b"tea"))
    assert exchange.refusal == 417 and conn.reader is Reader.DONE
    assert respond(conn, exchange, status=417) == b"close"
    assert conn.must_close


def test_declared_length_over_the_limit_is_refused_with_413_then_close() -> None:
    conn = Connection(max_body_size=9)
    exchange = upload(conn, (b"Expect", b"100-continue"))
    assert exchange.refusal == 413 and not conn.reading
    with pytest.raises(LocalProtocolError):
        conn.start_response(exchange, 200, [(b"Content-Length", b"0")])  # refused is refused
    assert respond(conn, exchange, status=413) == b"close"
    assert conn.must_close
    at_the_limit = upload(Connection(max_body_size=10), length=b"10")
    assert at_the_limit.refusal is None and at_the_limit.framing == Framing(Body.LENGTH, 10)


# --- Upgrade and CONNECT -----------------------------------------------------------------


def test_upgrade_switches_after_101() -> None:
    conn = Connection()
    exchange = request(
        conn, headers=fields((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))
    )
    assert conn.reader is Reader.MIGHT_SWITCH and not conn.reading
    start = conn.start_response(exchange, 101, [(b"Upgrade", b"websocket")])
    assert start.connection == b"upgrade"
    assert conn.switched and (conn.reader, conn.writer) == (Reader.SWITCHED, Writer.SWITCHED)
    assert not conn.reading and conn.timer is Timer.NONE
    with pytest.raises(LocalProtocolError):
        conn.receive_head(b"GET", b"/", (1, 1), [HOST])  # no more HTTP


def test_refused_upgrade_goes_on_as_http() -> None:
    conn = Connection()
    exchange = request(conn, headers=fields((b"Connection", b"upgrade"), (b"Upgrade", b"h2c")))
    respond(conn, exchange)
    assert (conn.reader, conn.writer) == (Reader.IDLE, Writer.IDLE) and conn.reading


def test_101_without_an_upgrade_request_is_our_bug() -> None:
    conn = Connection()
    exchange = request(conn)
    with pytest.raises(LocalProtocolError):
        conn.start_response(exchange, 101, [])
    old = Connection()
    ignored = request(
        old,
        version=(1, 0),
        headers=[(b"Connection", b"upgrade, keep-alive"), (b"Upgrade", b"websocket")],
    )
    assert old.reader is Reader.IDLE  # HTTP/1.0 Upgrade is ignored (RFC 9110 7.8)
    with pytest.raises(LocalProtocolError):
        old.start_response(ignored, 101, [])


def test_connect_2xx_is_a_tunnel() -> None:
    conn = Connection()
    exchange = request(conn, method=b"CONNECT")
    assert conn.reader is Reader.MIGHT_SWITCH
    start = conn.start_response(exchange, 200, [])
    assert start.framing == TUNNEL and conn.switched


def test_connect_refused_goes_on_as_http() -> None:
    conn = Connection()
    exchange = request(conn, method=b"CONNECT")
    respond(conn, exchange, status=403)
    assert (conn.reader, conn.writer) == (Reader.IDLE, Writer.IDLE)


# --- the client's errors: refused, answered, closed -------------------------------------


def test_parse_error_before_any_response_is_answered_400_then_close() -> None:
    conn = Connection()
    conn.receive_head_start()
    broken = conn.receive_error()
    assert broken is not None and broken.refusal == 400 and conn.current is broken
    assert conn.reader is Reader.ERROR and not conn.reading
    assert respond(conn, broken, status=400) == b"close"
    assert conn.must_close


def test_parse_error_after_pipelined_requests_is_answered_in_its_turn() -> None:
    conn = Connection()
    first = request(conn)
    broken = conn.receive_error(431)
    assert broken is not None and broken.number == 1 and conn.current is first
    respond(conn, first)
    assert conn.current is broken and not conn.must_close
    respond(conn, broken, status=431)
    assert conn.must_close


def test_parse_error_in_a_body_refuses_it_while_no_response_started() -> None:
    conn = Connection()
    exchange = request(
        conn, method=b"POST", headers=fields((b"Transfer-Encoding", b"chunked")), end=False
    )
    conn.receive_data(3)
    assert conn.receive_error() is exchange and exchange.refusal == 400 and exchange.truncated
    respond(conn, exchange, status=400)
    assert conn.must_close


def test_parse_error_in_a_body_after_the_response_started_closes_after_it() -> None:
    conn = Connection()
    exchange = request(
        conn, method=b"POST", headers=fields((b"Transfer-Encoding", b"chunked")), end=False
    )
    conn.start_response(exchange, 200, [(b"Content-Length", b"2")])
    conn.receive_error()
    assert exchange.refusal is None and exchange.truncated
    conn.send_data(exchange, 2)
    conn.end_response(exchange)
    assert conn.must_close


SMUGGLING = [
    ("CL and TE", [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")], 400),
    ("two CL fields", [(b"Content-Length", b"3"), (b"Content-Length", b"3")], 400),
    ("a CL list", [(b"Content-Length", b"3, 3")], 400),
    ("signed CL", [(b"Content-Length", b"+3")], 400),
    ("hex CL", [(b"Content-Length", b"0x3")], 400),
    ("empty CL", [(b"Content-Length", b"")], 400),
    ("non-ASCII digits", [(b"Content-Length", "٣".encode())], 400),
    ("a CL of 19 digits", [(b"Content-Length", b"1" * 19)], 400),
    ("obs-fold", [(b"X-A", b"a\r\n b")], 400),
    ("a bare LF in a value", [(b"X-A", b"a\nb")], 400),
    ("NUL in a value", [(b"X-A", b"a\0b")], 400),
    ("TE not ending in chunked", [(b"Transfer-Encoding", b"chunked, gzip")], 400),
    ("TE gzip alone", [(b"Transfer-Encoding", b"gzip")], 400),
    ("an empty TE beside CL", [(b"Transfer-Encoding", b" "), (b"Content-Length", b"3")], 400),
    ("an empty TE", [(b"Transfer-Encoding", b"")], 400),
    (
        "chunked twice",
        [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
        400,
    ),
    ("a coding we do not implement", [(b"Transfer-Encoding", b"gzip, chunked")], 501),
]


@pytest.mark.parametrize(("case", "extra", "status"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_ambiguous_framing_is_refused_and_nothing_after_it_parsed(
    case: str, extra: list[tuple[bytes, bytes]], status: int
) -> None:
    conn = Connection()
    exchange = conn.receive_head(b"POST", b"/", (1, 1), fields(*extra))
    assert exchange is not None and exchange.refusal == status, case
    assert conn.reader is Reader.ERROR and not conn.reading
    conn.receive_data(3)  # whatever the parser still reports: absorbed
    assert conn.receive_head(b"GET", b"/smuggled", (1, 1), [HOST]) is None
    assert respond(conn, exchange, status=status) == b"close"
    assert conn.must_close


def test_transfer_encoding_in_http10_is_refused() -> None:
    conn = Connection()
    exchange = conn.receive_head(b"POST", b"/", (1, 0), [(b"Transfer-Encoding", b"chunked")])
    assert exchange is not None and exchange.refusal == 400


@pytest.mark.parametrize("hosts", [[], [HOST, HOST]])
def test_http11_needs_exactly_one_host(hosts: list[tuple[bytes, bytes]]) -> None:
    exchange = Connection().receive_head(b"GET", b"/", (1, 1), hosts)
    assert exchange is not None and exchange.refusal == 400


@pytest.mark.parametrize("version", [(0, 9), (1, 2), (2, 0)])
def test_unknown_version_is_refused_with_505(version: tuple[int, int]) -> None:
    exchange = Connection().receive_head(b"GET", b"/", version, [HOST])
    assert exchange is not None and exchange.refusal == 505


def test_valid_framings() -> None:
    conn = Connection()
    chunked = request(
        conn, method=b"POST", headers=fields((b"Transfer-Encoding", b" Chunked ")), end=False
    )
    assert chunked.framing.body is Body.CHUNKED and chunked.refusal is None
    conn.receive_data(100)
    conn.receive_end()
    respond(conn, chunked)
    zero = request(conn, method=b"POST", headers=fields((b"Content-Length", b"0")), end=False)
    assert zero.framing == NO_BODY


# --- our own mistakes: loud, and nothing changes ---------------------------------------


def snapshot(conn: Connection) -> tuple[object, ...]:
    return (conn.reader, conn.writer, list(conn.queue), conn.answered, conn.timer, conn.reading)


@pytest.mark.parametrize(
    "mistake",
    [
        "body beyond Content-Length",
        "end before Content-Length",
        "second final head",
        "CR in our header",
        "CL and TE in our head",
        "no status",
        "100 outside want_body",
    ],
)
def test_our_protocol_violations_raise_and_change_nothing(mistake: str) -> None:
    conn = Connection()
    exchange = request(conn)
    if mistake in ("body beyond Content-Length", "end before Content-Length", "second final head"):
        conn.start_response(exchange, 200, [(b"Content-Length", b"5")])
        conn.send_data(exchange, 4)
    before = snapshot(conn)
    with pytest.raises(LocalProtocolError):
        if mistake == "body beyond Content-Length":
            conn.send_data(exchange, 2)
        elif mistake == "end before Content-Length":
            conn.end_response(exchange)  # a truncated body that would look complete
        elif mistake == "second final head":
            conn.start_response(exchange, 200, [(b"Content-Length", b"5")])
        elif mistake == "CR in our header":
            conn.start_response(exchange, 200, [(b"X-A", b"a\r\nSet-Cookie: x")])
        elif mistake == "CL and TE in our head":
            conn.start_response(
                exchange, 200, [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")]
            )
        elif mistake == "no status":
            conn.start_response(exchange, 99, [])
        else:
            conn.start_response(exchange, 100, [])
    assert snapshot(conn) == before


def test_no_chunked_and_no_1xx_to_an_http10_client() -> None:
    conn = Connection()
    exchange = request(conn, headers=[], version=(1, 0))
    with pytest.raises(LocalProtocolError):
        conn.start_response(exchange, 200, [(b"Transfer-Encoding", b"chunked")])
    with pytest.raises(LocalProtocolError):
        conn.start_response(exchange, 103, [])
    assert respond(conn, exchange) == b"close"


def test_informational_responses_before_the_final_one() -> None:
    conn = Connection()
    exchange = request(conn)
    assert conn.start_response(exchange, 103, [(b"Link", b"</a.css>")]).framing == NO_BODY
    assert conn.writer is Writer.SEND_RESPONSE and exchange.informational == [103]
    respond(conn, exchange)
    assert conn.writer is Writer.IDLE


def test_feeding_the_parser_out_of_order_is_our_bug() -> None:
    conn = Connection()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(1)  # no request
    with pytest.raises(LocalProtocolError):
        conn.receive_end()
    exchange = request(conn, method=b"PUT", headers=fields((b"Content-Length", b"2")), end=False)
    with pytest.raises(LocalProtocolError):
        conn.receive_data(3)  # beyond its Content-Length: our counting is wrong
    with pytest.raises(LocalProtocolError):
        conn.receive_end()  # before its Content-Length
    assert exchange.received == 0
    with pytest.raises(LocalProtocolError):
        conn.receive_error(200)


# --- timers and the end of a connection -------------------------------------------------


def test_one_timer_per_state() -> None:
    conn = Connection()
    assert conn.timer is Timer.KEEP_ALIVE
    conn.receive_head_start()
    assert conn.timer is Timer.HEADER
    exchange = request(conn, method=b"PUT", headers=fields((b"Content-Length", b"4")), end=False)
    assert conn.timer is Timer.BODY
    conn.pause_writing()
    assert conn.timer is Timer.SEND  # our writes are blocked: the send timer, not the body's
    conn.resume_writing()
    conn.receive_data(4)
    conn.receive_end()
    assert conn.timer is Timer.NONE  # waiting on our side (handler, upstream)
    conn.start_response(exchange, 200, [(b"Content-Length", b"9")])
    conn.pause_writing()
    assert conn.timer is Timer.SEND
    conn.resume_writing()
    conn.send_data(exchange, 9)
    conn.end_response(exchange)
    assert conn.timer is Timer.KEEP_ALIVE


def test_eof_between_requests_still_answers_what_is_owed_then_closes() -> None:
    conn = Connection()
    first, second = request(conn), request(conn)
    conn.receive_eof()
    assert conn.reader is Reader.CLOSED and not conn.reading
    respond(conn, first)
    assert conn.current is second
    respond(conn, second)
    assert conn.must_close


def test_eof_when_idle_closes() -> None:
    conn = Connection()
    conn.receive_eof()
    assert conn.must_close and conn.timer is Timer.NONE


def test_eof_inside_a_body_truncates_it_and_closes_after_its_response() -> None:
    conn = Connection()
    exchange = request(conn, method=b"PUT", headers=fields((b"Content-Length", b"9")), end=False)
    conn.receive_data(2)
    conn.receive_eof()
    assert exchange.truncated and not exchange.keep_alive
    assert respond(conn, exchange, status=400) == b"close"
    assert conn.must_close


def test_abort_ends_everything() -> None:
    conn = Connection()
    exchange = request(conn)
    conn.start_response(exchange, 200, [(b"Content-Length", b"100")])
    conn.abort()  # the upstream failed mid-body: abort, never end
    assert conn.writer is Writer.CLOSED and not conn.reading and conn.current is None
    with pytest.raises(LocalProtocolError):
        conn.send_data(exchange, 1)


# --- the pieces the upstream side shares ------------------------------------------------


def test_response_framing_for_the_upstream_side() -> None:
    def framing(method: bytes, status: int, *headers: tuple[bytes, bytes]) -> Framing:
        return response_framing(method, status, scan_fields(list(headers)))

    assert framing(b"GET", 200, (b"Content-Length", b"7")) == Framing(Body.LENGTH, 7)
    assert framing(b"GET", 200, (b"Transfer-Encoding", b"chunked")).body is Body.CHUNKED
    assert framing(b"GET", 200, (b"Transfer-Encoding", b"gzip")) == UNTIL_CLOSE
    assert framing(b"GET", 200) == UNTIL_CLOSE
    assert framing(b"HEAD", 200, (b"Content-Length", b"7")) == NO_BODY
    assert framing(b"GET", 100) == NO_BODY
    assert framing(b"CONNECT", 200) == TUNNEL
    assert framing(b"CONNECT", 407, (b"Content-Length", b"1")) == Framing(Body.LENGTH, 1)
    for bad in ([(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")],
                [(b"Content-Length", b"1"), (b"Content-Length", b"2")]):  # fmt: skip
        with pytest.raises(FramingError) as caught:
            framing(b"GET", 200, *bad)
        assert caught.value.status in (400, 502)


def test_keep_alive_rule_is_the_same_both_ways() -> None:
    assert keep_alive_requested((1, 1), frozenset()) is True
    assert keep_alive_requested((1, 1), frozenset({b"close"})) is False
    assert keep_alive_requested((1, 0), frozenset()) is False
    assert keep_alive_requested((1, 0), frozenset({b"keep-alive"})) is True
    assert keep_alive_requested((1, 0), frozenset({b"keep-alive", b"close"})) is False


# --- random event sequences -------------------------------------------------------------

HEADS = [
    [HOST],
    [HOST, (b"Content-Length", b"3")],
    [HOST, (b"Transfer-Encoding", b"chunked")],
    [HOST, (b"Content-Length", b"3"), (b"Expect", b"100-continue")],
    [HOST, (b"Connection", b"close")],
    [HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")],
    [HOST, (b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")],
    [HOST, (b"Expect", b"tea")],
    [(b"Connection", b"keep-alive")],
    [],
]
RESPONSE_HEADS = [
    [(b"Content-Length", b"3")],
    [(b"Content-Length", b"0")],
    [(b"Transfer-Encoding", b"chunked")],
    [],
    [(b"Content-Length", b"3"), (b"Connection", b"close")],
]


class RandomShell(RuleBasedStateMachine):
    """Any sequence of parser events and response steps, sane or not.

    Every step either is accepted or raises LocalProtocolError and changes nothing; the
    states stay defined and consistent; every final response goes to the oldest request
    not yet answered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conn = Connection(pipeline_limit=2, max_body_size=1000)
        self.exchanges: list[Exchange] = []
        self.started: list[int] = []

    def attempt(self, action, *args):  # type: ignore[no-untyped-def]
        before = snapshot(self.conn)
        try:
            return action(*args)
        except LocalProtocolError:
            assert snapshot(self.conn) == before
            return None

    def target(self, pick: int) -> Exchange | None:
        if pick == 0 or not self.exchanges:
            return self.conn.current
        return self.exchanges[pick % len(self.exchanges)]

    @rule()
    def head_start(self) -> None:
        self.attempt(self.conn.receive_head_start)

    @rule(
        method=st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT"]),
        version=st.sampled_from([(1, 1), (1, 1), (1, 0), (2, 0)]),
        headers=st.sampled_from(HEADS),
        complete=st.booleans(),
    )
    def head(
        self,
        method: bytes,
        version: tuple[int, int],
        headers: list[tuple[bytes, bytes]],
        complete: bool,
    ) -> None:
        exchange = self.attempt(self.conn.receive_head, method, b"/", version, headers)
        if exchange is not None:
            assert exchange.number == len(self.exchanges)
            self.exchanges.append(exchange)
            if complete:  # a bodiless request's end comes with its head
                self.attempt(self.conn.receive_end)

    @rule(size=st.integers(0, 4))
    def data(self, size: int) -> None:
        self.attempt(self.conn.receive_data, size)

    @rule()
    def end(self) -> None:
        self.attempt(self.conn.receive_end)

    # the rules that end a connection fire one time in six: sequences live long enough
    @rule(status=st.sampled_from([400, 413, 431]), fire=st.integers(0, 5))
    def error(self, status: int, fire: int) -> None:
        if fire:
            return
        broken = self.attempt(self.conn.receive_error, status)
        if broken is not None and broken not in self.exchanges:
            assert broken.number == len(self.exchanges)
            self.exchanges.append(broken)

    @rule(fire=st.integers(0, 5))
    def eof(self, fire: int) -> None:
        if not fire:
            self.attempt(self.conn.receive_eof)

    @rule(pick=st.integers(0, 3))
    def want_body(self, pick: int) -> None:
        exchange = self.target(pick)
        if exchange is not None:
            self.attempt(self.conn.want_body, exchange)

    @rule(
        pick=st.integers(0, 3),
        status=st.sampled_from([101, 103, 200, 200, 204, 304, 400, 413, 417, 500]),
        headers=st.sampled_from(RESPONSE_HEADS),
    )
    def start_response(self, pick: int, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        exchange = self.target(pick)
        if exchange is None:
            return
        answered = self.conn.answered
        if self.attempt(self.conn.start_response, exchange, status, headers) is not None and (
            status >= 200 or self.conn.switched
        ):
            # strictly in order: the oldest request not answered yet, never one skipped
            assert exchange.number == answered
            assert self.started == [] or exchange.number > self.started[-1]
            self.started.append(exchange.number)

    @rule(pick=st.integers(0, 3), size=st.integers(0, 4))
    def send_data(self, pick: int, size: int) -> None:
        exchange = self.target(pick)
        if exchange is not None:
            self.attempt(self.conn.send_data, exchange, size)

    @rule(pick=st.integers(0, 3))
    def end_response(self, pick: int) -> None:
        exchange = self.target(pick)
        if exchange is not None:
            self.attempt(self.conn.end_response, exchange)

    @rule(status=st.sampled_from([200, 204, 400]))
    def respond_to_current(self, status: int) -> None:
        """A whole response to the request being answered (the sane shell's step)."""
        exchange = self.conn.current
        if exchange is not None:
            answered = self.conn.answered
            start = self.attempt(
                self.conn.start_response, exchange, status, [(b"Content-Length", b"3")]
            )
            if start is not None:
                assert exchange.number == answered
                self.started.append(exchange.number)
                if start.framing.body is Body.LENGTH:
                    self.attempt(self.conn.send_data, exchange, 3)
                self.attempt(self.conn.end_response, exchange)

    @rule(paused=st.booleans())
    def writing(self, paused: bool) -> None:
        (self.conn.pause_writing if paused else self.conn.resume_writing)()

    @precondition(lambda self: len(self.exchanges) > 2)
    @rule()
    def abort(self) -> None:
        self.conn.abort()

    @invariant()
    def consistent(self) -> None:
        conn = self.conn
        assert conn.reader in Reader and conn.writer in Writer
        assert conn.timer in Timer and conn.reading in (True, False)
        numbers = [e.number for e in conn.queue]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        # nothing of a response went out for a request behind the one being answered
        assert all(e.status is None and not e.informational for e in list(conn.queue)[1:])
        if conn.writer is Writer.IDLE:
            assert not conn.queue and conn.reader not in (Reader.DONE, Reader.CLOSED, Reader.ERROR)
        if conn.writer in (Writer.SEND_RESPONSE, Writer.SEND_BODY):
            assert conn.current is conn.queue[0] and conn.current.number == conn.answered
        else:
            assert conn.current is None
        assert (conn.writer is Writer.SWITCHED) == (conn.reader is Reader.SWITCHED)
        if conn.reader is Reader.BODY:
            assert conn.queue and not conn.queue[-1].request_complete
        if conn.reading:
            assert conn.writer in (Writer.IDLE, Writer.SEND_RESPONSE, Writer.SEND_BODY)
        if conn.writer in (Writer.MUST_CLOSE, Writer.CLOSED, Writer.SWITCHED):
            assert not conn.reading


RandomShell.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_event_sequences = RandomShell.TestCase


# --- the head's bytes -----------------------------------------------------------------------


def test_a_head_is_its_start_line_and_fields_and_an_empty_line() -> None:
    fields = encode_fields([("Content-Length", "5"), ("ETag", '"x"')])
    assert encode_head(b"HTTP/1.1 200 OK", fields) == (
        b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: "x"\r\n\r\n'
    )
    assert encode_head(b"GET / HTTP/1.1", []) == b"GET / HTTP/1.1\r\n\r\n"


def test_bytes_that_are_not_utf8_go_out_as_they_came() -> None:
    value = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # as the parsers decode it
    assert encode_fields([("X-Name", value)]) == [(b"X-Name", b"caf\xe9 \xff")]
    # a surrogate that stands for no byte (no parser makes one): "?", never an exception
    assert encode_fields([("X-Odd", "a\ud800b")]) == [(b"X-Odd", b"a?b")]


@pytest.mark.parametrize(
    "fields",
    [
        [(b"X-A", b"1\r\nSet-Cookie: evil=1")],
        [(b"X-A", b"1\nX-B: 2")],
        [(b"X-A", b"1\x00")],
        [(b"X-A\r\nX-B", b"1")],
    ],
)
def test_cr_lf_or_nul_in_a_field_is_never_written(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_head(b"HTTP/1.1 200 OK", fields)
