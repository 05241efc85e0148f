"""A request whose bytes do not decode as its message (a string field that is not UTF-8, damaged bytes) is
INVALID_ARGUMENT naming the message, on every kind of method: grpc itself would answer UNKNOWN and log a
traceback."""

from __future__ import annotations

import logging

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
NOT_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (a string: workspace_id) holding bytes that are not UTF-8
DAMAGED = b"\x0a\x7f\x01"  # field 1 announcing 127 bytes, holding one


def raw(channel: grpc.aio.Channel, method: str, streaming: str) -> object:
    kinds = {
        "unary": channel.unary_unary,
        "server": channel.unary_stream,
        "client": channel.stream_unary,
        "both": channel.stream_stream,
    }
    return kinds[streaming](method, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize("data", [NOT_UTF8, DAMAGED], ids=["not-utf8", "damaged"])
@pytest.mark.parametrize(
    ("service", "method", "streaming", "message"),
    [
        ("resolver", "/tokensend.resolver.v1.ResolverService/ResolveContacts", "unary", "ResolveContactsRequest"),
        ("dispatcher", "/tokensend.dispatcher.v1.DispatcherService/Dispatch", "unary", "DispatchRequest"),
        (
            "dispatcher",
            "/tokensend.dispatcher.v1.DispatcherService/DispatchStream",
            "both",
            "DispatchStreamRequest",
        ),
    ],
)
async def test_an_undecodable_request_is_invalid_argument_naming_its_message(
    start_suite, caplog, data, service, method, streaming, message
):
    suite = await start_suite()
    port = getattr(suite, service).port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = raw(channel, method, streaming)
        with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
            if streaming == "both":
                async for _ in call(iter([data])):
                    pass
            else:
                await call(data)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"request: does not decode as tokensend.{service}.v1.{message}")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The server goes on serving.
    if service == "dispatcher":
        assert (await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(1))).summary.sent == 1


async def test_a_stream_whose_later_part_does_not_decode_fails_naming_it(start_suite):
    """The header decoded, the next part does not: the call fails INVALID_ARGUMENT there."""
    suite = await start_suite()
    header = pb.DispatchStreamRequest(
        header=pb.DispatchStreamRequest.Header(
            workspace_id=suite.workspace_id,
            campaign_id="spring",
            campaign_instance_id="undecodable-part",
            channel=C.CHANNEL_SMS,
            connector_id="twilio",
            content=SMS,
        )
    ).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.dispatcher.port}") as channel:
        call = raw(channel, "/tokensend.dispatcher.v1.DispatcherService/DispatchStream", "both")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call(iter([header, b"\x12\x03\x0a\x01\xff"])):
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not decode as tokensend.dispatcher.v1.DispatchStreamRequest" in caught.value.details()
