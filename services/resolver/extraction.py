"""Reads values out of PII API replies: JMESPath selection, leaf paths, decryption.

Encrypted values (when the config has an encryption key) are
base64(nonce[12] | AES-256-GCM ciphertext | tag[16]), no associated data, in the
standard or the URL-safe alphabet, padded or not.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from libs.jsonpath import compile_expression, compile_getter
from libs.scrub import names_itself

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


class ValueDecryptionFailed(ValueError):
    """An encrypted value did not decrypt (its text is never kept)."""


class ValueNotText(ValueError):
    """A value holds half a surrogate pair (`"\\ud83d"`, a string cut inside an emoji): JSON can spell
    it, but it is no Unicode text a reply can carry."""

    def __init__(self) -> None:
        super().__init__("is not valid Unicode text (half a surrogate pair)")


def check_text(values: Iterable[str]) -> None:
    """Raises ValueNotText when a value cannot be written as UTF-8 (a join, for ASCII values)."""
    joined = "".join(values)
    if not joined.isascii():
        try:
            joined.encode()
        except UnicodeEncodeError:
            raise ValueNotText from None


@lru_cache(maxsize=1024)
def compile_path(expression: str) -> ParsedResult:
    """Compiled JMESPath; raises JMESPathError for a bad expression."""
    return compile_expression(expression)


def path_error(expression: str) -> str | None:
    """Why a path does not compile, or None when it does."""
    try:
        compile_path(expression)
    except JMESPathError as exc:
        return f"is not a valid JMESPath expression ({type(exc).__name__})"
    return None


def select(expression: str, document: Any) -> Any:
    return compile_getter(expression)(document)


def as_text(value: Any) -> str | None:
    """Scalar values as text; None for null or missing; objects and lists as compact JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        # JSON has one number type: 447400123456.0 (a phone number kept in a float column) is the number
        # 447400123456, not "447400123456.0", whose dot a phone number's separators would drop.
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:  # nested deeper than can be written out: no value to use
        return None


def decode_key(encoded: str) -> bytes:
    """The config's encryption key: 32 bytes in standard or urlsafe base64."""
    text = encoded.strip()
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64") from None
    if len(raw) != 32:
        raise ValueError("must decode to 32 bytes (AES-256)")
    return raw


_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def _sealed_bytes(text: str) -> bytes:
    """`text` decoded from base64, standard or URL-safe, padded or not (as many Java and JavaScript
    encoders write it); raises ValueError. The common case, standard and padded, goes straight to C: this
    runs per value. The GCM tag still authenticates whatever a lenient decode gives."""
    if not len(text) % 4 and "-" not in text and "_" not in text:
        return binascii.a2b_base64(text, strict_mode=True)
    if ("-" in text or "_" in text) and ("+" in text or "/" in text):
        raise ValueError("mixes the standard and URL-safe alphabets")
    data = text.encode("ascii").translate(_URLSAFE_TO_STANDARD)  # bytes: str.translate is ten times slower
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=True)


def decrypt_value(key: AESGCM, encoded: str) -> str:
    try:
        raw = _sealed_bytes(encoded.strip())
    except (binascii.Error, ValueError):
        raise ValueDecryptionFailed("not base64") from None
    if len(raw) < 12 + 16:
        raise ValueDecryptionFailed("too short")
    try:
        return key.decrypt(raw[:12], raw[12:], None).decode("utf-8")
    except (InvalidTag, UnicodeDecodeError):
        raise ValueDecryptionFailed("does not decrypt") from None


def leaf_paths(document: Any, prefix: str = "") -> list[str]:
    """Every leaf of a JSON document as a JMESPath expression (lists show their first item)."""
    if isinstance(document, dict):
        paths: list[str] = []
        for key, value in document.items():
            # A record keyed by a value it holds (its customer's name) is shown by no key of its own.
            part = "[redacted]" if names_itself(key, value) else key if _IDENTIFIER.match(key) else json.dumps(key)
            paths.extend(leaf_paths(value, f"{prefix}.{part}" if prefix else part))
        return paths or ([prefix] if prefix else [])
    if isinstance(document, list):
        if not document:
            return [prefix] if prefix else []
        return leaf_paths(document[0], f"{prefix}[0]" if prefix else "[0]")
    return [prefix] if prefix else ["@"]


Step = str | int  # a field's name or a list's index


def _leading_steps(node: dict[str, Any]) -> tuple[tuple[Step, ...], bool]:
    """The fields and indexes an expression's AST opens with, and whether they are the whole of it."""
    kind = node.get("type")
    if kind == "field":
        return (node["value"],), True
    if kind in ("identity", "current"):
        return (), True
    if kind == "index_expression":
        left, *rights = node["children"]
        steps, whole = _leading_steps(left)
        for right in rights:
            if not whole or right.get("type") != "index":
                return steps, False
            steps += (right["value"],)
        return steps, whole
    if kind in ("subexpression", "pipe"):
        steps: tuple[Step, ...] = ()
        for child in node["children"]:
            more, whole = _leading_steps(child)
            steps += more
            if not whole:
                return steps, False
        return steps, True
    if kind in ("projection", "filter_projection"):
        return _leading_steps(node["children"][0])[0], False
    return (), False


@lru_cache(maxsize=1024)
def record_steps(expression: str, *, whole: bool = False) -> tuple[Step, ...]:
    """The fields and indexes `expression` follows to the object whose field holds its value (`customer` of
    `customer.email` and `customer.emails[0]`, `data.items[0]` of `data.items[0].email`); with `whole`, to
    the value itself. Only what the expression opens with: () for an expression such as `a || b`. Raises
    JMESPathError when bad."""
    if not expression:
        return ()
    steps, _ = _leading_steps(compile_path(expression).parsed)
    if whole:
        return steps
    # Up to the field holding the value: `emails` of `customer.emails[0]` is the customer's, null or not.
    end = len(steps)
    while end and type(steps[end - 1]) is int:
        end -= 1
    return steps[: max(end - 1, 0)]


def _step_text(steps: tuple[Step, ...]) -> str:
    text = ""
    for step in steps:
        if type(step) is int:
            text += f"[{step}]"
        else:
            part = step if _IDENTIFIER.match(step) else json.dumps(step)
            text += f".{part}" if text else part
    return text


def null_record(document: Any, steps: tuple[Step, ...], *, empty_list: bool = False) -> str | None:
    """Where `document`, followed along `steps`, is JSON null (or a list of nothing where an item is
    taken, or at the end with `empty_list`): the API's way of saying it has no such record. Said with the
    config's own names ("null at customer"), never a value; None when there is something there, or a
    field is missing (a path to mend, not an answer), or when `document` holds an error (`errors` or `error`,
    as a GraphQL reply's `{"data": null, "errors": [...]}`): the API failed, it did not say no."""
    value = document
    if value is None:
        return "the reply is null"
    if type(value) is dict and (value.get("errors") or value.get("error")):
        return None
    for at, step in enumerate(steps):
        if type(step) is int:
            if type(value) is not list:
                return None
            if not value:
                return _no_items(steps[:at])
            try:
                value = value[step]
            except IndexError:
                return None
        else:
            if type(value) is not dict or step not in value:
                return None
            value = value[step]
        if value is None:
            return f"null at {_step_text(steps[: at + 1])}"
    if empty_list and type(value) is list and not value:
        return _no_items(steps)
    return None


def _no_items(steps: tuple[Step, ...]) -> str:
    return f"an empty list at {_step_text(steps)}" if steps else "the reply is an empty list"
