"""The webhook server takes on a bounded number of requests at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.receipts.webhooks import concurrency_limit

Handler = Callable[[web.Request], Awaitable[web.Response]]


def answer(text: str) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=text)

    return handler


@asynccontextmanager
async def slots_held(routes: list[tuple[str, str, Handler]]) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A server allowing two requests at once, both held by slow webhooks for the block; `routes` beside."""
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application(middlewares=[concurrency_limit(2)])
    app.router.add_post("/webhooks/x", slow)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.port}"
            held = [asyncio.create_task(http.post(f"{url}/webhooks/x")) for _ in range(2)]
            await asyncio.sleep(0.2)
            yield http, url
            release.set()
            for task in held:
                reply = await task
                assert reply.status == 200
                reply.release()
            async with http.post(f"{url}/webhooks/x") as again:
                assert again.status == 200  # the slots are free again
    finally:
        await server.close()


async def test_requests_past_the_limit_are_answered_503_with_retry_after() -> None:
    async with slots_held([("GET", "/healthz", answer("ok"))]) as (http, url):
        async with http.post(f"{url}/webhooks/x") as refused:
            assert refused.status == 503 and refused.headers["Retry-After"] == "1"
        async with http.get(f"{url}/healthz") as health:
            assert health.status == 200  # not counted against the limit


async def test_one_click_unsubscribes_have_slots_of_their_own() -> None:
    """Webhooks holding every slot (slow bodies, a burst) do not keep anyone from unsubscribing."""
    async with slots_held([("POST", "/unsubscribe/{token}", answer("unsubscribed"))]) as (http, url):
        async with http.post(f"{url}/webhooks/x") as refused:
            assert refused.status == 503
        async with http.post(f"{url}/unsubscribe/token", data=b"List-Unsubscribe=One-Click") as reply:
            assert reply.status == 200
