"""Connector RPCs probed as an operator with grpcurl would: values no later send could use are refused
at save, naming the field and never quoting the secret."""

from __future__ import annotations

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.integration.test_dispatcher_campaigns import EMAIL, SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
K = pb.ConnectorKind

# A provider's key or token as pasted from a console: a space or an invisible character around or inside it.
PASTED = {
    "space after": "tok-canary-4471 ",
    "space before": " tok-canary-4471",
    "no-break space": "tok-canary-4471\u00a0",
    "zero-width space": "\u200btok-canary-4471",
    "byte order mark": "tok-canary-4471\ufeff",
    "line separator": "tok\u2028canary-4471",
    "accented letter": "tok-canäry-4471",
}

CONNECTORS = {
    "sendgrid": pb.Connector(
        kind=K.CONNECTOR_KIND_SENDGRID,
        channel=C.CHANNEL_EMAIL,
        sender="news@brand.example",
        credentials={"api_key": "SG.ok"},
    ),
    "ses": pb.Connector(
        kind=K.CONNECTOR_KIND_SES,
        channel=C.CHANNEL_EMAIL,
        sender="news@brand.example",
        credentials={"access_key_id": "AKIDEXAMPLE", "secret_access_key": "s3cr3t", "region": "eu-west-1"},
    ),
    "twilio": pb.Connector(
        kind=K.CONNECTOR_KIND_TWILIO,
        channel=C.CHANNEL_SMS,
        sender="+15005550006",
        credentials={"account_sid": "AC" + "0" * 32, "auth_token": "f" * 32},
    ),
    "whatsapp": pb.Connector(
        kind=K.CONNECTOR_KIND_WHATSAPP_CLOUD,
        channel=C.CHANNEL_WHATSAPP,
        sender="1234567890",
        credentials={"access_token": "EAAG-ok"},
        webhook_secret="app-secret",
    ),
}

# The provider-issued keys and tokens sent in a request's Authorization header, or a signature's key.
TOKENS = [
    ("sendgrid", "api_key"),
    ("ses", "access_key_id"),
    ("ses", "secret_access_key"),
    ("twilio", "auth_token"),
    ("whatsapp", "access_token"),
]


def connector(name: str, **credentials: str) -> pb.Connector:
    out = pb.Connector()
    out.CopyFrom(CONNECTORS[name])
    out.workspace_id, out.connector_id = "probe", name
    out.credentials.update(credentials)
    return out


@pytest.mark.parametrize(("name", "credential"), TOKENS)
@pytest.mark.parametrize("pasted", list(PASTED), ids=list(PASTED))
async def test_a_provider_token_with_a_pasted_space_or_invisible_character_is_refused_at_save(
    start_dispatcher, redis, name, credential, pasted
):
    dispatcher = await start_dispatcher()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatcher.stub.PutConnector(
            pb.PutConnectorRequest(connector=connector(name, **{credential: PASTED[pasted]}))
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"connector.credentials[{credential!r}]: ")
    assert "canary" not in refused.value.details() and "4471" not in refused.value.details()
    assert await redis.keys("ts:{probe}:connector*") == []  # nothing saved


@pytest.mark.parametrize("pasted", ["app-secret ", "\tapp-secret", "app\x00secret", "app-sécret"])
async def test_a_whatsapp_app_secret_no_signature_could_match_is_refused_at_save(start_dispatcher, pasted):
    dispatcher = await start_dispatcher()
    wrong = connector("whatsapp")
    wrong.webhook_secret = pasted
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=wrong))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("connector.webhook_secret: ")
    assert "app" not in refused.value.details()


async def test_a_sendgrid_key_with_a_trailing_space_would_fail_every_send(start_suite):
    """Why the refusal: saved, each message is fetched and then refused by the provider."""
    suite = await start_suite()
    saved = suite.workspace.connectors()["sendgrid"]
    pasted = pb.Connector()
    pasted.CopyFrom(saved)
    pasted.credentials["api_key"] = saved.credentials["api_key"] + " "
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=pasted))
    assert refused.value.details().startswith("connector.credentials['api_key']: ")
    reply = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", EMAIL, recipients(1))
    assert reply.results[0].status == pb.DISPATCH_STATUS_SENT  # the saved connector is untouched


@pytest.mark.parametrize(("name", "credential"), TOKENS)
async def test_a_provider_token_as_issued_is_saved(start_dispatcher, name, credential):
    dispatcher = await start_dispatcher()
    issued = "Ab0-_.~+/=" + "x" * 20
    reply = await dispatcher.stub.PutConnector(
        pb.PutConnectorRequest(connector=connector(name, **{credential: issued}))
    )
    assert reply.connector.credentials[credential] == "********"


@pytest.mark.parametrize(
    "topics",
    [
        "ses-events",  # the topic's name, not its ARN
        "arn:aws:sns:us-east-1:ses-events",  # no account
        "arn:aws:sqs:us-east-1:123456789012:ses-events",  # a queue
        "arn:aws:sns:us-east-1:123456789012:ses-events,https://sns.us-east-1.amazonaws.com/",
        ",",
    ],
)
async def test_sns_topics_no_notification_could_come_from_are_refused_at_save(start_dispatcher, topics):
    """Every SNS message from a topic not listed is refused: such a list would count no SES receipt."""
    dispatcher = await start_dispatcher()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=connector("ses", sns_topic_arns=topics)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("connector.credentials['sns_topic_arns']: ")


async def test_sns_topic_arns_as_listed_are_saved(start_dispatcher):
    dispatcher = await start_dispatcher()
    topics = "arn:aws:sns:us-east-1:123456789012:ses-events, arn:aws-cn:sns:cn-north-1:123456789012:Other_1.fifo"
    reply = await dispatcher.stub.PutConnector(
        pb.PutConnectorRequest(connector=connector("ses", sns_topic_arns=topics))
    )
    assert reply.connector.credentials["sns_topic_arns"] == "********"


@pytest.mark.parametrize(
    "header",
    ["Content-Length", "transfer-encoding", "Host", "Connection", "Expect", "TE", "Upgrade", "Proxy-Authorization"],
)
async def test_a_custom_http_header_the_client_writes_itself_is_refused_at_save(start_suite, header):
    """Saved, it would cut every body short, break every request or send it to another host."""
    suite = await start_suite()
    gateway = pb.Connector()
    gateway.CopyFrom(suite.workspace.connectors()["gateway"])
    gateway.custom_http.headers[header] = "5"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=gateway))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"connector.custom_http.headers[{header!r}]: ")
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1))
    assert reply.results[0].status == pb.DISPATCH_STATUS_SENT  # the saved connector is untouched


@pytest.mark.parametrize(
    "body",
    [
        '{"to": "@to", "text": "@text",}',  # a trailing comma
        '{"to": "@to", "text": "@text"',  # the closing brace left out
        '{"to": @to, "text": "@text"}',  # a number is no JSON value: +15005550006
        '[@credentials.api_key, "@to"]',  # a bare credential that is no JSON value
    ],
)
async def test_a_json_body_no_message_could_fill_into_valid_json_is_refused_at_save(start_suite, body):
    """Declared JSON, every message would reach the gateway malformed (refused, after its contact was fetched)."""
    suite = await start_suite()
    gateway = pb.Connector()
    gateway.CopyFrom(suite.workspace.connectors()["gateway"])
    gateway.custom_http.headers["Content-Type"] = "application/json"
    gateway.custom_http.body = body
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=gateway))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("connector.custom_http.body: ")
    secret = gateway.credentials["api_key"]
    assert secret not in refused.value.details()


async def test_a_json_body_with_a_numeric_credential_written_bare_is_saved(start_suite):
    suite = await start_suite()
    gateway = pb.Connector()
    gateway.CopyFrom(suite.workspace.connectors()["gateway"])
    gateway.credentials["account"] = "4242"
    gateway.custom_http.body = '{"account": @credentials.account, "to": "@to", "text": "@text", "ref": "@message_id"}'
    reply = await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=gateway))
    assert reply.connector.custom_http.body.startswith('{"account": @credentials.account')
