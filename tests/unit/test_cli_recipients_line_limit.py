"""A recipients file with no line break where one is expected (a JSON array dumped on one line, a binary
file named .jsonl) is refused at its first overlong line, having read only that much: it was read whole
into memory first (a 300 MB line took 800 MB and 8 s before it was refused as not JSON)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.recipients import MAX_LINE_BYTES, RecipientsError, RecipientsFile

SAID = "a line of over 8 MiB, longer than any recipient: is this a recipients file, one recipient a line?"


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("dump.jsonl", b'[{"anonymous_id": "cust-1"}' + b', {"anonymous_id": "cust-1"}' * 700_000 + b"]", 1),
        ("people.csv", b"anonymous_id\n" + b"x" * (4 * MAX_LINE_BYTES), 2),
        ("people.csv", b"anonymous_id," + b"y" * (4 * MAX_LINE_BYTES), 1),
    ],
    ids=["json array", "csv row", "csv header"],
)
def test_a_line_longer_than_any_recipient_is_refused_having_read_only_that_much(tmp_path, name, content, line) -> None:
    path = Path(tmp_path, name)
    path.write_bytes(content)
    assert len(content) > 2 * MAX_LINE_BYTES
    recipients = None
    try:
        with pytest.raises(RecipientsError) as refused:
            recipients = RecipientsFile.open(str(path), name.rsplit(".", 1)[1])
            list(recipients)
        assert (refused.value.line, refused.value.problem) == (line, SAID)
        assert refused.value.source == str(path)
    finally:
        if recipients is not None:
            assert recipients.stream.tell() <= 2 * MAX_LINE_BYTES  # the header and one bounded line, no more
            recipients.close()


def test_the_longest_recipient_the_dispatcher_takes_is_read(tmp_path) -> None:
    # 50 attributes of 1,024 characters, each escaped as \uXXXX: the longest line a valid recipient needs.
    value = "\\u00e9" * 1024
    attributes = ", ".join(f'"attribute_{i:02d}": "{value}"' for i in range(50))
    path = Path(tmp_path, "wide.jsonl")
    path.write_text(f'{{"anonymous_id": "cust-1", "attributes": {{{attributes}}}}}\n{{"anonymous_id": "cust-2"}}\n')
    recipients = RecipientsFile.open(str(path), "jsonl")
    try:
        read = [r for _, r in recipients]
    finally:
        recipients.close()
    assert [r.anonymous_id for r in read] == ["cust-1", "cust-2"]
    assert read[0].attributes["attribute_49"] == "é" * 1024
