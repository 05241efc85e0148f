"""Tenant isolation: what one brand holds (a token for its workspace, its own connectors' secrets, an
unsubscribe link from one of its emails) never reads, changes or names another brand's data.

Workspace `WS` is the attacker's (its token may use that one only); `RIVAL` is another brand on the
same deployment, whose messages, counters, events, suppressions and audit log must stay as they were.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
import time

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from libs.auth import new_client
from libs.message_map import MessageMap
from libs.suppressions import SuppressionStore
from libs.unsubscribe import UnsubscribeTokens, queue_links
from libs.write_batch import BatchWriter, WriteBatch
from services.dispatcher.archive import MessageArchive
from tests.integration.beyond import people, post
from tests.integration.test_dispatcher_campaigns import SMS, dispatch
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    put_messages,
    recorded_status,
    running_receipts,
    save_connectors,
    sendgrid_event,
    stats,
    stream_entries,
    twilio_params,
)
from tests.integration.test_unsubscribe import get

pytestmark = pytest.mark.integration

C = common_pb2.Channel
RIVAL = "ws-rival"
ATTACKER_TOKEN, ATTACKER = new_client("attacker", [WS])
RIVAL_TOKEN, RIVAL_CLIENT = new_client("rival", [RIVAL])


def as_client(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def untouched(redis, records) -> tuple:
    """What a rival's receipts could have changed: counters, events, message statuses, suppressions."""
    statuses = [await recorded_status(redis, RIVAL, r.message_id) for r in records]
    suppressed = await SuppressionStore(redis).find(RIVAL, "email", "", [r.anonymous_id for r in records])
    return await stats(redis, workspace_id=RIVAL), await stream_entries(redis, RIVAL), statuses, suppressed


async def test_a_receipt_naming_another_workspaces_message_leaves_it_alone(redis, redis_url):
    """Signed with the attacker's own connector secrets, posted to its own URL, naming the rival's
    message IDs, campaign and provider IDs: unmapped in the attacker's workspace, nothing of the rival's moves."""
    async with running_receipts(redis, redis_url, clients=[ATTACKER, RIVAL_CLIENT]) as receipts:
        await save_connectors(redis, receipts.settings, receipts.secrets, workspace_id=RIVAL)
        pii = Pii.new()
        email = await put_messages(redis, "sendgrid", 3, workspace_id=RIVAL)
        sms = await put_messages(redis, "twilio", 1, workspace_id=RIVAL, provider_ids=["SM" + "7" * 32])
        before = await untouched(redis, [*email, *sms])

        events = [
            sendgrid_event(kind, pii, message_id=r.message_id, campaign="camp-1", instance="inst-1")
            for r in email
            for kind in ("delivered", "open", "unsubscribe", "spamreport")
        ]
        reply = await receipts.post_sendgrid(events)
        assert reply.status == 200 and reply.json()["mapped"] == 0 and reply.json()["unmapped"] == len(events)
        # Relayed over gRPC with the attacker's token, for its own workspace and connector.
        body, headers = receipts.sendgrid_request(
            [sendgrid_event("bounce", pii, message_id=r.message_id) for r in email]
        )
        relayed = await receipts.stub.IngestReceipt(
            pb.IngestReceiptRequest(
                workspace_id=WS, connector_id="sg-main", provider=pb.PROVIDER_SENDGRID, body=body, headers=headers
            ),
            metadata=as_client(ATTACKER_TOKEN),
        )
        assert (relayed.mapped, relayed.unmapped) == (0, len(email))
        # Twilio: our ID in the callback URL, and the provider's own ID as the fallback.
        tw_body, tw_headers, query = receipts.twilio_request(
            twilio_params("delivered", pii, sid="SM" + "7" * 32), sms[0].message_id
        )
        reply = await receipts.post("twilio", tw_body, tw_headers, query=query)
        assert reply.status == 200 and reply.json()["mapped"] == 0

        assert await untouched(redis, [*email, *sms]) == before
        assert await stream_entries(redis, WS) == []
        # The attacker's own counters took them, as receipts naming no message of its own.
        assert (await stats(redis, "_workspace"))["unmapped"] == len(events) + len(email) + 1

        # The rival's connector, the attacker's token: refused before anything is read.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await receipts.stub.IngestReceipt(
                pb.IngestReceiptRequest(
                    workspace_id=RIVAL,
                    connector_id="sg-main",
                    provider=pb.PROVIDER_SENDGRID,
                    body=body,
                    headers=headers,
                ),
                metadata=as_client(ATTACKER_TOKEN),
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await untouched(redis, [*email, *sms]) == before


async def test_stats_and_event_streams_show_each_workspace_only_its_own(redis, redis_url):
    """The rival's events are there to be found: the attacker's stream, read from the start or from the
    rival's own event IDs, yields none of them, and the rival's stats are refused."""
    async with running_receipts(redis, redis_url, clients=[ATTACKER, RIVAL_CLIENT]) as receipts:
        await save_connectors(redis, receipts.settings, receipts.secrets, workspace_id=RIVAL)
        pii = Pii.new()
        rival = await put_messages(redis, "sendgrid", 2, workspace_id=RIVAL)
        own = await put_messages(redis, "sendgrid", 1, campaign="camp-1")
        reply = await receipts.post_sendgrid(
            [sendgrid_event("delivered", pii, message_id=r.message_id) for r in rival], workspace_id=RIVAL
        )
        assert reply.json()["mapped"] == 2
        reply = await receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=own[0].message_id)])
        assert reply.json()["mapped"] == 1
        rival_events = await stream_entries(redis, RIVAL)
        assert len(rival_events) == 2

        stub = pb_grpc.ReceiptsServiceStub(receipts.channel)
        seen = []
        for after_id in ("", "0-0", rival_events[0]["id"], "$"):
            call = stub.StreamDeliveryEvents(
                pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id=after_id), metadata=as_client(ATTACKER_TOKEN)
            )
            try:
                async with asyncio.timeout(0.6):
                    async for event in call:
                        seen.append(event)
            except TimeoutError:
                call.cancel()
        assert seen and {e.message_id for e in seen} == {own[0].message_id}

        attacker_stats = await stub.GetCampaignStats(
            pb.GetCampaignStatsRequest(workspace_id=WS, campaign_id="camp-1"), metadata=as_client(ATTACKER_TOKEN)
        )
        assert attacker_stats.delivered == 1  # its own, not the rival's two of the same campaign name
        for request in (
            pb.GetCampaignStatsRequest(workspace_id=RIVAL, campaign_id="camp-1"),
            pb.StreamDeliveryEventsRequest(workspace_id=RIVAL),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                if isinstance(request, pb.GetCampaignStatsRequest):
                    await stub.GetCampaignStats(request, metadata=as_client(ATTACKER_TOKEN))
                else:
                    async for _ in stub.StreamDeliveryEvents(request, metadata=as_client(ATTACKER_TOKEN), timeout=2):
                        pass
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "camp-1" not in refused.value.details()


def retargeted(token: str, workspace_id: str) -> str:
    """`token` with its workspace swapped and its MAC kept, as a tamperer would try."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    expires_at, length = struct.unpack(">IB", raw[:5])
    rest = raw[5 + length :]
    swapped = struct.pack(">IB", expires_at, len(workspace_id)) + workspace_id.encode() + rest
    return base64.urlsafe_b64encode(swapped).rstrip(b"=").decode()


async def test_an_unsubscribe_link_suppresses_only_in_the_workspace_it_was_signed_for(redis, redis_url):
    """Both brands hold a message of the same ID (the link names only that): the attacker's link, replayed
    or with the rival's workspace put in, never suppresses the rival's recipient."""
    async with running_receipts(redis, redis_url) as receipts:
        own = (await put_messages(redis, "sendgrid", 1))[0]
        await MessageMap(redis, 3600).put_many(
            [dataclasses.replace(own, workspace_id=RIVAL, anonymous_id="rival-person", campaign_id="c-r")]
        )
        writes = WriteBatch()
        queue_links(writes, RIVAL, [(own.message_id, "rival-person")], int(time.time()) + 3600)
        await BatchWriter(redis).execute(writes)
        tokens = UnsubscribeTokens(receipts.settings.secret_key)
        token = tokens.sign(WS, own.message_id, int(time.time()) + 3600)

        tampered = f"/unsubscribe/{retargeted(token, RIVAL)}"
        assert (await post(receipts, tampered, b"List-Unsubscribe=One-Click", {}))[0] == 404
        assert (await get(receipts, tampered))[0] == 404
        for _ in range(2):  # replayed
            status, _ = await post(receipts, f"/unsubscribe/{token}", b"List-Unsubscribe=One-Click", {})
            assert status == 200
        store = SuppressionStore(redis)
        assert await store.find(WS, "email", "", [own.anonymous_id])
        assert not await store.find(RIVAL, "email", "", ["rival-person", own.anonymous_id])
        assert await stream_entries(redis, RIVAL) == []


async def test_ids_of_another_workspace_find_nothing_through_the_dispatcher(start_suite, redis):
    """Another brand's message and connector IDs, asked for under one's own workspace on the same
    deployment: not found, named only as asked, and the other brand's audit log untouched."""
    brand = await start_suite()
    rival = await start_suite(workspace_id=RIVAL)
    connector = dpb.Connector()
    connector.CopyFrom(rival.workspace.connectors()["gateway"])
    connector.connector_id = "rival-only-gw"
    await rival.dispatcher.stub.PutConnector(dpb.PutConnectorRequest(connector=connector))
    sent = await dispatch(rival, C.CHANNEL_SMS, "rival-only-gw", SMS, people(2), campaign="rival-spring")
    assert [r.status for r in sent.results] == [dpb.DISPATCH_STATUS_SENT] * 2
    await rival.dispatcher.stub.SuppressRecipients(
        dpb.SuppressRecipientsRequest(workspace_id=RIVAL, channel=C.CHANNEL_SMS, anonymous_ids=["cust-000009"])
    )
    own = await rival.dispatcher.stub.ReconstructMessage(
        dpb.ReconstructMessageRequest(
            workspace_id=RIVAL, message_id=sent.results[0].message_id, requested_by="dpo", reason="x"
        )
    )
    assert own.campaign_id == "rival-spring"  # there to be found, by its own workspace
    rival_audit = await redis.xrange(MessageArchive.audit_key(RIVAL))

    stub = brand.dispatcher.stub
    refusals = []
    for call in (
        stub.ReconstructMessage(
            dpb.ReconstructMessageRequest(
                workspace_id=brand.workspace_id, message_id=sent.results[0].message_id, requested_by="dpo", reason="x"
            )
        ),
        stub.GetConnector(dpb.GetConnectorRequest(workspace_id=brand.workspace_id, connector_id="rival-only-gw")),
        dispatch(brand, C.CHANNEL_SMS, "rival-only-gw", SMS, people(1)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        refusals.append(caught.value)
    assert [r.code() for r in refusals] == [grpc.StatusCode.NOT_FOUND] * 3
    for refusal in refusals:
        assert RIVAL not in refusal.details() and "rival-spring" not in refusal.details()
    listed = await stub.ListReconstructions(dpb.ListReconstructionsRequest(workspace_id=brand.workspace_id))
    assert [r.outcome for r in listed.reconstructions] == ["not_archived"]
    assert await redis.xrange(MessageArchive.audit_key(RIVAL)) == rival_audit
    suppressions = await stub.ListSuppressions(
        dpb.ListSuppressionsRequest(workspace_id=brand.workspace_id, channel=C.CHANNEL_SMS)
    )
    assert list(suppressions.suppressions) == []
