"""Compiled content is kept between calls: the same content compiles once, edits compile afresh."""

from __future__ import annotations

import asyncio

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
from services.dispatcher.rendering import MAX_TEMPLATE_NODES, CompiledContents


def sms(body: str) -> pb.Content:
    return pb.Content(sms_body=body)


async def test_the_same_content_is_compiled_once_and_renders_for_every_caller() -> None:
    compiled = CompiledContents()
    first = await compiled.load(sms("Hi {{ first_name }}"))
    again = await compiled.load(sms("Hi {{ first_name }}"))
    assert again is first
    assert again.render({"first_name": "Ann"}, {}).sms_body == "Hi Ann"
    assert first.render({"first_name": "Bob"}, {}).sms_body == "Hi Bob"  # nothing of a render stays


async def test_an_edited_content_is_compiled_afresh() -> None:
    compiled = CompiledContents()
    before = await compiled.load(sms("Hi {{ first_name }}"))
    after = await compiled.load(sms("Hello {{ first_name }}"))
    assert after is not before
    assert after.render({"first_name": "Ann"}, {}).sms_body == "Hello Ann"
    assert await compiled.load(pb.Content(sms_body="Hi {{ first_name }}", subject="x")) is not before


async def test_content_that_does_not_compile_is_refused_every_time() -> None:
    compiled = CompiledContents()
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="content.sms_body"):
            await compiled.load(sms("Hi {{ first_name"))
    assert len(compiled) == 0


async def test_the_least_recently_used_content_goes_first() -> None:
    compiled = CompiledContents(max_entries=2)
    a = await compiled.load(sms("a {{ x }}"))
    b = await compiled.load(sms("b {{ x }}"))
    assert await compiled.load(sms("a {{ x }}")) is a  # a used last: b is the oldest now
    await compiled.load(sms("c {{ x }}"))
    assert len(compiled) == 2
    assert await compiled.load(sms("a {{ x }}")) is a
    assert await compiled.load(sms("b {{ x }}")) is not b


async def test_the_contents_kept_are_bounded_by_their_size() -> None:
    body = "x" * 1000 + "{{ y }}"
    compiled = CompiledContents(max_bytes=2500)
    first = await compiled.load(sms("1" + body))
    await compiled.load(sms("2" + body))
    await compiled.load(sms("3" + body))  # three would be over 2,500 bytes: the first goes
    assert len(compiled) == 2
    assert await compiled.load(sms("1" + body)) is not first
    huge = CompiledContents(max_bytes=100)
    await huge.load(sms(body))  # larger than the whole budget: compiled, not kept
    assert len(huge) == 0


async def test_a_template_of_too_many_nodes_is_refused_naming_its_field() -> None:
    """Compiling takes seconds for tens of thousands of nodes; a template past the limit is refused
    before it is compiled."""
    compiled = CompiledContents()
    with pytest.raises(InvalidArgument) as caught:
        await compiled.load(pb.Content(subject="s", html_body="{{ a }}," * (MAX_TEMPLATE_NODES // 2 + 1)))
    assert caught.value.field == "content.html_body"
    assert caught.value.description == f"has more than {MAX_TEMPLATE_NODES:,} expressions, tags and pieces of text"


async def test_loading_compiles_in_a_thread_and_the_event_loop_goes_on() -> None:
    compiled = CompiledContents()
    nested = "{% set t = " + "(" * 60 + "x" + ",)" * 60 + " %}"
    big = sms("{% for i in range(3) %}" + nested * 100 + "{% endfor %}")  # about half a second to compile
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    try:
        templates = await compiled.load(big)
    finally:
        ticker.cancel()
    assert ticks >= 3, "the loop ran while the template compiled"
    assert await compiled.load(big) is templates
    assert len(compiled) == 1
