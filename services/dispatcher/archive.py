"""The message archive: what reconstructs a sent message, never what it said to whom.

For each sent message the archive keeps the content template (once per content
hash), the recipient's non-PII campaign attributes, the names of the fetched
fields, the channel, connector, topic and the PII and content API config
versions; never a fetched value. `ReconstructMessage` fetches the PII again
with those versions and renders the message exactly as it was sent; every
reconstruction is appended to an audit stream (who, when, which message, a
reason code: no PII).

Redis layout (all in the workspace's slot):
- `ts:{ws}:archive:msg:<message_id>` hash: the entry's own fields (the anonymous ID, the
  recipient's attributes; the message ID is the key's) and `batch`, TTL `archive_retention_seconds`
- `ts:{ws}:archive:batch:<batch_id>` hash: the fields every entry of a batch shares (campaign,
  connector, config versions, send time...), once per batch, kept an hour longer than its entries
- `ts:{ws}:archive:content:<sha256>` the serialized `Content`, TTL refreshed by each batch that uses it
- `ts:{ws}:audit:reconstruct` stream, trimmed to about `audit_stream_maxlen` entries

Entries written before batch records existed hold every field themselves and still load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.store import workspace_key
from libs.write_batch import QueuedWrites, WriteBatch, common_fields


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

    def stored(self, name: str) -> str:
        value = getattr(self, name)
        return json.dumps(value, separators=(",", ":")) if name in self._JSON else str(value)

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


_FIELDS = tuple(f.name for f in dataclasses.fields(ArchiveEntry))


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
    def key(workspace_id: str, message_id: str) -> str:
        return workspace_key(workspace_id, "archive", "msg", message_id)

    @staticmethod
    def batch_key(workspace_id: str, batch_id: str) -> str:
        return workspace_key(workspace_id, "archive", "batch", batch_id)

    @staticmethod
    def content_key(workspace_id: str, digest: str) -> str:
        return workspace_key(workspace_id, "archive", "content", digest)

    @staticmethod
    def audit_key(workspace_id: str) -> str:
        return workspace_key(workspace_id, "audit", "reconstruct")

    def queue_content(self, pipe: QueuedWrites, workspace_id: str, digest: str, content: pb.Content) -> None:
        """Once per batch: the template, kept as long as the newest message that used it."""
        key = self.content_key(workspace_id, digest)
        pipe.set(key, content.SerializeToString(deterministic=True), ex=self._retention)

    def queue_entries(self, writes: WriteBatch, entries: list[ArchiveEntry]) -> None:
        """One batch's entries of one workspace. The fields they all share (campaign, connector,
        config versions...) are stored once, in the batch's record; each entry's hash holds its own
        fields and the record's ID. Kept for months, the shared fields were most of the archive."""
        if not entries:
            return
        first = entries[0]
        shared = common_fields(entries, _FIELDS, unique="message_id")
        own = [name for name in _FIELDS if name not in shared and name != "message_id"]  # the key holds it
        block = writes.share_record(
            lambda batch_id: self.batch_key(first.workspace_id, batch_id),
            {name: first.stored(name) for name in shared},
            self._retention,
        )
        encoded: dict[str, str] = {}  # most entries have the same fetched field names
        for entry in entries:
            fields = {}
            for name in own:
                if name == "fetched_fields":
                    key = "\0".join(entry.fetched_fields)
                    if key not in encoded:
                        encoded[key] = entry.stored(name)
                    fields[name] = encoded[key]
                else:
                    fields[name] = entry.stored(name)
            writes.hset_shared(self.key(entry.workspace_id, entry.message_id), block, fields, ex=self._retention)

    async def load(self, workspace_id: str, message_id: str) -> tuple[ArchiveEntry, pb.Content | None] | None:
        values = await self._redis.hgetall(self.key(workspace_id, message_id))
        if not values:
            return None
        batch_id = values.get(b"batch")
        if batch_id is not None:
            shared = await self._redis.hgetall(self.batch_key(workspace_id, batch_id.decode()))
            if not shared:
                return None  # the batch's record is gone: the entry is past its retention too
            values = {**shared, **values}
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
        )
