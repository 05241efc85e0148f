"""What must hold across every dispatcher process, kept in Redis.

- Campaign instances: which campaign each instance ID belongs to, so that the
  instance's claims are never another campaign's.
- Idempotency: one send per campaign instance and anonymous ID. A recipient is
  claimed with a lease before anything is fetched; the claim becomes permanent
  when the provider took the message (or may have: no blind resend), and is
  released when nothing was sent, so a re-run retries it (only while it is still
  the batch's own: a re-run may have taken it once its lease lapsed). A crashed
  process's claims expire with their lease: only its in-flight batches can be sent twice.
  A batch that lives longer than a third of the lease (waiting for send slots
  behind other campaigns, a slow provider) renews its claims while it lives.
- Frequency caps: a sliding window of sends per anonymous ID and channel family.
- Rate limits: a reservation schedule per connector on Redis' clock, so several
  processes together stay within the connector's messages per second.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from libs.rate_limit import RateLimiter
from libs.store import key_part, workspace_key
from libs.write_batch import WriteBatch

PENDING, SENT, UNKNOWN = "p", "s", "u"


def pending_marker(message_id: str) -> str:
    """What a claim holds while the send of `message_id` has it (the admission script writes the same)."""
    return f"{PENDING}:{message_id}"


# KEYS: a batch's claims; ARGV[1] the lease (ms), ARGV[1 + i] the value claim i holds while ours
# ("p:<message id>"). Each still ours is renewed; one that expired meanwhile is taken again; one
# another run holds is not touched. Returns the positions (1-based) of those lost to another run.
_RENEW_SCRIPT = """
local lost = {}
for i, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  if held == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  elseif not held then
    redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""


# KEYS[1]: an instance's record; ARGV[1] the calling campaign, ARGV[2] the TTL (s). Taken when no one
# holds it, kept for another TTL when the calling campaign does; returns the campaign that holds it
# when another does (nothing otherwise).
_INSTANCE_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  return owner
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""


class CampaignInstances:
    """The campaign each instance ID belongs to. Claims are keyed by instance, not campaign: an
    instance ID reused by another campaign would find the first campaign's sends and answer its
    recipients DUPLICATE, unsent. Kept as long as the instance's claims, from its latest call (a long call
    takes it again now and then: `servicer.INSTANCE_REFRESH_SECONDS`)."""

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int) -> None:
        self._ttl = ttl_seconds
        self._take = redis.register_script(_INSTANCE_SCRIPT)

    @staticmethod
    def key(workspace_id: str, campaign_instance_id: str) -> str:
        return workspace_key(workspace_id, "instance", campaign_instance_id)

    async def take(self, workspace_id: str, campaign_id: str, instance: str) -> str | None:
        """Records `campaign_id` as the instance's campaign, or keeps its record for another TTL; returns
        the campaign that started the instance when it is another one (then nothing is written)."""
        owner = await self._take(keys=[self.key(workspace_id, instance)], args=[campaign_id, self._ttl])
        if owner is None:
            return None
        return owner.decode() if isinstance(owner, bytes) else owner


class Idempotency:
    """Claims are taken by the admission script (`admission.py`); settled or released with the batch's writes."""

    def __init__(self, ttl_seconds: int, redis: aioredis.Redis | None = None) -> None:
        self._ttl = ttl_seconds
        self._renew = redis.register_script(_RENEW_SCRIPT) if redis is not None else None

    async def renew(
        self, workspace_id: str, instance: str, claims: list[tuple[str, str]], lease_seconds: float
    ) -> list[int]:
        """Renews the `(anonymous ID, message ID)` claims still ours for another lease; returns the
        positions of those another run holds now (it may be sending them: they must not go out here)."""
        if not claims or self._renew is None:
            return []
        keys = [self.key(workspace_id, instance, anonymous_id) for anonymous_id, _ in claims]
        held = [pending_marker(message_id) for _, message_id in claims]
        lost = await self._renew(keys=keys, args=[int(lease_seconds * 1000), *held])
        return [int(i) - 1 for i in lost]

    @staticmethod
    def key(workspace_id: str, campaign_instance_id: str, anonymous_id: str) -> str:
        return workspace_key(workspace_id, "idem", campaign_instance_id, anonymous_id)

    def queue_settle_all(self, writes: WriteBatch, prefix: str, state: str, claims: list[tuple[str, str]]) -> None:
        """Settles a batch's claims alike, `(anonymous ID, message ID)` each, under `prefix` (`key(workspace,
        instance, "")`, made once per batch, as admission does): one run of SETs (`WriteBatch.set_all`), its
        expiry sent once rather than with every claim.

        Whoever holds them now, unlike a release: a message that may have reached its recipient is recorded
        even over the claim of a re-run that took it when the lease lapsed with the request at the provider.
        A later run then answers DUPLICATE, and the re-run, at its next renewal, finds the claim lost and does
        not send it if it has not yet. Not read first either: a settle writes a claim per message sent."""
        writes.set_all(
            [prefix + key_part(anonymous_id) for anonymous_id, _ in claims],
            [f"{state}:{message_id}" for _, message_id in claims],
            ex=self._ttl,
        )

    def queue_release(
        self, writes: WriteBatch, workspace_id: str, instance: str, anonymous_id: str, message_id: str
    ) -> None:
        """Frees the claim `message_id`'s send took, for a re-run, only while it still holds that send's
        marker: one whose lease lapsed and that a re-run took since is the re-run's, which may be sending
        it; deleted, a third run would send the recipient again."""
        writes.delete_if(self.key(workspace_id, instance, anonymous_id), pending_marker(message_id))


# The member of a recipient's cap history that says how long the history is kept (never a message ID).
CAP_HORIZON = "~horizon"


class FrequencyCaps:
    """Sends are counted by the admission script (`admission.py`); one that was not sent is uncounted here."""

    @staticmethod
    def key(workspace_id: str, channel_family: str, anonymous_id: str) -> str:
        return workspace_key(workspace_id, "cap", channel_family, anonymous_id)

    def queue_release(
        self, writes: WriteBatch, workspace_id: str, channel_family: str, anonymous_id: str, message_id: str
    ) -> None:
        """A message that was not sent does not count against the cap (nor keeps a history of none)."""
        writes.zrem_with_bookkeeping(self.key(workspace_id, channel_family, anonymous_id), message_id, CAP_HORIZON)


class ConnectorRateLimiter:
    """A connector's messages per second, across every dispatcher process (libs/rate_limit.py)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._limiter = RateLimiter(redis)

    async def reserve(self, workspace_id: str, connector_id: str, per_second: int, slots: int) -> tuple[float, float]:
        """(seconds to wait before the first slot, seconds between slots)."""
        return await self._limiter.reserve(workspace_key(workspace_id, "rate", connector_id), per_second, slots)

    async def next_slot_in(self, workspace_id: str, connector_id: str, per_second: int) -> float:
        """Seconds until the connector's next free slot, across every process; reserves nothing."""
        return await self._limiter.next_slot_in(workspace_key(workspace_id, "rate", connector_id), per_second)
