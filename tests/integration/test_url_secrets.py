"""Keys a custom HTTP connector carries in its URL: masked on read, kept when saved back, sent as
they are, and found in no Redis value, log record or error text."""

from __future__ import annotations

import grpc
import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.connector_store import ConnectorStore
from tests.canary import hits, redis_dump, secret_needles
from tests.conftest import serving
from tests.integration.test_receipts_harness import log_text
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration

KEY = "gw-url-k3y-5f0c1e"
FAILING_KEY = "gw-url-k3y-failing-77"
MASK = "********"


def gateway_connector(connector_id: str, url: str) -> pb.Connector:
    return pb.Connector(
        workspace_id="ws-1",
        connector_id=connector_id,
        kind=pb.CONNECTOR_KIND_CUSTOM_HTTP,
        channel=common_pb2.CHANNEL_SMS,
        sender="Brand",
        custom_http=pb.CustomHttpTemplate(method="GET", url=url, message_id_path="id"),
    )


async def test_a_key_in_a_custom_connector_url_is_masked_kept_sent_and_reaches_no_sink(
    start_resolver, start_dispatcher, pii_api, customers, redis, captured_logs
):
    keys_seen: list[str] = []

    async def send(request: web.Request) -> web.Response:
        keys_seen.append(request.query.get("api_key", ""))
        return web.json_response({"id": "gw-message-1"})

    async def refuse(request: web.Request) -> web.Response:
        # A gateway that quotes the request it refused, key and all.
        return web.json_response({"error": f"rejected {request.url}"}, status=500)

    app = web.Application()
    app.router.add_get("/send", send)
    app.router.add_get("/fail", refuse)
    texts: list[str] = []  # what callers are handed back
    async with serving(app) as gateway:
        resolver = await start_resolver()
        dispatcher = await start_dispatcher(resolver)
        sms_config = single_config(pii_api.base_url, channel=common_pb2.CHANNEL_SMS)
        await resolver.stub.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=sms_config))
        url = f"{gateway}/send?api_key={KEY}&from=Brand&to=@to&text=@text"
        put = await dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=gateway_connector("gw", url)))
        read = await dispatcher.stub.GetConnector(pb.GetConnectorRequest(workspace_id="ws-1", connector_id="gw"))
        texts += [str(put), str(read)]
        assert read.connector.custom_http.url == f"{gateway}/send?api_key={MASK}&from=Brand&to=@to&text=@text"
        assert put.connector == read.connector

        # Saved back as read, another field changed: the key stays as it was saved.
        read.connector.rate_limit_per_second = 50
        await dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=read.connector))
        store = ConnectorStore(dispatcher.deps.redis, dispatcher.deps.box)
        assert (await store.load("ws-1", "gw")).custom_http.url == url

        # Read back and pointed at another host, the mask is refused, never sent there.
        moved = pb.Connector()
        moved.CopyFrom(read.connector)
        moved.custom_http.url = moved.custom_http.url.replace("127.0.0.1", "localhost")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=moved))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("connector.custom_http.url: holds a masked value")
        texts.append(caught.value.details())

        anonymous_id = next(iter(customers))
        sent = await dispatcher.stub.Dispatch(dispatch_request("gw", anonymous_id, "sent"))
        assert [r.status for r in sent.results] == [pb.DISPATCH_STATUS_SENT]
        assert keys_seen == [KEY]  # the real key went out

        failing = f"{gateway}/fail?api_key={FAILING_KEY}&to=@to"
        await dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=gateway_connector("gw-fail", failing)))
        failed = await dispatcher.stub.Dispatch(dispatch_request("gw-fail", anonymous_id, "failed"))
        assert [r.status for r in failed.results] == [pb.DISPATCH_STATUS_SEND_FAILED]
        texts += [str(sent), str(failed)]

    # The test's own gateway logs each request line it serves (aiohttp.access): that log is the peer's.
    captured_logs.records[:] = [r for r in captured_logs.records if r.name != "aiohttp.access"]
    stored = await redis_dump(redis)
    sinks = [*stored, *log_text(captured_logs), *texts]
    assert any(b"custom attempt" in line for line in log_text(captured_logs))  # the failing sends were logged
    assert hits(secret_needles(KEY, FAILING_KEY), sinks) == []


async def test_a_connector_saved_before_url_keys_were_masked_reads_back_masked_and_sends_its_key(
    start_resolver, start_dispatcher, pii_api, customers
):
    """The sealed record is the same as before: one written by an older version loads, masks and sends."""
    keys_seen: list[str] = []

    async def send(request: web.Request) -> web.Response:
        keys_seen.append(request.query.get("key", ""))
        return web.json_response({"id": "gw-message-2"})

    app = web.Application()
    app.router.add_get("/send", send)
    async with serving(app) as gateway:
        resolver = await start_resolver()
        dispatcher = await start_dispatcher(resolver)
        sms_config = single_config(pii_api.base_url, channel=common_pb2.CHANNEL_SMS)
        await resolver.stub.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=sms_config))
        store = ConnectorStore(dispatcher.deps.redis, dispatcher.deps.box)
        await store.save(gateway_connector("old", f"{gateway}/send?key={KEY}&to=@to"))
        read = await dispatcher.stub.GetConnector(pb.GetConnectorRequest(workspace_id="ws-1", connector_id="old"))
        assert read.connector.custom_http.url == f"{gateway}/send?key={MASK}&to=@to"
        sent = await dispatcher.stub.Dispatch(dispatch_request("old", next(iter(customers)), "old"))
        assert [r.status for r in sent.results] == [pb.DISPATCH_STATUS_SENT]
        assert keys_seen == [KEY]


def dispatch_request(connector_id: str, anonymous_id: str, instance: str) -> pb.DispatchRequest:
    return pb.DispatchRequest(
        workspace_id="ws-1",
        campaign_id="spring",
        campaign_instance_id=instance,
        channel=common_pb2.CHANNEL_SMS,
        connector_id=connector_id,
        content=pb.Content(sms_body="Hello"),
        recipients=[pb.Recipient(anonymous_id=anonymous_id)],
    )
