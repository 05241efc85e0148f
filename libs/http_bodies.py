"""HTTP bodies: reading a whole reply with aiohttp, up to a limit; and what kind a request body a
template makes is (JSON, XML, HTML, a form or plain text), which decides how the values put into it are
escaped (`BODY_ESCAPES`). The resolver's single-mode PII API bodies and the custom HTTP connector's bodies
follow the same rules."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Mapping
from urllib.parse import quote_plus

import aiohttp


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to its end, or its first `limit` + 1 bytes when it is longer than `limit`.

    `StreamReader.read(n)` returns what has arrived so far, not n bytes: a body that comes in
    pieces (a slow network, TLS records, a large reply) would be cut at the first one.
    """
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def looks_like_json(body: str) -> bool:
    return body.lstrip()[:1] in ("{", "[")


def looks_like_xml(body: str) -> bool:
    return body.lstrip()[:1] == "<"


_MEDIA_TYPE = re.compile(r"^([!#$%&'*+.^_`|~0-9a-z-]+)/([!#$%&'*+.^_`|~0-9a-z-]+)\Z")
# What a body without a Content-Type is sent as, by its kind.
DEFAULT_CONTENT_TYPE = {
    "json": "application/json",
    "xml": "application/xml",
    "form": "application/x-www-form-urlencoded",
}


def content_type_header(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """A template's Content-Type header (name as written, value), whatever the case of its name."""
    for name, value in headers.items():
        if name.lower() == "content-type":
            return name, value
    return None


def body_kind(content_type: str) -> str | None:
    """How a body declared `content_type` is escaped: "json", "xml", "html", "form" or "text" (as it is),
    or None for a type whose escaping is not known (`application/octet-stream`, not a media type)."""
    match = _MEDIA_TYPE.match(content_type.partition(";")[0].strip().lower())
    if match is None:
        return None
    top, subtype = match.groups()
    if subtype == "json" or subtype.endswith("+json"):
        return "json"
    if subtype == "xml" or subtype.endswith("+xml"):
        return "xml"
    if top == "application" and subtype == "x-www-form-urlencoded":
        return "form"
    if top == "text":
        return "html" if subtype == "html" else "text"
    return None


def guessed_body_kind(body: str) -> str:
    """A body without a Content-Type: JSON when it opens with `{` or `[`, XML with `<`, else a form."""
    if looks_like_json(body):
        return "json"
    return "xml" if looks_like_xml(body) else "form"


class NotXml(ValueError):
    """A value holds a character XML 1.0 has no way to write, not even as a character reference."""


# Text or an attribute value (either quote) in an XML document. Parsers turn a written CR (or CR LF) into
# LF, and a tab or LF in an attribute value into a space: as references they arrive as sent.
XML_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "'": "&apos;",
        "\r": "&#13;",
        "\n": "&#10;",
        "\t": "&#9;",
    }
)
# C0 controls but tab and line breaks, U+FFFE, U+FFFF and lone surrogates.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def xml_escape(value: str) -> str:
    """`value` as text or an attribute value in an XML document; raises NotXml for what XML cannot carry."""
    if _NOT_XML.search(value):
        raise NotXml
    return value.translate(XML_ESCAPES)


def xml_cdata_escape(value: str) -> str:
    """`value` inside a CDATA section, where a reference is not read as one: `]]>` and a CR (which a
    parser turns into LF) are written by closing the section around them and opening it again."""
    if _NOT_XML.search(value):
        raise NotXml
    return value.replace("]]>", "]]]]><![CDATA[>").replace("\r", "]]>&#13;<![CDATA[")


def _in_cdata(body: str, position: int) -> bool:
    opened = body.rfind("<![CDATA[", 0, position)
    return opened >= 0 and body.find("]]>", opened, position) < 0


def json_escape(value: str) -> str:
    """`value` as the inside of a JSON string."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def html_escape(value: str) -> str:
    """`value` as HTML text or an attribute value (either quote)."""
    return html.escape(value, quote=True)


def form_escape(value: str) -> str:
    """`value` as a name or value in an application/x-www-form-urlencoded body."""
    return quote_plus(value)


def as_is(value: str) -> str:
    return value


# How a value is written into a body of each kind.
BODY_ESCAPES: dict[str, Callable[[str], str]] = {
    "json": json_escape,
    "xml": xml_escape,
    "html": html_escape,
    "form": form_escape,
    "text": as_is,
}


def body_escape(kind: str, body: str, position: int) -> Callable[[str], str]:
    """How a value at `position` of a body of `kind` is escaped: by the kind, and in XML by whether the
    value lies in a CDATA section."""
    if kind == "xml" and _in_cdata(body, position):
        return xml_cdata_escape
    return BODY_ESCAPES[kind]
