"""The resolver as operators run it: a process, driven with grpcurl through reflection."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sandbox.pii_api import OAuthClient
from tests.conftest import free_port, grpcurl_path, new_secret_key

ROOT = Path(__file__).resolve().parents[2]


async def grpcurl(port: int, *args: str, data: dict | None = None) -> tuple[int, str, str]:
    argv = [grpcurl_path(), "-plaintext"]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    argv += [f"127.0.0.1:{port}", *args]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def wait_serving(port: int, proc: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            if proc.returncode is not None:
                raise AssertionError("resolver exited during startup")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("resolver did not become healthy")


@pytest.fixture
async def resolver_process(redis, redis_url, tmp_path):
    port = free_port()
    log_path = tmp_path / "resolver.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(
        TOKENSEND_GRPC_PORT=str(port),
        TOKENSEND_REDIS_URL=redis_url,
        TOKENSEND_SECRET_KEY=new_secret_key(),
        TOKENSEND_ALLOW_PRIVATE_NETWORKS="true",
        TOKENSEND_PII_RETRY_BASE_MS="20",
        TOKENSEND_LOG_LEVEL="DEBUG",
    )
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.resolver", cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        await wait_serving(port, proc)
        yield port, proc, log_path
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_grpcurl_configures_and_resolves_through_reflection(resolver_process, start_pii_api_server, customers):
    port, proc, log_path = resolver_process
    api = await start_pii_api_server(oauth=OAuthClient("brand-app", "brand-secret"))

    code, out, err = await grpcurl(port, "list")
    assert code == 0, err
    assert set(out.split()) >= {
        "tokensend.resolver.v1.ResolverService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    code, out, err = await grpcurl(port, "describe", "tokensend.resolver.v1.ResolverService")
    assert code == 0 and "rpc ResolveContacts" in out
    # The protos' comments come with their descriptors: an operator reads what a field means.
    code, out, err = await grpcurl(port, "describe", "tokensend.resolver.v1.PiiApiConfig")
    assert code == 0 and "query_params are added to the URL" in out, out

    code, out, err = await grpcurl(
        port,
        "tokensend.resolver.v1.ResolverService/PutOAuthConfig",
        data={
            "config": {
                "workspace_id": "acme",
                "oauth_config_id": "crm",
                "token_url": f"{api.base_url}/oauth/token",
                "client_id": "brand-app",
                "client_secret": "brand-secret",
            }
        },
    )
    assert code == 0, err
    assert json.loads(out)["config"]["status"] == "TOKEN_STATUS_ACTIVE"
    assert "brand-secret" not in out

    code, out, err = await grpcurl(
        port,
        "tokensend.resolver.v1.ResolverService/PutPiiApiConfig",
        data={
            "config": {
                "workspace_id": "acme",
                "channel": "CHANNEL_EMAIL",
                "mode": "MODE_BULK",
                "method": "HTTP_METHOD_POST",
                "url": f"{api.base_url}/v1/customers:batchGet",
                "body": '{"customer_ids": "@anonymous_ids"}',
                "oauth_config_id": "crm",
                "batch_size": 4,
                "results_path": "data.results",
                "id_path": "id",
                "contact_path": "email",
                "attribute_paths": {"first_name": "profile.first_name"},
            }
        },
    )
    assert code == 0, err
    assert json.loads(out)["version"] == "1"

    # What the workspace has, and what may not go while it is used.
    code, out, err = await grpcurl(
        port, "tokensend.resolver.v1.ResolverService/ListPiiApiConfigs", data={"workspace_id": "acme"}
    )
    assert code == 0, err
    assert json.loads(out)["configs"][0] | {"updated_at_ms": ""} == {
        "channel": "CHANNEL_EMAIL",
        "version": "1",
        "mode": "MODE_BULK",
        "oauth_config_id": "crm",
        "updated_at_ms": "",
    }
    code, out, err = await grpcurl(
        port,
        "tokensend.resolver.v1.ResolverService/DeleteOAuthConfig",
        data={"workspace_id": "acme", "oauth_config_id": "crm"},
    )
    assert code != 0 and "FailedPrecondition" in err and "channel family email (version 1)" in err

    api.sandbox.faults.missing_ids = {"cust-000003"}
    api.sandbox.faults.invalid_contacts = {"cust-000004"}
    api.sandbox.faults.fail_status, api.sandbox.faults.fail_count = 500, 1
    ids = [f"cust-{n:06d}" for n in range(1, 11)]
    code, out, err = await grpcurl(
        port,
        "tokensend.resolver.v1.ResolverService/ResolveContacts",
        data={"workspace_id": "acme", "channel": "CHANNEL_EMAIL", "anonymous_ids": ids, "campaign_instance_id": "r1"},
    )
    assert code == 0, err
    reply = json.loads(out)
    contacts = {c["anonymous_id"]: c for c in reply["contacts"]}
    assert [c["anonymous_id"] for c in reply["contacts"]] == ids
    assert contacts["cust-000003"]["error"]["code"] == "RESOLVE_ERROR_CODE_NOT_FOUND"
    assert contacts["cust-000004"]["error"]["code"] == "RESOLVE_ERROR_CODE_INVALID_CONTACT"
    assert contacts["cust-000004"]["error"]["message"] == "Invalid API response (fetching Email ID)"
    for anonymous_id in set(ids) - {"cust-000003", "cust-000004"}:
        assert contacts[anonymous_id]["contact"] == customers[anonymous_id].email
        assert contacts[anonymous_id]["attributes"]["first_name"] == customers[anonymous_id].first_name
    assert api.sandbox.stats.statuses["500"] == 1  # the transient failure was retried

    code, out, err = await grpcurl(
        port,
        "tokensend.resolver.v1.ResolverService/PutPiiApiConfig",
        data={"config": {"workspace_id": "acme", "channel": "CHANNEL_SMS", "mode": "MODE_BULK"}},
    )
    assert code != 0 and "InvalidArgument" in err

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    log = log_path.read_text()
    assert "shutting down" in log
    for customer in customers.values():
        assert customer.email not in log and customer.phone not in log


async def test_cluster_mode_against_a_single_redis_stops_startup(redis_url):
    """A setting to fix, said at once (exit 2), not a wait for a cluster that will never come."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(
        TOKENSEND_GRPC_PORT=str(free_port()),
        TOKENSEND_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/0",
        TOKENSEND_REDIS_CLUSTER="true",
        TOKENSEND_SECRET_KEY=new_secret_key(),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.resolver",
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "the Redis at TOKENSEND_REDIS_URL is not in cluster mode" in err.decode()
    assert "Traceback" not in err.decode()
