"""A WhatsApp template goes only through a connector that sends templates (WhatsApp Cloud). Through a
custom gateway, whose request holds only @text, the template was dropped: the text sent alone, or
without one an empty message tried for every recipient, each one's contact fetched first."""

from __future__ import annotations

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.integration.test_dispatcher_campaigns import WHATSAPP_TEMPLATE, dispatch, stream_requests

pytestmark = pytest.mark.integration

C = common_pb2.Channel
REFUSED = (
    "connector 'wa-gateway' (CONNECTOR_KIND_CUSTOM_HTTP) sends no WhatsApp templates; "
    "only CONNECTOR_KIND_WHATSAPP_CLOUD connectors send them"
)
TEMPLATE_AND_TEXT = pb.Content(sms_body="Hi {{ first_name }}", whatsapp_template=WHATSAPP_TEMPLATE.whatsapp_template)
PEOPLE = [pb.Recipient(anonymous_id="cust-000001"), pb.Recipient(anonymous_id="cust-000002")]


async def whatsapp_gateway(suite) -> None:
    """The sandbox's custom HTTP gateway, sending WhatsApp."""
    connector = suite.workspace.connectors()["gateway"]
    connector.connector_id = "wa-gateway"
    connector.channel = C.CHANNEL_WHATSAPP
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=connector))


@pytest.mark.parametrize("content", [WHATSAPP_TEMPLATE, TEMPLATE_AND_TEXT], ids=["template", "template-and-text"])
async def test_a_template_through_a_custom_gateway_is_refused_naming_it(start_suite, content):
    suite = await start_suite()
    await whatsapp_gateway(suite)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatch(suite, C.CHANNEL_WHATSAPP, "wa-gateway", content, PEOPLE)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"content.whatsapp_template.name: {REFUSED}"
    assert suite.providers.outbox_for("custom") == []

    test = pb.SendTestRequest(
        workspace_id=suite.workspace_id,
        campaign_id="spring",
        channel=C.CHANNEL_WHATSAPP,
        connector_id="wa-gateway",
        content=content,
        recipient=PEOPLE[0],
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await suite.dispatcher.stub.SendTest(test)
    assert refused.value.details() == f"content.whatsapp_template.name: {REFUSED}"
    assert suite.providers.outbox_for("custom") == []


async def test_a_stream_s_header_naming_a_template_for_a_custom_gateway_is_refused(start_suite):
    suite = await start_suite()
    await whatsapp_gateway(suite)
    call = suite.dispatcher.stub.DispatchStream(
        stream_requests(suite, "run-1", [PEOPLE], C.CHANNEL_WHATSAPP, "wa-gateway", WHATSAPP_TEMPLATE)
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"header.content.whatsapp_template.name: {REFUSED}"
    assert suite.providers.outbox_for("custom") == []


async def test_the_same_content_goes_through_whatsapp_cloud_and_text_alone_through_the_gateway(start_suite):
    suite = await start_suite()
    await whatsapp_gateway(suite)
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", TEMPLATE_AND_TEXT, PEOPLE)
    assert [r.status for r in reply.results] == [pb.DISPATCH_STATUS_SENT] * 2
    assert all(m.template["name"] == "welcome" for m in suite.providers.outbox_for("whatsapp"))
    text = pb.Content(sms_body="Hi {{ first_name }}")
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "wa-gateway", text, PEOPLE, instance="run-2")
    assert [r.status for r in reply.results] == [pb.DISPATCH_STATUS_SENT] * 2
