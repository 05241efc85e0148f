"""Size limits and enum checks as a client meets them: INVALID_ARGUMENT naming the field and the limit
(with the field in the BadRequest detail), RESOURCE_EXHAUSTED beyond the gRPC message size, and
error texts in which a hostile key cannot start a new line."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from tests.integration.test_dispatcher_campaigns import SMS, recipients
from tests.integration.test_receipts_harness import running_receipts
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration


async def refused(call) -> tuple[grpc.StatusCode, str, str]:
    """(code, details, the BadRequest field) of a failed call."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    field = ""
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            field = bad.field_violations[0].field
    return caught.value.code(), caught.value.details(), field


async def test_every_service_refuses_oversized_fields_by_name(start_suite, redis, redis_url):
    suite = await start_suite()
    many = recipients(1)
    many[0].attributes.update({f"a{i}": "x" for i in range(60)})
    cases = [
        (
            suite.dispatcher.stub.Dispatch(
                dpb.DispatchRequest(
                    workspace_id=suite.workspace_id,
                    campaign_id="c",
                    campaign_instance_id="i",
                    channel=common_pb2.CHANNEL_SMS,
                    connector_id="gateway",
                    content=SMS,
                    recipients=many,
                )
            ),
            "recipients[0].attributes",
            "must have at most 50 entries",
        ),
        (
            suite.resolver.stub.ResolveContacts(
                rpb.ResolveContactsRequest(workspace_id="w", channel=1, anonymous_ids=["x"] * 1001)
            ),
            "anonymous_ids",
            "must have at most 1000 entries",
        ),
        (
            suite.resolver.stub.PutPiiApiConfig(
                rpb.PutPiiApiConfigRequest(config=single_config(suite.pii_api.base_url, body="x" * 20_000))
            ),
            "config.body",
            "must be at most 16384 characters",
        ),
        (
            suite.resolver.stub.GetPiiApiConfig(rpb.GetPiiApiConfigRequest(workspace_id="w", channel=57)),
            "channel",
            "is not a known Channel value: one of CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_MMS, CHANNEL_RCS, "
            "CHANNEL_WHATSAPP",
        ),
    ]
    async with running_receipts(redis, redis_url) as receipts:
        cases.append(
            (
                receipts.stub.GetCampaignStats(cpb.GetCampaignStatsRequest(workspace_id="w", campaign_id="c" * 5000)),
                "campaign_id",
                "must be at most 4096 characters",
            )
        )
        for call, field, description in cases:
            code, details, violation = await refused(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details == f"{field}: {description}"
            assert violation == field


async def test_a_stream_part_over_the_limit_is_refused(start_suite):
    suite = await start_suite()

    async def parts():
        yield dpb.DispatchStreamRequest(
            header=dpb.DispatchStreamRequest.Header(
                workspace_id=suite.workspace_id,
                campaign_id="c",
                campaign_instance_id="i",
                channel=common_pb2.CHANNEL_SMS,
                connector_id="gateway",
                content=SMS,
            )
        )
        yield dpb.DispatchStreamRequest(
            recipients=dpb.DispatchStreamRequest.Recipients(
                recipients=[dpb.Recipient(anonymous_id=f"c-{i}") for i in range(10_001)]
            )
        )

    async def consume():
        async for _ in suite.dispatcher.stub.DispatchStream(parts()):
            pass

    code, details, _ = await refused(consume())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "recipients.recipients: must have at most 10000 entries (in the first part)"
    assert suite.providers.outbox_for("custom") == []


async def test_messages_over_the_grpc_limit_are_resource_exhausted(start_resolver):
    resolver = await start_resolver(grpc_max_message_bytes=64 * 1024)
    code, _, _ = await refused(
        resolver.stub.ResolveContacts(rpb.ResolveContactsRequest(workspace_id="w", anonymous_ids=["x" * 1000] * 100))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_line_breaks_in_names_are_escaped_in_errors(start_suite, captured_logs):
    suite = await start_suite()
    config = single_config(suite.pii_api.base_url, headers={"X-Key\r\nInjected: yes": "v"})
    code, details, field = await refused(suite.resolver.stub.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=config)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # A name that is no header name is not echoed at all (it may be a pasted "Name: secret" line).
    assert "\r" not in details and "\n" not in details and field == "config.headers"
    for record in captured_logs.records:
        assert "\n" not in record.getMessage()
