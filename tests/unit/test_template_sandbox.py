"""The template sandbox: every way a template can build a huge value or keep the event loop busy is
stopped at a named limit, and every ordinary template renders as Jinja renders it."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import textwrap
import time

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher import template_sandbox
from services.dispatcher.rendering import ContentTemplates, RenderFailed
from services.dispatcher.template_sandbox import MAX_DEPTH, MAX_VALUE_SIZE, LimitExceeded, Sandbox, size_of

WIDE = "a width or count over 100,000"
LARGE = "a value would be larger than 1,048,576 characters"
SLOW = "rendering took longer than 100 ms"
WRITES = "the template would write more than 4,194,304 characters"
FORBIDS = "the template tried something the sandbox forbids"
DEEP = "a value would be nested more than 100 deep"
TIMES_LARGER = "the result of * would be larger than 1,048,576 characters"
TIMES_BITS = "the result of * would be a number of more than 10,000 bits"
UNCHECKED = "a format the sandbox cannot check"
BIG = "'y' * 99999"
# Each would build gigabytes, or run for minutes, without its limit.
AMPLIFIERS = {
    "str.ljust": ("{{ 'x'.ljust(10 ** 9) }}", WIDE),
    "str.zfill": ("{{ 'x'.zfill(10 ** 9) }}", WIDE),
    "bytes": ("{{ ('x'.encode() * 10 ** 9) | length }}", FORBIDS),
    "str.expandtabs": ("{{ ('\\t' * 99999).expandtabs(99999) }}", LARGE),
    "replace filter": (f"{{{{ ('x' * 99999) | replace('', {BIG}) }}}}", LARGE),
    "str.replace": (f"{{{{ ('x' * 99999).replace('x', {BIG}) }}}}", LARGE),
    "join filter": (f"{{{{ range(99999) | join({BIG}) }}}}", LARGE),
    "str.join": (f"{{{{ ({BIG}).join(range(20) | map('string')) }}}}", LARGE),
    "indent by text": (f"{{{{ ('\\n' * 99999) | indent({BIG}, blank=true) }}}}", LARGE),
    "wordwrap": (f"{{{{ ('x ' * 49999) | wordwrap(1, wrapstring={BIG}) }}}}", LARGE),
    "batch fill": ("{{ [1] | batch(10 ** 9, 0) | list }}", WIDE),
    "slice": ("{{ [1] | slice(10 ** 9) | list }}", WIDE),
    "lipsum": ("{{ lipsum(n=10 ** 6) }}", LARGE),
    "tojson indent": ("{{ [[[1]]] | tojson(indent=10 ** 9) }}", "tojson's indent must be a number of at most 16"),
    "sum of lists": ("{{ ([[1]] * 90000) | sum(start=[]) | length }}", "sum's start must be a number"),
    "~ doubling": (
        "{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        LARGE,
    ),
    "+ doubling": (
        "{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "the result of + would be larger than 1,048,576 characters",
    ),
    "a list repeated": (
        "{% set a = range(99999) | list %}{{ ([a] * 99999) | string | length }}",
        TIMES_LARGER,
    ),
    "lists of lists": (
        "{% set a = range(99999) | list %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
        "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{{ [c, c, c, c, c] | length }}{{ [c, c, c, c, c] }}",
        LARGE,
    ),
    "str.format markers": (f"{{{{ ('{{0}}' * 30000).format({BIG}) }}}}", LARGE),
    "% markers": (f"{{{{ ('%(a)s' * 20000) % {{'a': {BIG}}} }}}}", LARGE),
    "format filter markers": (f"{{{{ ('%(a)s' * 20000) | format(a={BIG}) }}}}", LARGE),
    "a captured loop": (
        "{% set x %}{% for i in range(99999) %}" + "y" * 99999 + "{% endfor %}{% endset %}{{ x | length }}",
        WRITES,
    ),
    "a macro doubling": (
        f"{{% macro f(n) %}}{{{{ {BIG} }}}}{{% if n %}}{{{{ f(n - 1) }}}}{{{{ f(n - 1) }}}}{{% endif %}}"
        "{% endmacro %}{{ f(40) | length }}",
        WRITES,
    ),
    "loops without output": (
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        SLOW,
    ),
    "a macro loop without output": (
        "{% macro f() %}{% for j in range(99999) %}{% endfor %}{% endmacro %}"
        "{% for i in range(99999) %}{% set x = f() %}{% endfor %}",
        SLOW,
    ),
    "a recursive loop": ("{% for x in range(99999) recursive %}{{ loop(range(x)) }}{% endfor %}", SLOW),
    "str.translate": ("{{ ('x' * 9).translate({120: 'y'}) }}", FORBIDS),
    "loops over literals": ("{% for a in 'xxxxxxxxxx' %}" * 9 + "{% endfor %}" * 9, SLOW),
    "a captured loop over literals": (
        "{% set x %}" + "{% for a in 'xxxxxxxxxx' %}" * 4 + "y" * 30000 + "{% endfor %}" * 4 + "{% endset %}",
        WRITES,
    ),
    "a recursive loop re-entered": (
        "{% set s = 'x' * 99999 %}{% set b = s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s %}{% for x in [b] recursive %}"
        "{% if x is sameas b %}{{ loop(x) | length }}{% else %}" + "y" * 1000 + "{% endif %}{% endfor %}",
        WRITES,
    ),
    "a tuple nested in a loop, then hashed": (
        "{% set ns = namespace(t=1) %}{% for i in '"
        + "x" * 9000
        + "' %}{% set ns.t = "
        + "(" * 20
        + "ns.t"
        + ",)" * 20
        + " %}{% endfor %}{{ {ns.t: 1} }}",
        DEEP,
    ),
    "shared tuples, then hashed": (
        "{% set t = (1, 2) %}" + "{% set t = (t, t) %}" * 40 + "{% set d = {t: 1} %}",
        LARGE,
    ),
    "lists of shared lists": (
        "{% set a = range(99999) | list %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}{{ {'k': b}.values() }}",
        LARGE,
    ),
    "str.format widths times markers": (
        "{% set s = '{0:9999}' * 12000 %}{{ (s ~ s ~ s ~ s ~ s).format(1) | length }}",
        LARGE,
    ),
    "% widths times markers": (
        "{% set s = '%(a)9999s' * 11000 %}{{ ((s ~ s ~ s ~ s ~ s) % {'a': 1}) | length }}",
        LARGE,
    ),
    "format filter widths times markers": (
        "{% set s = '%(a)9999s' * 11000 %}{{ (s ~ s ~ s ~ s ~ s) | format(a=1) | length }}",
        LARGE,
    ),
    "a big number repeated": ("{% set a = [255 ** 1250] * 99999 %}{{ a | string | length }}", TIMES_LARGER),
    "empty strings repeated": ("{% set l = (',' * 99999).split(',') %}{% set x = [l] * 500 %}{{ x }}", TIMES_LARGER),
    "a number squared in turn": ("{% set a = 255 ** 1250 %}" + "{% set a = a * a %}" * 15, TIMES_BITS),
    "a huge power": ("{{ 9 ** 999999999 }}", "the result of ** would be a number of more than 10,000 bits"),
    "a string repeated": ('{{ "x" * 200000 }}', "the result of * would be longer than 100,000 characters"),
    "a list repeated past its length": (
        "{{ ([1] * 200000) | length }}",
        "the result of * would be longer than 100,000 items",
    ),
    "a loop over a huge range": ("{% for i in range(100000000) %}{% endfor %}", "range over 100,000 items"),
    "a range too long to count": ("{{ range(10 ** 30) | length }}", "range over 100,000 items"),
    "~ of many parts": (
        "{% set s = 'x' * 99999 %}{% set b = s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s %}{% set c = "
        + " ~ ".join(["b"] * 20)
        + " %}",
        LARGE,
    ),
    "indent by a number": ("{{ ('x\\n' * 20000) | indent(99999) }}", LARGE),
    "% key holding parentheses": ("{{ '%(a(b))999999999s' % {'a(b)': 'x'} }}", UNCHECKED),
    "format fill of a line break": ("{{ '{0:\\n>999999999}'.format('x') }}", WIDE),
    "a number from a megabyte of hex": (
        "{{ (('f' * 99999) | int(base=16)) // 7 }}",
        "a number of more than 2,500 digits",
    ),
    "lazy filters chained": (
        "{% set s = 'x' * 99999 %}{% set b = s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s %}{{ b"
        + " | select" * 60
        + " | list | length }}",
        SLOW,
    ),
    "wordwrap of a long word": (
        "{{ ('x' * 99999) | wordwrap(1) | length }}",
        "wordwrap's text is too long for its width: its length squared over the width must be at most 100,000,000",
    ),
    "wordwrap of a megabyte": (
        "{% set s = 'x-' * 50000 %}{{ (s ~ s ~ s ~ s ~ s) | wordwrap(100000) | length }}",
        "wordwrap on more than 100,000 characters",
    ),
    "urlize of a megabyte": (
        "{% set s = 'x ' * 49999 %}{{ (s ~ s) | urlize }}",
        "urlize on more than 100,000 characters",
    ),
    "a class's method on the recipient": ("{{ dict.update(recipient, me=recipient) }}{{ no_such_name }}", FORBIDS),
    "one value a million times": ("{{ {}.fromkeys(range(99999), 'x' * 99999) is lower }}", FORBIDS),
    "a number's bytes": ("{{ (1).to_bytes(900000000, 'big') | length }}", FORBIDS),
    "a structure holding itself": (
        "{% set x = namespace(big='') %}{% set y = namespace(x=x) %}{% set x.y = y %}"
        "{% set r = [x] + [y] * 30000 %}{% set s = 'x' * 100000 %}{% set x.big = s ~ s ~ s ~ s ~ s %}{{ r }}",
        LARGE,
    ),
    "round to a million places": ("{{ 1.5 | round(30000000, 'floor') }}", "round's precision must be at most 100"),
    "format of a list": ("{{ ['%999999999s'] | format('x') }}", WIDE),
    "a format that does not parse": ("{{ '{0:>99999}{0:>99999}{'.format('x') }}", UNCHECKED),
    "% key with a conversion in it": ("{{ '%(a(b)c)999999999s' % {'a(b)c': 'x'} }}", UNCHECKED),
    "replace in a list": ("{{ range(99999) | list | replace('', 'y' * 2500) }}", LARGE),
    "a recursive loop called by another name": (
        "{% set s = 'x' * 100000 %}{% set l = (s ~ s ~ s) | list %}{% for x in [l] recursive %}{% set f = loop %}"
        "{% if x is not string %}{% for i in range(99999) %}{{ f(l) }}{% endfor %}{% endif %}{% endfor %}",
        SLOW,
    ),
    "a lone surrogate": ("{{ '\\ud800' }}", "the text holds a character that is not valid Unicode"),
    "a long attribute path": (
        "{% set p = '0.' * 50000 %}{% set p = p ~ p ~ '0' %}{{ ('x' * 1000) | list | max(attribute=p) }}",
        SLOW,
    ),
    "sorting a million": (
        "{% set s = 'x' * 99999 %}{% set b = (s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s) | list %}{% set x = b | sort %}",
        LARGE,
    ),
}

CHILD = textwrap.dedent(
    """
    import json, sys
    from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
    from services.dispatcher.rendering import ContentTemplates, RenderFailed
    said = {}
    for name, source in json.load(sys.stdin).items():
        try:
            ContentTemplates(pb.Content(sms_body=source)).render({}, {})
            said[name] = "rendered"
        except RenderFailed as exc:
            said[name] = exc.reason
        except MemoryError:
            said[name] = "out of memory"
    print(json.dumps(said))
    """
)


def _limit_memory() -> None:
    two_gib = 2 * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (two_gib, two_gib))


def test_every_way_to_build_a_huge_value_or_spin_stops_at_its_limit() -> None:
    """Rendered in a child process with 2 GiB of address space: a way that slipped through fails
    this test as "out of memory" (or by its timeout), not the machine."""
    sources = {name: source for name, (source, _) in AMPLIFIERS.items()}
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(sources),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_memory,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    said = json.loads(child.stdout)
    assert said == {name: f"content.sms_body: {limit}" for name, (_, limit) in AMPLIFIERS.items()}


ORDINARY = [
    "{% for i in range(4) %}{{ loop.index }}/{{ loop.length }} {{ loop.cycle('a', 'b') }};{% endfor %}",
    "{% for k, v in {'a': 1, 'b': 2} | dictsort %}{{ k }}={{ v }}{% else %}none{% endfor %}",
    "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}",
    "{% for x in [3, 1, 2] if x > 1 %}{{ x }}{% if not loop.last %},{% endif %}{% endfor %}",
    "{% for x in [[1, [2]], [3]] recursive %}[{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}]"
    "{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for i in range(5) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}",
    "{% set x %}{% for i in range(3) %}<{{ i }}>{% endfor %}{% endset %}{{ x ~ '|' ~ x }}",
    "{% filter upper %}{% for w in ['a', 'b'] %}{{ w }}&{% endfor %}{% endfilter %}",
    "{% macro card(t) %}<b>{{ t }}</b>{{ caller() if caller }}{% endmacro %}{% call card('<x>') %}in{% endcall %}",
    "{{ first_name ~ ' & ' ~ 5 }} {{ '<i>' ~ first_name }}",
    "{{ [first_name, 'b', 3] | join(', ') }} {{ first_name.join(['1', '2']) }} {{ 'a-b' | replace('-', '+') }}",
    "{{ 'a b'.replace(' ', '_', 1) }} {{ 'line\\nline' | indent(2, first=true) }} {{ 'x' | center(5) }}",
    "{{ 'a long line of words' | wordwrap(6) }} {{ 'a b c d' | wordwrap(3, wrapstring='|') }}",
    "{{ [1, 2, 3, 4, 5] | batch(2, '-') | list }} {{ [1, 2, 3] | slice(2) | list }} {{ [1, 2] | sum(start=10) }}",
    "{{ {'a': [1, {'b': '<'}]} | tojson(indent=2) }} {{ [1, 2] | tojson }}",
    "{{ '%s and %s' % (first_name, 'b') }} {{ '%(a)s!' % {'a': first_name} }} {{ '%05.1f' | format(3.14159) }}",
    "{{ '{}-{:>4}'.format(first_name, 7) }} {{ '{a}'.format_map({'a': 1}) }} {{ 'ab'.ljust(4) }}|{{ 'ab'.zfill(4) }}",
    "{{ 1 + 2 }} {{ 1.5 + 1 }} {{ 'a' + 'b' }} {{ [1] + [2] }} {{ 'ab' * 2 }} {{ 2 ** 8 }} {{ 7 % 3 }}",
    "{{ lipsum(1, false, 5, 6) | wordcount }} {{ range(3) | list }} {{ dict(a=1) }} {{ namespace(a=1).a }}",
    "{{ first_name | title }} {{ first_name | default('x') }} {{ [first_name, first_name] }}",
    "{{ '{{\"name\": \"{0}\"}}'.format(first_name) }} {{ '%s: 100%% off, 10000 points' % first_name }}",
    "{{ '%5.2f|%-4d|%(x)s' % {'x': 1} if false else '%5.2f|%-4d' % (3.14159, 7) }} {{ '{:>6.2f}'.format(2.5) }}",
    "{% for c in 'abc' %}{% for n in [1, 2] %}{{ c }}{{ n }} {% endfor %}{% endfor %}",
    "{% macro row(c) %}<td>{{ c }}</td>{% endmacro %}{% for c in ('a', 'b') %}<tr>{{ row(c) }}</tr>{% endfor %}",
    "{% for i in range(3) %}{% set t = (i, [i, {'k': i}]) %}{{ t }}{% endfor %} {{ {(1, 2): 'x'}[(1, 2)] }}",
]


@pytest.mark.parametrize("autoescape", [False, True])
@pytest.mark.parametrize("source", ORDINARY)
def test_ordinary_templates_render_as_jinja_renders_them(source: str, autoescape: bool) -> None:
    context = {"first_name": "Ann <&>"}
    jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True)
    expected = jinja.from_string(source).render(context)
    sandbox = Sandbox(autoescape)
    parsed = sandbox.guard(sandbox.parse(source))
    assert template_sandbox.render(sandbox.from_string(parsed), context) == expected


def test_sizes_count_every_reference_and_measure_shared_parts_once() -> None:
    text = "y" * 1000
    assert size_of(text) == 1000
    assert size_of(7) == 2 and size_of(2**100) == 32 and size_of(None) == size_of(2.5) == 24
    assert size_of([text] * 10) == 1 + 10 * (1000 + 2)  # each item's quotes or ", "
    assert size_of({"k": text}) == 1 + (1 + 2) + (1000 + 2)
    assert size_of({"k": text}.values()) == size_of({"k": text})
    assert size_of((b"ab", range(5), {text})) == 1 + (2 + 2) + (5 + 2) + (1 + 1002 + 2)
    assert size_of(Namespace(a=text)) == 1 + (1 + (1 + 2) + (1000 + 2)) + 2
    inner = list(range(99999))
    nested = [[[inner] * 10] * 10] * 10  # printing it writes 100 million numbers; measured in a moment
    assert size_of(nested) > MAX_VALUE_SIZE
    cyclic = Namespace(items=[])
    cyclic["items"] = [cyclic]  # holds itself: what reached it back would be counted before its size was known
    assert size_of(cyclic) > MAX_VALUE_SIZE
    deep: list = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(LimitExceeded, match=DEEP):  # nested deeper than any message needs: its own limit
        size_of(deep)


def test_a_loop_is_charged_for_the_text_it_writes_not_the_text_it_skips() -> None:
    """2,000 passes of a body with 4 KB of text, written by 200 of them: 800 KB, within the limits."""
    row = "<td>&nbsp;</td>" * 250
    source = f"{{% for i in range(2000) %}}{{% if i < 200 %}}<tr>{row}</tr>{{% endif %}}{{% endfor %}}"
    rendered = ContentTemplates(pb.Content(sms_body=source)).render({}, {}).sms_body
    assert len(rendered) == 200 * (len(row) + 9)


class _CountedBudget(template_sandbox._Budget):
    started = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).started += 1


def test_once_a_render_runs_out_of_time_the_rest_of_its_batch_fails_at_once(monkeypatch) -> None:
    """A template that loops too long holds the event loop at most once per batch, not per recipient."""
    monkeypatch.setattr(template_sandbox, "MAX_RENDER_SECONDS", 0.0)
    monkeypatch.setattr(template_sandbox, "_Budget", _CountedBudget)
    templates = ContentTemplates(pb.Content(sms_body="{% for i in range(3) %}{{ first_name }}{% endfor %}"))
    batch: dict = {}
    with pytest.raises(RenderFailed) as first:
        templates.render({"first_name": "a"}, {}, memo=batch)
    assert first.value.reason == f"content.sms_body: {SLOW}"
    for name in ("b", "c"):
        with pytest.raises(RenderFailed) as other:
            templates.render({"first_name": name}, {}, memo=batch)
        assert other.value.reason == f"content.sms_body: {SLOW} for another recipient of this batch: not rendered"
    assert _CountedBudget.started == 1
    # The next batch, and a render outside any batch (a preview), try again.
    with pytest.raises(RenderFailed):
        templates.render({"first_name": "b"}, {}, memo={})
    with pytest.raises(RenderFailed):
        templates.render({"first_name": "c"}, {})
    assert _CountedBudget.started == 3


def test_a_template_cannot_change_the_values_it_renders() -> None:
    """`dict.update(recipient, ...)` passed the immutable sandbox, which checks instances, not classes:
    the recipient's attributes are archived, and a dict holding itself hung the error scrubbing."""
    recipient = {"tier": "gold"}
    templates = ContentTemplates(
        pb.Content(sms_body="{{ dict.update(recipient, tier='x') }}{{ dict.clear(recipient) }}")
    )
    with pytest.raises(RenderFailed):
        templates.render({}, recipient)
    assert recipient == {"tier": "gold"}


def test_a_message_renders_within_one_budget_whatever_its_outputs(monkeypatch) -> None:
    """Email content made of outputs renders each output on its own: they share the message's budget."""
    monkeypatch.setattr(template_sandbox, "_Budget", _CountedBudget)
    _CountedBudget.started = 0
    outputs = "".join(f"{{{{ range({n}) | list | length }}}}" for n in range(50))
    templates = ContentTemplates(pb.Content(subject="{{ 1 + 1 }}", html_body=outputs, text_body=outputs))
    assert templates.pattern is not None
    rendered = templates.render({}, {})
    assert rendered.subject == "2" and _CountedBudget.started == 1


def test_a_garbage_collection_during_a_render_does_not_count_against_its_budget() -> None:
    """A full collection in a large process takes 100 ms and more, and may come during any render: it
    ran a render out of time, and with it every later recipient of the batch, with a template that
    does nothing. The render's own CPU time still counts."""

    def slow_collection(phase: str, _info: dict) -> None:
        if phase == "start":
            until = time.thread_time() + 1.5 * template_sandbox.MAX_RENDER_SECONDS
            while time.thread_time() < until:
                pass

    with template_sandbox.one_budget():
        budget = template_sandbox._budget.get()
        gc.callbacks.append(slow_collection)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(slow_collection)
        budget.tick()  # the collection's time is not the render's
        until = time.thread_time() + 1.5 * template_sandbox.MAX_RENDER_SECONDS
        while time.thread_time() < until:
            pass
        with pytest.raises(LimitExceeded, match=SLOW):
            budget.tick()
