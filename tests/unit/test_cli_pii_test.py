"""`tokensend test-pii-api`'s report of a failed lookup."""

from __future__ import annotations

from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from cli.commands.pii_test import render


def failed(message: str, attempts: int) -> rpb.TestPiiApiConfigResponse:
    return rpb.TestPiiApiConfigResponse(
        http_status=503,
        error=rpb.ResolveError(code=rpb.RESOLVE_ERROR_CODE_SERVER_ERROR, message=message, attempts=attempts),
    )


def error_line(reply: rpb.TestPiiApiConfigResponse) -> str:
    return next(line for line in render("pii-api demo/email", "cust-1", reply, show_pii=False) if "error" in line)


def test_the_attempt_count_is_said_once() -> None:
    line = error_line(failed("the PII API answered HTTP 503 after 4 attempts", 4))
    assert line.count("4 attempts") == 1
    assert "attempt(s)" not in line


def test_a_single_attempt_is_counted_in_words() -> None:
    assert error_line(failed("the PII API answered HTTP 404", 1)).endswith("(1 attempt)")
    assert error_line(failed("the PII API answered HTTP 500", 2)).endswith("(2 attempts)")
