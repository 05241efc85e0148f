"""Fuzzing the four parsers through the webhooks: correctly signed random bodies only ever get 200 or 400."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_receipts_harness import running_receipts, sns_notification

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)
message_ids = st.sampled_from(["", "a" * 32, "0f" * 16]) | json_values
timestamps = st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=30) | json_values


def shaped(required: dict, optional: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries(required, optional=optional) | json_values


sendgrid_events = shaped(
    {
        "event": st.sampled_from(["processed", "delivered", "bounce", "dropped", "open", "click", "deferred"])
        | json_values
    },
    {
        "sg_event_id": st.text(max_size=10) | json_values,
        "sg_message_id": st.text(max_size=20) | json_values,
        "timestamp": timestamps,
        "tokensend_message_id": message_ids,
        "tokensend_campaign": st.sampled_from(["camp-1", ""]) | json_values,
        "type": st.sampled_from(["bounce", "blocked"]) | json_values,
        "status": st.text(max_size=10) | json_values,
        "reason": st.text(max_size=40) | json_values,
        "response": st.text(max_size=40) | json_values,
        "custom_args": json_values,
    },
)
sendgrid_bodies = st.lists(sendgrid_events, max_size=6) | json_values

whatsapp_statuses = shaped(
    {"status": st.sampled_from(["sent", "delivered", "read", "failed", "deleted"]) | json_values},
    {
        "id": st.text(max_size=20) | json_values,
        "timestamp": timestamps,
        "biz_opaque_callback_data": message_ids,
        "recipient_id": json_values,
        "errors": st.lists(shaped({}, {"code": st.integers() | json_values}), max_size=2) | json_values,
    },
)
whatsapp_bodies = (
    st.fixed_dictionaries(
        {
            "object": st.just("whatsapp_business_account") | json_values,
            "entry": st.lists(
                shaped(
                    {},
                    {
                        "changes": st.lists(
                            shaped(
                                {},
                                {
                                    "value": shaped(
                                        {},
                                        {
                                            "statuses": st.lists(whatsapp_statuses, max_size=4) | json_values,
                                            "messages": json_values,
                                        },
                                    )
                                },
                            ),  # noqa: E501
                            max_size=3,
                        )
                        | json_values
                    },
                ),
                max_size=3,
            )
            | json_values,
        }
    )
    | json_values
)

twilio_names = st.sampled_from(["MessageSid", "SmsSid", "MessageStatus", "SmsStatus", "ErrorCode", "To", "From"])
twilio_forms = st.lists(
    st.tuples(
        twilio_names | st.text(max_size=8),
        st.sampled_from(["delivered", "failed", "sent", "read"]) | st.text(max_size=20),
    ),  # noqa: E501
    max_size=8,
)

ses_messages = shaped(
    {
        "eventType": st.sampled_from(["Delivery", "Bounce", "Complaint", "Open", "Subscription", "Rendering Failure"])
        | json_values
    },  # noqa: E501
    {
        "notificationType": json_values,
        "mail": shaped(
            {},
            {
                "messageId": json_values,
                "tags": shaped({}, {"tokensend_message_id": st.lists(message_ids, max_size=2) | json_values}),
                "timestamp": timestamps,
            },
        ),  # noqa: E501
        "bounce": shaped({}, {"bounceType": json_values, "bouncedRecipients": json_values, "timestamp": timestamps}),
        "complaint": json_values,
        "subscription": json_values,
        "deliveryDelay": json_values,
    },
)


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


def allowed(reply) -> bool:
    return reply.status in (200, 400) and isinstance(reply.body, dict)


@FUZZ
@given(document=sendgrid_bodies)
async def test_sendgrid_fuzz(receipts, document):
    reply = await receipts.post_sendgrid(json.dumps(document).encode())
    assert allowed(reply), reply


@FUZZ
@given(document=whatsapp_bodies | st.binary(max_size=64).map(lambda b: b))
async def test_whatsapp_fuzz(receipts, document):
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    reply = await receipts.post_whatsapp(body)
    assert allowed(reply), reply


@FUZZ
@given(params=twilio_forms, raw=st.none() | st.binary(max_size=64), message_id=st.text(max_size=40))
async def test_twilio_fuzz(receipts, params, raw, message_id):
    body = raw if raw is not None else urlencode(params).encode()
    try:
        signed_params = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        signed_params = []
    _, headers, query = receipts.twilio_request(signed_params, message_id)
    reply = await receipts.post("twilio", body, headers, query=query)
    assert allowed(reply), reply


@FUZZ
@given(message=ses_messages | st.text(max_size=40), version=st.sampled_from([1, 2]))
async def test_ses_fuzz(receipts, message, version):
    envelope = sns_notification(message if isinstance(message, str) else json.dumps(message))
    body, headers = receipts.ses_request(envelope, version)
    reply = await receipts.post("ses", body, headers)
    assert allowed(reply), reply
