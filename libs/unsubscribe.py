"""Signed, expiring one-click unsubscribe tokens (RFC 8058) and the link from message ID to anonymous ID.

A token encodes only the workspace, our message ID and an expiry, MACed with a
key derived from `TOKENSEND_SECRET_KEY`; the dispatcher signs, the receipts
service verifies. The message → anonymous ID links have their own key and TTL
(as long as the tokens live), because the message map expires sooner than a
customer may click.

Redis layout:
- `ts:{ws}:unsublinks:<group>` hash, per group of up to 128 messages sent together (the message
  IDs' first half), whose links expire together: each message's own part of its ID → anonymous ID,
  TTL `unsubscribe_link_ttl_seconds`. About 20 bytes a link in Redis's compact encoding, where a
  key per message took 120 for the links' 60 days.
- `ts:{ws}:unsub:<message_id>` = anonymous ID: a link written one key per message before, still read.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import SecretStr

from libs.derived_keys import KeyedHmac, derive_key, master_keys
from libs.ids import is_id
from libs.message_map import by_group, split_message_id
from libs.store import workspace_key
from libs.write_batch import QueuedWrites

PURPOSE = b"tokensend unsubscribe v1"
_MAC_BYTES = 16
MAX_TOKEN_LENGTH = 512


class InvalidToken(Exception):
    """Not a token of ours, tampered with, or expired; `expired` tells the last one apart."""

    def __init__(self, expired: bool = False) -> None:
        super().__init__("expired" if expired else "invalid")
        self.expired = expired


@dataclass(frozen=True)
class UnsubscribeRequest:
    workspace_id: str
    message_id: str
    expires_at: int


def group_link_key(workspace_id: str, group_part: str) -> str:
    return workspace_key(workspace_id, "unsublinks", group_part)


def link_key(workspace_id: str, message_id: str) -> str:
    """A link written one key per message, before the per-group hash (still read)."""
    return workspace_key(workspace_id, "unsub", message_id)


def queue_links(writes: QueuedWrites, workspace_id: str, links: Iterable[tuple[str, str]], expires_at: int) -> None:
    """(message ID, anonymous ID) of emails sent together, whose tokens expire at `expires_at`: one
    hash per group of message IDs, one expiry each, where a key per message took nearly four times
    the bytes for as long."""
    ttl = max(1, expires_at - int(time.time()))
    for group_part, linked in by_group(links).items():
        key = group_link_key(workspace_id, group_part)
        writes.hset(key, mapping=linked)
        writes.expire(key, ttl)


async def linked_anonymous_id(redis: aioredis.Redis, workspace_id: str, message_id: str) -> str | None:
    """The recipient an email's unsubscribe link names, while the link lives."""
    return (await linked_anonymous_ids(redis, workspace_id, [message_id])).get(message_id)


async def linked_anonymous_ids(redis: aioredis.Redis, workspace_id: str, message_ids: Sequence[str]) -> dict[str, str]:
    """`linked_anonymous_id` of each message whose link still lives, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for message_id in message_ids:
            group_part, own_part = split_message_id(message_id)
            pipe.hget(group_link_key(workspace_id, group_part), own_part)
            pipe.get(link_key(workspace_id, message_id))
        replies = await pipe.execute()
    found = {}
    for index, message_id in enumerate(message_ids):
        linked = replies[2 * index] if replies[2 * index] is not None else replies[2 * index + 1]
        if linked:
            found[message_id] = linked.decode()
    return found


class UnsubscribeTokens:
    def __init__(self, secret_key: SecretStr | None) -> None:
        # The first key signs; while the secret key rotates, tokens signed under an older one still verify.
        self._keys = [KeyedHmac(derive_key(master, PURPOSE)) for master in master_keys(secret_key)]

    def _mac(self, payload: bytes, key: KeyedHmac | None = None) -> bytes:
        return (key or self._keys[0]).digest(payload)[:_MAC_BYTES]

    def sign(self, workspace_id: str, message_id: str, expires_at: int) -> str:
        """Deterministic: the same message and expiry always give the same token (archives rebuild it)."""
        return self.signer(workspace_id, expires_at)(message_id)

    def signer(self, workspace_id: str, expires_at: int) -> Callable[[str], str]:
        """`sign` for the messages of one batch, which share the workspace and expiry: the payload's
        shared start made once (1.9 µs an Email instead of 2.5)."""
        ws = workspace_id.encode()
        start = struct.pack(">IB", expires_at, len(ws)) + ws
        digest, b64 = self._keys[0].digest, binascii.b2a_base64

        def sign(message_id: str) -> str:
            payload = start + message_id.encode()
            # base64.urlsafe_b64encode without the padding, in line: this runs for every Email. Two
            # replace() cost less than translate(), which copies its 256-byte table on every call, and
            # the newline goes with the padding rather than through a keyword argument.
            encoded = b64(payload + digest(payload)[:_MAC_BYTES]).replace(b"+", b"-").replace(b"/", b"_")
            return encoded.rstrip(b"=\n").decode()

        return sign

    def verify(self, token: str, now: float | None = None) -> UnsubscribeRequest:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken()
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidToken() from None
        if len(raw) < 5 + 1 + 1 + _MAC_BYTES:
            raise InvalidToken()
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not any(hmac.compare_digest(mac, self._mac(payload, key)) for key in self._keys):
            raise InvalidToken()
        expires_at, ws_length = struct.unpack(">IB", payload[:5])
        try:
            workspace_id = payload[5 : 5 + ws_length].decode()
            message_id = payload[5 + ws_length :].decode()
        except UnicodeDecodeError:
            raise InvalidToken() from None
        if not (is_id(workspace_id) and is_id(message_id)):
            raise InvalidToken()
        if expires_at < (time.time() if now is None else now):
            raise InvalidToken(expired=True)
        return UnsubscribeRequest(workspace_id, message_id, expires_at)


def _link_start(public_url: str) -> str:
    return f"<{public_url.rstrip('/')}/unsubscribe/"


def _headers(link_start: str, token: str) -> dict[str, str]:
    """The RFC 8058 pair: where to POST, and that a POST alone unsubscribes."""
    return {"List-Unsubscribe": link_start + token + ">", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def list_unsubscribe_headers(public_url: str, token: str) -> dict[str, str]:
    """The RFC 8058 pair for one message's token."""
    return _headers(_link_start(public_url), token)


def list_unsubscribe_headers_signed(public_url: str, sign: Callable[[str], str]) -> Callable[[str], dict[str, str]]:
    """`list_unsubscribe_headers` for the messages of one batch, by message ID, each token made by
    `sign` (`UnsubscribeTokens.signer`): the link's start made once."""
    start = _link_start(public_url)
    return lambda message_id: _headers(start, sign(message_id))
