"""The upstream connection pool against a real listening backend: slots, FIFO, expiry."""

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from fileproxy.upstream.pool import ConnectionPool


def _plain_socket(info) -> socket.socket:
    return socket.socket(info[0], info[1], info[2])


def _pool(port: int, **options) -> ConnectionPool:
    defaults = {"limit": 1, "keepalive_timeout": 30.0, "dns_ttl": 10.0}
    return ConnectionPool("127.0.0.1", port, new_socket=_plain_socket, **{**defaults, **options})


@pytest.fixture
async def backend_port(start_backend) -> int:
    backend = await start_backend(web.Application())
    return int(backend.url.rsplit(":", 1)[1])


async def test_waiters_get_the_slot_in_arrival_order_and_a_cancelled_one_passes_it_on(
    backend_port,
):
    pool = _pool(backend_port, limit=1)
    try:
        first, reused = await pool.acquire(1.0)
        assert not reused
        order: list[str] = []

        async def take(name: str) -> None:
            protocol, _ = await pool.acquire(1.0)
            order.append(name)
            await asyncio.sleep(0.01)
            pool.release(protocol, True)

        b = asyncio.create_task(take("b"))
        c = asyncio.create_task(take("c"))
        d = asyncio.create_task(take("d"))
        await asyncio.sleep(0.05)
        assert pool.in_use == 1 and not order
        b.cancel()
        pool.release(first, True)
        await asyncio.gather(c, d)
        assert order == ["c", "d"]
        assert b.cancelled()
        assert pool.in_use == 0 and pool.idle == 1  # one connection served them all
    finally:
        pool.close()


async def test_a_waiter_cancelled_after_it_was_handed_the_slot_gives_it_on(backend_port):
    pool = _pool(backend_port, limit=1)
    try:
        first, _ = await pool.acquire(1.0)
        handed = asyncio.create_task(pool.acquire(1.0))
        after = asyncio.create_task(pool.acquire(1.0))
        await asyncio.sleep(0.05)
        pool.release(first, True)  # hands the slot to `handed` ...
        handed.cancel()  # ... which is cancelled before it runs
        protocol, reused = await asyncio.wait_for(after, 2.0)
        assert reused
        assert pool.in_use == 1
        pool.release(protocol, True)
    finally:
        pool.close()


async def test_idle_connections_expire_after_the_keepalive_timeout(backend_port):
    pool = _pool(backend_port, limit=0, keepalive_timeout=0.3)
    try:
        protocols = [(await pool.acquire(1.0))[0] for _ in range(3)]
        for protocol in protocols:
            pool.release(protocol, True)
        assert pool.idle == 3
        await asyncio.sleep(0.6)
        assert pool.idle == 0
        assert all(not protocol.is_connected() for protocol in protocols)
    finally:
        pool.close()


async def test_idle_at_most_opens_a_new_connection_beside_an_older_idle_one(backend_port):
    pool = _pool(backend_port, limit=2)
    try:
        first, _ = await pool.acquire(1.0)
        pool.release(first, True)
        again, reused = await pool.acquire(1.0, idle_at_most=5.0)
        assert reused and again is first  # idle a moment only
        pool.release(again, True)
        await asyncio.sleep(0.3)
        fresh, reused = await pool.acquire(1.0, idle_at_most=0.2)
        assert not reused and fresh is not first
        assert pool.idle == 1 and pool.in_use == 1  # the idle one stays for the next
        pool.release(fresh, True)
        latest, reused = await pool.acquire(1.0)
        assert reused and latest is fresh  # the most recently used first
        pool.release(latest, True)
    finally:
        pool.close()


async def test_a_connection_given_back_unfinished_is_closed_not_pooled(backend_port):
    pool = _pool(backend_port, limit=2)
    try:
        protocol, _ = await pool.acquire(1.0)
        pool.release(protocol, False)
        assert pool.idle == 0 and pool.in_use == 0
        await asyncio.sleep(0.05)
        assert not protocol.is_connected()
    finally:
        pool.close()


async def test_refused_connect_is_aiohttps_connector_error_and_frees_the_slot():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        pool = _pool(port, limit=1)
        try:
            for _ in range(2):  # the slot of a failed connect is given back
                with pytest.raises(aiohttp.ClientConnectorError):
                    await pool.acquire(1.0)
            assert pool.in_use == 0
        finally:
            pool.close()
