"""A PII API saying "no such customer" in JSON (null where the record is) is NOT_FOUND; a record that is
there without a contact stays INVALID_CONTACT, and a path that finds nothing is a path to mend."""

from __future__ import annotations

from typing import Any

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver.extraction import null_record, record_steps
from services.resolver.pii_client import Extraction, PiiApiClient, _Paths

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode


def single(**fields: Any) -> pb.PiiApiConfig:
    values: dict[str, Any] = dict(
        workspace_id="ws-1",
        channel=EMAIL,
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url="https://pii.example.com/v1/customers/@anonymous_id",
        contact_path="customer.email",
        attribute_paths={"first_name": "customer.first"},
    )
    values.update(fields)
    return pb.PiiApiConfig(**values)


def read_reply(config: pb.PiiApiConfig, document: Any, anonymous_id: str = "cust-1") -> Extraction:
    paths = _Paths.of(config)
    record = PiiApiClient._single_record(
        config, document, anonymous_id, paths, lambda r: PiiApiClient._extract(config, EMAIL, r, paths)
    )
    return record if type(record) is Extraction else PiiApiClient._extract(config, EMAIL, record, paths)


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("email", ()),
        ("customer.email", ("customer",)),
        ("data.customers[0].email", ("data", "customers", 0)),
        ("customer.emails[0]", ("customer",)),
        ("customer.emails[?primary].address | [0]", ("customer",)),
        ('customer."e-mail"', ("customer",)),
        ("customer.email || customer.alt", ()),
        ("@", ()),
        ("", ()),
    ],
)
def test_the_record_a_contact_path_reads_from(path: str, steps: tuple) -> None:
    assert record_steps(path) == steps


def test_null_where_the_record_is_is_told_by_the_configs_names_not_missing_fields() -> None:
    steps = ("data", "customers", 0)
    assert null_record(None, steps) == "the reply is null"
    assert null_record({"data": None}, steps) == "null at data"
    assert null_record({"data": {"customers": None}}, steps) == "null at data.customers"
    assert null_record({"data": {"customers": []}}, steps) == "an empty list at data.customers"
    assert null_record({"data": {"customers": [None]}}, steps) == "null at data.customers[0]"
    for present in ({}, {"data": {}}, {"data": "x"}, {"data": {"customers": [{}]}}, {"data": {"customers": {}}}):
        assert null_record(present, steps) is None, present
    assert null_record({"a-b": None}, ("a-b",)) == 'null at "a-b"'
    assert null_record({"items": []}, ("items",)) is None
    assert null_record({"items": []}, ("items",), empty_list=True) == "an empty list at items"
    assert null_record([], (0,)) == "the reply is an empty list"


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        (None, "the API has no record for this ID (the reply is null)"),
        ({"customer": None}, "the API has no record for this ID (null at customer)"),
    ],
    ids=["reply-null", "record-null"],
)
@pytest.mark.parametrize("id_path", ["", "customer.id"], ids=["no-id-path", "id-path"])
def test_a_null_record_is_not_found(document: Any, detail: str, id_path: str) -> None:
    extraction = read_reply(single(id_path=id_path), document)
    assert (extraction.error, extraction.detail) == (E.RESOLVE_ERROR_CODE_NOT_FOUND, detail)


@pytest.mark.parametrize(
    "document",
    [{"customer": {"email": None}}, {"customer": {"email": ""}}, {"customer": {}}, {"customer": {"email": "  "}}],
)
def test_a_record_present_without_its_contact_is_still_an_invalid_contact(document: Any) -> None:
    assert read_reply(single(), document).error == E.RESOLVE_ERROR_CODE_INVALID_CONTACT


def test_a_reply_without_the_field_its_path_names_is_a_path_to_mend_not_no_record() -> None:
    extraction = read_reply(single(), {"custmer": {"email": "ann@example.org"}})
    assert extraction.error == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
    assert extraction.detail == "contact_path matched nothing"


@pytest.mark.parametrize(
    ("document", "code", "detail"),
    [
        ({"results": None}, E.RESOLVE_ERROR_CODE_NOT_FOUND, "the API has no record for this ID (null at results)"),
        (
            {"results": []},
            E.RESOLVE_ERROR_CODE_NOT_FOUND,
            "the API has no record for this ID (results_path selected an empty list)",
        ),
        ({"results": [None]}, E.RESOLVE_ERROR_CODE_NOT_FOUND, "the API has no record for this ID (the reply is null)"),
        (None, E.RESOLVE_ERROR_CODE_NOT_FOUND, "the API has no record for this ID (the reply is null)"),
        ({"result": []}, E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, "results_path matched nothing"),
    ],
)
def test_results_path_selecting_no_record(document: Any, code: int, detail: str) -> None:
    config = single(results_path="results", contact_path="email", attribute_paths={})
    extraction = read_reply(config, document)
    assert (extraction.error, extraction.detail) == (code, detail)


def test_a_filter_over_no_items_is_no_record() -> None:
    config = single(results_path="results[?kind=='primary'] | [0]", contact_path="email", attribute_paths={})
    extraction = read_reply(config, {"results": []})
    assert extraction.error == E.RESOLVE_ERROR_CODE_NOT_FOUND


def test_a_bulk_record_whose_customer_is_null_is_not_found_and_one_without_a_contact_invalid() -> None:
    config = pb.PiiApiConfig(channel=EMAIL, mode=pb.MODE_BULK, contact_path="customer.email", id_path="id")
    records = {
        "a": {"id": "a", "customer": None},
        "b": {"id": "b", "customer": {"email": None}},
        "c": {"id": "c", "customer": {"email": "c@example.org"}},
    }
    reply = pb.ResolveContactsResponse()
    errors: dict[int, int] = {}
    PiiApiClient._add_records(config, EMAIL, ["a", "b", "c", "d"], records, 200, 1, reply.contacts, errors)
    a, b, c, d = reply.contacts
    assert (a.error.code, a.error.detail) == (
        E.RESOLVE_ERROR_CODE_NOT_FOUND,
        "the API has no record for this ID (null at customer)",
    )
    assert b.error.code == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
    assert c.contact == "c@example.org"
    assert d.error.code == E.RESOLVE_ERROR_CODE_NOT_FOUND


def test_a_reply_with_no_items_where_the_record_is_taken_from_is_not_found() -> None:
    config = single(contact_path="[0].email", attribute_paths={})
    extraction = read_reply(config, [])
    assert (extraction.error, extraction.detail) == (
        E.RESOLVE_ERROR_CODE_NOT_FOUND,
        "the API has no record for this ID (the reply is an empty list)",
    )
    config = single(contact_path="data.customers[0].email", attribute_paths={})
    extraction = read_reply(config, {"data": {"customers": []}})
    assert extraction.detail == "the API has no record for this ID (an empty list at data.customers)"


def test_null_items_beside_the_customer_s_record_leave_it_found() -> None:
    config = single(results_path="results", id_path="id")
    for beside in (None, {"customer": None}):
        document = {"results": [{"id": "cust-1", "customer": {"email": "jade@example.org"}}, beside]}
        extraction = read_reply(config, document)
        assert (extraction.error, extraction.contact) == (0, "jade@example.org")


def test_only_null_items_are_not_found_and_a_record_without_an_id_still_is_a_reply_to_mend() -> None:
    config = single(results_path="results", id_path="id")
    nothing = read_reply(config, {"results": [None, None]})
    assert (nothing.error, nothing.detail) == (
        E.RESOLVE_ERROR_CODE_NOT_FOUND,
        "the API has no record for this ID (a null record at results_path)",
    )
    no_id = read_reply(config, {"results": [None, {"customer": {"email": "jade@example.org"}}]})
    assert (no_id.error, no_id.detail) == (E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, "the reply holds no ID at id_path")


def test_a_null_object_inside_a_customer_present_is_a_record_without_a_contact() -> None:
    config = single(contact_path="customer.contact.email", attribute_paths={"first_name": "customer.first"})
    present = read_reply(config, {"customer": {"id": "cust-1", "first": "Jade", "contact": None}})
    assert present.error == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
    absent = read_reply(config, {"customer": None})
    assert absent.error == E.RESOLVE_ERROR_CODE_NOT_FOUND


@pytest.mark.parametrize(
    "document",
    [
        {"data": None, "errors": [{"message": "internal error"}]},
        {"data": {"customer": None}, "errors": [{"message": "timeout"}]},
        {"customer": None, "error": "backend unavailable"},
    ],
)
def test_a_reply_holding_an_error_is_no_answer_that_the_customer_is_absent(document) -> None:
    """A GraphQL API answers 200 with null data and its errors beside it: the API failed, it did not say no."""
    config = single(contact_path="data.customer.email" if "data" in document else "customer.email")
    assert read_reply(config, document).error != E.RESOLVE_ERROR_CODE_NOT_FOUND


def test_a_bulk_reply_holding_an_error_is_not_every_id_not_found() -> None:
    config = single(mode=pb.MODE_BULK, method=pb.HTTP_METHOD_POST, results_path="data.results", id_path="id")
    extract = lambda r: PiiApiClient._extract(config, EMAIL, r)  # noqa: E731
    assert PiiApiClient._records_by_id(config, {"data": None}, extract) == {}  # null where the list is: no records
    assert PiiApiClient._records_by_id(config, {"data": None, "errors": [{"message": "boom"}]}, extract) is None
