"""Authentication and workspace authorisation on every RPC of every service, through the real servers.

Clients: `engine` may touch workspace "acme" only, `ops` every workspace ("*"); the dispatcher is
one of the resolver's clients with its own token. Every RPC listed in the three service
descriptors is called without a token, with a wrong one, for another workspace and for its own,
so an RPC added without a workspace rule (or behind the guard's back) fails here.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dpb_grpc
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from libs.auth import WORKSPACE_FIELDS, bearer_interceptors, new_client
from sandbox.pii_api import OAuthClient
from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure
from tests.integration.test_dispatcher_campaigns import SMS, recipients
from tests.integration.test_receipts_harness import running_receipts

pytestmark = pytest.mark.integration

ENGINE_TOKEN, ENGINE = new_client("engine", ["acme"])
OPS_TOKEN, OPS = new_client("ops", ["*"])
DISPATCHER_TOKEN, DISPATCHER = new_client("dispatcher", ["*"])
GUARD_DENIAL = "client 'engine' may not use workspace"


def request_for(method, workspace_id: str):
    """An otherwise empty request of `method` naming `workspace_id` where its rule says."""
    request = message_factory.GetMessageClass(method.input_type)()
    *parents, leaf = WORKSPACE_FIELDS[method.input_type.full_name][0].split(".")
    target = request
    for name in parents:
        target = getattr(target, name)
    setattr(target, leaf, workspace_id)
    return request


async def call(channel: grpc.aio.Channel, service: str, method, request, token: str | None):
    """Calls any RPC by its descriptor; returns (status code, details)."""
    path = f"/{service}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    kwargs = dict(request_serializer=type(request).SerializeToString, response_deserializer=None)
    try:
        if not method.client_streaming and not method.server_streaming:
            await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=5)
        elif not method.client_streaming:
            async for _ in channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=0.5):
                break
        else:
            async for _ in channel.stream_stream(path, **kwargs)(iter([request]), metadata=metadata, timeout=5):
                pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
async def guarded(start_resolver, start_dispatcher, redis, redis_url):
    """The three services with clients configured; yields {service name: (channel, descriptor)}."""
    resolver = await start_resolver(clients=[ENGINE, OPS, DISPATCHER])
    dispatcher = await start_dispatcher(resolver, clients=[ENGINE, OPS], resolver_token=DISPATCHER_TOKEN)
    async with running_receipts(redis, redis_url, clients=[ENGINE, OPS]) as receipts:
        yield {
            "tokensend.resolver.v1.ResolverService": (resolver.channel, rpb),
            "tokensend.dispatcher.v1.DispatcherService": (dispatcher.channel, dpb),
            "tokensend.receipts.v1.ReceiptsService": (receipts.channel, cpb),
        }


async def test_every_rpc_of_every_service_checks_the_token_and_the_workspace(guarded, captured_logs):
    # Every service the protos define is here: a new one cannot be left out of the check.
    defined = {s.full_name for module in (rpb, dpb, cpb) for s in module.DESCRIPTOR.services_by_name.values()}
    assert set(guarded) == defined
    for service_name, (channel, module) in guarded.items():
        service = module.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]]
        for method in service.methods:
            label = f"{service.name}.{method.name}"
            own, other = request_for(method, "acme"), request_for(method, "globex")
            for token in (None, "not-a-token", ENGINE_TOKEN + "x"):
                code, details = await call(channel, service_name, method, own, token)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (label, token, code)
                assert "Bearer <token>" in details
            code, details = await call(channel, service_name, method, other, ENGINE_TOKEN)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (label, code, details)
            assert details.startswith(GUARD_DENIAL) and "globex" in details
            for token, request in ((ENGINE_TOKEN, own), (OPS_TOKEN, other)):
                code, details = await call(channel, service_name, method, request, token)
                assert code != grpc.StatusCode.UNAUTHENTICATED, (label, code, details)
                assert not details.startswith("client "), (label, code, details)
    logged = "\n".join(r.getMessage() for r in captured_logs.records)
    for token in (ENGINE_TOKEN, OPS_TOKEN, DISPATCHER_TOKEN):
        assert token not in logged  # tokens never logged
    assert "refused" in logged and "engine" in logged  # refusals are, by client name


async def test_a_stream_must_name_its_workspace_first(guarded):
    channel, _ = guarded["tokensend.dispatcher.v1.DispatcherService"]
    stub = dpb_grpc.DispatcherServiceStub(channel)
    metadata = (("authorization", f"Bearer {ENGINE_TOKEN}"),)

    async def parts():
        yield dpb.DispatchStreamRequest(recipients=dpb.DispatchStreamRequest.Recipients(recipients=recipients(1)))

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # recipients before any header: nothing authorised yet
        async for _ in stub.DispatchStream(parts(), metadata=metadata):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("header.workspace_id:")


async def test_health_is_open_reflection_needs_a_token(guarded):
    channel, _ = guarded["tokensend.resolver.v1.ResolverService"]
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in reflection.ServerReflectionInfo(iter(ask)):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    names = []
    metadata = (("authorization", f"Bearer {ENGINE_TOKEN}"),)
    async for reply in reflection.ServerReflectionInfo(iter(ask), metadata=metadata):
        names += [s.name for s in reply.list_services_response.service]
    assert "tokensend.resolver.v1.ResolverService" in names


async def test_health_and_reflection_can_be_closed_or_opened(start_resolver):
    resolver = await start_resolver(clients=[ENGINE], auth_open_health=False, auth_open_reflection=True)
    health = health_pb2_grpc.HealthStub(resolver.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await health.Check(
        health_pb2.HealthCheckRequest(service=""), metadata=(("authorization", f"Bearer {ENGINE_TOKEN}"),)
    )
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(resolver.channel)
    replies = [
        r
        async for r in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    ]
    assert replies


async def test_auth_off_without_clients_warns_at_startup(start_resolver, captured_logs):
    resolver = await start_resolver()
    assert any("authentication is off" in r.getMessage() for r in captured_logs.records)
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # no token needed: the call reaches the servicer
        await resolver.stub.GetPiiApiConfig(rpb.GetPiiApiConfigRequest(workspace_id="acme", channel=1))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_campaign_runs_with_tokens_end_to_end(start_pii_api_server, start_resolver, start_dispatcher):
    """The dispatcher presents its own token to the resolver; a wrong one makes Dispatch fail, not send."""
    pii_api = await start_pii_api_server(oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET))
    providers = ProviderSandbox()
    runner, port = await start_providers(providers)
    try:
        workspace = SandboxWorkspace(
            "acme", pii_api.base_url, f"http://127.0.0.1:{port}", providers.sendgrid_public_key
        )
        for account in workspace.provider_accounts():
            providers.add_account(account)
        resolver = await start_resolver(clients=[ENGINE, DISPATCHER])
        dispatcher = await start_dispatcher(resolver, clients=[ENGINE], resolver_token=DISPATCHER_TOKEN)
        impostor = await start_dispatcher(resolver, clients=[ENGINE], resolver_token=OPS_TOKEN)  # not the resolver's
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{p}", interceptors=bearer_interceptors(ENGINE_TOKEN))
            for p in (resolver.port, dispatcher.port, impostor.port)
        ]
        try:
            resolver_stub, dispatcher_stub, impostor_stub = (
                rpb_grpc.ResolverServiceStub(channels[0]),
                dpb_grpc.DispatcherServiceStub(channels[1]),
                dpb_grpc.DispatcherServiceStub(channels[2]),
            )
            await configure(workspace, resolver_stub, dispatcher_stub)
            request = dpb.DispatchRequest(
                workspace_id="acme",
                campaign_id="spring",
                campaign_instance_id="run-1",
                channel=common_pb2.CHANNEL_SMS,
                connector_id="gateway",
                content=SMS,
                recipients=recipients(3),
            )
            reply = await dispatcher_stub.Dispatch(request)
            assert reply.summary.sent == 3
            request.campaign_instance_id = "run-2"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await impostor_stub.Dispatch(request)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "UNAUTHENTICATED" in caught.value.details()
            assert len(providers.outbox_for("custom")) == 3
        finally:
            for channel in channels:
                await channel.close()
    finally:
        await providers.close()
        await runner.cleanup()


async def test_the_reconstruction_audit_records_the_authenticated_client(start_resolver, start_dispatcher):
    """`requested_by` is what the caller says; the audit also keeps who the caller is."""
    resolver = await start_resolver(clients=[DISPATCHER])
    dispatcher = await start_dispatcher(resolver, clients=[ENGINE, OPS], resolver_token=DISPATCHER_TOKEN)
    stub = dpb_grpc.DispatcherServiceStub(dispatcher.channel)
    auth = (("authorization", f"Bearer {ENGINE_TOKEN}"),)
    request = dpb.ReconstructMessageRequest(
        workspace_id="acme", message_id="f" * 32, requested_by="dpo-7", reason="DSAR"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReconstructMessage(request, metadata=auth)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListReconstructions(dpb.ListReconstructionsRequest(workspace_id="acme"), metadata=auth)
    [entry] = listed.reconstructions
    assert (entry.requested_by, entry.client, entry.outcome) == ("dpo-7", "engine", "not_archived")


async def test_a_request_without_its_target_names_each_field_that_could_hold_the_workspace(guarded):
    channel, _ = guarded["tokensend.resolver.v1.ResolverService"]
    stub = rpb_grpc.ResolverServiceStub(channel)
    metadata = (("authorization", f"Bearer {ENGINE_TOKEN}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # neither `config` nor `saved`
        await stub.TestPiiApiConfig(rpb.TestPiiApiConfigRequest(test_anonymous_id="cust-1"), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "config.workspace_id: is required (or saved.workspace_id)"


async def test_calls_refused_for_their_token_are_logged_a_line_per_method_and_reason(start_resolver, captured_logs):
    """Anyone who reaches the port can call again and again without a token, or with a wrong one: a line a
    minute per method and reason, never the token, not one per call. Each call is still refused."""
    resolver = await start_resolver(clients=[ENGINE])
    request = rpb.GetPiiApiConfigRequest(workspace_id="acme", channel=1)
    wrong = ENGINE_TOKEN + "x"
    for _ in range(10):
        for metadata in (None, (("authorization", f"Bearer {wrong}"),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await resolver.stub.GetPiiApiConfig(request, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    lines = [r.getMessage() for r in captured_logs.records if r.name == "libs.guard"]
    assert lines == [
        "refused /tokensend.resolver.v1.ResolverService/GetPiiApiConfig: no bearer token",
        "refused /tokensend.resolver.v1.ResolverService/GetPiiApiConfig: unknown bearer token",
    ]
    assert wrong not in captured_logs.text


async def test_calls_refused_to_an_authenticated_client_are_logged_a_line_per_client_method_and_reason(
    start_resolver, captured_logs
):
    """A client with a valid token can ask for a workspace it may not use again and again: a line a minute
    per client, method and reason, however many calls and whichever workspaces. Each call is still refused."""
    resolver = await start_resolver(clients=[ENGINE, OPS])
    metadata = (("authorization", f"Bearer {ENGINE_TOKEN}"),)
    for workspace_id in ["globex"] * 5 + ["initech", "umbrella"] * 3:
        request = rpb.GetPiiApiConfigRequest(workspace_id=workspace_id, channel=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await resolver.stub.GetPiiApiConfig(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == f"{GUARD_DENIAL} {workspace_id!r}"
    lines = [r.getMessage() for r in captured_logs.records if r.name == "libs.guard"]
    assert lines == [
        "refused /tokensend.resolver.v1.ResolverService/GetPiiApiConfig to client engine for workspace globex"
    ]
    assert ENGINE_TOKEN not in captured_logs.text
