"""PII API replies that fail validation leak nothing they hold, whichever way they fail.

A PII API stand-in answers each canary customer with a reply that cannot be used as it is: a contact
with a display name, a mailto: link, whitespace, a list, an object, a name where the address belongs,
the contact in a field no path selects, a reply past the size limit quoting it, a reply that is not
JSON, a 422 quoting the customer, numbers with letters or an extension, names that are objects. The
resolver's per-ID errors, the Test screen's error and the test send's PII API error say why without
the values; logs, spans, metrics and Redis hold none of them.
"""

from __future__ import annotations

import json

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import SandboxWorkspace
from services.resolver.server import ResolverDeps
from services.resolver.server import build_server as build_resolver
from tests.canary import canary_customers
from tests.conftest import RunningResolver, resolver_settings
from tests.integration.test_leak_probe_harness import sinks

pytestmark = pytest.mark.integration

C = common_pb2.Channel
WS = "brand"
PEOPLE = 14


@pytest.fixture
def customers():
    return canary_customers(PEOPLE)


def email_reply(n: int, p) -> web.Response:
    """Customer `n`'s reply on the Email channel: each one unusable its own way."""
    customer = {"email": p.email, "profile": {"first_name": p.first_name, "last_name": p.last_name}}
    if n == 0:
        customer["email"] = f"{p.first_name} {p.last_name} <{p.email}>"
    elif n == 1:
        customer["email"] = f"mailto:{p.email}"
    elif n == 2:
        customer["email"] = p.email.replace("@", " @")
    elif n == 3:
        customer["email"] = [p.email, p.email.upper()]
    elif n == 4:
        customer["email"] = {"value": p.email, "owner": p.first_name}
    elif n == 5:
        customer["email"] = f"{p.first_name}{p.last_name}"
    elif n == 6:
        customer["notes"] = f"reach {p.first_name} at {p.email}"
        del customer["email"]
    elif n == 7:
        filler = f"{p.email} {p.first_name} " * 300_000
        return web.json_response({"customer": customer, "history": filler})
    elif n == 8:
        return web.Response(
            text=f"<html>{p.first_name} {p.last_name} &lt;{p.email}&gt;</html>", content_type="text/html"
        )
    elif n == 9:
        body = {"message": f"customer {p.first_name} {p.last_name} is restricted", "customer": customer}
        return web.json_response(body, status=422)
    elif n == 10:
        customer["profile"]["first_name"] = {"given": p.first_name, "family": p.last_name}
    elif n == 11:
        customer["email"] = p.email + "."
    elif n == 12:
        customer["email"] = f"{p.email}\u200b"
    elif n == 13:
        return web.json_response({p.first_name: customer})
    return web.json_response({"customer": customer})


def sms_reply(n: int, p) -> web.Response:
    customer = {"phone": p.phone, "profile": {"first_name": p.first_name, "last_name": p.last_name}}
    if n == 0:
        customer["phone"] = f"{p.phone} ext. 12"
    elif n == 1:
        customer["phone"] = f"{p.phone[:6]} CALL {p.first_name}"
    elif n == 2:
        customer["phone"] = p.phone[3:]  # national digits, no region configured
    elif n == 3:
        customer["phone"] = [p.phone, p.phone]
    elif n == 4:
        customer["phone"] = int(p.phone[1:]) * 10**9  # too long a number
    elif n == 5:
        customer["phone"] = f"tel:{p.phone};{p.first_name}"
    elif n == 6:
        body = {"error": {"code": "LOCKED", "message": f"{p.phone} locked for {p.first_name}"}, "record": customer}
        return web.json_response(body, status=403)
    elif n == 7:
        customer["phone"] = p.phone.replace("+44", "+999")
    return web.json_response({"customer": customer})


async def test_replies_that_fail_validation_leak_nowhere(
    start_dispatcher, customers, redis, redis_url, secret_key, captured_logs, tmp_path
):
    people = customers
    ordered = [people[f"canary-{n}"] for n in range(PEOPLE)]

    async def customer(request: web.Request) -> web.Response:
        anonymous_id = request.match_info["id"]
        n = int(anonymous_id.rsplit("-", 1)[1])
        reply = email_reply if request.match_info["family"] == "email" else sms_reply
        return reply(n, ordered[n])

    app = web.Application()
    app.router.add_get("/{family}/customers/{id}", customer)
    api = TestServer(app, host="127.0.0.1")
    await api.start_server()
    base = str(api.make_url("")).rstrip("/")
    providers = ProviderSandbox()
    providers_runner, providers_port = await start_providers(providers)
    workspace = SandboxWorkspace(WS, base, f"http://127.0.0.1:{providers_port}", providers.sendgrid_public_key)
    for account in workspace.provider_accounts():
        providers.add_account(account)
    try:
        async with sinks(tmp_path, "resolver", "dispatcher") as probe:
            settings = resolver_settings(redis_url, secret_key, log_level="DEBUG", circuit_failure_threshold=1000)
            deps = ResolverDeps.from_settings(settings, probe.telemetry["resolver"])
            server, port = await build_resolver(settings, deps)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            resolver = RunningResolver(rpb_grpc.ResolverServiceStub(channel), channel, port, settings, deps)
            dispatcher = await start_dispatcher(resolver, telemetry=probe.telemetry["dispatcher"])
            try:
                for connector in workspace.connectors().values():
                    await dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=connector))
                configs = {}
                for family, chan, contact in (("email", C.CHANNEL_EMAIL, "email"), ("sms", C.CHANNEL_SMS, "phone")):
                    configs[chan] = rpb.PiiApiConfig(
                        workspace_id=WS,
                        channel=chan,
                        mode=rpb.MODE_SINGLE,
                        method=rpb.HTTP_METHOD_GET,
                        url=f"{base}/{family}/customers/@anonymous_id",
                        contact_path=f"customer.{contact}",
                        attribute_paths={
                            "first_name": "customer.profile.first_name",
                            "last_name": "customer.profile.last_name",
                        },
                        timeout_ms=5000,
                        max_retries=0,
                    )
                    await resolver.stub.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=configs[chan]))

                cases = ((C.CHANNEL_EMAIL, "sendgrid", range(PEOPLE)), (C.CHANNEL_SMS, "twilio", range(8)))
                for chan, connector_id, ids in cases:
                    resolved = await resolver.stub.ResolveContacts(
                        rpb.ResolveContactsRequest(
                            workspace_id=WS, channel=chan, anonymous_ids=[f"canary-{n}" for n in ids]
                        )
                    )
                    for contact in resolved.contacts:
                        probe.keep(str(contact.error))
                        # Every reply fails somehow, but names that are an object (read as its JSON).
                        assert contact.error.code or contact.anonymous_id == "canary-10", contact.anonymous_id
                    content = pb.Content(
                        subject="{{ first_name }}", text_body="{{ first_name }}", sms_body="{{ first_name }}"
                    )
                    sent = await dispatcher.stub.Dispatch(
                        pb.DispatchRequest(
                            workspace_id=WS,
                            campaign_id="spring",
                            campaign_instance_id=f"run-{chan}",
                            channel=chan,
                            connector_id=connector_id,
                            content=content,
                            recipients=[pb.Recipient(anonymous_id=f"canary-{n}") for n in ids],
                        )
                    )
                    probe.keep(*(f"{r.error_code} {r.error_message}" for r in sent.results))
                    for n in ids:
                        tested = await resolver.stub.TestPiiApiConfig(
                            rpb.TestPiiApiConfigRequest(config=configs[chan], test_anonymous_id=f"canary-{n}")
                        )
                        # The body, contact and attributes are the operator's to see (sensitive); the error
                        # and the reply's leaf paths are not marked so, and hold no value of the reply.
                        probe.keep(str(tested.error), *tested.response_keys)
                        test = await dispatcher.stub.SendTest(
                            pb.SendTestRequest(
                                workspace_id=WS,
                                campaign_id="spring",
                                channel=chan,
                                connector_id=connector_id,
                                content=content,
                                recipient=pb.Recipient(anonymous_id=f"canary-{n}"),
                            )
                        )
                        probe.keep(f"{test.result.error_code} {test.result.error_message}", test.pii_api_error)
                found = await probe.leaks(people, redis, captured_logs)
            finally:
                await channel.close()
                await server.stop(0.5)
    finally:
        await providers.close()
        await providers_runner.cleanup()
        await api.close()
    assert found == {"redis": [], "logs": [], "texts": [], "spans": [], "metrics": []}, json.dumps(found)
