"""`tokensend serve all`: the three services in one process, driven by the CLI, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

from cli.documents import CONNECTOR, PII_API, config_to_data, dump_yaml_documents
from cli.exits import FAILED, OK
from cli.main import main
from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import SandboxWorkspace

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(rb"serving resolver on port (\d+), dispatcher on port (\d+), receipts on port (\d+)")


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def spawn_serve_all(env: dict[str, str], dispatcher_port: int = 0) -> asyncio.subprocess.Process:
    """`tokensend serve all` as a process, its stderr piped; the ports any free one but the dispatcher's."""
    ports = ("--resolver-port", "0", "--dispatcher-port", str(dispatcher_port), "--receipts-port", "0")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "serve", "all", *ports, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )


async def start_serve_all(
    redis_url: str, metrics_file: Path
) -> tuple[asyncio.subprocess.Process, dict[str, str], list[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(
        TOKENSEND_DEV_MODE="true",  # one throwaway key, shared by the three services
        TOKENSEND_REDIS_URL=redis_url,
        TOKENSEND_HTTP_PORT="0",
        TOKENSEND_GRPC_HOST="127.0.0.1",
        TOKENSEND_ALLOW_PRIVATE_NETWORKS="true",  # the sample PII API and providers are on loopback
        TOKENSEND_GRACE_SECONDS="2",
        TOKENSEND_METRICS_EXPORT_FILE=str(metrics_file),
    )
    process = await spawn_serve_all(env)
    log: list[bytes] = []

    async def ready() -> dict[str, str]:
        while line := await process.stderr.readline():
            log.append(line)
            if match := READY.search(line):
                return {name: f"127.0.0.1:{port.decode()}" for name, port in zip(NAMES, match.groups(), strict=True)}
        raise AssertionError(b"serve all exited before serving:\n" + b"".join(log))

    return process, await asyncio.wait_for(ready(), 60), log


NAMES = ("resolver", "dispatcher", "receipts")


async def test_serve_all_runs_the_suite_and_stops_on_sigterm(
    redis, redis_url, start_pii_api_server, tmp_path, capsys, customers
) -> None:
    pii_api = await start_pii_api_server()
    providers = ProviderSandbox()
    runner, providers_port = await start_providers(providers)
    workspace = SandboxWorkspace(
        "ws-serve", pii_api.base_url, f"http://127.0.0.1:{providers_port}", providers.sendgrid_public_key, False
    )
    for account in workspace.provider_accounts():
        providers.add_account(account)
    metrics = tmp_path / "metrics.jsonl"
    process, addr, log = await start_serve_all(redis_url, metrics)
    drain = asyncio.create_task(_drain(process, log))
    try:
        configs = tmp_path / "workspace.yaml"
        configs.write_text(
            dump_yaml_documents(
                [config_to_data(PII_API, c) for c in workspace.pii_api_configs()]
                + [config_to_data(CONNECTOR, c) for c in workspace.connectors().values()]
            )
        )
        argv = ["config", "put", str(configs), "--resolver-addr", addr["resolver"]]
        assert await run_cli(*argv, "--dispatcher-addr", addr["dispatcher"]) == OK

        # The dispatcher finds this process's resolver, and opens the connector it sealed.
        content = tmp_path / "content.yaml"
        content.write_text("sms_body: Hi {{ first_name }}\n")
        customer = customers["cust-000003"]
        argv = ["send-test", "--workspace", "ws-serve", "--campaign", "c1", "--channel", "sms", "--connector"]
        argv += ["twilio", "--id", customer.anonymous_id, "--content", str(content), "--addr", addr["dispatcher"]]
        assert await run_cli(*argv) == OK
        assert "via twilio (sms): SENT" in capsys.readouterr().out
        assert [m for m in providers.outbox if customer.phone in str(m)]

        assert await run_cli("stats", "c1", "--workspace", "ws-serve", "--addr", addr["receipts"]) == OK
        assert await run_cli(
            "config", "get", "oauth", "none", "--workspace", "ws-serve", "--addr", addr["resolver"]
        ) == (FAILED)
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        await drain
        await providers.close()
        await runner.cleanup()
    output = b"".join(log)
    assert code == 0, output.decode(errors="replace")
    assert b"shutting down" in output
    assert b"Traceback" not in output
    # Each service wrote its metric points to the one file, the last at shutdown.
    points = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert points, "no metric points written"


async def _drain(process: asyncio.subprocess.Process, log: list[bytes]) -> None:
    while line := await process.stderr.readline():
        log.append(line)


async def test_serve_all_names_the_flag_of_a_port_it_cannot_bind(redis_url) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
        env.update(TOKENSEND_DEV_MODE="true", TOKENSEND_REDIS_URL=redis_url, TOKENSEND_HTTP_PORT="0")
        env.update(TOKENSEND_GRPC_HOST="127.0.0.1")
        process = await spawn_serve_all(env, dispatcher_port=port)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == FAILED, stderr.decode(errors="replace")
    last = stderr.decode().strip().splitlines()[-1]
    # TOKENSEND_GRPC_PORT is refused by 'serve all': the message names the flag the port came from.
    assert last.startswith(f"tokensend: serve all: cannot listen for gRPC on 127.0.0.1:{port} "), last
    assert "--dispatcher-port" in last and "TOKENSEND_GRPC_PORT" not in last, last
