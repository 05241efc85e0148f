"""A provider that keeps answering 429: bounded retries (Retry-After honoured), then SEND_FAILED.

The 5xx, connection-reset and unknown-outcome cases are in test_dispatcher_campaigns.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest
from pydantic import ValidationError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.campaign_stats import read_counts
from libs.errors import Unavailable
from libs.settings import DispatcherSettings
from services.dispatcher.campaign import CampaignSender
from tests.integration.test_dispatcher_campaigns import (
    EMAIL,
    SMS,
    dispatch,
    dispatch_request,
    recipients,
    stream_requests,
)
from tests.unit.test_connectors_http_retry import SilentPeer

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus


@pytest.mark.parametrize(
    ("channel", "connector_id", "content", "provider"),
    [(C.CHANNEL_SMS, "gateway", SMS, "custom"), (C.CHANNEL_EMAIL, "sendgrid", EMAIL, "sendgrid")],
)
async def test_429_is_retried_a_bounded_number_of_times_then_send_failed(
    start_suite, redis, channel, connector_id, content, provider
):
    suite = await start_suite(provider_max_retries=2)
    suite.providers.set_faults(provider, rate_limit_count=-1, retry_after_seconds=0)
    reply = await dispatch(suite, channel, connector_id, content, recipients(2))
    assert [r.status for r in reply.results] == [S.DISPATCH_STATUS_SEND_FAILED] * 2
    assert {r.error_code for r in reply.results} == {"RATE_LIMITED"}
    assert all(r.message_id == "" for r in reply.results)  # nothing left us: no message ID to map
    # Per request, the first attempt and two retries: a request per SMS; both personalised Emails in
    # one request, their names as substitutions.
    requests = 2 if provider == "custom" else 1
    assert suite.providers.stats.requests[provider] == requests * (1 + 2)
    assert suite.providers.outbox_for(provider) == []
    counts = await read_counts(redis, suite.workspace_id, "spring", "run-1")
    assert counts["send_failed"] == 2 and counts.get("sent", 0) == 0

    # Not sent, so not claimed: once the provider recovers the same instance sends them.
    suite.providers.clear_faults()
    again = await dispatch(suite, channel, connector_id, content, recipients(2))
    assert {r.status for r in again.results} == {S.DISPATCH_STATUS_SENT}


async def test_retry_after_is_waited_for_then_the_send_goes_through(start_suite):
    suite = await start_suite()
    suite.providers.set_faults("custom", rate_limit_count=1, retry_after_seconds=1)
    started = time.monotonic()
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1))
    assert reply.results[0].status == S.DISPATCH_STATUS_SENT
    assert time.monotonic() - started >= 0.95  # our own backoff is 10-40 ms in tests: only Retry-After explains it
    assert suite.providers.stats.requests["custom"] == 2


async def test_retry_after_beyond_the_limit_fails_at_once(start_suite):
    suite = await start_suite(provider_max_retry_after_seconds=0.5)
    suite.providers.set_faults("custom", rate_limit_count=-1, retry_after_seconds=30)
    started = time.monotonic()
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1))
    assert reply.results[0].status == S.DISPATCH_STATUS_SEND_FAILED
    assert reply.results[0].error_code == "RATE_LIMITED"
    assert "asked to wait 30s" in reply.results[0].error_message
    assert time.monotonic() - started < 5
    assert suite.providers.stats.requests["custom"] == 1


async def test_a_provider_slower_than_the_read_timeout_ends_outcome_unknown_and_is_not_resent(start_suite):
    # Connect + read is one deadline per HTTP attempt: 0.5 s here, against a reply that takes 3 s.
    suite = await start_suite(provider_connect_timeout_seconds=0.2, provider_read_timeout_seconds=0.3)
    suite.providers.set_faults("custom", latency_ms=3000)
    started = time.monotonic()
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1))
    assert time.monotonic() - started < 2.5
    assert reply.results[0].status == S.DISPATCH_STATUS_SEND_FAILED
    assert reply.results[0].error_code == "OUTCOME_UNKNOWN"
    assert reply.results[0].message_id  # it may have reached the gateway: the ID stays mapped for its receipt
    assert suite.providers.stats.requests["custom"] == 1


def test_provider_timeouts_must_be_positive() -> None:
    for field in ("provider_connect_timeout_seconds", "provider_read_timeout_seconds"):
        with pytest.raises(ValidationError, match=field):
            DispatcherSettings(**{field: 0})


async def test_a_call_cancelled_mid_send_resends_nothing_after_the_lease(start_suite):
    """The caller gives up while four requests are at the gateway and four more were answered. The
    answered ones are settled sent; each of the four in flight may have gone out, so its claim ends
    OUTCOME_UNKNOWN rather than free. A re-run after the claim lease sends neither again: only the
    four never sent."""
    suite = await start_suite(claim_lease_seconds=1, send_concurrency=4, send_concurrency_per_workspace=4)
    suite.providers.set_faults("custom", latency_ms=400)
    request = dispatch_request(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(12))
    call = suite.dispatcher.stub.Dispatch(request)
    for _ in range(500):
        if suite.providers.stats.requests["custom"] == 8:  # the second four sent, the first answered
            break
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    suite.providers.set_faults("custom", latency_ms=0)
    await asyncio.sleep(1.5)  # past the lease, and past the gateway's late answers
    assert suite.providers.stats.requests["custom"] == 8

    rerun = await suite.dispatcher.stub.Dispatch(request)
    codes = Counter((S.Name(r.status), r.error_code) for r in rerun.results)
    assert codes == {
        ("DISPATCH_STATUS_DUPLICATE", "DUPLICATE"): 4,  # answered before the cancel: sent
        ("DISPATCH_STATUS_DUPLICATE", "OUTCOME_UNKNOWN"): 4,  # at the gateway when it came
        ("DISPATCH_STATUS_SENT", ""): 4,
    }
    assert suite.providers.stats.requests["custom"] == 12  # each recipient's request once, in all


async def test_sendgrid_refusing_some_addresses_of_a_request_fails_only_those(start_suite):
    """SendGrid takes nothing of a 400, and names the personalizations it refused: they fail, the
    request goes again without them, and the rest are sent."""
    suite = await start_suite()
    people = recipients(6)
    refused = [suite.pii_api.sandbox.customers[p.anonymous_id].email for p in people[1:3]]
    suite.providers.set_faults("sendgrid", reject_to=refused)
    reply = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", EMAIL, people)
    outcomes = [(S.Name(r.status), r.error_code) for r in reply.results]
    assert (
        outcomes
        == [("DISPATCH_STATUS_SENT", "")]
        + [("DISPATCH_STATUS_SEND_FAILED", "INVALID_ADDRESS")] * 2
        + [("DISPATCH_STATUS_SENT", "")] * 3
    )
    assert all("@" not in r.error_message for r in reply.results)
    assert len(suite.providers.outbox_for("sendgrid")) == 4
    assert suite.providers.stats.statuses["sendgrid 400"] == 1  # one refusal, one resend: no loop


async def test_a_failing_batch_lets_the_batch_beside_it_finish_sending(start_suite, monkeypatch):
    """The stream's first batch fails (here: an error injected once its neighbour is sending); the
    call ends on that error, but the second batch, mid-send, finishes and settles. A re-run finds its
    recipients sent, not cut off as OUTCOME_UNKNOWN, and sends the first batch's."""
    send_batch = CampaignSender.send_batch

    async def first_batch_fails(self, call, recipients):
        if recipients[0].anonymous_id == "cust-000001":
            await asyncio.sleep(0.3)  # the second batch's requests are at the gateway by now
            raise Unavailable("store unavailable, retry later")
        return await send_batch(self, call, recipients)

    monkeypatch.setattr(CampaignSender, "send_batch", first_batch_fails)
    suite = await start_suite(batch_size=4)
    suite.providers.set_faults("custom", latency_ms=600)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in suite.dispatcher.stub.DispatchStream(stream_requests(suite, "beside-1", [recipients(8)])):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert suite.providers.stats.requests["custom"] == 4
    monkeypatch.setattr(CampaignSender, "send_batch", send_batch)
    suite.providers.set_faults("custom", latency_ms=0)
    again = suite.dispatcher.stub.DispatchStream(stream_requests(suite, "beside-1", [recipients(8)]))
    rerun = [r for reply in [x async for x in again] for r in reply.results]
    assert [(S.Name(r.status), r.error_code) for r in rerun] == [("DISPATCH_STATUS_SENT", "")] * 4 + [
        ("DISPATCH_STATUS_DUPLICATE", "DUPLICATE")
    ] * 4
    assert suite.providers.stats.requests["custom"] == 8  # each recipient once


async def test_a_recipient_who_opted_out_with_twilio_is_suppressed(start_suite, customers):
    """Twilio refuses a number that replied STOP to the sender (error 21610): that recipient fails
    RECIPIENT_OPTED_OUT and is suppressed, so the next campaign fetches and sends nothing for them."""
    suite = await start_suite()
    suite.providers.set_faults("twilio", opted_out=[customers["cust-000002"].phone])
    first = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(3))
    assert [(S.Name(r.status), r.error_code) for r in first.results] == [
        ("DISPATCH_STATUS_SENT", ""),
        ("DISPATCH_STATUS_SEND_FAILED", "RECIPIENT_OPTED_OUT"),
        ("DISPATCH_STATUS_SENT", ""),
    ]
    assert customers["cust-000002"].phone not in first.results[1].error_message
    listed = await suite.dispatcher.stub.ListSuppressions(
        pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_SMS)
    )
    assert [(e.anonymous_id, e.reason) for e in listed.suppressions] == [
        ("cust-000002", pb.SUPPRESSION_REASON_PROVIDER_UNSUBSCRIBE)
    ]
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(3), instance="run-2")
    assert [r.status for r in again.results][1] == S.DISPATCH_STATUS_SUPPRESSED


async def test_a_provider_that_never_answers_costs_the_campaign_one_message_s_retries(start_suite, redis):
    """Twilio's host accepts connections and never answers TLS (a blackholing balancer). The four SMS in
    flight fail together, one try; two more, one at a time, spend the retries, and the other 36 fail at
    once, unsent: no message ID kept, the recipients released, so the same instance sends them once it is
    back. Each SMS used to make its own three tries."""
    # The longest backoff only sets how long the provider is given up on (10.5 s): the delays stay 10-40 ms.
    suite = await start_suite(
        provider_max_retries=2,
        provider_connect_timeout_seconds=0.5,
        provider_retry_max_ms=10_000,
        send_concurrency=4,
        send_concurrency_per_workspace=4,
    )
    twilio = suite.workspace.connectors()["twilio"]
    async with SilentPeer() as blackhole:
        twilio.base_url = f"https://127.0.0.1:{blackhole.port}"
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=twilio))
        # Generous: three 0.5 s tries; three per message, four at a time, would take 15 s.
        async with asyncio.timeout(60):
            reply = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(40))
    assert blackhole.connections <= 4 + 2
    assert {(r.status, r.error_code, r.message_id) for r in reply.results} == {
        (S.DISPATCH_STATUS_SEND_FAILED, "CONNECTION_FAILED", "")
    }
    untried = [r.error_message for r in reply.results if r.error_message.startswith("not attempted")]
    assert len(untried) == 36
    assert set(untried) == {
        "not attempted: twilio could not be reached through the connector "
        "(could not connect to twilio after 3 attempts); not sent, a re-run sends it"
    }
    counts = await read_counts(redis, suite.workspace_id, "spring", "run-1")
    assert counts["send_failed"] == 40 and counts.get("sent", 0) == 0

    twilio.base_url = f"http://127.0.0.1:{suite.providers_port}"
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=twilio))
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(40))
    assert {r.status for r in again.results} == {S.DISPATCH_STATUS_SENT}
    assert len(suite.providers.outbox_for("twilio")) == 40


async def test_a_recipient_who_stopped_marketing_messages_in_whatsapp_is_suppressed(start_suite, customers):
    """Meta refuses a send to a customer who stopped the business's marketing messages (131050): that
    recipient fails RECIPIENT_OPTED_OUT and is suppressed on WhatsApp, as Twilio's 21610 is on SMS."""
    suite = await start_suite()
    suite.providers.set_faults("whatsapp", opted_out=[customers["cust-000002"].phone])
    first = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, recipients(3))
    assert [(S.Name(r.status), r.error_code) for r in first.results] == [
        ("DISPATCH_STATUS_SENT", ""),
        ("DISPATCH_STATUS_SEND_FAILED", "RECIPIENT_OPTED_OUT"),
        ("DISPATCH_STATUS_SENT", ""),
    ]
    assert "131050" in first.results[1].error_message
    assert customers["cust-000002"].phone.lstrip("+") not in first.results[1].error_message
    listed = await suite.dispatcher.stub.ListSuppressions(
        pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_WHATSAPP)
    )
    assert [(e.anonymous_id, e.reason) for e in listed.suppressions] == [
        ("cust-000002", pb.SUPPRESSION_REASON_PROVIDER_UNSUBSCRIBE)
    ]
    assert suite.providers.stats.requests["whatsapp"] == 3  # one refusal of a recipient stops nothing
    again = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, recipients(3), instance="run-2")
    assert [r.status for r in again.results][1] == S.DISPATCH_STATUS_SUPPRESSED
