"""What a request holds of a replica, given back whatever ends it: real replica processes
(tests/replica_backend.py) behind ``fileproxy serve``, clients that leave at each await
of a request's life, and the counters of /health and /stats read back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Process, get_json
from tests.integration.test_replicas import counts, replica_list

MIB = 1024 * 1024
# the proxy's socket send buffer small, the client's receive window small: a client that
# stops reading holds the relay back after a few dozen KiB (see tests/integration/test_spool)
SMALL_SNDBUF = "32768"


async def counters(client: aiohttp.ClientSession, proxy: Process) -> dict[str, Any]:
    """Everything a request holds while it runs, as /health and /stats show them."""
    health = await get_json(client, f"{proxy.url}/health")
    stats = await get_json(client, f"{proxy.url}/stats")
    upstreams = health["upstreams"]
    return {
        "traffic.in_flight": health["in_flight"],
        "retries.in_progress": stats["retries"]["in_progress"],
        "spool.active": health["spool"]["active"],
        **{f"{name}.in_flight": u["in_flight"] for name, u in upstreams.items()},
        **{f"{name}.waiting": u["waiting_for_connection"] for name, u in upstreams.items()},
        **{f"{name}.in_use": u["connections"]["in_use"] for name, u in upstreams.items()},
    }


async def all_back_to_zero(client: aiohttp.ClientSession, proxy: Process) -> None:
    deadline = time.monotonic() + 15
    while True:
        now = await counters(client, proxy)
        if not any(now.values()):
            assert "replica in_flight below zero" not in proxy.log_text()  # ended twice
            return
        assert time.monotonic() < deadline, {k: v for k, v in now.items() if v}
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def raw_get(
    proxy: Process, path: str, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A GET on a raw connection that the test cuts (abort) when the block ends."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
    sock.connect(("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        yield reader, writer
    finally:
        writer.transport.abort()  # the client is gone: its handler is cancelled


async def read_body_bytes(reader: asyncio.StreamReader, at_least: int) -> None:
    await reader.readuntil(b"\r\n\r\n")
    got = 0
    while got < at_least:
        data = await reader.read(64 * 1024)
        assert data, f"closed after {got} body bytes"
        got += len(data)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An address whose connects hang: a listener that never accepts, its queue full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield f"http://127.0.0.1:{port}"
    for sock in (*fillers, listener):
        sock.close()


async def test_a_client_leaving_while_a_try_connects(start_replica, start_proxy, client, blackhole):
    proxy = start_proxy(replica_list(blackhole, start_replica()), FILEPROXY_EJECT_AFTER="0")
    name = blackhole.removeprefix("http://")
    for _ in range(10):  # until a request's try hangs in the connect to the blackhole
        async with raw_get(proxy, "/files/4k.bin") as (reader, _):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await reader.readuntil(b"\r\n\r\n")
                    continue  # answered by the other replica
            assert (await counters(client, proxy))[f"{name}.in_flight"] == 1
            break
    else:
        pytest.fail("no try went to the unreachable replica")
    await all_back_to_zero(client, proxy)


async def test_a_client_leaving_while_it_waits_for_a_pooled_connection(
    start_replica, start_proxy, client
):
    replica = start_replica(ttfb=30)
    proxy = start_proxy(replica_list(replica), HTTP_CONNECTOR_LIMIT_PER_HOST="1")
    name = f"127.0.0.1:{replica.port}"
    async with raw_get(proxy, "/files/4k.bin"):  # holds the only connection for 30 s
        await until(
            lambda: _is(client, proxy, f"{name}.in_use", 1), "the first request is not sent"
        )
        async with raw_get(proxy, "/files/4k.bin"):
            await until(lambda: _is(client, proxy, f"{name}.waiting", 1), "nobody waits")
        # the second client left: it no longer waits, while the first still holds it
        await until(
            lambda: _is(client, proxy, f"{name}.waiting", 0), "a cancelled waiter counts", 10
        )
        now = await counters(client, proxy)
        assert now[f"{name}.in_flight"] == 1 and now[f"{name}.in_use"] == 1, now
    await all_back_to_zero(client, proxy)


async def _is(client: aiohttp.ClientSession, proxy: Process, key: str, value: int) -> bool:
    return bool((await counters(client, proxy))[key] == value)


async def test_a_client_leaving_while_the_replica_thinks(start_replica, start_proxy, client):
    replica = start_replica(ttfb=5)
    proxy = start_proxy(replica_list(replica, start_replica(ttfb=5)))
    async with raw_get(proxy, "/files/4k.bin"):
        await asyncio.sleep(0.5)
        assert (await counters(client, proxy))["traffic.in_flight"] == 1
    await all_back_to_zero(client, proxy)


async def test_a_client_leaving_while_a_retry_waits(start_replica, start_proxy, client):
    """The first try answers 503, the retry waits on a slow replica: its budget slot."""
    failing, slow = start_replica(status=503), start_replica(ttfb=5)
    proxy = start_proxy(replica_list(failing, slow), FILEPROXY_EJECT_AFTER="0")
    for _ in range(20):  # until a request went to the failing replica first
        async with raw_get(proxy, "/files/4k.bin"):
            await asyncio.sleep(0.3)
            now = await counters(client, proxy)
            if now["retries.in_progress"]:
                assert now[f"127.0.0.1:{slow.port}.in_flight"] == 1, now
                break
    else:
        pytest.fail("no request was retried")
    await all_back_to_zero(client, proxy)


async def test_a_client_leaving_mid_body(start_replica, start_proxy, client):
    replicas = [start_replica(pace=MIB), start_replica(pace=MIB)]
    proxy = start_proxy(replica_list(*replicas), FILEPROXY_SPOOL="off")
    async with raw_get(proxy, "/files/16m.bin") as (reader, _):
        await read_body_bytes(reader, 256 * 1024)
    await all_back_to_zero(client, proxy)


async def test_a_client_leaving_while_a_resume_asks_a_replica(start_replica, start_proxy, client):
    """Every body is cut after 1 MiB and every continuation (a Range request) takes 5 s
    to answer: the client leaves while the proxy asks for it."""
    replicas = [start_replica(reset_after=MIB, range_ttfb=5) for _ in range(2)]
    proxy = start_proxy(replica_list(*replicas), FILEPROXY_EJECT_AFTER="0", FILEPROXY_SPOOL="off")
    names = [f"127.0.0.1:{r.port}" for r in replicas]
    async with raw_get(proxy, "/files/16m.bin") as (reader, _):
        await read_body_bytes(reader, MIB)

        async def asking() -> bool:
            now = await counters(client, proxy)
            return bool(sum(now[f"{n}.in_flight"] for n in names) == 2)  # cut one + asked one

        await until(asking, "the proxy does not ask for the continuation")
    await all_back_to_zero(client, proxy)


async def test_a_client_leaving_while_its_download_is_spooled(start_replica, start_proxy, client):
    # paced: the filler is still reading the upstream when the client leaves
    replicas = [start_replica(pace=4 * MIB) for _ in range(2)]
    proxy = start_proxy(replica_list(*replicas), FILEPROXY_SO_SNDBUF=SMALL_SNDBUF)
    async with raw_get(proxy, "/files/64m.bin", rcvbuf=16384) as (reader, _):
        await reader.readuntil(b"\r\n\r\n")  # then reads no more
        await until(lambda: _is(client, proxy, "spool.active", 1), "never spooled", 30)
    await all_back_to_zero(client, proxy)


async def test_a_retried_request_charges_each_replica_only_its_own_try(
    start_replica, start_proxy, client
):
    """A try that failed after 1 s (a 503) is not part of the next replica's time to the
    response head: that one answered in milliseconds and is charged milliseconds."""
    failing, good = start_replica(status=503, ttfb=1.0), start_replica()
    proxy = start_proxy(replica_list(failing, good), FILEPROXY_EJECT_AFTER="0")
    for _ in range(10):  # until a request went to the failing replica first
        async with client.get(f"{proxy.url}/files/4k.bin") as resp:
            assert resp.status == 200
            await resp.read()
        if (await counts(client, failing)).get("GET", 0):
            break
    else:
        pytest.fail("no request went to the failing replica")
    health = await get_json(client, f"{proxy.url}/health")
    assert health["upstreams"][f"127.0.0.1:{good.port}"]["ttfb_ewma_ms"] < 500, health


async def test_an_upload_is_not_charged_as_the_replicas_time_to_answer(
    start_replica, start_proxy, client
):
    """A request body the client takes 1.2 s to send is the client's link: a replica that
    answers as soon as it has the whole request is charged milliseconds, not the upload."""
    replicas = [start_replica(), start_replica()]
    proxy = start_proxy(replica_list(*replicas))

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 1024
            await asyncio.sleep(0.15)

    for _ in range(4):  # one replica gets two in a row: the peak rule then takes them
        async with client.post(f"{proxy.url}/files/4k.bin", data=slow_body()) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
    health = await get_json(client, f"{proxy.url}/health")
    ttfb = {r.port: health["upstreams"][f"127.0.0.1:{r.port}"]["ttfb_ewma_ms"] for r in replicas}
    assert max(ttfb.values()) < 500, ttfb


async def test_a_spooled_download_frees_its_replica_once_the_upstream_body_is_in(
    start_replica, start_proxy, client
):
    """The client reads nothing: its download is spooled, the upstream body is read whole
    at the replica's pace, and from then on the replica is not loaded by it (in_flight
    0) and its goodput is the upstream's, not the client's (which is nil)."""
    replicas = [start_replica(), start_replica()]
    proxy = start_proxy(replica_list(*replicas), FILEPROXY_SO_SNDBUF=SMALL_SNDBUF)
    names = [f"127.0.0.1:{r.port}" for r in replicas]
    async with raw_get(proxy, "/files/16m.bin", rcvbuf=16384) as (reader, _):
        await reader.readuntil(b"\r\n\r\n")  # then reads no more
        await until(lambda: _is(client, proxy, "spool.active", 1), "never spooled", 30)

        async def replicas_free() -> bool:
            now = await counters(client, proxy)
            return not any(now[f"{n}.in_flight"] for n in names)

        await until(replicas_free, "the replica counts a spooled download as its load", 30)
        health = await get_json(client, f"{proxy.url}/health")
        assert health["spool"]["active"] == 1  # the client still has most of it to read
        goodputs = [health["upstreams"][n]["goodput_ewma_bps"] for n in names]
        assert any(g is not None and g > 4 * MIB for g in goodputs), goodputs
    await all_back_to_zero(client, proxy)


async def sequential_gets(client: aiohttp.ClientSession, proxy: Process, n: int) -> None:
    for _ in range(n):
        async with client.get(f"{proxy.url}/files/4k.bin") as resp:
            assert resp.status == 200
            await resp.read()


async def test_identical_replicas_get_even_shares(start_replica, start_proxy, client):
    """Three identical replicas: each gets its third +-50%, one request at a time (the
    first answer of each on a cold connection) and four at a time."""
    replicas = [start_replica() for _ in range(3)]
    proxy = start_proxy(replica_list(*replicas))

    async def served() -> list[int]:
        return [(await counts(client, r)).get("GET", 0) for r in replicas]

    await sequential_gets(client, proxy, 90)
    sequential = await served()
    assert all(15 <= n <= 45 for n in sequential), sequential
    await asyncio.gather(*(sequential_gets(client, proxy, 45) for _ in range(4)))
    concurrent = [n - before for n, before in zip(await served(), sequential, strict=True)]
    assert all(30 <= n <= 90 for n in concurrent), concurrent
