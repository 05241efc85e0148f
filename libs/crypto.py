"""Secrets at rest: AES-256-GCM under `TOKENSEND_SECRET_KEY`.

Sealed format: b"\\x01" | key id (4 bytes, from SHA-256 of the key) | nonce (12) |
ciphertext+tag. The key id lets several keys coexist while secrets are re-encrypted.
Associated data binds a sealed value to the record it belongs to, so a ciphertext
copied under another key name does not open.

Operators tell keys apart by `key_id_of` (8 hex digits derived with HKDF, as `python -m libs.rekey
--key-ids` prints them), never by the key or the in-format key id, which is a plain hash of the key.
"""

from __future__ import annotations

import hashlib
import logging
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from libs.derived_keys import derive_key
from libs.settings import CommonSettings

log = logging.getLogger(__name__)

_VERSION = b"\x01"


class SecretKeyMissing(RuntimeError):
    """Raised at startup when no secret key is set outside dev mode."""


class SealedDataInvalid(Exception):
    """A sealed value did not open: wrong key, wrong record or tampered. `record` is the associated data it
    was opened with: the Redis key of the record, which names the config for the operator to fix."""

    def __init__(self, message: str, record: bytes = b"") -> None:
        super().__init__(message)
        self.record = record.decode("utf-8", "replace")


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"tokensend-key-id" + key).digest()[:4]


def key_id_of(key: bytes) -> str:
    """A key's public ID for reports and logs: 8 hex digits of a key derived from it with HKDF (its own
    purpose), so it tells nothing about the key and matches no other use of it."""
    return derive_key(key, b"tokensend key id for operators").hex()[:8]


class SecretBox:
    """Seals and opens secrets; the first key seals, every key opens."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) != 32 for k in keys):
            raise ValueError("SecretBox needs 32-byte keys")
        self._sealing = (_key_id(keys[0]), AESGCM(keys[0]))
        self._opening = {_key_id(k): AESGCM(k) for k in keys}
        self._public_ids = {_key_id(k): key_id_of(k) for k in keys}
        self.key_ids = [key_id_of(k) for k in keys]  # public IDs in the order configured: the sealing key's first

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> SecretBox:
        if settings.secret_key is None:
            if not settings.dev_mode:
                raise SecretKeyMissing(
                    "TOKENSEND_SECRET_KEY is not set; set it (32 random bytes, urlsafe base64) "
                    "or TOKENSEND_DEV_MODE=true for a throwaway key"
                )
            log.warning("dev mode: secrets are sealed with a throwaway key and unreadable after a restart")
            return cls([os.urandom(32)])
        return cls(settings.secret_keys())

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        key_id, aead = self._sealing
        nonce = os.urandom(12)
        return _VERSION + key_id + nonce + aead.encrypt(nonce, plaintext, associated_data)

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        if len(sealed) < 1 + 4 + 12 + 16 or sealed[:1] != _VERSION:
            raise SealedDataInvalid("not a sealed value", associated_data)
        aead = self._opening.get(sealed[1:5])
        if aead is None:
            raise SealedDataInvalid("sealed with an unknown key", associated_data)
        try:
            return aead.decrypt(sealed[5:17], sealed[17:], associated_data)
        except InvalidTag as exc:
            raise SealedDataInvalid("sealed value does not open", associated_data) from exc

    def looks_sealed(self, value: bytes) -> bool:
        """Has the shape of a sealed value (it may still not open)."""
        return len(value) >= 1 + 4 + 12 + 16 and value[:1] == _VERSION

    def is_current(self, sealed: bytes) -> bool:
        """Sealed under the first (sealing) key: nothing for a re-encryption to do."""
        return self.looks_sealed(sealed) and sealed[1:5] == self._sealing[0]

    def sealed_under(self, sealed: bytes) -> str | None:
        """The public ID of the configured key `sealed` names (whether it opens or not), None for another key."""
        return self._public_ids.get(sealed[1:5]) if self.looks_sealed(sealed) else None

    def reseal(self, sealed: bytes, associated_data: bytes) -> bytes:
        """The same secret sealed under the first key; SealedDataInvalid when it does not open."""
        return self.seal(self.open(sealed, associated_data), associated_data)
