"""Listing and deleting connectors through the real dispatcher on real Redis."""

from __future__ import annotations

import time

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.integration.test_dispatcher_campaigns import dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
SMS = pb.Content(sms_body="Hi {{ first_name }}")


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_connectors_are_listed_by_id_in_pages_without_secrets(start_suite):
    suite = await start_suite()
    stub = suite.dispatcher.stub
    seen, token = [], ""
    while True:
        page = await stub.ListConnectors(
            pb.ListConnectorsRequest(workspace_id=suite.workspace_id, page_size=3, page_token=token)
        )
        assert len(page.connectors) <= 3
        seen += list(page.connectors)
        if not (token := page.next_page_token):
            break
    assert [(c.connector_id, c.kind, c.channel) for c in seen] == [
        ("gateway", pb.CONNECTOR_KIND_CUSTOM_HTTP, C.CHANNEL_SMS),
        ("sendgrid", pb.CONNECTOR_KIND_SENDGRID, C.CHANNEL_EMAIL),
        ("twilio", pb.CONNECTOR_KIND_TWILIO, C.CHANNEL_SMS),
        ("whatsapp", pb.CONNECTOR_KIND_WHATSAPP_CLOUD, C.CHANNEL_WHATSAPP),
    ]
    assert all(0 < c.updated_at_ms <= time.time() * 1000 for c in seen)
    shown = b"".join(c.SerializeToString() for c in seen)
    assert b"sandbox-" not in shown and b"127.0.0.1" not in shown

    other = await stub.ListConnectors(pb.ListConnectorsRequest(workspace_id="someone-else"))
    assert list(other.connectors) == []
    bad = await refused(stub.ListConnectors(pb.ListConnectorsRequest(workspace_id=suite.workspace_id, page_token="x")))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        bad.details()
        == "page_token: is not ours: send the previous reply's next_page_token, or none for the first page"
    )


async def test_a_deleted_connector_sends_nothing_more_and_its_secrets_are_gone(start_suite, start_dispatcher, redis):
    suite = await start_suite()
    other = await start_dispatcher(suite.resolver)  # another dispatcher process, which keeps the connector too
    assert (await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(1))).summary.sent == 1
    request = pb.DispatchRequest(
        workspace_id=suite.workspace_id,
        campaign_id="spring",
        campaign_instance_id="run-2",
        channel=C.CHANNEL_SMS,
        connector_id="twilio",
        content=SMS,
        recipients=recipients(1, start=2),
    )
    assert (await other.stub.Dispatch(request)).summary.sent == 1

    await suite.dispatcher.stub.DeleteConnector(
        pb.DeleteConnectorRequest(workspace_id=suite.workspace_id, connector_id="twilio")
    )
    dump = b""
    async for key in redis.scan_iter():
        if (await redis.type(key)) == b"string":
            dump += await redis.get(key)
    assert b"sandbox-twilio-token" not in dump
    sent = len(suite.providers.outbox_for("twilio"))

    gone = await refused(dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(1, start=3)))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert gone.details() == f"no connector 'twilio' in workspace '{suite.workspace_id}'"
    # The other process heard of it at once: it no longer sends through what it kept.
    started = time.monotonic()
    while True:
        try:
            request.campaign_instance_id = f"run-{time.monotonic_ns()}"
            await other.stub.Dispatch(request)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() - started < 1.0, "the deleted connector was still used"
    assert len(suite.providers.outbox_for("twilio")) == sent

    listed = await suite.dispatcher.stub.ListConnectors(pb.ListConnectorsRequest(workspace_id=suite.workspace_id))
    assert "twilio" not in [c.connector_id for c in listed.connectors]
    missing = await refused(
        suite.dispatcher.stub.DeleteConnector(
            pb.DeleteConnectorRequest(workspace_id=suite.workspace_id, connector_id="twilio")
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert missing.details() == f"no connector 'twilio' in workspace '{suite.workspace_id}'"
    unnamed = await refused(
        suite.dispatcher.stub.DeleteConnector(pb.DeleteConnectorRequest(workspace_id=suite.workspace_id))
    )
    assert unnamed.details().startswith("connector_id: is required")

    # Saved again, it sends again.
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=suite.workspace.connectors()["twilio"]))
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(1, start=4), instance="run-9")
    assert again.summary.sent == 1
