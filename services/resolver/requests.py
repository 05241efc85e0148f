"""Builds PII API requests from a config's templates.

Single mode replaces `@anonymous_id` in the URL (percent-encoded), query values,
header values and body (escaped for JSON or form bodies); bulk mode replaces
`"@anonymous_ids"` in the body with the JSON array of IDs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.json_documents import dump

SINGLE_PLACEHOLDER = re.compile(r"@anonymous_id\b")
BULK_PLACEHOLDER = '"@anonymous_ids"'


@dataclass(frozen=True)
class PiiApiRequest:
    method: str
    url: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes | None


def looks_like_json(body: str) -> bool:
    return body.lstrip()[:1] in ("{", "[")


def _content_type(headers: dict[str, str], body: str) -> dict[str, str]:
    if body and not any(k.lower() == "content-type" for k in headers):
        kind = "application/json" if looks_like_json(body) else "application/x-www-form-urlencoded"
        return {**headers, "Content-Type": kind}
    return headers


def _method(config: pb.PiiApiConfig) -> str:
    return "GET" if config.method == pb.HTTP_METHOD_GET else "POST"


def single_request(config: pb.PiiApiConfig, anonymous_id: str) -> PiiApiRequest:
    def sub(template: str, replacement: str) -> str:
        return SINGLE_PLACEHOLDER.sub(lambda _: replacement, template)

    body = config.body
    if body:
        escaped = json.dumps(anonymous_id)[1:-1] if looks_like_json(body) else quote_plus(anonymous_id)
        body = sub(body, escaped)
    headers = {k: sub(v, anonymous_id) for k, v in config.headers.items()}
    return PiiApiRequest(
        method=_method(config),
        url=sub(config.url, quote(anonymous_id, safe="")),
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
