"""`tokensend dispatch` against the resolver and dispatcher on port 0: a campaign from a file, results
written as they arrive, re-runs answered DUPLICATE, bad lines and streams cut short.

The CLI is synchronous; it runs in a worker thread while the servers serve on the test's loop.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from cli.exits import FAILED, INTERRUPTED, OK, USAGE
from cli.main import main
from sandbox.pii_api import generate_customers
from tests.integration.test_dispatcher_campaigns import servicers_made

pytestmark = pytest.mark.integration
C = common_pb2.Channel
ROOT = Path(__file__).resolve().parents[2]

EMAIL = 'subject: "Hi {{ first_name }}"\ntext_body: "Your tier: {{ recipient.tier | default(\'new\') }}"\n'
SMS = 'sms_body: "Hi {{ first_name }}, {{ recipient.offer }} for {{ recipient.tier }} members"\n'
# An attribute value no message may repeat: it stands for one a brand would not want in a log.
PRIVATE = "canary-attribute-7f3a"


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def dispatch_argv(suite, recipients: Path | str, content: Path, instance: str, *more: str) -> list[str]:
    argv = ["dispatch", str(recipients), "--content", str(content), "--workspace", suite.workspace_id]
    argv += ["--campaign", "spring", "--instance", instance, "--addr", f"127.0.0.1:{suite.dispatcher.port}"]
    return [*argv, *more] if "--channel" in more else [*argv, "--channel", "email", "--connector", "sendgrid", *more]


def results_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary_rows(err: str) -> dict[str, int]:
    rows = [line.strip().rsplit(" ", 1) for line in err.splitlines() if line.startswith("  ")]
    return {name.strip(): int(count) for name, count in rows if count.isdigit()}


@pytest.fixture
def email_content(tmp_path) -> Path:
    path = tmp_path / "email.yaml"
    path.write_text(EMAIL)
    return path


async def test_a_csv_file_is_sent_with_a_result_per_recipient_and_a_rerun_is_duplicate(
    start_suite, tmp_path, capsys, customers, email_content
) -> None:
    suite = await start_suite()
    recipients = tmp_path / "audience.csv"
    recipients.write_text(
        "anonymous_id,tier\ncust-000001,gold\ncust-000002,\n\ncust-999999,silver\ncust-000003,bronze\n"
    )
    out = tmp_path / "results.jsonl"

    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "spring-1", "--out", str(out))) == OK
    results = results_in(out)
    assert [r["anonymous_id"] for r in results] == ["cust-000001", "cust-000002", "cust-999999", "cust-000003"]
    assert set(results[0]) == {"anonymous_id", "status", "message_id", "error_code", "error_message"}
    assert [r["status"] for r in results] == [
        "DISPATCH_STATUS_SENT",
        "DISPATCH_STATUS_SENT",
        "DISPATCH_STATUS_RESOLVE_FAILED",  # bulk lookups: the ID is missing from the PII API's reply
        "DISPATCH_STATUS_SENT",
    ]
    assert results[2]["error_code"] == "NOT_FOUND" and results[2]["message_id"] == ""
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "campaign spring, instance spring-1: 4 recipient(s)"
    assert summary_rows(err) == {
        "sent": 3,
        "resolve failed": 1,
        "send failed": 0,
        "capped": 0,
        "duplicate": 0,
        "suppressed": 0,
    }
    # The CSV's other columns are the recipient's attributes; an empty cell leaves one out.
    bodies = {c.anonymous_id: str(m) for c in customers.values() for m in suite.providers.outbox if c.email in str(m)}
    assert "Your tier: gold" in bodies["cust-000001"]
    assert "Your tier: new" in bodies["cust-000002"]
    assert "Your tier: bronze" in bodies["cust-000003"]

    # The same instance again: nothing is sent twice, and the results say which messages went.
    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "spring-1", "--out", str(out))) == OK
    again = results_in(out)
    assert [r["status"] for r in again] == [
        "DISPATCH_STATUS_DUPLICATE",
        "DISPATCH_STATUS_DUPLICATE",
        "DISPATCH_STATUS_RESOLVE_FAILED",  # not sent, so not claimed: tried again
        "DISPATCH_STATUS_DUPLICATE",
    ]
    assert [r["message_id"] for r in again if r["message_id"]] == [r["message_id"] for r in results if r["message_id"]]
    assert summary_rows(capsys.readouterr().err)["duplicate"] == 3
    assert suite.providers.stats.accepted["sendgrid"] == 3


async def test_json_lines_from_stdin_reach_the_template_and_results_go_to_stdout(
    start_suite, tmp_path, capsys, customers, monkeypatch
) -> None:
    suite = await start_suite()
    content = tmp_path / "sms.yaml"
    content.write_text(SMS)
    lines = [
        {"anonymous_id": "cust-000001", "attributes": {"tier": "gold", "offer": "20% off"}},
        {"anonymous_id": "cust-000002", "attributes": {"tier": "silver", "offer": 15}},
    ]
    stdin = io.TextIOWrapper(io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode()))
    monkeypatch.setattr("sys.stdin", stdin)

    argv = dispatch_argv(suite, "-", content, "sms-1", "--channel", "sms", "--connector", "twilio", "--format", "jsonl")
    assert await run_cli(*argv) == OK
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["anonymous_id"], r["status"]) for r in results] == [
        ("cust-000001", "DISPATCH_STATUS_SENT"),
        ("cust-000002", "DISPATCH_STATUS_SENT"),
    ]
    assert summary_rows(captured.err)["sent"] == 2
    texts = {m.to: m.text for m in suite.providers.outbox_for("twilio")}
    first, second = customers["cust-000001"], customers["cust-000002"]
    assert texts[first.phone] == f"Hi {first.first_name}, 20% off for gold members"
    assert texts[second.phone] == f"Hi {second.first_name}, 15 for silver members"

    without_format = [a for a in argv if a not in ("--format", "jsonl")]
    assert await run_cli(*without_format) == USAGE  # stdin has no extension to tell its format
    assert "needs --format csv or --format jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "text", "problem", "fixed"),
    [
        (
            "audience.csv",
            f"anonymous_id,tier\ncust-000001,{PRIVATE}\ncust-000002,gold\n,{PRIVATE}\ncust-000003,gold\n",
            "line 4: anonymous_id is empty",
            "cust-000004,gold",
        ),
        (
            "audience.jsonl",
            "".join(
                json.dumps({"anonymous_id": f"cust-00000{n}", "attributes": {"tier": PRIVATE}}) + "\n" for n in (1, 2)
            )
            + f'{{"anonymous_id": "cust-000009", "attributes": {{"tier": "{PRIVATE}"}}\n'
            + json.dumps({"anonymous_id": "cust-000003"})
            + "\n",
            "line 3: not valid JSON (Expecting ',' delimiter at column",
            json.dumps({"anonymous_id": "cust-000004"}),
        ),
    ],
    ids=["csv empty id", "jsonl malformed"],
)
async def test_a_bad_line_stops_the_reading_after_the_recipients_before_it_are_sent(
    start_suite, tmp_path, capsys, email_content, name, text, problem, fixed
) -> None:
    suite = await start_suite()
    recipients = tmp_path / name
    recipients.write_text(text)
    out = tmp_path / "results.jsonl"

    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "bad-1", "--out", str(out))) == USAGE
    err = capsys.readouterr().err
    assert f"tokensend: {recipients} {problem}" in err
    assert "the 2 recipient(s) before it were dispatched and their results written" in err
    assert "run the same command again (same --instance)" in err and "DUPLICATE" in err
    assert PRIVATE not in err and "cust-000009" not in err
    assert [(r["anonymous_id"], r["status"]) for r in results_in(out)] == [
        ("cust-000001", "DISPATCH_STATUS_SENT"),
        ("cust-000002", "DISPATCH_STATUS_SENT"),
    ]
    assert summary_rows(err)["sent"] == 2

    # Fixed, the same command sends only the rest.
    lines = text.splitlines()
    lines[int(problem.split()[1].rstrip(":")) - 1] = fixed
    recipients.write_text("\n".join(lines) + "\n")
    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "bad-1", "--out", str(out))) == OK
    statuses = [r["status"].removeprefix("DISPATCH_STATUS_") for r in results_in(out)]
    assert statuses == ["DUPLICATE", "DUPLICATE", "SENT", "SENT"]
    assert suite.providers.stats.accepted["sendgrid"] == 4


async def test_an_unknown_connector_ends_the_stream_with_the_dispatchers_error(
    start_suite, tmp_path, capsys, email_content
) -> None:
    suite = await start_suite()
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id\ncust-000001\n")
    argv = dispatch_argv(suite, recipients, email_content, "c-1", "--channel", "email", "--connector", "nope")
    assert await run_cli(*argv) == FAILED
    err = capsys.readouterr().err
    assert "the dispatcher answered NOT_FOUND" in err
    # Run again as it is, it would be refused again: the cause first.
    assert "No recipient got a result. Once what is said above is fixed, running the same command again" in err
    assert "recipient(s)" not in err  # no table of zeros
    assert len(suite.providers.outbox) == 0


def id_lines(first: int, last: int) -> str:
    return "".join(f"cust-{n:06d}\n" for n in range(first, last + 1))


async def open_pipe(fifo: Path, cli: asyncio.Task) -> IO[str]:
    """The writing end of `fifo`, once the command has opened it to read; fails if it ends without."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if cli.done():
                pytest.fail(f"the command ended (exit {cli.result()}) without reading {fifo.name}")
            await asyncio.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w")


async def lines_written(path: Path, count: int, seconds: float = 30) -> bool:
    """Whether `path` holds `count` whole lines within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_the_file_is_read_as_it_comes_and_results_are_written_as_they_arrive(
    start_suite, tmp_path, capsys, email_content
) -> None:
    """The recipients come through a pipe that gives a first part and then waits: its results are
    written before the rest of the file exists, which a reader that read the whole file first, or a
    writer that held the results, would never do."""
    suite = await start_suite()
    suite.pii_api.sandbox.customers.update(generate_customers(1500))
    fifo = tmp_path / "audience.csv"
    os.mkfifo(fifo)
    out = tmp_path / "results.jsonl"
    cli = asyncio.create_task(run_cli(*dispatch_argv(suite, fifo, email_content, "lazy-1", "--out", str(out))))
    pipe = await open_pipe(fifo, cli)
    try:
        pipe.write("anonymous_id\n" + id_lines(1, 1000))
        pipe.flush()
        first_part_answered = await lines_written(out, 1000)
        pipe.write(id_lines(1001, 1500))
    finally:
        pipe.close()
    assert first_part_answered, "no results while the file was still being written"
    assert await cli == OK
    results = results_in(out)
    assert [r["anonymous_id"] for r in results] == [f"cust-{n:06d}" for n in range(1, 1501)]
    assert {r["status"] for r in results} == {"DISPATCH_STATUS_SENT"}
    assert summary_rows(capsys.readouterr().err)["sent"] == 1500


async def test_a_stream_the_dispatcher_ends_at_shutdown_keeps_its_results_and_a_rerun_sends_the_rest(
    start_suite, start_dispatcher, tmp_path, capsys, email_content, monkeypatch
) -> None:
    made = servicers_made(monkeypatch)
    suite = await start_suite(batch_size=100)
    suite.pii_api.sandbox.customers.update(generate_customers(1500))
    fifo = tmp_path / "audience.csv"
    os.mkfifo(fifo)
    out = tmp_path / "results.jsonl"
    argv = dispatch_argv(suite, fifo, email_content, "cut-1", "--out", str(out))
    cli = asyncio.create_task(run_cli(*argv))
    pipe = await open_pipe(fifo, cli)
    try:
        pipe.write("anonymous_id\n" + id_lines(1, 1000))
        pipe.flush()
        assert await lines_written(out, 1000)
        made[0].drain()  # shutdown begins while the dispatcher waits for the next part
        code = await asyncio.wait_for(cli, 30)
    finally:
        pipe.close()
    assert code == FAILED
    err = capsys.readouterr().err
    assert "answered UNAVAILABLE: the dispatcher is shutting down" in err
    assert f"1000 recipient(s) got a result (written to {out}); the others read from {fifo} got none." in err
    assert "Running the same command again (same --instance) sends only what was not sent" in err
    assert err.splitlines()[0] == "campaign spring, instance cut-1, stopped: 1000 recipient(s)"
    assert len(results_in(out)) == 1000

    # Another dispatcher (as after a restart) and the whole file: only what was not sent is sent.
    restarted = await start_dispatcher(suite.resolver)
    whole = tmp_path / "whole.csv"
    whole.write_text("anonymous_id\n" + id_lines(1, 1500))
    argv = [
        *dispatch_argv(suite, whole, email_content, "cut-1", "--out", str(out)),
        "--addr",
        f"127.0.0.1:{restarted.port}",
    ]
    assert await run_cli(*argv) == OK
    statuses = [r["status"] for r in results_in(out)]
    assert statuses == ["DISPATCH_STATUS_DUPLICATE"] * 1000 + ["DISPATCH_STATUS_SENT"] * 500
    assert suite.providers.stats.accepted["sendgrid"] == 1500


async def test_the_frequency_cap_and_the_topic_go_with_the_campaign(
    start_suite, tmp_path, capsys, email_content
) -> None:
    suite = await start_suite()
    await suite.dispatcher.stub.SuppressRecipients(
        pb.SuppressRecipientsRequest(
            workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, topic="offers", anonymous_ids=["cust-000002"]
        )
    )
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id\ncust-000001\ncust-000002\n")
    out = tmp_path / "results.jsonl"
    limits = ("--frequency-cap", "1/3600", "--topic", "offers", "--out", str(out))

    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "cap-1", *limits)) == OK
    assert [r["status"] for r in results_in(out)] == ["DISPATCH_STATUS_SENT", "DISPATCH_STATUS_SUPPRESSED"]
    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "cap-2", *limits)) == OK
    assert [r["status"] for r in results_in(out)] == ["DISPATCH_STATUS_CAPPED", "DISPATCH_STATUS_SUPPRESSED"]
    assert summary_rows(capsys.readouterr().err)["capped"] == 1


async def test_a_file_of_twenty_thousand_lines_is_answered_line_by_line_in_order(
    start_suite, tmp_path, capsys, email_content
) -> None:
    suite = await start_suite()
    suite.pii_api.sandbox.customers.update(generate_customers(2000))
    recipients = tmp_path / "audience.jsonl"
    with recipients.open("w") as file:
        for n in range(1, 20_001):
            file.write(json.dumps({"anonymous_id": f"cust-{n:06d}", "attributes": {"tier": "gold"}}) + "\n")
    out = tmp_path / "results.jsonl"

    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "big-1", "--out", str(out))) == OK
    results = results_in(out)
    assert [r["anonymous_id"] for r in results] == [f"cust-{n:06d}" for n in range(1, 20_001)]
    statuses = [r["status"] for r in results]
    # The sample PII API knows the first 2,000; the others are not found.
    assert statuses == ["DISPATCH_STATUS_SENT"] * 2000 + ["DISPATCH_STATUS_RESOLVE_FAILED"] * 18_000
    rows = summary_rows(capsys.readouterr().err)
    assert (rows["sent"], rows["resolve failed"]) == (2000, 18_000)


async def test_a_recipient_the_dispatcher_refuses_is_named_by_its_line(start_suite, tmp_path, capsys, email_content):
    """The dispatcher refuses a part by the recipient's index in it; the error names the file's line."""
    suite = await start_suite()
    recipients = tmp_path / "audience.csv"
    rows = [f"cust-{n:06d},gold" for n in range(1, 1501)]
    rows[1200] = "cust-001201," + "x" * 1025  # over the dispatcher's 1024 characters an attribute
    recipients.write_text("anonymous_id,tier\n" + "\n".join(rows) + "\n")
    out = tmp_path / "results.jsonl"

    assert await run_cli(*dispatch_argv(suite, recipients, email_content, "long-1", "--out", str(out))) == USAGE
    err = capsys.readouterr().err
    assert "refused it as invalid (INVALID_ARGUMENT): recipients.recipients[200].attributes['tier']: must be" in err
    assert err.count("must be at most 1024 characters") == 1  # the field violation, said once
    assert f"  that recipient is {recipients} line 1202\n" in err
    assert "1000 recipient(s) got a result" in err
    assert len(results_in(out)) == 1000


async def test_ctrl_c_keeps_the_results_received_and_says_how_to_go_on(start_suite, tmp_path, email_content) -> None:
    suite = await start_suite()
    suite.pii_api.sandbox.customers.update(generate_customers(1000))
    fifo = tmp_path / "audience.csv"
    os.mkfifo(fifo)
    out = tmp_path / "results.jsonl"
    argv = dispatch_argv(suite, fifo, email_content, "int-1", "--out", str(out))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *argv, cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    cli = asyncio.create_task(process.wait())
    pipe = await open_pipe(fifo, cli)
    try:
        pipe.write("anonymous_id\n" + id_lines(1, 1000))
        pipe.flush()
        assert await lines_written(out, 1000)
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(cli, 30) == INTERRUPTED
    finally:
        pipe.close()
    err = (await process.stderr.read()).decode()
    assert "campaign spring, instance int-1, stopped: 1000 recipient(s)" in err
    assert f"tokensend: 1000 recipient(s) got a result (written to {out})" in err
    assert "same --instance" in err and err.endswith("tokensend: interrupted\n")
    assert len(results_in(out)) == 1000


async def test_ctrl_c_while_standard_input_waits_exits_130_not_aborted_at_shutdown(
    start_suite, tmp_path, email_content
) -> None:
    """`export-audience | tokensend dispatch -`, the exporter slow: Ctrl-C while the file's reader waits on
    the pipe. That read held sys.stdin's lock, which the interpreter takes at exit: it aborted (exit 134)."""
    suite = await start_suite()
    suite.pii_api.sandbox.customers.update(generate_customers(1000))
    out = tmp_path / "results.jsonl"
    argv = dispatch_argv(suite, "-", email_content, "int-2", "--format", "csv", "--out", str(out))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *argv, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        process.stdin.write(("anonymous_id\n" + id_lines(1, 1000)).encode())
        await process.stdin.drain()
        assert await lines_written(out, 1000)  # the first part answered; the reader waits for more
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == INTERRUPTED
    finally:
        process.stdin.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = (await process.stderr.read()).decode()
    assert "Fatal Python error" not in err and err.endswith("tokensend: interrupted\n")
    assert len(results_in(out)) == 1000


async def test_a_producer_that_pauses_has_the_recipients_read_so_far_answered_meanwhile(
    start_suite, tmp_path, capsys, email_content
) -> None:
    """`export-audience | tokensend dispatch -`, the exporter writing a few IDs and then pausing: the part
    partly filled goes once the pipe is quiet, and its results are written while the exporter waits."""
    suite = await start_suite()
    fifo = tmp_path / "audience.csv"
    os.mkfifo(fifo)
    out = tmp_path / "results.jsonl"
    cli = asyncio.create_task(run_cli(*dispatch_argv(suite, fifo, email_content, "pause-1", "--out", str(out))))
    pipe = await open_pipe(fifo, cli)
    try:
        pipe.write("anonymous_id\n" + id_lines(1, 3))
        pipe.flush()
        first_answered = await lines_written(out, 3, seconds=15)
        pipe.write(id_lines(4, 5))
        pipe.flush()
        second_answered = await lines_written(out, 5, seconds=15)
    finally:
        pipe.close()
    assert first_answered, "the recipients read were held back while the producer paused"
    assert second_answered
    assert await cli == OK
    assert [(r["anonymous_id"], r["status"]) for r in results_in(out)] == [
        (f"cust-{n:06d}", "DISPATCH_STATUS_SENT") for n in range(1, 6)
    ]
    assert summary_rows(capsys.readouterr().err)["sent"] == 5


async def test_ctrl_c_while_the_producer_pauses_keeps_the_results_of_what_was_read(
    start_suite, tmp_path, email_content
) -> None:
    """`(echo anonymous_id; echo cust-000001; sleep 30; ...) | tokensend dispatch -` and Ctrl-C in the pause:
    the recipient read was sent and answered, so the run says one got a result, not that none did."""
    suite = await start_suite()
    out = tmp_path / "results.jsonl"
    argv = dispatch_argv(suite, "-", email_content, "int-3", "--format", "csv", "--out", str(out))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *argv, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        process.stdin.write(b"anonymous_id\ncust-000001\n")
        await process.stdin.drain()
        answered = await lines_written(out, 1, seconds=20)  # the producer pauses, its pipe open
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == INTERRUPTED
    finally:
        process.stdin.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = (await process.stderr.read()).decode()
    assert answered, f"no result while the producer paused: {err}"
    assert "campaign spring, instance int-3, stopped: 1 recipient(s)" in err
    assert f"tokensend: 1 recipient(s) got a result (written to {out})" in err
    assert "No recipient got a result" not in err
    assert "Fatal Python error" not in err and err.endswith("tokensend: interrupted\n")
    assert [(r["anonymous_id"], r["status"]) for r in results_in(out)] == [("cust-000001", "DISPATCH_STATUS_SENT")]
