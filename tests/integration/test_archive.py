"""The reconstructable archive: nothing fetched is kept, yet a sent message renders again byte for byte."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.errors import Unavailable
from libs.message_map import new_message_ids, split_message_id
from libs.scrub import scrub_text
from libs.write_batch import BatchWriter, WriteBatch
from services.dispatcher import rendering
from services.dispatcher.archive import OWN, ArchivedMessage, ArchiveEntry, MessageArchive
from services.dispatcher.rendering import ContentTemplates
from services.dispatcher.resolver_client import ResolverClient
from tests.canary import canary_customers, hits, needles, redis_dump
from tests.integration.beyond import people
from tests.integration.test_dispatcher_campaigns import dispatch

pytestmark = pytest.mark.integration

C = common_pb2.Channel
EMAIL = pb.Content(
    subject="Hello {{ first_name }}",
    html_body="<p>Dear {{ first_name }} {{ last_name }} &amp; family, you are {{ recipient.tier }}</p>",
    text_body="Dear {{ first_name }},\nyou are {{ recipient.tier }}\n",
)
SMS = pb.Content(sms_body="Hi {{ first_name }}, {{ recipient.tier }} offer")
TEMPLATE = pb.Content(
    whatsapp_template=pb.WhatsAppTemplate(
        name="welcome", language="en_US", params=["{{ last_name }}", "{{ recipient.tier }}"]
    )
)


def reconstruct(suite, message_id, requested_by="dpo-7", reason="DSAR"):
    return suite.dispatcher.stub.ReconstructMessage(
        pb.ReconstructMessageRequest(
            workspace_id=suite.workspace_id, message_id=message_id, requested_by=requested_by, reason=reason
        )
    )


async def test_archived_messages_reconstruct_byte_identical(start_suite, redis):
    suite = await start_suite()
    suite.pii_api.sandbox.customers.update(canary_customers(6))
    recipients = [pb.Recipient(anonymous_id=f"canary-{i}", attributes={"tier": f"tier-{i}"}) for i in range(6)]
    email = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", EMAIL, recipients[:3])
    sms = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients[3:5], instance="run-2")
    wa = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", TEMPLATE, recipients[5:], instance="run-3")

    # The brand edits its PII API config afterwards: a reconstruction still uses the version it was sent with.
    config = [c for c in suite.workspace.pii_api_configs() if c.channel == C.CHANNEL_EMAIL][0]
    config.attribute_paths["first_name"] = "profile.last_name"
    await suite.resolver.stub.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=config))

    sendgrid = {m.custom_args["tokensend_message_id"]: m for m in suite.providers.outbox_for("sendgrid")}
    for result in email.results:
        sent = sendgrid[result.message_id]
        again = await reconstruct(suite, result.message_id)
        assert again.rendered.subject.encode() == sent.subject.encode()
        assert again.rendered.html_body.encode() == sent.html.encode()
        assert again.rendered.text_body.encode() == sent.text.encode()
        assert dict(again.rendered.headers) == dict(sent.headers)  # the same List-Unsubscribe link
        assert again.contact == sent.to and again.anonymous_id == result.anonymous_id
        assert (again.campaign_id, again.channel, again.connector_id) == ("spring", C.CHANNEL_EMAIL, "sendgrid")
        assert list(again.fetched_fields) == ["first_name", "last_name"] and again.pii_api_config_version == 1
        assert list(again.fetched_fields_at_send) == ["first_name", "last_name"]  # as archived when sent

    twilio = {m.status_callback.rsplit("message_id=", 1)[1]: m for m in suite.providers.outbox_for("twilio")}
    for result in sms.results:
        again = await reconstruct(suite, result.message_id)
        assert again.rendered.sms_body.encode() == twilio[result.message_id].text.encode()
    whatsapp = suite.providers.outbox_for("whatsapp")[0]
    again = await reconstruct(suite, wa.results[0].message_id)
    sent_params = [p["text"] for p in whatsapp.template["components"][0]["parameters"]]
    assert list(again.rendered.whatsapp_params) == sent_params

    # What the archive keeps: templates once per content, names of fields, never a value.
    archive_keys = [k async for k in redis.scan_iter(match=f"ts:{{{suite.workspace_id}}}:archive:*")]
    assert sum(b":archive:content:" in k for k in archive_keys) == 3
    assert sum(b":archive:entries:" in k for k in archive_keys) == 3  # one a group of messages
    assert sum(b":archive:batch:" in k for k in archive_keys) == 3  # and what its entries share
    assert len(archive_keys) == 9
    group_part, own_part = split_message_id(email.results[0].message_id)
    entries_key = MessageArchive.entries_key(suite.workspace_id, group_part)
    record_key = MessageArchive.batch_key(suite.workspace_id, group_part)
    retention = suite.dispatcher.settings.archive_retention_seconds
    for key in (entries_key, record_key):
        assert retention - 60 < await redis.ttl(key) <= retention
    entries = await redis.hgetall(entries_key)
    assert {k.decode() for k in entries} == {split_message_id(r.message_id)[1] for r in email.results}
    assert await redis.object("encoding", entries_key) in (b"listpack", b"ziplist")  # compact (Redis 7, 6)
    record = await redis.hgetall(record_key)
    assert json.loads(record[OWN.encode()]) == ["anonymous_id", "recipient"]  # the rest is shared
    assert json.loads(entries[own_part.encode()])[0] == email.results[0].anonymous_id
    assert record[b"campaign_id"] == b"spring" and json.loads(record[b"fetched_fields"]) == ["first_name", "last_name"]
    canaries = {k: v for k, v in suite.pii_api.sandbox.customers.items() if k.startswith("canary-")}
    assert hits(needles(canaries), await redis_dump(redis)) == []

    # Every reconstruction is in the audit log: who, when, which message, why; no PII.
    audit = await redis.xrange(MessageArchive.audit_key(suite.workspace_id))
    assert len(audit) == 6
    fields = {k.decode(): v.decode() for k, v in audit[0][1].items()}
    assert fields["requested_by"] == "dpo-7" and fields["reason"] == "DSAR" and fields["outcome"] == "reconstructed"
    assert fields["message_id"] == email.results[0].message_id and int(fields["at_ms"]) > 0


async def test_requests_are_checked_and_misses_are_audited(start_suite, redis):
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(1))
    for fields, field in (
        (dict(requested_by="jane@example.com"), "requested_by"),
        (dict(reason="because I said so"), "reason"),
        (dict(requested_by="447700900123"), "requested_by"),
        (dict(reason="call-07700900123"), "reason"),
        (dict(reason="0740.0123.456"), "reason"),  # a number however it is written
        (dict(requested_by="44-7400-12345"), "requested_by"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reconstruct(suite, sent.results[0].message_id, **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(field)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reconstruct(suite, "f" * 32)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    suite.pii_api.sandbox.faults.missing_ids = {"cust-000001"}  # the brand deleted the customer since
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reconstruct(suite, sent.results[0].message_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    outcomes = [e[1][b"outcome"] for e in await redis.xrange(MessageArchive.audit_key(suite.workspace_id))]
    assert outcomes == [b"not_archived", b"resolve_failed"]


def list_reconstructions(suite, page_size=0, page_token=""):
    return suite.dispatcher.stub.ListReconstructions(
        pb.ListReconstructionsRequest(workspace_id=suite.workspace_id, page_size=page_size, page_token=page_token)
    )


async def test_the_audit_log_reads_back_page_by_page(start_suite):
    suite = await start_suite()
    assert await list_reconstructions(suite) == pb.ListReconstructionsResponse()  # nothing yet: empty, no token
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(3))
    audit_ids = []
    for i, result in enumerate(sent.results):
        audit_ids.append((await reconstruct(suite, result.message_id, requested_by=f"dpo-{i}")).audit_id)
    with pytest.raises(grpc.aio.AioRpcError):
        await reconstruct(suite, "f" * 32, reason="COMPLAINT")  # a miss is audited too

    seen, token = [], ""
    while True:
        page = await list_reconstructions(suite, page_size=2, page_token=token)
        assert len(page.reconstructions) <= 2
        seen.extend(page.reconstructions)
        token = page.next_page_token
        if not token:
            break
    assert [e.audit_id for e in seen[:3]] == audit_ids  # oldest first, as ReconstructMessage returned them
    assert [(e.message_id, e.anonymous_id, e.requested_by, e.reason, e.outcome) for e in seen] == [
        *((r.message_id, r.anonymous_id, f"dpo-{i}", "DSAR", "reconstructed") for i, r in enumerate(sent.results)),
        ("f" * 32, "", "dpo-7", "COMPLAINT", "not_archived"),
    ]
    assert all(e.at_ms > 0 for e in seen)
    whole = await list_reconstructions(suite)
    assert len(whole.reconstructions) == 4 and whole.next_page_token == ""

    for request, field in (
        (pb.ListReconstructionsRequest(workspace_id=suite.workspace_id, page_size=1001), "page_size"),
        (pb.ListReconstructionsRequest(workspace_id=suite.workspace_id, page_token="cust-000001"), "page_token"),
        (
            pb.ListReconstructionsRequest(workspace_id=suite.workspace_id, page_token="99999999999999999999-0"),
            "page_token",
        ),
        (pb.ListReconstructionsRequest(workspace_id=suite.workspace_id, page_token="1700000000000"), "page_token"),
        (pb.ListReconstructionsRequest(workspace_id="has space"), "workspace_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await suite.dispatcher.stub.ListReconstructions(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(field)


async def test_a_reconstructions_log_line_reads_the_same_once_scrubbed(start_suite, caplog):
    """The line names what an operator looks up (workspace and message), nothing the log's scrubbing
    blanks: an audit stream ID read as "[phone]"."""
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people(1))
    with caplog.at_level(logging.INFO, logger="services.dispatcher.review"):
        await reconstruct(suite, sent.results[0].message_id)
    [line] = [r.getMessage() for r in caplog.records if "reconstructed for review" in r.getMessage()]
    assert f"{suite.workspace_id}/{sent.results[0].message_id}" in line
    assert scrub_text(line) == line


async def test_no_archive_when_retention_is_zero(start_suite, redis):
    suite = await start_suite(archive_retention_seconds=0)
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(1))
    assert [k async for k in redis.scan_iter(match="*archive*")] == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reconstruct(suite, sent.results[0].message_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_entries_written_one_key_per_message_still_load(redis):
    """Entries from before the per-batch hash: some hold every field themselves, later ones their own
    and a batch record's ID. One whose batch record has expired is past its retention and is not
    loaded half-filled."""
    archive = MessageArchive(redis, retention_seconds=600)
    whole = ArchiveEntry(
        "m-whole",
        "ws-archive",
        "spring",
        "run-1",
        "cust-1",
        C.CHANNEL_SMS,
        "gateway",
        "custom",
        "abc",
        recipient={"tier": "gold"},
        fetched_fields=["first_name"],
        sent_at_ms=1_700_000_000_000,
    )
    every_field = {f.name: whole.stored(f.name) for f in dataclasses.fields(ArchiveEntry)}
    await redis.hset(archive.key("ws-archive", "m-whole"), mapping=every_field)
    loaded = await archive.load("ws-archive", "m-whole")
    assert loaded is not None and loaded[0] == whole

    first = dataclasses.replace(whole, message_id="m-1", anonymous_id="cust-2")
    second = dataclasses.replace(whole, message_id="m-2", anonymous_id="cust-3", recipient={"tier": "silver"})
    shared = {
        name: value for name, value in every_field.items() if name not in ("message_id", "anonymous_id", "recipient")
    }
    await redis.hset(archive.batch_key("ws-archive", "b-1"), mapping=shared)
    for entry in (first, second):
        own = {"anonymous_id": entry.anonymous_id, "recipient": entry.stored("recipient"), "batch": "b-1"}
        await redis.hset(archive.key("ws-archive", entry.message_id), mapping=own)
        loaded = await archive.load("ws-archive", entry.message_id)
        assert loaded is not None and loaded[0] == entry
    await redis.delete(archive.batch_key("ws-archive", "b-1"))
    assert await archive.load("ws-archive", "m-2") is None
    await redis.delete(*(archive.key("ws-archive", m) for m in ("m-whole", "m-1", "m-2")))


async def test_a_groups_entries_share_its_hashes_and_load_one_by_one(redis):
    archive = MessageArchive(redis, retention_seconds=600)
    ids = new_message_ids(3) + new_message_ids(1)  # an ID of another group is kept in that group's hashes
    entries = [
        ArchiveEntry(
            message_id,
            "ws-archive",
            "spring",
            "run-1",
            f"cust-{n}",
            C.CHANNEL_EMAIL,
            "sendgrid",
            "sendgrid",
            "abc",
            # Quotes, backslashes and characters beyond ASCII come back as they went in.
            recipient={"tier": "gold" if n else "silver", "offer": 'Été "−20 %" \\ ☃'},
            fetched_fields=["first_name", "last_name"] if n else ["first_name"],
            sent_at_ms=1_700_000_000_000,
            unsubscribe_expires_at=1_800_000_000,
        )
        for n, message_id in enumerate(ids)
    ]
    writes = WriteBatch()
    own = [
        ArchivedMessage(e.message_id, e.anonymous_id, e.recipient, e.fetched_fields, e.unsubscribe_expires_at)
        for e in entries
    ]
    archive.queue_entries(writes, entries[0], own)
    await BatchWriter(redis).execute(writes)
    for entry in entries:
        loaded = await archive.load("ws-archive", entry.message_id)
        assert loaded is not None and loaded[0] == entry
    # What differs inside a group is each entry's own; what is alike, even per-message fields, its record's.
    first_group, lone_group = split_message_id(ids[0])[0], split_message_id(ids[3])[0]
    own_fields = ["anonymous_id", "recipient", "fetched_fields"]
    assert json.loads(await redis.hget(archive.batch_key("ws-archive", first_group), OWN)) == own_fields
    assert json.loads(await redis.hget(archive.batch_key("ws-archive", lone_group), OWN)) == ["anonymous_id"]
    groups = {split_message_id(m)[0] for m in ids}
    keys = [key(("ws-archive"), g) for g in groups for key in (archive.entries_key, archive.batch_key)]
    assert len(keys) == 4
    for key in keys:
        assert 0 < await redis.ttl(key) <= 600
    unknown = ids[0][:16] + "0" * 16
    assert await archive.load("ws-archive", unknown) is None  # its group's hashes, not its entry
    assert await archive.load("ws-archive", ids[0][:16] + OWN) is None
    await redis.delete(*keys)


async def test_equal_attributes_given_in_another_order_reconstruct_in_their_own(redis):
    """A recipient's attributes come in their map's order, which two recipients with the same ones
    need not share: a template that walks them wrote each message in its recipient's order, and
    the message's reconstruction walks them in that order too."""
    archive = MessageArchive(redis, retention_seconds=600)
    walking = ContentTemplates(pb.Content(sms_body="{% for k, v in recipient.items() %}{{ k }}={{ v }};{% endfor %}"))
    orders = [{"tier": "gold", "city": "Lyon"}, {"city": "Lyon", "tier": "gold"}]
    ids = new_message_ids(len(orders))
    batch = ArchiveEntry("", "ws-archive", "spring", "run-1", "", C.CHANNEL_SMS, "gateway", "custom", "abc")
    writes = WriteBatch()
    own = [ArchivedMessage(m, f"cust-{n}", orders[n], [], 0) for n, m in enumerate(ids)]
    archive.queue_entries(writes, batch, own)
    await BatchWriter(redis).execute(writes)
    for message_id, attributes in zip(ids, orders, strict=True):
        loaded = await archive.load("ws-archive", message_id)
        assert loaded is not None
        assert walking.render({}, loaded[0].recipient).sms_body == walking.render({}, attributes).sms_body
    group_part = split_message_id(ids[0])[0]
    await redis.delete(archive.entries_key("ws-archive", group_part), archive.batch_key("ws-archive", group_part))


async def test_a_reconstruction_that_fails_on_the_way_is_audited_too(start_suite, redis, monkeypatch):
    """The resolver unreachable (or a config version no longer kept): the call fails, and the audit
    log still says who asked for which message, and that it failed."""
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(1))

    async def unreachable(*_: object, **__: object) -> None:
        raise Unavailable("resolver unavailable (UNAVAILABLE), retry later")

    monkeypatch.setattr(ResolverClient, "resolve_for_sending", unreachable)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reconstruct(suite, sent.results[0].message_id)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    [(_, fields)] = await redis.xrange(MessageArchive.audit_key(suite.workspace_id))
    assert fields[b"outcome"] == b"error:UNAVAILABLE" and fields[b"requested_by"] == b"dpo-7"
    assert fields[b"message_id"] == sent.results[0].message_id.encode()


async def test_archived_content_that_no_longer_compiles_is_a_failed_precondition(start_suite, redis, monkeypatch):
    """A limit tightened since the message was sent: the request is fine, the archived content cannot be
    rebuilt. Said as such, naming the field, never quoting the content or a fetched value."""
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(1))
    monkeypatch.setattr(rendering, "MAX_TEMPLATE_LENGTH", 8)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reconstruct(suite, sent.results[0].message_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details()
    assert "archived content" in details and "content.sms_body" in details
    assert "first_name" not in details and "offer" not in details
    [(_, fields)] = await redis.xrange(MessageArchive.audit_key(suite.workspace_id))
    assert fields[b"outcome"] == b"render_failed"


async def test_reconstructions_past_a_clients_rate_are_refused_and_the_first_refusal_audited(start_suite, redis):
    """A flood of calls neither fetches PII in bulk nor pushes real entries out of the audit stream."""
    suite = await start_suite(reconstructions_per_minute=2)
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(1))
    message_id = sent.results[0].message_id
    if time.time() % 60 > 50:  # the calls below fall in one minute
        await asyncio.sleep(61 - time.time() % 60)
    for _ in range(2):
        assert (await reconstruct(suite, message_id)).contact
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reconstruct(suite, message_id)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details().startswith("at most 2 ReconstructMessage calls a minute per client; try again in")
    entries = await redis.xrange(MessageArchive.audit_key(suite.workspace_id))
    outcomes = [fields[b"outcome"] for _, fields in entries]
    assert outcomes == [b"reconstructed", b"reconstructed", b"refused:rate_limited"]
    assert entries[-1][1][b"message_id"] == message_id.encode() and entries[-1][1][b"anonymous_id"] == b""


async def test_a_reconstruction_cut_off_by_its_deadline_is_audited(start_suite, redis):
    """The brand's API is slow and the caller's deadline ends the call: the request may already have
    fetched the PII, so the audit log records it."""
    suite = await start_suite()
    sent = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(1))
    suite.pii_api.sandbox.faults.latency_ms = 1500
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.ReconstructMessage(
            pb.ReconstructMessageRequest(
                workspace_id=suite.workspace_id,
                message_id=sent.results[0].message_id,
                requested_by="dpo-7",
                reason="DSAR",
            ),
            timeout=0.5,
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):  # the server notices the deadline a moment after the client
        entries = await redis.xrange(MessageArchive.audit_key(suite.workspace_id))
        if entries:
            break
        await asyncio.sleep(0.05)
    [(_, fields)] = entries
    assert fields[b"outcome"] == b"error:CANCELLED" and fields[b"requested_by"] == b"dpo-7"


async def test_a_number_given_as_the_message_id_is_refused_and_recorded_nowhere(start_suite, redis):
    """A reviewer who pastes the customer's phone number (written without `+`) where the message ID
    goes: it is not one of ours, so it reaches neither the audit log nor the error."""
    suite = await start_suite()
    for number in ("447700900123", "07700900123"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reconstruct(suite, number)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("message_id") and number not in caught.value.details()
        assert hits({number}, await redis_dump(redis)) == []
    assert await redis.xrange(MessageArchive.audit_key(suite.workspace_id)) == []


async def test_a_page_token_past_the_last_possible_entry_is_refused_by_name(start_suite):
    suite = await start_suite()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_reconstructions(suite, page_token=f"{2**64 - 1}-{2**64 - 1}")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("page_token")
