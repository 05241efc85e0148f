"""A load test whose --target cannot be used says what is there, as the CLI does, rather than "is it
running? (--tls if it serves TLS)" for a dispatcher that runs and was given --tls it does not serve."""

from __future__ import annotations

import grpc
import pytest
from aiohttp import web

from bench import load


@pytest.fixture
async def plaintext_port():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def http1_port():
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def refusal(monkeypatch, options: load.LoadOptions) -> str:
    monkeypatch.setattr(load, "CONNECT_SECONDS", 0.3)
    with pytest.raises(SystemExit) as refused:
        await load.connect(options)
    return str(refused.value)


async def test_tls_to_a_plaintext_dispatcher_says_to_leave_out_tls(plaintext_port, monkeypatch) -> None:
    said = await refusal(
        monkeypatch, load.LoadOptions(target=plaintext_port, credentials=grpc.ssl_channel_credentials())
    )
    assert said.startswith(f"no TLS connection to the dispatcher at {plaintext_port} (UNAVAILABLE: ")
    assert said.endswith("it answers without TLS: leave out --tls and the --tls-* files, or check --target")


async def test_a_target_that_is_not_grpc_is_named_as_such(http1_port, monkeypatch) -> None:
    said = await refusal(monkeypatch, load.LoadOptions(target=http1_port))
    assert said.startswith(f"no gRPC server at {http1_port} (UNAVAILABLE: ")
    assert said.endswith("something answers there, but not over gRPC: is it the dispatcher's port? (--target)")
