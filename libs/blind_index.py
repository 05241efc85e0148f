"""A blind index from phone numbers to anonymous IDs, so an inbound STOP can be matched without storing numbers.

When the dispatcher sends an SMS or WhatsApp message through a connector whose
replies reach the receipts service (`connectors.INBOUND`) it writes
`HMAC-SHA256(workspace key, E.164 number)` → anonymous ID with a TTL. When a
customer replies STOP, the receipts service computes the same HMAC of the
sender's number and finds the anonymous ID. The number itself is never stored
or logged; the workspace key is derived from `TOKENSEND_SECRET_KEY` with HKDF
and the workspace ID, so no key is stored and workspaces' digests differ.
Limits are spelled out in docs/suppressions.md.

Redis layout:
- `ts:{ws}:bidx:<family>:<hex digest>` = anonymous ID, TTL `blind_index_ttl_seconds`
  (refreshed by every send to that number, and by the number's STOP).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import phonenumbers
import redis.asyncio as aioredis
from pydantic import SecretStr

from libs.derived_keys import KeyedHmac, derive_key, master_keys
from libs.store import workspace_key
from libs.write_batch import QueuedWrites

PURPOSE = b"tokensend blind index v1"
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_MAX_CACHED_KEYS = 1024


def normalize_number(value: str) -> str | None:
    """E.164 from what providers send (`+447700900123`, `whatsapp:+44...`, WhatsApp's `447700900123`)."""
    text = value.strip().removeprefix("whatsapp:").replace(" ", "")
    if not text:
        return None
    if not text.startswith("+"):
        text = "+" + text
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def sent_number(contact: str) -> str | None:
    """The number a message went to, in the form `normalize_number` gives. The resolver hands over
    numbers it validated and formatted as E.164, which need no second parse (a fifth of the cost)."""
    return contact if _E164.fullmatch(contact) else normalize_number(contact)


def _hex_digest(key: KeyedHmac, e164: str) -> str:
    return key.digest(e164.encode()).hex()


class BlindIndex:
    def __init__(self, redis: aioredis.Redis, secret_key: SecretStr | None, ttl_seconds: int = 0) -> None:
        self._redis = redis
        self._masters = master_keys(secret_key)
        self._ttl = ttl_seconds
        self._keys: OrderedDict[str, list[KeyedHmac]] = OrderedDict()

    def _workspace_keys(self, workspace_id: str) -> list[KeyedHmac]:
        keys = self._keys.get(workspace_id)
        if keys is None:
            keys = [KeyedHmac(derive_key(master, PURPOSE, workspace_id.encode())) for master in self._masters]
            self._keys[workspace_id] = keys
            while len(self._keys) > _MAX_CACHED_KEYS:
                self._keys.popitem(last=False)
        return keys

    def digest(self, workspace_id: str, e164: str) -> str:
        """Under the current key (the first secret key)."""
        return _hex_digest(self._workspace_keys(workspace_id)[0], e164)

    def _digests(self, workspace_id: str, e164: str) -> list[str]:
        return [_hex_digest(key, e164) for key in self._workspace_keys(workspace_id)]

    @staticmethod
    def key(workspace_id: str, family: str, digest: str) -> str:
        return workspace_key(workspace_id, "bidx", family, digest)

    def queue_link(self, pipe: QueuedWrites, workspace_id: str, family: str, digest: str, anonymous_id: str) -> None:
        """After a send: the number's digest points at the recipient for the TTL (the last send wins)."""
        if self._ttl > 0:
            pipe.set(self.key(workspace_id, family, digest), anonymous_id, ex=self._ttl)

    async def renew(self, workspace_id: str, family: str, number: str) -> None:
        """The link of a number that just opted out lives the TTL again: no send refreshes it while
        the customer is suppressed, and their START must still find them."""
        e164 = normalize_number(number)
        if e164 is None or self._ttl <= 0:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for digest in self._digests(workspace_id, e164):
                pipe.expire(self.key(workspace_id, family, digest), self._ttl)
            await pipe.execute()

    async def lookup(self, workspace_id: str, family: str, number: str) -> str | None:
        """The anonymous ID last sent to `number` (any spelling a provider uses) in this family, if still linked."""
        e164 = normalize_number(number)
        if e164 is None:
            return None
        # While the secret key rotates, entries written under the previous key still match.
        for digest in self._digests(workspace_id, e164):
            found = await self._redis.get(self.key(workspace_id, family, digest))
            if found:
                return found.decode()
        return None
