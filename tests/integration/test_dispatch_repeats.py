"""A Dispatch call answers a repeated anonymous ID the same however its recipients are cut into batches."""

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.campaign_stats import read_counts
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus


async def test_a_repeat_in_a_later_batch_of_the_call_is_a_duplicate(start_suite, redis):
    """With TOKENSEND_BATCH_SIZE=2 the repeat of cust-000001 falls in the call's second batch: it is
    answered DUPLICATE, as in the first, not asked of the PII API again and counted a second time."""
    suite = await start_suite(batch_size=2)
    suite.pii_api.sandbox.faults.missing_ids = {"cust-000001"}
    people = recipients(3) + recipients(2)
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people)
    assert [r.anonymous_id for r in reply.results] == [p.anonymous_id for p in people]
    assert [r.status for r in reply.results] == [
        S.DISPATCH_STATUS_RESOLVE_FAILED,
        S.DISPATCH_STATUS_SENT,
        S.DISPATCH_STATUS_SENT,
        S.DISPATCH_STATUS_DUPLICATE,
        S.DISPATCH_STATUS_DUPLICATE,
    ]
    assert [r.error_code for r in reply.results[3:]] == ["DUPLICATE", "DUPLICATE"]
    assert reply.results[3].message_id == ""  # its first occurrence was never sent
    assert reply.results[4].message_id == reply.results[1].message_id
    assert reply.summary.duplicate == 2 and reply.summary.resolve_failed == 1 and reply.summary.sent == 2
    assert len(suite.providers.outbox_for("custom")) == 2
    counts = await read_counts(redis, suite.workspace_id, "spring", "run-1")
    assert counts["attempted"] == 3 and counts["resolve_failed"] == 1 and counts["duplicate"] == 2
