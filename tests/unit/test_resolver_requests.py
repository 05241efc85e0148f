"""Unit tests for services/resolver/requests.py: PII API requests built from config templates."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, unquote
from xml.etree import ElementTree

import pytest
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver.requests import IdNotSendable, bulk_request, looks_like_json, single_request


def single(**kwargs) -> pb.PiiApiConfig:
    kwargs.setdefault("method", pb.HTTP_METHOD_GET)
    kwargs.setdefault("url", "https://pii.example.com/v1/customers/@anonymous_id")
    return pb.PiiApiConfig(mode=pb.MODE_SINGLE, **kwargs)


def bulk(**kwargs) -> pb.PiiApiConfig:
    kwargs.setdefault("url", "https://pii.example.com/v1/customers:batchGet")
    kwargs.setdefault("body", '{"ids": "@anonymous_ids"}')
    return pb.PiiApiConfig(mode=pb.MODE_BULK, method=pb.HTTP_METHOD_POST, **kwargs)


# --- single mode: URL ---------------------------------------------------------------------------


def test_get_substitutes_the_id_in_the_url_path() -> None:
    request = single_request(single(), "cust-123")
    assert request.method == "GET"
    assert str(request.url) == "https://pii.example.com/v1/customers/cust-123"
    assert request.body is None
    assert "Content-Type" not in request.headers


@pytest.mark.parametrize(
    ("anonymous_id", "encoded"),
    [
        ("a/b", "a%2Fb"),
        ("a b", "a%20b"),
        ("a?b#c", "a%3Fb%23c"),
        ("../admin", "..%2Fadmin"),
        ("Zoë", "Zo%C3%AB"),
        # Kept encoded as sent: `/customers/a;b` is customer `a` to Tomcat and Spring (a matrix parameter).
        ("a;b", "a%3Bb"),
        ("a&b=c,d@e:f!g$h'i(j)k*l", "a%26b%3Dc%2Cd%40e%3Af%21g%24h%27i%28j%29k%2Al"),
    ],
)
def test_url_path_id_is_percent_encoded(anonymous_id: str, encoded: str) -> None:
    request = single_request(single(), anonymous_id)
    assert str(request.url) == f"https://pii.example.com/v1/customers/{encoded}"
    assert request.url.raw_path == f"/v1/customers/{encoded}"  # what goes on the wire
    assert unquote(str(request.url).rsplit("/", 1)[1]) == anonymous_id


def test_every_occurrence_in_the_url_is_replaced() -> None:
    config = single(url="https://pii.example.com/@anonymous_id/profile/@anonymous_id")
    assert str(single_request(config, "x1").url) == "https://pii.example.com/x1/profile/x1"


def test_regex_replacement_syntax_in_the_id_is_taken_literally() -> None:
    request = single_request(single(headers={"X-Id": "@anonymous_id"}), r"a\1\g<0>b")
    assert request.headers["X-Id"] == r"a\1\g<0>b"


# --- single mode: query params and headers -----------------------------------------------------


def test_query_params_get_the_raw_id() -> None:
    config = single(url="https://pii.example.com/v1/customers", query_params={"id": "@anonymous_id", "fields": "email"})
    request = single_request(config, "a b/c")
    assert request.params == {"id": "a b/c", "fields": "email"}
    assert request.url == "https://pii.example.com/v1/customers"


def test_headers_get_the_id_and_keep_other_values() -> None:
    config = single(headers={"X-Customer": "id=@anonymous_id", "X-Api-Key": "sk_live_123"})
    request = single_request(config, "cust-9")
    assert request.headers == {"X-Customer": "id=cust-9", "X-Api-Key": "sk_live_123"}


@pytest.mark.parametrize("anonymous_id", ["Zoë", "顧客-1", "a\u200bb"])
def test_an_id_other_than_ascii_is_refused_where_a_header_would_carry_it(anonymous_id: str) -> None:
    config = single(headers={"X-Customer": "id=@anonymous_id", "X-Api-Key": "sk_live_123"})
    with pytest.raises(IdNotSendable) as info:
        single_request(config, anonymous_id)
    assert anonymous_id not in str(info.value)


def test_an_id_other_than_ascii_goes_out_encoded_where_no_header_carries_it() -> None:
    config = single(headers={"X-Api-Key": "sk_live_123"}, query_params={"id": "@anonymous_id"})
    request = single_request(config, "Zoë")
    assert request.url.raw_path == "/v1/customers/Zo%C3%AB"
    assert request.params == {"id": "Zoë"}
    assert request.headers == {"X-Api-Key": "sk_live_123"}


def test_plural_placeholder_is_not_touched_by_the_single_substitution() -> None:
    config = single(
        url="https://pii.example.com/v1/customers/@anonymous_id",
        query_params={"many": "@anonymous_ids"},
        headers={"X-Many": "@anonymous_ids"},
    )
    request = single_request(config, "cust-1")
    assert request.params == {"many": "@anonymous_ids"}
    assert request.headers["X-Many"] == "@anonymous_ids"


# --- single mode: bodies -----------------------------------------------------------------------


def test_json_body_gets_a_json_escaped_id() -> None:
    config = single(method=pb.HTTP_METHOD_POST, url="https://pii.example.com/lookup", body='{"id": "@anonymous_id"}')
    anonymous_id = 'he said "hi"\\ \n\u00e9'
    request = single_request(config, anonymous_id)
    assert request.method == "POST"
    assert json.loads(request.body) == {"id": anonymous_id}
    assert request.headers["Content-Type"] == "application/json"


def test_json_body_keeps_the_plural_placeholder() -> None:
    config = single(
        method=pb.HTTP_METHOD_POST,
        url="https://pii.example.com/lookup",
        body='{"id": "@anonymous_id", "x": "@anonymous_ids"}',
    )
    assert json.loads(single_request(config, "c1").body) == {"id": "c1", "x": "@anonymous_ids"}


def test_form_body_gets_a_quote_plus_id() -> None:
    config = single(
        method=pb.HTTP_METHOD_POST, url="https://pii.example.com/lookup", body="id=@anonymous_id&fields=email"
    )
    anonymous_id = "a b&c=d+é"
    request = single_request(config, anonymous_id)
    assert request.body == b"id=a+b%26c%3Dd%2B%C3%A9&fields=email"
    assert parse_qs(request.body.decode()) == {"id": [anonymous_id], "fields": ["email"]}
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"


@pytest.mark.parametrize("content_type", ["text/plain", "application/vnd.brand+json"])
def test_an_explicit_content_type_is_kept(content_type: str) -> None:
    config = single(
        method=pb.HTTP_METHOD_POST,
        url="https://pii.example.com/lookup",
        body='{"id": "@anonymous_id"}',
        headers={"content-type": content_type},
    )
    request = single_request(config, "c1")
    assert request.headers == {"content-type": content_type}


XML_BODY = "<lookup><customer id='@anonymous_id'/><ref>@anonymous_id</ref></lookup>"


@pytest.mark.parametrize(
    "headers", [{}, {"Content-Type": "text/xml; charset=utf-8"}, {"content-type": "application/soap+xml"}]
)
def test_an_xml_body_gets_an_xml_escaped_id_and_an_xml_content_type(headers: dict[str, str]) -> None:
    """A SOAP or XML lookup gets the ID as written, escaped for XML: form encoding turned `ab+c/d==` (a
    base64 token) into `ab%2Bc%2Fd%3D%3D`, another customer's ID to the API, and sent the body as a form."""
    config = single(method=pb.HTTP_METHOD_POST, url="https://pii.example.com/lookup", body=XML_BODY, headers=headers)
    anonymous_id = "ab+c/d==&<x>'\"'"
    request = single_request(config, anonymous_id)
    root = ElementTree.fromstring(request.body)
    assert root.find("customer").get("id") == anonymous_id
    assert root.find("ref").text == anonymous_id
    assert request.headers == (headers or {"Content-Type": "application/xml"})


def test_an_id_in_a_cdata_section_is_written_as_it_is() -> None:
    """Inside CDATA a reference is not read: `&amp;` arrived as five characters, another ID."""
    body = "<lookup><ref><![CDATA[@anonymous_id]]></ref><id>@anonymous_id</id></lookup>"
    config = single(method=pb.HTTP_METHOD_POST, url="https://pii.example.com/lookup", body=body)
    anonymous_id = "a&b<c]]>d"
    root = ElementTree.fromstring(single_request(config, anonymous_id).body)
    assert root.find("ref").text == anonymous_id
    assert root.find("id").text == anonymous_id


def test_an_html_body_gets_an_html_escaped_id() -> None:
    config = single(
        method=pb.HTTP_METHOD_POST,
        url="https://pii.example.com/lookup",
        body="<p title='@anonymous_id'>@anonymous_id</p>",
        headers={"Content-Type": "text/html"},
    )
    assert single_request(config, "a+b<i>'\"").body == (
        b"<p title='a+b&lt;i&gt;&#x27;&quot;'>a+b&lt;i&gt;&#x27;&quot;</p>"
    )


def test_an_id_an_xml_body_cannot_carry_is_not_sendable() -> None:
    config = single(method=pb.HTTP_METHOD_POST, url="https://pii.example.com/lookup", body=XML_BODY)
    with pytest.raises(IdNotSendable, match="XML body"):
        single_request(config, "a\x01b")


@pytest.mark.parametrize("content_type", ["text/plain", "text/csv; charset=utf-8"])
def test_a_text_body_gets_the_id_as_it_is(content_type: str) -> None:
    config = single(
        method=pb.HTTP_METHOD_POST,
        url="https://pii.example.com/lookup",
        body="customer @anonymous_id",
        headers={"Content-Type": content_type},
    )
    assert single_request(config, "ab+c/d==").body == b"customer ab+c/d=="


def test_a_form_body_declared_as_a_form_gets_a_quote_plus_id() -> None:
    config = single(
        method=pb.HTTP_METHOD_POST,
        url="https://pii.example.com/lookup",
        body="id=@anonymous_id",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert single_request(config, "a+b").body == b"id=a%2Bb"


def test_post_without_body_has_no_body_and_no_content_type() -> None:
    config = single(method=pb.HTTP_METHOD_POST)
    request = single_request(config, "c1")
    assert request.method == "POST"
    assert request.body is None
    assert "Content-Type" not in request.headers


def test_looks_like_json() -> None:
    assert looks_like_json('  {"a": 1}')
    assert looks_like_json("[1]")
    assert not looks_like_json("a=1")
    assert not looks_like_json("")


# --- bulk mode ---------------------------------------------------------------------------------


def test_bulk_body_gets_the_json_array_of_ids() -> None:
    ids = ["a1", 'quote"d', "slash/ed", "é"]
    request = bulk_request(bulk(body='{"ids": "@anonymous_ids", "fields": ["email"]}'), ids)
    assert request.method == "POST"
    assert request.url == "https://pii.example.com/v1/customers:batchGet"
    assert json.loads(request.body) == {"ids": ids, "fields": ["email"]}
    assert request.headers["Content-Type"] == "application/json"


def test_bulk_keeps_query_params_and_headers_as_they_are() -> None:
    config = bulk(query_params={"v": "2"}, headers={"X-Api-Key": "sk_live_123", "Content-Type": "application/json"})
    request = bulk_request(config, ["a1"])
    assert request.params == {"v": "2"}
    assert request.headers == {"X-Api-Key": "sk_live_123", "Content-Type": "application/json"}


def test_bulk_body_can_be_the_bare_array() -> None:
    request = bulk_request(bulk(body='"@anonymous_ids"'), ["a1", "a2"])
    assert json.loads(request.body) == ["a1", "a2"]
