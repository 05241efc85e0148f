"""Unit tests for services/resolver/validation.py: config defaults and field-named validation errors."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import pytest
from google.protobuf import json_format
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.errors import InvalidArgument
from services.resolver.validation import apply_defaults, validate_oauth_config, validate_pii_api_config

SECRET_HEADER = "sk_live_canary_8c1d"


def single_get(**overrides) -> pb.PiiApiConfig:
    config = pb.PiiApiConfig(
        workspace_id="ws-1",
        channel=common_pb2.CHANNEL_EMAIL,
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url="https://pii.example.com/v1/customers/@anonymous_id",
        headers={"X-Api-Key": SECRET_HEADER},
        query_params={"fields": "email,first_name"},
        contact_path="data.email",
        attribute_paths={"first_name": "data.first_name"},
    )
    for name, value in overrides.items():
        _set(config, name, value)
    return config


def bulk_post(**overrides) -> pb.PiiApiConfig:
    config = pb.PiiApiConfig(
        workspace_id="ws-1",
        channel=common_pb2.CHANNEL_SMS,
        mode=pb.MODE_BULK,
        method=pb.HTTP_METHOD_POST,
        url="https://pii.example.com/v1/customers:batchGet",
        headers={"Authorization": "Bearer " + SECRET_HEADER},
        body='{"ids": "@anonymous_ids", "fields": ["phone"]}',
        contact_path="phone",
        results_path="results",
        id_path="id",
    )
    for name, value in overrides.items():
        _set(config, name, value)
    return config


def _set(config: pb.PiiApiConfig, name: str, value) -> None:
    if name in ("headers", "query_params", "attribute_paths"):
        getattr(config, name).clear()
        getattr(config, name).update(value)
    else:
        setattr(config, name, value)


def validate(config: pb.PiiApiConfig, allow_private: bool = False, prefix: str = "config") -> None:
    apply_defaults(config)
    validate_pii_api_config(config, allow_private, prefix=prefix)


def invalid_field(check: Callable[[], None]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        check()
    error = info.value
    assert error.message.startswith(error.field + ": ")
    assert SECRET_HEADER not in error.message
    return error


# --- apply_defaults ----------------------------------------------------------------------------------


def test_defaults_for_bulk() -> None:
    config = bulk_post()
    apply_defaults(config)
    assert config.batch_size == 500
    assert config.timeout_ms == 5000
    assert config.HasField("max_retries")
    assert config.max_retries == 3


def test_defaults_for_single_leave_batch_size_alone() -> None:
    config = single_get()
    apply_defaults(config)
    assert config.batch_size == 0
    assert config.timeout_ms == 5000
    assert config.max_retries == 3


def test_defaults_keep_explicit_values_including_zero_retries() -> None:
    config = bulk_post(batch_size=50, timeout_ms=1200, max_retries=0)
    apply_defaults(config)
    assert (config.batch_size, config.timeout_ms, config.max_retries) == (50, 1200, 0)
    assert config.HasField("max_retries")


# --- valid configs -------------------------------------------------------------------------------------


def test_valid_single_get_config_passes() -> None:
    validate(single_get())


def test_valid_bulk_post_config_passes() -> None:
    validate(bulk_post())


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": pb.HTTP_METHOD_POST, "url": "https://pii.example.com/lookup", "body": '{"id": "@anonymous_id"}'},
        {"method": pb.HTTP_METHOD_POST, "url": "https://pii.example.com/lookup", "body": "id=@anonymous_id"},
        {"url": "https://pii.example.com/lookup", "query_params": {"id": "@anonymous_id"}},
        {"url": "https://pii.example.com/lookup", "headers": {"X-Customer-Id": "@anonymous_id"}},
        {"timeout_ms": 60_000, "max_retries": 10},
        {"max_retries": 0},
        {"encryption_key": base64.b64encode(bytes([0xFB] * 32)).decode()},
        {"encryption_key": base64.urlsafe_b64encode(bytes([0xFB] * 32)).decode()},
        {"oauth_config_id": "brand-oauth"},
        {"channel": common_pb2.CHANNEL_WHATSAPP},
        {"url": "https://[2606:4700:4700::1111]/v1/@anonymous_id"},
        {"channel": common_pb2.CHANNEL_SMS, "default_region": "US"},
        {"id_path": "data.id"},
    ],
)
def test_valid_single_variants_pass(overrides: dict) -> None:
    validate(single_get(**overrides))


def test_bulk_batch_size_limit_is_inclusive() -> None:
    validate(bulk_post(batch_size=1000))
    validate(bulk_post(batch_size=1))


def test_private_urls_pass_when_allowed() -> None:
    validate(single_get(url="http://127.0.0.1:8099/v1/customers/@anonymous_id"), allow_private=True)
    validate(bulk_post(url="http://localhost:8099/v1/customers:batchGet"), allow_private=True)


# --- invalid configs: each names its field -----------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (single_get(workspace_id=""), "config.workspace_id"),
        (single_get(workspace_id="ws 1/../x"), "config.workspace_id"),
        (single_get(channel=common_pb2.CHANNEL_UNSPECIFIED), "config.channel"),
        (single_get(mode=pb.MODE_UNSPECIFIED), "config.mode"),
        (single_get(method=pb.HTTP_METHOD_UNSPECIFIED), "config.method"),
        (bulk_post(method=pb.HTTP_METHOD_GET), "config.method"),
        # URLs
        (single_get(url=""), "config.url"),
        (single_get(url="http://pii.example.com/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="ftp://pii.example.com/@anonymous_id"), "config.url"),
        (single_get(url="https://127.0.0.1/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://10.0.0.1/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://169.254.169.254/latest/@anonymous_id"), "config.url"),
        # full-width digits: the HTTP client reads 169.254.169.254 and connects without resolving
        (single_get(url="https://\uff11\uff16\uff19.254.169.254/latest/@anonymous_id"), "config.url"),
        (single_get(url="https://[::1]/v1/customers/@anonymous_id"), "config.url"),
        # numeric spellings the resolver reads as 127.0.0.1: refused as the dotted quad is
        (single_get(url="https://127.1/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://2130706433/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://0x7f.1/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://0177.0.0.1/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://localhost/v1/customers/@anonymous_id"), "config.url"),
        (bulk_post(url="https://192.168.1.20/v1/customers:batchGet"), "config.url"),
        (single_get(url="https://user:pass@pii.example.com/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://pii.example.com/v1/customers/ @anonymous_id"), "config.url"),
        (single_get(url="https:///v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://[::1/v1/customers/@anonymous_id"), "config.url"),  # urlsplit refuses it
        (single_get(url="https://pii.example\uff03b@c.com/@anonymous_id"), "config.url"),  # NFKC makes a '#'
        (single_get(url="https://pii.example.com:99999/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://pii.example.com:abc/v1/customers/@anonymous_id"), "config.url"),
        (single_get(url="https://pii.example.com/" + "a" * 2048 + "/@anonymous_id"), "config.url"),
        # limits
        (bulk_post(batch_size=1001), "config.batch_size"),
        (single_get(batch_size=5), "config.batch_size"),
        (single_get(timeout_ms=60_001), "config.timeout_ms"),
        (single_get(max_retries=11), "config.max_retries"),
        (single_get(oauth_config_id="bad id"), "config.oauth_config_id"),
        # bodies and placeholders
        (bulk_post(body='{"ids": []}'), "config.body"),
        (bulk_post(body='{"ids": @anonymous_ids}'), "config.body"),
        (bulk_post(body='{"ids": "@anonymous_ids",}'), "config.body"),
        (bulk_post(url="https://pii.example.com/v1/@anonymous_id/batch"), "config.url"),
        (bulk_post(query_params={"id": "@anonymous_id"}), "config.url"),
        (bulk_post(headers={"X-Id": "@anonymous_id"}), "config.url"),
        (bulk_post(results_path=""), "config.results_path"),
        (bulk_post(id_path=""), "config.id_path"),
        (single_get(url="https://pii.example.com/v1/customers"), "config.url"),
        (single_get(url="https://pii.example.com/v1/customers/@anonymous_ids"), "config.url"),
        (single_get(body='{"id": "@anonymous_id"}'), "config.body"),
        (
            single_get(method=pb.HTTP_METHOD_POST, url="https://pii.example.com/x", body='{"ids": "@anonymous_ids"}'),
            "config.body",
        ),
        (
            single_get(method=pb.HTTP_METHOD_POST, url="https://pii.example.com/x", body='{"id": "@anonymous_id"'),
            "config.body",
        ),
        # paths
        (single_get(contact_path=""), "config.contact_path"),
        (single_get(contact_path="data..email"), "config.contact_path"),
        (single_get(results_path="results[["), "config.results_path"),
        # single mode checks a reply's ID where id_path says, when set: a broken one is refused as bulk's is
        (single_get(id_path="data..id"), "config.id_path"),
        (single_get(attribute_paths={"first_name": "data.[first"}), "config.attribute_paths['first_name']"),
        (single_get(attribute_paths={"first_name": ""}), "config.attribute_paths['first_name']"),
        (single_get(attribute_paths={"first-name": "data.first_name"}), "config.attribute_paths['first-name']"),
        (single_get(attribute_paths={"1st": "data.first_name"}), "config.attribute_paths['1st']"),
        # maps
        (single_get(headers={"X-Api-Key": SECRET_HEADER + "\r\nX-Evil: 1"}), "config.headers['X-Api-Key']"),
        (single_get(headers={"X Api Key": SECRET_HEADER}), "config.headers"),
        # what no HTTP request can carry in a header: saved, it would fail every lookup
        (single_get(headers={"X-Api-Key": SECRET_HEADER + "\x00"}), "config.headers['X-Api-Key']"),
        (bulk_post(headers={"Authorization": "Bearer\x7f" + SECRET_HEADER}), "config.headers['Authorization']"),
        (single_get(headers={"X-Api-Key": SECRET_HEADER, "x-api-key": "other"}), "config.headers"),
        (single_get(query_params={"q": "a\nb"}), "config.query_params['q']"),
        (single_get(headers={f"X-H{i}": "v" for i in range(51)}), "config.headers"),
        # encryption key
        (single_get(encryption_key=base64.b64encode(b"k" * 16).decode()), "config.encryption_key"),
        (single_get(encryption_key=base64.b64encode(b"k" * 33).decode()), "config.encryption_key"),
        (single_get(encryption_key="a"), "config.encryption_key"),
        # default region
        (single_get(default_region="US"), "config.default_region"),  # an Email config
        (bulk_post(default_region="us"), "config.default_region"),
        (bulk_post(default_region="USA"), "config.default_region"),
        (bulk_post(default_region="ZZ"), "config.default_region"),
    ],
)
def test_invalid_config_names_the_field(config: pb.PiiApiConfig, field: str) -> None:
    error = invalid_field(lambda: validate(config))
    assert error.field == field


@pytest.mark.parametrize(
    "config",
    [
        single_get(mode=pb.MODE_UNSPECIFIED),
        single_get(method=pb.HTTP_METHOD_UNSPECIFIED),
        bulk_post(method=pb.HTTP_METHOD_GET),
    ],
)
def test_an_enum_refused_is_told_by_the_names_a_client_sends(config: pb.PiiApiConfig) -> None:
    """grpcurl and every proto JSON client write an enum by its full name (HTTP_METHOD_POST, not POST)."""
    error = invalid_field(lambda: validate(config))
    named = re.findall(r"\b[A-Z][A-Z_]+\b", error.description)
    assert named
    for name in named:
        assert not name.endswith("_UNSPECIFIED")
        json_format.ParseDict({error.field.removeprefix("config."): name}, pb.PiiApiConfig())


def test_header_with_line_break_names_the_headers_field_and_hides_the_value() -> None:
    config = single_get(headers={"X-Api-Key": SECRET_HEADER + "\r\n"})
    error = invalid_field(lambda: validate(config))
    assert "config.headers" in error.field
    assert SECRET_HEADER not in str(error)


def test_a_header_line_pasted_as_its_name_is_refused_without_echoing_the_secret() -> None:
    config = single_get(headers={f"Authorization: Bearer {SECRET_HEADER}": ""})
    error = invalid_field(lambda: validate(config))
    assert error.field == "config.headers"
    assert SECRET_HEADER not in str(error) and SECRET_HEADER not in error.field


def test_bad_encryption_key_error_does_not_echo_the_key() -> None:
    key = base64.b64encode(b"canary-key-16byt").decode()
    error = invalid_field(lambda: validate(single_get(encryption_key=key)))
    assert error.field == "config.encryption_key"
    assert key not in str(error)
    assert "32 bytes" in error.description


def test_zero_timeout_becomes_the_default_and_passes() -> None:
    config = single_get(timeout_ms=0)
    validate(config)
    assert config.timeout_ms == 5000


def test_prefix_is_used_in_the_field_path() -> None:
    error = invalid_field(lambda: validate(single_get(contact_path=""), prefix="target.config"))
    assert error.field == "target.config.contact_path"


def test_validation_without_defaults_rejects_zero_timeout() -> None:
    config = single_get()
    config.max_retries = 3
    error = invalid_field(lambda: validate_pii_api_config(config, False))
    assert error.field == "config.timeout_ms"


# --- OAuth ----------------------------------------------------------------------------------------------


def oauth(**overrides) -> pb.OAuthConfig:
    config = pb.OAuthConfig(
        workspace_id="ws-1",
        oauth_config_id="brand-oauth",
        token_url="https://auth.example.com/oauth/token",
        client_id="tokensend",
        client_secret=SECRET_HEADER,
        scope="customers:read",
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def test_valid_oauth_config_passes() -> None:
    validate_oauth_config(oauth(), allow_private=False)
    validate_oauth_config(oauth(token_url="http://127.0.0.1:8099/token"), allow_private=True)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (oauth(workspace_id=""), "config.workspace_id"),
        (oauth(oauth_config_id=""), "config.oauth_config_id"),
        (oauth(token_url=""), "config.token_url"),
        (oauth(token_url="https://127.0.0.1/token"), "config.token_url"),
        (oauth(token_url="https://10.1.2.3/token"), "config.token_url"),
        (oauth(token_url="https://10.1/token"), "config.token_url"),
        (oauth(token_url="http://auth.example.com/token"), "config.token_url"),
        (oauth(client_id=""), "config.client_id"),
        (oauth(client_secret=""), "config.client_secret"),
        (oauth(client_secret=SECRET_HEADER + "\n"), "config.client_secret"),
        (oauth(scope="a\r\nb"), "config.scope"),
        (oauth(audience="x" * 1025), "config.audience"),
    ],
)
def test_invalid_oauth_config_names_the_field(config: pb.OAuthConfig, field: str) -> None:
    error = invalid_field(lambda: validate_oauth_config(config, allow_private=False))
    assert error.field == field


@pytest.mark.parametrize(
    ("config", "field", "said"),
    [
        (oauth(client_id="token\x00send"), "config.client_id", "printable ASCII"),
        (oauth(client_id="token\tsend"), "config.client_id", "printable ASCII"),
        (oauth(client_id="tok\u00e9nsend"), "config.client_id", "printable ASCII"),
        (oauth(scope="customers:read\x00"), "config.scope", "control characters"),
        (oauth(scope="customers:read\tprofile"), "config.scope", "control characters"),
        (oauth(audience="https://api.example.com\x1b"), "config.audience", "control characters"),
        (oauth(audience="api\u2028"), "config.audience", "control characters"),
        (oauth(client_secret="s3cret\x00"), "config.client_secret", "control characters"),
    ],
)
def test_an_oauth_value_a_token_endpoint_cannot_take_is_refused_unquoted(config, field, said) -> None:
    """RFC 6749: a client_id is VSCHARs, a scope tokens separated by spaces; none of them, nor the audience or
    the secret, holds a control character, which would go as such into the token request."""
    error = invalid_field(lambda: validate_oauth_config(config, allow_private=False))
    assert error.field == field
    assert said in error.description
    assert "send" not in str(error) and "read" not in str(error) and "s3cret" not in str(error)


def test_oauth_values_with_spaces_and_urls_pass() -> None:
    validate_oauth_config(
        oauth(
            client_id="my client (prod) #1",
            scope="openid customers:read api://crm/.default https://x.example/read",
            audience="https://api.example.com/customers",
        ),
        allow_private=False,
    )
    validate_oauth_config(oauth(audience="kunden-api-\u00e9"), allow_private=False)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.1", "0177.0.0.1", "0x7f000001", "0xa9fea9fe"])
def test_a_numeric_spelling_of_a_private_address_is_refused_as_the_address_is(host: str) -> None:
    """The resolver reads `127.1` as 127.0.0.1: the save says so, as it does for the dotted quad, and
    lets it through where private networks are allowed."""
    expected = invalid_field(lambda: validate(single_get(url="https://127.0.0.1/v1/customers/@anonymous_id")))
    error = invalid_field(lambda: validate(single_get(url=f"https://{host}/v1/customers/@anonymous_id")))
    assert (error.field, error.description) == (expected.field, expected.description)
    validate(single_get(url=f"http://{host}:8099/v1/customers/@anonymous_id"), allow_private=True)
