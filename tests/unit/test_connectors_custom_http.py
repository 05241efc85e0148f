"""Unit tests for CUSTOM_HTTP templating: placeholders, escaping per position, content types."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.connectors.custom_http import (
    GatewayRefusal,
    TemplateError,
    build_request,
    gateway_refusal,
    referenced_credentials,
)

PHONE = "+447700900123"
TRICKY_TEXT = 'Hi "Ann" & co, 50% off!\nReply @sender or {stop} ✓'


def message(text: str = TRICKY_TEXT, to: str = PHONE) -> OutboundMessage:
    return OutboundMessage(
        message_id="0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        anonymous_id="anon-1",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=to,
        sms_body=text,
    )


def template(**fields: object) -> pb.CustomHttpTemplate:
    return pb.CustomHttpTemplate(**fields)  # type: ignore[arg-type]


CREDENTIALS = {"api_key": "key-123", "api_secret": "se cret&="}


def test_json_body_values_are_json_escaped() -> None:
    t = template(
        method="POST",
        url="https://gw.example.com/sms",
        body='{"to": "@to", "text": "@text", "ref": "@message_id", "from": "@sender", "key": "@credentials.api_key"}',
    )
    request = build_request(t, message(), sender="Brand", credentials=CREDENTIALS)
    assert request.body is not None
    assert json.loads(request.body) == {
        "to": PHONE,
        "text": TRICKY_TEXT,
        "ref": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "from": "Brand",
        "key": "key-123",
    }
    assert request.headers["Content-Type"] == "application/json"


def test_form_body_values_are_form_encoded() -> None:
    t = template(
        method="POST",
        url="https://gw.example.com/sms/json",
        body="api_key=@credentials.api_key&api_secret=@credentials.api_secret&to=@to&from=@sender&text=@text",
    )
    request = build_request(t, message(), sender="Brand Co", credentials=CREDENTIALS)
    assert request.body is not None
    fields = parse_qs(request.body.decode(), strict_parsing=True)
    assert fields == {
        "api_key": ["key-123"],
        "api_secret": ["se cret&="],
        "to": [PHONE],
        "from": ["Brand Co"],
        "text": [TRICKY_TEXT],
    }
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_url_values_are_percent_encoded() -> None:
    t = template(method="GET", url="https://gw.example.com/send/@to?text=@text&id=@message_id")
    request = build_request(t, message(), sender="Brand", credentials={})
    parts = urlsplit(request.url)
    assert parts.path == "/send/%2B447700900123"
    assert parse_qs(parts.query) == {"text": [TRICKY_TEXT], "id": ["0f1e2d3c4b5a69788796a5b4c3d2e1f0"]}
    assert request.method == "GET" and request.body is None


def test_header_values_are_raw() -> None:
    t = template(
        method="POST",
        url="https://gw.example.com/sms",
        headers={"Authorization": "Bearer @credentials.api_key", "X-Ref": "@message_id"},
        body="{}",
    )
    request = build_request(t, message(), sender="Brand", credentials=CREDENTIALS)
    assert request.headers["Authorization"] == "Bearer key-123"
    assert request.headers["X-Ref"] == "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def test_a_header_value_with_a_line_break_is_refused() -> None:
    t = template(method="POST", url="https://gw.example.com/sms", headers={"X-Text": "@text"}, body="{}")
    with pytest.raises(TemplateError) as caught:
        build_request(t, message("line one\r\nX-Evil: 1"), sender="Brand", credentials={})
    assert "X-Evil" not in str(caught.value) and "line one" not in str(caught.value)


def test_substitution_is_one_pass() -> None:
    """A value that contains a placeholder is not expanded again (the text cannot pull in a credential)."""
    t = template(method="POST", url="https://gw.example.com/sms", body='{"text": "@text"}')
    request = build_request(t, message("see @credentials.api_key and @to"), sender="Brand", credentials=CREDENTIALS)
    assert json.loads(request.body or b"") == {"text": "see @credentials.api_key and @to"}


def test_placeholders_need_a_word_boundary() -> None:
    t = template(method="POST", url="https://gw.example.com/sms", body='{"a": "@token", "b": "@to_x", "c": "@to"}')
    request = build_request(t, message(), sender="Brand", credentials={})
    assert json.loads(request.body or b"") == {"a": "@token", "b": "@to_x", "c": PHONE}


def test_explicit_content_type_wins() -> None:
    t = template(method="POST", url="https://gw.example.com/sms", headers={"content-type": "text/plain"}, body="to=@to")
    request = build_request(t, message(), sender="Brand", credentials={})
    assert request.headers == {"content-type": "text/plain"}


def test_relative_url_joins_base_url() -> None:
    t = template(method="POST", url="/sms/json", body="to=@to")
    request = build_request(t, message(), sender="Brand", credentials={}, base_url="https://rest.example.com/")
    assert request.url == "https://rest.example.com/sms/json"


def test_referenced_credentials() -> None:
    assert referenced_credentials("a=@credentials.one&b=@credentials.two_2&c=@to") == {"one", "two_2"}


def vonage(*statuses: object) -> dict[str, object]:
    """A Vonage SMS API reply, one entry per part; a refused part quotes the number in its error text."""
    parts = [
        {"to": PHONE[1:], "status": status, "message-id": f"0A00000000000{i}"}
        if status == "0"
        else {"to": PHONE[1:], "status": status, "error-text": f"Refused for {PHONE}"}
        for i, status in enumerate(statuses)
    ]
    return {"message-count": str(len(parts)), "messages": parts}


@pytest.mark.parametrize(
    ("document", "refusal"),
    [
        (vonage("0"), None),
        (vonage("4"), GatewayRefusal("4", part=1, parts=1, refused=1)),
        ({"messages": [{"status": 29}]}, GatewayRefusal("29", part=1, parts=1, refused=1)),
        ({"messages": [{"status": 0}]}, None),
        (vonage("bad status with spaces"), GatewayRefusal("?", part=1, parts=1, refused=1)),
        (vonage(PHONE[1:]), GatewayRefusal("?", part=1, parts=1, refused=1)),  # a number, not a code
        ({"messages": [{"status": {"groupName": "PENDING", "name": "PENDING_ACCEPTED"}}]}, None),
        ({"messages": [{"status": [1]}]}, None),
        ({"messages": [{"status": True}]}, None),
        ({"messages": []}, None),
        ({"id": "abc"}, None),
        ([1, 2], None),
        (None, None),
        # Multi-part SMS: one entry per part.
        (vonage("0", "0", "0"), None),
        (vonage("0", "9", "0"), GatewayRefusal("9", part=2, parts=3, refused=1)),
        (vonage("0", "9", "4"), GatewayRefusal("9", part=2, parts=3, refused=2)),
        (vonage("1", "0"), GatewayRefusal("1", part=1, parts=2, refused=1)),
        (vonage("9", "1", "5"), GatewayRefusal("9", part=1, parts=3, refused=3)),
        # A part whose status is not a code is not a refusal: it counts as gone out.
        ({"messages": [{"status": "4"}, {"status": {"name": "PENDING"}}]}, GatewayRefusal("4", 1, 2, 1)),
    ],
)
def test_gateway_refusal_convention(document: object, refusal: GatewayRefusal | None) -> None:
    assert gateway_refusal(document) == refusal


@pytest.mark.parametrize(
    ("statuses", "partial", "error_message"),
    [
        (("6",), False, "gateway refused the message (status 6)"),
        (("9", "4", "1"), False, "gateway refused the message (status 9)"),
        (("0", "9", "0"), True, "gateway refused part 2 of 3 (status 9); the other parts went out"),
        (("0", "9"), True, "gateway refused part 2 of 2 (status 9); the other part went out"),
        (("0", "9", "4"), True, "gateway refused 2 of 3 parts (part 2: status 9); the other part went out"),
        (("0", PHONE[1:]), True, "gateway refused part 2 of 2 (status ?); the other part went out"),
    ],
)
def test_a_refusal_says_which_parts_and_quotes_only_codes(
    statuses: tuple[str, ...], partial: bool, error_message: str
) -> None:
    refusal = gateway_refusal(vonage(*statuses))
    assert refusal is not None
    assert (refusal.partial, refusal.error_message) == (partial, error_message)
