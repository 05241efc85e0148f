"""One meaning for a JSON reply, whichever parser reads it; one encoding for a request, whichever writes it."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from libs.json_documents import dump, has_long_number, parse

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(VALUES)
def test_parse_reads_what_the_standard_library_reads(value) -> None:
    body = json.dumps(value).encode()
    assert parse(body) == json.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 123456789012345678901234567890}',  # beyond 64 bits: orjson would give a float
        b'{"id": 9223372036854775808}',
        '{"id": 123456789012345678901234567890}',
        b'{"score": NaN}',
        '{"name": "Zoë"}'.encode("utf-16"),
        b"[" * 50 + b"]" * 50,
    ],
)
def test_what_orjson_refuses_or_bends_parses_as_the_standard_library_does(body) -> None:
    parsed = parse(body)
    assert parsed == json.loads(body) and repr(parsed) == repr(json.loads(body))


@given(st.text(alphabet=st.sampled_from("0123456789 0123456789\u0663\u00e9\ud800:-"), max_size=80))
@example("1" * 18)
@example("1" * 19)
@example('{"id": 9223372036854775808}')
@example("x" + "1" * 18 + "\u0663" + "1")
@example("\u0663" * 19)
def test_a_long_number_is_a_run_of_nineteen_ascii_digits(text) -> None:
    # Other scripts' digits (Arabic-Indic three) and lone surrogates neither count nor break the check.
    expected = re.search(r"[0-9]{19,}", text) is not None
    assert has_long_number(text) is expected
    assert has_long_number(text.encode("utf-8", "surrogatepass")) is expected


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"a": 1} trailing'])
def test_what_neither_accepts_is_a_value_error(body) -> None:
    with pytest.raises(ValueError):
        parse(body)


TEXTS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


FINITE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(FINITE)
def test_dump_means_what_it_was_given(value) -> None:
    assert json.loads(dump(value)) == value


def test_dump_writes_infinities_as_null_not_as_invalid_json() -> None:
    assert dump({"a": float("inf"), "b": float("-inf"), "c": float("nan")}) == b'{"a":null,"b":null,"c":null}'


@given(TEXTS)
def test_dump_writes_the_bytes_the_standard_library_writes(value) -> None:
    # Floats are left out: both write the same number, in spellings that may differ (1e-07, 1e-7).
    assert dump(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def test_what_orjson_refuses_to_write_is_left_to_the_standard_library() -> None:
    big = {"id": 123456789012345678901234567890}
    assert dump(big) == b'{"id":123456789012345678901234567890}'
    with pytest.raises(UnicodeEncodeError):  # what json.dumps(...).encode() always raised
        dump({"text": "\ud800"})


@pytest.mark.parametrize("depth", [1100, 5000])
@pytest.mark.parametrize("long_number", [False, True])
def test_a_document_nested_too_deeply_is_not_json_to_us(depth: int, long_number: bool) -> None:
    """Not a RecursionError that ends a whole call: the ValueError every caller handles."""
    inner = b"12345678901234567890" if long_number else b"1"
    with pytest.raises(ValueError, match="nested too deeply"):
        parse(b"[" * depth + inner + b"]" * depth)
