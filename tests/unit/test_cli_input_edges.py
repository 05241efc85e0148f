"""The command line fed what operators feed it by mistake: IDs padded with spaces, arguments that are not
UTF-8, a customer's address where a name goes, a recipient too large to send, standard input named twice.
Each is refused naming the flag, file or line, never repeating a value that may be personal data."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from cli.commands.dispatch import PART_BYTES, CampaignStream
from cli.documents import CONNECTOR, DocumentError, load_configs, read_text
from cli.exits import USAGE, UsageError
from cli.main import build_parser, main
from cli.recipients import RecipientsError, RecipientsFile

ROOT = Path(__file__).resolve().parents[2]
CONTENT = str(ROOT / "examples/content-email.yaml")
UNREACHABLE = "127.0.0.1:1"  # nothing may be sent: a connection attempt would fail differently
EMAIL = "jane.canary@example.org"
PHONE = "+14155550199"


def send_test_argv(*more: str) -> list[str]:
    argv = ["send-test", "--workspace", "w", "--campaign", "c", "--channel", "email", "--connector", "sg"]
    return [*argv, "--content", CONTENT, "--addr", UNREACHABLE, *more]


def test_an_attribute_without_its_name_is_refused_without_repeating_it(capsys) -> None:
    assert main(send_test_argv("--id", "cust-1", "--attr", EMAIL)) == USAGE
    err = capsys.readouterr().err
    assert "argument --attr: expected NAME=VALUE" in err
    assert EMAIL not in err


@pytest.mark.parametrize("command", [send_test_argv(), ["test-pii-api", "--workspace", "w", "--channel", "email"]])
def test_space_around_an_id_flag_is_dropped(command) -> None:
    assert build_parser().parse_args([*command, "--id", " cust-1\t"]).anonymous_id == "cust-1"


@pytest.mark.parametrize(("given", "problem"), [(f"{EMAIL} x", "must be 1-256 visible characters"), ("  ", "is empty")])
def test_an_id_flag_the_services_would_refuse_is_refused_naming_the_flag_not_the_value(capsys, given, problem) -> None:
    assert main(send_test_argv("--id", given)) == USAGE
    err = capsys.readouterr().err
    assert f"argument --id: {problem}" in err
    assert EMAIL not in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["stats", "spring", "--workspace", "de\udcffmo"], "the value of --workspace"),
        (["stats", "spring", "--workspace=de\udcffmo"], "the value of --workspace"),
        (["stats", "spr\udcffing", "--workspace", "demo"], "argument 2"),
        (["send-test", *send_test_argv()[1:], "--id", "cust-1", "--attr", "tier=g\udcffold"], "the value of --attr"),
        (["send-test", *send_test_argv()[1:], "--id", "cust-\udcff1"], "argument --id"),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_it(capsys, argv, named) -> None:
    # It once ended in a traceback (UnicodeEncodeError) as the request was built.
    assert main([*argv, "--addr", UNREACHABLE]) == USAGE
    err = capsys.readouterr().err
    assert f"{named}" in err and "is not valid UTF-8 text" in err
    assert "Traceback" not in err and "\udcff" not in err


def read(tmp_path: Path, name: str, content: str) -> list[pb.Recipient]:
    path = tmp_path / name
    path.write_text(content)
    recipients = RecipientsFile.open(str(path), name.rsplit(".", 1)[1])
    try:
        return [recipient for _, recipient in recipients]
    finally:
        recipients.close()


def test_space_around_an_anonymous_id_in_a_recipients_file_is_dropped(tmp_path) -> None:
    # Sent as written, " cust-2" came back RESOLVE_FAILED (INVALID_ID): the customer got nothing.
    assert [r.anonymous_id for r in read(tmp_path, "a.csv", "anonymous_id, tier\n cust-1 , gold\ncust-2\t,\n")] == [
        "cust-1",
        "cust-2",
    ]
    lines = [{"anonymous_id": " cust-3 "}, {"anonymous_id": "cust-4\u00a0"}]
    assert [r.anonymous_id for r in read(tmp_path, "a.jsonl", "".join(json.dumps(x) + "\n" for x in lines))] == [
        "cust-3",
        "cust-4",
    ]


@pytest.mark.parametrize(
    ("name", "content"), [("a.csv", "anonymous_id,tier\n   ,gold\n"), ("a.jsonl", '{"anonymous_id": " "}\n')]
)
def test_an_anonymous_id_of_spaces_alone_is_empty(tmp_path, name, content) -> None:
    with pytest.raises(RecipientsError) as caught:
        read(tmp_path, name, content)
    assert caught.value.problem == "anonymous_id is empty"


def test_a_recipient_too_large_for_a_part_stops_the_reading_at_its_line(tmp_path) -> None:
    # Sent, the dispatcher refused the whole stream (RESOURCE_EXHAUSTED) naming no line.
    path = tmp_path / "a.jsonl"
    large = {"anonymous_id": "cust-2", "attributes": {"note": "x" * (PART_BYTES + 1)}}
    path.write_text(f'{{"anonymous_id": "cust-1"}}\n{json.dumps(large)}\n{{"anonymous_id": "cust-3"}}\n')
    stream = CampaignStream(pb.DispatchStreamRequest.Header(), RecipientsFile.open(str(path), "jsonl"), io.StringIO())
    parts = list(stream.requests())
    assert [r.anonymous_id for part in parts[1:] for r in part.recipients.recipients] == ["cust-1"]
    assert stream.bad_line is not None and stream.bad_line.line == 2
    assert "more than a part of the stream holds" in stream.bad_line.problem


def test_a_yaml_file_that_is_not_utf8_is_named_by_its_line(tmp_path, monkeypatch) -> None:
    path = tmp_path / "content.yaml"
    path.write_bytes(b"subject: hi\ntext_body: \xff\n")
    with pytest.raises(UsageError) as caught:
        read_text(str(path))
    assert caught.value.message == f"{path} line 2: not valid UTF-8"
    # Read from standard input, it was taken as YAML holding "unacceptable character #xdcff".
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a: 1\n\nb: \xfe\n")))
    with pytest.raises(UsageError) as caught:
        read_text("-")
    assert caught.value.message == "<stdin> line 3: not valid UTF-8"


def test_standard_input_named_twice_is_refused(capsys) -> None:
    assert main(["config", "put", "-", "-", "--dry-run"]) == USAGE
    assert "standard input (-) can be named once" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content",
    [
        f"{EMAIL}: Jane Canary\n",
        f'{{"{PHONE}": {{"first_name": "Jane"}}}}\n',
        f'channel: email\n"{PHONE}": a\n"{PHONE}": b\n',
    ],
)
def test_a_customers_file_given_as_a_config_is_refused_without_its_keys(tmp_path, content) -> None:
    path = tmp_path / "customers.yaml"
    path.write_text(content)
    with pytest.raises(DocumentError) as caught:
        load_configs(str(path), CONNECTOR)
    assert EMAIL not in caught.value.message and PHONE not in caught.value.message
    assert "(its name not shown: not a field's name)" in caught.value.message


def test_a_mistyped_field_is_still_named(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kind: sendgrid\nbase-url: x\n")
    with pytest.raises(DocumentError) as caught:
        load_configs(str(path), None)
    assert "unknown field 'base-url' in connector (did you mean 'base_url'?)" in caught.value.message
