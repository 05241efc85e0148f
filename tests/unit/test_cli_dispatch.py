"""`tokensend dispatch` without servers: recipients files read lazily, in parts; bad lines named by file,
line and field, never by their values; flags."""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import IO

import grpc
import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from cli.commands.dispatch import PART_BYTES, PART_SIZE, CampaignStream, result_to_data
from cli.exits import FAILED, USAGE
from cli.main import main
from cli.recipients import RecipientsError, RecipientsFile
from tests.closed_output import closed_stdout

# An attribute value no message may repeat: it stands for one a brand would not want in a log.
PRIVATE = "canary-attribute-7f3a"
UNREACHABLE = "127.0.0.1:1"  # nothing may be sent: a connection attempt would fail differently


def dispatch_argv(recipients: Path, *more: str) -> list[str]:
    argv = ["dispatch", str(recipients), "--content", str(Path(__file__).parents[2] / "examples/content-sms.yaml")]
    argv += ["--workspace", "w", "--campaign", "c", "--instance", "i", "--channel", "sms", "--connector", "t"]
    return [*argv, "--addr", UNREACHABLE, *more]


class EndlessFile(io.RawIOBase):
    """A CSV of recipients that never ends, counting the lines taken from it."""

    def __init__(self, row: bytes) -> None:
        self.row = row
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        yield b"anonymous_id,tier\n"
        for n in itertools.count(1):
            self.taken = n
            yield b"cust-%06d," % n + self.row


def endless_stream(row: bytes) -> tuple[CampaignStream, EndlessFile]:
    file = EndlessFile(row)
    recipients = RecipientsFile("endless.csv", file, "csv")  # type: ignore[arg-type]
    recipients._columns = recipients._read_header()
    return CampaignStream(pb.DispatchStreamRequest.Header(workspace_id="w"), recipients, io.StringIO()), file


def test_the_file_is_read_a_part_at_a_time_never_ahead() -> None:
    stream, file = endless_stream(b"gold\n")
    requests = stream.requests()
    assert next(requests).WhichOneof("part") == "header"
    assert file.taken == 0
    for part in range(1, 4):
        recipients = next(requests).recipients.recipients
        assert len(recipients) == PART_SIZE
        assert recipients[0].anonymous_id == f"cust-{(part - 1) * PART_SIZE + 1:06d}"
        assert recipients[0].attributes == {"tier": "gold"}
        assert file.taken == part * PART_SIZE  # the part goes as soon as it is full


def test_a_part_of_large_recipients_stays_under_the_size_bound() -> None:
    stream, _ = endless_stream(b"x" * 100_000 + b"\n")  # the dispatcher refuses such values; the bound holds first
    requests = stream.requests()
    next(requests)
    for _ in range(3):
        part = next(requests)
        assert 1 <= len(part.recipients.recipients) < PART_SIZE
        assert part.ByteSize() <= PART_BYTES + 1024
    assert stream.bad_line is None


def read(tmp_path: Path, name: str, content: bytes | str) -> list[pb.Recipient]:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    recipients = RecipientsFile.open(str(path), name.rsplit(".", 1)[1])
    try:
        return [recipient for _, recipient in recipients]
    finally:
        recipients.close()


def test_csv_columns_are_attributes_and_empty_cells_are_left_out(tmp_path) -> None:
    text = '\ufeffanonymous_id, tier ,city\r\ncust-1,gold,"Paris, France"\r\n\r\ncust-2,,"two\nlines"\r\n'
    assert read(tmp_path, "a.csv", text) == [
        pb.Recipient(anonymous_id="cust-1", attributes={"tier": "gold", "city": "Paris, France"}),
        pb.Recipient(anonymous_id="cust-2", attributes={"city": "two\nlines"}),
    ]


@pytest.mark.parametrize(
    ("header", "separator"),
    [
        ("tier;anonymous_id", "semicolons (;)"),
        ("anonymous_id\ttier", "tabs"),
        ("tier ; anonymous_id ;city", "semicolons (;)"),
    ],
)
def test_a_header_separated_by_another_character_says_that_fields_are_separated_by_commas(
    tmp_path, header: str, separator: str
) -> None:
    cell = "\t" if "\t" in header else ";"
    with pytest.raises(RecipientsError) as caught:
        read(tmp_path, "a.csv", f"{header}\ncust-1{cell}{PRIVATE}\n")
    assert caught.value.problem == (
        f"the header row has no 'anonymous_id' column: its fields are separated by {separator}, where a "
        "recipients file separates them by commas"
    )
    assert PRIVATE not in caught.value.message


@pytest.mark.parametrize("header", ["email;tier", "tier,anonymous;id", "id\tanonymous_ids"])
def test_another_separator_is_named_only_when_it_hides_the_anonymous_id_column(tmp_path, header: str) -> None:
    with pytest.raises(RecipientsError) as caught:
        read(tmp_path, "a.csv", f"{header}\n")
    assert caught.value.problem.startswith("the header row has no 'anonymous_id' column (the first line names")


def test_json_lines_take_numbers_and_booleans_as_text_and_null_as_absent(tmp_path) -> None:
    lines = [
        {"anonymous_id": "cust-1", "attributes": {"tier": "gold", "points": 1200, "vip": True, "city": None}},
        {"anonymous_id": 42},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    assert read(tmp_path, "a.jsonl", text) == [
        pb.Recipient(anonymous_id="cust-1", attributes={"tier": "gold", "points": "1200", "vip": "true"}),
        pb.Recipient(anonymous_id="42"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("a.csv", f"cust-1,{PRIVATE}\n", "line 1: the header row has no 'anonymous_id' column"),
        ("a.csv", "", "line 1: no header row: the file is empty"),
        ("a.csv", "anonymous_id,tier,tier\n", "line 1: column 3 of the header row repeats column 2's name"),
        ("a.csv", "anonymous_id,,tier\n", "line 1: column 2 of the header row has no name"),
        (
            "a.csv",
            f"anonymous_id,tier,{PRIVATE}\x01\n",
            "line 1: column 3 of the header row has a control character in its name",
        ),
        ("a.jsonl", '{"anonymous_id": "c", "attributes": {"": "x"}}\n', "line 1: an attribute name is empty"),
        (
            "a.jsonl",
            '{"anonymous_id": "c", "attributes": {"tier ": "x"}}\n',
            "line 1: attribute (its name not shown: not a plain name) begins or ends with a space",
        ),
        (
            "a.jsonl",
            f'{{"anonymous_id": "c", "attributes": {{"{PRIVATE}\\n": "x"}}}}\n',
            "line 1: attribute (its name not shown: not a plain name) has a control character in its name",
        ),
        (
            "a.csv",
            f"anonymous_id,tier\ncust-1,gold\ncust-2,{PRIVATE},x\n",
            "line 3: has 3 fields, the header row 2 fields",
        ),
        ("a.csv", "anonymous_id,tier\ncust-1\n", "line 2: has 1 field, the header row 2 fields"),
        ("a.csv", f'anonymous_id,tier\ncust-1,"{PRIVATE}\n', "line 2: not valid CSV (unexpected end of data)"),
        ("a.csv", b"anonymous_id,tier\ncust-1,gold\ncust-2,caf\xe9\n", "line 3: not valid UTF-8"),
        ("a.csv", f"anonymous_id,tier\n,{PRIVATE}\n", "line 2: anonymous_id is empty"),
        ("a.jsonl", f'{{"anonymous_id": "cust-1"}}\n["{PRIVATE}"]\n', "line 2: expected a JSON object, got a list"),
        (
            "a.jsonl",
            f'{{"anonymous_id": "c", "atributes": {{"t": "{PRIVATE}"}}}}\n',
            "line 1: unknown field 'atributes'",
        ),
        ("a.jsonl", f'{{"attributes": {{"tier": "{PRIVATE}"}}}}\n', "line 1: anonymous_id is missing"),
        ("a.jsonl", '{"anonymous_id": ""}\n', "line 1: anonymous_id is empty"),
        ("a.jsonl", '{"anonymous_id": ["a"]}\n', "line 1: anonymous_id: expected a string, got a list"),
        ("a.jsonl", f'{{"anonymous_id": "c", "attributes": ["{PRIVATE}"]}}\n', "line 1: attributes: expected a JSON"),
        (
            "a.jsonl",
            f'{{"anonymous_id": "c", "attributes": {{"tier": ["{PRIVATE}"]}}}}\n',
            "line 1: attribute 'tier': expected a string or a number, got a list",
        ),
        ("a.jsonl", f'{{"anonymous_id": "{PRIVATE}",}}\n', "line 1: not valid JSON (Expecting property name"),
        ("a.jsonl", f'{{"anonymous_id": "c", "{PRIVATE}@example.com": 1}}\n', "line 1: unknown field (its name not"),
        # JSON escapes half of a UTF-16 pair alone, and numbers beyond Python's bound on digits read from text.
        ("a.jsonl", f'{{"anonymous_id": "{PRIVATE}\\ud800"}}\n', "line 1: anonymous_id holds an unpaired surrogate"),
        (
            "a.jsonl",
            f'{{"anonymous_id": "c", "attributes": {{"tier": "{PRIVATE}\\udc00"}}}}\n',
            "line 1: attribute 'tier' holds an unpaired surrogate",
        ),
        (
            "a.jsonl",
            f'{{"anonymous_id": "c", "attributes": {{"{PRIVATE}\\udc00": "x"}}}}\n',
            "line 1: attribute (its name not shown: not a plain name) holds an unpaired surrogate",
        ),
        ("a.jsonl", '{"anonymous_id": "c", "attributes": {"n": ' + "7" * 5000 + "}}\n", "line 1: a number of over"),
        # Of a key given twice Python keeps the last: which recipient did the line mean?
        (
            "a.jsonl",
            f'{{"anonymous_id": "cust-1", "anonymous_id": "{PRIVATE}"}}\n',
            "line 1: field 'anonymous_id' is given twice in one object: keep one",
        ),
        (
            "a.jsonl",
            f'{{"anonymous_id": "c", "attributes": {{"{PRIVATE}@x.org": 1, "{PRIVATE}@x.org": 2}}}}\n',
            "line 1: field (its name not shown: not a plain name) is given twice",
        ),
    ],
)
def test_a_bad_line_is_named_by_file_line_and_field_never_by_its_values(tmp_path, name, content, problem) -> None:
    with pytest.raises(RecipientsError) as caught:
        read(tmp_path, name, content)
    assert caught.value.message.startswith(f"{tmp_path / name} {problem}"), caught.value.message
    assert PRIVATE not in caught.value.message
    assert caught.value.exit_code == USAGE


@pytest.mark.parametrize(
    "bad_line",
    ['{"anonymous_id": "cust-2\\ud800"}', '{"anonymous_id": "cust-2", "attributes": {"n": ' + "7" * 5000 + "}}"],
)
def test_a_line_python_reads_but_cannot_send_stops_the_stream_as_a_bad_line(tmp_path, bad_line) -> None:
    # Such a line once ended the file there without a word: the rest was never sent, and the command exited 0.
    path = tmp_path / "a.jsonl"
    path.write_text(f'{{"anonymous_id": "cust-1"}}\n{bad_line}\n{{"anonymous_id": "cust-3"}}\n')
    stream = CampaignStream(pb.DispatchStreamRequest.Header(), RecipientsFile.open(str(path), "jsonl"), io.StringIO())
    parts = list(stream.requests())
    assert [r.anonymous_id for part in parts[1:] for r in part.recipients.recipients] == ["cust-1"]
    assert stream.bad_line is not None and stream.bad_line.line == 2


class FailingFile(io.RawIOBase):
    """A CSV whose third line cannot be read as a recipient, for a reason no check names."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"anonymous_id\n"
        yield b"cust-1\n"
        raise ValueError("no reason a check of the file names")


def test_any_line_that_cannot_be_read_stops_the_stream_as_a_bad_line_not_as_the_end_of_the_file() -> None:
    recipients = RecipientsFile("failing.csv", FailingFile(), "csv")  # type: ignore[arg-type]
    recipients._columns = recipients._read_header()
    stream = CampaignStream(pb.DispatchStreamRequest.Header(), recipients, io.StringIO())
    parts = list(stream.requests())
    assert [r.anonymous_id for part in parts[1:] for r in part.recipients.recipients] == ["cust-1"]
    assert stream.bad_line is not None
    assert stream.bad_line.message == "failing.csv line 3: cannot be read as a recipient"


def test_out_naming_the_recipients_or_the_content_file_is_refused_before_anything_is_written(tmp_path, capsys) -> None:
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id\ncust-1\n")
    assert main(dispatch_argv(recipients, "--out", str(recipients))) == USAGE
    assert f"--out {recipients} is the recipients file" in capsys.readouterr().err
    assert recipients.read_text() == "anonymous_id\ncust-1\n"
    content = tmp_path / "sms.yaml"
    content.write_text("sms_body: Hi\n")
    argv = dispatch_argv(recipients, "--out", str(content))
    argv[argv.index("--content") + 1] = str(content)
    assert main(argv) == USAGE
    assert f"--out {content} is the content file" in capsys.readouterr().err
    assert content.read_text() == "sms_body: Hi\n"


def test_a_run_that_gets_no_result_leaves_the_last_runs_results_in_out(tmp_path, capsys) -> None:
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id\ncust-1\n")
    out = tmp_path / "results.jsonl"
    earlier = '{"anonymous_id": "cust-1", "status": "DISPATCH_STATUS_SENT", "message_id": "m-1"}\n'
    out.write_text(earlier)
    assert main(dispatch_argv(recipients, "--out", str(out))) == FAILED  # the dispatcher cannot be reached
    assert "cannot reach the dispatcher" in capsys.readouterr().err
    assert out.read_text() == earlier


def test_the_first_result_replaces_what_an_earlier_run_left_in_out(tmp_path) -> None:
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id\ncust-1\n")
    out_path = tmp_path / "results.jsonl"
    out_path.write_text("an earlier run's results\n" * 3)
    with open(out_path, "a", encoding="utf-8") as out:
        stream = CampaignStream(pb.DispatchStreamRequest.Header(), RecipientsFile.open(str(recipients), "csv"), out)
        stream._write([pb.DispatchResult(anonymous_id="cust-1", status=pb.DISPATCH_STATUS_SENT)])
        stream._write([pb.DispatchResult(anonymous_id="cust-2", status=pb.DISPATCH_STATUS_SENT)])
    assert [json.loads(line)["anonymous_id"] for line in out_path.read_text().splitlines()] == ["cust-1", "cust-2"]


def test_a_file_without_the_anonymous_id_column_is_refused_before_anything_is_sent(tmp_path, capsys) -> None:
    recipients = tmp_path / "audience.csv"
    recipients.write_text(f"email,tier\n{PRIVATE}@example.com,gold\n")
    assert main(dispatch_argv(recipients)) == USAGE
    err = capsys.readouterr().err
    assert err == (
        f"tokensend: {recipients} line 1: the header row has no 'anonymous_id' column (the first line names the "
        "columns: anonymous_id and the attributes' names)\n"
    )


@pytest.mark.parametrize(
    ("more", "expected"),
    [
        (("--frequency-cap", "3"), "expected N/SECONDS (3/86400: 3 messages a day), got '3'"),
        (("--frequency-cap", "0/60"), "N and SECONDS must be at least 1"),
        (("--format", "xml"), "invalid choice: 'xml'"),
    ],
)
def test_flag_errors_exit_2(tmp_path, capsys, more, expected) -> None:
    assert main(dispatch_argv(tmp_path / "audience.csv", *more)) == USAGE
    assert expected in capsys.readouterr().err


def test_the_format_comes_from_the_extension_or_the_flag(tmp_path, capsys) -> None:
    recipients = tmp_path / "audience.txt"
    recipients.write_text("anonymous_id\ncust-1\n")
    assert main(dispatch_argv(recipients)) == USAGE
    assert "cannot tell the format from the extension; name it .csv or .jsonl, or give --format" in (
        capsys.readouterr().err
    )
    assert main(dispatch_argv(tmp_path / "missing.csv")) == USAGE
    assert "missing.csv: no such file" in capsys.readouterr().err
    # Read with --format, the file is fine: the call then fails on the address, which is unreachable.
    assert main(dispatch_argv(recipients, "--format", "csv")) == 1
    assert "cannot reach the dispatcher at 127.0.0.1:1" in capsys.readouterr().err


def test_each_result_line_holds_the_fields_in_the_protos_order_whatever_is_set() -> None:
    sent = result_to_data(pb.DispatchResult(anonymous_id="cust-1", message_id="m-1", status=pb.DISPATCH_STATUS_SENT))
    failed = result_to_data(
        pb.DispatchResult(anonymous_id="cust-2", status=pb.DISPATCH_STATUS_RESOLVE_FAILED, error_code="NOT_FOUND")
    )
    fields = ["anonymous_id", "message_id", "status", "error_code", "error_message"]
    assert list(sent) == list(failed) == fields
    assert failed["message_id"] == "" and failed["status"] == "DISPATCH_STATUS_RESOLVE_FAILED"


class AnsweringDispatcher(pb_grpc.DispatcherServiceServicer):
    """Answers each part of a stream with a SENT result per recipient, then the summary."""

    def DispatchStream(self, request_iterator, context):  # noqa: N802 - the proto's name
        sent = 0
        for request in request_iterator:
            results = [
                pb.DispatchResult(anonymous_id=r.anonymous_id, message_id=f"m-{r.anonymous_id}", status=1)
                for r in request.recipients.recipients
            ]
            sent += len(results)
            if results:
                yield pb.DispatchStreamResponse(results=results)
        yield pb.DispatchStreamResponse(summary=pb.DispatchSummary(attempted=sent, sent=sent))


@pytest.fixture
def dispatcher_address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DispatcherServiceServicer_to_server(AnsweringDispatcher(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_a_results_output_closed_mid_campaign_fails_and_says_what_was_answered(
    tmp_path, capsys, dispatcher_address
) -> None:
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id\n" + "".join(f"cust-{n:06d}\n" for n in range(1, 3001)))
    argv = dispatch_argv(recipients)
    argv[argv.index("--addr") + 1] = dispatcher_address
    with closed_stdout():
        assert main(argv) == FAILED  # not 0, which says the stream completed
    err = capsys.readouterr().err
    assert "the output of the results was closed (broken pipe) before the campaign ended" in err
    assert "Running the same command again (same --instance) sends only what was not sent" in err


def recipients_lines(first: int, last: int) -> bytes:
    return b"".join(b"cust-%06d,gold\n" % n for n in range(first, last + 1))


def test_a_file_on_disk_goes_in_full_parts_read_without_a_thread(tmp_path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"anonymous_id,tier\n" + recipients_lines(1, 2500))
    stream = CampaignStream(pb.DispatchStreamRequest.Header(), RecipientsFile.open(str(path), "csv"), io.StringIO())
    parts = list(stream.requests())[1:]
    assert [len(part.recipients.recipients) for part in parts] == [PART_SIZE, PART_SIZE, 500]
    assert not [t for t in threading.enumerate() if t.name == "recipients-reader"]
    assert stream.recipients.stream.closed


@pytest.fixture
def pipe_stdin(monkeypatch) -> Iterator[IO[bytes]]:
    """Standard input as a pipe; yields its writing end."""
    read_fd, write_fd = os.pipe()
    monkeypatch.setattr("sys.stdin", os.fdopen(read_fd, "r"))
    with os.fdopen(write_fd, "wb", buffering=0) as writer:
        yield writer
    sys.stdin.close()


def next_within(requests: Iterator[pb.DispatchStreamRequest], seconds: float = 10) -> pb.DispatchStreamRequest:
    """The next request, failing (not hanging) when the writer is held in a read."""
    pool = futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(next, requests).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def test_from_a_pipe_a_part_partly_filled_goes_once_the_producer_pauses(pipe_stdin, monkeypatch) -> None:
    # Longer than 50 ms, so that the reader thread held back between two lines of one write (a busy
    # machine) does not pass for a producer's pause.
    monkeypatch.setattr("cli.commands.dispatch.PART_LINGER_SECONDS", 0.5)
    pipe_stdin.write(b"anonymous_id,tier\n" + recipients_lines(1, 3))
    stream = CampaignStream(pb.DispatchStreamRequest.Header(), RecipientsFile.open("-", "csv"), io.StringIO())
    requests = stream.requests()
    assert next(requests).WhichOneof("part") == "header"
    part = next_within(requests)  # not held until a thousand lines come, or the end
    assert [r.anonymous_id for r in part.recipients.recipients] == ["cust-000001", "cust-000002", "cust-000003"]
    pipe_stdin.write(recipients_lines(4, 4) + b",gold\n" + recipients_lines(6, 6))  # line 6 is bad
    part = next_within(requests)
    assert [r.anonymous_id for r in part.recipients.recipients] == ["cust-000004"]
    assert list(requests) == []  # the stream ends at the bad line, whatever comes after it
    assert stream.bad_line is not None and stream.bad_line.message == "<stdin> line 6: anonymous_id is empty"
    assert list(stream.unanswered_lines) == [2, 3, 4, 5]


def test_from_a_pipe_the_writer_ends_with_the_call_while_the_producer_pauses(pipe_stdin) -> None:
    pipe_stdin.write(b"anonymous_id\n")
    stream = CampaignStream(pb.DispatchStreamRequest.Header(), RecipientsFile.open("-", "csv"), io.StringIO())
    requests = stream.requests()
    next(requests)
    waiting = futures.ThreadPoolExecutor(1)
    try:
        pending = waiting.submit(next, requests, None)  # the writer waits for a recipient
        stream.stop_reading()  # the call ends (Ctrl-C, the dispatcher gone)
        assert pending.result(timeout=10) is None  # the writer ends, not held on the pipe
    finally:
        waiting.shutdown(wait=False)
