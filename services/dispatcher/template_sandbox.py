"""The sandbox campaign templates render in: Jinja's immutable sandbox, with every way a template
can build a huge value or keep the CPU busy bounded.

A render runs on the dispatcher's event loop, where every other batch waits for it. Jinja's sandbox
keeps a template away from Python's internals, not from joining `'y' * 99999` 99999 times, doubling
a namespace's string in a loop, or looping 99999 × 99999 times. So:

- what makes a value from a number (`**`, `*`, `center`, `batch`'s fill, format widths) is
  checked before it runs, against MAX_RESULT_LENGTH;
- what a filter, a call, `+`, `~` or `%` takes, and every output, is measured counting each
  reference (a list holding one big list ten times counts it ten times: printing it writes it ten
  times) and refused past MAX_VALUE_SIZE; where a result can outgrow its inputs (`join`, `replace`,
  `indent`, `format`) the result is estimated first;
- one render has a budget: MAX_RENDER_SECONDS, checked on every loop pass and every call, and
  MAX_WRITTEN characters written, text captured by `{% set %}`, macros and filter blocks included.

Past a limit the render fails with a fixed text that names the limit, never a value.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from jinja2 import StrictUndefined, Template, nodes
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum, pass_eval_context
from jinja2.visitor import NodeTransformer

# What one expression may make from a number, what one render may give and write, and how long it may
# take: far beyond any message, far below what would stall the event loop or fill the memory.
MAX_RESULT_LENGTH = 100_000
MAX_POWER_BITS = 10_000
MAX_RENDERED_LENGTH = 1024 * 1024
MAX_VALUE_SIZE = MAX_RENDERED_LENGTH
MAX_WRITTEN = 4 * MAX_RENDERED_LENGTH
MAX_RENDER_SECONDS = 0.1
MAX_JSON_INDENT = 16

TOO_LARGE = f"a value would be larger than {MAX_VALUE_SIZE:,} characters"
TOO_WIDE = f"a width or count over {MAX_RESULT_LENGTH:,}"
OUT_OF_TIME = f"rendering took longer than {MAX_RENDER_SECONDS * 1000:g} ms"
# A width or precision of five digits or more, or one given as an argument (`*`, `{:{w}}`).
_WIDE_PERCENT = re.compile(r"%[-#0 +]*(?:\d{5}|\*|\d*\.(?:\d{5}|\*))")
_WIDE_FORMAT = re.compile(r"\{[^{}]*:[^{}]*(?:\d{5}|\{)")
# Filters the guard adds; their names cannot be written in a template.
_LOOP = "<loop pass>"
_CONCAT = "<concat>"


class LimitExceeded(SecurityError):
    """A render went past one of the sandbox's limits; its text names the limit, nothing else."""


class OutOfTime(LimitExceeded):
    """A render took longer than MAX_RENDER_SECONDS."""


class _Budget:
    """One render's: when it must end and what it has written so far."""

    __slots__ = ("deadline", "written")

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.written = 0

    def spend(self, characters: int) -> None:
        self.written += characters
        if self.written > MAX_WRITTEN:
            raise LimitExceeded(f"the template would write more than {MAX_WRITTEN:,} characters")
        if time.monotonic() > self.deadline:
            raise OutOfTime(OUT_OF_TIME)


_budget: ContextVar[_Budget | None] = ContextVar("render_budget", default=None)


def _spend(characters: int) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.spend(characters)


def render(template: Template, context: dict[str, Any]) -> str:
    """`template.render(context)` within one render's budget, and at most MAX_RENDERED_LENGTH long."""
    token = _budget.set(_Budget())
    try:
        out: list[str] = []
        written = 0
        for chunk in template.generate(context):
            written += len(chunk)
            if written > MAX_RENDERED_LENGTH:
                raise LimitExceeded(f"the rendered text would be longer than {MAX_RENDERED_LENGTH:,} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        _budget.reset(token)


def size_of(value: Any) -> int:
    """About how many characters printing `value` writes, each reference counted; above MAX_VALUE_SIZE
    it is only known to be above. Shared parts are measured once, so a structure that would print
    as gigabytes is measured in the time it took to build."""
    kind = type(value)
    if kind is str:
        return len(value)
    if kind is int or kind is float or kind is bool or value is None:
        return 1
    try:
        return _measure(value, {})
    except RecursionError:  # nested deeper than printing it could go
        return MAX_VALUE_SIZE + 1


_SIZED = (str, bytes, bytearray, range)
_SEQUENCES = (list, tuple, set, frozenset)


def _measure(value: Any, seen: dict[int, int]) -> int:
    if isinstance(value, _SIZED):
        return len(value)
    if isinstance(value, dict):
        parts: Any = (*value.keys(), *value.values())
    elif isinstance(value, _SEQUENCES):
        parts = value
    elif isinstance(value, Namespace):
        parts = (object.__getattribute__(value, "_Namespace__attrs"),)
    else:
        return 1
    known = seen.get(id(value))
    if known is not None:
        return known
    seen[id(value)] = 1  # a structure holding itself prints "[...]" there
    total = 1
    for part in parts:
        kind = type(part)
        if kind is str:
            total += len(part)
        elif kind is int or kind is float:
            total += 1
        else:
            total += _measure(part, seen)
        if total > MAX_VALUE_SIZE:
            break
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


def _width(width: Any) -> None:
    if type(width) is int and width > MAX_RESULT_LENGTH:
        raise LimitExceeded(TOO_WIDE)


def _listed(items: Any) -> Any:
    """A sequence as it is; any other iterable (a generator, a dict) as the list `join` would make."""
    return items if isinstance(items, list | tuple | str) else list(items)


def _joined(separator: Any, items: list[Any]) -> int:
    return size_of(separator) * max(len(items) - 1, 0) + size_of(items)


def _replaced(text: Any, old: Any, new: Any, count: Any) -> int:
    if not isinstance(text, str | bytes) or not isinstance(new, str | bytes):
        return 0
    found = len(text) + 1 if not old else len(text) // max(len(old), 1)
    if type(count) is int and count >= 0:
        found = min(found, count)
    return len(text) + found * len(new)


def _formatted(text: Any, markers: str, arguments: Any) -> int:
    """What `text % arguments` or `text.format(...)` can write: each marker may take the arguments whole."""
    if not isinstance(text, str):
        return 0
    return len(text) + text.count(markers) * size_of(arguments)


def _percent(text: Any, arguments: Any) -> None:
    if isinstance(text, str):
        if _WIDE_PERCENT.search(text):
            raise LimitExceeded(TOO_WIDE)
        _at_most(_formatted(text, "%", arguments))


# Per filter, a check of its bound arguments that raises before a result too large is built. A check
# may replace an argument (`join`'s iterable, listed once to be measured).
def _join_check(a: dict[str, Any]) -> None:
    items = a["value"] = _listed(a["value"])
    _at_most(_joined(a.get("d", ""), items))


def _indent_check(a: dict[str, Any]) -> None:
    width, text = a.get("width", 4), a["s"]
    _width(width)
    if isinstance(width, str) and isinstance(text, str):
        _at_most(len(text) + (text.count("\n") + 1) * len(width))


def _wordwrap_check(a: dict[str, Any]) -> None:
    text, width, wrap = a["s"], a.get("width", 79), a.get("wrapstring")
    if isinstance(text, str) and isinstance(wrap, str) and type(width) is int:
        _at_most(len(text) + (len(text) // max(width, 1) + text.count("\n") + 1) * len(wrap))


def _batch_check(a: dict[str, Any]) -> None:
    if a.get("fill_with") is not None:
        _width(a["linecount"])


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
    "join": _join_check,
    "replace": lambda a: _at_most(_replaced(a["s"], a["old"], a["new"], a.get("count"))),
    "slice": lambda a: _width(a["slices"]),
    "sum": _sum_check,
    "tojson": _tojson_check,
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
    names = None
    if signature is not None and all(p.kind == p.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()):
        names = tuple(signature.parameters)

    @functools.wraps(filter_)  # keeps `jinja_pass_arg`
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if names is not None and not kwargs and len(args) - unnamed <= len(names):
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
        return filter_(*args, **kwargs)

    return guarded


def _string_method_check(owner: str | bytes, name: str, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Checks a call of a str or bytes method that can outgrow its string; the arguments to call it with."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _width(args[0] if args else kwargs.get("width"))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if type(size) is int:
            _at_most(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * size)
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


def _too_large(operator: str, left: Any, right: Any) -> bool:
    if operator == "**":
        if type(left) is int and type(right) is int and abs(left) > 1 and right > 0:
            return right * abs(left).bit_length() > MAX_POWER_BITS
        return False
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, str | list | tuple) and type(times) is int:
                return len(sequence) * times > MAX_RESULT_LENGTH or size_of(sequence) * times > MAX_VALUE_SIZE
        return False
    if operator == "+":
        if isinstance(left, int | float) and isinstance(right, int | float):
            return False
        return size_of(left) + size_of(right) > MAX_VALUE_SIZE
    return False


@pass_eval_context
def _concat(eval_ctx: Any, parts: tuple[Any, ...]) -> str:
    """`a ~ b`, measured first: in a loop, `ns.s ~ ns.s` doubles every pass."""
    _check_sizes(parts)
    return markup_join(parts) if eval_ctx.autoescape else str_join(parts)


def _loop(iterable: Any, text_per_pass: int) -> Any:
    """A loop's iterable, each pass charged to the render's budget: its time and the text its body
    writes (`{% for %}` of loops writes nothing that is output, and still runs)."""
    budget = _budget.get()
    if budget is None:
        return iterable
    return _passes(iterable, budget, text_per_pass)


def _passes(iterable: Any, budget: _Budget, text_per_pass: int) -> Any:
    for item in iterable:
        budget.spend(text_per_pass)
        yield item


def _text_written(body: list[nodes.Node]) -> int:
    """The template's own text in a loop body, which each pass writes: its text and constants. A loop
    inside charges its own passes, but its `else` text is written once per pass of this one."""
    total = 0
    stack: list[nodes.Node] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.TemplateData):
            total += len(node.data)
        elif isinstance(node, nodes.Const) and isinstance(node.value, str):
            total += len(node.value)
        elif isinstance(node, nodes.For):
            stack.extend(node.else_)
        else:
            stack.extend(node.iter_child_nodes())
    return total


class _Guard(NodeTransformer):
    """Routes every loop and every `~` of a parsed template through the budget's filters."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        charge = nodes.Const(_text_written(node.body), lineno=node.lineno)
        node.iter = nodes.Filter(node.iter, _LOOP, [charge], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Expr:
        self.generic_visit(node)
        parts = nodes.Tuple(node.nodes, "load", lineno=node.lineno)
        return nodes.Filter(parts, _CONCAT, [], [], None, None, lineno=node.lineno)


def _finalize(value: Any) -> Any:
    """Every output, captured ones included, is measured and written to the budget."""
    if type(value) is str:
        size = len(value)
    else:
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
            undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True, finalize=_finalize
        )
        self.filters = {name: _guarded_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP] = _loop
        self.filters[_CONCAT] = _concat

    def guard(self, template: nodes.Template) -> nodes.Template:
        """`template` (parsed, changed in place) with its loops and `~` under the render's budget."""
        _Guard().visit(template)
        template.set_environment(self)
        return template

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # A translation table maps a character to any string: its result cannot be estimated.
        if isinstance(obj, str | bytes) and attr in ("translate", "maketrans"):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "%":
            _percent(left, right)
        elif _too_large(operator, left, right):
            raise LimitExceeded(f"the result of {operator} would be too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's own spelling)
        _spend(0)
        _check_sizes(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | bytes):
            args = _string_method_check(owner, getattr(__obj, "__name__", ""), args, kwargs)
        elif __obj is generate_lorem_ipsum:
            _lipsum_check(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        formatting = super().wrap_str_format(value)
        if formatting is None:  # not a str's format or format_map
            return None
        text = value.__self__
        if _WIDE_FORMAT.search(text):
            raise LimitExceeded(TOO_WIDE)

        @functools.wraps(formatting)
        def measured(*args: Any, **kwargs: Any) -> Any:
            _at_most(_formatted(text, "{", (args, kwargs)))
            return formatting(*args, **kwargs)

        return measured
