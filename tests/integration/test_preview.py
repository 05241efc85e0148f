"""The masked preview: live PII, rendered as a campaign would be, with no fetched value shown."""

from __future__ import annotations

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from sandbox.pii_api import Customer
from tests.canary import redis_dump

pytestmark = pytest.mark.integration

C = common_pb2.Channel
ODD = Customer("cust-odd", "zoe.obrien@example.com", "+447400123987", "Zoë", "O'Brien & Sons")


def preview(suite, channel, content, anonymous_id, topic="", tier="gold"):
    return suite.dispatcher.stub.PreviewMessage(
        pb.PreviewMessageRequest(
            workspace_id=suite.workspace_id,
            channel=channel,
            content=content,
            recipient=pb.Recipient(anonymous_id=anonymous_id, attributes={"tier": tier}),
            topic=topic,
        )
    )


def texts(rendered: pb.RenderedMessage) -> list[str]:
    return [rendered.subject, rendered.html_body, rendered.text_body, rendered.sms_body, *rendered.whatsapp_params]


async def test_the_preview_renders_the_layout_with_every_fetched_value_masked(start_suite, redis):
    suite = await start_suite()
    suite.pii_api.sandbox.customers[ODD.anonymous_id] = ODD
    content = pb.Content(
        subject="{{ first_name|upper }}, an offer for {{ recipient.tier }} members",
        html_body=(
            "<p>Dear {{ first_name }} {{ last_name }},</p>"
            '<a href="https://shop.example/u?n={{ last_name|urlencode }}">{{ last_name|lower }}</a>'
            "{% if recipient.tier == 'gold' %}<b>Gold</b>{% endif %}"
        ),
        text_body="Dear {{ first_name }} {{ last_name }}",
    )
    reply = await preview(suite, C.CHANNEL_EMAIL, content, ODD.anonymous_id)
    assert reply.error_code == ""
    rendered = reply.rendered
    for text in texts(rendered):
        lowered = text.lower()
        for value in (ODD.first_name, "zoe", "o'brien", "o&#39;brien", "brien", "sons", ODD.email, ODD.phone):
            assert value.lower() not in lowered, (value, text)
    assert rendered.subject == "Z***, an offer for gold members"  # layout and logic intact
    assert rendered.html_body.startswith("<p>Dear Z*** O***") and "<b>Gold</b>" in rendered.html_body
    assert rendered.text_body == "Dear Z*** O*** &*** S***"
    assert reply.masked_contact == "z***@e***.com"
    assert list(reply.fetched_fields) == ["first_name", "last_name"]
    assert not reply.suppressed
    dump = b" ".join(await redis_dump(redis))
    assert b"brien" not in dump.lower() and ODD.email.encode() not in dump  # a preview stores nothing fetched


async def test_sms_and_whatsapp_previews_mask_the_number(start_suite, customers):
    suite = await start_suite()
    person = customers["cust-000001"]
    sms = await preview(
        suite, C.CHANNEL_SMS, pb.Content(sms_body="{{ first_name }}, we will text {{ recipient.tier }}"), "cust-000001"
    )
    assert sms.rendered.sms_body == f"{person.first_name[0]}***, we will text gold"
    assert sms.masked_contact.endswith(person.phone[-3:]) and person.phone not in sms.masked_contact
    wa = await preview(
        suite,
        C.CHANNEL_WHATSAPP,
        pb.Content(whatsapp_template=pb.WhatsAppTemplate(name="t", language="en", params=["{{ last_name }}", "7"])),
        "cust-000001",
    )
    assert list(wa.rendered.whatsapp_params) == [f"{person.last_name[0]}***", "7"]


async def test_failures_come_back_as_codes_and_suppression_is_shown(start_suite):
    suite = await start_suite()
    missing = await preview(suite, C.CHANNEL_EMAIL, pb.Content(subject="x", text_body="y"), "nobody")
    assert missing.error_code == "NOT_FOUND"
    assert missing.error_message == "Invalid API response (fetching Email ID) [ID not in the reply]"  # and why
    broken = await preview(suite, C.CHANNEL_EMAIL, pb.Content(subject="{{ nickname }}", text_body="y"), "cust-000001")
    assert broken.error_code == "RENDER_FAILED" and "nickname" in broken.error_message
    await suite.dispatcher.stub.SuppressRecipients(
        pb.SuppressRecipientsRequest(
            workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, topic="offers", anonymous_ids=["cust-000001"]
        )
    )
    content = pb.Content(subject="Hi {{ first_name }}", text_body="y")
    assert (await preview(suite, C.CHANNEL_EMAIL, content, "cust-000001", topic="offers")).suppressed
    assert not (await preview(suite, C.CHANNEL_EMAIL, content, "cust-000001", topic="news")).suppressed
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await preview(suite, C.CHANNEL_EMAIL, pb.Content(text_body="no subject"), "cust-000001")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_value_the_template_reshapes_is_starred_too(start_suite):
    """Sliced, spelled out, reversed or with letters replaced, a name matches none of its spellings."""
    suite = await start_suite()
    person = Customer("cust-jade", "jade.lin@example.com", "+447400123456", "Jadeline", "Linwood")
    suite.pii_api.sandbox.customers[person.anonymous_id] = person
    content = pb.Content(
        sms_body=(
            "{{ first_name[1:] }}|{{ first_name|list|join('-') }}|{{ first_name|reverse }}|"
            "{{ first_name|replace('a', '4') }}|{% for c in last_name %}{{ c }}.{% endfor %}|"
            "{% if last_name == 'Linwood' %}family{% endif %}|{{ recipient.tier }}|{{ first_name }}"
        )
    )
    reply = await preview(suite, C.CHANNEL_SMS, content, person.anonymous_id)
    assert reply.error_code == ""
    # The branch on last_name changed the line's length: it is aligned by runs of shared text.
    first, *middle, tier, plain = reply.rendered.sms_body.split("|")
    assert (tier, plain) == ("gold", "J***")
    assert set(first + "".join(middle)) <= set("*-.|"), reply.rendered.sms_body


async def test_a_template_that_looks_up_by_a_value_still_previews_with_its_spellings_masked(start_suite):
    suite = await start_suite()
    person = Customer("cust-ann", "ann.lee@example.com", "+447400123456", "Annabel", "Leeds")
    suite.pii_api.sandbox.customers[person.anonymous_id] = person
    content = pb.Content(sms_body="{{ {'Leeds': 'Headrow store'}[last_name] }} for {{ first_name }}")
    reply = await preview(suite, C.CHANNEL_SMS, content, person.anonymous_id)
    assert (reply.error_code, reply.rendered.sms_body) == ("", "Headrow store for A***")


@pytest.mark.parametrize(
    ("recipient", "field"),
    [
        (pb.Recipient(anonymous_id=""), "recipient.anonymous_id"),
        (pb.Recipient(anonymous_id="cust-000001", attributes={"x" * 65: "v"}), "recipient.attributes"),
    ],
)
async def test_a_bad_recipient_is_refused_naming_its_field(start_suite, recipient, field):
    suite = await start_suite()
    request = pb.PreviewMessageRequest(
        workspace_id=suite.workspace_id, channel=C.CHANNEL_SMS, content=pb.Content(sms_body="x"), recipient=recipient
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PreviewMessage(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: "), caught.value.details()


async def test_a_template_that_looks_up_by_a_value_still_stars_what_it_reshapes(start_suite):
    """A lookup by a value does not render with stand-ins; a slice or a reversal of another value in
    the same template is starred all the same, and what no render can tell apart is starred whole."""
    suite = await start_suite()
    person = Customer("cust-ann", "ann.lee@example.com", "+447400123456", "Annabel", "Leeds")
    suite.pii_api.sandbox.customers[person.anonymous_id] = person
    looked_up = "{{ {'Leeds': 'Headrow store'}[last_name] }} for {{ first_name[:4] }}|{{ first_name|reverse }}"
    reply = await preview(suite, C.CHANNEL_SMS, pb.Content(sms_body=looked_up), person.anonymous_id)
    assert reply.error_code == ""
    shown, _, reshaped = reply.rendered.sms_body.partition(" for ")
    assert shown == "Headrow store" and set(reshaped) <= set("*|"), reply.rendered.sms_body

    derived = "{{ {'leeds': 'Headrow store'}[last_name|lower] }} for {{ first_name[:4] }}"
    reply = await preview(suite, C.CHANNEL_SMS, pb.Content(sms_body=derived), person.anonymous_id)
    assert reply.error_code == ""
    assert set(reply.rendered.sms_body) <= set("* "), reply.rendered.sms_body
