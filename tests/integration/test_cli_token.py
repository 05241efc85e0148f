"""`--token` against a receipts service that checks bearer tokens: the flag, $TOKENSEND_TOKEN, and an
empty flag, which sends no token whatever the variable holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cli.exits import FAILED, OK
from cli.main import main
from libs.auth import new_client
from libs.settings import ReceiptsSettings
from services.receipts.server import ReceiptsDeps, build_server

pytestmark = pytest.mark.integration

OPS_TOKEN, OPS = new_client("ops", ["*"])


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
async def guarded_receipts(redis, redis_url, secret_key) -> AsyncIterator[str]:
    settings = ReceiptsSettings(
        redis_url=redis_url,
        secret_key=secret_key,
        grpc_host="127.0.0.1",
        grpc_port=0,
        grace_seconds=1,
        clients=[OPS],
    )
    service, port = await build_server(settings, ReceiptsDeps.from_settings(settings))
    yield f"127.0.0.1:{port}"
    await service.stop(0.5)


async def test_an_empty_token_flag_sends_no_token_even_with_the_variable_set(
    guarded_receipts, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("TOKENSEND_TOKEN", OPS_TOKEN)
    argv = ["stats", "welcome", "--workspace", "ws-1", "--addr", guarded_receipts, "--timeout", "5"]
    assert await run_cli(*argv) == OK  # the variable's token
    capsys.readouterr()

    # `--token ""`, to see what a caller without a token meets: none is sent, not the variable's.
    for empty in ([*argv, "--token", ""], [*argv, "--token="], ["--token", "", *argv]):
        assert await run_cli(*empty) == FAILED, empty
        err = capsys.readouterr().err
        assert "the receipts service refused the credentials (UNAUTHENTICATED" in err, err
        assert OPS_TOKEN not in err

    monkeypatch.delenv("TOKENSEND_TOKEN")
    assert await run_cli(*argv, "--token", OPS_TOKEN) == OK
