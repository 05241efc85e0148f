"""The short-lived message-ID map: our message ID → campaign, instance, anonymous ID.

Written by the dispatcher for every sent message (pipelined, with a TTL), read
by the receipts service to attribute a delivery receipt. Holds no contact:
only IDs that are not PII. The provider's own ID is indexed too, for providers
that do not echo ours, but only as a digest: some provider IDs encode the
recipient (a WhatsApp wamid holds the phone number in base64).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from libs.store import workspace_key


def new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class MessageRecord:
    message_id: str
    workspace_id: str
    campaign_id: str
    campaign_instance_id: str
    anonymous_id: str
    channel: int
    connector_id: str
    provider: str
    provider_message_id: str = ""
    trace_id: str = ""  # the send's trace (hex), so a receipt's span can link back to it
    span_id: str = ""
    sent_at: float = 0.0

    def to_hash(self) -> dict[str, str]:
        """The stored form: the provider's own ID is left out (it may encode the recipient)."""
        # Field by field rather than dataclasses.asdict (a deep copy): this runs for every message sent.
        return {name: str(getattr(self, name)) for name in _STORED_FIELDS}

    @classmethod
    def from_hash(cls, values: dict[bytes, bytes]) -> MessageRecord:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        decoded = {k.decode(): v.decode() for k, v in values.items() if k.decode() in fields}
        decoded["channel"] = int(decoded.get("channel", 0))
        decoded["sent_at"] = float(decoded.get("sent_at", 0.0))
        return cls(**decoded)


_STORED_FIELDS = tuple(f.name for f in dataclasses.fields(MessageRecord) if f.name != "provider_message_id")


# HSET + EXPIRE for a batch of entries in one command. ARGV: ttl, field count n, the n field names,
# then n values per key in KEYS order.
_PUT_SCRIPT = """
local unpack = unpack or table.unpack
local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local base = 2 + n
for i, key in ipairs(KEYS) do
  local args = {}
  local row = base + (i - 1) * n
  for j = 1, n do
    args[2 * j - 1] = ARGV[2 + j]
    args[2 * j] = ARGV[row + j]
  end
  redis.call('HSET', key, unpack(args))
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""
ENTRIES_PER_SCRIPT = 500


class MessageMap:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._put = redis.register_script(_PUT_SCRIPT)

    @staticmethod
    def key(workspace_id: str, message_id: str) -> str:
        return workspace_key(workspace_id, "msg", message_id)

    @staticmethod
    def provider_key(workspace_id: str, provider: str, provider_message_id: str) -> str:
        digest = hashlib.sha256(provider_message_id.encode()).hexdigest()[:40]
        return workspace_key(workspace_id, "pmsg", provider, digest)

    async def put_many(self, records: Iterable[MessageRecord], index_provider_ids: bool = True) -> None:
        """The entries written by a script (one command per 500 entries rather than two per entry),
        provider-ID index entries pipelined; everything expires after the TTL."""
        now = str(time.time())
        keys: list[str] = []
        values: list[str] = []
        index: list[tuple[str, str]] = []
        for record in records:
            stored = record.to_hash()
            if not record.sent_at:
                stored["sent_at"] = now
            keys.append(self.key(record.workspace_id, record.message_id))
            values.extend(stored[name] for name in _STORED_FIELDS)
            if index_provider_ids and record.provider_message_id:
                index.append(
                    (
                        self.provider_key(record.workspace_id, record.provider, record.provider_message_id),
                        record.message_id,
                    )
                )
        width = len(_STORED_FIELDS)
        # Called directly, not queued: a cluster pipeline cannot carry a script.
        for start in range(0, len(keys), ENTRIES_PER_SCRIPT):
            chunk = keys[start : start + ENTRIES_PER_SCRIPT]
            rows = values[start * width : (start + len(chunk)) * width]
            await self._put(keys=chunk, args=[self._ttl, width, *_STORED_FIELDS, *rows])
        if index:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, message_id in index:
                    pipe.set(key, message_id, ex=self._ttl)
                await pipe.execute()

    def queue_provider_id(
        self,
        pipe: aioredis.client.Pipeline,
        workspace_id: str,
        message_id: str,
        provider: str,
        provider_message_id: str,
    ) -> None:
        """After the provider answered: the index from (a digest of) its ID to ours."""
        pipe.set(self.provider_key(workspace_id, provider, provider_message_id), message_id, ex=self._ttl)

    def queue_forget(self, pipe: aioredis.client.Pipeline, workspace_id: str, message_id: str) -> None:
        """A message that was not sent keeps no entry."""
        pipe.delete(self.key(workspace_id, message_id))

    async def get(self, workspace_id: str, message_id: str) -> MessageRecord | None:
        values = await self._redis.hgetall(self.key(workspace_id, message_id))
        return MessageRecord.from_hash(values) if values else None

    async def find_by_provider_id(
        self, workspace_id: str, provider: str, provider_message_id: str
    ) -> MessageRecord | None:
        message_id = await self._redis.get(self.provider_key(workspace_id, provider, provider_message_id))
        return await self.get(workspace_id, message_id.decode()) if message_id else None
