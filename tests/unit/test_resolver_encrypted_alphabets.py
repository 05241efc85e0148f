"""Encrypted values in either base64 alphabet, padded or not: what Java's and JavaScript's encoders write
(`Base64.getUrlEncoder().withoutPadding()`, `base64url`) decrypts as standard padded base64 does."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.resolver.extraction import ValueDecryptionFailed, decrypt_value

KEY = os.urandom(32)
PLAINTEXT = "zoë.o'brien+news@example.org"


def sealed(plaintext: str = PLAINTEXT, nonce: bytes | None = None) -> bytes:
    nonce = nonce or os.urandom(12)
    return nonce + AESGCM(KEY).encrypt(nonce, plaintext.encode(), None)


def with_both_alphabets_and_padding(raw_length: int) -> bytes:
    """A sealed value whose base64 holds '+' and '/' (so '-' and '_' URL-safe) and needs padding."""
    for _ in range(10_000):
        raw = sealed("x" * (raw_length - 28))
        text = base64.b64encode(raw).decode()
        if "+" in text and "/" in text and text.endswith("="):
            return raw
    raise AssertionError("no such value found")


@pytest.mark.parametrize("raw_length", [40, 41])  # padded with "==" and "="
@pytest.mark.parametrize(
    "encode",
    [
        lambda raw: base64.b64encode(raw).decode(),
        lambda raw: base64.b64encode(raw).decode().rstrip("="),
        lambda raw: base64.urlsafe_b64encode(raw).decode(),
        lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("="),
        lambda raw: f" {base64.urlsafe_b64encode(raw).decode().rstrip('=')}\n",
    ],
    ids=["standard", "standard-unpadded", "urlsafe", "urlsafe-unpadded", "urlsafe-unpadded-spaced"],
)
def test_either_alphabet_padded_or_not_decrypts(encode, raw_length: int) -> None:
    raw = with_both_alphabets_and_padding(raw_length)
    assert decrypt_value(AESGCM(KEY), encode(raw)) == "x" * (raw_length - 28)


def test_a_realistic_value_in_each_form() -> None:
    raw = sealed()
    for text in (
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ):
        assert decrypt_value(AESGCM(KEY), text) == PLAINTEXT


@pytest.mark.parametrize(
    "text",
    [
        "alice@example.com",  # plain text: '@' and '.' are in neither alphabet
        "+447400123456",  # 13 characters: a length no base64 has, padded or not
        "abc+def-ghi_jkl/",  # both alphabets at once
        "YWJj=ZGVm",  # padding in the middle
        "Zm9v YmFy",  # a space inside
        "zoë",
    ],
)
def test_what_is_not_base64_in_either_alphabet_still_fails(text: str) -> None:
    with pytest.raises(ValueDecryptionFailed, match="not base64"):
        decrypt_value(AESGCM(KEY), text)


def test_a_tampered_urlsafe_value_does_not_decrypt() -> None:
    raw = bytearray(sealed())
    raw[14] ^= 0x01
    with pytest.raises(ValueDecryptionFailed, match="does not decrypt") as info:
        decrypt_value(AESGCM(KEY), base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="))
    assert "zo" not in str(info.value)


def test_an_unpadded_value_too_short_to_hold_a_nonce_and_tag_says_so() -> None:
    with pytest.raises(ValueDecryptionFailed, match="too short"):
        decrypt_value(AESGCM(KEY), base64.urlsafe_b64encode(b"\xfb" * 26).decode().rstrip("="))
