from aiohttp import web

from tests.conftest import get_json


async def test_proxies_a_get_and_reports_it(start_backend, start_proxy, client):
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    backend = await start_backend(app)
    proxy = start_proxy(backend.url)
    async with client.get(f"{proxy.url}/hello") as resp:
        assert resp.status == 200
        assert await resp.text() == "hello"
    stats = await get_json(client, f"{proxy.url}/stats")
    assert stats["performance_optimizer"]["metrics"]["total_requests"] == 1
