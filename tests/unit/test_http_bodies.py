"""read_at_most: a body read whole across pieces, and cut just past its limit; a body's kind by its
Content-Type, and each kind's escaping, read back by a parser of that kind."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from urllib.parse import parse_qs
from xml.etree import ElementTree

import pytest

from libs.http_bodies import (
    BODY_ESCAPES,
    NotXml,
    body_escape,
    body_kind,
    form_escape,
    html_escape,
    json_escape,
    read_at_most,
    xml_escape,
)


class Pieces:
    """A StreamReader's read(n): at most n bytes of what has arrived, b"" at the end."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self.asked: list[int] = []

    async def read(self, n: int) -> bytes:
        self.asked.append(n)
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece


@pytest.mark.parametrize(
    ("pieces", "limit", "expected"),
    [
        ((b'{"a"', b": 1", b"}"), 100, b'{"a": 1}'),
        ((b"12345",), 5, b"12345"),  # exactly the limit: whole, nothing more asked for than one byte over
        ((b"123", b"456"), 5, b"123456"),  # one past the limit tells the caller it is too long
        ((b"123", b"4567890"), 5, b"123456"),
        ((), 5, b""),
    ],
)
async def test_read_at_most(pieces, limit, expected):
    stream = Pieces(*pieces)
    assert await read_at_most(stream, limit) == expected  # type: ignore[arg-type]
    assert all(n >= 1 for n in stream.asked)


# -- how a value is written into a body of each kind ---------------------------------------------

VALUES = [
    'Tom & Jerry <3 \'em "all" > you ✓',
    "line one\r\nline two\rthree\nfour\tfive",
    "a+b c=d&e%20f;g #h/?",
    "]]> <![CDATA[ -->",
    "&amp; &#10; &lt;",
]


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("text/html", "html"),
        ("Text/HTML; charset=utf-8", "html"),
        ("application/xhtml+xml", "xml"),
        ("text/plain", "text"),
        ("text/xml", "xml"),
        ("application/x-www-form-urlencoded", "form"),
        ("application/vnd.api+json", "json"),
        ("application/octet-stream", None),
    ],
)
def test_body_kind(content_type: str, kind: str | None) -> None:
    assert body_kind(content_type) == kind


@pytest.mark.parametrize("value", VALUES)
def test_an_xml_value_arrives_as_it_was_in_text_and_in_attributes(value: str) -> None:
    """A parser turns a written CR into LF, and a tab or LF in an attribute into a space."""
    body = "<sms a=\"@v\" b='@v'>@v</sms>".replace("@v", xml_escape(value))
    root = ElementTree.fromstring(body)
    assert (root.text, root.get("a"), root.get("b")) == (value, value, value)


@pytest.mark.parametrize(
    "character", ["\x00", "\x08", "\x0b", "\x0c", "\x0e", "\x1f", "\ud800", "\udfff", "\ufffe", "\uffff"]
)
def test_a_character_xml_cannot_carry_is_refused(character: str) -> None:
    with pytest.raises(NotXml):
        xml_escape(f"a{character}b")


@pytest.mark.parametrize("value", VALUES)
def test_an_html_value_arrives_as_it_was_in_text_and_in_attributes(value: str) -> None:
    class Reader(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.seen: list[object] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.seen.append((tag, attrs))

        def handle_data(self, data: str) -> None:
            self.seen.append(data)

    reader = Reader()
    reader.feed("<p title=\"@v\" alt='@v'>@v</p>".replace("@v", html_escape(value)))
    reader.close()
    assert reader.seen == [("p", [("title", value), ("alt", value)]), value]


@pytest.mark.parametrize("value", VALUES)
def test_json_and_form_values_arrive_as_they_were(value: str) -> None:
    assert json.loads('{"v": "' + json_escape(value) + '"}') == {"v": value}
    assert parse_qs(f"v={form_escape(value)}&w=1", strict_parsing=True) == {"v": [value], "w": ["1"]}


def test_html_and_text_bodies_have_their_escapes() -> None:
    assert BODY_ESCAPES["html"]('<b a="1">&') == "&lt;b a=&quot;1&quot;&gt;&amp;"
    assert BODY_ESCAPES["text"]("<b>&") == "<b>&"


@pytest.mark.parametrize("value", VALUES)
def test_an_xml_value_in_a_cdata_section_arrives_as_it_was(value: str) -> None:
    """References are not read in a CDATA section: `&amp;` there would reach the gateway as written."""
    template = "<sms><to>@v</to><text><![CDATA[@v]]></text></sms>"
    at = [i for i in range(len(template)) if template.startswith("@v", i)]
    escapes = [body_escape("xml", template, i) for i in at]
    body = template[: at[0]] + escapes[0](value) + template[at[0] + 2 : at[1]] + escapes[1](value) + "]]></text></sms>"
    root = ElementTree.fromstring(body)
    assert (root.findtext("to"), root.findtext("text")) == (value, value)


def test_a_character_xml_cannot_carry_is_refused_in_a_cdata_section_too() -> None:
    with pytest.raises(NotXml):
        body_escape("xml", "<t><![CDATA[@v]]></t>", 12)("a\x00b")


def test_only_xml_escapes_depend_on_where_the_value_is() -> None:
    assert body_escape("xml", "<t>@v</t>", 3) is xml_escape
    assert body_escape("xml", "<t><![CDATA[x]]>@v</t>", 16) is xml_escape
    assert body_escape("html", "<t><![CDATA[@v]]></t>", 12) is html_escape
