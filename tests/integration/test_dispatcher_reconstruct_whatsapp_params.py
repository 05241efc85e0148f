"""A reconstruction and a preview give a WhatsApp template's parameters as Meta was sent them: the
connector sends a line break or tab as a space and no run of more than four spaces (Meta refuses
them), which both returned as rendered, not as sent."""

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.integration.test_archive import reconstruct
from tests.integration.test_dispatcher_campaigns import dispatch

pytestmark = pytest.mark.integration

C = common_pb2.Channel
TEMPLATE = pb.Content(
    whatsapp_template=pb.WhatsAppTemplate(
        name="welcome", language="en_US", params=["{{ first_name }}\n{{ last_name }}", "{{ recipient.tier }}"]
    )
)


async def test_a_whatsapp_template_s_parameters_reconstruct_as_sent(start_suite):
    suite = await start_suite()
    person = pb.Recipient(anonymous_id="cust-000001", attributes={"tier": "gold\tplus      club"})
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", TEMPLATE, [person])
    [result] = reply.results
    assert result.status == pb.DISPATCH_STATUS_SENT

    [sent] = suite.providers.outbox_for("whatsapp")
    sent_params = [p["text"] for p in sent.template["components"][0]["parameters"]]
    assert sent_params[1] == "gold plus    club"
    again = await reconstruct(suite, result.message_id)
    assert list(again.rendered.whatsapp_params) == sent_params


async def test_the_text_of_a_whatsapp_message_reconstructs_as_rendered(start_suite):
    """Only a template's parameters are rewritten: a text message keeps its lines."""
    suite = await start_suite()
    content = pb.Content(sms_body="Hi {{ first_name }},\n\tyour {{ recipient.tier }} offer")
    person = pb.Recipient(anonymous_id="cust-000001", attributes={"tier": "gold      club"})
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", content, [person])
    [sent] = suite.providers.outbox_for("whatsapp")
    again = await reconstruct(suite, reply.results[0].message_id)
    assert again.rendered.sms_body == sent.text
    assert "\n\tyour gold      club offer" in again.rendered.sms_body


async def test_a_preview_shows_a_whatsapp_template_s_parameters_as_they_are_sent(start_suite):
    suite = await start_suite()
    person = pb.Recipient(anonymous_id="cust-000001", attributes={"tier": "gold\tplus      club"})
    preview = await suite.dispatcher.stub.PreviewMessage(
        pb.PreviewMessageRequest(
            workspace_id=suite.workspace_id, channel=C.CHANNEL_WHATSAPP, content=TEMPLATE, recipient=person
        )
    )
    assert preview.error_code == ""
    await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", TEMPLATE, [person])
    [sent] = suite.providers.outbox_for("whatsapp")
    name, tier = [p["text"] for p in sent.template["components"][0]["parameters"]]
    shown_name, shown_tier = preview.rendered.whatsapp_params
    assert shown_tier == tier == "gold plus    club"  # the campaign's own attribute: shown unmasked
    # The name is masked (J*** D***), on the one line it was sent on.
    assert [word[0] + "***" for word in name.split(" ")] == shown_name.split(" ")
