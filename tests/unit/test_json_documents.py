"""One meaning for a JSON reply, whichever parser reads it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.json_documents import parse

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


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"a": 1} trailing'])
def test_what_neither_accepts_is_a_value_error(body) -> None:
    with pytest.raises(ValueError):
        parse(body)
