"""Access control as operators configure it: `TOKENSEND_CLIENTS` in the environment of a service process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from libs.auth import bearer_interceptors, new_client
from tests.conftest import free_port, new_secret_key
from tests.e2e.test_resolver_process import wait_serving

ROOT = Path(__file__).resolve().parents[2]


def environment(redis_url: str, port: int, clients: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(
        TOKENSEND_GRPC_PORT=str(port),
        TOKENSEND_REDIS_URL=redis_url,
        TOKENSEND_SECRET_KEY=new_secret_key(),
        TOKENSEND_CLIENTS=clients,
    )
    return env


async def test_clients_from_the_environment_guard_the_resolver(redis, redis_url, tmp_path):
    token, engine = new_client("engine", ["acme"])
    port = free_port()
    log = tmp_path / "resolver.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.resolver",
            cwd=ROOT,
            env=environment(redis_url, port, json.dumps([engine.model_dump()])),
            stdout=out,
            stderr=out,
        )
    try:
        await wait_serving(port, proc)  # health is open by default
        request = rpb.GetPiiApiConfigRequest(workspace_id="acme", channel=common_pb2.CHANNEL_EMAIL)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await rpb_grpc.ResolverServiceStub(channel).GetPiiApiConfig(request)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=bearer_interceptors(token)) as channel:
            stub = rpb_grpc.ResolverServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPiiApiConfig(request)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # through the guard, to the servicer
            request.workspace_id = "globex"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPiiApiConfig(request)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert token not in log.read_text()


async def test_a_malformed_client_list_stops_startup_without_echoing_it(redis_url):
    clients = '[{"name": "engine", "token_sha256": "my-secret-token", "workspaces": ["acme"]}]'
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.resolver",
        cwd=ROOT,
        env=environment(redis_url, free_port(), clients),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "TOKENSEND_CLIENTS" in err.decode() and "my-secret-token" not in (out + err).decode()
