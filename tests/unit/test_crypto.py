"""Unit tests for libs/crypto.py (secrets at rest) and the secret-key check in libs/settings.py."""

from __future__ import annotations

import base64
import hmac
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.crypto import SealedDataInvalid, SecretBox, SecretKeyMissing
from libs.derived_keys import KeyedHmac
from libs.settings import CommonSettings, ResolverSettings, invalid_settings

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
AD = b"ws-1:pii_api_config:email:headers"


def urlsafe(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def test_round_trip() -> None:
    box = SecretBox([KEY_A])
    plaintext = b"sk_live_51Hx-very-secret"
    assert box.open(box.seal(plaintext, AD), AD) == plaintext


def test_round_trip_of_empty_and_binary_values() -> None:
    box = SecretBox([KEY_A])
    for plaintext in (b"", bytes(range(256)), "Zoë ☃".encode()):
        assert box.open(box.seal(plaintext, AD), AD) == plaintext


def test_each_seal_differs_and_hides_the_plaintext() -> None:
    box = SecretBox([KEY_A])
    plaintext = b"hunter2-hunter2-hunter2"
    sealed = {box.seal(plaintext, AD) for _ in range(20)}
    assert len(sealed) == 20, "a fresh nonce each time"
    for value in sealed:
        assert plaintext not in value
        assert b"hunter2" not in value
        assert len(value) > len(plaintext)


def test_wrong_associated_data_does_not_open() -> None:
    box = SecretBox([KEY_A])
    sealed = box.seal(b"secret", AD)
    with pytest.raises(SealedDataInvalid):
        box.open(sealed, b"ws-2:pii_api_config:email:headers")
    with pytest.raises(SealedDataInvalid):
        box.open(sealed, b"")


@pytest.mark.parametrize("position", [0, 1, 5, 17, -1])
def test_any_tampered_byte_does_not_open(position: int) -> None:
    box = SecretBox([KEY_A])
    sealed = bytearray(box.seal(b"secret value", AD))
    sealed[position] ^= 0x01
    with pytest.raises(SealedDataInvalid):
        box.open(bytes(sealed), AD)


def test_truncated_or_garbage_input_does_not_open() -> None:
    box = SecretBox([KEY_A])
    sealed = box.seal(b"secret value", AD)
    for bad in (b"", b"\x01", sealed[:20], b"not sealed at all, just some bytes here"):
        with pytest.raises(SealedDataInvalid):
            box.open(bad, AD)


def test_unknown_key_id_does_not_open() -> None:
    sealed = SecretBox([KEY_B]).seal(b"secret", AD)
    with pytest.raises(SealedDataInvalid, match="unknown key"):
        SecretBox([KEY_A]).open(sealed, AD)


def test_error_text_never_holds_the_secret() -> None:
    box = SecretBox([KEY_A])
    sealed = box.seal(b"hunter2", AD)
    with pytest.raises(SealedDataInvalid) as info:
        box.open(sealed, b"other")
    assert "hunter2" not in str(info.value)


def test_key_rotation_opens_old_and_seals_with_new() -> None:
    old_box = SecretBox([KEY_A])
    sealed_by_old = old_box.seal(b"old secret", AD)

    rotated = SecretBox([KEY_B, KEY_A])  # [new, old]
    assert rotated.open(sealed_by_old, AD) == b"old secret"

    sealed_by_new = rotated.seal(b"new secret", AD)
    assert SecretBox([KEY_B]).open(sealed_by_new, AD) == b"new secret"
    with pytest.raises(SealedDataInvalid):
        old_box.open(sealed_by_new, AD)


@pytest.mark.parametrize("keys", [[], [b"short"], [KEY_A, b"x" * 31], [b"x" * 33]])
def test_box_refuses_keys_that_are_not_32_bytes(keys: list[bytes]) -> None:
    with pytest.raises(ValueError):
        SecretBox(keys)


def test_from_settings_refuses_without_a_key_outside_dev_mode() -> None:
    with pytest.raises(SecretKeyMissing):
        SecretBox.from_settings(ResolverSettings(secret_key=None, dev_mode=False))


def test_from_settings_uses_a_throwaway_key_in_dev_mode() -> None:
    box = SecretBox.from_settings(ResolverSettings(secret_key=None, dev_mode=True))
    assert box.open(box.seal(b"secret", AD), AD) == b"secret"
    other = SecretBox.from_settings(ResolverSettings(secret_key=None, dev_mode=True))
    with pytest.raises(SealedDataInvalid):
        other.open(box.seal(b"secret", AD), AD)


@pytest.mark.parametrize("encode", [urlsafe, lambda k: urlsafe(k).rstrip("=")], ids=["padded", "unpadded"])
def test_from_settings_uses_the_configured_key(encode) -> None:
    key = os.urandom(32)
    box = SecretBox.from_settings(ResolverSettings(secret_key=encode(key)))
    sealed = box.seal(b"secret", AD)
    assert SecretBox([key]).open(sealed, AD) == b"secret"
    assert box.open(SecretBox([key]).seal(b"other", AD), AD) == b"other"


@pytest.mark.parametrize(
    "value",
    [urlsafe(b"x" * 16), urlsafe(b"x" * 31), urlsafe(b"x" * 33), urlsafe(b"x" * 64), "not base64 at all!!"],
)
def test_settings_reject_a_secret_key_that_is_not_32_bytes(value: str) -> None:
    with pytest.raises(ValidationError) as info:
        ResolverSettings(secret_key=value)
    said = invalid_settings(info.value)  # the line a service stops with
    assert said.startswith("TOKENSEND_SECRET_KEY: must ") and value not in said


def test_settings_reject_a_short_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSEND_SECRET_KEY", urlsafe(b"k" * 24))
    with pytest.raises(ValidationError):
        CommonSettings()


def test_settings_accept_a_32_byte_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("TOKENSEND_SECRET_KEY", urlsafe(key))
    settings = ResolverSettings()
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == urlsafe(key)
    assert urlsafe(key) not in repr(settings), "the key is a SecretStr, hidden from repr"


def test_settings_treat_an_empty_key_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSEND_SECRET_KEY", "")
    monkeypatch.delenv("TOKENSEND_DEV_MODE", raising=False)
    settings = ResolverSettings()
    assert settings.secret_key is None
    with pytest.raises(SecretKeyMissing):
        SecretBox.from_settings(settings)


@settings(max_examples=200, deadline=None)
@given(key=st.binary(max_size=100), message=st.binary(max_size=300))
def test_a_keyed_hmac_gives_the_standard_hmac_sha256(key, message):
    """Tokens and digests made before it was keyed once still verify and still match."""
    keyed = KeyedHmac(key)
    assert keyed.digest(message) == hmac.digest(key, message, "sha256")
    assert keyed.digest(message) == keyed.digest(message)  # the keyed state is copied, never used up
