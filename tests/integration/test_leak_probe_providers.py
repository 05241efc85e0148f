"""Providers' error replies that quote the recipient reach no sink but the provider request.

An SMTP relay refuses each canary's address with a reply quoting it and the customer's name; an SES
stand-in answers MessageRejected quoting the address in its message, its error type and its headers;
a custom gateway answers 4xx and 5xx whose bodies and headers quote the number, redirects to a URL
holding it, and names the message by a value it echoes from the request. With tracing and metrics on,
the results, logs, spans, metrics and Redis (plain hashes included) are scanned for the canaries.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.canary import canary_customers
from tests.integration.peers import RecordingHandler, smtp_relay  # noqa: F401
from tests.integration.test_leak_probe_harness import sinks

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
EMAIL = pb.Content(subject="Hello {{ first_name }}", text_body="Dear {{ first_name }} {{ last_name }}")
SMS = pb.Content(sms_body="Hi {{ first_name }} {{ last_name }}")


@pytest.fixture
def customers():
    return canary_customers(12)


class QuotingHandler(RecordingHandler):
    """A relay that refuses every recipient, quoting the address and the text it was sent."""

    def __init__(self, people) -> None:
        super().__init__()
        self.people = people

    def _who(self, address: str):
        return next((p for p in self.people.values() if p.email.lower() == address.lower()), None)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001, ANN201
        who = self._who(address)
        if who is not None and who.anonymous_id.endswith(("-0", "-1")):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown ({who.first_name})"
        if who is not None and who.anonymous_id.endswith("-2"):
            return f"452 4.2.2 <{address}> mailbox full for {who.first_name} {who.last_name}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        address = envelope.rcpt_tos[0]
        who = self._who(address)
        name = who.first_name if who else ""
        return f"554 5.7.1 message to {address} refused: {name} content rejected"


def stand_in(routes: dict[str, Callable[[web.Request], web.StreamResponse]]):
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    return TestServer(app, host="127.0.0.1")


async def test_provider_errors_quoting_the_recipient_leak_nowhere(
    start_suite,
    customers,
    smtp_relay,  # noqa: F811
    redis,
    captured_logs,
    tmp_path,  # noqa: F811
):
    people = customers
    by_contact = {p.email: p for p in people.values()} | {p.phone: p for p in people.values()}

    async def ses(request: web.Request) -> web.Response:
        to = (await request.json())["Destination"]["ToAddresses"][0]
        who = by_contact.get(to)
        text = f"Email address is not verified. The following identities failed the check: {to} ({who.first_name})"
        return web.json_response(
            {"message": text, "__type": "MessageRejected"},
            status=400,
            headers={"x-amzn-ErrorType": f"MessageRejected:{to}", "x-amzn-ErrorMessage": text},
        )

    async def gateway(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        to, text = str(form["to"]), str(form["text"])
        n = int(by_contact[to].anonymous_id.rsplit("-", 1)[1]) if to in by_contact else 0
        quoted = {"X-Error": f"invalid destination {to}", "X-Echo-Text": text.encode("ascii", "replace").decode()}
        if n == 6:
            return web.json_response({"error": f"invalid number {to}", "text": text}, status=400, headers=quoted)
        if n == 7:
            return web.Response(text=f"upstream failed for {to}: {text}", status=503, headers=quoted)
        if n == 8:
            raise web.HTTPFound(f"https://gw.example/retry?to={to}&text={text}", headers=quoted)
        if n == 9:  # a Vonage-style reply refusing the part, its error text quoting the request
            body = {"messages": [{"status": "3", "error-text": f"Invalid to {to} for {text}", "to": to}]}
            return web.json_response(body, headers=quoted)
        # Accepted, but the message's ID is the text it was sent (the connector's path is wrong).
        body = {"messages": [{"status": "0", "message-id": text.split()[1], "to": to}]}
        return web.json_response(body, headers=quoted)

    ses_server = stand_in({"/v2/email/outbound-emails": ses})
    gateway_server = stand_in({"/sms/json": gateway})
    await ses_server.start_server()
    await gateway_server.start_server()
    relay = smtp_relay(QuotingHandler(people))
    try:
        async with sinks(tmp_path, "dispatcher") as probe:
            suite = await start_suite(telemetry=probe.telemetry["dispatcher"], provider_retry_max_ms=2)
            stub, ws = suite.dispatcher.stub, suite.workspace_id
            gateway_connector = suite.workspace.connectors()["gateway"]
            gateway_connector.connector_id = "quoting-gateway"
            gateway_connector.base_url = str(gateway_server.make_url("")).rstrip("/")
            for connector in (
                pb.Connector(
                    workspace_id=ws,
                    connector_id="relay",
                    kind=pb.CONNECTOR_KIND_SMTP,
                    channel=C.CHANNEL_EMAIL,
                    base_url=relay.url(),
                    sender="news@brand.example",
                ),
                pb.Connector(
                    workspace_id=ws,
                    connector_id="ses",
                    kind=pb.CONNECTOR_KIND_SES,
                    channel=C.CHANNEL_EMAIL,
                    base_url=str(ses_server.make_url("")).rstrip("/"),
                    credentials={
                        "access_key_id": "AKIDEXAMPLE",
                        "secret_access_key": "ses-secret",
                        "region": "eu-west-1",
                    },
                    sender="news@brand.example",
                ),
                gateway_connector,
            ):
                await stub.PutConnector(pb.PutConnectorRequest(connector=connector))

            async def dispatch(channel, connector_id, content, ids, instance):
                reply = await stub.Dispatch(
                    pb.DispatchRequest(
                        workspace_id=ws,
                        campaign_id="spring",
                        campaign_instance_id=instance,
                        channel=channel,
                        connector_id=connector_id,
                        content=content,
                        recipients=[pb.Recipient(anonymous_id=f"canary-{i}") for i in ids],
                    )
                )
                probe.keep(*(f"{r.error_code} {r.error_message} {r.message_id}" for r in reply.results))
                return reply

            smtp = await dispatch(C.CHANNEL_EMAIL, "relay", EMAIL, range(0, 4), "smtp")
            assert smtp.summary.sent == 0, smtp
            refused = await dispatch(C.CHANNEL_EMAIL, "ses", EMAIL, range(4, 6), "ses")
            assert [r.status for r in refused.results] == [S.DISPATCH_STATUS_SEND_FAILED] * 2
            gw = await dispatch(C.CHANNEL_SMS, "quoting-gateway", SMS, range(6, 12), "gateway")
            assert gw.summary.sent == 2, gw
            found = await probe.leaks(people, redis, captured_logs)
    finally:
        await ses_server.close()
        await gateway_server.close()
    assert found == {"redis": [], "logs": [], "texts": [], "spans": [], "metrics": []}, json.dumps(found)
