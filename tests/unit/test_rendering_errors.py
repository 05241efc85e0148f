"""A failed render names what went wrong without quoting a fetched value, or one made from it."""

from __future__ import annotations

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
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


def test_a_field_a_content_api_did_not_return_is_named_with_its_api() -> None:
    """Two APIs may both have a `code`: the failure says whose reply lacked it."""
    templates = ContentTemplates(pb.Content(sms_body="{{ content.offers.code }} {{ content.loyalty.code }}"))
    with pytest.raises(RenderFailed) as caught:
        templates.render(FETCHED, {}, {"offers": {"code": "SPRING"}, "loyalty": {"tier": "Gold"}})
    assert caught.value.reason == "content.sms_body: 'content.loyalty.code' is undefined"


@pytest.mark.parametrize(
    "source, named",
    [
        ("{{ recipient.nickname }}", "'recipient.nickname' is undefined"),
        ("{{ recipient['nickname'] }}", "'recipient.nickname' is undefined"),
        ("{{ content.stores.denver }}", "'content.stores.denver' is undefined"),
        ("{{ content['stores'].denver | upper }}", "'content.stores.denver' is undefined"),
        ("{% if recipient.tier %}{{ content.stores.denver }}{% endif %}", "'content.stores.denver' is undefined"),
        # Guarded reads of the same key elsewhere do not hide which read failed.
        (
            "{% if recipient.denver is defined %}{{ recipient.denver }}{% endif %}{{ content.stores.denver }}",
            "'dict object' has no attribute 'denver'",
        ),
        # The same key read through a name the template binds itself, whose dict is not known here: the
        # failed read may be either, so neither is named.
        (
            "{% set r = recipient %}{% if content.stores.denver is defined %}{% endif %}{{ r.denver }}",
            "'dict object' has no attribute 'denver'",
        ),
        (
            "{% for recipient in [content.stores] %}{{ recipient.denver }}{% endfor %}",
            "'dict object' has no attribute 'denver'",
        ),
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


@pytest.mark.parametrize(
    ("source", "rendered"),
    [
        ("{{ 2 ** 10 }}", "1024"),
        ("{{ 'ab' * 3 }}", "ababab"),
        ("{{ '%5s|' % 'x' }}", "    x|"),
        ("{{ 'x' | center(5) }}", "  x  "),
        ("{{ '%d' | format(1234567) }}", "1234567"),  # format's arguments are values, not widths
        ("{{ '{:>3}'.format('x') }}", "  x"),
        ("{% for i in range(3) %}{{ i }}{% endfor %}", "012"),
    ],
)
def test_ordinary_arithmetic_and_formatting_render(source: str, rendered: str) -> None:
    assert ContentTemplates(pb.Content(sms_body=source)).render({}, {}).sms_body == rendered


WIDE = "a width or count over 100,000"
LARGE = "a value would be larger than 1,048,576 characters"


@pytest.mark.parametrize(
    "source, limit",
    [
        ("{{ 9 ** 99999 }}", "the result of ** would be a number of more than 10,000 bits"),
        ("{{ 'x' * 1000000 }}", "the result of * would be longer than 100,000 characters"),
        ("{{ [1] * 1000000 }}", "the result of * would be longer than 100,000 items"),
        ("{% for i in range(100000000) %}{% endfor %}", "range over 100,000 items"),
        ("{{ '%999999s' % 'x' }}", WIDE),
        ("{{ '%.*f' % (999999, 1.0) }}", WIDE),
        ("{{ 'x' | center(1000000) }}", WIDE),
        ("{{ 'x\\ny' | indent(1000000) }}", WIDE),
        ("{{ '%999999s' | format('x') }}", WIDE),
        ("{{ '{:>999999}'.format('x') }}", WIDE),
        ("{{ '{:>{w}}'.format('x', w=999999) }}", WIDE),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "rendering took longer"),
        ("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", "the rendered text would be longer than"),
    ],
)
def test_what_would_build_a_huge_value_fails_the_recipient(source: str, limit: str) -> None:
    """Not a dispatcher stalled or out of memory: that recipient's RENDER_FAILED, naming the limit.
    Every other way is in test_template_sandbox."""
    assert reason(source).startswith(f"content.sms_body: {limit}")


def test_what_the_sandbox_forbids_is_said_so() -> None:
    assert reason("{{ ''.__class__ }}") == "content.sms_body: the template tried something the sandbox forbids"


def test_a_huge_power_is_not_computed_when_the_template_is_compiled() -> None:
    """Jinja folds constant expressions as it compiles; an intercepted operator is left for the
    render, where it is refused. Folded, this one would hold the event loop for minutes."""
    templates = ContentTemplates(pb.Content(sms_body="{{ 9 ** 999999999 }}"))
    with pytest.raises(RenderFailed):
        templates.render({}, {})


def test_a_template_nested_too_deeply_is_refused_naming_its_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        ContentTemplates(pb.Content(subject="{{" + "(" * 300 + "1" + ")" * 300 + "}}"))
    assert caught.value.field == "content.subject"
    assert "too deeply" in caught.value.message


@pytest.mark.parametrize(
    "source, said",
    [
        ("{{ first_name" + " | lower" * 150 + " }}", "nests expressions or tags too deeply"),  # minutes to compile
        ("{{ first_name" + ".a" * 300 + " }}", "nests expressions or tags too deeply"),  # Python's own limit
        ("{{ 1" + "0" * 5000 + " }}", "does not compile (ValueError)"),  # past Python's 4,300 digits
        ("{{ [1] | pprint }}", "template syntax error on line 1: No filter named 'pprint'."),
    ],
)
def test_a_template_that_would_not_compile_in_time_or_at_all_is_refused_naming_its_field(source, said) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ContentTemplates(pb.Content(sms_body=source))
    assert (caught.value.field, caught.value.description) == ("content.sms_body", said)


def test_email_content_that_draws_at_random_is_rendered_whole_not_by_substitution() -> None:
    """A substitution pattern keeps one value per expression: two draws would say the same."""
    draw = "{{ range(1000) | random }}"
    templates = ContentTemplates(pb.Content(subject="s", text_body=f"{draw} {draw} {draw} {draw}"))
    assert templates.pattern is None
    rendered = templates.render({}, {})
    assert rendered.pattern is None and len(set(rendered.text_body.split())) > 1


def test_a_content_api_name_that_is_no_identifier_is_refused_naming_the_template_that_uses_it() -> None:
    with pytest.raises(InvalidArgument) as caught:
        ContentTemplates(pb.Content(subject="Hi", html_body="<p>{{ content['spring offers'].headline }}</p>"))
    assert caught.value.field == "content.html_body"
    assert caught.value.description == "content API name 'spring offers' is not an identifier"


@pytest.mark.parametrize(
    "subject", ["Hello\n{{ first_name }}", "Hi {{ first_name }}\r\n", "{% if vip %}\nVIP{% endif %} offer"]
)
def test_a_subject_whose_own_text_breaks_the_line_is_refused_not_failed_for_every_recipient(subject: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ContentTemplates(pb.Content(subject=subject, text_body="Hi"))
    assert caught.value.field == "content.subject"


def test_a_subject_with_line_breaks_only_inside_its_tags_and_outputs_is_compiled() -> None:
    templates = ContentTemplates(
        pb.Content(subject="Hi {{\n first_name\n }}{%\nif vip\n%}!{% endif %}", text_body="Hi")
    )
    assert templates.render({"first_name": "A", "vip": ""}, {}).subject == "Hi A"


# What the email package reads as the end of a line (str.splitlines): a Word manual line break (VT),
# a form feed, NEL, the Unicode line and paragraph separators. An SMTP relay's message could not be
# written with one in its subject, after the recipient's contact was fetched.
LINE_ENDINGS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("ending", LINE_ENDINGS)
def test_a_subject_whose_own_text_holds_any_line_ending_is_refused(ending: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ContentTemplates(pb.Content(subject=f"Big sale{ending}today, {{{{ first_name }}}}", text_body="Hi"))
    assert caught.value.field == "content.subject"


@pytest.mark.parametrize("ending", ["\r", "\n", *LINE_ENDINGS])
def test_a_rendered_subject_with_any_line_ending_fails_that_recipient(ending: str) -> None:
    templates = ContentTemplates(pb.Content(subject="Hi {{ first_name }}", text_body="Hi"))
    with pytest.raises(RenderFailed) as caught:
        templates.render({"first_name": f"Zed{ending}Bcc: someone"}, {})
    assert caught.value.reason == "content.subject: a rendered subject must not contain line breaks"
    assert "Zed" not in caught.value.reason


def test_a_subject_with_tabs_and_unicode_text_is_not_a_line_break() -> None:
    templates = ContentTemplates(pb.Content(subject="Olá\t{{ first_name }} ✨", text_body="Hi"))
    assert templates.render({"first_name": "Zoë"}, {}).subject == "Olá\tZoë ✨"


def test_a_rendered_subject_longer_than_a_subject_may_be_fails_that_recipient_naming_its_length() -> None:
    """A short template and a long value: the provider would refuse or cut it; the recipient fails alone."""
    templates = ContentTemplates(pb.Content(subject="Hi {{ first_name }}", text_body="Hi"))
    assert len(templates.render({"first_name": "Z" * 2045}, {}).subject) == 2048
    with pytest.raises(RenderFailed) as caught:
        templates.render({"first_name": "Z" * 50_000}, {})
    assert caught.value.reason == (
        "content.subject: a rendered subject is at most 2,048 characters, as its template is; this one is "
        "50,003 (the recipient's values made it so)"
    )
