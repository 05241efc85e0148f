"""The sandbox campaign templates render in: Jinja's immutable sandbox, with every way a template
can build a huge value or keep the CPU busy bounded.

A render runs on the dispatcher's event loop, where every other batch waits for it. Jinja's sandbox
keeps a template away from Python's internals, not from joining `'y' * 99999` 99999 times, doubling
a namespace's string in a loop, or looping 99999 × 99999 times. So:

- what makes a value from a number (`**`, `*`, `center`, `batch`'s fill, format widths, `range`) is
  checked before it runs, against MAX_RESULT_LENGTH (MAX_POWER_BITS for a number, Jinja's MAX_RANGE
  for a range);
- what a filter, a call, `+`, `~` or `%` takes, every list, tuple or dict literal as it is built,
  and every output are measured counting each reference (a list holding one big list ten times
  counts it ten times: printing it writes it ten times), and refused past MAX_VALUE_SIZE or
  MAX_DEPTH; where a result can outgrow its inputs (`join`, `replace`, `indent`, `%`, `format`)
  it is estimated first;
- one render has a budget: MAX_RENDER_SECONDS, checked on loop passes, calls, filters and
  operators, and MAX_WRITTEN characters, counted where they are written (outputs, and the text
  of loops, macros and call blocks), so text captured by `{% set %}` or a filter block counts.

An output that is a function, a method or an iterator (`first_name.upper` without its call, a `map`
not joined) fails the render: printed, it would write its type and memory address into the message.

`Sandbox.guard` rewrites a parsed template to route its loops, literals, `~` and repeated text
through filters of its own, which Jinja cannot fold away while compiling. Past a limit the render
fails with a fixed text that names the limit, never a value.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import re
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import GeneratorType
from typing import Any

from jinja2 import StrictUndefined, Template, Undefined, nodes
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum, pass_context, pass_eval_context
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

# What one expression may make from a number, what one render may give and write, and how long it may
# take: far beyond any message, far below what would stall the event loop or fill the memory.
MAX_RESULT_LENGTH = 100_000
MAX_POWER_BITS = 10_000
MAX_RENDERED_LENGTH = 1024 * 1024
MAX_VALUE_SIZE = MAX_RENDERED_LENGTH
MAX_WRITTEN = 4 * MAX_RENDERED_LENGTH
MAX_RENDER_SECONDS = 0.1
MAX_JSON_INDENT = 16
MAX_ROUND_PRECISION = 100
MAX_WRAP_WORK = 10**8  # characters textwrap may copy: about a tenth of a second
SHORT_OUTPUT = 64  # an output this long or shorter is not counted (at most ~20 MB in 100 ms)
MAX_DEPTH = 100  # lists in lists: deep enough for any message, far from what hashing one deep crashes

TOO_LARGE = f"a value would be larger than {MAX_VALUE_SIZE:,} characters"
TOO_DEEP = f"a value would be nested more than {MAX_DEPTH} deep"
TOO_WIDE = f"a width or count over {MAX_RESULT_LENGTH:,}"
TOO_LONG_A_RANGE = f"range over {MAX_RANGE:,} items"
UNCHECKED_FORMAT = "a format the sandbox cannot check"
OUT_OF_TIME = f"rendering took longer than {MAX_RENDER_SECONDS * 1000:g} ms"
# A `%` directive (or `%%`), its width and precision; a `str.format` spec's width and precision.
_PERCENT_MARKER = re.compile(r"%(?:%|(?:\([^()]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?[a-zA-Z])")
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[a-zA-Z%]?", re.DOTALL)
_FORMATTER = string.Formatter()
# Filters the guard adds; their names cannot be written in a template.
_LOOP = "<loop pass>"
_CONCAT = "<concat>"
_LITERAL = "<literal>"
_TEXT = "<text>"


class LimitExceeded(SecurityError):
    """A render went past one of the sandbox's limits; its text names the limit, nothing else."""


class OutOfTime(LimitExceeded):
    """A render took longer than MAX_RENDER_SECONDS."""


class OutputNotAValue(SecurityError):
    """An output is a function, a method, an iterator or another object with no text of its own: Python
    would print its type and memory address into the message."""


NOT_A_VALUE = (
    "an output is a function, method or iterator, not a value: call it (first_name.upper()), read an "
    "attribute named like a method by its key (recipient['items'], not recipient.items), or join what a "
    "filter yields (| join(', '), | list)"
)


class _CollectorTime(threading.local):
    """The CPU time the cyclic garbage collector has taken on this thread: a collection that comes
    during a render (a full one takes 100 ms and more in a large process) is the process's, not the
    template's, and failed a batch's every later recipient with a template that does nothing."""

    spent = 0.0
    started = 0.0


_collector_time = _CollectorTime()


def _count_collection(phase: str, _info: dict[str, int]) -> None:
    if phase == "start":
        _collector_time.started = time.thread_time()
    else:
        _collector_time.spent += time.thread_time() - _collector_time.started


gc.callbacks.append(_count_collection)


def _render_clock() -> float:
    """This thread's CPU time but the collector's: what a render's budget is counted in."""
    return time.thread_time() - _collector_time.spent


class _Budget:
    """One render's: when it must end and what it has written so far."""

    __slots__ = ("deadline", "written", "_spends")

    def __init__(self) -> None:
        # The thread's CPU time, not the wall clock's: a compile in another thread holding the GIL
        # does not count against a render; nor does a garbage collection that comes during it.
        self.deadline = _render_clock() + MAX_RENDER_SECONDS
        self.written = 0
        self._spends = 0

    def spend(self, characters: int) -> None:
        self.written += characters
        if self.written > MAX_WRITTEN:
            raise LimitExceeded(f"the template would write more than {MAX_WRITTEN:,} characters")
        # The clock is read on the first spend and every 16th: an output or a loop pass is cheap, and
        # reading it each time was a tenth of a render's cost.
        self._spends += 1
        if self._spends & 15 == 1:
            self.tick()

    def tick(self) -> None:
        if _render_clock() > self.deadline:
            raise OutOfTime(OUT_OF_TIME)


_budget: ContextVar[_Budget | None] = ContextVar("render_budget", default=None)


def _spend(characters: int) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.spend(characters)


def _tick() -> _Budget | None:
    """The render's budget, its clock read: before a filter, call or operator, whose one run can
    take milliseconds (outputs and loop passes read it every 16th time)."""
    budget = _budget.get()
    if budget is not None:
        budget.tick()
    return budget


@contextlib.contextmanager
def one_budget() -> Iterator[None]:
    """One budget for the renders within (a message's parts and outputs), unless one is running."""
    if _budget.get() is not None:
        yield
        return
    token = _budget.set(_Budget())
    try:
        yield
    finally:
        _budget.reset(token)


def render(template: Template, context: dict[str, Any]) -> str:
    """`template.render(context)` within a budget (the one running, else its own), and at most
    MAX_RENDERED_LENGTH long."""
    with one_budget():
        out: list[str] = []
        written = 0
        for chunk in template.generate(context):
            written += len(chunk)
            if written > MAX_RENDERED_LENGTH:
                raise LimitExceeded(f"the rendered text would be longer than {MAX_RENDERED_LENGTH:,} characters")
            out.append(chunk)
        return "".join(out)


def size_of(value: Any) -> int:
    """About how many characters printing `value` writes, each reference counted (and each item's
    quotes and comma); above MAX_VALUE_SIZE it is only known to be above. Shared parts are measured
    once, so a structure that would print as gigabytes is measured in the time it took to build."""
    kind = type(value)
    if kind is str:
        return len(value)
    if kind is int:
        return _digits(value)
    if kind is float or kind is bool or value is None:
        return _SCALAR
    return _measure(value)


_SCALAR = 24  # the longest a float prints
_OPEN = -1  # `_measure`'s mark of a container being measured
_SEPARATOR = 2  # ", " between items, or a string's quotes
_SIZED = (str, bytes, bytearray, range)
_SEQUENCES = (list, tuple, set, frozenset)
_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


def _digits(number: int) -> int:
    return number.bit_length() * 30103 // 100000 + 2  # log10(2) digits a bit, and a sign


def _measure(value: Any, seen: dict[int, int] | None = None, depth: int = 0) -> int:
    """`size_of` a container: `seen` holds the sizes of those already measured (and is only made
    once one holds another: most hold a few strings)."""
    kind = type(value)
    if kind is list or kind is tuple:
        parts: Any = value
    elif isinstance(value, _SIZED):
        return len(value)
    elif isinstance(value, int | float):
        return _digits(value) if isinstance(value, int) else _SCALAR
    elif isinstance(value, dict):
        parts = (*value.keys(), *value.values())
    elif isinstance(value, _VIEWS):  # a dict's keys, values or items: printed, the dict's whole worth
        parts = (*value.mapping.keys(), *value.mapping.values())
    elif isinstance(value, _SEQUENCES):
        parts = value
    elif isinstance(value, Namespace):
        parts = (object.__getattribute__(value, "_Namespace__attrs"),)
    else:
        return 1
    if seen is not None:
        known = seen.get(id(value))
        if known is not None:
            # A part measured before is counted again at its size. A structure holding itself is not
            # measured: what reached it back would be counted before its size was known.
            return MAX_VALUE_SIZE + 1 if known is _OPEN else known
        seen[id(value)] = _OPEN  # reached again while open: a structure that holds itself
    if depth > MAX_DEPTH:
        raise LimitExceeded(TOO_DEEP)
    total = 1
    for part in parts:
        kind = type(part)
        if kind is str:
            total += len(part) + _SEPARATOR
        elif kind is int:
            total += _digits(part) + _SEPARATOR
        else:
            if seen is None:
                seen = {id(value): _OPEN}
            total += _measure(part, seen, depth + 1) + _SEPARATOR
        if total > MAX_VALUE_SIZE:
            break
    if seen is not None:
        seen[id(value)] = total
    return total


def _check_sizes(values: Any, named: dict[str, Any] | None = None) -> None:
    for value in values:
        if size_of(value) > MAX_VALUE_SIZE:
            raise LimitExceeded(TOO_LARGE)
    if named:
        _check_sizes(named.values())


def _at_most(estimate: int) -> None:
    if estimate > MAX_VALUE_SIZE:
        raise LimitExceeded(TOO_LARGE)


def _width(width: Any) -> int:
    if type(width) is int and width > MAX_RESULT_LENGTH:
        raise LimitExceeded(TOO_WIDE)
    return width if type(width) is int else 0


def _listed(items: Any) -> Any:
    """A sequence as it is; any other iterable (a generator, a dict) as the list `join` would make."""
    return items if isinstance(items, list | tuple | str) else list(items)


def _joined(separator: Any, items: list[Any]) -> int:
    return size_of(separator) * max(len(items) - 1, 0) + size_of(items)


def _text_of(value: Any) -> str:
    """What a filter that takes text makes of a value (`replace`, `urlize` and the like call `str`);
    the value was measured first, so this is bounded."""
    return value if isinstance(value, str) else str(value)


def _replaced(text: Any, old: Any, new: Any, count: Any) -> int:
    text, old, new = _text_of(text), _text_of(old), _text_of(new)
    found = len(text) + 1 if not old else len(text) // max(len(old), 1)
    if type(count) is int and count >= 0:
        found = min(found, count)
    return len(text) + found * len(new)


def _percent(text: Any, arguments: Any) -> None:
    """Checks `text % arguments` (and the `format` filter): each directive may write its width and
    precision, or the arguments whole."""
    text = _text_of(text)
    directives, widths, signs = 0, 0, 0
    for marker in _PERCENT_MARKER.finditer(text):
        width, precision = marker.group(1), marker.group(2)
        signs += marker.group(0).count("%")
        if width is None:  # "%%"
            continue
        if width == "*" or precision == "*":
            raise LimitExceeded(TOO_WIDE)
        directives += 1
        widths += _width(int(width or 0)) + _width(int(precision or 0))
    if signs != text.count("%"):  # a directive this does not read (a key holding parentheses)
        raise LimitExceeded(UNCHECKED_FORMAT)
    if directives:
        _at_most(len(text) + widths + directives * size_of(arguments))


def _format(text: str, arguments: Any) -> None:
    """Checks `text.format(...)`, as `_percent` checks `%`."""
    fields, widths = 0, 0
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError:  # format raises it too, but only after writing the fields before
        raise LimitExceeded(UNCHECKED_FORMAT) from None
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if "{" in (spec or ""):  # a width given as an argument
            raise LimitExceeded(TOO_WIDE)
        fields += 1
        spec_parts = _FORMAT_SPEC.fullmatch(spec or "")
        if spec_parts is None:
            raise LimitExceeded(UNCHECKED_FORMAT)
        width, precision = spec_parts.groups()
        widths += _width(int(width or 0)) + _width(int(precision or 0))
    if fields:
        _at_most(len(text) + widths + fields * size_of(arguments))


# Per filter, a check of its bound arguments that raises before a result too large is built. A check
# may replace an argument (`join`'s iterable, listed once to be measured).
def _join_check(a: dict[str, Any]) -> None:
    items = a["value"] = _listed(a["value"])
    _at_most(_joined(a.get("d", ""), items))


def _indent_check(a: dict[str, Any]) -> None:
    width, text = a.get("width", 4), _text_of(a["s"])
    each = len(width) if isinstance(width, str) else _width(width)
    _at_most(len(text) + (text.count("\n") + 1) * each)


def _wordwrap_check(a: dict[str, Any]) -> None:
    text, width, wrap = _text_of(a["s"]), a.get("width", 79), a.get("wrapstring")
    if len(text) > MAX_RESULT_LENGTH:  # textwrap's splitting is slow Python: half a second a megabyte
        raise LimitExceeded(f"wordwrap on more than {MAX_RESULT_LENGTH:,} characters")
    if type(width) is not int:
        return
    if isinstance(wrap, str):
        _at_most(len(text) + (len(text) // max(width, 1) + text.count("\n") + 1) * len(wrap))
    # Python's textwrap cuts a long word by slicing what is left of it each time: quadratic.
    if len(text) ** 2 // max(width, 1) > MAX_WRAP_WORK:
        raise LimitExceeded(
            f"wordwrap's text is too long for its width: its length squared over the width must be at most "
            f"{MAX_WRAP_WORK:,}"
        )


def _batch_check(a: dict[str, Any]) -> None:
    if a.get("fill_with") is not None:
        _width(a["linecount"])


def _int_check(a: dict[str, Any]) -> None:
    # Base 2, 8, 16 and 32 have no digit limit: a megabyte of "f" is a number whose division takes seconds.
    value = a["value"]
    if isinstance(value, str) and len(value) > MAX_POWER_BITS // 4:
        raise LimitExceeded(f"a number of more than {MAX_POWER_BITS // 4:,} digits")


def _urlize_check(a: dict[str, Any]) -> None:
    if len(_text_of(a["value"])) > MAX_RESULT_LENGTH:
        raise LimitExceeded(f"urlize on more than {MAX_RESULT_LENGTH:,} characters")


def _round_check(a: dict[str, Any]) -> None:
    # Rounding to a million places computes ten to the millionth.
    precision = a.get("precision", 0)
    if type(precision) is int and abs(precision) > MAX_ROUND_PRECISION:
        raise LimitExceeded(f"round's precision must be at most {MAX_ROUND_PRECISION}")


def _tojson_check(a: dict[str, Any]) -> None:
    indent = a.get("indent")
    if indent is not None and (type(indent) is not int or indent > MAX_JSON_INDENT):
        raise LimitExceeded(f"tojson's indent must be a number of at most {MAX_JSON_INDENT}")


def _sum_check(a: dict[str, Any]) -> None:
    # Adding up lists copies each partial sum: quadratic in the number of lists.
    if not isinstance(a.get("start", 0), int | float):
        raise LimitExceeded("sum's start must be a number")


_FILTER_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "batch": _batch_check,
    "center": lambda a: _width(a.get("width", 80)),
    "format": lambda a: _percent(a["value"], a.get("kwargs") or a.get("args", ())),
    "indent": _indent_check,
    "int": _int_check,
    "join": _join_check,
    "replace": lambda a: _at_most(_replaced(a["s"], a["old"], a["new"], a.get("count"))),
    "round": _round_check,
    "slice": lambda a: _width(a["slices"]),
    "sum": _sum_check,
    "tojson": _tojson_check,
    "urlize": _urlize_check,
    "wordwrap": _wordwrap_check,
}


def _guarded_filter(name: str, filter_: Callable[..., Any]) -> Callable[..., Any]:
    """`filter_` with its arguments measured, and for those that can grow, its result estimated."""
    check = _FILTER_CHECKS.get(name)
    passed = 1 if getattr(filter_, "jinja_pass_arg", None) is not None else 0  # context, eval context or environment
    # An async-capable filter takes an eval context its signature (the sync function's) does not name.
    unnamed = passed - (getattr(inspect.unwrap(filter_), "jinja_pass_arg", None) is not None)
    signature = inspect.signature(filter_) if check is not None else None
    # The parameters' names when they are plain ones: positional arguments are named without binding.
    names, required = None, 0
    if signature is not None and all(p.kind == p.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()):
        names = tuple(signature.parameters)
        required = sum(p.default is p.empty for p in signature.parameters.values())

    @functools.wraps(filter_)  # keeps `jinja_pass_arg`
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        if budget is None:
            # Compiling: Jinja runs a filter of constant arguments then, to fold its result into the
            # code, with no budget; `'x' | center(99999)` 4,000 times would be kept as gigabytes.
            raise nodes.Impossible()
        budget.tick()
        if names is not None and not kwargs and required <= len(args) - unnamed <= len(names):
            arguments = dict(zip(names, args[unnamed:], strict=False))  # defaults left out
            check(arguments)
            args = (*args[:unnamed], *arguments.values())
        elif signature is not None:
            try:
                bound = signature.bind(*args[unnamed:], **kwargs)
            except TypeError:
                return filter_(*args, **kwargs)  # the filter raises its own error for its arguments
            check(bound.arguments)
            args, kwargs = (*args[:unnamed], *bound.args), bound.kwargs
        _check_sizes(args[passed:], kwargs)
        result = filter_(*args, **kwargs)
        if isinstance(result, GeneratorType):  # `select` on `select`...: each item passes the budget
            return _passes(result, budget)
        return result

    return guarded


def _string_method_check(owner: str, name: str, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Checks a call of a str method that can outgrow its string; the arguments to call it with."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _width(args[0] if args else kwargs.get("width"))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if type(size) is int:
            _at_most(len(owner) + owner.count("\t") * size)
    elif name == "join" and len(args) == 1:
        items = _listed(args[0])
        _at_most(_joined(owner, items))
        return (items,)
    elif name == "replace" and len(args) >= 2:
        _at_most(_replaced(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count")))
    return args


_LIPSUM = inspect.signature(generate_lorem_ipsum)


def _lipsum_check(args: tuple, kwargs: dict[str, Any]) -> None:
    try:
        a = _LIPSUM.bind(*args, **kwargs)
    except TypeError:
        return
    a.apply_defaults()
    paragraphs, words = a.arguments["n"], a.arguments["max"]
    if type(paragraphs) is int and type(words) is int:
        _at_most(paragraphs * words * 12)  # a lorem word and its space are at most 12 characters


def _over_limit(operator: str, left: Any, right: Any) -> str | None:
    """The limit `left operator right` would go past, said as LimitExceeded says it; None if none."""
    number = f"the result of {operator} would be a number of more than {MAX_POWER_BITS:,} bits"
    if operator == "**":
        if type(left) is int and type(right) is int and abs(left) > 1 and right > 0:
            return number if right * abs(left).bit_length() > MAX_POWER_BITS else None
        return None
    if operator == "*":
        if type(left) is int and type(right) is int:  # squaring in a loop doubles the digits each pass
            return number if left.bit_length() + right.bit_length() > MAX_POWER_BITS else None
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, str | list | tuple) and type(times) is int:
                if len(sequence) * times > MAX_RESULT_LENGTH:
                    unit = "characters" if isinstance(sequence, str) else "items"
                    return f"the result of * would be longer than {MAX_RESULT_LENGTH:,} {unit}"
                if size_of(sequence) * times > MAX_VALUE_SIZE:
                    return f"the result of * would be larger than {MAX_VALUE_SIZE:,} characters"
                return None
        return None
    if operator == "+":
        if isinstance(left, int | float) and isinstance(right, int | float):
            return None
        if size_of(left) + size_of(right) > MAX_VALUE_SIZE:
            return f"the result of + would be larger than {MAX_VALUE_SIZE:,} characters"
    return None


def _range(*args: int) -> range:
    """Jinja's sandboxed `range`, whose refusal (an OverflowError) reached the recipient without its limit."""
    numbers = range(*args)
    try:
        too_long = len(numbers) > MAX_RANGE
    except OverflowError:  # more items than an index can count
        too_long = True
    if too_long:
        raise LimitExceeded(TOO_LONG_A_RANGE)
    return numbers


@pass_eval_context
def _concat(eval_ctx: Any, parts: tuple[Any, ...]) -> str:
    """`a ~ b`, measured first, parts and whole: in a loop, `ns.s ~ ns.s` doubles every pass."""
    _tick()
    _at_most(sum(size_of(part) for part in parts))
    return markup_join(parts) if eval_ctx.autoescape else str_join(parts)


# The guard's filters take the context so that Jinja never folds them while compiling: a loop over
# a literal (`{% for a in 'xxxxxxxxxx' %}`) would otherwise run unchecked.
@pass_context
def _loop(context: Any, iterable: Any) -> Any:
    """A loop's iterable, each pass checked against the render's time."""
    budget = _budget.get()
    if budget is None:
        return iterable
    return _passes(iterable, budget)


def _passes(iterable: Any, budget: _Budget) -> Any:
    for item in iterable:
        budget.spend(0)
        yield item


@pass_context
def _text(context: Any, text: str) -> str:
    """The template's own text inside a loop, macro or call block, written each time it runs: passed
    through `finalize` like an output, so what it writes is counted."""
    return Markup(text) if context.eval_ctx.autoescape else text


@pass_context
def _literal(context: Any, value: Any) -> Any:
    """A list, tuple or dict the template writes, measured as it is built: `(t, t)` nested in a
    loop doubles each pass, and hashing it nested deep enough crashes the interpreter."""
    if size_of(value) > MAX_VALUE_SIZE:
        raise LimitExceeded(TOO_LARGE)
    return value


def _filtered(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Guard(NodeTransformer):
    """Routes a parsed template's loops, literals, `~` and the text it writes more than once through
    the budget's filters."""

    def __init__(self) -> None:
        self._repeated = 0  # inside a loop, macro or call block: its text may be written many times
        self._in_literal = False

    def _repeating(self, node: nodes.Node) -> nodes.Node:
        self._repeated += 1
        try:
            self.generic_visit(node)
        finally:
            self._repeated -= 1
        return node

    def visit_For(self, node: nodes.For) -> nodes.For:
        self._repeating(node)
        node.iter = _filtered(node.iter, _LOOP)  # a recursive loop's `loop(children)`: `Sandbox.call`
        return node

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        return self._repeating(node)

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        return self._repeating(node)

    def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Expr:
        if not self._repeated or len(node.data) <= SHORT_OUTPUT:  # as `_finalize` lets short text by
            return node
        return _filtered(nodes.Const(node.data, lineno=node.lineno), _TEXT)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Expr:
        self.generic_visit(node)
        return _filtered(nodes.Tuple(node.nodes, "load", lineno=node.lineno), _CONCAT)

    def _literal(self, node: nodes.Expr) -> nodes.Expr:
        # The outermost literal is measured whole, those within it with it: a value is measured as
        # it is built, so no literal can hold (or hash) one deeper or larger than the limits.
        if self._in_literal:
            self.generic_visit(node)
            return node
        self._in_literal = True
        try:
            self.generic_visit(node)
        finally:
            self._in_literal = False
        return _filtered(node, _LITERAL)

    def visit_List(self, node: nodes.List) -> nodes.Expr:
        return self._literal(node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Expr:
        return self._literal(node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Expr:
        return self._literal(node) if node.ctx == "load" else node


def _not_a_value(value: Any) -> bool:
    """Whether printing `value` would write its type and memory address: `first_name.upper` without
    its call, `recipient.items` (the dict's method, found before an attribute of that name), a `map`
    or `select` not joined ("<generator object ... at 0x...>"), a `cycler`. An undefined value is
    callable and iterable too: printed, it raises its own error, which names what is missing."""
    if isinstance(value, Undefined):
        return False
    if callable(value) or isinstance(value, Iterator):
        return True
    kind = type(value)
    return kind.__repr__ is object.__repr__ and kind.__str__ is object.__str__


def _finalize(value: Any) -> Any:
    """Every output, captured ones included, is measured and written to the budget. A short string
    is let through uncounted: the time budget bounds how many a render can write."""
    if type(value) is str:
        size = len(value)
        if size <= SHORT_OUTPUT:
            return value
    else:
        if _not_a_value(value):
            raise OutputNotAValue(NOT_A_VALUE)
        size = size_of(value)
        if size > MAX_VALUE_SIZE:
            raise LimitExceeded(TOO_LARGE)
    budget = _budget.get()
    if budget is not None:
        budget.spend(size)
    return value


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the limits above.

    Intercepted operators are also not folded when a template is compiled: `{{ 9 ** 999999999 }}`
    no longer computes its number while a request waits."""

    intercepted_binops = frozenset({"**", "*", "%", "+"})

    def __init__(self, autoescape: bool) -> None:
        super().__init__(
            undefined=StrictUndefined,
            autoescape=autoescape,
            keep_trailing_newline=True,
            finalize=_finalize,
            optimized=False,  # Jinja's constant folding takes minutes on long filter chains
        )
        # pprint walks a nested value once per level of its nesting, and is for debugging anyway.
        self.filters = {name: _guarded_filter(name, f) for name, f in self.filters.items() if name != "pprint"}
        self.filters[_LOOP] = _loop
        self.filters[_CONCAT] = _concat
        self.filters[_LITERAL] = _literal
        self.filters[_TEXT] = _text
        self.globals["range"] = _range

    def guard(self, template: nodes.Template) -> nodes.Template:
        """`template` (parsed, changed in place) with its loops and `~` under the render's budget."""
        _Guard().visit(template)
        template.set_environment(self)
        return template

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # A class's methods take the instance to change as an argument (`dict.update(recipient, ...)`),
        # past the immutable sandbox's check of instances. Numbers and bytes have no method a message
        # needs (`(1).to_bytes(10 ** 9)`, `int.from_bytes`); a translation table maps a character to
        # any string, so its result cannot be estimated; `fromkeys` repeats one value a million times.
        if isinstance(obj, type | int | float | bytes | bytearray):
            return False
        if isinstance(obj, str) and attr in ("translate", "maketrans", "encode"):
            return False
        if isinstance(obj, dict) and attr == "fromkeys":
            return False
        return super().is_safe_attribute(obj, attr, value)

    # Filters look up `attribute='a.b.c'` one part at a time for every item (`sort`, `max`, `groupby`):
    # a path of 100,000 parts over 1,000 items is seconds inside one filter call. Each lookup is
    # charged like a loop pass.
    def getitem(self, obj: Any, argument: Any) -> Any:
        _spend(0)
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _spend(0)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "%":
            _percent(left, right)
        elif (limit := _over_limit(operator, left, right)) is not None:
            raise LimitExceeded(limit)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's own spelling)
        budget = _tick()
        # As a whole: `dict(a=b, b=b, ...)`, `cycler(b, b, ...)` and a macro's varargs keep them all.
        _at_most(sum(size_of(a) for a in args) + sum(size_of(v) for v in kwargs.values()))
        if isinstance(__obj, LoopContext) and args and budget is not None:
            # `loop(children)` of a recursive loop (or an alias of it) runs the body over its argument.
            args = (_passes(args[0], budget), *args[1:])
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):  # bytes cannot be made (`encode` is refused)
            args = _string_method_check(owner, getattr(__obj, "__name__", ""), args, kwargs)
        elif __obj is generate_lorem_ipsum:
            _lipsum_check(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        formatting = super().wrap_str_format(value)
        if formatting is None:  # not a str's format or format_map
            return None
        text = value.__self__

        @functools.wraps(formatting)
        def measured(*args: Any, **kwargs: Any) -> Any:
            _format(text, (args, kwargs))
            return formatting(*args, **kwargs)

        return measured
