"""The message archive: what reconstructs a sent message, never what it said to whom.

For each sent message the archive keeps the content template (once per content
hash), the recipient's non-PII campaign attributes, the names of the fetched
fields, the channel, connector, topic and the PII and content API config
versions; never a fetched value. `ReconstructMessage` fetches the PII again
with those versions and renders the message exactly as it was sent; every
reconstruction is appended to an audit stream (who, when, which message, a
reason code: no PII).

Redis layout (all in the workspace's slot), per group of up to 128 messages (the message IDs'
first half, `libs.message_map.new_message_ids`), TTL `archive_retention_seconds`:
- `ts:{ws}:archive:entries:<group>` hash: each message's own part of its ID → a JSON list of its
  own fields (the anonymous ID, the recipient's attributes), in the order the record names.
  Small enough for Redis's compact encoding: about 60 bytes a message, where a key and an
  expiry per message cost about 217 for the archive's 90 days.
- `ts:{ws}:archive:batch:<group>` hash: what the group's entries share (campaign, connector,
  config versions, send time...) and `_own`, the names of the fields each entry holds
- `ts:{ws}:archive:content:<sha256>` the serialized `Content`, TTL refreshed by each batch that uses it
- `ts:{ws}:audit:reconstruct` stream, trimmed to about `audit_stream_maxlen` entries
- `ts:{ws}:audit:rate:<minute>:<client>` counter of a client's reconstructions in a minute, TTL 2 minutes

Entries written before still load until they expire: `ts:{ws}:archive:msg:<message_id>` hashes,
holding every field, or their own and `batch`, the ID of an `archive:batch:` record as above.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import redis.asyncio as aioredis
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.guard import calling_client
from libs.json_documents import dump
from libs.message_map import by_group, split_message_id
from libs.store import workspace_key
from libs.write_batch import QueuedWrites, common_fields

OWN = "_own"  # the batch record's field naming what each entry holds, in order


@dataclass
class ArchiveEntry:
    message_id: str
    workspace_id: str
    campaign_id: str
    campaign_instance_id: str
    anonymous_id: str
    channel: int
    connector_id: str
    provider: str
    content_hash: str
    topic: str = ""
    pii_config_version: int = 0
    content_api_versions: dict[str, int] = field(default_factory=dict)
    recipient: dict[str, str] = field(default_factory=dict)  # the campaign's own attributes: not PII
    fetched_fields: list[str] = field(default_factory=list)  # names only
    sent_at_ms: int = 0
    unsubscribe_expires_at: int = 0  # rebuilds the same List-Unsubscribe token

    _JSON = ("content_api_versions", "recipient", "fetched_fields")
    _INT = ("channel", "pii_config_version", "sent_at_ms", "unsubscribe_expires_at")

    # orjson: the standard library's encoder, built anew by each call that sets separators, took
    # 5.5-8.5 µs a message where orjson takes 1.2-2.0. Read back with json.loads either way.
    def stored(self, name: str) -> str:
        return _stored(name, getattr(self, name))

    @classmethod
    def from_hash(cls, values: dict[bytes, bytes]) -> ArchiveEntry:
        known = {f.name for f in dataclasses.fields(cls)}
        decoded: dict[str, object] = {}
        for raw_key, raw_value in values.items():
            name, text = raw_key.decode(), raw_value.decode()
            if name not in known:
                continue
            if name in cls._JSON:
                decoded[name] = json.loads(text)
            elif name in cls._INT:
                decoded[name] = int(text or 0)
            else:
                decoded[name] = text
        return cls(**decoded)


class ArchivedMessage(NamedTuple):
    """A sent message's own part of its archive entry; the rest is its batch's."""

    message_id: str
    anonymous_id: str
    recipient: dict[str, str]
    fetched_fields: list[str]
    unsubscribe_expires_at: int


def _stored(name: str, value: object) -> str:
    return dump(value).decode() if name in ArchiveEntry._JSON else str(value)


# A message's own fields that a group's messages may still all share; the rest is the batch's.
_ALIKE_CANDIDATES = ("recipient", "fetched_fields", "unsubscribe_expires_at")
_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(ArchiveEntry) if f.name not in ArchivedMessage._fields)


def content_hash(content: pb.Content) -> str:
    return hashlib.sha256(content.SerializeToString(deterministic=True)).hexdigest()


class MessageArchive:
    def __init__(self, redis: aioredis.Redis, retention_seconds: int, audit_maxlen: int = 1_000_000) -> None:
        self._redis = redis
        self._retention = max(0, retention_seconds)
        self._audit_maxlen = max(1, audit_maxlen)

    @property
    def enabled(self) -> bool:
        return self._retention > 0

    @property
    def retention_days(self) -> float:
        return self._retention / 86400

    @staticmethod
    def entries_key(workspace_id: str, group_part: str) -> str:
        return workspace_key(workspace_id, "archive", "entries", group_part)

    @staticmethod
    def key(workspace_id: str, message_id: str) -> str:
        """An entry written one key per message, before the entries hash (still read)."""
        return workspace_key(workspace_id, "archive", "msg", message_id)

    @staticmethod
    def batch_key(workspace_id: str, batch_id: str) -> str:
        """What a group's entries share; `batch_id` is the group, or a record ID of entries written
        one key per message."""
        return workspace_key(workspace_id, "archive", "batch", batch_id)

    @staticmethod
    def content_key(workspace_id: str, digest: str) -> str:
        return workspace_key(workspace_id, "archive", "content", digest)

    @staticmethod
    def audit_key(workspace_id: str) -> str:
        return workspace_key(workspace_id, "audit", "reconstruct")

    async def count_reconstruction(self, workspace_id: str) -> tuple[int, float]:
        """Counts a reconstruction by the calling client in this minute: the count so far, this one
        included, and the seconds until the next minute."""
        now = time.time()
        minute = int(now // 60)
        key = workspace_key(workspace_id, "audit", "rate", str(minute), calling_client.get())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = await pipe.execute()
        return int(count), (minute + 1) * 60 - now

    def queue_content(self, pipe: QueuedWrites, workspace_id: str, digest: str, content: pb.Content) -> None:
        """Once per batch: the template, kept as long as the newest message that used it."""
        key = self.content_key(workspace_id, digest)
        pipe.set(key, content.SerializeToString(deterministic=True), ex=self._retention)

    def queue_entries(self, writes: QueuedWrites, batch: ArchiveEntry, messages: Sequence[ArchivedMessage]) -> None:
        """One batch's entries, by group of message IDs: what a group's entries all share once in its
        record, then each entry's own. `batch` holds what a batch's messages share (campaign,
        connector, config versions, send time...); its per-message fields are not read. A
        per-message field alike across a group (the same attributes, say) goes in the record too."""
        shared = {name: batch.stored(name) for name in _BATCH_FIELDS}
        for group_part, group in by_group((m.message_id, m) for m in messages).items():
            first = next(iter(group.values()))
            alike = common_fields(list(group.values()), _ALIKE_CANDIDATES, unique="anonymous_id")
            if "recipient" in alike:
                # Equal attributes in another order stay each message's own: a template walking them wrote that order.
                order = list(first.recipient)
                if any(list(m.recipient) != order for m in group.values()):
                    alike.remove("recipient")
            own = ["anonymous_id", *(name for name in _ALIKE_CANDIDATES if name not in alike)]
            record = {
                **shared,
                **{name: _stored(name, getattr(first, name)) for name in alike},
                OWN: dump(own).decode(),
            }
            key = self.batch_key(batch.workspace_id, group_part)
            writes.hset(key, mapping=record)
            writes.expire(key, self._retention)
            key = self.entries_key(batch.workspace_id, group_part)
            if own == ["anonymous_id"]:  # the usual group, whose messages differ only by recipient: no lookups by name
                entries = {own_part: dump([m.anonymous_id]).decode() for own_part, m in group.items()}
            else:
                entries = {
                    own_part: dump([_stored(name, getattr(m, name)) for name in own]).decode()
                    for own_part, m in group.items()
                }
            writes.hset(key, mapping=entries)
            writes.expire(key, self._retention)

    async def load(self, workspace_id: str, message_id: str) -> tuple[ArchiveEntry, pb.Content | None] | None:
        group_part, own_part = split_message_id(message_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.entries_key(workspace_id, group_part), own_part)
            pipe.hgetall(self.batch_key(workspace_id, group_part))
            pipe.hgetall(self.key(workspace_id, message_id))
            own, shared, values = await pipe.execute()
        if own is not None and OWN.encode() in shared:
            names = json.loads(shared.pop(OWN.encode()))
            values = {
                **shared,
                **{name.encode(): value.encode() for name, value in zip(names, json.loads(own), strict=True)},
            }
        elif values and b"batch" in values:
            shared = await self._redis.hgetall(self.batch_key(workspace_id, values[b"batch"].decode()))
            if not shared:
                return None  # the batch's record is gone: the entry is past its retention too
            values = {**shared, **values}
        if not values:
            return None
        entry = ArchiveEntry.from_hash({**values, b"message_id": message_id.encode()})
        raw = await self._redis.get(self.content_key(workspace_id, entry.content_hash))
        return entry, (pb.Content.FromString(raw) if raw is not None else None)

    async def audit(
        self, workspace_id: str, message_id: str, anonymous_id: str, requested_by: str, reason: str, outcome: str
    ) -> str:
        """Appends who reconstructed which message, when and why; returns the entry's stream ID."""
        entry_id = await self._redis.xadd(
            self.audit_key(workspace_id),
            {
                "at_ms": str(int(time.time() * 1000)),
                "message_id": message_id,
                "anonymous_id": anonymous_id,
                "requested_by": requested_by,
                "reason": reason,
                "outcome": outcome,
                "client": calling_client.get(),
            },
            maxlen=self._audit_maxlen,
            approximate=True,
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def audit_page(self, workspace_id: str, after: str, count: int) -> tuple[list[AuditEntry], str]:
        """Up to `count` audit entries after the entry ID `after` ("" for the oldest kept), oldest first,
        and the ID to continue after ("" when this page is the last)."""
        start = f"({after}" if after else "-"
        raw = await self._redis.xrange(self.audit_key(workspace_id), min=start, max="+", count=count + 1)
        entries = [AuditEntry.from_stream(entry_id, fields) for entry_id, fields in raw[:count]]
        return entries, (entries[-1].audit_id if len(raw) > count else "")


@dataclass(frozen=True)
class AuditEntry:
    """One reconstruction: IDs and codes only, as `MessageArchive.audit` wrote them."""

    audit_id: str
    at_ms: int
    message_id: str
    anonymous_id: str
    requested_by: str
    reason: str
    outcome: str
    client: str = ""  # the authenticated client that asked ("" without authentication, or before it was kept)

    @classmethod
    def from_stream(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> AuditEntry:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            audit_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            at_ms=int(text.get("at_ms") or 0),
            message_id=text.get("message_id", ""),
            anonymous_id=text.get("anonymous_id", ""),
            requested_by=text.get("requested_by", ""),
            reason=text.get("reason", ""),
            outcome=text.get("outcome", ""),
            client=text.get("client", ""),
        )
