"""The README's grpcurl walkthrough, as written, against the sample peers: its configs saved with the CLI, its
grpcurl bodies sent to the methods they name, and what the README says they answer."""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, symbol_database
from tokensend.dispatcher.v1 import dispatcher_service_pb2

from cli.exits import OK
from cli.main import main
from sandbox.pii_api import OAuthClient
from sandbox.providers import start_providers
from sandbox.providers.cli import _parse_args, build_sandbox
from tests.unit.test_docs_commands import METHODS, command_lines, grpcurl_calls_in, shell_text

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
WALKTHROUGH = "## grpcurl walkthrough"


@dataclass
class Suite:
    examples: Path
    addresses: dict[str, str]  # service full name -> host:port


@pytest.fixture
async def suite(start_pii_api_server, start_resolver, start_dispatcher, tmp_path, monkeypatch) -> AsyncIterator[Suite]:
    # As the walkthrough starts them: `sandbox pii-api --oauth-client-id demo-app --oauth-client-secret
    # demo-secret --api-key demo-api-key`, `sandbox providers`, and the services.
    api = await start_pii_api_server(oauth=OAuthClient("demo-app", "demo-secret"), api_key="demo-api-key")
    providers = build_sandbox(_parse_args([]))
    runner, port = await start_providers(providers)
    resolver = await start_resolver()
    dispatcher = await start_dispatcher(resolver)
    copies = tmp_path / "examples"
    copies.mkdir()
    for example in (ROOT / "examples").glob("*.yaml"):
        text = example.read_text().replace("http://localhost:8090", api.base_url)
        (copies / example.name).write_text(text.replace("http://localhost:8095", f"http://127.0.0.1:{port}"))
    monkeypatch.setenv("TOKENSEND_RESOLVER_ADDR", f"127.0.0.1:{resolver.port}")
    monkeypatch.setenv("TOKENSEND_DISPATCHER_ADDR", f"127.0.0.1:{dispatcher.port}")
    yield Suite(
        copies,
        {
            "tokensend.resolver.v1.ResolverService": f"127.0.0.1:{resolver.port}",
            "tokensend.dispatcher.v1.DispatcherService": f"127.0.0.1:{dispatcher.port}",
        },
    )
    await providers.close()
    await runner.cleanup()


def walkthrough_text() -> str:
    text = README.read_text()
    start = text.index(WALKTHROUGH)
    return text[start : text.index("\n## ", start + 1)]


def walkthrough_shell() -> list[str]:
    """The walkthrough's ```sh blocks."""
    return [shell for shell in shell_text(README) if shell in walkthrough_text()]


def config_puts() -> list[list[str]]:
    """The walkthrough's `tokensend config put ...` commands."""
    found = []
    for shell in walkthrough_shell():
        for line in command_lines(shell):
            words = shlex.split(line, comments=True)
            if words[:3] == [".venv/bin/tokensend", "config", "put"]:
                found.append(words[1:])
    return found


async def call(suite: Suite, method: str, body: str):
    service, _, name = method.partition("/")
    rpc = METHODS[name]
    request_type = symbol_database.Default().GetSymbol(rpc.input_type.full_name)
    response_type = symbol_database.Default().GetSymbol(rpc.output_type.full_name)
    async with grpc.aio.insecure_channel(suite.addresses[service]) as channel:
        invoke = channel.unary_unary(
            f"/{method}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return await invoke(json_format.Parse(body, request_type()), timeout=30)


async def test_the_walkthrough_runs_as_written(suite, capsys) -> None:
    puts = config_puts()
    assert puts, "the walkthrough saves its configs with `tokensend config put`"
    for argv in puts:
        argv = [str(suite.examples / a.removeprefix("examples/")) if a.startswith("examples/") else a for a in argv]
        code = await asyncio.to_thread(main, argv)
        assert code == OK, f"tokensend {shlex.join(argv)}\n{capsys.readouterr().err}"

    calls = [
        (method, body)
        for shell in walkthrough_shell()
        for method, body in grpcurl_calls_in(shell)
        if body is not None and method.partition("/")[0] in suite.addresses
    ]
    dispatch = [body for method, body in calls if method.endswith("/Dispatch")]
    assert dispatch, "the walkthrough dispatches"
    for method, body in calls:
        if not method.endswith("/Dispatch"):
            await call(suite, method, body)  # answers OK

    # "Two are DISPATCH_STATUS_SENT; `nobody` is DISPATCH_STATUS_RESOLVE_FAILED with NOT_FOUND and
    # "Invalid API response (fetching Mobile No.)"."
    method = "tokensend.dispatcher.v1.DispatcherService/Dispatch"
    first = await call(suite, method, dispatch[0])
    outcome = {r.anonymous_id: r for r in first.results}
    said = walkthrough_text()
    assert "Two are `DISPATCH_STATUS_SENT`; `nobody` is `DISPATCH_STATUS_RESOLVE_FAILED`" in said
    sent = [i for i, r in outcome.items() if r.status == dispatcher_service_pb2.DISPATCH_STATUS_SENT]
    assert len(sent) == 2 and "nobody" not in sent, first
    nobody = outcome["nobody"]
    quoted = re.search(r"`NOT_FOUND` and \"([^\"]+)\"", said)[1]
    assert (nobody.error_code, nobody.error_message) == ("NOT_FOUND", quoted)

    # "a repeat of the same call returns DISPATCH_STATUS_DUPLICATE with the original message IDs"
    again = await call(suite, method, dispatch[0])
    repeated = {r.anonymous_id: r for r in again.results}
    for anonymous_id in sent:
        assert repeated[anonymous_id].error_code == "DUPLICATE"
        assert repeated[anonymous_id].message_id == outcome[anonymous_id].message_id


async def test_the_error_the_readme_quotes_is_the_one_answered(suite) -> None:
    # "Errors name the field: `Code: InvalidArgument, Message: config.batch_size: must be 1..1000`"
    quoted = re.search(r"`Code: InvalidArgument, Message: ([^`]+)`", README.read_text())[1]
    body = (
        '{"config":{"workspace_id":"demo","channel":"CHANNEL_EMAIL","mode":"MODE_BULK","method":"HTTP_METHOD_POST",'
        '"url":"http://127.0.0.1:8090/v1/customers:batchGet","body":"{\\"ids\\": \\"@anonymous_ids\\"}",'
        '"batch_size":5000,"results_path":"data.results","id_path":"id","contact_path":"email"}}'
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(suite, "tokensend.resolver.v1.ResolverService/PutPiiApiConfig", body)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == quoted
