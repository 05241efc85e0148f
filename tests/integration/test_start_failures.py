"""Services whose start fails part way (a TLS file gone since the settings were checked, a Redis that is
not what the settings say) stop naming the cause and leave nothing open: no Redis connection, HTTP
session or background task. And a start's check of the Redis named does not hold up the event loop,
which in `serve all` already serves the services started before."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.derived_keys import new_secret_key
from libs.server import SettingFileUnreadable
from libs.settings import DispatcherSettings, ReceiptsSettings
from libs.store import StoreMisconfigured
from services.dispatcher.server import DispatcherDeps
from services.receipts.server import ReceiptsDeps, start_receipts
from services.resolver.server import ResolverDeps, build_server
from tests.conftest import resolver_settings
from tests.integration.peers import make_tls_material

pytestmark = pytest.mark.integration


async def connections_besides(redis: aioredis.Redis) -> int:
    """How many clients of the test Redis are not the test's own connection."""
    own = await redis.client_id()
    return sum(1 for client in await redis.client_list() if int(client["id"]) != own)


async def assert_nothing_left_open(redis: aioredis.Redis, http_sessions: list[Any]) -> None:
    assert all(session.closed for session in http_sessions)
    assert asyncio.all_tasks() == {asyncio.current_task()}  # no subscription, backfill or watch left running
    async with asyncio.timeout(5):  # Redis notes a client gone once it reads the connection's end
        while await connections_besides(redis):
            await asyncio.sleep(0.05)


async def test_a_tls_file_gone_by_start_stops_the_resolver_naming_it_with_nothing_left_open(redis, redis_url, tmp_path):
    tls = make_tls_material(tmp_path)
    settings = resolver_settings(redis_url, tls_cert_file=str(tls.cert_path), tls_key_file=str(tls.key_path))
    tls.cert_path.unlink()  # since the settings were checked
    deps = ResolverDeps.from_settings(settings)
    with pytest.raises(SettingFileUnreadable) as refused:
        await build_server(settings, deps)
    assert str(refused.value) == "TOKENSEND_TLS_CERT_FILE: cannot be read (No such file or directory)"
    await assert_nothing_left_open(redis, [deps.http])


async def test_a_redis_named_a_cluster_that_is_not_stops_the_resolver_with_nothing_left_open(redis, redis_url):
    settings = resolver_settings(redis_url.rsplit("/", 1)[0] + "/0", redis_cluster=True)
    deps = ResolverDeps.from_settings(settings)
    with pytest.raises(StoreMisconfigured, match="^TOKENSEND_REDIS_CLUSTER is set, but the Redis at"):
        await build_server(settings, deps)
    await assert_nothing_left_open(redis, [deps.http])


def refusal_and_warnings(start: Callable[[], object]) -> tuple[str, list[str]]:
    """What `start` says as it refuses to (SettingFileUnreadable), and the ResourceWarnings of what it
    dropped unclosed on the way."""
    gc.collect()  # what earlier tests dropped is not this start's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            start()
        except SettingFileUnreadable as refused:  # its traceback, holding what was opened, goes with it
            said = str(refused)
        else:
            pytest.fail("the start went ahead")
        gc.collect()  # a session dropped unclosed says so as it is collected
    return said, [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


async def test_a_resolver_ca_gone_by_start_stops_the_dispatcher_before_it_opens_anything(redis_url, tmp_path):
    tls = make_tls_material(tmp_path)
    ca = tmp_path / "resolver-ca.pem"
    ca.write_text(tls.ca_pem)
    settings = DispatcherSettings(redis_url=redis_url, secret_key=new_secret_key(), resolver_tls_ca_file=str(ca))
    ca.unlink()
    said, left_open = refusal_and_warnings(lambda: DispatcherDeps.from_settings(settings))
    assert said == "TOKENSEND_RESOLVER_TLS_CA_FILE: cannot be read (No such file or directory)"
    assert left_open == []


async def test_an_sns_ca_gone_by_start_stops_receipts_naming_it_with_its_http_session_closed(redis_url, tmp_path):
    tls = make_tls_material(tmp_path)
    ca = tmp_path / "sns-ca.pem"
    ca.write_text(tls.ca_pem)
    settings = ReceiptsSettings(redis_url=redis_url, secret_key=new_secret_key(), sns_ca_file=str(ca))
    ca.unlink()
    said, left_open = refusal_and_warnings(lambda: ReceiptsDeps.from_settings(settings))
    assert said.startswith("TOKENSEND_SNS_CA_FILE: cannot be read ("), said
    assert left_open == []


async def test_a_webhook_key_gone_by_start_stops_receipts_naming_it_with_nothing_left_open(redis, redis_url, tmp_path):
    tls = make_tls_material(tmp_path)
    settings = ReceiptsSettings(
        redis_url=redis_url,
        secret_key=new_secret_key(),
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        http_tls_cert_file=str(tls.cert_path),
        http_tls_key_file=str(tls.key_path),
        grace_seconds=0.5,
    )
    tls.key_path.unlink()
    deps = ReceiptsDeps.from_settings(settings)
    with pytest.raises(SettingFileUnreadable) as refused:
        await start_receipts(settings, deps)
    said = str(refused.value)
    # The TLS library does not say which of the two it could not read: both are named, neither path.
    assert (
        said == "TOKENSEND_HTTP_TLS_CERT_FILE, TOKENSEND_HTTP_TLS_KEY_FILE: cannot be read (No such file or directory)"
    )
    assert str(tmp_path) not in said
    await assert_nothing_left_open(redis, [deps.http])


async def test_a_start_checking_a_silent_redis_leaves_the_services_already_serving_free(start_resolver):
    """As in `serve all`: a second service starting against a Redis that accepts connections and never
    answers is waiting on it, and the first still answers its health checks meanwhile."""
    serving = await start_resolver()
    asked, hung_up = asyncio.Event(), asyncio.Event()

    async def silent_node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read(1024):
            asked.set()
        await reader.read()  # until the client hangs up
        hung_up.set()
        writer.close()

    silent = await asyncio.start_server(silent_node, "127.0.0.1", 0)
    node = f"redis://127.0.0.1:{silent.sockets[0].getsockname()[1]}/0"
    settings = resolver_settings(node, redis_cluster=True)

    async def start_beside() -> None:
        await build_server(settings, ResolverDeps.from_settings(settings))

    starting = asyncio.create_task(start_beside())
    try:
        await asyncio.wait_for(asked.wait(), 10)
        health = health_pb2_grpc.HealthStub(serving.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # Answered while the start was still waiting for the node: the check had not given up on it.
        assert not hung_up.is_set() and not starting.done()
    finally:
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        silent.close()
        await silent.wait_closed()
