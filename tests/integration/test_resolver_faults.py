"""A slow, failing, rate-limited or unreachable PII API, and Redis going away: defined per-ID outcomes."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time

import grpc
import pytest
from aiohttp import compression_utils, web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs import netguard
from tests.conftest import free_port, serving
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode


async def put(resolver, config):
    return await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))


async def resolve(resolver, ids, workspace_id="ws-1"):
    return await resolver.stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id=workspace_id, channel=EMAIL, anonymous_ids=ids)
    )


async def test_slow_api_times_out_per_id_after_retries(resolver, pii_api):
    await put(resolver, single_config(pii_api.base_url, timeout_ms=100, max_retries=1))
    pii_api.sandbox.faults.latency_ms = 400
    reply = await resolve(resolver, ["cust-000001", "cust-000002"])
    assert [c.anonymous_id for c in reply.contacts] == ["cust-000001", "cust-000002"]
    for contact in reply.contacts:
        assert contact.error.code == E.RESOLVE_ERROR_CODE_TIMEOUT
        assert contact.error.attempts == 2
        assert contact.error.message == "Invalid API response (fetching Email ID)"
        assert "timed out after 100 ms" in contact.error.detail


async def test_transient_500_is_retried_only_for_the_failed_batch(resolver, pii_api, customers):
    await put(resolver, bulk_config(pii_api.base_url, batch_size=5))
    pii_api.sandbox.faults.fail_status, pii_api.sandbox.faults.fail_count = 500, 1
    ids = [f"cust-{n:06d}" for n in range(1, 21)]
    reply = await resolve(resolver, ids)
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in ids]
    stats = pii_api.sandbox.stats
    assert stats.statuses["500"] == 1 and stats.statuses["200"] == 4
    assert stats.ids_requested == 20 + 5  # the four good batches once, the failed one again


async def test_retries_are_bounded_and_errors_hold_no_pii(resolver, pii_api, customers):
    await put(resolver, single_config(pii_api.base_url, max_retries=2))
    pii_api.sandbox.faults.fail_status, pii_api.sandbox.faults.fail_count = 503, -1
    pii_api.sandbox.faults.echo_pii_in_errors = True
    reply = await resolve(resolver, ["cust-000001"])
    error = reply.contacts[0].error
    assert error.code == E.RESOLVE_ERROR_CODE_SERVER_ERROR
    assert error.http_status == 503 and error.attempts == 3
    customer = customers["cust-000001"]
    assert customer.email not in str(reply) and customer.phone not in str(reply)
    assert pii_api.sandbox.stats.statuses["503"] == 3


async def test_retry_after_is_honoured(resolver, pii_api, customers):
    await put(resolver, single_config(pii_api.base_url))
    pii_api.sandbox.faults.rate_limit_count, pii_api.sandbox.faults.retry_after_seconds = 1, 1
    started = time.monotonic()
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].contact == customers["cust-000001"].email
    # Our own backoff is 10-40 ms in tests; only the server's Retry-After explains a second.
    assert time.monotonic() - started >= 0.95
    assert pii_api.sandbox.stats.statuses["429"] == 1


async def test_retry_after_beyond_the_limit_gives_up_at_once(start_resolver, pii_api):
    resolver = await start_resolver(pii_max_retry_after_seconds=0.5)
    await put(resolver, single_config(pii_api.base_url))
    pii_api.sandbox.faults.rate_limit_count, pii_api.sandbox.faults.retry_after_seconds = -1, 120
    reply = await resolve(resolver, ["cust-000001"])
    error = reply.contacts[0].error
    assert error.code == E.RESOLVE_ERROR_CODE_RATE_LIMITED and error.attempts == 1
    assert "Retry-After 120s" in error.detail


async def test_malformed_reply_is_retried_then_reported(resolver, pii_api, customers):
    await put(resolver, bulk_config(pii_api.base_url, max_retries=1))
    pii_api.sandbox.faults.malformed_count = 1
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].contact == customers["cust-000001"].email
    pii_api.sandbox.faults.malformed_count = -1
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
    assert reply.contacts[0].error.attempts == 2


async def test_dropped_connections_are_retried(resolver, pii_api, customers):
    await put(resolver, bulk_config(pii_api.base_url))
    pii_api.sandbox.faults.drop_connection_count = 2
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].contact == customers["cust-000001"].email
    assert pii_api.sandbox.stats.dropped_connections == 2


async def test_unreachable_api_is_a_connection_failure(resolver):
    await put(resolver, bulk_config(f"http://127.0.0.1:{free_port()}", max_retries=1))
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].error.code == E.RESOLVE_ERROR_CODE_CONNECTION_FAILED
    assert reply.contacts[0].error.attempts == 2


async def test_circuit_opens_fails_fast_and_recovers_after_a_probe(start_resolver, start_pii_api_server, customers):
    resolver = await start_resolver(circuit_failure_threshold=3, circuit_open_seconds=0.5)
    failing = await start_pii_api_server()
    healthy = await start_pii_api_server()
    await put(resolver, bulk_config(failing.base_url, max_retries=0))
    await put(resolver, bulk_config(healthy.base_url, workspace_id="ws-2", max_retries=0))
    failing.sandbox.faults.fail_status, failing.sandbox.faults.fail_count = 500, -1

    for _ in range(3):
        reply = await resolve(resolver, ["cust-000001"])
        assert reply.contacts[0].error.code == E.RESOLVE_ERROR_CODE_SERVER_ERROR
    calls = failing.sandbox.stats.requests
    reply = await resolve(resolver, ["cust-000001", "cust-000002"])
    assert {c.error.code for c in reply.contacts} == {E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN}
    assert reply.contacts[0].error.attempts == 0
    assert failing.sandbox.stats.requests == calls  # failed fast, nothing sent

    other = await resolve(resolver, ["cust-000001"], workspace_id="ws-2")  # another API is unaffected
    assert other.contacts[0].contact == customers["cust-000001"].email

    failing.sandbox.faults.fail_count = 0

    await asyncio.sleep(0.6)
    reply = await resolve(resolver, ["cust-000001"])  # the half-open probe succeeds and closes the circuit
    assert reply.contacts[0].contact == customers["cust-000001"].email
    reply = await resolve(resolver, ["cust-000002"])
    assert reply.contacts[0].contact == customers["cust-000002"].email


def error_pages(status: int, size: int) -> tuple[web.Application, list[str]]:
    """A PII API behind a proxy that answers every call with an HTML page of about `size` bytes, and
    the paths it was asked for."""
    asked: list[str] = []

    async def page(request: web.Request) -> web.Response:
        asked.append(request.path)
        html = f"<html><body><h1>{status}</h1><p>{'x' * size}</p></body></html>"
        return web.Response(status=status, text=html, content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", page)
    return app, asked


@pytest.mark.parametrize(
    ("status", "size", "code"),
    [
        (200, 100, E.RESOLVE_ERROR_CODE_INVALID_RESPONSE),  # an error page sent with a 200
        (503, 1000, E.RESOLVE_ERROR_CODE_SERVER_ERROR),  # an error page larger than the reply limit
    ],
)
async def test_html_error_pages_open_the_circuit_as_5xx_does(start_resolver, status, size, code):
    resolver = await start_resolver(circuit_failure_threshold=3, circuit_open_seconds=30, max_response_bytes=300)
    app, asked = error_pages(status, size)
    async with serving(app) as base_url:
        await put(resolver, bulk_config(base_url, max_retries=0))
        for _ in range(3):
            reply = await resolve(resolver, ["cust-000001"])
            assert reply.contacts[0].error.code == code
            assert reply.contacts[0].error.http_status == status
        reply = await resolve(resolver, ["cust-000001", "cust-000002"])
    assert {c.error.code for c in reply.contacts} == {E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN}
    assert len(asked) == 3  # failed fast, nothing sent


async def test_a_200_error_page_is_retried(resolver):
    app, asked = error_pages(200, 100)
    async with serving(app) as base_url:
        await put(resolver, bulk_config(base_url, max_retries=2))
        reply = await resolve(resolver, ["cust-000001"])
    error = reply.contacts[0].error
    assert error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE and error.attempts == 3
    assert error.detail == "reply is not JSON after 3 attempts"
    assert len(asked) == 3


async def test_replies_too_large_for_their_batch_open_no_circuit(start_resolver, pii_api, customers):
    """Ten records are more than the limit, one is not: the API is well, and smaller calls get through."""
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=30, max_response_bytes=300)
    await put(resolver, bulk_config(pii_api.base_url, max_retries=3))
    ids = [f"cust-{n:06d}" for n in range(1, 11)]
    for _ in range(3):
        reply = await resolve(resolver, ids)
        assert {c.error.code for c in reply.contacts} == {E.RESOLVE_ERROR_CODE_INVALID_RESPONSE}
        assert reply.contacts[0].error.attempts == 1  # the same batch would get the same answer
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].contact == customers["cust-000001"].email


async def test_failed_probe_reopens_the_circuit(start_resolver, pii_api):
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=0.3)
    await put(resolver, bulk_config(pii_api.base_url, max_retries=0))
    pii_api.sandbox.faults.fail_status, pii_api.sandbox.faults.fail_count = 502, -1
    for _ in range(2):
        await resolve(resolver, ["cust-000001"])

    await asyncio.sleep(0.35)
    probe = await resolve(resolver, ["cust-000001"])
    assert probe.contacts[0].error.code == E.RESOLVE_ERROR_CODE_SERVER_ERROR
    after = await resolve(resolver, ["cust-000001"])
    assert after.contacts[0].error.code == E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN


async def test_a_probe_its_caller_gives_up_on_does_not_keep_the_circuit_open(start_resolver, pii_api, customers):
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=0.3)
    await put(resolver, bulk_config(pii_api.base_url, max_retries=0, timeout_ms=5000))
    pii_api.sandbox.faults.fail_status, pii_api.sandbox.faults.fail_count = 502, -1
    for _ in range(2):
        await resolve(resolver, ["cust-000001"])
    await asyncio.sleep(0.35)
    pii_api.sandbox.faults.fail_count, pii_api.sandbox.faults.latency_ms = 0, 2000
    request = pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=["cust-000001"])
    asked = pii_api.sandbox.stats.requests
    call = resolver.stub.ResolveContacts(request)  # the probe
    for _ in range(200):
        if pii_api.sandbox.stats.requests > asked:
            break
        await asyncio.sleep(0.01)
    call.cancel()  # abandoned mid-call
    with pytest.raises(asyncio.CancelledError):
        await call
    pii_api.sandbox.faults.latency_ms = 0
    await asyncio.sleep(0.2)  # the resolver sees the call cancelled
    reply = await resolve(resolver, ["cust-000001"])  # a new probe goes out, and closes the circuit
    assert reply.contacts[0].contact == customers["cust-000001"].email


async def test_redis_unreachable_is_unavailable(start_resolver):
    resolver = await start_resolver(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(resolver, ["cust-000001"])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "storage unavailable, retry later"


@pytest.mark.parametrize("config", [bulk_config, single_config])
async def test_a_reply_that_arrives_in_pieces_is_read_whole(resolver, pii_api, customers, config):
    await put(resolver, config(pii_api.base_url, max_retries=0))
    pii_api.sandbox.faults.trickle_count = -1
    ids = [f"cust-{n:06d}" for n in range(1, 51)]
    reply = await resolve(resolver, ids)
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in ids]


@pytest.mark.parametrize("trickled", [False, True])
async def test_a_reply_over_the_size_limit_is_refused(start_resolver, pii_api, trickled):
    resolver = await start_resolver(max_response_bytes=300)
    await put(resolver, bulk_config(pii_api.base_url, max_retries=0))
    pii_api.sandbox.faults.trickle_count = -1 if trickled else 0
    reply = await resolve(resolver, [f"cust-{n:06d}" for n in range(1, 11)])
    assert len(reply.contacts) == 10
    for contact in reply.contacts:
        assert contact.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
        assert "reply larger than 300 bytes" in contact.error.detail
    assert (await resolve(resolver, ["cust-000001"])).contacts[0].contact  # one record fits


async def test_a_reply_that_trickles_past_the_timeout_times_out(resolver, pii_api):
    await put(resolver, bulk_config(pii_api.base_url, timeout_ms=40, max_retries=1))
    pii_api.sandbox.faults.trickle_count = -1  # eight pieces 10 ms apart: the headers in time, the body not
    reply = await resolve(resolver, ["cust-000001"])
    error = reply.contacts[0].error
    assert error.code == E.RESOLVE_ERROR_CODE_TIMEOUT and error.attempts == 2
    assert "timed out after 40 ms" in error.detail


@pytest.mark.parametrize("make_config", [single_config, bulk_config])
async def test_a_path_that_cannot_apply_to_a_records_values_fails_no_id(resolver, pii_api, customers, make_config):
    """`length(profile.nickname)` is a JMESPath type error on records without a nickname: the
    attribute is missing for those records, and every ID still resolves."""
    paths = {"initials": "length(profile.nickname)"}
    if make_config is single_config:
        paths = {"initials": "length(customer.profile.nickname)"}
    await put(resolver, make_config(pii_api.base_url, attribute_paths=paths))
    ids = ["cust-000001", "cust-000002", "cust-000003"]
    reply = await resolve(resolver, ids)
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in ids]
    assert all("initials" not in c.attributes and not c.HasField("error") for c in reply.contacts)


async def test_retries_stop_at_the_callers_deadline_and_each_id_gets_its_error(resolver, pii_api):
    """Ten retries of 300 ms attempts would outlast a caller that waits a second: the attempts stop
    in time for the reply, which gives each ID a TIMEOUT rather than the call DEADLINE_EXCEEDED."""
    await put(resolver, bulk_config(pii_api.base_url, timeout_ms=300, max_retries=10))
    pii_api.sandbox.faults.latency_ms = 2000
    request = pb.ResolveContactsRequest(
        workspace_id="ws-1", channel=EMAIL, anonymous_ids=["cust-000001", "cust-000002"]
    )
    started = time.monotonic()
    reply = await resolver.stub.ResolveContacts(request, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert {c.error.code for c in reply.contacts} == {E.RESOLVE_ERROR_CODE_TIMEOUT}
    assert 1 <= reply.contacts[0].error.attempts < 11


async def test_no_workspace_opens_another_workspaces_circuit(start_resolver, start_pii_api_server, customers):
    """ws-2 tests (or saves and uses) a config pointing at ws-1's PII API and makes it fail: ws-1's own
    calls to that API still go out. A test's failures open no circuit at all."""
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=30)
    api = await start_pii_api_server()
    await put(resolver, bulk_config(api.base_url, max_retries=0))
    api.sandbox.faults.fail_status, api.sandbox.faults.fail_count = 500, -1
    for _ in range(3):
        await resolver.stub.TestPiiApiConfig(
            pb.TestPiiApiConfigRequest(
                config=bulk_config(api.base_url, workspace_id="ws-2", max_retries=0), test_anonymous_id="cust-000001"
            )
        )
    await put(resolver, bulk_config(api.base_url, workspace_id="ws-2", max_retries=0))
    for _ in range(3):
        await resolve(resolver, ["cust-000001"], workspace_id="ws-2")
    failing = await resolve(resolver, ["cust-000001"], workspace_id="ws-2")
    assert failing.contacts[0].error.code == E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN  # ws-2's own circuit
    api.sandbox.faults.fail_count = 0
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].contact == customers["cust-000001"].email


async def test_calls_queued_behind_the_concurrency_limit_still_stop_at_the_callers_deadline(start_resolver, pii_api):
    """With one call at a time and 400 ms answers, the fourth ID's call would start after 1.2 s: a
    call's time is counted from when it may go out, so a caller that waits a second still gets its reply,
    each ID with its contact or its TIMEOUT."""
    resolver = await start_resolver(pii_concurrency=1)
    await put(resolver, single_config(pii_api.base_url, timeout_ms=5000, max_retries=0))
    pii_api.sandbox.faults.latency_ms = 400
    ids = [f"cust-{n:06d}" for n in range(1, 6)]
    request = pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=ids)
    started = time.monotonic()
    reply = await resolver.stub.ResolveContacts(request, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert [c.anonymous_id for c in reply.contacts] == ids
    assert reply.contacts[0].contact
    assert reply.contacts[-1].error.code == E.RESOLVE_ERROR_CODE_TIMEOUT


async def test_a_caller_waiting_for_another_callers_slow_call_still_gets_its_reply_in_time(start_resolver, pii_api):
    """The process's one place is held by a call with no deadline: a caller that waits half a second
    gives up waiting for it in time, its ID with a TIMEOUT."""
    resolver = await start_resolver(pii_concurrency=1)
    await put(resolver, single_config(pii_api.base_url, timeout_ms=5000, max_retries=0))
    pii_api.sandbox.faults.latency_ms = 1500
    slow = asyncio.ensure_future(resolve(resolver, ["cust-000001"]))  # no deadline: holds the one place
    for _ in range(200):
        if pii_api.sandbox.stats.requests:
            break
        await asyncio.sleep(0.01)
    request = pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=["cust-000002"])
    started = time.monotonic()
    reply = await resolver.stub.ResolveContacts(request, timeout=0.5)
    assert time.monotonic() - started < 0.5
    assert reply.contacts[0].error.code == E.RESOLVE_ERROR_CODE_TIMEOUT
    assert (await slow).contacts[0].contact


async def test_a_test_call_stops_at_the_callers_deadline_and_shows_the_timeout(resolver, pii_api):
    """The Test screen's four attempts of 2 s would outlast a screen that waits a second: it is shown
    the timeout and the attempts made, not DEADLINE_EXCEEDED."""
    pii_api.sandbox.faults.latency_ms = 3000
    request = pb.TestPiiApiConfigRequest(
        config=single_config(pii_api.base_url, timeout_ms=2000, max_retries=3), test_anonymous_id="cust-000001"
    )
    started = time.monotonic()
    reply = await resolver.stub.TestPiiApiConfig(request, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert reply.error.code == E.RESOLVE_ERROR_CODE_TIMEOUT and reply.error.attempts == 1


class LoopbackDns:
    """A DNS answering 127.0.0.1 for every name: a brand's host name that points into our network."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


async def test_a_host_name_resolving_to_a_private_address_is_blocked_not_retried_nor_counted(
    start_resolver, monkeypatch
):
    """Saved as a name, refused when it resolves: each ID fails BLOCKED_URL at the first attempt, as a
    private literal does, and no circuit opens for an API that was never reached."""
    monkeypatch.setattr(netguard, "DefaultResolver", LoopbackDns)
    resolver = await start_resolver(allow_private_networks=False, circuit_failure_threshold=2)
    await put(resolver, single_config("https://crm.example.com", max_retries=3))
    for _ in range(3):
        reply = await resolve(resolver, ["cust-000001"])
        error = reply.contacts[0].error
        assert error.code == E.RESOLVE_ERROR_CODE_BLOCKED_URL
        assert error.attempts == 1
        assert error.detail == "URL's host resolves to a private network address"


async def test_a_call_that_was_not_the_probe_does_not_free_the_probes_place(start_resolver, customers):
    """A call sent before the circuit opened ends on a 429 (no verdict on the API) while the probe is
    still out: the probe keeps its place, and the next call waits for its verdict rather than going out
    as a second probe."""
    resolver = await start_resolver(circuit_failure_threshold=1, circuit_open_seconds=0)
    arrived: list[str] = []
    release = {"cust-000001": asyncio.Event(), "cust-000003": asyncio.Event()}

    async def lookup(request: web.Request) -> web.Response:
        anonymous_id = request.match_info["id"]
        arrived.append(anonymous_id)
        if anonymous_id == "cust-000002":
            return web.Response(status=500)
        if anonymous_id in release:
            await release[anonymous_id].wait()
        if anonymous_id == "cust-000001":
            return web.Response(status=429)
        return web.json_response({"customer": {"email": customers[anonymous_id].email}})

    async def until_arrived(anonymous_id: str) -> None:
        for _ in range(500):
            if anonymous_id in arrived:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{anonymous_id} never reached the API")

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", lookup)
    async with serving(app) as base_url:
        await put(resolver, single_config(base_url, max_retries=0))
        try:
            before = asyncio.ensure_future(resolve(resolver, ["cust-000001"]))  # out while the circuit is closed
            await until_arrived("cust-000001")
            opened = await resolve(resolver, ["cust-000002"])  # its 500 opens the circuit
            assert opened.contacts[0].error.code == E.RESOLVE_ERROR_CODE_SERVER_ERROR
            probe = asyncio.ensure_future(resolve(resolver, ["cust-000003"]))
            await until_arrived("cust-000003")
            release["cust-000001"].set()
            assert (await before).contacts[0].error.code == E.RESOLVE_ERROR_CODE_RATE_LIMITED

            during_probe = asyncio.ensure_future(resolve(resolver, ["cust-000004"]))
            await asyncio.sleep(0.3)
            assert "cust-000004" not in arrived
            assert not during_probe.done()
        finally:
            for event in release.values():
                event.set()
        assert (await probe).contacts[0].contact == customers["cust-000003"].email
        assert (await during_probe).contacts[0].contact == customers["cust-000004"].email  # the probe closed it


def one_reply(answer) -> tuple[web.Application, list[str]]:
    """A PII API answering every call with `answer()`, and the paths it was asked for."""
    asked: list[str] = []

    async def reply(request: web.Request) -> web.StreamResponse:
        asked.append(request.path)
        return answer()

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", reply)
    return app, asked


def bulk_body(first_name: str) -> str:
    records = [{"id": "cust-000001", "email": "jade@example.org", "profile": {"first_name": first_name}}]
    return json.dumps({"data": {"results": records}}, ensure_ascii=False)


@pytest.mark.parametrize(
    ("charset", "encoding"),
    [
        ("iso-8859-1", "latin-1"),  # what it declares
        ("windows-1252", "cp1252"),
        ("iso-8859-1", "utf-8"),  # a default charset declared over what the JSON library wrote: UTF-8 stands
    ],
)
async def test_a_reply_in_the_charset_it_declares_is_read_in_it(resolver, charset, encoding):
    body = bulk_body("Zoë Ça").encode(encoding)
    app, asked = one_reply(
        lambda: web.Response(body=body, headers={"Content-Type": f"application/json; charset={charset}"})
    )
    async with serving(app) as base_url:
        await put(resolver, bulk_config(base_url))
        reply = await resolve(resolver, ["cust-000001"])
        tested = await resolver.stub.TestPiiApiConfig(
            pb.TestPiiApiConfigRequest(
                saved=pb.TestPiiApiConfigRequest.SavedConfig(workspace_id="ws-1", channel=EMAIL),
                test_anonymous_id="cust-000001",
            )
        )
    contact = reply.contacts[0]
    assert contact.contact == "jade@example.org" and contact.attributes["first_name"] == "Zoë Ça"
    assert len(asked) == 2  # read at the first attempt: no retry of a reply that was right
    assert "Zoë Ça" in tested.response_body and tested.attributes["first_name"] == "Zoë Ça"


async def test_a_reply_with_no_content_is_the_api_s_answer_not_retried_nor_held_against_it(start_resolver):
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=30)
    app, asked = one_reply(lambda: web.Response(status=204))
    async with serving(app) as base_url:
        await put(resolver, single_config(base_url, max_retries=3))
        for _ in range(3):
            reply = await resolve(resolver, ["cust-000001"])
            error = reply.contacts[0].error
            assert error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE  # never CIRCUIT_OPEN
            assert error.http_status == 204 and error.attempts == 1
            assert "no content (HTTP 204)" in error.detail
    assert len(asked) == 3


async def test_a_redirect_is_not_followed_and_says_so(resolver):
    app, asked = one_reply(
        lambda: web.Response(status=302, headers={"Location": "http://10.0.0.1/v1/customers/cust-000001"})
    )
    async with serving(app) as base_url:
        await put(resolver, bulk_config(base_url))
        reply = await resolve(resolver, ["cust-000001"])
    error = reply.contacts[0].error
    assert error.code == E.RESOLVE_ERROR_CODE_HTTP_ERROR and error.http_status == 302 and error.attempts == 1
    assert "redirect" in error.detail and "not followed" in error.detail
    assert "10.0.0.1" not in error.detail and "cust-000001" not in error.detail
    assert len(asked) == 1


def compressed_reply(encoding: str, body: bytes) -> tuple[web.Application, list[str]]:
    """A PII API sending `body` as is under `Content-Encoding: encoding`."""
    return one_reply(
        lambda: web.Response(body=body, headers={"Content-Type": "application/json", "Content-Encoding": encoding})
    )


@pytest.mark.parametrize(
    ("encoding", "body", "detail"),
    [
        # Codings this process cannot decode, so never asks for: refused before the body is read.
        *(
            [("br", b"\x8b\x03\x80{}\x03", "reply is compressed with an encoding not asked for (br)")]
            if not compression_utils.HAS_BROTLI
            else []
        ),
        *(
            [("zstd", b"(\xb5/\xfd\x00X\x11\x00\x00{}", "reply is compressed with an encoding not asked for (zstd)")]
            if not compression_utils.HAS_ZSTD
            else []
        ),
        # One asked for, whose bytes do not decode.
        ("gzip", b"\x1f\x8b\x08\x00not gzip at all", "reply does not decode as its Content-Encoding says (gzip)"),
        # One no HTTP client knows, left undecoded: named only when it is a registered coding ...
        ("x-gzip", gzip.compress(b"{}"), "reply is compressed with an encoding not asked for (x-gzip)"),
        # ... never by a value of the API's own, which could be anything.
        (
            "447400123456",
            gzip.compress(b"{}"),
            "reply is compressed with an encoding not asked for (not a registered content coding)",
        ),
    ],
)
async def test_a_reply_in_an_encoding_that_does_not_decode_is_the_api_s_answer(start_resolver, encoding, body, detail):
    """The API answered, and will answer the same: an invalid response, not a connection failure, neither
    retried nor held against its circuit (as a reply with no content is), naming the coding and nothing else."""
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=30)
    app, asked = compressed_reply(encoding, body)
    async with serving(app) as base_url:
        await put(resolver, single_config(base_url, max_retries=3))
        for _ in range(3):
            reply = await resolve(resolver, ["cust-000001"])
            error = reply.contacts[0].error
            assert error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE  # never CIRCUIT_OPEN
            assert error.attempts == 1 and error.detail == detail
    assert len(asked) == 3


async def test_a_json_reply_under_a_coding_that_is_none_is_still_read(resolver):
    """Mislabelled but plain (`Content-Encoding: utf-8`, seen in the wild): read as it is."""
    app, asked = compressed_reply("utf-8", bulk_body("Zoë").encode())
    async with serving(app) as base_url:
        await put(resolver, bulk_config(base_url))
        reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].contact == "jade@example.org" and len(asked) == 1
