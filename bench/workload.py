"""What the benchmark asks of the suite: a configured workspace, campaigns streamed through
`DispatchStream`, and `ResolveContacts` calls timed against the same PII API called directly."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import grpc
import redis.asyncio as aioredis
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dpb_grpc
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from bench.baseline import pii_api_token
from bench.stats import batch_service_times
from sandbox.workspace import SandboxWorkspace

C = common_pb2.Channel
S = dpb.DispatchStatus
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]

# SMS is personalised with a fetched name: one provider request per message, as it must be.
SMS_CONTENT = dpb.Content(
    sms_body="Hi {{ first_name }}, your {{ recipient.tier }} offer is inside. Reply STOP to opt out"
)
# Email content that is the same for every recipient, so SendGrid takes up to 1,000 a request.
EMAIL_CONTENT = dpb.Content(
    subject="Spring sale: 20% off for {{ recipient.tier }} members",
    html_body="<p>Hello {{ recipient.tier }} member,</p><p>Our spring sale starts today.</p>",
    text_body="Hello {{ recipient.tier }} member, our spring sale starts today.",
)
# The same Email addressed to each recipient by name: every message's content differs, and SendGrid
# still takes up to 1,000 a request, the content once and each name as a substitution.
EMAIL_BY_NAME_CONTENT = dpb.Content(
    subject="Spring sale: 20% off for {{ recipient.tier }} members",
    html_body="<p>Dear {{ first_name }} {{ last_name }},</p><p>Our spring sale starts today.</p>",
    text_body="Dear {{ first_name }} {{ last_name }}, our spring sale starts today.",
)
CHANNELS = {"sms": C.CHANNEL_SMS, "email": C.CHANNEL_EMAIL}
CONTENTS = {"sms": SMS_CONTENT, "email": EMAIL_CONTENT}


def anonymous_id(number: int) -> str:
    """The sample PII API's IDs: cust-000001 onwards."""
    return f"cust-{number:06d}"


def pii_api_configs(workspace_id: str, pii_api_url: str, batch_size: int = 500) -> list[rpb.PiiApiConfig]:
    """Bulk lookups for Email and SMS (the HTTP work a baseline cannot avoid), with OAuth."""
    bulk = dict(
        workspace_id=workspace_id,
        mode=rpb.MODE_BULK,
        method=rpb.HTTP_METHOD_POST,
        url=f"{pii_api_url}/v1/customers:batchGet",
        body='{"ids": "@anonymous_ids"}',
        results_path="data.results",
        id_path="id",
        attribute_paths={"first_name": "profile.first_name", "last_name": "profile.last_name"},
        batch_size=batch_size,
        oauth_config_id="crm",
    )
    return [
        rpb.PiiApiConfig(channel=C.CHANNEL_EMAIL, contact_path="email", **bulk),
        rpb.PiiApiConfig(channel=C.CHANNEL_SMS, contact_path="phone", **bulk),
    ]


def single_sms_config(workspace_id: str, pii_api_url: str) -> rpb.PiiApiConfig:
    """One GET per ID (the resolver-overhead section's single lookups)."""
    return rpb.PiiApiConfig(
        workspace_id=workspace_id,
        channel=C.CHANNEL_SMS,
        mode=rpb.MODE_SINGLE,
        method=rpb.HTTP_METHOD_GET,
        url=f"{pii_api_url}/v1/customers/@anonymous_id",
        contact_path="customer.phone",
        attribute_paths={"first_name": "customer.profile.first_name"},
        oauth_config_id="crm",
    )


async def configure(
    resolver_target: str, dispatcher_target: str, workspace_id: str, pii_api_url: str, providers_url: str
) -> None:
    """Saves, through the public RPCs, the workspaces the benchmark sends from.

    `workspace_id` gets bulk PII configs and every sandbox connector; `<workspace_id>-r` gets a
    single-lookup SMS config and the bulk Email one, for the resolver-overhead section.
    """
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{providers_url}/_admin/sendgrid/public-key") as reply:
            public_key = (await reply.json())["public_key"]
    async with (
        grpc.aio.insecure_channel(resolver_target) as rch,
        grpc.aio.insecure_channel(dispatcher_target) as dch,
    ):
        resolver = rpb_grpc.ResolverServiceStub(rch)
        dispatcher = dpb_grpc.DispatcherServiceStub(dch)
        await configure_pii_apis(resolver, workspace_id, pii_api_url)
        workspace = SandboxWorkspace(workspace_id, pii_api_url, providers_url, public_key)
        for connector in workspace.connectors().values():
            await dispatcher.PutConnector(dpb.PutConnectorRequest(connector=connector))


async def configure_pii_apis(resolver: rpb_grpc.ResolverServiceStub, workspace_id: str, pii_api_url: str) -> None:
    """The PII API configs of `workspace_id` (bulk, with OAuth) and of its resolver-overhead workspace
    (single lookups for SMS, bulk for Email)."""
    overhead = overhead_workspace(workspace_id)
    for ws in (workspace_id, overhead):
        workspace = SandboxWorkspace(ws, pii_api_url, "")
        await resolver.PutOAuthConfig(rpb.PutOAuthConfigRequest(config=workspace.oauth_config()))
    for config in pii_api_configs(workspace_id, pii_api_url):
        await resolver.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=config))
    await resolver.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=single_sms_config(overhead, pii_api_url)))
    await resolver.PutPiiApiConfig(
        rpb.PutPiiApiConfigRequest(config=pii_api_configs(overhead, pii_api_url)[0])  # Email, bulk
    )


def overhead_workspace(workspace_id: str) -> str:
    return f"{workspace_id}-r"


async def require_redis(redis_url: str) -> None:
    """SystemExit naming the server (never the URL's password) unless Redis answers a PING."""
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
    except (aioredis.RedisError, OSError) as exc:
        parts = urlsplit(redis_url)
        where = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else "--redis-url"
        raise SystemExit(
            f"Redis at {where} does not answer ({type(exc).__name__}): start it (`make redis`) or pass --redis-url"
        ) from None
    finally:
        await client.aclose()


async def redis_cpu_seconds(redis_url: str) -> float | None:
    """CPU time the Redis server has used (INFO cpu, user + system), or None when it cannot be read."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        info = await client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except (aioredis.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        await client.aclose()


async def redis_cpu_since(redis_url: str, before: float | None) -> dict[str, float]:
    """{"redis": seconds} of Redis CPU since `before` was read, or nothing when Redis does not say."""
    after = await redis_cpu_seconds(redis_url)
    return {"redis": after - before} if before is not None and after is not None else {}


async def forget_workspaces(redis_url: str, workspace_ids: list[str]) -> None:
    """Deletes every key of these workspaces (`ts:{<workspace>}:*`), and nothing else."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        for ws in workspace_ids:
            batch = []
            async for key in client.scan_iter(match=f"ts:{{{ws}}}:*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    await client.unlink(*batch)
                    batch.clear()
            if batch:
                await client.unlink(*batch)
    finally:
        await client.aclose()


# -- DispatchStream ------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """One campaign streamed through DispatchStream, as the client saw it."""

    recipients: int
    seconds: float
    batch_times: list[float]  # seconds; see `bench.stats.batch_service_times`
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def throughput(self) -> float:
        return self.recipients / self.seconds if self.seconds > 0 else 0.0

    @property
    def sent(self) -> int:
        return self.statuses.get("SENT", 0)


def recipient_parts(first: int, count: int, part_size: int, tier: str = "gold") -> Iterator[dpb.DispatchStreamRequest]:
    """The recipients cust-<first>.. in parts of `part_size`, built lazily (bounded client memory).
    Each added in place, its map item by item: a Recipient built with a dict and then copied into the
    part cost the client 5.6 µs a recipient against 2.3, CPU the services' share of the machine."""
    for start in range(first, first + count, part_size):
        part = dpb.DispatchStreamRequest()
        add = part.recipients.recipients.add
        for n in range(start, min(start + part_size, first + count)):
            add(anonymous_id=anonymous_id(n)).attributes["tier"] = tier
        yield part


async def dispatch_stream(
    target: str,
    workspace_id: str,
    family: str,
    connector_id: str,
    recipients: int,
    instance: str,
    part_size: int = 500,
    window: int = 2,
    first: int = 1,
    content: dpb.Content | None = None,
) -> StreamResult:
    """Streams one campaign of `recipients` in parts of one dispatcher batch each, with at most
    `window` parts unanswered (a campaign engine with bounded memory), and times each batch.
    `content` replaces the family's usual content."""
    header = dpb.DispatchStreamRequest(
        header=dpb.DispatchStreamRequest.Header(
            workspace_id=workspace_id,
            campaign_id="bench",
            campaign_instance_id=instance,
            channel=CHANNELS[family],
            connector_id=connector_id,
            content=content or CONTENTS[family],
        )
    )
    codes: Counter[int] = Counter()
    sent_at: list[float] = []
    answered_at: list[float] = []
    room = asyncio.Semaphore(window)
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        await channel.channel_ready()
        call = dpb_grpc.DispatcherServiceStub(channel).DispatchStream()
        started = time.monotonic()
        await call.write(header)

        async def write() -> None:
            for part in recipient_parts(first, recipients, part_size):
                await room.acquire()
                await call.write(part)
                sent_at.append(time.monotonic())
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            async for reply in call:
                if reply.results:
                    answered_at.append(time.monotonic())
                    room.release()
                    codes.update([r.status for r in reply.results])  # named once at the end, not per result
            await writer
        finally:
            writer.cancel()
        finished = time.monotonic()
    times = batch_service_times(sent_at[: len(answered_at)], answered_at, started)
    statuses = Counter({S.Name(code).removeprefix("DISPATCH_STATUS_"): count for code, count in codes.items()})
    return StreamResult(recipients, finished - started, times, statuses)


# -- resolver overhead -----------------------------------------------------------------------------


@dataclass
class OverheadResult:
    """Paired timings of ResolveContacts and the same PII API request made directly."""

    ids_per_call: int
    resolver: list[float]
    direct: list[float]
    bare: list[float] = field(default_factory=list)  # the bare resolver's, when one was called


def overhead_request(
    rng: random.Random, workspace_id: str, ids_per_call: int, customers: int
) -> rpb.ResolveContactsRequest:
    """A resolver-overhead lookup of `ids_per_call` distinct random sample customers, as the dispatcher
    asks (it drops a batch's repeated recipients before the lookup): one ID goes through the
    workspace's single-lookup SMS config, more through its bulk Email one."""
    return rpb.ResolveContactsRequest(
        workspace_id=workspace_id,
        channel=C.CHANNEL_SMS if ids_per_call == 1 else C.CHANNEL_EMAIL,
        anonymous_ids=[anonymous_id(n) for n in rng.sample(range(1, customers + 1), ids_per_call)],
    )


async def resolver_overhead(
    resolver_target: str,
    workspace_id: str,
    pii_api_url: str,
    customers: int,
    ids_per_call: int,
    calls: int,
    warmup: int = 20,
    seed: int = 7,
    bare_target: str | None = None,
) -> OverheadResult:
    """`calls` ResolveContacts of `ids_per_call` random IDs, each followed by the same call to the bare
    resolver at `bare_target` (when given), then by the same lookup made straight to the PII API
    (single: GET per ID; batches: one bulk POST), one at a time."""
    rng = random.Random(seed)
    result = OverheadResult(ids_per_call, [], [])
    connector = aiohttp.TCPConnector(limit=8)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        grpc.aio.insecure_channel(resolver_target, options=GRPC_OPTIONS) as channel,
        grpc.aio.insecure_channel(bare_target or resolver_target, options=GRPC_OPTIONS) as bare_channel,
    ):
        stub = rpb_grpc.ResolverServiceStub(channel)
        bare = rpb_grpc.ResolverServiceStub(bare_channel) if bare_target else None
        headers = {"Authorization": f"Bearer {await pii_api_token(http, pii_api_url)}"}

        async def direct(ids: list[str]) -> None:
            if ids_per_call == 1:
                async with http.get(f"{pii_api_url}/v1/customers/{ids[0]}", headers=headers) as reply:
                    await reply.read()
            else:
                async with http.post(
                    f"{pii_api_url}/v1/customers:batchGet", json={"ids": ids}, headers=headers
                ) as reply:
                    await reply.read()

        for i in range(warmup + calls):
            request = overhead_request(rng, workspace_id, ids_per_call, customers)
            ids = list(request.anonymous_ids)
            t0 = time.perf_counter()
            reply = await stub.ResolveContacts(request, timeout=30)
            t1 = time.perf_counter()
            if bare is not None:
                bare_reply = await bare.ResolveContacts(request, timeout=30)
                if any(c.HasField("error") for c in bare_reply.contacts):
                    raise RuntimeError("the bare resolver could not resolve a sample customer")
            t2 = time.perf_counter()
            await direct(ids)
            t3 = time.perf_counter()
            if any(c.HasField("error") for c in reply.contacts):
                raise RuntimeError("the resolver could not resolve a sample customer")
            if i >= warmup:
                result.resolver.append(t1 - t0)
                if bare is not None:
                    result.bare.append(t2 - t1)
                result.direct.append(t3 - t2)
    return result
