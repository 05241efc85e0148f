"""`tokensend dispatch` and `send-test` against the resolver and dispatcher on port 0, fed IDs padded with spaces
(a CSV written `cust-1, gold`, an ID pasted with its line break): the customers get their message."""

from __future__ import annotations

import pytest

from cli.exits import OK
from tests.integration.test_cli_dispatch import EMAIL, dispatch_argv, results_in, run_cli

pytestmark = pytest.mark.integration


async def test_ids_padded_with_spaces_are_sent_to_their_customers(start_suite, tmp_path, capsys) -> None:
    suite = await start_suite()
    content = tmp_path / "email.yaml"
    content.write_text(EMAIL)
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id, tier\ncust-000001, gold\n cust-000002 ,silver\ncust-000001 ,gold\n")
    out = tmp_path / "results.jsonl"

    assert await run_cli(*dispatch_argv(suite, recipients, content, "padded-1", "--out", str(out))) == OK
    # Sent as written, " cust-000002 " was answered RESOLVE_FAILED (INVALID_ID), and the padded repeat of
    # cust-000001 was not known for the same customer.
    assert [(r["anonymous_id"], r["status"]) for r in results_in(out)] == [
        ("cust-000001", "DISPATCH_STATUS_SENT"),
        ("cust-000002", "DISPATCH_STATUS_SENT"),
        ("cust-000001", "DISPATCH_STATUS_DUPLICATE"),
    ]

    argv = ["send-test", "--workspace", suite.workspace_id, "--campaign", "spring", "--channel", "email"]
    argv += ["--connector", "sendgrid", "--id", "cust-000003\n", "--content", str(content)]
    capsys.readouterr()
    assert await run_cli(*argv, "--addr", f"127.0.0.1:{suite.dispatcher.port}") == OK
    assert capsys.readouterr().out.startswith("test message to cust-000003 via sendgrid (email): SENT")
