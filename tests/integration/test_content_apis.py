"""Named content APIs: `{{ content.<name>.<field> }}` per recipient, PII unless declared otherwise, cached only then."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from tests.canary import holds_number, redis_dump
from tests.integration.beyond import ContentApiPeer, people

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
CONTENT = pb.Content(
    sms_body="{{ first_name }}: {{ content.loyalty.points }} points, {{ content.loyalty.tier }}. "
    "{{ content.offers.headline }}"
)


@pytest.fixture
async def peer():
    peer = ContentApiPeer()
    await peer.start()
    yield peer
    await peer.stop()


def loyalty_config(peer: ContentApiPeer, workspace_id: str, **overrides) -> rpb.ContentApiConfig:
    values = dict(
        workspace_id=workspace_id,
        name="loyalty",
        mode=rpb.MODE_SINGLE,
        method=rpb.HTTP_METHOD_GET,
        url=f"{peer.base_url}/loyalty/@anonymous_id",
        headers={"X-Api-Key": "content-secret"},
        field_paths={"points": "member.points", "tier": "member.tier"},
        non_sensitive_fields=["tier"],
    )
    values.update(overrides)
    return rpb.ContentApiConfig(**values)


def offers_config(peer: ContentApiPeer, workspace_id: str) -> rpb.ContentApiConfig:
    return rpb.ContentApiConfig(
        workspace_id=workspace_id,
        name="offers",
        mode=rpb.MODE_BULK,
        method=rpb.HTTP_METHOD_POST,
        url=f"{peer.base_url}/offers:batchGet",
        body='{"ids": "@anonymous_ids"}',
        results_path="items",
        id_path="id",
        field_paths={"headline": "headline"},
        non_sensitive_fields=["headline"],
        cache_ttl_seconds=300,
    )


def dispatch(suite, recipients, instance):
    return suite.dispatcher.stub.Dispatch(
        pb.DispatchRequest(
            workspace_id=suite.workspace_id,
            campaign_id="spring",
            campaign_instance_id=instance,
            channel=C.CHANNEL_SMS,
            connector_id="gateway",
            content=CONTENT,
            recipients=recipients,
        )
    )


async def test_content_fields_personalise_and_only_public_ones_are_cached(start_suite, peer, customers, redis):
    suite = await start_suite()
    for i in range(1, 4):
        peer.loyalty[f"cust-{i:06d}"] = {"points": 1000 + i, "tier": "Gold"}
        peer.offers[f"cust-{i:06d}"] = {"headline": f"Offer {i}"}
    saved = await suite.resolver.stub.PutContentApiConfig(
        rpb.PutContentApiConfigRequest(config=loyalty_config(peer, suite.workspace_id))
    )
    assert saved.version == 1 and saved.config.headers["X-Api-Key"] == "********"
    await suite.resolver.stub.PutContentApiConfig(
        rpb.PutContentApiConfigRequest(config=offers_config(peer, suite.workspace_id))
    )
    read = await suite.resolver.stub.GetContentApiConfig(
        rpb.GetContentApiConfigRequest(workspace_id=suite.workspace_id, name="loyalty")
    )
    assert read.config.headers["X-Api-Key"] == "********" and read.config.timeout_ms == 5000

    first = await dispatch(suite, people(3), "run-1")
    assert {r.status for r in first.results} == {S.DISPATCH_STATUS_SENT}
    texts = sorted(m.text for m in suite.providers.outbox_for("custom"))
    names = [customers[f"cust-{i:06d}"].first_name for i in range(1, 4)]
    assert texts == sorted(f"{names[i - 1]}: {1000 + i} points, Gold. Offer {i}" for i in range(1, 4))

    peer.asked.clear()
    await dispatch(suite, people(3), "run-2")
    # The loyalty API holds PII (points): asked again. The offers API is all public: served from memory.
    assert sorted(peer.asked) == [f"loyalty:cust-{i:06d}" for i in range(1, 4)]

    # A failing content API fails only its recipient, before anything is sent to them.
    peer.fail_ids = {"cust-000005"}
    peer.loyalty["cust-000004"] = {"points": 1, "tier": "Blue"}
    peer.offers["cust-000004"] = {"headline": "x"}
    mixed = await dispatch(suite, people(2, start=4), "run-3")
    assert mixed.results[0].status == S.DISPATCH_STATUS_SENT
    assert (mixed.results[1].status, mixed.results[1].error_code) == (
        S.DISPATCH_STATUS_RESOLVE_FAILED,
        "CONTENT_API_FAILED",
    )
    assert mixed.results[1].error_message == "Invalid API response (fetching content)"

    # Preview: the public field shows, the PII one is masked.
    preview = await suite.dispatcher.stub.PreviewMessage(
        pb.PreviewMessageRequest(
            workspace_id=suite.workspace_id,
            channel=C.CHANNEL_SMS,
            content=CONTENT,
            recipient=pb.Recipient(anonymous_id="cust-000001"),
        )
    )
    assert preview.rendered.sms_body == f"{names[0][0]}***: 1*** points, Gold. Offer 1"
    assert "content.loyalty.points" in preview.fetched_fields

    dump = b" ".join(await redis_dump(redis))
    assert not holds_number(b"1001", dump) and b"content-secret" not in dump and b"Offer 1" not in dump


async def test_instances_keep_their_content_api_version(start_suite, peer):
    suite = await start_suite()
    peer.loyalty["cust-000001"] = {"points": 5, "tier": "Gold", "level": "L9"}
    await suite.resolver.stub.PutContentApiConfig(
        rpb.PutContentApiConfigRequest(config=loyalty_config(peer, suite.workspace_id))
    )
    content = pb.Content(sms_body="{{ content.loyalty.tier }}")
    request = pb.DispatchRequest(
        workspace_id=suite.workspace_id,
        campaign_id="c",
        campaign_instance_id="i-1",
        channel=C.CHANNEL_SMS,
        connector_id="gateway",
        content=content,
        recipients=people(1),
    )
    await suite.dispatcher.stub.Dispatch(request)
    changed = loyalty_config(peer, suite.workspace_id, field_paths={"tier": "member.level", "points": "member.points"})
    await suite.resolver.stub.PutContentApiConfig(rpb.PutContentApiConfigRequest(config=changed))
    request.recipients[0].anonymous_id = "cust-000001x"
    peer.loyalty["cust-000001x"] = peer.loyalty["cust-000001"]
    # The same person under another ID (the PII API's reply carries the ID asked for, which id_path checks).
    suite.pii_api.sandbox.customers["cust-000001x"] = replace(
        suite.pii_api.sandbox.customers["cust-000001"], anonymous_id="cust-000001x"
    )
    await suite.dispatcher.stub.Dispatch(request)  # same instance: version 1
    request.campaign_instance_id = "i-2"
    await suite.dispatcher.stub.Dispatch(request)  # next instance: version 2
    assert [m.text for m in suite.providers.outbox_for("custom")] == ["Gold", "Gold", "L9"]


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        (dict(cache_ttl_seconds=60), grpc.StatusCode.INVALID_ARGUMENT, "config.cache_ttl_seconds"),
        (dict(name="bad-name"), grpc.StatusCode.INVALID_ARGUMENT, "config.name"),
        (dict(oauth_config_id="nope"), grpc.StatusCode.FAILED_PRECONDITION, "config.oauth_config_id"),
    ],
)
async def test_bad_configs_are_refused(start_suite, peer, overrides, code, field):
    suite = await start_suite()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.resolver.stub.PutContentApiConfig(
            rpb.PutContentApiConfigRequest(config=loyalty_config(peer, suite.workspace_id, **overrides))
        )
    assert caught.value.code() == code and caught.value.details().startswith(field)


async def test_a_template_naming_an_unknown_content_api_fails_the_call(start_suite):
    suite = await start_suite()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, people(1), "run-1")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no content API 'loyalty'" in caught.value.details()


async def test_the_test_button_shows_what_a_content_api_answers(start_suite, peer, redis):
    suite = await start_suite()
    peer.loyalty["cust-000001"] = {"points": 4242, "tier": "Gold"}
    peer.offers["cust-000002"] = {"headline": "Spring offer"}
    stub = suite.resolver.stub

    # Before saving: an unsaved config, single mode.
    unsaved = await stub.TestContentApiConfig(
        rpb.TestContentApiConfigRequest(
            config=loyalty_config(peer, suite.workspace_id), test_anonymous_id="cust-000001"
        )
    )
    assert unsaved.http_status == 200 and not unsaved.HasField("error")
    assert dict(unsaved.fields) == {"points": "4242", "tier": "Gold"}
    assert {"member.points", "member.tier"} <= set(unsaved.response_keys)
    assert b"4242" in unsaved.response_body.encode()

    # After saving: by name, bulk mode; an ID the API does not know is an error, not an empty answer.
    await stub.PutContentApiConfig(rpb.PutContentApiConfigRequest(config=offers_config(peer, suite.workspace_id)))
    saved = rpb.TestContentApiConfigRequest.SavedConfig(workspace_id=suite.workspace_id, name="offers")
    found = await stub.TestContentApiConfig(
        rpb.TestContentApiConfigRequest(saved=saved, test_anonymous_id="cust-000002")
    )
    assert dict(found.fields) == {"headline": "Spring offer"}
    missing = await stub.TestContentApiConfig(
        rpb.TestContentApiConfigRequest(saved=saved, test_anonymous_id="cust-000009")
    )
    assert missing.error.code == rpb.RESOLVE_ERROR_CODE_NOT_FOUND and dict(missing.fields) == {}
    assert missing.error.message == "Invalid API response (fetching content)"
    peer.fail_ids = {"cust-000001"}
    failing = await stub.TestContentApiConfig(
        rpb.TestContentApiConfigRequest(
            config=loyalty_config(peer, suite.workspace_id, max_retries=0), test_anonymous_id="cust-000001"
        )
    )
    assert failing.http_status == 500 and failing.error.code == rpb.RESOLVE_ERROR_CODE_SERVER_ERROR

    for request, field in (
        (rpb.TestContentApiConfigRequest(saved=saved), "test_anonymous_id"),
        (rpb.TestContentApiConfigRequest(test_anonymous_id="cust-000001"), "target"),
        (
            rpb.TestContentApiConfigRequest(
                saved=rpb.TestContentApiConfigRequest.SavedConfig(workspace_id=suite.workspace_id, name="no-dash"),
                test_anonymous_id="cust-000001",
            ),
            "saved.name",
        ),
        (
            rpb.TestContentApiConfigRequest(
                config=loyalty_config(peer, suite.workspace_id, url="ftp://example.com/x"),
                test_anonymous_id="cust-000001",
            ),
            "config.url",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.TestContentApiConfig(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert caught.value.details().startswith(field)

    # A test call keeps nothing: no value reaches Redis.
    dump = b" ".join(await redis_dump(redis))
    assert not holds_number(b"4242", dump) and b"Spring offer" not in dump


async def test_a_failing_content_api_is_named_by_the_preview_and_the_reconstruction(start_suite, peer):
    """With several APIs in one template, the marketer and the reviewer are told which failed and how."""
    suite = await start_suite()
    peer.loyalty["cust-000001"] = {"points": 7, "tier": "Gold"}
    peer.offers["cust-000001"] = {"headline": "Spring"}
    for config in (loyalty_config(peer, suite.workspace_id, max_retries=0), offers_config(peer, suite.workspace_id)):
        await suite.resolver.stub.PutContentApiConfig(rpb.PutContentApiConfigRequest(config=config))
    sent = await dispatch(suite, people(1), "run-1")
    assert sent.results[0].status == S.DISPATCH_STATUS_SENT
    peer.fail_ids = {"cust-000001"}  # the loyalty API now answers 500

    preview = await suite.dispatcher.stub.PreviewMessage(
        pb.PreviewMessageRequest(
            workspace_id=suite.workspace_id,
            channel=C.CHANNEL_SMS,
            content=CONTENT,
            recipient=pb.Recipient(anonymous_id="cust-000001"),
        )
    )
    assert preview.error_code == "CONTENT_API_FAILED"
    assert preview.error_message.startswith("Invalid API response (fetching content)")
    assert "content API 'loyalty'" in preview.error_message and "HTTP 500" in preview.error_message

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.ReconstructMessage(
            pb.ReconstructMessageRequest(
                workspace_id=suite.workspace_id,
                message_id=sent.results[0].message_id,
                requested_by="dpo-1",
                reason="DSAR",
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    said = caught.value.details()
    assert "PII" not in said and "content API 'loyalty'" in said and "HTTP 500" in said
