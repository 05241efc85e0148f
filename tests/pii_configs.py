"""PII API configs pointing at the sample PII API, as a brand would enter them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

NAME_PATHS = {"first_name": "profile.first_name", "last_name": "profile.last_name"}


def single_config(base_url: str, workspace_id: str = "ws-1", channel: int = common_pb2.CHANNEL_EMAIL, **fields: Any):
    contact = "customer.email" if channel == common_pb2.CHANNEL_EMAIL else "customer.phone"
    values: dict[str, Any] = dict(
        workspace_id=workspace_id,
        channel=channel,
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url=f"{base_url}/v1/customers/@anonymous_id",
        contact_path=contact,
        attribute_paths={k: f"customer.{v}" for k, v in NAME_PATHS.items()},
        timeout_ms=2000,
    )
    values.update(fields)
    return pb.PiiApiConfig(**values)


def bulk_config(base_url: str, workspace_id: str = "ws-1", channel: int = common_pb2.CHANNEL_EMAIL, **fields: Any):
    contact = "email" if channel == common_pb2.CHANNEL_EMAIL else "phone"
    values: dict[str, Any] = dict(
        workspace_id=workspace_id,
        channel=channel,
        mode=pb.MODE_BULK,
        method=pb.HTTP_METHOD_POST,
        url=f"{base_url}/v1/customers:batchGet",
        body='{"ids": "@anonymous_ids"}',
        results_path="data.results",
        id_path="id",
        contact_path=contact,
        attribute_paths=dict(NAME_PATHS),
        batch_size=100,
        timeout_ms=2000,
    )
    values.update(fields)
    return pb.PiiApiConfig(**values)


def customers_api(record: Callable[[str], dict[str, Any]]) -> web.Application:
    """A PII API answering both configs above with `record(anonymous_id)`: single `{"customer": record}`,
    bulk `{"data": {"results": [record, ...]}}`."""

    async def single(request: web.Request) -> web.Response:
        return web.json_response({"customer": record(request.match_info["id"])})

    async def bulk(request: web.Request) -> web.Response:
        ids = json.loads(await request.read())["ids"]
        return web.json_response({"data": {"results": [record(i) for i in ids]}})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", single)
    app.router.add_post("/v1/customers:batchGet", bulk)
    return app
