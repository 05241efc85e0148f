"""A Test reply shows what the API answered, but never a secret of the config it quotes back: a long one
wherever it is written, a short one wherever it stands whole, in each form a reply may quote it."""

from __future__ import annotations

import json

import pytest
from tokensend.resolver.v1.resolver_service_pb2 import PiiApiConfig

from libs.masked_secrets import MASK, masked_reply, quoted_forms
from services.resolver.configs import keep_masked_secrets, masked_pii_config
from services.resolver.configs import tested_config_secrets as secrets_of_a_test

SHORT = "k3y"  # an API key of a few characters: real ones exist
LONG = "api-s3cret-key-1"


def shown(text: str, *secrets: str) -> str:
    """`text` as the Test screen shows it when the config holds `secrets`."""
    return masked_reply(text, quoted_forms(secrets))


@pytest.mark.parametrize(
    ("reply", "masked"),
    [
        ('{"x_api_key": "k3y"}', f'{{"x_api_key": "{MASK}"}}'),  # a JSON string's value
        ('{"k3y": 1}', f'{{"{MASK}": 1}}'),  # a key
        ("GET /v1/customers?key=k3y&id=7", f"GET /v1/customers?key={MASK}&id=7"),  # a query value
        ("Authorization: Bearer k3y\r\n", f"Authorization: Bearer {MASK}\r\n"),  # a header value
        ("refused: k3y", f"refused: {MASK}"),  # at the end
        ("k3y is not a key", f"{MASK} is not a key"),  # at the start
        ("k3y_", f"{MASK}_"),  # an underscore is no letter or digit
    ],
)
def test_a_short_secret_standing_whole_is_masked(reply: str, masked: str) -> None:
    assert shown(reply, SHORT) == masked


def test_a_short_secret_inside_a_longer_word_or_number_is_left() -> None:
    reply = '{"monk3y": "k3yboard", "id": "ak3y1", "n": 10}'
    assert shown(reply, SHORT, "1") == reply


@pytest.mark.parametrize(
    ("secret", "reply", "masked"),
    [
        ("t+5", '{"query": "tenant=t%2B5"}', f'{{"query": "tenant={MASK}"}}'),  # percent-encoded
        ("t 5", '{"query": "tenant=t+5&a=b"}', f'{{"query": "tenant={MASK}&a=b"}}'),  # a form's plus for a space
        ("t+5", '{"next": "%3Ftenant%3Dt%2B5%26a"}', f'{{"next": "%3Ftenant%3D{MASK}%26a"}}'),  # after an escape
        ('k"1', json.dumps({"echo": 'k"1'}), f'{{"echo": "{MASK}"}}'),  # escaped in a JSON string
        ("ké1", json.dumps({"echo": "ké1"}), f'{{"echo": "{MASK}"}}'),  # as \\u00e9
        ("k1", json.dumps({"echo": "a=\nk1"}), f'{{"echo": "a=\\n{MASK}"}}'),  # after an escape
        ("k1", json.dumps({"echo": "&k1"}, ensure_ascii=True).replace("&", "\\u0026"), f'{{"echo": "\\u0026{MASK}"}}'),
    ],
)
def test_a_short_secret_is_masked_in_every_form_a_reply_quotes_it(secret: str, reply: str, masked: str) -> None:
    assert shown(reply, secret) == masked


def test_a_long_secret_is_masked_wherever_it_is_written_as_before() -> None:
    assert shown(f"x{LONG}y and {LONG.upper()}", LONG) == f"x{MASK}y and {LONG.upper()}"
    encoded = "api-s3cret%2Bkey"
    assert shown(f"?k={encoded}1", "api-s3cret+key") == f"?k={MASK}1"


def test_a_short_secret_that_is_part_of_a_long_one_leaves_nothing_of_either() -> None:
    assert shown(f"{LONG} {SHORT}", LONG, SHORT) == f"{MASK} {MASK}"
    assert shown("a k3y, b", "k3y", "k3y, b and more") == f"a {MASK}, b"


def test_a_short_secret_without_a_letter_or_digit_is_left_rather_than_every_such_mark() -> None:
    reply = '{"a": "-", "b": "/"}'
    assert shown(reply, "-", "/", "") == reply


@pytest.mark.parametrize(
    ("header", "reply"),
    [
        ("Bearer tok-s3cr3t-abc123", '{"error": "token tok-s3cr3t-abc123 has expired"}'),  # the token alone
        ("Token k3y", '{"error": "unknown key k3y"}'),  # a short one, standing whole
        ("Basic dXNlcjpwYXNzd29yZDEyMw==", '{"error": "bad credentials dXNlcjpwYXNzd29yZDEyMw=="}'),
        ("Basic dXNlcjpwYXNzd29yZDEyMw==", '{"error": "user:password123 refused"}'),  # decoded
        ("Basic dXNlcjpwYXNzd29yZDEyMw==", '{"error": "password password123 is wrong"}'),  # its password
    ],
)
def test_the_credentials_of_an_authorization_header_quoted_without_their_scheme_are_masked(
    header: str, reply: str
) -> None:
    config = PiiApiConfig(url="https://api.example/v1/customers/@anonymous_id", headers={"Authorization": header})
    shown_reply = masked_reply(reply, secrets_of_a_test(config))
    assert MASK in shown_reply
    for part in ("tok-s3cr3t-abc123", "k3y", "dXNlcjpwYXNzd29yZDEyMw==", "password123"):
        assert part not in shown_reply


def test_a_secret_of_an_authorization_header_written_again_into_the_body_reads_masked_and_is_kept() -> None:
    config = PiiApiConfig(
        workspace_id="ws-1",
        url="https://api.example/v1/customers",
        headers={"Authorization": "Bearer tok-s3cr3t-abc123"},
        body='{"ids": "@anonymous_ids", "auth": "tok-s3cr3t-abc123"}',
    )
    read = masked_pii_config(config)
    assert "tok-s3cr3t-abc123" not in str(read)
    keep_masked_secrets(read, config)
    assert read.body == config.body and read.headers["Authorization"] == "Bearer tok-s3cr3t-abc123"
