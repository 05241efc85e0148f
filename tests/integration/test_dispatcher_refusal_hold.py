"""A refusal of what every message of a call shares holds back the next batches through the connector.

Once a batch of a DispatchStream or a Dispatch meets a refusal of the connector's account or of the
campaign's WhatsApp template, the next batches through the connector (this call's and other calls') fail
with its code before the PII API is asked or a provider request made, released for a re-run; after
REFUSAL_HOLD_SECONDS one batch tries again. A refusal of one message, a 429 or a 5xx holds nothing back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.campaign_stats import read_counts
from sandbox.pii_api import generate_customers
from services.dispatcher import campaign as campaign_module
from tests.integration.test_connectors_account_refusals import failures, put_connector
from tests.integration.test_dispatcher_campaigns import SMS, WHATSAPP_TEMPLATE, dispatch, recipients, stream_requests

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus

HELD_BACK = "not attempted: an earlier batch through the connector was refused for the connector's account"
HELD_BACK_FOR_TEMPLATE = (
    "not attempted: an earlier batch through the connector was refused for the campaign's whatsapp template"
)
NOT_ATTEMPTED = "not attempted: an earlier message of the batch was refused for the connector's account"
AUTH_FAILED = ("DISPATCH_STATUS_SEND_FAILED", "PROVIDER_AUTH_FAILED")
BATCH = 10
A_LONG_HOLD = 3600.0


class StepStream:
    """A DispatchStream whose client sends a batch's recipients, reads the batch's results, then sends the next."""

    def __init__(self, suite, instance: str, channel: int, connector_id: str, content: pb.Content) -> None:
        self._parts: asyncio.Queue[list[pb.Recipient] | None] = asyncio.Queue()
        self._call = suite.dispatcher.stub.DispatchStream(
            self._requests(suite, instance, channel, connector_id, content)
        )

    async def _requests(
        self, suite, instance, channel, connector_id, content
    ) -> AsyncIterator[pb.DispatchStreamRequest]:
        async for request in stream_requests(suite, instance, [], channel, connector_id, content):
            yield request  # the header
        while (part := await self._parts.get()) is not None:
            yield pb.DispatchStreamRequest(recipients=pb.DispatchStreamRequest.Recipients(recipients=part))

    async def batch(self, people: list[pb.Recipient]) -> list[pb.DispatchResult]:
        await self._parts.put(people)
        reply = await self._call.read()
        assert reply is not grpc.aio.EOF
        return list(reply.results)

    async def end(self) -> pb.DispatchSummary:
        await self._parts.put(None)
        reply = await self._call.read()
        assert reply is not grpc.aio.EOF and reply.HasField("summary")
        return reply.summary


def outcomes(results: list[pb.DispatchResult]) -> list[tuple[str, str]]:
    return [(S.Name(r.status), r.error_code) for r in results]


def held(hold: float, monkeypatch) -> None:
    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", hold)


async def test_a_stream_s_batches_after_a_refused_token_ask_neither_the_pii_api_nor_the_provider(
    start_suite, redis, monkeypatch
):
    held(A_LONG_HOLD, monkeypatch)
    suite = await start_suite(batch_size=BATCH, send_concurrency=1)
    suite.pii_api.sandbox.customers.update(generate_customers(40))
    original = await put_connector(suite, "twilio", auth_token="0" * 32)
    stream = StepStream(suite, "run-1", C.CHANNEL_SMS, "twilio", SMS)

    first = await stream.batch(recipients(BATCH))
    assert suite.providers.stats.requests["twilio"] == 1
    assert [(S.Name(r.status), r.error_code) for r in first] == [
        ("DISPATCH_STATUS_SEND_FAILED", "PROVIDER_AUTH_FAILED")
    ] * 10
    refusal = first[0].error_message
    assert not refusal.startswith("not attempted") and all(r.error_message.startswith(NOT_ATTEMPTED) for r in first[1:])
    fetched = suite.pii_api.sandbox.stats.ids_requested
    assert fetched == BATCH

    later = [r for start in (11, 21, 31) for r in await stream.batch(recipients(BATCH, start=start))]
    summary = await stream.end()
    # Nothing asked of the PII API or the provider for them: the call's refusal answers them.
    assert suite.providers.stats.requests["twilio"] == 1
    assert suite.pii_api.sandbox.stats.ids_requested == fetched
    assert [(S.Name(r.status), r.error_code) for r in later] == [
        ("DISPATCH_STATUS_SEND_FAILED", "PROVIDER_AUTH_FAILED")
    ] * 30
    assert all(r.error_message == f"{HELD_BACK} ({refusal})" for r in later)
    assert all(r.message_id == "" for r in later)  # nothing left us: nothing mapped
    assert summary.send_failed == 40 and summary.sent == 0 and summary.attempted == 40
    counts = await read_counts(redis, suite.workspace_id, "spring", "run-1")
    assert counts["send_failed"] == 40 and counts.get("sent", 0) == 0

    # Released, every one of them: with the token fixed, a run of the same instance sends them all.
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=original))
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(40))
    assert failures(again) == [("DISPATCH_STATUS_SENT", "")] * 40
    assert suite.providers.stats.requests["twilio"] == 1 + 40


async def test_a_dispatch_of_many_batches_holds_its_later_batches_back(start_suite, monkeypatch):
    held(A_LONG_HOLD, monkeypatch)
    suite = await start_suite(batch_size=BATCH, send_concurrency=1)
    suite.pii_api.sandbox.customers.update(generate_customers(30))
    await put_connector(suite, "whatsapp", access_token="EAAG-expired-token")
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, recipients(30))
    assert suite.providers.stats.requests["whatsapp"] == 1
    assert suite.pii_api.sandbox.stats.ids_requested == BATCH
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", "PROVIDER_AUTH_FAILED")] * 30
    assert all(r.error_message.startswith(HELD_BACK) for r in reply.results[BATCH:])
    assert reply.summary.send_failed == 30


async def test_batches_in_flight_beside_the_refused_one_make_no_request_after_it(start_suite):
    """Every part at once: the next batch is fetched while the first sends. One request is refused (one
    send slot), and no batch makes another: the batch fetched beside it stops before its requests, and
    the batches after it fetch nothing."""
    suite = await start_suite(batch_size=BATCH, send_concurrency=1)
    suite.pii_api.sandbox.customers.update(generate_customers(50))
    suite.providers.set_faults("twilio", latency_ms=300)
    await put_connector(suite, "twilio", auth_token="0" * 32)
    parts = [recipients(BATCH, start=start) for start in range(1, 51, BATCH)]
    stream = suite.dispatcher.stub.DispatchStream(stream_requests(suite, "run-1", parts, C.CHANNEL_SMS, "twilio"))
    results = [r for reply in [reply async for reply in stream] for r in reply.results]

    assert suite.providers.stats.requests["twilio"] == 1
    assert [(S.Name(r.status), r.error_code) for r in results] == [
        ("DISPATCH_STATUS_SEND_FAILED", "PROVIDER_AUTH_FAILED")
    ] * 50
    messages = [r.error_message for r in results]
    assert sum(not m.startswith("not attempted") for m in messages) == 1
    assert sum(m.startswith(NOT_ATTEMPTED) for m in messages) == BATCH - 1  # the refused batch's others
    assert sum(m.startswith(HELD_BACK) for m in messages) == 40
    # The first two batches' contacts at most: those begun before the refusal was met.
    assert suite.pii_api.sandbox.stats.ids_requested <= 2 * BATCH


async def test_once_the_hold_is_over_one_batch_tries_again(start_suite, monkeypatch):
    """A misspelled template, fixed while the stream runs: the batches held back fail unsent; once the
    hold is over a batch tries again, refused again holds the next ones back anew, answered lifts it."""
    held(A_LONG_HOLD, monkeypatch)
    suite = await start_suite(batch_size=BATCH, send_concurrency=1)
    suite.pii_api.sandbox.customers.update(generate_customers(60))
    suite.providers.set_faults("whatsapp", template_errors={WHATSAPP_TEMPLATE.whatsapp_template.name: 132001})
    stream = StepStream(suite, "run-1", C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE)
    stats, pii = suite.providers.stats.requests, suite.pii_api.sandbox.stats

    def codes(results: list[pb.DispatchResult]) -> set[tuple[str, str]]:
        return {(S.Name(r.status), r.error_code) for r in results}

    first = await stream.batch(recipients(BATCH, start=1))
    assert codes(first) == {("DISPATCH_STATUS_SEND_FAILED", "TEMPLATE_REFUSED")} and stats["whatsapp"] == 1
    assert pii.ids_requested == 10

    second = await stream.batch(recipients(BATCH, start=11))
    assert all(r.error_message.startswith(HELD_BACK_FOR_TEMPLATE) for r in second)
    assert stats["whatsapp"] == 1 and pii.ids_requested == 10

    held(0.0, monkeypatch)  # the hold is over: this batch tries again, and is refused again
    third = await stream.batch(recipients(BATCH, start=21))
    assert codes(third) == {("DISPATCH_STATUS_SEND_FAILED", "TEMPLATE_REFUSED")}
    assert not third[0].error_message.startswith("not attempted")
    assert stats["whatsapp"] == 2 and pii.ids_requested == 20

    held(A_LONG_HOLD, monkeypatch)  # held back anew from that refusal
    fourth = await stream.batch(recipients(BATCH, start=31))
    assert all(r.error_message.startswith(HELD_BACK_FOR_TEMPLATE) for r in fourth)
    assert stats["whatsapp"] == 2 and pii.ids_requested == 20

    suite.providers.clear_faults()  # the template fixed
    held(0.0, monkeypatch)
    fifth = await stream.batch(recipients(BATCH, start=41))
    assert codes(fifth) == {("DISPATCH_STATUS_SENT", "")}
    held(A_LONG_HOLD, monkeypatch)  # answered: nothing holds the call back any more
    sixth = await stream.batch(recipients(BATCH, start=51))
    assert codes(sixth) == {("DISPATCH_STATUS_SENT", "")}
    summary = await stream.end()
    assert stats["whatsapp"] == 2 + 20 and pii.ids_requested == 40
    assert summary.sent == 20 and summary.send_failed == 40

    # The held-back recipients were released: a re-run of the instance sends them, and only them.
    again = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE, recipients(60))
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_SENT] * 40 + [S.DISPATCH_STATUS_DUPLICATE] * 20


async def test_a_refused_recipient_a_429_or_a_5xx_holds_no_batch_back(start_suite, customers, monkeypatch):
    held(A_LONG_HOLD, monkeypatch)
    suite = await start_suite(batch_size=BATCH, send_concurrency=1)
    suite.pii_api.sandbox.customers.update(generate_customers(40))
    stream = StepStream(suite, "run-1", C.CHANNEL_WHATSAPP, "whatsapp", SMS)
    stats = suite.providers.stats.requests
    batches = [recipients(BATCH, start=start) for start in (1, 11, 21, 31)]

    refused = [customers[p.anonymous_id].phone for p in batches[0][:2]]  # not on WhatsApp (131026)
    suite.providers.set_faults("whatsapp", reject_to=set(refused))
    one = await stream.batch(batches[0])
    assert [r.error_code for r in one] == ["HTTP_400"] * 2 + [""] * 8

    suite.providers.set_faults("whatsapp", rate_limit_count=-1, retry_after_seconds=0)
    made = stats["whatsapp"]
    throttled = await stream.batch(batches[1])
    assert {r.error_code for r in throttled} == {"RATE_LIMITED"} and stats["whatsapp"] - made >= BATCH

    suite.providers.set_faults("whatsapp", status=503, status_count=-1)
    made = stats["whatsapp"]
    failing = await stream.batch(batches[2])
    assert {r.error_code for r in failing} == {"SERVER_ERROR"} and stats["whatsapp"] - made >= BATCH

    suite.providers.clear_faults()
    made = stats["whatsapp"]
    last = await stream.batch(batches[3])
    assert [r.status for r in last] == [S.DISPATCH_STATUS_SENT] * BATCH and stats["whatsapp"] - made == BATCH
    await stream.end()
    assert not any(r.error_message.startswith("not attempted") for r in [*one, *throttled, *failing])


async def test_a_paced_batch_fetches_no_part_after_its_first_is_refused(start_suite, monkeypatch):
    """Under a rate limit a batch is fetched part by part, two seconds of sending each (10 recipients at 5
    a second), each a second before its slots: once the first part's request is refused, the later parts
    are neither fetched nor sent."""
    held(A_LONG_HOLD, monkeypatch)
    suite = await start_suite(send_concurrency=1, paced_fetch_seconds=2.0)
    paced = pb.Connector()
    paced.CopyFrom(suite.workspace.connectors()["twilio"])
    paced.rate_limit_per_second, paced.credentials["auth_token"] = 5, "0" * 32
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=paced))
    reply = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(30))
    assert failures(reply) == [AUTH_FAILED] * 30
    assert suite.providers.stats.requests["twilio"] == 1
    assert suite.pii_api.sandbox.stats.ids_requested == 10
    assert all(r.error_message.startswith(HELD_BACK) for r in reply.results[10:])


async def test_later_calls_through_the_refused_connector_are_held_back_until_it_is_saved_again(
    start_suite, monkeypatch
):
    """A campaign engine calling Dispatch a few recipients at a time: after one call meets a revoked key,
    the next calls through the connector, of any campaign, fetch no contact and make no request; the
    connector saved again is a new client, which tries."""
    held(A_LONG_HOLD, monkeypatch)
    suite = await start_suite(batch_size=BATCH, send_concurrency=1)
    suite.pii_api.sandbox.customers.update(generate_customers(40))
    original = await put_connector(suite, "twilio", auth_token="0" * 32)
    stats, pii = suite.providers.stats.requests, suite.pii_api.sandbox.stats

    first = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(5))
    assert failures(first) == [AUTH_FAILED] * 5 and stats["twilio"] == 1 and pii.ids_requested == 5
    refusal = first.results[0].error_message
    later = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(5, start=6), instance="run-2")
    other = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(5, start=11), "run-3", "autumn")
    for reply in (later, other):
        assert failures(reply) == [AUTH_FAILED] * 5
        assert all(r.error_message == f"{HELD_BACK} ({refusal})" for r in reply.results)
    assert stats["twilio"] == 1 and pii.ids_requested == 5

    # A test send asks the provider itself: it is how an operator checks a connector.
    test = await suite.dispatcher.stub.SendTest(
        pb.SendTestRequest(
            workspace_id=suite.workspace_id,
            campaign_id="spring",
            channel=C.CHANNEL_SMS,
            connector_id="twilio",
            content=SMS,
            recipient=recipients(1, start=21)[0],
        )
    )
    assert test.result.error_code == "PROVIDER_AUTH_FAILED" and not test.result.error_message.startswith("not")
    assert stats["twilio"] == 2

    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=original))
    fixed = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(5, start=6), instance="run-2")
    assert failures(fixed) == [("DISPATCH_STATUS_SENT", "")] * 5 and stats["twilio"] == 2 + 5
