"""Unit tests for services/resolver/extraction.py: selection, leaf paths, key decoding, decryption; and what
a record's contact path selects."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from sandbox.pii_api import encrypt_value
from services.resolver.extraction import (
    ValueDecryptionFailed,
    as_text,
    decode_key,
    decrypt_value,
    leaf_paths,
    path_error,
    select,
)
from services.resolver.pii_client import PiiApiClient

KEY = bytes(range(32))

DOCUMENT = {
    "data": {
        "customer": {"email": "alice@example.com", "phones": [{"number": "+447400123456"}, {"number": "+12025550123"}]},
        "results": [{"id": "a1", "email": "a1@example.com"}, {"id": "a2", "email": "a2@example.com"}],
    }
}


# --- select / path_error -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("data.customer.email", "alice@example.com"),
        ("data.customer.phones[0].number", "+447400123456"),
        ("data.customer.phones[1].number", "+12025550123"),
        ("data.customer.phones[-1].number", "+12025550123"),
        ("data.results[*].id", ["a1", "a2"]),
        ("data.results[?id=='a2'].email | [0]", "a2@example.com"),
        ("data.customer.missing", None),
        ("data.customer.phones[5].number", None),
    ],
)
def test_select(path: str, expected) -> None:
    assert select(path, DOCUMENT) == expected


@pytest.mark.parametrize("bad", ["data..email", "data[", "a.b[?", "[0", "foo bar"])
def test_path_error_for_bad_expressions(bad: str) -> None:
    reason = path_error(bad)
    assert reason is not None
    assert "not a valid JMESPath" in reason


@pytest.mark.parametrize("good", ["email", "data.customer.phones[0].number", '"first-name"', "results[*].id"])
def test_path_error_is_none_for_good_expressions(good: str) -> None:
    assert path_error(good) is None


# --- as_text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("", ""),
        (42, "42"),
        (0, "0"),
        (1.5, "1.5"),
        # JSON has one number type: an integral float is that integer (a phone number in a float column).
        (447400123456.0, "447400123456"),
        (1.0, "1"),
        (-3.0, "-3"),
        (2.0**53, "9007199254740992.0"),  # beyond the integers a float holds exactly: as Python writes it
        (1e300, "1e+300"),
        (True, "true"),
        (False, "false"),
        (None, None),
        ({"a": [1, "é"], "b": None}, '{"a":[1,"é"],"b":null}'),
        ([1, 2], "[1,2]"),
    ],
)
def test_as_text(value, expected) -> None:
    assert as_text(value) == expected


# --- leaf_paths -------------------------------------------------------------------------------------


def test_leaf_paths_of_nested_dicts_and_lists() -> None:
    document = {"id": "a1", "profile": {"email": "x@example.com", "name": {"first": "Al"}}, "tags": [{"k": "v"}]}
    assert leaf_paths(document) == ["id", "profile.email", "profile.name.first", "tags[0].k"]


def test_leaf_paths_of_empty_containers_and_scalars() -> None:
    assert leaf_paths({"list": [], "obj": {}}) == ["list", "obj"]
    assert leaf_paths({}) == []
    assert leaf_paths([]) == []
    assert leaf_paths(["x"]) == ["[0]"]
    assert leaf_paths("scalar") == ["@"]
    assert leaf_paths([[{"a": 1}]]) == ["[0][0].a"]


def test_leaf_paths_quote_odd_keys_and_select_the_right_value() -> None:
    document = {
        "first-name": "Alice",
        "contact info": {"e.mail": "alice@example.com"},
        "2fa": True,
        "é": "accent",
        "items": [{"x-y": 7}],
        "": "empty key",
        "first": "decoy",  # would be picked if the dash were read as a minus
    }
    paths = leaf_paths(document)
    assert '"first-name"' in paths
    assert '"contact info"."e.mail"' in paths
    expected = {
        '"first-name"': "Alice",
        '"contact info"."e.mail"': "alice@example.com",
        '"2fa"': True,
        "first": "decoy",
    }
    for path, value in expected.items():
        assert select(path, document) == value
    # every produced path is valid and selects a leaf of the document
    leaves = {json.dumps(v) for v in ("Alice", "alice@example.com", True, "accent", 7, "empty key", "decoy")}
    assert len(paths) == len(leaves)
    for path in paths:
        assert path_error(path) is None, path
        assert json.dumps(select(path, document)) in leaves, path
    assert {json.dumps(select(p, document)) for p in paths} == leaves


# --- decode_key ------------------------------------------------------------------------------------


def test_decode_key_standard_base64() -> None:
    key = bytes([0xFB, 0xFF] * 16)  # encodes with '+' and '/'
    encoded = base64.b64encode(key).decode()
    assert "+" in encoded or "/" in encoded
    assert decode_key(encoded) == key
    assert decode_key(encoded.rstrip("=")) == key
    assert decode_key(f"  {encoded}\n") == key


def test_decode_key_urlsafe_base64() -> None:
    key = bytes([0xFB, 0xFF] * 16)
    encoded = base64.urlsafe_b64encode(key).decode()
    assert "-" in encoded or "_" in encoded
    assert decode_key(encoded) == key
    assert decode_key(encoded.rstrip("=")) == key


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33, 64])
def test_decode_key_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        decode_key(base64.b64encode(os.urandom(length)).decode())


def test_decode_key_not_base64() -> None:
    with pytest.raises(ValueError):
        decode_key("a")


# --- decrypt_value ---------------------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", ["alice@example.com", "+447400123456", "Zoë ☃", ""])
def test_decrypt_round_trip_with_the_sandbox_encryption(plaintext: str) -> None:
    assert decrypt_value(AESGCM(KEY), encrypt_value(KEY, plaintext)) == plaintext


def test_decrypt_tolerates_surrounding_whitespace() -> None:
    assert decrypt_value(AESGCM(KEY), f" {encrypt_value(KEY, 'x@example.com')}\n") == "x@example.com"


def test_decrypt_with_a_key_decoded_from_config_text() -> None:
    key = os.urandom(32)
    aead = AESGCM(decode_key(base64.urlsafe_b64encode(key).decode()))
    assert decrypt_value(aead, encrypt_value(key, "bob@example.com")) == "bob@example.com"


def test_decrypt_bad_base64() -> None:
    with pytest.raises(ValueDecryptionFailed, match="not base64"):
        decrypt_value(AESGCM(KEY), "alice@example.com")


def test_decrypt_too_short() -> None:
    with pytest.raises(ValueDecryptionFailed, match="too short"):
        decrypt_value(AESGCM(KEY), base64.b64encode(b"x" * 27).decode())


def test_decrypt_wrong_key() -> None:
    sealed = encrypt_value(bytes(32), "alice@example.com")
    with pytest.raises(ValueDecryptionFailed) as info:
        decrypt_value(AESGCM(KEY), sealed)
    assert "alice" not in str(info.value)


def test_decrypt_tampered_value() -> None:
    raw = bytearray(base64.b64decode(encrypt_value(KEY, "alice@example.com")))
    raw[14] ^= 0x01
    with pytest.raises(ValueDecryptionFailed):
        decrypt_value(AESGCM(KEY), base64.b64encode(bytes(raw)).decode())


def test_decryption_failure_is_a_value_error() -> None:
    assert issubclass(ValueDecryptionFailed, ValueError)


def test_a_path_that_cannot_apply_to_a_records_values_finds_nothing() -> None:
    """`length(name)` on a record whose name is a number is a type error inside JMESPath: one record's
    values, not a reason to fail every ID read with it."""
    assert select("length(name)", {"name": 5}) is None
    assert select("length(name)", {"name": "Ann"}) == 3
    deep: list = []
    for _ in range(990):
        deep = [deep]
    assert select("to_string(items)", {"items": deep}) is None  # nested deeper than can be written out


def test_a_path_nested_too_deeply_is_refused_as_a_bad_expression() -> None:
    assert path_error("!" * 500 + "a") == "is not a valid JMESPath expression (ExpressionTooDeep)"
    assert path_error("!a") is None


def test_a_value_nested_too_deeply_to_write_out_is_no_value() -> None:
    deep: list = []
    for _ in range(990):
        deep = [deep]
    assert as_text(deep) is None
    assert as_text([[1]]) == "[[1]]"


@pytest.mark.parametrize(
    ("channel", "value", "reason"),
    [
        (common_pb2.CHANNEL_EMAIL, ["jade@example.org", "jade.evans@example.org"], "contact_path selected a list"),
        (common_pb2.CHANNEL_SMS, ["+447400123456"], "contact_path selected a list"),
        (common_pb2.CHANNEL_EMAIL, {"primary": "jade@example.org"}, "contact_path selected an object"),
        (common_pb2.CHANNEL_EMAIL, [], "contact_path matched nothing"),
    ],
)
def test_a_contact_path_selecting_several_values_says_so_without_quoting_them(channel, value, reason) -> None:
    """A list of addresses, or an object holding one, is no contact: the detail tells the path to mend,
    not that an address is malformed."""
    config = rpb.PiiApiConfig(channel=channel, contact_path="contact")
    reply = rpb.ResolveContactsResponse()
    PiiApiClient._add_records(config, channel, ["cust-1"], {"cust-1": {"contact": value}}, 200, 1, reply.contacts, {})
    error = reply.contacts[0].error
    assert error.code == rpb.RESOLVE_ERROR_CODE_INVALID_CONTACT
    assert error.detail.startswith(reason)
    for part in ("jade", "example", "7400"):
        assert part not in error.detail
