"""Recipient attributes are bounded; a refusal names the recipient and the limit, never a value."""

from __future__ import annotations

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
from services.dispatcher.servicer import MAX_ATTRIBUTE_LENGTH, MAX_ATTRIBUTES, validate_recipient, validate_recipients


def recipients(attributes: dict[str, str]) -> list[pb.Recipient]:
    return [pb.Recipient(anonymous_id="a-1"), pb.Recipient(anonymous_id="a-2", attributes=attributes)]


def test_recipients_within_the_limits_pass() -> None:
    validate_recipients(recipients({f"k{i}": "v" * MAX_ATTRIBUTE_LENGTH for i in range(MAX_ATTRIBUTES)}))
    validate_recipients(recipients({"n" * 64: "v"}))
    validate_recipients([])


@pytest.mark.parametrize(
    ("attributes", "description"),
    [
        ({f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}, f"at most {MAX_ATTRIBUTES} attributes"),
        ({"tier": "v" * (MAX_ATTRIBUTE_LENGTH + 1)}, "names up to 64"),
        ({"n" * 65: "gold"}, "names up to 64"),
    ],
)
def test_a_recipient_over_a_limit_is_named(attributes, description) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_recipients(recipients(attributes), "recipients.recipients")
    assert refused.value.field == "recipients.recipients[1].attributes"
    assert description in refused.value.description
    assert "gold" not in str(refused.value) and "vvv" not in str(refused.value)


@pytest.mark.parametrize(
    ("attributes", "description"),
    [
        ({"tier": "gold", "": "gold"}, "names must not be empty"),
        ({"tier": "gold", "ann@example.com\n": "gold"}, "names must not hold control characters"),
        ({"\x00tier": "gold"}, "names must not hold control characters"),
        ({"tier\t": "gold"}, "names must not hold control characters"),
    ],
)
def test_an_attribute_name_no_template_can_read_is_refused_unquoted(attributes, description) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_recipients(recipients(attributes), "recipients.recipients")
    assert refused.value.field == "recipients.recipients[1].attributes"
    assert description in refused.value.description
    assert "example" not in str(refused.value) and "tier" not in str(refused.value)


def test_attribute_names_with_spaces_or_other_scripts_pass() -> None:
    """Read as {{ recipient["first order"] }}: printable text of any script is a name."""
    validate_recipients(recipients({"first order": "v", "stufe": "v", "\u7b49\u7ea7": "v", "a.b-c": "v"}))


@pytest.mark.parametrize("name", [" tier", "tier ", " tier ", "  "])
def test_an_attribute_name_with_a_space_at_an_end_is_refused_unquoted(name) -> None:
    """`recipient.tier` does not read " tier": every render of the campaign would fail instead."""
    people = [pb.Recipient(anonymous_id=f"a-{i}", attributes={"tier": "gold"}) for i in range(3)]
    people.append(pb.Recipient(anonymous_id="a-3", attributes={"tier": "gold", name: "gold"}))
    with pytest.raises(InvalidArgument) as refused:
        validate_recipients(people)
    assert refused.value.field == "recipients[3].attributes"
    assert refused.value.description == "names must not begin or end with a space"
    assert "tier" not in str(refused.value) and "gold" not in str(refused.value)


def test_a_test_send_s_attribute_name_with_a_space_at_an_end_is_named_by_its_field() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_recipient(pb.Recipient(anonymous_id="a-1", attributes={"tier ": "gold"}))
    assert str(refused.value) == "recipient.attributes: names must not begin or end with a space"
