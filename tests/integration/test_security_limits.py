"""Size limits and enum checks as a client meets them: INVALID_ARGUMENT naming the field and the limit
(with the field in the BadRequest detail), RESOURCE_EXHAUSTED beyond the gRPC message size, and
error texts in which a hostile key cannot start a new line."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
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


UNDECLARED = (57, -1)  # proto3 keeps an enum number it does not know: the service must not


def enum_fields(descriptor: Descriptor, path: str = "", depth: int = 0) -> Iterator[tuple[str, Callable]]:
    """(path, set it to a number) for every enum field reachable in `descriptor`'s messages: nested ones,
    both sides of a oneof, one element of a repeated field and one value of a map."""
    for field in descriptor.fields:
        name = f"{path}{field.name}"
        entry = field.message_type if field.message_type is not None else None
        if entry is not None and entry.GetOptions().map_entry:
            value = entry.fields_by_name["value"]
            if value.type == FieldDescriptor.TYPE_ENUM:
                yield f"{name}['k']", lambda m, n, f=field: getattr(m, f.name).__setitem__("k", n)
            elif value.type == FieldDescriptor.TYPE_MESSAGE and depth < 8:
                for inner, apply in enum_fields(value.message_type, f"{name}['k'].", depth + 1):
                    yield inner, lambda m, n, f=field, a=apply: a(getattr(m, f.name)["k"], n)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 8:
            for inner, apply in enum_fields(
                field.message_type, f"{name}[0]." if field.is_repeated else f"{name}.", depth + 1
            ):
                if field.is_repeated:
                    yield inner, lambda m, n, f=field, a=apply: a(getattr(m, f.name).add(), n)
                else:
                    yield inner, lambda m, n, f=field, a=apply: a(getattr(m, f.name), n)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            if field.is_repeated:
                yield f"{name}[0]", lambda m, n, f=field: getattr(m, f.name).append(n)
            else:
                yield name, lambda m, n, f=field: setattr(m, f.name, n)


def every_rpc() -> Iterator[tuple[str, MethodDescriptor]]:
    for service in (
        rpb.DESCRIPTOR.services_by_name["ResolverService"],
        dpb.DESCRIPTOR.services_by_name["DispatcherService"],
        cpb.DESCRIPTOR.services_by_name["ReceiptsService"],
    ):
        for method in service.methods:
            yield service.name, method


def test_the_walk_reaches_the_enums_of_nested_messages_oneofs_and_lists():
    paths = {(method.name, path) for _, method in every_rpc() for path, _ in enum_fields(method.input_type)}
    for expected in [
        ("PutPiiApiConfig", "config.mode"),
        ("TestPiiApiConfig", "saved.channel"),
        ("DispatchStream", "header.channel"),
        ("PutConnector", "connector.kind"),
        ("UnsuppressRecipients", "reasons[0]"),
        ("IngestReceipt", "provider"),
    ]:
        assert expected in paths
    assert len(paths) >= 25


async def test_every_enum_field_of_every_rpc_refuses_an_undeclared_number_by_its_path(
    start_resolver, start_dispatcher, redis, redis_url
):
    resolver = await start_resolver()
    dispatcher = await start_dispatcher(resolver)
    async with running_receipts(redis, redis_url) as receipts:
        stubs = {
            "ResolverService": resolver.stub,
            "DispatcherService": dispatcher.stub,
            "ReceiptsService": receipts.stub,
        }
        wrong = []
        for service, method in every_rpc():
            request_type = message_factory.GetMessageClass(method.input_type)
            for path, apply in enum_fields(method.input_type):
                for number in UNDECLARED:
                    request: Message = request_type()
                    apply(request, number)
                    call = getattr(stubs[service], method.name)
                    if method.client_streaming:
                        call = call(iter([request]), timeout=10)
                    else:
                        call = call(request, timeout=10)
                    if method.server_streaming:
                        call = _drained(call)
                    code, details, field = await refused(call)
                    enum = details.partition(": is not a known ")[2].partition(" value")[0]
                    if (
                        code != grpc.StatusCode.INVALID_ARGUMENT
                        or field != path
                        or not details.startswith(f"{path}: is not a known {enum} value: one of ")
                    ):
                        wrong.append((method.name, path, number, code, details))
        assert wrong == []


async def _drained(stream) -> None:
    async for _ in stream:
        pass
