"""Hostile input through the real servers (port 0, real Redis, sandbox peers): random protobuf requests
to the config, connector and dispatch RPCs and to IngestReceipt, and random unsigned webhook posts.

Whatever arrives, the answer is a status the caller can act on: never INTERNAL or UNKNOWN over
gRPC, never a 500 over HTTP. (test_receipts_fuzz.py fuzzes the parsers with correctly signed bodies.)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from tests.integration.test_dispatcher_campaigns import EMAIL, SMS, WHATSAPP_TEMPLATE
from tests.integration.test_receipts_harness import CONNECTORS, WS, running_receipts

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
UNHANDLED = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

nasty_text = st.sampled_from(
    [
        "",
        "a",
        "@anonymous_id",
        '{"ids": "@anonymous_ids"}',
        "{{ first_name }}",
        "{{ recipient.tier }}",
        "{% for x in y %}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ range(10**9)|list }}",
        "gold\r\nBcc: attacker@evil.example",
        "\x00\x1b[31m",
        "https://127.0.0.1:1/x",
        "ts:{other}:connector:x",
        "é漢字🙂\u202e",
        "../../etc/passwd",
        "A" * 5000,
    ]
) | st.text(max_size=40)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return nasty_text
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-3, 200)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=False, width=32)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.sampled_from([0, 1, 2, 1000, 1001, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    return st.integers(-(2**31), 2**31 - 1)


def field_values(field: FieldDescriptor, overrides: dict[str, st.SearchStrategy], depth: int) -> st.SearchStrategy:
    """Random values for one field (a whole list or map for repeated and map fields)."""
    if field.full_name in overrides:
        return overrides[field.full_name]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        values = _scalar(value) if value.type != FieldDescriptor.TYPE_MESSAGE else st.nothing()
        return st.dictionaries(nasty_text, values, max_size=3)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= 3:
            return st.nothing()
        inner = messages(field.message_type, overrides, depth + 1)
        return st.lists(inner, max_size=3) if field.is_repeated else inner
    return st.lists(_scalar(field), max_size=4) if field.is_repeated else _scalar(field)


def _assign(message: Message, name: str, value: Any) -> None:
    message.ClearField(name)
    target = getattr(message, name)
    try:
        if isinstance(value, dict):
            target.update(value)
        elif isinstance(value, list):
            target.extend(value)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    except (ValueError, TypeError):
        message.ClearField(name)  # a value this field cannot hold (a lone surrogate ...): leave it out


def messages(descriptor: Descriptor, overrides: dict[str, st.SearchStrategy], depth: int = 0) -> st.SearchStrategy:
    """Random messages of `descriptor`: any subset of its fields, with hostile values."""
    cls = message_factory.GetMessageClass(descriptor)
    optional = {f.name: field_values(f, overrides, depth) for f in descriptor.fields if depth < 3}
    optional = {name: strategy for name, strategy in optional.items() if not strategy.is_empty}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            _assign(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


KEEP = object()


def mutations(base: Message, overrides: dict[str, st.SearchStrategy], depth: int = 0) -> st.SearchStrategy:
    """`base` (a request that works) with some fields, at any depth, replaced by hostile values: the
    request gets past the first checks and into validation, rendering, resolving and sending."""
    choices: dict[str, st.SearchStrategy] = {}
    for field in base.DESCRIPTOR.fields:
        random = field_values(field, overrides, depth)
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated and base.HasField(field.name):
            random = random | mutations(getattr(base, field.name), overrides, depth + 1)
        choices[field.name] = st.one_of(st.just(KEEP), st.just(KEEP), st.just(KEEP), random)

    def build(values: dict[str, Any]) -> Message:
        message = type(base)()
        message.CopyFrom(base)
        for name, value in values.items():
            if value is not KEEP:
                _assign(message, name, value)
        return message

    return st.fixed_dictionaries(choices).map(build)


def steer(suite) -> dict[str, st.SearchStrategy]:
    """Mostly plausible values where plausibility gets a request deeper into the code."""
    ws = st.sampled_from([suite.workspace_id, suite.workspace_id, "other-ws"]) | nasty_text
    channel = st.sampled_from(
        [common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_WHATSAPP, common_pb2.CHANNEL_MMS]
    )
    connector = st.sampled_from(["sendgrid", "twilio", "whatsapp", "gateway", "nope"])
    people = st.sampled_from([f"cust-{n:06d}" for n in range(1, 30)]) | nasty_text
    urls = (
        st.sampled_from(
            [
                f"{suite.pii_api.base_url}/v1/customers/@anonymous_id",
                f"{suite.pii_api.base_url}/v1/customers:batchGet",
                f"http://127.0.0.1:{suite.providers_port}",
                "https://127.0.0.1:1/x",
                "ftp://x/y",
            ]
        )
        | nasty_text
    )
    return {
        "tokensend.dispatcher.v1.DispatchRequest.workspace_id": ws,
        "tokensend.dispatcher.v1.DispatchRequest.channel": channel,
        "tokensend.dispatcher.v1.DispatchRequest.connector_id": connector,
        "tokensend.dispatcher.v1.DispatchRequest.campaign_id": st.sampled_from(["fuzz"]) | nasty_text,
        "tokensend.dispatcher.v1.DispatchRequest.campaign_instance_id": st.sampled_from(["f-1", "f-2"]) | nasty_text,
        "tokensend.dispatcher.v1.SendTestRequest.workspace_id": ws,
        "tokensend.dispatcher.v1.SendTestRequest.channel": channel,
        "tokensend.dispatcher.v1.SendTestRequest.connector_id": connector,
        "tokensend.dispatcher.v1.SendTestRequest.campaign_id": st.just("fuzz") | nasty_text,
        "tokensend.dispatcher.v1.Recipient.anonymous_id": people,
        "tokensend.dispatcher.v1.Connector.workspace_id": ws,
        "tokensend.dispatcher.v1.Connector.base_url": urls,
        "tokensend.dispatcher.v1.CustomHttpTemplate.url": urls,
        "tokensend.resolver.v1.PiiApiConfig.workspace_id": ws,
        "tokensend.resolver.v1.PiiApiConfig.url": urls,
        "tokensend.resolver.v1.PiiApiConfig.timeout_ms": st.sampled_from([0, 1, 500, 60_001]),
        "tokensend.resolver.v1.PiiApiConfig.contact_path": st.sampled_from(["email", "customer.phone", "[", "a.b"])
        | nasty_text,
        "tokensend.resolver.v1.OAuthConfig.workspace_id": ws,
        "tokensend.resolver.v1.OAuthConfig.token_url": urls,
        "tokensend.resolver.v1.TestPiiApiConfigRequest.test_anonymous_id": people,
        "tokensend.resolver.v1.TestPiiApiConfigRequest.SavedConfig.workspace_id": ws,
    }


async def outcome(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        assert exc.code() not in UNHANDLED, (exc.code(), exc.details())
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def suite(start_suite):
    return await start_suite(provider_max_retries=0)


def base_requests(suite) -> dict[str, list[Message]]:
    """Requests that succeed against the suite: the fuzzer's starting points."""
    workspace = suite.workspace
    pii = workspace.pii_api_configs()
    header = dict(workspace_id=suite.workspace_id, campaign_id="fuzz", campaign_instance_id="f-1")
    people = [dpb.Recipient(anonymous_id=f"cust-{n:06d}", attributes={"tier": "gold"}) for n in range(1, 4)]
    contents = {
        ("gateway", common_pb2.CHANNEL_SMS): SMS,
        ("sendgrid", common_pb2.CHANNEL_EMAIL): EMAIL,
        ("whatsapp", common_pb2.CHANNEL_WHATSAPP): WHATSAPP_TEMPLATE,
    }
    return {
        "PutPiiApiConfig": [rpb.PutPiiApiConfigRequest(config=c) for c in pii],
        "TestPiiApiConfig": [rpb.TestPiiApiConfigRequest(config=c, test_anonymous_id="cust-000001") for c in pii]
        + [
            rpb.TestPiiApiConfigRequest(
                saved=rpb.TestPiiApiConfigRequest.SavedConfig(workspace_id=suite.workspace_id, channel=c.channel),
                test_anonymous_id="cust-000002",
            )
            for c in pii
        ],
        "PutOAuthConfig": [rpb.PutOAuthConfigRequest(config=workspace.oauth_config())],
        "PutConnector": [dpb.PutConnectorRequest(connector=c) for c in workspace.connectors().values()],
        "Dispatch": [
            dpb.DispatchRequest(channel=ch, connector_id=cid, content=content, recipients=people, **header)
            for (cid, ch), content in contents.items()
        ],
        "SendTest": [
            dpb.SendTestRequest(
                workspace_id=suite.workspace_id,
                campaign_id="fuzz",
                channel=ch,
                connector_id=cid,
                content=content,
                recipient=people[0],
            )
            for (cid, ch), content in contents.items()
        ],
        "DispatchStream": [
            dpb.DispatchStreamRequest(
                header=dpb.DispatchStreamRequest.Header(channel=ch, connector_id=cid, content=content, **header)
            )
            for (cid, ch), content in contents.items()
        ],
    }


def calls(suite, methods: tuple[str, ...]) -> st.SearchStrategy:
    """(method, request): a working request, mutated, or (now and then) an entirely random one."""
    overrides = steer(suite)
    bases = base_requests(suite)
    options = []
    for method in methods:
        for base in bases[method]:
            options.append(st.tuples(st.just(method), mutations(base, overrides)))
        options.append(st.tuples(st.just(method), messages(bases[method][0].DESCRIPTOR, overrides)))
    return st.one_of(options)


async def call_dispatcher_or_resolver(suite, method: str, request: Message) -> None:
    if method == "DispatchStream":
        parts = [request, dpb.DispatchStreamRequest(recipients=dpb.DispatchStreamRequest.Recipients())]
        parts[1].recipients.recipients.extend(
            [dpb.Recipient(anonymous_id="cust-000005"), dpb.Recipient(anonymous_id="cust-000005")]
        )

        async def consume():
            async for _ in suite.dispatcher.stub.DispatchStream(iter(parts), timeout=30):
                pass

        await outcome(consume())
        return
    stub = suite.resolver.stub if hasattr(suite.resolver.stub, method) else suite.dispatcher.stub
    await outcome(getattr(stub, method)(request, timeout=30))


@FUZZ
@given(data=st.data())
async def test_fuzz_config_requests(suite, data):
    method, request = data.draw(calls(suite, ("PutPiiApiConfig", "TestPiiApiConfig", "PutOAuthConfig", "PutConnector")))
    await call_dispatcher_or_resolver(suite, method, request)


@FUZZ
@given(data=st.data())
async def test_fuzz_dispatch_requests(suite, data):
    method, request = data.draw(calls(suite, ("Dispatch", "SendTest", "DispatchStream")))
    await call_dispatcher_or_resolver(suite, method, request)


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


INGEST_OVERRIDES = {
    "tokensend.receipts.v1.IngestReceiptRequest.workspace_id": st.just(WS) | nasty_text,
    "tokensend.receipts.v1.IngestReceiptRequest.connector_id": st.sampled_from(list(CONNECTORS.values())) | nasty_text,
    "tokensend.receipts.v1.IngestReceiptRequest.body": st.sampled_from([b"[]", b"{}", b'[{"event": "open"}]'])
    | st.binary(max_size=200),
}


@FUZZ
@given(request=messages(cpb.IngestReceiptRequest.DESCRIPTOR, INGEST_OVERRIDES))
async def test_fuzz_ingest_receipt(receipts, request):
    await outcome(receipts.stub.IngestReceipt(request, timeout=30))


webhook_headers = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "X-Twilio-Signature",
            "X-Hub-Signature-256",
            "X-Twilio-Email-Event-Webhook-Signature",
            "X-Twilio-Email-Event-Webhook-Timestamp",
            "x-amz-sns-message-type",
            "I-Twilio-Idempotency-Token",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    max_size=4,
)


@FUZZ
@given(
    provider=st.sampled_from(["sendgrid", "ses", "twilio", "whatsapp"]),
    workspace=st.just(WS) | st.text(min_size=1, max_size=20),
    connector=st.sampled_from(list(CONNECTORS.values())) | st.text(min_size=1, max_size=20),
    headers=webhook_headers,
    body=st.binary(max_size=300) | st.sampled_from([b"[]", b"{}", b'{"Type": "Notification"}', b"a=b&c=d"]),
    query=st.text(max_size=40),
    handshake=st.booleans(),
)
async def test_fuzz_raw_webhooks(receipts, provider, workspace, connector, headers, body, query, handshake):
    path = f"/webhooks/{provider}/{quote(workspace, safe='')}/{quote(connector, safe='')}"
    url = receipts.local_url + path + ("?" + quote(query, safe="=&") if query else "")
    method = receipts.http.get if handshake and provider == "whatsapp" else receipts.http.post
    try:
        async with method(url, data=body, headers=headers) as reply:
            text = await reply.text()
    except ValueError:
        assume(False)  # a header aiohttp refuses to send
        return
    assert reply.status in (200, 400, 401, 403, 404, 405, 408, 413), (reply.status, text)
