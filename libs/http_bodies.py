"""HTTP bodies: reading a whole reply with aiohttp, up to a limit; and what kind a request body a
template makes is (JSON, XML, a form or plain text), which decides how the values put into it are escaped.
The resolver's single-mode PII API bodies and the custom HTTP connector's bodies follow the same rules."""

from __future__ import annotations

import re
from collections.abc import Mapping

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
    """How a body declared `content_type` is escaped: "json", "xml", "form" or "text" (as it is), or
    None for a type whose escaping is not known (`application/octet-stream`, not a media type)."""
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
        return "text"
    return None


def guessed_body_kind(body: str) -> str:
    """A body without a Content-Type: JSON when it opens with `{` or `[`, XML with `<`, else a form."""
    if looks_like_json(body):
        return "json"
    return "xml" if looks_like_xml(body) else "form"


# Text or an attribute value (either quote) in an XML document.
XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"})
