"""Recipients files for `tokensend dispatch`, read lazily: one recipient at a time, never the whole file.

CSV, separated by commas: a header row naming the columns, one of them `anonymous_id`; every other column is
an attribute of the recipient (`{{ recipient.tier }}`), and an empty cell leaves that attribute out.
JSON lines: `{"anonymous_id": "...", "attributes": {"tier": "gold"}}` per line.
Whitespace around an anonymous ID is dropped (` cust-1 ,gold`): no ID holds any, so the dispatcher would refuse it.

A bad line stops the reading with an error that names the file, the line and the field. It never
repeats a value from the file: attributes may hold personal data, and a column of anonymous IDs
may hold something else by mistake (emails).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from cli.exits import STDIN_CLOSED, UsageError, reading, stdin_closed
from cli.flags import is_text

FORMATS = ("csv", "jsonl")
ID_FIELD = "anonymous_id"
ATTRIBUTES_FIELD = "attributes"
# A recipient is at most 50 attributes of 1,024 characters (the dispatcher's limits): some hundred kB as JSON
# even with every character escaped, and one over a part's size (1 MiB) is refused as such. A line some times
# longer is not one recipient.
MAX_LINE_BYTES = 8 << 20
# A field name shown in an error: what a name looks like. A file whose keys are values (an address) has none shown.
_SHOWN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class RecipientsError(UsageError):
    """A recipients file that cannot be read from some line on; the text names the file, the line, the field."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        super().__init__(f"{source} line {line}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


def recipients_format(path: str, chosen: str | None) -> str:
    """`--format` when given, else the file's extension; stdin (`-`) needs `--format`."""
    if chosen is not None:
        return chosen
    if path == "-":
        raise UsageError("reading recipients from standard input (-) needs --format csv or --format jsonl")
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise UsageError(f"{path}: cannot tell the format from the extension; name it .csv or .jsonl, or give --format")


def _stdin_bytes() -> IO[bytes]:
    """Standard input, as a reader of its own on a copy of its descriptor. A read of a pipe still waiting when
    the command ends (Ctrl-C) then holds no lock of sys.stdin's, which the interpreter takes at exit to close
    it: it aborted there ("could not acquire lock ... at interpreter shutdown"), exit 134 in place of 130."""
    if stdin_closed():
        raise UsageError(STDIN_CLOSED)
    try:
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    except (AttributeError, OSError, ValueError):  # a stdin without a descriptor (replaced, in tests)
        return sys.stdin.buffer


@dataclass
class RecipientsFile:
    """An open recipients file; iterating yields (line number, recipient) until the end or a bad line."""

    source: str  # the path, or "<stdin>", for messages
    stream: IO[bytes]
    format: str
    lines_read: int = 0
    _columns: list[str] = field(default_factory=list)
    _reader: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.format == "csv":
            self._reader = csv.reader(self._lines(), strict=True)

    @classmethod
    def open(cls, path: str, format: str) -> RecipientsFile:
        """Opens the file and, for CSV, reads and checks its header: a file without an anonymous_id
        column fails here, before anything is sent."""
        if path == "-":
            recipients = cls("<stdin>", _stdin_bytes(), format)
        else:
            with reading(path, "recipients file"):
                recipients = cls(path, open(path, "rb"), format)  # noqa: SIM115 - closed by close()
        if format == "csv":
            try:
                recipients._columns = recipients._read_header()
            except BaseException:
                recipients.close()
                raise
        return recipients

    def close(self) -> None:
        # Standard input stays open for whoever reads it next: what is closed here is a copy of its descriptor.
        if self.stream is not getattr(sys.stdin, "buffer", None):
            self.stream.close()

    def __iter__(self) -> Iterator[tuple[int, pb.Recipient]]:
        return self._csv_rows() if self.format == "csv" else self._json_lines()

    def _lines(self) -> Iterator[str]:
        """The file's lines, decoded one at a time, so that an encoding error is named by its own line."""
        # A file is read a bounded line at a time: one with no line break (a JSON array of gigabytes, a binary
        # file named .jsonl) would otherwise be read whole into memory before its first line could be refused.
        bounded = isinstance(self.stream, io.BufferedIOBase)
        lines = iter(lambda: self.stream.readline(MAX_LINE_BYTES + 1), b"") if bounded else iter(self.stream)
        for raw in lines:
            self.lines_read += 1
            if len(raw) > MAX_LINE_BYTES:
                raise RecipientsError(
                    self.source,
                    self.lines_read,
                    f"a line of over {MAX_LINE_BYTES >> 20} MiB, longer than any recipient: is this a recipients "
                    "file, one recipient a line?",
                )
            if self.lines_read == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # the byte-order mark spreadsheets write
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RecipientsError(self.source, self.lines_read, "not valid UTF-8") from None

    # --- CSV -------------------------------------------------------------------------------------------------

    def _read_header(self) -> list[str]:
        try:
            header = next(self._reader, None)
        except csv.Error as exc:
            raise RecipientsError(self.source, max(self.lines_read, 1), _csv_problem(exc)) from None
        if header is None:
            raise RecipientsError(self.source, 1, "no header row: the file is empty")
        columns = [name.strip() for name in header]
        line = self.lines_read
        if ID_FIELD not in columns:
            separator = _other_separator(columns)
            if separator:
                raise RecipientsError(
                    self.source,
                    line,
                    f"the header row has no 'anonymous_id' column: its fields are separated by {separator}, "
                    "where a recipients file separates them by commas",
                )
            raise RecipientsError(
                self.source,
                line,
                "the header row has no 'anonymous_id' column (the first line names the columns: "
                "anonymous_id and the attributes' names)",
            )
        for number, name in enumerate(columns, 1):
            if not name:
                raise RecipientsError(self.source, line, f"column {number} of the header row has no name")
            if not name.isprintable():  # the dispatcher refuses such a name: no template could read it
                raise RecipientsError(
                    self.source, line, f"column {number} of the header row has a control character in its name"
                )
            first = columns.index(name) + 1
            if first != number:
                raise RecipientsError(
                    self.source, line, f"column {number} of the header row repeats column {first}'s name"
                )
        return columns

    def _csv_rows(self) -> Iterator[tuple[int, pb.Recipient]]:
        columns = self._columns
        id_column = columns.index(ID_FIELD)
        while True:
            line = self.lines_read + 1  # where the next record begins; a quoted cell may go on for lines
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise RecipientsError(self.source, line, _csv_problem(exc)) from None
            if not row:
                continue  # a blank line
            if len(row) != len(columns):
                raise RecipientsError(
                    self.source,
                    line,
                    f"has {_fields(len(row))}, the header row {_fields(len(columns))} (a missing or extra comma?)",
                )
            anonymous_id = row[id_column].strip()  # no ID holds whitespace: what is around one is the file's layout
            if not anonymous_id:
                raise RecipientsError(self.source, line, "anonymous_id is empty")
            attributes = {name: value for name, value in zip(columns, row, strict=True) if value and name != ID_FIELD}
            yield line, pb.Recipient(anonymous_id=anonymous_id, attributes=attributes)

    # --- JSON lines ------------------------------------------------------------------------------------------

    def _json_lines(self) -> Iterator[tuple[int, pb.Recipient]]:
        for text in self._lines():
            if text.strip():
                yield self.lines_read, self._json_recipient(text, self.lines_read)

    def _json_recipient(self, text: str, line: int) -> pb.Recipient:
        try:
            data = _DECODER.decode(text.rstrip("\r\n"))
        except _RepeatedKey as repeated:
            raise RecipientsError(
                self.source, line, f"field {_name(repeated.key)} is given twice in one object: keep one"
            ) from None
        except json.JSONDecodeError as exc:  # its message names what was expected, never the text
            raise RecipientsError(self.source, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise RecipientsError(self.source, line, "not valid JSON (nested too deeply)") from None
        except ValueError:  # Python's own bound on integers read from text; the message holds no digit of it
            raise RecipientsError(
                self.source, line, f"a number of over {sys.get_int_max_str_digits()} digits: write it as a string"
            ) from None
        if not isinstance(data, dict):
            raise RecipientsError(self.source, line, f"expected a JSON object, got {_json_type(data)}")
        unknown = sorted(str(key) for key in data if key not in (ID_FIELD, ATTRIBUTES_FIELD))
        if unknown:
            raise RecipientsError(
                self.source, line, f"unknown field {_name(unknown[0])}; expected anonymous_id and attributes"
            )
        anonymous_id = data.get(ID_FIELD)
        if anonymous_id is None:
            raise RecipientsError(self.source, line, "anonymous_id is missing")
        if isinstance(anonymous_id, int) and not isinstance(anonymous_id, bool):
            anonymous_id = str(anonymous_id)
        if not isinstance(anonymous_id, str):
            raise RecipientsError(self.source, line, f"anonymous_id: expected a string, got {_json_type(anonymous_id)}")
        anonymous_id = anonymous_id.strip()  # as in CSV: no ID holds whitespace
        if not anonymous_id:
            raise RecipientsError(self.source, line, "anonymous_id is empty")
        if not is_text(anonymous_id):
            raise RecipientsError(self.source, line, f"anonymous_id {_SURROGATE}")
        raw = data.get(ATTRIBUTES_FIELD)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RecipientsError(self.source, line, f"attributes: expected a JSON object, got {_json_type(raw)}")
        attributes = {}
        for name, value in raw.items():
            if value is None:
                continue  # as an empty CSV cell: the attribute is left out
            if isinstance(value, dict | list):
                raise RecipientsError(
                    self.source,
                    line,
                    f"attribute {_name(name)}: expected a string or a number, got {_json_type(value)}",
                )
            text = _attribute_text(value)
            if not (is_text(name) and is_text(text)):
                raise RecipientsError(self.source, line, f"attribute {_name(name)} {_SURROGATE}")
            if not name:  # the dispatcher refuses these names, which no template could read
                raise RecipientsError(self.source, line, "an attribute name is empty")
            if not name.isprintable():
                raise RecipientsError(self.source, line, f"attribute {_name(name)} has a control character in its name")
            if name.strip() != name:  # " tier" is no `recipient.tier`: every render would fail
                raise RecipientsError(self.source, line, f"attribute {_name(name)} begins or ends with a space")
            attributes[name] = text
        return pb.Recipient(anonymous_id=anonymous_id, attributes=attributes)


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__("a key is given twice")
        self.key = key


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys differ: of a key given twice Python keeps the last, silently (which ID is it?)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return data


_DECODER = json.JSONDecoder(object_pairs_hook=_object_once)  # made once: json.loads with a hook makes one a line

# JSON may escape half of a UTF-16 pair alone ("\\ud800"): Python reads it, but it is no text that can be sent.
_SURROGATE = "holds an unpaired surrogate escape (\\ud800 to \\udfff without its pair), which is not text"


# What a spreadsheet set to another locale, or a tab-separated export, separates fields by.
_OTHER_SEPARATORS = {";": "semicolons (;)", "\t": "tabs"}


def _other_separator(columns: list[str]) -> str:
    """The separator a header cell holding the anonymous_id column among others was written with, or ""."""
    for cell in columns:
        for separator, name in _OTHER_SEPARATORS.items():
            if separator in cell and ID_FIELD in (part.strip() for part in cell.split(separator)):
                return name
    return ""


def _fields(count: int) -> str:
    return f"{count} field" if count == 1 else f"{count} fields"


def _attribute_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true or false"
    if value is None:
        return "null"
    return "a number"


def _name(name: str) -> str:
    """A field's name for an error, when it looks like one: a file may hold values where names go."""
    return repr(name) if _SHOWN_NAME.fullmatch(name) else "(its name not shown: not a plain name)"


def _csv_problem(exc: csv.Error) -> str:
    # The csv module's messages say what it expected ("unexpected end of data", "line contains NUL"),
    # never the cell's text.
    text = str(exc)
    if "field larger than field limit" in text:  # what a quote left open reads until it finds the next
        return f"a cell of over {csv.field_size_limit()} characters (a quote not closed?)"
    return f"not valid CSV ({text})"
