"""Builds PII API requests from a config's templates.

Single mode replaces `@anonymous_id` in the URL (percent-encoded, and sent so), query values,
header values (ASCII IDs only) and body (escaped for what the body is: JSON, XML, a form, or as it is
in other text); bulk mode replaces `"@anonymous_ids"` in the body with the JSON array of IDs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote

from tokensend.resolver.v1 import resolver_service_pb2 as pb
from yarl import URL

from libs.http_bodies import (
    DEFAULT_CONTENT_TYPE,
    NotXml,
    body_escape,
    body_kind,
    content_type_header,
    guessed_body_kind,
    looks_like_json,
)
from libs.json_documents import dump

SINGLE_PLACEHOLDER = re.compile(r"@anonymous_id\b")
BULK_PLACEHOLDER = '"@anonymous_ids"'


@dataclass(frozen=True)
class PiiApiRequest:
    method: str
    url: str | URL  # a URL holding an ID is given as sent: yarl would decode what it escaped
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes | None


def _content_type(headers: dict[str, str], body: str) -> dict[str, str]:
    if body and content_type_header(headers) is None:
        return {**headers, "Content-Type": DEFAULT_CONTENT_TYPE[guessed_body_kind(body)]}
    return headers


def _body_with_id(body: str, headers: dict[str, str], anonymous_id: str) -> str:
    """`body` with the ID in place of each `@anonymous_id`, written as the body carries it
    (libs.http_bodies): JSON-escaped in a JSON body, XML-escaped in an XML one (by its declared type, or
    opening with "<" without one; as CDATA where it lies in a section), HTML-escaped in HTML, as it is in
    other text, form-encoded otherwise. Form encoding in XML turned `ab+c/d==` (a base64 token) into
    another ID, `ab%2Bc%2Fd%3D%3D`."""
    if looks_like_json(body):
        kind = "json"
    else:
        declared = content_type_header(headers)
        kind = (body_kind(declared[1]) or "form") if declared else guessed_body_kind(body)
    try:
        return SINGLE_PLACEHOLDER.sub(lambda match: body_escape(kind, body, match.start())(anonymous_id), body)
    except NotXml:
        raise IdNotSendable(NOT_XML) from None


def _method(config: pb.PiiApiConfig) -> str:
    return "GET" if config.method == pb.HTTP_METHOD_GET else "POST"


# Letters only: the brand's part of a URL is encoded around it, and it around nothing.
_ID_MARK = "tokensendanonymousid"


@functools.lru_cache(maxsize=256)
def _brand_part(template: str) -> str | None:
    """The template encoded as yarl would send it, `_ID_MARK` where the ID goes: once per config, not per
    ID. None for a host yarl refuses."""
    try:
        return str(URL(SINGLE_PLACEHOLDER.sub(_ID_MARK, template)))
    except ValueError:
        return None


def url_with_id(template: str, anonymous_id: str) -> str | URL:
    """The config's URL with the ID in place of `@anonymous_id`, percent-encoded, and kept so. Parsed
    as a string, the URL would have `%3B`, `%26`, `%3D`, `%40` ... decoded back by yarl: an ID `a;b`
    went out as `/customers/a;b`, which Tomcat and Spring read as customer `a` (the rest a matrix
    parameter), and another customer's contact came back."""
    if SINGLE_PLACEHOLDER.search(template) is None:
        return template
    brand_part = _brand_part(template)
    if brand_part is None:
        # A host yarl refuses, in a config saved before such URLs were: the call fails as an attempt
        # (the request cannot be built), for this ID, not the whole reply.
        return SINGLE_PLACEHOLDER.sub(lambda _: quote(anonymous_id, safe=""), template)
    return URL(brand_part.replace(_ID_MARK, quote(anonymous_id, safe="")), encoded=True)


class IdNotSendable(ValueError):
    """The ID cannot be written where the config puts it (its text is never kept)."""


NOT_XML = "holds a control character, which the config's XML body with @anonymous_id cannot carry"
NOT_ASCII_IN_HEADER = "holds characters other than ASCII, which the config's header with @anonymous_id cannot carry"


def single_request(config: pb.PiiApiConfig, anonymous_id: str) -> PiiApiRequest:
    """The request for one ID; raises IdNotSendable when a header would carry it and it is not ASCII."""

    def sub(template: str, replacement: str) -> str:
        return SINGLE_PLACEHOLDER.sub(lambda _: replacement, template)

    body = config.body
    if body:
        body = _body_with_id(body, dict(config.headers), anonymous_id)
    headers = {k: sub(v, anonymous_id) for k, v in config.headers.items()}
    # Headers carry ASCII (RFC 9110); percent-encoded, "Zoë" is customer "Zo%C3%AB" to an API reading them raw.
    if not anonymous_id.isascii() and any(SINGLE_PLACEHOLDER.search(v) for v in config.headers.values()):
        raise IdNotSendable(NOT_ASCII_IN_HEADER)
    return PiiApiRequest(
        method=_method(config),
        url=url_with_id(config.url, anonymous_id),
        params={k: sub(v, anonymous_id) for k, v in config.query_params.items()},
        headers=_content_type(headers, body),
        body=body.encode() if body else None,
    )


def bulk_request(config: pb.PiiApiConfig, anonymous_ids: list[str]) -> PiiApiRequest:
    body = config.body.replace(BULK_PLACEHOLDER, dump(anonymous_ids).decode())
    return PiiApiRequest(
        method="POST",
        url=config.url,
        params=dict(config.query_params),
        headers=_content_type(dict(config.headers), body),
        body=body.encode(),
    )
