"""Unit tests for the SMTP connector's message: our Message-ID, headers, parts, refusals."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest

from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.connectors.smtp import InvalidMessage, build_email, message_id_header, needs_smtputf8

ADDRESS = "smtp.canary@mail.example.org"


def message(**fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id="a1b2c3d4e5f60718293a4b5c6d7e8f90",
        anonymous_id="anon-1",
        campaign_id="camp",
        campaign_instance_id="inst",
        to=ADDRESS,
        subject="Grüße, Ann",
        text_body="Hi Ann\n.\nA line with a lone dot",
        html_body="<p>Hi Ann</p>",
        headers={"List-Unsubscribe": "<https://brand.example.com/u>", "Bcc": "spy@example.com"},
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


def parsed(m: OutboundMessage):  # noqa: ANN201
    return message_from_bytes(build_email(m, "news@brand.example.com").as_bytes(), policy=policy.default)


def test_headers_and_alternative_parts() -> None:
    email = parsed(message())
    assert email["Message-ID"] == "<a1b2c3d4e5f60718293a4b5c6d7e8f90@tokensend>"
    assert (email["From"], email["To"], email["Subject"]) == ("news@brand.example.com", ADDRESS, "Grüße, Ann")
    assert email["Date"]
    assert email["List-Unsubscribe"] == "<https://brand.example.com/u>"
    assert email["Bcc"] is None
    assert email.get_content_type() == "multipart/alternative"
    parts = [(p.get_content_type(), p.get_content().replace("\r\n", "\n")) for p in email.iter_parts()]
    assert parts == [("text/plain", "Hi Ann\n.\nA line with a lone dot\n"), ("text/html", "<p>Hi Ann</p>\n")]


def test_single_part_messages() -> None:
    assert parsed(message(html_body="")).get_content_type() == "text/plain"
    assert parsed(message(text_body="")).get_content_type() == "text/html"


def test_no_body_is_refused() -> None:
    with pytest.raises(InvalidMessage):
        build_email(message(text_body="", html_body=""), "news@brand.example.com")


def test_header_injection_is_refused_without_quoting_the_value() -> None:
    with pytest.raises(InvalidMessage) as caught:
        build_email(message(subject=f"Hi\r\nBcc: {ADDRESS}"), "news@brand.example.com")
    assert ADDRESS not in str(caught.value)


def test_wire_form_uses_crlf() -> None:
    raw = build_email(message(), "news@brand.example.com").as_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_message_id_header_and_smtputf8() -> None:
    assert message_id_header("abc") == "<abc@tokensend>"
    assert needs_smtputf8("news@brand.example.com", "ann@exämple.org")
    assert not needs_smtputf8("news@brand.example.com", ADDRESS)


def test_a_long_list_unsubscribe_url_is_written_as_it_is() -> None:
    """RFC 2047 (section 5) allows encoded-words only in text, comments and phrases: a URL longer than a
    folded line must reach the mail client as the URL, not as `=?utf-8?q?=3Chttps...?=`."""
    url = "<https://notifications.brand.example.com/tokensend/unsubscribe/" + "AbC-d_9" * 14 + ">"
    m = message(headers={"List-Unsubscribe": url, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
    headers = build_email(m, "news@brand.example.com").as_bytes().split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert f"List-Unsubscribe: {url}" in headers  # one line, not folded into encoded-words
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in headers
