"""What a refusal of what every message shares holds back (`CallRefusal`, `RefusalHold`), on a fake connector."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.message_map import MessageMap
from libs.settings import DispatcherSettings
from services.dispatcher import campaign as campaign_module
from services.dispatcher.campaign import CampaignCall, CampaignSender, _BatchState, _Pending
from services.dispatcher.connectors.base import (
    REFUSED_FOR_TEMPLATE,
    OutboundMessage,
    SendOutcome,
    SendStatus,
)

REFUSAL = "twilio refused the connector's credentials (HTTP 401, twilio error 20003): fix the connector"
HELD_BACK = f"not attempted: an earlier batch through the connector was refused for the connector's account ({REFUSAL})"


class FakeConnector:
    """One message a request; refuses the account for the messages named, sends the others. A message
    named in `gated` is answered once its gate opens (`arrived[id]` is set when it reaches us)."""

    provider = "twilio"
    max_batch = 1

    def __init__(self, refuse: set[str] = frozenset(), gated: set[str] = frozenset()) -> None:
        self.refuse = refuse
        self.requests: list[str] = []
        self.arrived = {message_id: asyncio.Event() for message_id in gated}
        self.gates = {message_id: asyncio.Event() for message_id in gated}

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        (message,) = messages
        self.requests.append(message.message_id)
        if message.message_id in self.gates:
            self.arrived[message.message_id].set()
            await self.gates[message.message_id].wait()
        if message.message_id in self.refuse:
            return [
                SendOutcome(
                    message.message_id,
                    SendStatus.FAILED,
                    error_code="PROVIDER_AUTH_FAILED",
                    error_message=REFUSAL,
                    account_refused=True,
                )
            ]
        return [SendOutcome(message.message_id, SendStatus.SENT, provider_message_id=f"SM{message.message_id}")]

    async def close(self) -> None:
        pass


@pytest.fixture
async def sender():
    settings = DispatcherSettings(
        redis_url="redis://127.0.0.1:1/0", secret_key="", send_concurrency=4, send_concurrency_per_workspace=2
    )
    redis = aioredis.Redis.from_url(settings.redis_url)
    yield CampaignSender(redis, None, MessageMap(redis, settings.message_ttl_seconds), settings, None)  # type: ignore[arg-type]
    await redis.aclose()


def a_call(client: FakeConnector) -> CampaignCall:
    return CampaignCall(
        workspace_id="brand",
        campaign_id="spring",
        campaign_instance_id="run-1",
        channel=common_pb2.CHANNEL_SMS,
        connector=pb.Connector(connector_id="twilio", kind=pb.CONNECTOR_KIND_TWILIO),
        client=client,  # type: ignore[arg-type]
        content=pb.Content(sms_body="Hi"),
        templates=None,  # type: ignore[arg-type]
    )


def batch(name: str, n: int) -> list[tuple[_Pending, OutboundMessage]]:
    made = []
    for i in range(n):
        message_id, anonymous_id = f"{name}{i}", f"cust-{name}{i}"
        message = OutboundMessage(message_id, anonymous_id, "spring", "run-1", to="+15550100000")
        made.append((_Pending(i, pb.Recipient(anonymous_id=anonymous_id), message_id, anonymous_id), message))
    return made


def pending(n: int) -> list[_Pending]:
    return [p for p, _ in batch("p", n)]


async def test_a_batch_sending_beside_the_refused_one_stops_before_its_next_request(sender) -> None:
    """Two send slots for the workspace: the refused batch's first request holds one, the batch beside it
    the other with its own first request; its next waits for a slot, and once the refusal is met goes
    no further."""
    client = FakeConnector(refuse={"a0"}, gated={"a0", "b0"})
    call = a_call(client)
    refused, beside = batch("a", 1), batch("b", 3)
    sending = asyncio.ensure_future(sender._send(call, refused, _BatchState()))
    await client.arrived["a0"].wait()
    sending_beside = asyncio.ensure_future(sender._send(call, beside, _BatchState()))
    await client.arrived["b0"].wait()
    client.gates["a0"].set()
    await sending
    client.gates["b0"].set()
    await sending_beside

    assert client.requests == ["a0", "b0"]
    assert [p.result.error_code for p, _ in refused] == ["PROVIDER_AUTH_FAILED"]
    assert [p.result.error_code for p, _ in beside] == ["", "PROVIDER_AUTH_FAILED", "PROVIDER_AUTH_FAILED"]
    assert [p.result.error_message for p, _ in beside[1:]] == [HELD_BACK] * 2
    assert [p.outcome.attempts for p, _ in beside[1:]] == [0, 0]
    assert not any(p.dispatched for p, _ in beside[1:])  # released for a re-run
    assert not call.hold.sending  # no batch is told of refusals once done


async def test_a_batch_fetched_while_another_was_refused_sends_nothing(sender) -> None:
    client = FakeConnector(refuse={"a0"})
    call = a_call(client)
    state = _BatchState()
    assert not sender._held_back(call, state, pending(3))  # its check: nothing refused yet
    await sender._send(call, batch("a", 2), _BatchState())
    late = batch("b", 2)
    await sender._send(call, late, state)
    assert client.requests == ["a0"]
    assert [p.result.error_message for p, _ in late] == [HELD_BACK] * 2


async def test_the_next_batches_are_held_back_and_after_the_hold_one_tries_again(sender, monkeypatch) -> None:
    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", 3600.0)
    client = FakeConnector(refuse={"a0"})
    call = a_call(client)
    await sender._send(call, batch("a", 1), _BatchState())
    held = pending(4)
    assert sender._held_back(call, _BatchState(), held)
    assert {(p.result.status, p.result.error_code, p.result.error_message, p.result.keep_id) for p in held} == {
        (pb.DISPATCH_STATUS_SEND_FAILED, "PROVIDER_AUTH_FAILED", HELD_BACK, False)
    }

    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", 0.0)
    probe, beside = _BatchState(), _BatchState()
    assert not sender._held_back(call, probe, pending(2))
    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", 3600.0)
    assert sender._held_back(call, beside, pending(2))  # one batch tries again; the others wait for its answer

    # Answered without a refusal: the call goes on.
    sent = batch("c", 2)
    await sender._send(call, sent, probe)
    assert [p.result.status for p, _ in sent] == [pb.DISPATCH_STATUS_SENT] * 2
    assert call.hold.refusal is None and probe.probe is None
    assert not sender._held_back(call, _BatchState(), pending(2))


async def test_a_batch_trying_again_without_an_answer_leaves_it_to_the_next(sender, monkeypatch) -> None:
    client = FakeConnector(refuse={"a0"})
    call = a_call(client)
    await sender._send(call, batch("a", 1), _BatchState())
    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", 0.0)
    probe = _BatchState()
    assert not sender._held_back(call, probe, pending(1))
    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", 3600.0)
    sender._unanswered(call, probe)  # every recipient failed to resolve, say: no request made
    assert not sender._held_back(call, _BatchState(), pending(1))
    assert call.hold.refusal is not None  # still remembered: that batch tries, the others wait


async def test_a_refusal_tried_again_and_met_again_holds_anew(sender, monkeypatch) -> None:
    client = FakeConnector(refuse={"a0", "c0"})
    call = a_call(client)
    await sender._send(call, batch("a", 1), _BatchState())
    first = call.hold.refusal
    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", 0.0)
    probe = _BatchState()
    assert not sender._held_back(call, probe, pending(1))
    monkeypatch.setattr(campaign_module, "REFUSAL_HOLD_SECONDS", 3600.0)
    again = batch("c", 3)
    await sender._send(call, again, probe)
    assert client.requests == ["a0", "c0"]
    assert call.hold.refusal is not None and call.hold.refusal is not first
    sender._unanswered(call, probe)  # as the batch ends: the refusal met in its place holds on
    assert sender._held_back(call, _BatchState(), pending(1))


@pytest.mark.parametrize("code", ["HTTP_400", "RATE_LIMITED", "SERVER_ERROR"])
async def test_a_failure_of_one_message_a_429_or_a_5xx_is_not_remembered(sender, code) -> None:
    class Failing(FakeConnector):
        async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
            self.requests.append(messages[0].message_id)
            return [SendOutcome(messages[0].message_id, SendStatus.FAILED, error_code=code)]

    client = Failing()
    call = a_call(client)
    await sender._send(call, batch("a", 3), _BatchState())
    assert call.hold.refusal is None and len(client.requests) == 3
    assert not sender._held_back(call, _BatchState(), pending(1))


def test_the_held_back_message_names_what_was_refused_and_quotes_only_the_refusal() -> None:
    refused = SendOutcome(
        "m",
        SendStatus.FAILED,
        error_code="TEMPLATE_REFUSED",
        error_message="whatsapp refused the campaign's template: the template does not exist "
        "(HTTP 400, whatsapp error 132001)",
        account_refused=True,
        refused_for=REFUSED_FOR_TEMPLATE,
    )
    refusal = campaign_module.CallRefusal.met(refused)
    assert refusal.result.error_message == (
        "not attempted: an earlier batch through the connector was refused for the campaign's whatsapp template "
        f"({refused.error_message})"
    )
    assert refusal.unsent.attempts == 0 and refusal.unsent.refused_for == REFUSED_FOR_TEMPLATE
    assert not refusal.unsent.account_refused  # a message held back is no refusal of its own


async def test_calls_through_one_client_share_a_hold_by_content_kind_and_a_test_send_keeps_its_own(sender) -> None:
    client = FakeConnector(refuse={"a0"})
    first, second = a_call(client), a_call(client)
    templated = a_call(client)
    templated.content = pb.Content(whatsapp_template=pb.WhatsAppTemplate(name="welcome", language="en_US"))
    test_send = a_call(client)
    test_send.track = False
    await sender._send(first, batch("a", 1), _BatchState())
    assert second.hold is None or second.hold.refusal is None  # found at its first batch's check
    assert sender._held_back(second, _BatchState(), pending(1))
    assert second.hold is first.hold
    assert not sender._held_back(templated, _BatchState(), pending(1))  # another content kind meets its own
    # WhatsApp judges a template by its name, language and count of parameters (132000): a campaign sending
    # the wrong count holds back none sending the right one.
    refused_template = SendOutcome("t", SendStatus.FAILED, account_refused=True, refused_for=REFUSED_FOR_TEMPLATE)
    sender._remember(templated, refused_template)
    right_count = a_call(client)
    right_count.content = pb.Content(
        whatsapp_template=pb.WhatsAppTemplate(name="welcome", language="en_US", params=["{{ first_name }}"])
    )
    same = a_call(client)
    same.content = templated.content
    assert not sender._held_back(right_count, _BatchState(), pending(1))
    assert sender._held_back(same, _BatchState(), pending(1))
    assert not sender._held_back(test_send, _BatchState(), pending(1))
    assert not sender._held_back(a_call(FakeConnector()), _BatchState(), pending(1))  # another client


async def test_a_client_s_holds_go_with_it_and_a_client_keeps_few_quiet_ones(sender) -> None:
    import gc

    client = FakeConnector()
    for n in range(campaign_module.MAX_HOLDS_PER_CLIENT + 10):
        call = a_call(client)
        call.content = pb.Content(whatsapp_template=pb.WhatsAppTemplate(name=f"t{n}", language="en"))
        assert not sender._held_back(call, _BatchState(), pending(1))
    assert len(sender._holds[client]) <= campaign_module.MAX_HOLDS_PER_CLIENT
    del client, call
    gc.collect()
    assert len(sender._holds) == 0
