"""A record keyed by its customer's name is found in any case and Unicode form, as the scrubbing finds values."""

from __future__ import annotations

import pytest

from libs.scrub import error_text, names_itself
from services.resolver.extraction import leaf_paths


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Zo\u00eb", "Zoe\u0308"),  # composed key, decomposed value
        ("Zoe\u0308", "ZO\u00cb"),  # decomposed key, composed value in capitals
        ("Wei\u00df", "WEISS"),  # case folding lengthens the key
        ("\uff2a\uff41\uff4e\uff45", "Jane"),  # full-width key
    ],
)
def test_a_key_that_is_its_records_value_in_another_form_names_itself(key, value) -> None:
    record = {"first_name": value, "tier": "gold"}
    assert names_itself(key, record)
    assert leaf_paths({key: record}) == ["[redacted].first_name", "[redacted].tier"]


def test_a_key_that_is_no_value_of_its_record_is_a_field() -> None:
    assert not names_itself("customer", {"first_name": "Customer Care"})
    assert error_text('{"customer": {"first_name": "x"}}') == '{"customer":{"first_name":"<string>"}}'
