"""Content API configs, the in-memory cache, templates naming content APIs, and the egress target guard."""

from __future__ import annotations

import socket

import pytest
import yarl
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.errors import InvalidArgument
from libs.netguard import BlockedAddress
from services.dispatcher.rendering import ContentTemplates
from services.resolver.content_apis import ContentCache, prepare_content_config, request_config
from services.resolver.egress import TargetGuard


def config(**overrides) -> pb.ContentApiConfig:
    values = dict(
        workspace_id="brand",
        name="loyalty",
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url="https://api.brand.example/loyalty/@anonymous_id",
        field_paths={"points": "member.points", "tier": "member.tier"},
        non_sensitive_fields=["tier"],
    )
    values.update(overrides)
    return pb.ContentApiConfig(**values)


def test_a_valid_config_gets_the_pii_api_defaults():
    prepared = config()
    prepare_content_config(prepared, allow_private=False)
    assert (prepared.timeout_ms, prepared.max_retries) == (5000, 3)
    as_request = request_config(prepared)
    assert dict(as_request.attribute_paths) == {"points": "member.points", "tier": "member.tier"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(name="not a name"), "config.name"),
        (dict(field_paths={}), "config.field_paths"),
        (dict(field_paths={"bad name": "x"}), "config.field_paths['bad name']"),
        (dict(field_paths={"p": "[["}), "config.field_paths['p']"),
        (dict(non_sensitive_fields=["nope"]), "config.non_sensitive_fields[0]"),
        (dict(non_sensitive_fields=["tier", "nope"]), "config.non_sensitive_fields[1]"),
        (dict(cache_ttl_seconds=60), "config.cache_ttl_seconds"),  # points is PII: never cached
        (dict(url="http://127.0.0.1/x/@anonymous_id"), "config.url"),
        (dict(url="https://0x7f.1/x/@anonymous_id"), "config.url"),  # 127.0.0.1 to the resolver
        (dict(url="https://2852039166/x/@anonymous_id"), "config.url"),  # 169.254.169.254
        (dict(url="https://api.brand.example/loyalty"), "config.url"),  # single mode needs @anonymous_id
        (dict(mode=pb.MODE_BULK, method=pb.HTTP_METHOD_POST, body="{}"), "config.body"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(InvalidArgument) as caught:
        prepare_content_config(config(**overrides), allow_private=False)
    assert caught.value.field == field, caught.value.message


@pytest.mark.parametrize(
    ("named", "description"),
    [
        ("nope", "'nope' is not a field of field_paths"),
        # Not a field name at all (a value pasted in its place): not echoed, nor can it forge a log line.
        ("x\nInjected: yes", "is not a field of field_paths (their names are letters, digits and '_')"),
        ("jane@example.com", "is not a field of field_paths (their names are letters, digits and '_')"),
    ],
)
def test_a_non_sensitive_field_not_in_field_paths_is_named_by_its_place(named, description):
    with pytest.raises(InvalidArgument) as caught:
        prepare_content_config(config(non_sensitive_fields=["tier", named]), allow_private=False)
    assert (caught.value.field, caught.value.description) == ("config.non_sensitive_fields[1]", description)


def test_only_all_non_sensitive_apis_may_be_cached():
    cacheable = config(non_sensitive_fields=["points", "tier"], cache_ttl_seconds=60)
    prepare_content_config(cacheable, allow_private=False)


def test_the_cache_expires_and_stays_bounded():
    now = [100.0]
    cache = ContentCache(2, clock=lambda: now[0])
    cache.put(("ws", "a", 1, "id1"), {"tier": "gold"}, 10)
    cache.put(("ws", "a", 1, "id2"), {"tier": "blue"}, 10)
    assert cache.get(("ws", "a", 1, "id1")) == {"tier": "gold"}
    cache.put(("ws", "a", 1, "id3"), {"tier": "red"}, 10)  # evicts the least recently used (id2)
    assert cache.get(("ws", "a", 1, "id2")) is None
    now[0] += 11
    assert cache.get(("ws", "a", 1, "id1")) is None
    assert cache.get(("ws", "a", 2, "id3")) is None  # another version is another entry
    disabled = ContentCache(0)
    disabled.put(("ws", "a", 1, "id1"), {"tier": "gold"}, 10)
    assert disabled.get(("ws", "a", 1, "id1")) is None


def test_templates_name_the_content_apis_they_use():
    content = dpb.Content(
        subject="{{ content.offers.headline }}",
        html_body="{{ content['loyalty'].points }} {% if content.loyalty.tier == 'gold' %}*{% endif %}",
        text_body="{{ first_name }} {{ recipient.tier }}",
    )
    assert ContentTemplates(content).content_apis == ("loyalty", "offers")
    assert ContentTemplates(dpb.Content(sms_body="{{ first_name }}")).content_apis == ()
    with pytest.raises(InvalidArgument):
        ContentTemplates(dpb.Content(sms_body="{{ content['no way'].x }}"))


def test_content_get_with_a_name_calls_that_content_api():
    templates = ContentTemplates(dpb.Content(sms_body="{{ content.get('offers', {}).headline | default('none') }}"))
    assert templates.content_apis == ("offers",)  # not a content API named "get"
    assert templates.render({}, {}, {"offers": {"headline": "2 for 1"}}).sms_body == "2 for 1"


@pytest.mark.parametrize(
    "source",
    [
        "{% for name, fields in content.items() %}{{ fields.headline }}{% endfor %}",
        "{{ content.keys() | join(',') }}",
        "{{ content.get(api).headline }}",
        "{% set read = content.get %}{{ read('offers').headline }}",
    ],
)
def test_content_read_through_a_dict_method_that_names_no_api_is_refused_with_the_field(source):
    with pytest.raises(InvalidArgument) as caught:
        ContentTemplates(dpb.Content(subject="Hi", html_body=source))
    assert caught.value.field == "content.html_body"
    assert "content.<name>" in caught.value.description


class _Request:
    def __init__(self, url: str) -> None:
        self.url = yarl.URL(url)


async def test_the_egress_guard_checks_targets_the_proxy_will_resolve(monkeypatch):
    import asyncio

    answers = {"public.example": "93.184.216.34", "inside.example": "10.0.0.7"}

    async def getaddrinfo(host, port, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    guard = TargetGuard()
    passed = []

    async def handler(request):
        passed.append(str(request.url))
        return "response"

    assert await guard(_Request("https://public.example/v1/x"), handler) == "response"
    for url in ("https://inside.example/v1/x", "http://127.0.0.1/x", "http://localhost/x"):
        with pytest.raises(BlockedAddress):
            await guard(_Request(url), handler)
    assert passed == ["https://public.example/v1/x"]
