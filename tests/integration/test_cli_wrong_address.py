"""The CLI pointed at the wrong thing (another service, a plaintext port with --tls, an HTTP/1 server), or at a
service that is running but answers UNAVAILABLE (its Redis is down).

Each is named for what it is, with the flag to fix, not as a server that is down or a certificate problem.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aiohttp import web
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from cli.exits import FAILED
from cli.main import main

pytestmark = pytest.mark.integration


@pytest.fixture
async def plaintext_server():
    """A gRPC server serving none of our services, as another service's port would to this call."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


class StoreDown(pb_grpc.ReceiptsServiceServicer):
    """A receipts service whose Redis does not answer: it is reached, and says so."""

    async def GetCampaignStats(self, request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "storage unavailable, retry later")


@pytest.fixture
async def store_down_server():
    server = grpc.aio.server()
    pb_grpc.add_ReceiptsServiceServicer_to_server(StoreDown(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def http1_server():
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


def stats_argv(address: str) -> list[str]:
    return ["stats", "welcome", "--workspace", "demo", "--addr", address, "--timeout", "5"]


async def test_a_port_serving_another_service_is_named_as_such(plaintext_server, capsys) -> None:
    assert await asyncio.to_thread(main, stats_argv(plaintext_server)) == FAILED
    err = capsys.readouterr().err
    assert "tokensend: the receipts service answered UNIMPLEMENTED: Method not found!" in err
    assert f"is {plaintext_server} the receipts service? (--addr)" in err


async def test_tls_to_a_plaintext_port_says_to_leave_out_tls(plaintext_server, capsys) -> None:
    assert await asyncio.to_thread(main, [*stats_argv(plaintext_server), "--tls"]) == FAILED
    err = capsys.readouterr().err
    assert f"tokensend: no TLS connection to the receipts service at {plaintext_server} (UNAVAILABLE: " in err
    assert "answers without TLS: leave out --tls" in err
    assert "check --tls-ca-file" not in err  # no certificate would help


async def test_a_port_that_is_not_grpc_is_named_as_such(http1_server, capsys) -> None:
    assert await asyncio.to_thread(main, stats_argv(http1_server)) == FAILED
    err = capsys.readouterr().err
    assert f"tokensend: no gRPC server at {http1_server} (UNAVAILABLE: " in err
    assert "something answers there, but not over gRPC: is it the receipts service's port? (--addr)" in err
    assert "is it running?" not in err


async def test_unavailable_from_a_running_service_is_not_called_unreachable(store_down_server, capsys) -> None:
    assert await asyncio.to_thread(main, stats_argv(store_down_server)) == FAILED
    err = capsys.readouterr().err
    assert (
        f"tokensend: the receipts service at {store_down_server} answered UNAVAILABLE: storage unavailable, "
        "retry later\n" == err
    )
