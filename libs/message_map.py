"""The short-lived message-ID map: our message ID → campaign, instance, anonymous ID.

Written by the dispatcher before each send (in its admission script, with a TTL), read
by the receipts service to attribute a delivery receipt; not written for a custom HTTP
gateway, which sends no receipts (`connectors.RECEIPTLESS`). Holds no contact:
only IDs that are not PII. The provider's own ID is indexed too, for providers
that do not echo ours, but only as a digest: some provider IDs encode the
recipient (a WhatsApp wamid holds the phone number in base64).

Redis layout (all in the workspace's slot), kept per group of message IDs sent together
(`new_message_ids`: the first GROUP_PART hex digits of an ID are its group's, the rest its own),
as the archive and the unsubscribe links are: a key per message cost Redis a key's bookkeeping, its
expiry and a write of its own for every message sent:
- `ts:{ws}:msgs:<group>` hash: a field per message, its own part = its anonymous ID. TTL
  `message_ttl_seconds`.
- `ts:{ws}:msgbatch:<group>` hash: what every entry of the group shares (campaign, instance,
  channel, connector, provider, trace, send time), kept an hour longer than its entries. A group's
  record never changes, so readers keep the ones they read.
- `ts:{ws}:pmsg:<provider>:<digest of the provider's ID>` = our message ID.

The receipts service keeps what it records of each message beside the group's entries
(services.receipts.ledger). Entries written before groups existed, one `msg:<message_id>` hash each
holding the anonymous ID and `batch` (a `msgbatch:<batch ID>` record's), or every field themselves,
still read; the receipts service records in those hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis

from libs.store import workspace_key
from libs.write_batch import (
    BATCH_RECORD_MARGIN_SECONDS,
    BatchWriter,
    QueuedWrites,
    WriteBatch,
)

T = TypeVar("T")

BATCH_RECORDS_KEPT = 4096  # read batch records a process keeps (a few hundred bytes each)


# Hex digits a group of message IDs share: what a record kept per group is found by.
GROUP_PART = 16
# IDs per group: a hash of one field per message then stays within Redis's compact encoding
# (`hash-max-listpack-entries`, 128 by default), about a third of the bytes of a larger hash's.
IDS_PER_GROUP = 128
_HEX = frozenset("0123456789abcdef")


def new_message_ids(count: int) -> list[str]:
    """One batch's IDs, 32 hex digits each (the shape of a uuid4's hex): 64 random bits drawn once for
    each group of IDS_PER_GROUP, then 64 of each message's own, so no ID tells another. Records kept
    per group rather than per message (the archive, unsubscribe links) find a message's entry from
    its ID alone."""
    half = GROUP_PART // 2
    ids = []
    for first in range(0, max(0, count), IDS_PER_GROUP):
        group = os.urandom(half).hex()
        size = min(IDS_PER_GROUP, count - first)
        pool = os.urandom(half * size).hex()
        ids += [group + pool[i : i + GROUP_PART] for i in range(0, GROUP_PART * size, GROUP_PART)]
    return ids


def is_message_id(value: str) -> bool:
    """Of the shape `new_message_ids` makes (what a group's entries can be found by)."""
    return len(value) == 2 * GROUP_PART and all(c in _HEX for c in value)


def split_message_id(message_id: str) -> tuple[str, str]:
    """(the group's part, the message's own part): the key and the field of a per-group hash."""
    return message_id[:GROUP_PART], message_id[GROUP_PART:]


def by_group(items: Iterable[tuple[str, T]]) -> dict[str, dict[str, T]]:
    """(message ID, value) pairs as {group's part: {message's own part: value}}: a per-group hash each."""
    groups: dict[str, dict[str, T]] = {}
    for message_id, value in items:  # split as `split_message_id` does, inline: twice per message sent
        groups.setdefault(message_id[:GROUP_PART], {})[message_id[GROUP_PART:]] = value
    return groups


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

    @classmethod
    def from_hash(cls, values: dict[bytes, bytes], workspace_id: str, message_id: str) -> MessageRecord:
        """An entry as stored; its workspace and message ID are its key's (older entries repeat them)."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        decoded = {k.decode(): v.decode() for k, v in values.items() if k.decode() in fields}
        decoded["workspace_id"], decoded["message_id"] = workspace_id, message_id
        decoded["channel"] = int(decoded.get("channel", 0))
        decoded["sent_at"] = float(decoded.get("sent_at", 0.0))
        return cls(**decoded)


# What a group's record holds: the entries' keys hold the workspace (its hash tag) and the message ID, and
# each entry its anonymous ID.
_BATCH_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(MessageRecord)
    if f.name not in ("provider_message_id", "workspace_id", "message_id", "anonymous_id")
)


def _stored(record: MessageRecord, name: str, now: str) -> str:
    if name == "sent_at" and not record.sent_at:
        return now
    return str(getattr(record, name))


class MessageMap:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._writes = BatchWriter(redis)
        self._batches: OrderedDict[tuple[str, bytes], dict[bytes, bytes]] = OrderedDict()

    @staticmethod
    def key(workspace_id: str, message_id: str) -> str:
        """An entry from before groups, and what the receipts service records of its message."""
        return workspace_key(workspace_id, "msg", message_id)

    @staticmethod
    def entries_key(workspace_id: str, group: str) -> str:
        return workspace_key(workspace_id, "msgs", group)

    @staticmethod
    def batch_key(workspace_id: str, group: str) -> str:
        """A group's record (or, written before groups, a batch's: `batch` in its entries names it)."""
        return workspace_key(workspace_id, "msgbatch", group)

    @staticmethod
    def provider_key(workspace_id: str, provider: str, provider_message_id: str) -> str:
        digest = hashlib.sha256(provider_message_id.encode()).hexdigest()[:40]
        return workspace_key(workspace_id, "pmsg", provider, digest)

    @property
    def ttl_seconds(self) -> int:
        return self._ttl

    @property
    def batch_ttl_seconds(self) -> int:
        return self._ttl + BATCH_RECORD_MARGIN_SECONDS

    @staticmethod
    def batch_fields(batch: MessageRecord) -> dict[str, str]:
        """A dispatcher batch's record: what its entries share (campaign, connector, trace, send time)."""
        now = str(time.time())
        return {name: _stored(batch, name, now) for name in _BATCH_FIELDS}

    async def put_many(self, records: Iterable[MessageRecord]) -> None:
        """Entries of one workspace, with their provider-ID index entries, as the dispatcher's admission
        writes them (a record per group, a field per message), in one script call per few thousand
        writes; everything expires after the TTL. Messages of one group share their record: they must
        agree on everything but their anonymous ID."""
        records = list(records)
        if not records:
            return
        now = str(time.time())
        workspace_id = records[0].workspace_id
        groups: dict[str, list[MessageRecord]] = {}
        for record in records:
            if not is_message_id(record.message_id):
                raise ValueError("a message ID is 32 hex digits, as new_message_ids makes them")
            if record.workspace_id != workspace_id:
                raise ValueError("the records of one call belong to one workspace")
            groups.setdefault(record.message_id[:GROUP_PART], []).append(record)
        writes = WriteBatch()
        for group, members in groups.items():
            fields = {name: _stored(members[0], name, now) for name in _BATCH_FIELDS}
            if any({name: _stored(m, name, now) for name in _BATCH_FIELDS} != fields for m in members[1:]):
                raise ValueError(f"the messages of group {group} differ in more than their anonymous ID")
            record_key = self.batch_key(workspace_id, group)
            writes.hset(record_key, mapping=fields)
            writes.expire(record_key, self.batch_ttl_seconds)
            entries_key = self.entries_key(workspace_id, group)
            writes.hset(entries_key, mapping={m.message_id[GROUP_PART:]: m.anonymous_id for m in members})
            writes.expire(entries_key, self._ttl)
            for m in members:
                if m.provider_message_id:
                    self.queue_provider_id(writes, workspace_id, m.message_id, m.provider, m.provider_message_id)
        await self._writes.execute(writes)

    def queue_provider_id(
        self,
        pipe: QueuedWrites,
        workspace_id: str,
        message_id: str,
        provider: str,
        provider_message_id: str,
    ) -> None:
        """After the provider answered: the index from (a digest of) its ID to ours."""
        pipe.set(self.provider_key(workspace_id, provider, provider_message_id), message_id, ex=self._ttl)

    def queue_forget(self, pipe: QueuedWrites, workspace_id: str, message_id: str) -> None:
        """A message that was not sent keeps no entry (its group's record expires on its own)."""
        group, own = split_message_id(message_id)
        pipe.hdel(self.entries_key(workspace_id, group), own)

    async def get(self, workspace_id: str, message_id: str) -> MessageRecord | None:
        return (await self.get_many(workspace_id, [message_id]))[message_id]

    async def get_many(self, workspace_id: str, message_ids: Sequence[str]) -> dict[str, MessageRecord | None]:
        """Each message's record, None when unknown or expired: one round trip for the entries (a second
        for those not found in a group, which may have been written before groups) and, for records not
        read before, one for those."""
        ids = list(dict.fromkeys(message_ids))
        if not ids:
            return {}
        # Each message's (record ID, its own fields): a group's ID, or an older entry's `batch`.
        found: dict[str, tuple[bytes | None, dict[bytes, bytes]]] = {}
        grouped = [message_id for message_id in ids if is_message_id(message_id)]
        if grouped:
            async with self._redis.pipeline(transaction=False) as pipe:
                for message_id in grouped:
                    group, own = split_message_id(message_id)
                    pipe.hget(self.entries_key(workspace_id, group), own)
                for message_id, anonymous_id in zip(grouped, await pipe.execute(), strict=True):
                    if anonymous_id is not None:
                        found[message_id] = (message_id[:GROUP_PART].encode(), {b"anonymous_id": anonymous_id})
        older = [message_id for message_id in ids if message_id not in found]
        if older:
            async with self._redis.pipeline(transaction=False) as pipe:
                for message_id in older:
                    pipe.hgetall(self.key(workspace_id, message_id))
                for message_id, values in zip(older, await pipe.execute(), strict=True):
                    if values:
                        found[message_id] = (values.get(b"batch"), values)
        # The records this call uses, held here: keeping the ones it reads (or another call's) may drop
        # the least recently used from the cache before this call is done with them.
        batches: dict[bytes, dict[bytes, bytes]] = {}
        wanted: dict[bytes, None] = {}  # ordered, as the pipeline's replies come back
        for batch_id, _ in found.values():
            if batch_id is None or batch_id in batches or batch_id in wanted:
                continue
            kept = self._batches.get((workspace_id, batch_id))
            if kept is None:
                wanted[batch_id] = None
            else:
                self._batches.move_to_end((workspace_id, batch_id))
                batches[batch_id] = kept
        if wanted:
            async with self._redis.pipeline(transaction=False) as pipe:
                for batch_id in wanted:
                    pipe.hgetall(self.batch_key(workspace_id, batch_id.decode()))
                for batch_id, values in zip(wanted, await pipe.execute(), strict=True):
                    if values:  # a record that is gone is not kept: its entries are gone too
                        batches[batch_id] = values
                        self._keep(workspace_id, batch_id, values)
        records: dict[str, MessageRecord | None] = dict.fromkeys(ids)
        for message_id, (batch_id, values) in found.items():
            if batch_id is not None:
                shared = batches.get(batch_id)
                if shared is None:
                    continue
                values = {**shared, **values}
            records[message_id] = MessageRecord.from_hash(values, workspace_id, message_id)
        return records

    def _keep(self, workspace_id: str, batch_id: bytes, values: dict[bytes, bytes]) -> None:
        self._batches[(workspace_id, batch_id)] = values
        while len(self._batches) > BATCH_RECORDS_KEPT:
            self._batches.popitem(last=False)

    async def find_by_provider_id(
        self, workspace_id: str, provider: str, provider_message_id: str
    ) -> MessageRecord | None:
        message_id = await self._redis.get(self.provider_key(workspace_id, provider, provider_message_id))
        return await self.get(workspace_id, message_id.decode()) if message_id else None
