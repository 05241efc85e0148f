"""A single-mode reply checked against the ID asked for, at the config's `id_path`: a PII API that answers
with another customer's record (a misrouted path, a cache keyed wrongly) gives no contact."""

from __future__ import annotations

from typing import Any

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver.pii_client import Extraction, PiiApiClient, _Paths

EMAIL = common_pb2.CHANNEL_EMAIL
INVALID_RESPONSE = pb.RESOLVE_ERROR_CODE_INVALID_RESPONSE
ANOTHER = "the reply is for another customer: its ID at id_path is not the one asked for"
NO_ID = "the reply holds no ID at id_path"


def single(**fields: Any) -> pb.PiiApiConfig:
    values: dict[str, Any] = dict(
        workspace_id="ws-1",
        channel=EMAIL,
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url="https://pii.example.com/v1/customers/@anonymous_id",
        contact_path="email",
        attribute_paths={"first_name": "first"},
    )
    values.update(fields)
    return pb.PiiApiConfig(**values)


def read_reply(config: pb.PiiApiConfig, document: Any, anonymous_id: str) -> Extraction:
    """What a single-mode lookup of `anonymous_id` takes from `document`: the contact, or the ID's failure."""
    paths = _Paths.of(config)
    record = PiiApiClient._single_record(
        config, document, anonymous_id, paths, lambda r: PiiApiClient._extract(config, EMAIL, r, paths)
    )
    return record if type(record) is Extraction else PiiApiClient._extract(config, EMAIL, record, paths)


@pytest.mark.parametrize(
    ("anonymous_id", "written"),
    [
        ("cust-000001", "cust-000001"),
        ("7", 7),
        ("7", 7.0),  # the number 7, as bulk reads it
        ("4369912345678", 4369912345678.0),
        ("1.5", 1.5),
    ],
)
def test_a_reply_carrying_the_id_asked_for_gives_its_contact(anonymous_id: str, written: Any) -> None:
    config = single(id_path="customer.id", contact_path="customer.email")
    document = {"customer": {"id": written, "email": "ann@example.org"}}
    extraction = read_reply(config, document, anonymous_id)
    assert not extraction.error, extraction.detail
    assert extraction.contact == "ann@example.org"


@pytest.mark.parametrize(
    ("anonymous_id", "written"),
    [
        ("cust-000001", "cust-000002"),
        ("abc", "ABC"),  # no case folding
        ("abc", " abc"),  # no trimming
        ("007", 7),  # a number is its decimal digits, never "007"
        ("7", "7.0"),  # text stands as written
    ],
)
def test_a_reply_for_another_customer_fails_without_quoting_either_id(anonymous_id: str, written: Any) -> None:
    config = single(id_path="customer.id", contact_path="customer.email")
    document = {"customer": {"id": written, "email": "zed@example.org"}, "first": "Zedediah"}
    extraction = read_reply(config, document, anonymous_id)
    assert extraction.error == INVALID_RESPONSE
    assert extraction.detail == ANOTHER
    assert extraction.contact == "" and not extraction.attributes


@pytest.mark.parametrize("written", [None, "", True, ["cust-000001"], {"v": "cust-000001"}], ids=repr)
def test_a_reply_with_no_id_at_id_path_fails(written: Any) -> None:
    config = single(id_path="customer.id", contact_path="customer.email")
    customer = {"email": "ann@example.org"} if written is None else {"id": written, "email": "ann@example.org"}
    extraction = read_reply(config, {"customer": customer}, "cust-000001")
    assert extraction.error == INVALID_RESPONSE
    assert extraction.detail == NO_ID
    assert extraction.contact == ""


def test_every_record_results_path_selects_must_carry_the_id() -> None:
    """Records that give the same contact were taken as one customer's; with `id_path` each must be the
    customer asked for."""
    config = single(id_path="id", results_path="results")
    ann = {"id": "cust-000001", "email": "ann@example.org"}
    same_contact = {"results": [ann, {"id": "cust-000002", "email": "ann@example.org"}]}
    assert read_reply(config, same_contact, "cust-000001").detail == ANOTHER
    without_id = {"results": [{"id": "cust-000001", "email": "ann@example.org"}, {"email": "ann@example.org"}]}
    assert read_reply(config, without_id, "cust-000001").detail == NO_ID
    both = {"results": [{"id": "cust-000001", "email": "ann@example.org"}, {"id": "cust-000001", "email": "a@b.org"}]}
    assert read_reply(config, both, "cust-000001").detail == "the reply holds 2 records with different contacts"
    repeated = {"results": [{"id": "cust-000001", "email": "ann@example.org"}] * 2}
    assert read_reply(config, repeated, "cust-000001").contact == "ann@example.org"


def test_without_id_path_a_reply_is_taken_as_before() -> None:
    config = single()
    extraction = read_reply(config, {"id": "cust-000002", "email": "zed@example.org"}, "cust-000001")
    assert not extraction.error
    assert extraction.contact == "zed@example.org"


def test_a_stored_id_path_that_does_not_compile_fails_each_id_rather_than_the_call() -> None:
    """Single-mode configs saved before `id_path` was checked there may hold an expression that does not
    compile: each lookup fails saying so, never with another customer's contact, and never the whole call."""
    config = single(id_path="customer..id")
    extraction = read_reply(config, {"id": "cust-000001", "email": "ann@example.org"}, "cust-000001")
    assert extraction.error == INVALID_RESPONSE
    assert "id_path" in extraction.detail and "not a valid JMESPath expression" in extraction.detail
