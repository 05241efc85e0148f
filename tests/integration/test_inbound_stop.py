"""Inbound STOP/START by SMS and WhatsApp, matched through the keyed hash of the sender's number."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from urllib.parse import urlencode, urlsplit

import grpc
import pytest
from pydantic import SecretStr
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2 as rpb

from libs.blind_index import BlindIndex
from sandbox.providers.twilio import SERVICE_SENDER
from sandbox.signing import twilio_signature
from sandbox.workspace import TWILIO_SID, TWILIO_TOKEN
from tests.canary import redis_dump
from tests.integration.beyond import ids_fetched, people, post, receipts_for, reply_by_sms, reply_by_whatsapp
from tests.integration.test_dispatcher_campaigns import dispatch
from tests.integration.test_resolver_configs import field_violations

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
SMS = pb.Content(sms_body="Hi {{ first_name }}, reply STOP to opt out")


async def test_stop_by_sms_suppresses_and_start_restores(start_suite, customers, redis, redis_url, secret_key):
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(3), "run-1")
    phone = customers["cust-000002"].phone

    # What is kept for matching: an HMAC of the number, with a TTL; never the number or its plain hash.
    index = BlindIndex(redis, suite.dispatcher.settings.secret_key)
    key = BlindIndex.key(suite.workspace_id, "sms", index.digest(suite.workspace_id, phone))
    assert (await redis.get(key)) == b"cust-000002"
    assert 0 < await redis.ttl(key) <= suite.dispatcher.settings.blind_index_ttl_seconds
    dump = b" ".join(await redis_dump(redis))
    for needle in (phone, phone[1:], hashlib.sha256(phone.encode()).hexdigest()):
        assert needle.encode() not in dump

    async with receipts_for(redis, redis_url, secret_key) as receipts:
        status, reply = await reply_by_sms(receipts, suite.workspace_id, phone, " Stop. ")
        assert status == 200 and reply.endswith("<Response></Response>")  # TwiML: nothing sent back
        asked = ids_fetched(suite.pii_api.sandbox)
        nxt = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(3), "run-2")
        assert [r.status for r in nxt.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_SUPPRESSED] + [
            S.DISPATCH_STATUS_SENT
        ]
        assert "cust-000002" not in asked
        listed = await suite.dispatcher.stub.ListSuppressions(
            pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_RCS)
        )
        assert [(e.anonymous_id, e.reason) for e in listed.suppressions] == [
            ("cust-000002", pb.SUPPRESSION_REASON_INBOUND_STOP)
        ]

        # Text that is not a keyword, and numbers we never sent to, change nothing.
        assert (await reply_by_sms(receipts, suite.workspace_id, customers["cust-000001"].phone, "stop it"))[0] == 200
        assert (await reply_by_sms(receipts, suite.workspace_id, "+14155550199", "STOP"))[0] == 200
        # A forged reply is refused.
        forged = await receipts.post(
            "twilio",
            b"From=%2B447400000000&Body=START",
            {"X-Twilio-Signature": "x"},
            connector_id="twilio",
            workspace_id=suite.workspace_id,
        )
        assert forged.status == 403

        await reply_by_sms(receipts, suite.workspace_id, phone, "start")
        after = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(3), "run-3")
        assert {r.status for r in after.results} == {S.DISPATCH_STATUS_SENT}


async def test_start_does_not_lift_the_brands_own_suppression(start_suite, customers, redis, redis_url, secret_key):
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-1")
    await suite.dispatcher.stub.SuppressRecipients(
        pb.SuppressRecipientsRequest(
            workspace_id=suite.workspace_id, channel=C.CHANNEL_SMS, anonymous_ids=["cust-000001"]
        )
    )
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_sms(receipts, suite.workspace_id, customers["cust-000001"].phone, "START")
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-2")
    assert again.results[0].status == S.DISPATCH_STATUS_SUPPRESSED


async def test_a_brands_hold_made_after_a_stop_outlasts_the_start(start_suite, customers, redis, redis_url, secret_key):
    """STOP, then the brand's own suppression (an account closed), then START: the brand's stays."""
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-1")
    phone = customers["cust-000001"].phone
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_sms(receipts, suite.workspace_id, phone, "STOP")
        held = await suite.dispatcher.stub.SuppressRecipients(
            pb.SuppressRecipientsRequest(
                workspace_id=suite.workspace_id, channel=C.CHANNEL_SMS, anonymous_ids=["cust-000001"]
            )
        )
        assert (held.suppressed, held.already_suppressed) == (0, 1)
        await reply_by_sms(receipts, suite.workspace_id, phone, "START")
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-2")
    assert again.results[0].status == S.DISPATCH_STATUS_SUPPRESSED
    listed = await suite.dispatcher.stub.ListSuppressions(
        pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_SMS)
    )
    assert [list(e.reasons) for e in listed.suppressions] == [[pb.SUPPRESSION_REASON_MANUAL]]


async def test_start_lifts_the_suppression_twilios_opt_out_refusal_made(
    start_suite, customers, redis, redis_url, secret_key
):
    """Twilio refused the number (21610: it had opted out with Twilio), then the customer texts START,
    which Twilio honours too: the next campaign reaches them."""
    suite = await start_suite()
    phone = customers["cust-000002"].phone
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(2), "run-1")  # links the numbers for replies
    suite.providers.set_faults("twilio", opted_out=[phone])
    refused = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(2), "run-2")
    assert refused.results[1].error_code == "RECIPIENT_OPTED_OUT"
    suite.providers.set_faults("twilio", opted_out=[])
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_sms(receipts, suite.workspace_id, phone, "START")
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(2), "run-3")
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_SENT] * 2


async def test_whatsapp_replies_and_workspace_keywords(start_suite, customers, redis, redis_url, secret_key):
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(4), "run-1")
    keywords = await suite.dispatcher.stub.PutOptOutKeywords(
        pb.PutOptOutKeywordsRequest(
            workspace_id=suite.workspace_id,
            keywords=pb.OptOutKeywords(stop_keywords=["halt", "Stop promotions", "Arrêt"]),
        )
    )
    # The workspace's words come after the ones that always stop, which it cannot remove.
    always = list(keywords.always_stop_keywords)
    assert always == ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "ARRET"]
    assert list(keywords.keywords.stop_keywords) == always + ["HALT", "STOP PROMOTIONS"]
    read = await suite.dispatcher.stub.GetOptOutKeywords(pb.GetOptOutKeywordsRequest(workspace_id=suite.workspace_id))
    assert read.keywords == keywords.keywords and list(read.always_stop_keywords) == always
    assert "START" in read.keywords.start_keywords  # the defaults stay for the list not given
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        # WhatsApp sends the number without "+"; its quick-reply buttons come as `button` messages.
        assert (await reply_by_whatsapp(receipts, suite.workspace_id, customers["cust-000001"].phone, "STOP"))[0] == 200
        await reply_by_whatsapp(receipts, suite.workspace_id, customers["cust-000002"].phone, "Halt!")
        await reply_by_whatsapp(receipts, suite.workspace_id, customers["cust-000003"].phone, "arrêt", kind="button")
        await reply_by_whatsapp(receipts, suite.workspace_id, customers["cust-000004"].phone, "Alto")
    nxt = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(4), "run-2")
    # STOP and ARRET still stop; HALT was added; ALTO, a default the workspace's list left out, does not.
    assert [r.status for r in nxt.results] == [S.DISPATCH_STATUS_SUPPRESSED] * 3 + [S.DISPATCH_STATUS_SENT]
    sms = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(4), "run-3")
    assert {r.status for r in sms.results} == {S.DISPATCH_STATUS_SENT}  # the SMS family is another matter


# Numbers as the PII API gives them, and as WhatsApp may write their sender (`wa_id`).
BRAZIL_MOBILE, BRAZIL_WA_ID = "+5511987654321", "551187654321"  # without the ninth digit
MEXICO_MOBILE, MEXICO_WA_ID = "+528112345678", "5218112345678"  # with the old "1"
ARGENTINA_MOBILE, ARGENTINA_WA_ID = "+541123456789", "5491123456789"  # stored without the mobile "9"


async def test_a_whatsapp_stop_from_either_spelling_of_a_brazilian_mexican_or_argentine_number_stops_its_recipient(
    start_suite, customers, redis, redis_url, secret_key
):
    """WhatsApp may write a Brazilian mobile without its ninth digit, a Mexican one with the "1" once
    dialled before it and an Argentine one with the "9" after 54: a STOP or START from either spelling
    finds the customer the number was sent to."""
    phones = (BRAZIL_MOBILE, MEXICO_MOBILE, ARGENTINA_MOBILE, "+5521998765432", "+525512345678", "+5493514567890")
    for n, phone in enumerate(phones, 1):
        customers[f"cust-{n:06d}"] = dataclasses.replace(customers[f"cust-{n:06d}"], phone=phone)
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(7), "run-1")
    assert {r.status for r in sent.results} == {S.DISPATCH_STATUS_SENT}
    # STOP from WhatsApp's spelling, START from the number's own; and the other way round.
    replies = [
        (BRAZIL_WA_ID, BRAZIL_MOBILE),
        (MEXICO_WA_ID, MEXICO_MOBILE),
        (ARGENTINA_WA_ID, ARGENTINA_MOBILE),
        ("5521998765432", "552198765432"),
        ("525512345678", "5215512345678"),
        ("543514567890", "5493514567890"),
    ]
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        for stop, _ in replies:
            assert (await reply_by_whatsapp(receipts, suite.workspace_id, stop, "STOP", sent_at=1700000100))[0] == 200
        stopped = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(7), "run-2")
        assert [r.status for r in stopped.results] == [S.DISPATCH_STATUS_SUPPRESSED] * 6 + [S.DISPATCH_STATUS_SENT]
        for _, start in replies:
            await reply_by_whatsapp(receipts, suite.workspace_id, start, "START", sent_at=1700000200)
    started = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(7), "run-3")
    assert {r.status for r in started.results} == {S.DISPATCH_STATUS_SENT}
    # One link per number sent to, as before: no spelling is written, and no number.
    assert len([key async for key in redis.scan_iter(match=f"ts:{{{suite.workspace_id}}}:bidx:*")]) == 7
    dump = b" ".join(await redis_dump(redis))
    for number, spelling in replies:
        assert number.encode() not in dump and spelling.encode() not in dump


async def test_a_link_written_under_either_spelling_is_found_from_the_other(redis, secret_key):
    """A number known without the ninth digit (or with the "1") is found from WhatsApp's other spelling
    too; an SMS sender has one spelling, the number the carrier routes."""
    index = BlindIndex(redis, SecretStr(secret_key), ttl_seconds=600)
    linked = {
        "+551187654321": "br-old",
        "+5218112345678": "mx-old",
        BRAZIL_MOBILE: "br",
        MEXICO_MOBILE: "mx",
        ARGENTINA_MOBILE: "ar",
        "+548001234567": "ar-toll-free",
    }
    async with redis.pipeline(transaction=False) as pipe:
        for number, anonymous_id in linked.items():
            index.queue_link(pipe, "ws-spell", "whatsapp", index.digest("ws-spell", number), anonymous_id)
        index.queue_link(pipe, "ws-spell", "sms", index.digest("ws-spell", BRAZIL_MOBILE), "br-sms")
        await pipe.execute()
    for wa_id, anonymous_id in [
        ("5511987654321", "br"),  # its own spelling first
        ("+552187654321", None),
        ("528112345678", "mx"),
        ("5218112345678", "mx-old"),
        (ARGENTINA_WA_ID, "ar"),
        ("5498001234567", None),  # not a mobile's shape: no spelling without the "9"
    ]:
        assert await index.lookup("ws-spell", "whatsapp", wa_id) == anonymous_id
    await redis.delete(BlindIndex.key("ws-spell", "whatsapp", index.digest("ws-spell", BRAZIL_MOBILE)))
    await redis.delete(BlindIndex.key("ws-spell", "whatsapp", index.digest("ws-spell", MEXICO_MOBILE)))
    assert await index.lookup("ws-spell", "whatsapp", BRAZIL_MOBILE) == "br-old"
    assert await index.lookup("ws-spell", "whatsapp", "whatsapp:+528112345678") == "mx-old"
    assert await index.lookup("ws-spell", "sms", BRAZIL_WA_ID) is None


async def test_no_workspace_list_stops_the_words_that_must_always_revoke_consent(
    start_suite, customers, redis, redis_url, secret_key
):
    """CTIA and the FCC's consent-revocation rule: STOP, QUIT, END, REVOKE, OPT OUT, CANCEL and
    UNSUBSCRIBE (and Twilio's STOPALL) opt a customer out by SMS, whatever the workspace saved; so does
    ARRET, which Canada's carriers require beside STOP."""
    suite = await start_suite()
    always = ["STOP", "quit", "End.", "revoke", "Opt out", "cancel", "UNSUBSCRIBE", "stop all", "Arrêt"]
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(len(always)), "run-1")
    await suite.dispatcher.stub.PutOptOutKeywords(
        pb.PutOptOutKeywordsRequest(workspace_id=suite.workspace_id, keywords=pb.OptOutKeywords(stop_keywords=["fin"]))
    )
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        for i, word in enumerate(always, start=1):
            assert (await reply_by_sms(receipts, suite.workspace_id, customers[f"cust-{i:06d}"].phone, word))[0] == 200
    nxt = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(len(always)), "run-2")
    assert [r.status for r in nxt.results] == [S.DISPATCH_STATUS_SUPPRESSED] * len(always)


@pytest.mark.parametrize(
    ("start_keywords", "field"),
    [
        (["go", "Opt out"], "keywords.start_keywords[1]"),
        (["Cancel"], "keywords.start_keywords[0]"),
        (["go", "go", "S T O P"], "keywords.start_keywords[2]"),
    ],
)
async def test_a_start_keyword_that_always_stops_is_refused_naming_the_field(start_suite, start_keywords, field):
    suite = await start_suite()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PutOptOutKeywords(
            pb.PutOptOutKeywordsRequest(
                workspace_id=suite.workspace_id, keywords=pb.OptOutKeywords(start_keywords=start_keywords)
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == [field]
    read = await suite.dispatcher.stub.GetOptOutKeywords(pb.GetOptOutKeywordsRequest(workspace_id=suite.workspace_id))
    assert list(read.keywords.start_keywords)[0] == "START"  # nothing was saved


@pytest.mark.parametrize(
    ("keywords", "field", "said"),
    [
        (
            pb.OptOutKeywords(stop_keywords=["halt", "fin"], start_keywords=["go", "go", "F I N"]),
            "keywords.start_keywords[2]",
            "F I N is keywords.stop_keywords[1] too",
        ),
        (pb.OptOutKeywords(stop_keywords=["halt", "Start"]), "keywords.stop_keywords[1]", "START is a default START"),
        (pb.OptOutKeywords(start_keywords=["go", "alto"]), "keywords.start_keywords[1]", "ALTO is a default STOP"),
    ],
    ids=["both given", "a default start", "a default stop"],
)
async def test_a_keyword_that_would_both_stop_and_start_is_refused_naming_its_entry(start_suite, keywords, field, said):
    suite = await start_suite()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PutOptOutKeywords(
            pb.PutOptOutKeywordsRequest(workspace_id=suite.workspace_id, keywords=keywords)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == [field]
    assert said in caught.value.details()


async def test_a_start_sent_before_the_stop_does_not_lift_it(start_suite, customers, redis, redis_url, secret_key):
    """WhatsApp does not promise order: a START sent before a STOP may arrive after it. When it was
    sent decides, not when it came; a START sent after the STOP does lift it."""
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(1), "run-1")
    phone = customers["cust-000001"].phone
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000200)
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "START", sent_at=1700000100)  # late
        late = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(1), "run-2")
        assert late.results[0].status == S.DISPATCH_STATUS_SUPPRESSED
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "START", sent_at=1700000300)
        after = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(1), "run-3")
        assert after.results[0].status == S.DISPATCH_STATUS_SENT

        # STOP, STOP again, and a START sent between the two arriving last: the later STOP holds.
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000400)
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000600)
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "START", sent_at=1700000500)
        between = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people(1), "run-4")
        assert between.results[0].status == S.DISPATCH_STATUS_SUPPRESSED


async def test_a_start_posted_again_after_a_later_stop_changes_nothing(
    start_suite, customers, redis, redis_url, secret_key
):
    """Twilio redelivers, and its signature carries no time, so a START can be posted again. Its
    message ID has been seen: it does not undo the STOP that came after it."""
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-1")
    phone = customers["cust-000001"].phone
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_sms(receipts, suite.workspace_id, phone, "STOP")
        start = "SM" + "5" * 32
        assert (await reply_by_sms(receipts, suite.workspace_id, phone, "START", sid=start))[0] == 200
        lifted = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-2")
        assert lifted.results[0].status == S.DISPATCH_STATUS_SENT
        await reply_by_sms(receipts, suite.workspace_id, phone, "STOP")
        assert (await reply_by_sms(receipts, suite.workspace_id, phone, "START", sid=start))[0] == 200
        again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-3")
        assert again.results[0].status == S.DISPATCH_STATUS_SUPPRESSED


async def test_only_connectors_that_take_replies_link_numbers(start_suite, redis):
    """A custom gateway hands no reply back, so a link for its sends would be kept and never read."""
    suite = await start_suite()
    links = BlindIndex.key(suite.workspace_id, "sms", "*")
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(3), "run-1")
    assert {r.status for r in sent.results} == {S.DISPATCH_STATUS_SENT}
    assert [key async for key in redis.scan_iter(match=links)] == []
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(3), "run-2")
    assert len([key async for key in redis.scan_iter(match=links)]) == 3


async def test_a_stop_replied_over_rcs_suppresses(start_suite, customers, redis, redis_url, secret_key):
    """Twilio writes an RCS reply's sender as `rcs:+<E.164>`: the number is the one the message went to."""
    suite = await start_suite()
    rcs = pb.Connector()
    rcs.CopyFrom(suite.workspace.connectors()["twilio"])
    rcs.connector_id, rcs.channel, rcs.sender = "twilio-rcs", C.CHANNEL_RCS, "MG" + "0a" * 16
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=rcs))
    sent = await dispatch(suite, C.CHANNEL_RCS, "twilio-rcs", SMS, people(2), "run-1")
    assert {r.status for r in sent.results} == {S.DISPATCH_STATUS_SENT}
    phone = customers["cust-000002"].phone
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        status, _ = await reply_by_sms(receipts, suite.workspace_id, "rcs:" + phone, "STOP", connector_id="twilio-rcs")
        assert status == 200
    again = await dispatch(suite, C.CHANNEL_RCS, "twilio-rcs", SMS, people(2), "run-2")
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_SUPPRESSED]


async def test_a_keyword_twilio_knows_from_its_console_acts_as_stop_and_start(
    start_suite, customers, redis, redis_url, secret_key
):
    """With Advanced Opt-Out, Twilio tags a reply matching a keyword set in its console (`OptOutType`)
    and stops or resumes sending to the number itself: the workspace's own lists need not hold it."""
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(2), "run-1")
    assert {r.status for r in sent.results} == {S.DISPATCH_STATUS_SENT}
    phone = customers["cust-000002"].phone
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_sms(receipts, suite.workspace_id, phone, "Desinscrever", opt_out_type="STOP")
        stopped = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(2), "run-2")
        assert [r.status for r in stopped.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_SUPPRESSED]
        await reply_by_sms(receipts, suite.workspace_id, phone, "Ajuda", opt_out_type="HELP")
        await reply_by_sms(receipts, suite.workspace_id, phone, "Voltar", opt_out_type="START")
    resumed = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(2), "run-3")
    assert [r.status for r in resumed.results] == [S.DISPATCH_STATUS_SENT] * 2


async def bidx_keys(redis, workspace_id: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=f"ts:{{{workspace_id}}}:bidx:sms:*")]


async def test_a_stop_renews_its_numbers_link_so_a_later_start_finds_it(
    start_suite, customers, redis, redis_url, secret_key
):
    """A suppressed number is sent nothing, so no send refreshes its link: the STOP does, and the
    customer's START within the link's lifetime of it still finds them."""
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-1")
    [key] = await bidx_keys(redis, suite.workspace_id)
    await redis.expire(key, 60)  # the last send was 30 days ago, less a minute
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_sms(receipts, suite.workspace_id, customers["cust-000001"].phone, "STOP")
    assert await redis.ttl(key) > 29 * 86400


async def test_a_number_twilio_refused_as_opted_out_is_linked_for_its_start(
    start_suite, customers, redis, redis_url, secret_key
):
    """A number's first send refused (21610: it had opted out with Twilio) is suppressed; its START
    must find it, though no send ever linked it."""
    suite = await start_suite()
    phone = customers["cust-000001"].phone
    suite.providers.set_faults("twilio", opted_out=[phone])
    refused = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-1")
    assert refused.results[0].error_code == "RECIPIENT_OPTED_OUT"
    assert len(await bidx_keys(redis, suite.workspace_id)) == 1
    suite.providers.set_faults("twilio", opted_out=[])
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_sms(receipts, suite.workspace_id, phone, "START")
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1), "run-2")
    assert again.results[0].status == S.DISPATCH_STATUS_SENT


async def post_status_callback(receipts, message, status: str, error_code: str, token: str) -> tuple[int, str]:
    """A status callback as Twilio posts it to the message's StatusCallback, signed with the account's
    token; `token` is Twilio's idempotency token, the same when it delivers the callback again."""
    callback = urlsplit(message.status_callback)
    path = f"{callback.path}?{callback.query}"
    params = [
        ("MessageSid", message.provider_message_id),
        ("MessageStatus", status),
        ("SmsSid", message.provider_message_id),
        ("SmsStatus", status),
        ("MessagingServiceSid", message.sender),
        ("AccountSid", TWILIO_SID),
        ("From", SERVICE_SENDER),
        ("To", message.to),
        ("ApiVersion", "2010-04-01"),
        ("ErrorCode", error_code),
    ]
    headers = {
        "X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, receipts.settings.public_webhook_url + path, params),
        "I-Twilio-Idempotency-Token": token,
        "Content-Type": "application/x-www-form-urlencoded",
    }
    return await post(receipts, path, urlencode(params).encode(), headers)


@pytest.mark.parametrize("channel", [C.CHANNEL_SMS, C.CHANNEL_RCS])
async def test_a_status_callback_reporting_twilios_opt_out_refusal_suppresses_until_start(
    start_suite, customers, redis, redis_url, secret_key, channel
):
    """A messaging service accepts a send to a number that opted out with Twilio and reports 21610 in
    the status callback: the recipient is suppressed as when Twilio refuses the send itself, the
    message counts as failed, a redelivery changes nothing, and the customer's START, which finds them
    through the link the send wrote, lifts it; a callback delivered again after the START does not undo it."""
    suite = await start_suite()
    suite.providers.receipts.enabled = False  # the callbacks are posted here, as the test needs them
    service = pb.Connector()
    service.CopyFrom(suite.workspace.connectors()["twilio"])
    service.connector_id, service.channel, service.sender = "twilio-service", channel, "MG" + "0a" * 16
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=service))
    sent = await dispatch(suite, channel, "twilio-service", SMS, people(2), "run-1")
    assert {r.status for r in sent.results} == {S.DISPATCH_STATUS_SENT}
    phone = customers["cust-000002"].phone
    [message] = [m for m in suite.providers.outbox_for("twilio") if m.to == phone]
    suppressions = f"ts:{{{suite.workspace_id}}}:supp:sms:_all"
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        status, reply = await post_status_callback(receipts, message, "failed", "21610", "tok-1")
        assert status == 200 and json.loads(reply)["mapped"] == 1
        listed = await suite.dispatcher.stub.ListSuppressions(
            pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_MMS)
        )
        assert [(e.anonymous_id, list(e.reasons)) for e in listed.suppressions] == [
            ("cust-000002", [pb.SUPPRESSION_REASON_PROVIDER_UNSUBSCRIBE])
        ]
        held = await redis.hgetall(suppressions)
        status, reply = await post_status_callback(receipts, message, "failed", "21610", "tok-1")
        assert status == 200 and json.loads(reply)["duplicates"] == 1
        assert await redis.hgetall(suppressions) == held
        stats = await receipts.stub.GetCampaignStats(
            rpb.GetCampaignStatsRequest(workspace_id=suite.workspace_id, campaign_id="spring")
        )
        assert (stats.failed, stats.unsubscribed) == (1, 0)  # not delivered; no unsubscribe of the brand's
        nxt = await dispatch(suite, channel, "twilio-service", SMS, people(2), "run-2")
        assert [r.status for r in nxt.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_SUPPRESSED]

        sender = "rcs:" + phone if channel == C.CHANNEL_RCS else phone
        await reply_by_sms(receipts, suite.workspace_id, sender, "START", connector_id="twilio-service")
        assert await redis.hgetall(suppressions) == {}
        status, _ = await post_status_callback(receipts, message, "failed", "21610", "tok-2")
        assert status == 200
    again = await dispatch(suite, channel, "twilio-service", SMS, people(2), "run-3")
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_SENT] * 2
