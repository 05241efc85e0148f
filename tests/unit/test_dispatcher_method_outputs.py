"""An output that is a function, a method, an iterator or another object without text of its own fails
the recipient's render (RENDER_FAILED), where Python printed "<built-in method upper of str object at
0x...>" or "<generator object ... at 0x...>" into the message sent."""

from __future__ import annotations

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.rendering import ContentTemplates, RenderFailed
from services.dispatcher.template_sandbox import NOT_A_VALUE

FETCHED = {"first_name": "Ann"}
ATTRIBUTES = {"items": "3", "tier": "gold"}


@pytest.mark.parametrize(
    "body",
    [
        "Hi {{ first_name.upper }}",  # its call forgotten
        "{{ recipient.items }} items",  # the dict's method, found before the attribute of that name
        "{{ range }}",
        "{% for x in [1] %}{{ first_name.title }}{% endfor %}",
        "{% macro m() %}x{% endmacro %}{{ m }}",
        "{{ recipient.values() | map('upper') }}",  # a map not joined
        "{{ recipient | select }}",
        "{{ recipient | reverse }}",
        "{% set c = cycler('a', 'b') %}{{ c }}",  # no text of its own
    ],
)
@pytest.mark.parametrize("html", [False, True])
def test_an_output_that_is_a_method_fails_the_render(body, html):
    content = pb.Content(subject="s", html_body=body) if html else pb.Content(sms_body=body)
    field = "content.html_body" if html else "content.sms_body"
    with pytest.raises(RenderFailed) as failed:
        ContentTemplates(content).render(FETCHED, ATTRIBUTES, {}, memo={})
    assert failed.value.reason == f"{field}: {NOT_A_VALUE}"
    assert "0x" not in failed.value.reason


def test_called_methods_and_attributes_read_by_key_still_render():
    content = pb.Content(
        sms_body="{{ first_name.upper() }} {{ recipient['items'] }} {{ recipient.tier }} "
        "{% set j = joiner('|') %}{{ j() }}a{{ j() }}b {{ 3 }} {{ [1, 2] }} {{ none }} "
        "{{ recipient.values() | map('upper') | join(',') }} {% set c = cycler('x') %}{{ c.next() }}"
    )
    rendered = ContentTemplates(content).render(FETCHED, ATTRIBUTES, {}, memo={})
    assert rendered.sms_body == "ANN 3 gold a|b 3 [1, 2] None 3,GOLD x"


def test_an_undefined_output_is_still_named():
    with pytest.raises(RenderFailed) as failed:
        ContentTemplates(pb.Content(sms_body="Hi {{ nickname }}")).render(FETCHED, ATTRIBUTES, {}, memo={})
    assert failed.value.reason == "content.sms_body: 'nickname' is undefined"
