"""The CLI against a gRPC server that serves TLS: a certificate problem is named as one, not as a server down."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cli.exits import FAILED
from cli.main import main
from tests.integration.peers import make_tls_material

pytestmark = pytest.mark.integration


@pytest.fixture
async def tls_server(tmp_path):
    material = make_tls_material(tmp_path)
    server = grpc.aio.server()
    credentials = grpc.ssl_server_credentials([(material.key_path.read_bytes(), material.cert_path.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield f"localhost:{port}"
    await server.stop(None)


async def test_a_certificate_the_cli_does_not_trust_is_named_as_a_tls_problem(tls_server, capsys) -> None:
    argv = ["stats", "welcome", "--workspace", "demo", "--addr", tls_server, "--timeout", "5"]
    assert await asyncio.to_thread(main, [*argv, "--tls"]) == FAILED  # the system's CAs do not know the test CA
    err = capsys.readouterr().err
    assert f"tokensend: no TLS connection to the receipts service at {tls_server} (UNAVAILABLE: " in err
    assert "check --tls-ca-file" in err and "is it running?" not in err
    assert await asyncio.to_thread(main, argv) == FAILED  # plaintext: the TLS server closes the connection
    assert "--tls if it serves TLS" in capsys.readouterr().err
