"""A batch whose send fails on an error of its own, while its other sends are under way."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors.custom_http import CustomHttpConnector
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus


async def test_a_batch_failing_mid_send_sends_nothing_after_it_settled(start_suite, redis, monkeypatch):
    """One of a batch's sends fails on an error no outcome covers (a fault of the connector's) while
    the others are on their way: the call ends INTERNAL, and the batch stops its other senders before
    it settles, rather than letting them go on through the rest of its messages. Sent after the
    batch released their recipients, those would be sent again by a re-run."""
    suite = await start_suite(send_concurrency=4)
    suite.providers.set_faults("custom", latency_ms=300)
    send = CustomHttpConnector.send
    people = recipients(20)

    async def fails_for_one(self, messages):
        if any(m.anonymous_id == people[0].anonymous_id for m in messages):
            await asyncio.sleep(0.1)  # the other senders' requests are under way
            raise RuntimeError("a fault of the connector's own")
        return await send(self, messages)

    monkeypatch.setattr(CustomHttpConnector, "send", fails_for_one)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, "bug-1")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    await asyncio.sleep(2.5)  # long enough for the rest of the batch to go out, were it still sending
    monkeypatch.setattr(CustomHttpConnector, "send", send)
    suite.providers.set_faults("custom", latency_ms=0)
    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, "bug-1")
    statuses = Counter(S.Name(r.status) for r in again.results)
    sent = Counter(m.to for m in suite.providers.outbox_for("custom"))
    assert set(sent.values()) == {1}, (statuses, sent)  # nobody twice
    # Those whose request had started are held OUTCOME_UNKNOWN (the failed one's included); the rest are sent.
    assert set(statuses) == {"DISPATCH_STATUS_SENT", "DISPATCH_STATUS_DUPLICATE"}
    assert {r.error_code for r in again.results if r.status == S.DISPATCH_STATUS_DUPLICATE} == {"OUTCOME_UNKNOWN"}
    assert again.results[0].status == S.DISPATCH_STATUS_DUPLICATE
