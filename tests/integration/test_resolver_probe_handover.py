"""A half-open circuit whose probe ends without a verdict (a 429) hands the probe to one waiting call;
the other calls wait for that probe's verdict too, so an API that is back fails none of them, and no
call waits past its caller's deadline."""

from __future__ import annotations

import asyncio

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode
IDS = [f"cust-{n:06d}" for n in range(1, 7)]
OPEN_SECONDS = 0.5


async def put(resolver, config):
    return await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))


async def resolve(resolver, ids, timeout=None):
    return await resolver.stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=ids), timeout=timeout
    )


async def opened(start_resolver, pii_api, mode="single", **config):
    """A resolver whose circuit for the sandbox API has just opened on a 500, the API then well again."""
    resolver = await start_resolver(circuit_failure_threshold=1, circuit_open_seconds=OPEN_SECONDS)
    if mode == "single":
        await put(resolver, single_config(pii_api.base_url, **config))
    else:
        await put(resolver, bulk_config(pii_api.base_url, batch_size=2, **config))
    faults = pii_api.sandbox.faults
    faults.fail_status, faults.fail_count = 500, 1
    [down] = (await resolve(resolver, IDS[:1])).contacts
    assert down.error.code == E.RESOLVE_ERROR_CODE_SERVER_ERROR, down.error.detail
    [held] = (await resolve(resolver, IDS[:1])).contacts
    assert held.error.code == E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN
    return resolver


@pytest.mark.parametrize("mode", ["single", "bulk"])
@pytest.mark.parametrize("deadline", [None, 30.0], ids=["no-deadline", "deadline"])
async def test_calls_held_back_by_a_probe_that_got_a_429_follow_the_next_probe(
    start_resolver, pii_api, customers, deadline, mode
):
    resolver = await opened(start_resolver, pii_api, mode, max_retries=1, timeout_ms=5000)
    faults = pii_api.sandbox.faults
    # The probe's reply comes late enough that every other call is waiting on it, and is a 429.
    faults.latency_ms, faults.rate_limit_count, faults.retry_after_seconds = 200, 1, 0
    await asyncio.sleep(OPEN_SECONDS + 0.1)
    reply = await resolve(resolver, IDS, timeout=deadline)
    for contact in reply.contacts:
        assert not contact.HasField("error"), contact.error.detail
        assert contact.contact == customers[contact.anonymous_id].email
    assert pii_api.sandbox.stats.statuses["429"] == 1


async def test_a_probe_rate_limited_every_time_fails_the_waiting_calls_within_their_deadline(start_resolver, pii_api):
    """Each wait is at most one attempt's time and none past the deadline: every ID gets its error in the
    reply, not the call DEADLINE_EXCEEDED."""
    resolver = await opened(start_resolver, pii_api, max_retries=10, timeout_ms=300)
    faults = pii_api.sandbox.faults
    faults.latency_ms, faults.rate_limit_count, faults.retry_after_seconds = 100, -1, 0
    await asyncio.sleep(OPEN_SECONDS + 0.1)
    reply = await resolve(resolver, IDS, timeout=2.5)
    assert [c.anonymous_id for c in reply.contacts] == IDS
    codes = {c.error.code for c in reply.contacts}
    # Rate limited, held back by the circuit, or an attempt cut at the deadline: each ID says which.
    assert codes <= {E.RESOLVE_ERROR_CODE_RATE_LIMITED, E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN, E.RESOLVE_ERROR_CODE_TIMEOUT}
