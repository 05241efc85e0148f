"""The compiled request template and message-ID getter give what their per-call forms give."""

from __future__ import annotations

import html
import json
from urllib.parse import quote, quote_plus
from xml.sax.saxutils import escape as xml_escape

import jmespath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.jsonpath import compile_getter
from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.connectors.custom_http import (
    CompiledRequest,
    _form_escape,
    _url_escape,
    join_url,
    substitute,
)

DOCUMENTS = [
    {"messages": [{"message-id": "0A1B", "status": "0"}]},
    {"messages": []},
    {"messages": {"0": "x"}},
    {"messages": [None]},
    {"sid": "SM1", "data": {"id": 7, "items": [1, 2, 3]}},
    {"a": {"b": {"c": "deep"}}},
    [1, 2, 3],
    "text",
    None,
    {},
]
PATHS = [
    'messages[0]."message-id"',
    "messages[0].status",
    "messages[-1].status",
    "messages[5]",
    "sid",
    "data.id",
    "data.items[1]",
    "data.items[-1]",
    "a.b.c",
    "a.b.missing",
    "[0]",
    "@",
    "data.items[*]",  # a projection: jmespath itself answers
]


@pytest.mark.parametrize("path", PATHS)
def test_getter_matches_jmespath(path: str) -> None:
    getter = compile_getter(path)
    for document in DOCUMENTS:
        assert getter(document) == jmespath.search(path, document), (path, document)


def message(text: str = "Hi @to, 50% off & more") -> OutboundMessage:
    return OutboundMessage(
        message_id="m-1",
        anonymous_id="a-1",
        campaign_id="c",
        campaign_instance_id="i",
        to="+447700900123",
        sms_body=text,
    )


TEMPLATES = [
    pb.CustomHttpTemplate(
        method="POST",
        url="/sms/json?key=@credentials.api_key&to=@to",
        body="api_key=@credentials.api_key&from=@sender&to=@to&text=@text&ref=@message_id&x=@credentials.none",
        headers={"X-Ref": "@message_id", "X-Sender": "@sender"},
    ),
    pb.CustomHttpTemplate(method="post", url="https://gw.example.com/send", body='{"to": "@to", "text": "@text"}'),
    pb.CustomHttpTemplate(method="GET", url="/send/@to/@text", body="ignored @to"),
    pb.CustomHttpTemplate(url="/plain", body="no placeholders", headers={"content-type": "text/plain"}),
    pb.CustomHttpTemplate(url="/plain", body="@to: @text (@sender)", headers={"Content-Type": "text/plain"}),
    pb.CustomHttpTemplate(
        url="/xml",
        body='<sms ref="@message_id"><to>@to</to><text>@text</text><k>@credentials.api_key</k></sms>',
        headers={"Content-Type": "text/xml; charset=utf-8"},
    ),
    pb.CustomHttpTemplate(url="/xml", body=" <sms from='@sender'>@text</sms>"),
    pb.CustomHttpTemplate(url="/json", body='"@text"', headers={"content-type": "application/vnd.gw+json"}),
    pb.CustomHttpTemplate(url="/html", body='<p title="@sender">@text</p>', headers={"Content-Type": "text/html"}),
]
# What an XML parser would normalise (a CR, whitespace in an attribute) is written as a reference.
XML_ENTITIES = {'"': "&quot;", "'": "&apos;", "\r": "&#13;", "\n": "&#10;", "\t": "&#9;"}
# The body's escape for each template above, by its Content-Type (or, without one, by its first character).
REFERENCE_ESCAPES = {
    "text/plain": lambda v: v,
    "text/html": lambda v: html.escape(v, quote=True),
    "text/xml; charset=utf-8": lambda v: xml_escape(v, XML_ENTITIES),
    "application/vnd.gw+json": lambda v: json.dumps(v, ensure_ascii=False)[1:-1],
    "{": lambda v: json.dumps(v, ensure_ascii=False)[1:-1],
    "<": lambda v: xml_escape(v, XML_ENTITIES),
}

DEFAULT_TYPES = {"{": "application/json", "[": "application/json", "<": "application/xml"}


def reference(template: pb.CustomHttpTemplate, m: OutboundMessage, sender: str, credentials: dict[str, str]):
    """The request as `substitute` builds it, one placeholder pass per field."""
    values = {"to": m.to, "text": m.sms_body, "message_id": m.message_id, "sender": sender}
    url = substitute(
        join_url("https://base.example.com", template.url), values, credentials, lambda v: quote(v, safe="")
    )
    headers = {k: substitute(v, values, credentials, lambda v: v) for k, v in template.headers.items()}
    body = None
    method = template.method.upper() or "POST"
    if method != "GET" and template.body:
        declared = {k.lower(): v for k, v in template.headers.items()}.get("content-type")
        escape = REFERENCE_ESCAPES.get(declared or template.body.lstrip()[:1], quote_plus)
        body = substitute(template.body, values, credentials, escape).encode()
        if declared is None:
            headers["Content-Type"] = DEFAULT_TYPES.get(template.body.lstrip()[:1], "application/x-www-form-urlencoded")
    return method, url, headers, body


@pytest.mark.parametrize("template", TEMPLATES)
def test_compiled_request_matches_substitution(template: pb.CustomHttpTemplate) -> None:
    credentials = {"api_key": "k&y <@to>"}
    compiled = CompiledRequest(
        template, sender="Brand @to", credentials=credentials, base_url="https://base.example.com"
    )
    for m in (message(), message('line\\n"quoted" @sender'), message("<b>Tom & 'Jerry'</b>\r\n\t✓"), message("")):
        request = compiled.render(m)
        method, url, headers, body = reference(template, m, "Brand @to", credentials)
        assert (request.method, request.url, request.body) == (method, url, body)
        assert request.headers == headers


@settings(max_examples=500)
@given(st.text())
def test_escapes_are_urllib_quoting(value: str) -> None:
    assert _url_escape(value) == quote(value, safe="")
    assert _form_escape(value) == quote_plus(value)


def test_escapes_of_every_ascii_character() -> None:
    every = "".join(chr(c) for c in range(128))
    assert _url_escape(every) == quote(every, safe="")
    assert _form_escape(every) == quote_plus(every)
