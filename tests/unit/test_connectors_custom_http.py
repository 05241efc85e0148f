"""Unit tests for CUSTOM_HTTP templating: placeholders, escaping per position, content types."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
from services.dispatcher.connectors import validate_connector
from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.connectors.custom_http import (
    CompiledRequest,
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
    assert request.body == f"to={PHONE}".encode()  # a text body, not a form


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


# -- the body's escaping follows its declared Content-Type ---------------------------------------

XML_TEXT = 'Tom & Jerry <3 \'em\n"all" > you ✓'
XML_BODY = "<sms><to>@to</to><text>@text</text><from name=\"@sender\" alt='@sender'/></sms>"
XML_SENDER = "B&B \"Rooms\" <'Inn'>"


def xml_fields(body: bytes | None) -> tuple[str | None, str | None, str | None, str | None]:
    root = ElementTree.fromstring(body or b"")
    sender = root.find("from")
    assert sender is not None
    return root.findtext("to"), root.findtext("text"), sender.get("name"), sender.get("alt")


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("Content-Type", "text/xml"),
        ("content-type", "application/xml"),
        ("CONTENT-TYPE", "Text/XML; charset=UTF-8"),
        ("Content-Type", 'application/soap+xml; charset="utf-8"; action="urn:send"'),
        ("Content-Type", " application/xml ;charset=utf8"),
    ],
)
def test_an_xml_body_is_xml_escaped(name: str, content_type: str) -> None:
    """An SMS gateway taking XML gets the text as written: not form-encoded, and a `<` or `&` in it does
    not break the document."""
    t = template(method="POST", url="https://gw.example.com/sms", headers={name: content_type}, body=XML_BODY)
    request = build_request(t, message(XML_TEXT), sender=XML_SENDER, credentials={})
    assert xml_fields(request.body) == (PHONE, XML_TEXT, XML_SENDER, XML_SENDER)
    assert request.headers == {name: content_type}  # the declared type, sent as it is


def test_a_body_that_looks_like_xml_is_xml_escaped_and_sent_as_xml() -> None:
    t = template(method="POST", url="https://gw.example.com/sms", body="\n  " + XML_BODY)
    request = build_request(t, message(XML_TEXT), sender=XML_SENDER, credentials={})
    assert xml_fields(request.body) == (PHONE, XML_TEXT, XML_SENDER, XML_SENDER)
    assert request.headers["Content-Type"] == "application/xml"


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/vnd.gateway+json; charset=utf-8", "text/json"]
)
def test_a_json_body_is_json_escaped_whatever_its_first_character(content_type: str) -> None:
    """A declared JSON type decides, even for a body that does not open with `{` or `[` (a JSON string)."""
    t = template(
        method="POST", url="https://gw.example.com/sms", headers={"Content-Type": content_type}, body='"@text"'
    )
    request = build_request(t, message(), sender="Brand", credentials={})
    assert json.loads(request.body or b"") == TRICKY_TEXT


def test_a_declared_form_body_is_form_encoded() -> None:
    t = template(
        method="POST",
        url="https://gw.example.com/sms",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
        body="to=@to&text=@text",
    )
    request = build_request(t, message(), sender="Brand", credentials={})
    assert parse_qs((request.body or b"").decode(), strict_parsing=True) == {"to": [PHONE], "text": [TRICKY_TEXT]}


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8", "TEXT/CSV"])
def test_a_text_body_is_sent_as_it_is(content_type: str) -> None:
    t = template(
        method="POST", url="https://gw.example.com/sms", headers={"Content-Type": content_type}, body="@to: @text"
    )
    request = build_request(t, message(), sender="Brand", credentials={})
    assert request.body == f"{PHONE}: {TRICKY_TEXT}".encode()


def test_a_connector_saved_without_a_content_type_sends_the_same_bytes() -> None:
    """JSON-looking bodies are JSON-escaped and the others form-encoded, byte for byte as they always were."""
    m = message('Hi "Ann" & co, 50% off!\nReply @sender or {stop} ✓ <b>')
    credentials = {"api_key": "se cret&="}
    json_body = '{"to": "@to", "text": "@text", "from": "@sender", "key": "@credentials.api_key"}'
    form_body = "to=@to&text=@text&from=@sender&key=@credentials.api_key"
    sent = [
        build_request(
            template(method="POST", url="https://gw.example.com/sms", body=body, headers={"X-Ref": "@message_id"}),
            m,
            sender="Brand Co",
            credentials=credentials,
        )
        for body in (json_body, form_body)
    ]
    ref = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    assert [(r.headers, r.body) for r in sent] == [
        (
            {"X-Ref": ref, "Content-Type": "application/json"},
            b'{"to": "+447700900123", "text": "Hi \\"Ann\\" & co, 50% off!\\nReply @sender or {stop} \xe2\x9c\x93 <b>"'
            b', "from": "Brand Co", "key": "se cret&="}',
        ),
        (
            {"X-Ref": ref, "Content-Type": "application/x-www-form-urlencoded"},
            b"to=%2B447700900123&text=Hi+%22Ann%22+%26+co%2C+50%25+off%21%0AReply+%40sender+or+%7Bstop%7D+%E2%9C%93"
            b"+%3Cb%3E&from=Brand+Co&key=se+cret%26%3D",
        ),
    ]


@pytest.mark.parametrize("text", ["bell \x07", "form feed \x0c", "nul \x00", "\ufffe"])
def test_a_text_xml_cannot_carry_fails_the_message_without_quoting_it(text: str) -> None:
    """XML 1.0 has no way to write most control characters: the gateway would refuse the document."""
    t = template(method="POST", url="https://gw.example.com/sms", headers={"Content-Type": "text/xml"}, body=XML_BODY)
    with pytest.raises(TemplateError) as caught:
        build_request(t, message(text), sender="Brand", credentials={})
    assert "custom_http.body" in str(caught.value) and "XML" in str(caught.value)
    assert text not in str(caught.value)


def gateway_connector(headers: dict[str, str], body: str = XML_BODY, method: str = "POST") -> pb.Connector:
    return pb.Connector(
        workspace_id="ws-1",
        connector_id="gw-1",
        kind=pb.CONNECTOR_KIND_CUSTOM_HTTP,
        channel=common_pb2.CHANNEL_SMS,
        sender="Brand",
        custom_http=template(method=method, url="https://gw.example.com/sms?to=@to", headers=headers, body=body),
    )


@pytest.mark.parametrize(
    "content_type",
    [
        "text/xml",
        "Application/XML; Charset=UTF-8",
        "application/soap+xml",
        "application/json",
        "application/problem+json",
        "application/x-www-form-urlencoded",
        "text/plain",
        "text/csv; charset=utf-8",
    ],
)
def test_a_content_type_whose_escaping_is_known_is_saved(content_type: str) -> None:
    validate_connector(gateway_connector({"Content-Type": content_type}), allow_private=False)


@pytest.mark.parametrize(
    ("content_type", "why"),
    [
        ("application/octet-stream", "supported"),
        ("multipart/form-data; boundary=x", "supported"),
        ("", "supported"),
        ("xml", "supported"),
        ("text/xml; charset=iso-8859-1", "UTF-8"),
        ("application/json; charset=us-ascii", "UTF-8"),
    ],
)
def test_a_content_type_the_body_cannot_be_escaped_for_is_refused(content_type: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_connector(gateway_connector({"content-type": content_type}), allow_private=False)
    assert caught.value.field == "connector.custom_http.headers['content-type']"
    assert why in caught.value.message


def test_a_content_type_without_a_body_is_not_checked() -> None:
    validate_connector(gateway_connector({"Content-Type": "application/octet-stream"}, body=""), allow_private=False)


def test_a_sender_an_xml_body_cannot_carry_fails_each_message_naming_no_value() -> None:
    """A connector saved before (U+FFFF in its sender): its messages fail, the connector still builds."""
    t = template(method="POST", url="https://gw.example.com/sms", body="<sms from='@sender'>@to</sms>")
    compiled = CompiledRequest(t, sender="Brand\uffff", credentials={})
    with pytest.raises(TemplateError) as caught:
        compiled.render(message())
    assert "sender" in str(caught.value) and "\uffff" not in str(caught.value)


def test_a_recipient_value_an_xml_body_cannot_carry_is_named_by_its_placeholder() -> None:
    t = template(method="POST", url="https://gw.example.com/sms", body="<sms><to>@to</to></sms>")
    with pytest.raises(TemplateError) as caught:
        build_request(t, message(to="+4477\x0b00900123"), sender="Brand", credentials={})
    assert "@to" in str(caught.value) and "4477" not in str(caught.value)


def test_line_breaks_and_tabs_in_an_xml_body_arrive_as_they_were() -> None:
    """A parser turns a written CR into LF, and a tab or line break in an attribute into a space."""
    text = "one\r\ntwo\rthree\tfour\nfive"
    t = template(method="POST", url="https://gw.example.com/sms", headers={"Content-Type": "text/xml"}, body=XML_BODY)
    request = build_request(t, message(text), sender="Brand\tCo\r\n", credentials={})
    assert xml_fields(request.body) == (PHONE, text, "Brand\tCo\r\n", "Brand\tCo\r\n")


def test_an_xml_value_in_a_cdata_section_is_not_entity_escaped() -> None:
    """Gateways often take the text in a CDATA section, where `&amp;` would arrive as written."""
    t = template(
        method="POST",
        url="https://gw.example.com/sms",
        body="<sms><to>@to</to><text><![CDATA[@text]]></text><from>@sender</from></sms>",
    )
    text = "Tom & Jerry <3\r\n]]> done"
    request = build_request(t, message(text), sender="B&B", credentials={})
    root = ElementTree.fromstring(request.body or b"")
    assert (root.findtext("to"), root.findtext("text"), root.findtext("from")) == (PHONE, text, "B&B")


@pytest.mark.parametrize("content_type", ["text/html", "text/html; charset=utf-8"])
def test_an_html_body_is_html_escaped(content_type: str) -> None:
    """A `<`, `&` or `"` in the text must not open a tag, an entity or end an attribute."""
    t = template(
        method="POST",
        url="https://gw.example.com/sms",
        headers={"Content-Type": content_type},
        body='<p data-to="@to">@text</p><img alt="@sender">',
    )
    text = 'Hi <script>x()</script> & "co" \'s'
    request = build_request(t, message(text), sender='Brand" onerror="x()', credentials={})
    assert request.body == (
        b'<p data-to="+447700900123">Hi &lt;script&gt;x()&lt;/script&gt; &amp; &quot;co&quot; &#x27;s</p>'
        b'<img alt="Brand&quot; onerror=&quot;x()">'
    )


def test_to_digits_is_the_number_without_its_plus_for_gateways_that_want_digits_only() -> None:
    """Vonage's `to` is digits only (`\\d{7,15}`): `@to_digits` writes it so, `@to` keeps E.164's "+"."""
    t = template(
        method="POST", url="https://gw.example.com/sms/json?to=@to_digits", body="to=@to_digits&e164=@to&text=@text"
    )
    request = build_request(t, message(), sender="Brand", credentials={})
    assert parse_qs(urlsplit(request.url).query) == {"to": [PHONE[1:]]}
    assert parse_qs((request.body or b"").decode())["to"] == [PHONE[1:]]
    assert parse_qs((request.body or b"").decode())["e164"] == [PHONE]
    # a number the resolver gave without "+" (a gateway's own format) is written as it is
    assert json.loads(
        build_request(template(body='{"n": "@to_digits"}'), message(to="447700900123"), sender="B", credentials={}).body
        or b""
    ) == {"n": "447700900123"}


def test_a_connector_addressing_by_to_digits_alone_is_saved_and_one_without_the_number_is_refused() -> None:
    connector = gateway_connector({}, body="to=@to_digits&text=@text")
    connector.custom_http.url = "https://gw.example.com/sms/json"
    validate_connector(connector, allow_private=False)
    connector.custom_http.body = "text=@text"
    with pytest.raises(InvalidArgument) as caught:
        validate_connector(connector, allow_private=False)
    assert caught.value.field == "connector.custom_http" and "@to_digits" in caught.value.message
