"""A batch larger than one resolver call whose fetch fails in one of its calls."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tokensend.common.v1 import common_pb2

from libs.errors import Unavailable
from services.dispatcher.resolver_client import MAX_IDS_PER_CALL, ResolverClient
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel


async def test_a_batch_whose_fetch_fails_in_one_call_stops_its_other_calls(start_suite, monkeypatch):
    """A batch of 1,500 is fetched in two resolver calls; the second fails at once (the resolver it
    reached was stopping). The call ends UNAVAILABLE and the batch releases its claims; the first call,
    still waiting for the brand's slow API, stops with it, rather than fetching contacts in the
    background for a batch that is gone (and for recipients a re-run may be sending meanwhile)."""
    suite = await start_suite(batch_size=1500)
    suite.pii_api.sandbox.faults.latency_ms = 1500
    real = ResolverClient._call
    ends: list[str] = []

    async def one_call_refused(self, request):
        if len(request.anonymous_ids) < MAX_IDS_PER_CALL:
            raise Unavailable("resolver unavailable (UNAVAILABLE), retry later")
        try:
            reply = await real(self, request)
        except asyncio.CancelledError:
            ends.append("cancelled")
            raise
        ends.append("fetched")
        return reply

    monkeypatch.setattr(ResolverClient, "_call", one_call_refused)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1500), "chunks-1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(2.5)  # past the brand's answer to the first call
    assert ends == ["cancelled"]
    assert suite.providers.outbox_for("custom") == []
