"""A failed render names what went wrong without quoting a fetched value, or one made from it."""

from __future__ import annotations

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.rendering import UNDEFINED_COMPUTED, ContentTemplates, RenderFailed

FETCHED = {"first_name": "Zedediah", "city": " Springfield ", "email": "zed.q@example.org", "gender": "F"}
CONTENT = {"stores": {"boston": "Main St"}}


def reason(source: str, fetched: dict[str, str] = FETCHED) -> str:
    templates = ContentTemplates(pb.Content(sms_body=source))
    with pytest.raises(RenderFailed) as caught:
        templates.render(fetched, {"tier": "gold"}, {"stores": CONTENT["stores"]})
    return caught.value.reason


def test_missing_variable_is_named() -> None:
    assert reason("Hi {{ nickname }}") == "content.sms_body: 'nickname' is undefined"


@pytest.mark.parametrize(
    "source, named",
    [
        ("{{ recipient.nickname }}", "'dict object' has no attribute 'nickname'"),
        ("{{ recipient['nickname'] }}", "'dict object' has no attribute 'nickname'"),
        ("{{ content.stores.denver }}", "'dict object' has no attribute 'denver'"),
        ("{{ recipient | attr('nickname') }}", "'dict object' has no attribute 'nickname'"),
    ],
)
def test_a_name_the_template_writes_is_named(source: str, named: str) -> None:
    """What an author wrote is what they need to see to fix it."""
    assert reason(source) == f"content.sms_body: {named}"


@pytest.mark.parametrize(
    "source",
    [
        "{{ recipient[first_name] }}",  # the value itself
        "{{ content.stores[city | lower] }}",  # made from one: no exact-value scrubbing catches it
        "{{ content.stores[city | trim] }}",
        "{{ content.stores[email.split('@')[0]] }}",
        "{{ content.stores[first_name[:3]] }}",
        "{{ content.stores[gender] }}",  # one character: too short to scrub by value
        "{% set key = city | lower | trim %}{{ content.stores[key] }}",
        "{{ content.stores | attr(city | trim) }}",
        "{{ [content.stores] | map(attribute=first_name | lower) | join }}",
        "{{ nickname }}{{ content.stores[city | lower] }}",  # even a plain name, in such a template
    ],
)
def test_a_lookup_by_a_key_made_from_fetched_values_names_nothing(source: str) -> None:
    said = reason(source)
    assert said == f"content.sms_body: {UNDEFINED_COMPUTED}"
    for leaked in ("Zedediah", "Zed", "springfield", "Springfield", "zed.q", "'F'"):
        assert leaked not in said


def test_a_key_made_from_fetched_values_that_is_found_renders() -> None:
    """Templates that compute keys still work; only their failures say less."""
    rendered = ContentTemplates(pb.Content(sms_body="{{ content.stores[city | trim | lower] }}")).render(
        {"city": " Boston "}, {}, {"stores": CONTENT["stores"]}
    )
    assert rendered.sms_body == "Main St"
