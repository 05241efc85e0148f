"""A blind index from phone numbers to anonymous IDs, so an inbound STOP can be matched without storing numbers.

When the dispatcher sends an SMS or WhatsApp message through a connector whose
replies reach the receipts service (`connectors.INBOUND`) it writes
`HMAC-SHA256(workspace key, E.164 number)` → anonymous ID with a TTL. When a
customer replies STOP, the receipts service computes the same HMAC of the
sender's number and finds the anonymous ID. The number itself is never stored
or logged; the workspace key is derived from `TOKENSEND_SECRET_KEY` with HKDF
and the workspace ID, so no key is stored and workspaces' digests differ.
A WhatsApp sender's `wa_id` may spell the number otherwise than it was sent (Brazil's
ninth digit, Mexico's old `1`, Argentina's mobile `9`): a lookup tries each spelling,
so sends write one link as before. Limits are spelled out in docs/suppressions.md.

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
# WhatsApp's spellings of a number: Brazil's mobiles with or without the ninth digit (+55, area code,
# [9], eight digits), Mexico's with or without the "1" once dialled before a mobile (+52 [1] ten digits).
_BRAZIL = re.compile(r"\+55([1-9][0-9])(9?)([0-9]{8})")
_MEXICO = re.compile(r"\+52(1?)([0-9]{10})")
_BRAZIL_MOBILE_FIRST_DIGITS = "6789"  # of the eight digits a mobile had before the ninth; landlines start 2-5
# Argentina's mobiles with or without the "9" that marks a mobile in international form (+54 [9], ten
# digits: area code and number): wa_id 549AAXXXXXXXX for a number stored as +54AAXXXXXXXX.
_ARGENTINA = re.compile(r"\+54(9?)([1-9][0-9]{9})")
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


def whatsapp_spellings(value: str) -> list[str]:
    """The number a WhatsApp sender (`wa_id`) may have been sent to, as `normalize_number` spells it,
    most likely first: the number itself, then, for Brazil, Mexico and Argentina, the form with the ninth
    digit, the "1" or the "9" added or removed. A `wa_id` may lack the ninth digit a Brazilian mobile was
    sent with (55AAXXXXXXXX for +55AA9XXXXXXXX), carry the "1" a Mexican one was not (521... for +52...),
    or the "9" an Argentine one was not (549AAXXXXXXXX for +54AAXXXXXXXX)."""
    text = value.strip().removeprefix("whatsapp:").replace(" ", "").removeprefix("+")
    mexico = _MEXICO.fullmatch("+" + text)
    # phonenumbers finds +521 and ten digits impossible (Mexico dropped the 1 in 2019): read it by hand.
    e164 = "+" + text if mexico and mexico.group(1) else normalize_number(value)
    if e164 is None:
        return []
    spellings = [e164]
    mexico = _MEXICO.fullmatch(e164)
    if mexico:
        spellings.append(f"+52{mexico.group(2)}" if mexico.group(1) else f"+521{mexico.group(2)}")
    brazil = _BRAZIL.fullmatch(e164)
    if brazil:
        area, ninth, local = brazil.groups()
        # Either way only a mobile older than the ninth digit: 9 then 1-5 without the nine is a landline's.
        if local[0] in _BRAZIL_MOBILE_FIRST_DIGITS:
            spellings.append(f"+55{area}{local}" if ninth else f"+55{area}9{local}")
    argentina = _ARGENTINA.fullmatch(e164)
    if argentina:
        nine, national = argentina.groups()
        # Only where the "9" form is a mobile (an area code and a mobile's length): not 0800, 0600 ...
        if _argentine_mobile(f"+549{national}"):
            spellings.append(f"+54{national}" if nine else f"+549{national}")
    return spellings


def _argentine_mobile(e164: str) -> bool:
    number = phonenumbers.parse(e164, None)
    return phonenumbers.number_type(number) == phonenumbers.PhoneNumberType.MOBILE


def spellings(family: str, number: str) -> list[str]:
    """The E.164 forms an inbound sender of `family` is looked up under: WhatsApp's several, else one."""
    if family == "whatsapp":
        return whatsapp_spellings(number)
    e164 = normalize_number(number)
    return [e164] if e164 is not None else []


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

    def _digests(self, workspace_id: str, numbers: list[str]) -> list[str]:
        """Each number's digest under every listed key, the current key's first."""
        return [_hex_digest(key, e164) for key in self._workspace_keys(workspace_id) for e164 in numbers]

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
        numbers = spellings(family, number)
        if not numbers or self._ttl <= 0:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            # Every spelling's: only the one linked exists, and EXPIRE leaves a missing key missing.
            for digest in self._digests(workspace_id, numbers):
                pipe.expire(self.key(workspace_id, family, digest), self._ttl)
            await pipe.execute()

    async def lookup(self, workspace_id: str, family: str, number: str) -> str | None:
        """The anonymous ID last sent to `number` (any spelling a provider uses) in this family, if still linked."""
        numbers = spellings(family, number)
        if not numbers:
            return None
        # While the secret key rotates, entries written under the previous key still match. One round
        # trip for every spelling under every key (a workspace's keys share its slot).
        keys = [self.key(workspace_id, family, digest) for digest in self._digests(workspace_id, numbers)]
        found = next((value for value in await self._redis.mget(keys) if value), None)
        return found.decode() if found else None
