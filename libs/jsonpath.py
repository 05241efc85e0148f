"""JMESPath selection with a fast path: field and index paths (`data.results`, `items[0].id`,
`messages[0]."message-id"`) run as plain Python, the same results at a tenth of the cost; any other
expression runs through jmespath itself. Used on every record of every PII API reply and gateway reply.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult


class ExpressionTooDeep(JMESPathError):
    """An expression nested deeper than the parser can follow (`!!!!...a`)."""


def compile_expression(expression: str) -> ParsedResult:
    """`jmespath.compile`; raises JMESPathError for every expression it cannot compile."""
    try:
        return jmespath.compile(expression)
    except RecursionError:
        raise ExpressionTooDeep("nested too deeply") from None


@lru_cache(maxsize=1024)
def compile_getter(expression: str) -> Callable[[Any], Any]:
    """`jmespath.compile(expression).search`, fast for fields and indexes; raises JMESPathError when bad.

    A path that cannot apply to a document's values (`length(name)` where `name` is a number, a
    document nested too deeply to walk) finds nothing, as a missing field does: one reply's values
    are no reason to fail the others read with it."""
    parsed = compile_expression(expression)
    fast = _getter(parsed.parsed)
    if fast is not None:
        return fast
    search = parsed.search

    def search_or_nothing(value: Any) -> Any:
        try:
            return search(value)
        except (JMESPathError, RecursionError):
            return None

    return search_or_nothing


@lru_cache(maxsize=1024)
def field_names(expression: str) -> tuple[str, ...] | None:
    """`profile.first_name` as ("profile", "first_name"); None when the expression is anything but
    fields (the names a hot loop can read with `dict.get` rather than a getter's call). Raises
    JMESPathError when bad."""
    return _field_names(compile_expression(expression).parsed)


def _getter(node: dict[str, Any]) -> Callable[[Any], Any] | None:
    kind = node.get("type")
    if kind == "identity":
        return lambda value: value
    if kind == "field":
        name = node["value"]
        return lambda value: value.get(name) if isinstance(value, dict) else None
    if kind == "subexpression":
        names = _field_names(node)
        if names is not None:
            return _fields(names)
        steps = [_getter(child) for child in node["children"]]
        if any(step is None for step in steps):
            return None

        def chain(value: Any) -> Any:
            for step in steps:
                value = step(value)
                if value is None:
                    return None
            return value

        return chain
    if kind == "index_expression":
        # `a[0]` is (a, 0); `a[0][1]`, a list of lists, is one node (a, 0, 1): each index applied in turn.
        left, *rights = node["children"]
        before = _getter(left)
        if before is None or any(right.get("type") != "index" for right in rights):
            return None
        indexes = tuple(right["value"] for right in rights)

        def item(value: Any) -> Any:
            value = before(value)
            for index in indexes:
                if not isinstance(value, list):
                    return None
                try:
                    value = value[index]
                except IndexError:
                    return None
            return value

        return item
    return None


def _field_names(node: dict[str, Any]) -> tuple[str, ...] | None:
    """`profile.first_name` as ("profile", "first_name"); None when the path holds anything but fields."""
    if node.get("type") == "field":
        return (node["value"],)
    if node.get("type") != "subexpression":
        return None
    names: tuple[str, ...] = ()
    for child in node["children"]:
        part = _field_names(child)
        if part is None:
            return None
        names += part
    return names


def _fields(names: tuple[str, ...]) -> Callable[[Any], Any]:
    """A chain of fields as one function: what a PII API's record paths mostly are, read per record."""
    if len(names) == 2:
        first, second = names

        def two(value: Any) -> Any:
            if isinstance(value, dict):
                value = value.get(first)
                if isinstance(value, dict):
                    return value.get(second)
            return None

        return two

    def fields(value: Any) -> Any:
        for name in names:
            if not isinstance(value, dict):
                return None
            value = value.get(name)
        return value

    return fields
