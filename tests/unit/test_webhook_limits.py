"""The webhook server takes on a bounded number of requests at once."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.receipts.webhooks import concurrency_limit


async def test_requests_past_the_limit_are_answered_503_with_retry_after() -> None:
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[concurrency_limit(2)])
    app.router.add_post("/webhooks/x", slow)
    app.router.add_get("/healthz", healthz)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.port}"
            held = [asyncio.create_task(http.post(f"{url}/webhooks/x")) for _ in range(2)]
            await asyncio.sleep(0.2)
            async with http.post(f"{url}/webhooks/x") as refused:
                assert refused.status == 503 and refused.headers["Retry-After"] == "1"
            async with http.get(f"{url}/healthz") as health:
                assert health.status == 200  # not counted against the limit
            release.set()
            for task in held:
                reply = await task
                assert reply.status == 200
                reply.release()
            async with http.post(f"{url}/webhooks/x") as again:
                assert again.status == 200
    finally:
        await server.close()


async def test_one_click_unsubscribes_have_slots_of_their_own() -> None:
    """Webhooks holding every slot (slow bodies, a burst) do not keep anyone from unsubscribing."""
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    async def unsubscribe(_: web.Request) -> web.Response:
        return web.Response(text="unsubscribed")

    app = web.Application(middlewares=[concurrency_limit(2)])
    app.router.add_post("/webhooks/x", slow)
    app.router.add_post("/unsubscribe/{token}", unsubscribe)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.port}"
            held = [asyncio.create_task(http.post(f"{url}/webhooks/x")) for _ in range(2)]
            await asyncio.sleep(0.2)
            async with http.post(f"{url}/webhooks/x") as refused:
                assert refused.status == 503
            async with http.post(f"{url}/unsubscribe/token", data=b"List-Unsubscribe=One-Click") as reply:
                assert reply.status == 200
            release.set()
            for task in held:
                (await task).release()
    finally:
        await server.close()
