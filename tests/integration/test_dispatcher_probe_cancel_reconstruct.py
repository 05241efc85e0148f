"""ReconstructMessage cut off by its caller's deadline as it writes its audit entry."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.archive import MessageArchive
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel


async def test_a_reconstruction_cut_off_while_its_audit_entry_is_written_is_still_audited(
    start_suite, redis, monkeypatch
):
    """The contact was fetched again and the audit write is slow (Redis busy): the caller's deadline
    ends the call before it is written. Nothing is returned, and the audit log still records the
    call: the brand's API gave out the customer's PII for it."""
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), "audit-1")
    message_id = sent.results[0].message_id
    audit = MessageArchive.audit

    async def slow_to_record_success(self, *args):
        if args[-1] == "reconstructed":
            await asyncio.sleep(1.0)
        return await audit(self, *args)

    monkeypatch.setattr(MessageArchive, "audit", slow_to_record_success)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.ReconstructMessage(
            pb.ReconstructMessageRequest(
                workspace_id=suite.workspace_id, message_id=message_id, requested_by="dpo-7", reason="DSAR"
            ),
            timeout=0.5,
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    entries = []
    for _ in range(40):  # the server notices the deadline a moment after the client
        entries = await redis.xrange(MessageArchive.audit_key(suite.workspace_id))
        if entries:
            break
        await asyncio.sleep(0.05)
    assert [fields[b"outcome"] for _, fields in entries] == [b"error:CANCELLED"]
    assert entries[0][1][b"message_id"] == message_id.encode()
