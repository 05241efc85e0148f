"""`tokensend send-test` and `tokensend stats` against the dispatcher and receipts services on port 0."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from cli.exits import FAILED, OK, USAGE
from cli.main import main
from libs.campaign_stats import add_counts
from libs.settings import ReceiptsSettings
from services.receipts.ledger import WORKSPACE_COUNTERS
from services.receipts.server import ReceiptsDeps, build_server

pytestmark = pytest.mark.integration


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_send_test_prints_the_result_and_the_pii_api_error(start_suite, tmp_path, capsys, customers) -> None:
    suite = await start_suite()
    content = tmp_path / "content.yaml"
    content.write_text('subject: "Hi {{ first_name }}"\ntext_body: "Your tier: {{ recipient.tier }}"\n')
    dispatcher = f"127.0.0.1:{suite.dispatcher.port}"
    argv = ["send-test", "--workspace", suite.workspace_id, "--campaign", "welcome", "--channel", "email"]
    argv += ["--connector", "sendgrid", "--content", str(content), "--addr", dispatcher]
    customer = customers["cust-000001"]

    assert await run_cli(*argv, "--id", customer.anonymous_id, "--attr", "tier=gold") == OK
    out = capsys.readouterr().out
    assert out.startswith(f"test message to {customer.anonymous_id} via sendgrid (email): SENT\n  message ID   ")
    assert customer.email not in out
    [sent] = [m for m in suite.providers.outbox if customer.email in str(m)]
    assert "Your tier: gold" in str(sent) and f"Hi {customer.first_name}" in str(sent)

    assert await run_cli(*argv, "--id", "cust-999999") == FAILED  # bulk lookups: the ID is missing from the reply
    out = capsys.readouterr().out
    assert "via sendgrid (email): RESOLVE_FAILED" in out
    assert "  PII API      HTTP 200" in out

    sms = tmp_path / "sms.yaml"
    sms.write_text('sms_body: "Hi {{ first_name }}"\n')
    argv = ["send-test", "--workspace", suite.workspace_id, "--campaign", "welcome", "--channel", "sms"]
    argv += ["--connector", "twilio", "--content", str(sms), "--addr", dispatcher, "--id", "cust-999999"]
    assert await run_cli(*argv) == FAILED  # single lookups: the PII API says 404
    out = capsys.readouterr().out
    assert "via twilio (sms): RESOLVE_FAILED" in out
    assert "  PII API      HTTP 404" in out
    assert "customer not found" not in out and "(its body: --show-pii)" in out  # it may name the customer
    assert await run_cli(*argv, "--show-pii") == FAILED
    assert "customer not found" in capsys.readouterr().out, "the PII API's own (scrubbed) answer is shown"


async def test_send_test_content_errors_name_the_field(start_suite, tmp_path, capsys) -> None:
    suite = await start_suite()
    content = tmp_path / "content.yaml"
    content.write_text("subjet: Hello\n")
    argv = ["send-test", "--workspace", suite.workspace_id, "--campaign", "c", "--channel", "sms", "--connector"]
    argv += ["twilio", "--id", "cust-000001", "--content", str(content), "--addr", f"127.0.0.1:{suite.dispatcher.port}"]
    assert await run_cli(*argv) == 2
    assert f"{content}: unknown field 'subjet' in content (did you mean 'subject'?)" in capsys.readouterr().err
    content.write_text("subject: Hello\n")  # an SMS needs sms_body: the dispatcher says so
    assert await run_cli(*argv) == 2
    assert "refused it as invalid (INVALID_ARGUMENT): content.sms_body" in capsys.readouterr().err


@pytest.fixture
async def receipts(redis, redis_url, secret_key) -> AsyncIterator[str]:
    settings = ReceiptsSettings(
        redis_url=redis_url, secret_key=secret_key, grpc_host="127.0.0.1", grpc_port=0, grace_seconds=1
    )
    service, port = await build_server(settings, ReceiptsDeps.from_settings(settings))
    yield f"127.0.0.1:{port}"
    await service.stop(0.5)


async def test_stats_as_a_table_and_as_json(receipts, redis, capsys) -> None:
    async with redis.pipeline(transaction=False) as pipe:  # what the dispatcher and the receipts ledger count
        add_counts(pipe, "ws-1", "welcome", "run-1", {"attempted": 10, "resolve_failed": 2, "sent": 8})
        add_counts(pipe, "ws-1", "welcome", "run-1", {"resolve_failed:NOT_FOUND": 2, "delivered": 6, "opened": 3})
        add_counts(pipe, "ws-1", "welcome", "run-2", {"attempted": 5, "sent": 5, "delivered": 5})
        await pipe.execute()

    assert await run_cli("stats", "welcome", "--workspace", "ws-1", "--json", "--addr", receipts) == OK
    data = json.loads(capsys.readouterr().out)
    assert {k: data[k] for k in ("campaign_id", "attempted", "sent", "delivered", "opened", "bounced")} == {
        "campaign_id": "welcome",
        "attempted": 15,
        "sent": 13,
        "delivered": 11,
        "opened": 3,
        "bounced": 0,
    }
    assert data["resolve_failed_by_reason"] == {"NOT_FOUND": 2}

    assert await run_cli("stats", "welcome", "--workspace", "ws-1", "--instance", "run-1", "--addr", receipts) == OK
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "campaign welcome in workspace ws-1 (instance run-1)"
    rows = {line.split("  ")[1].strip(): line.split()[-1] if "%" not in line else line for line in table[1:]}
    assert rows["attempted"] == "10"
    assert "20.0% of attempted" in rows["resolve failed"]
    assert "75.0% of sent" in rows["delivered"]
    assert any(line.strip().startswith("NOT_FOUND") and line.strip().endswith("2") for line in table)
    assert capsys.readouterr().err == ""  # counts found: nothing to say

    # A mistyped ID reads zeros as an unknown campaign does: the table, and a line saying so.
    assert await run_cli("stats", "welcome", "--workspace", "ws-l", "--addr", receipts) == OK
    printed = capsys.readouterr()
    assert printed.out.splitlines()[1].split() == ["attempted", "0"]
    assert printed.err == (
        "tokensend: no counts for campaign 'welcome' in workspace 'ws-l': nothing was dispatched for it yet, "
        "or an ID is mistyped (an unknown workspace, campaign or instance reads all zeros)\n"
    )
    assert (
        await run_cli("stats", "welcome", "--workspace", "ws-1", "--instance", "run-3", "--json", "--addr", receipts)
        == OK
    )
    assert "no counts for campaign 'welcome', instance 'run-3', in workspace 'ws-1'" in capsys.readouterr().err

    assert await run_cli("stats", "bad campaign", "--workspace", "ws-1", "--addr", receipts) == 2
    assert "refused it as invalid (INVALID_ARGUMENT): campaign_id:" in capsys.readouterr().err


async def test_stats_of_an_empty_campaign_are_the_workspaces_unmapped_receipts(receipts, redis, capsys) -> None:
    """An empty campaign_id reads the workspace's own counters, where only receipts that named no known
    campaign are counted: the output says so, not "campaign  in workspace" over rows of zeros."""
    async with redis.pipeline(transaction=False) as pipe:
        add_counts(pipe, "ws-u", WORKSPACE_COUNTERS, "", {"unmapped": 4})
        add_counts(pipe, "ws-u", "welcome", "run-1", {"attempted": 2, "sent": 2, "unmapped": 1})
        await pipe.execute()

    assert await run_cli("stats", "", "--workspace", "ws-u", "--addr", receipts) == OK
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [
        "workspace ws-u: unmapped receipts naming no known campaign (CAMPAIGN empty)",
        "  unmapped receipts  4",
    ]
    assert printed.err == ""
    assert await run_cli("stats", "", "--workspace", "ws-u", "--json", "--addr", receipts) == OK
    data = json.loads(capsys.readouterr().out)
    assert (data["campaign_id"], data["unmapped"], data["attempted"]) == ("", 4, 0)

    # None counted: said as such, not as a campaign named '' that sent nothing.
    assert await run_cli("stats", "", "--workspace", "ws-none", "--addr", receipts) == OK
    printed = capsys.readouterr()
    assert printed.out.splitlines()[1].split() == ["unmapped", "receipts", "0"]
    assert printed.err == (
        "tokensend: no unmapped receipts counted in workspace 'ws-none': none came, or the workspace ID is "
        "mistyped (an unknown workspace reads zero)\n"
    )

    # Those receipts belong to no instance: refused before any call, naming what is missing.
    assert await run_cli("stats", "", "--workspace", "ws-u", "--instance", "run-1", "--addr", receipts) == USAGE
    assert "tokensend: --instance needs a CAMPAIGN" in capsys.readouterr().err
