"""A template output that is a method (`recipient.items`, `first_name.upper` without its call) or an
iterator (a `map` not joined) fails the recipient RENDER_FAILED, unsent, in a campaign and in its
preview alike: it was sent as "<built-in method items of dict object at 0x...>"."""

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.template_sandbox import NOT_A_VALUE
from tests.integration.test_dispatcher_campaigns import dispatch

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus


@pytest.mark.parametrize(
    "body",
    ["Your {{ recipient.items }} items", "Hi {{ first_name.upper }}", "{{ recipient.values() | map('upper') }}"],
)
async def test_a_method_printed_is_refused_by_the_campaign_and_its_preview(start_suite, body):
    suite = await start_suite()
    content = pb.Content(sms_body=body)
    person = pb.Recipient(anonymous_id="cust-000001", attributes={"items": "3"})
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", content, [person])
    [result] = reply.results
    expected = f"content.sms_body: {NOT_A_VALUE}"
    assert (result.status, result.error_code, result.error_message) == (
        S.DISPATCH_STATUS_SEND_FAILED,
        "RENDER_FAILED",
        expected,
    )
    assert suite.providers.outbox_for("custom") == []

    preview = await suite.dispatcher.stub.PreviewMessage(
        pb.PreviewMessageRequest(
            workspace_id=suite.workspace_id, channel=C.CHANNEL_SMS, content=content, recipient=person
        )
    )
    assert (preview.error_code, preview.error_message) == ("RENDER_FAILED", expected)
    assert preview.rendered.sms_body == ""
