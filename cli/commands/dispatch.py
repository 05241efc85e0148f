"""`tokensend dispatch`: a campaign sent through DispatchStream from a recipients file.

Also the reference client of DispatchStream. The call is bidirectional: the header goes first,
then parts of at most PART_SIZE recipients read lazily from the file, while the results are read
as they come and written at once. gRPC's sending thread pulls the parts from a generator (the
writer) while this thread reads the results (the reader); a send waits for the one before it, and
the dispatcher reads no more than it is working on, so a file of millions of lines is never in
memory, on either side. The dispatcher stops reading when the results are not read: reading them
concurrently is what keeps the stream going.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import stat
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterator
from typing import IO, Protocol

import grpc
from google.protobuf import json_format
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from cli import flags
from cli.commands.send_test import read_content
from cli.exits import OK, CliError, UsageError, discard_stdout
from cli.flags import HelpFormatter
from cli.recipients import FORMATS, RecipientsError, RecipientsFile, recipients_format
from cli.rpc import DISPATCHER, Connection, RpcFailed, add_client_options

PART_SIZE = 1000
# A part's size on the wire stays well under any server's message limit (gRPC's default is 4 MiB).
PART_BYTES = 1024 * 1024

EPILOG = """\
The recipients file is CSV with a header row (an anonymous_id column; every other
column is an attribute, {{ recipient.NAME }}; an empty cell leaves it out) or JSON
lines ({"anonymous_id": "...", "attributes": {"tier": "gold"}}), by its extension
or --format; '-' reads standard input. Whitespace around an anonymous ID is
dropped (no ID holds any). The content file is send-test's.

Results go out as they arrive, one JSON line per recipient (the DispatchResult's
proto JSON, every field in this order: anonymous_id, message_id, status,
error_code, error_message); the summary goes to stderr. --out is written anew from the first result on: a run
that gets none (the dispatcher not reached) leaves what an earlier run wrote.

The campaign instance (--instance) is the idempotency scope: a recipient is sent
once per instance. It belongs to the campaign that started it: another --campaign
naming it is refused, as instance IDs must be unique within a workspace. If the run
stops (a bad line in the file, the dispatcher shutting down, Redis down, Ctrl-C),
the results received are written and running the same command again with the same
--instance sends only what was not sent: the recipients already sent are answered
DUPLICATE. A bad line stops the reading there: the recipients before it are sent
and their results written, then the command exits 2. The command exits 0 when the
stream completed, even if some recipients failed (their results say so), 1 when it
ended on an error (the results' output closed too, as by '| head': the stream
stops there), 2 for bad input.

examples:
  tokensend dispatch examples/recipients.csv --content examples/content-email.yaml \\
      --workspace demo --campaign welcome --instance welcome-1 --channel email \\
      --connector sendgrid --out results.jsonl
  export-audience | tokensend dispatch - --format jsonl --content sms.yaml \\
      --workspace demo --campaign spring --instance spring-2 --channel sms --connector twilio"""


def frequency_cap(value: str) -> pb.FrequencyCap:
    """`3/86400` → at most 3 messages per 86400 seconds."""
    count, sep, seconds = value.partition("/")
    if not sep or not count.strip().isdigit() or not seconds.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected N/SECONDS (3/86400: 3 messages a day), got {value!r}")
    cap = pb.FrequencyCap(max_messages=int(count), window_seconds=int(seconds))
    if cap.max_messages < 1 or cap.window_seconds < 1:
        raise argparse.ArgumentTypeError("N and SECONDS must be at least 1")
    return cap


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "dispatch",
        help="send a campaign to the recipients in a file (CSV or JSON lines)",
        description="Send a campaign through the dispatcher's DispatchStream to every recipient of a file, "
        "reading it lazily and writing each recipient's result as it arrives.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("recipients", metavar="RECIPIENTS", help="the recipients file (.csv or .jsonl), or - for stdin")
    parser.add_argument("--content", required=True, metavar="FILE", help="YAML with the message content")
    parser.add_argument("--format", choices=FORMATS, help="the recipients' format (default: by the extension)")
    parser.add_argument("--workspace", required=True, metavar="W", help="the workspace ID")
    parser.add_argument("--campaign", required=True, metavar="C", help="the campaign ID")
    parser.add_argument(
        "--instance",
        required=True,
        metavar="I",
        help="this run of the campaign, the idempotency scope: a recipient is sent once per instance, so the "
        "same command run again with the same instance sends only what was not sent (the rest are answered "
        "DUPLICATE); a new instance sends to everyone again",
    )
    parser.add_argument("--channel", required=True, type=flags.channel, help=", ".join(flags.CHANNELS))
    parser.add_argument("--connector", required=True, metavar="ID", help="the connector to send through")
    parser.add_argument("--topic", default="", metavar="T", help="the subscription topic (suppressions for it apply)")
    parser.add_argument(
        "--frequency-cap",
        type=frequency_cap,
        metavar="N/SECONDS",
        help="at most N messages per recipient and channel family in SECONDS (3/86400); default: none",
    )
    parser.add_argument(
        "--out",
        default="-",
        metavar="FILE",
        help="where the results go, JSON lines, replacing the file's content once the first result comes "
        "(default: - for stdout); not the recipients or the content file",
    )
    add_client_options(parser, DISPATCHER, timeout_help="deadline of the whole campaign's stream (default: none)")
    parser.set_defaults(handler=run)


def result_to_data(result: pb.DispatchResult) -> dict[str, object]:
    """A result as proto JSON with the proto's field names, every field present (empty when unset), in the
    proto's order: proto JSON puts the unset ones last, so a failed result's line had another order."""
    data = json_format.MessageToDict(
        result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {field.name: data[field.name] for field in result.DESCRIPTOR.fields if field.name in data}


# The summary's rows: each DispatchSummary counter and the status it counts.
SUMMARY_ROWS = (
    ("sent", pb.DISPATCH_STATUS_SENT),
    ("resolve_failed", pb.DISPATCH_STATUS_RESOLVE_FAILED),
    ("send_failed", pb.DISPATCH_STATUS_SEND_FAILED),
    ("capped", pb.DISPATCH_STATUS_CAPPED),
    ("duplicate", pb.DISPATCH_STATUS_DUPLICATE),
    ("suppressed", pb.DISPATCH_STATUS_SUPPRESSED),
)


def summary_of(answered: Counter[int]) -> pb.DispatchSummary:
    """The summary of the results received, for a stream that ended before the dispatcher's own."""
    summary = pb.DispatchSummary(attempted=sum(answered.values()))
    for name, status in SUMMARY_ROWS:
        setattr(summary, name, answered[status])
    return summary


def render_summary(title: str, summary: pb.DispatchSummary) -> list[str]:
    counts = [(name.replace("_", " "), getattr(summary, name)) for name, _ in SUMMARY_ROWS]
    width = len(str(summary.attempted))
    return [f"{title}: {summary.attempted} recipient(s)"] + [f"  {name:<15} {n:>{width}}" for name, n in counts]


class CampaignStream:
    """One DispatchStream call: the writer (a generator gRPC pulls parts from, on its own thread) and
    the reader (`run`, on this one), and what each knows of the other's progress."""

    def __init__(self, header: pb.DispatchStreamRequest.Header, recipients: RecipientsFile, out: IO[str]) -> None:
        self.header = header
        self.recipients = recipients
        self.out = out
        self.answered: Counter[int] = Counter()  # results written, by status
        self.reading = False  # whether the writer has begun reading the file, which it then closes
        self.bad_line: RecipientsError | None = None  # where the writer stopped reading, if it did
        # The file's line of each recipient sent and not yet answered: results come in order, so the
        # first is the line of the next result. It holds the recipients in flight, never the whole file.
        self.unanswered_lines: deque[int] = deque()
        self.out_replaced = False  # whether --out was emptied of what an earlier run wrote there

    def replace_out(self) -> None:
        """Empties --out of an earlier run's results, once this run has its own: a run that reaches no
        dispatcher, or stops before any result, leaves them as they were."""
        if self.out_replaced:
            return
        self.out_replaced = True
        if self.out is not sys.stdout and stat.S_ISREG(os.fstat(self.out.fileno()).st_mode):
            self.out.seek(0)
            self.out.truncate()

    def requests(self) -> Iterator[pb.DispatchStreamRequest]:
        """The writer: the header, then the file in parts. A bad line ends the stream there, normally,
        so that the recipients before it are sent and answered; the error is raised once they are."""
        try:
            yield pb.DispatchStreamRequest(header=self.header)
            part: list[pb.Recipient] = []
            size = 0
            for line, recipient in self._read():
                recipient_size = recipient.ByteSize()
                if recipient_size > PART_BYTES:
                    # The dispatcher would refuse the part as too large without naming the line; no recipient
                    # within its limits on attributes comes near this size.
                    self.bad_line = RecipientsError(
                        self.recipients.source,
                        line,
                        f"the recipient takes {recipient_size} bytes, more than a part of the stream holds "
                        f"({PART_BYTES}): its attributes are too long",
                    )
                    break
                if part and size + recipient_size > PART_BYTES:
                    yield self._part(part)
                    part, size = [], 0
                part.append(recipient)
                size += recipient_size
                self.unanswered_lines.append(line)
                if len(part) == PART_SIZE:  # sent now, not once the next line comes: a pipe may be slow to give it
                    yield self._part(part)
                    part, size = [], 0
            if part:
                yield self._part(part)
        finally:
            # Here, on gRPC's thread, when the file is read or the call has ended: never under a read.
            self.recipients.close()

    def _part(self, part: list[pb.Recipient]) -> pb.DispatchStreamRequest:
        return pb.DispatchStreamRequest(recipients=pb.DispatchStreamRequest.Recipients(recipients=part))

    def _read(self) -> Iterator[tuple[int, pb.Recipient]]:
        self.reading = True
        try:
            yield from self.recipients
        except RecipientsError as error:
            self.bad_line = error
        except OSError as exc:
            line = self.recipients.lines_read + 1
            self.bad_line = RecipientsError(self.recipients.source, line, f"cannot read: {exc.strerror}")
        except ValueError:
            if not self.recipients.stream.closed:  # not the end of the call: the reading failed, as with OSError
                line = self.recipients.lines_read + 1
                self.bad_line = RecipientsError(self.recipients.source, line, "cannot be read as a recipient")
            # else closed by `run` as the call ended, before this began reading: nothing is sent any more

    def run(self, connection: Connection, timeout: float | None) -> pb.DispatchSummary | None:
        """The reader: every result written as it arrives; the summary, or None when the stream ended on an
        error (raised, after the results received are written)."""
        stub = connection.stub(pb_grpc.DispatcherServiceStub)
        responses = stub.DispatchStream(self.requests(), timeout=timeout, metadata=connection.options.metadata)
        with interrupt_cancels(responses) as interrupted:
            try:
                summary = None
                for response in responses:
                    self._write(response.results)
                    if response.HasField("summary"):
                        summary = response.summary
            except grpc.RpcError as error:
                if interrupted.is_set():  # the call ended by Ctrl-C: said as such, once the results are written
                    raise KeyboardInterrupt from None
                raise RpcFailed(self._failed(connection, error), error.code()) from None
            finally:
                responses.cancel()  # a no-op once the call has ended
            if interrupted.is_set():
                raise KeyboardInterrupt
            return summary

    def _write(self, results: list[pb.DispatchResult]) -> None:
        if results:
            self.replace_out()
        for result in results:
            self.out.write(json.dumps(result_to_data(result)) + "\n")
            self.answered[result.status] += 1
            if self.unanswered_lines:
                self.unanswered_lines.popleft()
        self.out.flush()  # results are written as they arrive: a run cut short keeps what it was told

    @property
    def answered_total(self) -> int:
        return sum(self.answered.values())

    def _failed(self, connection: Connection, error: grpc.RpcError) -> str:
        lines = [connection.describe_error(error)]
        line = self._refused_line(error)
        if line is not None:
            lines.append(f"  that recipient is {self.recipients.source} line {line}")
        lines.append(self.stopped_note(error.code()))  # type: ignore[attr-defined]
        if self.bad_line is not None:
            lines.append(f"Reading had stopped at a bad line: {self.bad_line.message}")
        return "\n".join(lines)

    def _refused_line(self, error: grpc.RpcError) -> int | None:
        """The file's line of the recipient a refused part names (`recipients.recipients[3]`), when every
        recipient before that part was answered, as the dispatcher says it does."""
        details = error.details() or ""  # type: ignore[attr-defined]
        found = re.search(r"recipients\.recipients\[(\d+)\]", details)
        after = re.search(r"after recipient #(\d+)", details)
        answered_before = int(after.group(1)) if after else 0 if "in the first part" in details else None
        if found is None or answered_before != self.answered_total:
            return None
        index = int(found.group(1))
        return self.unanswered_lines[index] if index < len(self.unanswered_lines) else None

    def stopped_note(self, code: grpc.StatusCode | None = None) -> str:
        """What got a result and what a re-run does; after a refusal that a re-run would meet again
        (`code`: the call's, None when cut short), the cause said above is to be fixed first."""
        rerun = (
            "Running the same command again (same --instance) sends only what was not sent: the recipients "
            "already sent are answered DUPLICATE."
        )
        if code in _REFUSED_AGAIN:
            rerun = (
                "Once what is said above is fixed, running the same command again (same --instance) sends "
                "only what was not sent: the recipients already sent are answered DUPLICATE."
            )
        if not self.answered_total:
            return f"No recipient got a result. {rerun}"
        where = "stdout" if self.out is sys.stdout else self.out.name
        return (
            f"{self.answered_total} recipient(s) got a result (written to {where}); the others read from "
            f"{self.recipients.source} got none. {rerun}"
        )


# Refusals a re-run meets again until the request, the config or the credentials change.
_REFUSED_AGAIN = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


class Cancellable(Protocol):
    def cancel(self) -> object: ...


@contextlib.contextmanager
def interrupt_cancels(call: Cancellable) -> Iterator[threading.Event]:
    """Within, a Ctrl-C cancels `call`, from a thread of its own, and sets the event: the caller raises
    KeyboardInterrupt once the call has ended. Raised as it comes, it could land inside gRPC's own code
    with a lock of the call held, and closing the channel then waited for ever (the command hung
    after Ctrl-C). A second Ctrl-C is raised at once. Only the main thread receives signals: elsewhere
    (the CLI run from a thread) nothing changes."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_interrupt(_signum: int, _frame: object) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        threading.Thread(target=call.cancel, name="cancel-on-interrupt", daemon=True).start()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def open_out(path: str, mode: str = "w") -> IO[str]:
    """`--out`: standard output for -, else the file, written anew ("w") or added to ("a")."""
    if path == "-":
        return sys.stdout
    try:
        return open(path, mode, encoding="utf-8")  # noqa: SIM115 - closed by run()
    except OSError as exc:
        raise UsageError(f"--out: cannot write {path}: {exc.strerror}") from None


def refuse_out_onto_input(args: argparse.Namespace) -> None:
    """--out naming the recipients or the content file would write the results over what is being read."""
    if args.out == "-" or not os.path.exists(args.out):
        return
    for path, what in ((args.recipients, "recipients"), (args.content, "content")):
        try:
            same = path != "-" and os.path.samefile(path, args.out)
        except OSError:
            continue  # a file that cannot be found is named when it is opened
        if same:
            raise UsageError(
                f"--out {args.out} is the {what} file: the results would overwrite it; write them elsewhere"
            )


def run(args: argparse.Namespace) -> int:
    if args.recipients == "-" and args.content == "-":
        raise UsageError("the recipients and the content cannot both be read from standard input (-)")
    header = pb.DispatchStreamRequest.Header(
        workspace_id=args.workspace,
        campaign_id=args.campaign,
        campaign_instance_id=args.instance,
        channel=args.channel,
        connector_id=args.connector,
        content=read_content(args.content),
        topic=args.topic,
    )
    if args.frequency_cap is not None:
        header.frequency_cap.CopyFrom(args.frequency_cap)
    refuse_out_onto_input(args)
    connection = Connection.open(DISPATCHER, args)  # the flags checked before the files are opened
    recipients = RecipientsFile.open(args.recipients, recipients_format(args.recipients, args.format))
    try:
        out = open_out(args.out, "a")  # emptied once results come: a run that gets none keeps the last run's
    except BaseException:
        recipients.close()
        connection.close()
        raise
    stream = CampaignStream(header, recipients, out)
    # A campaign takes as long as it takes: a deadline only when one is asked for.
    timeout = getattr(args, "timeout", None)
    title = f"campaign {args.campaign}, instance {args.instance}"
    try:
        with connection:
            try:
                summary = stream.run(connection, timeout)
            except BrokenPipeError:  # `| head`: the call is cancelled; the recipients still unread are not sent
                discard_stdout()
                raise CliError(
                    "the output of the results was closed (broken pipe) before the campaign ended: the stream "
                    "was stopped, and the results not yet written are lost. Running the same command again (same "
                    "--instance) sends only what was not sent: the recipients already sent are answered DUPLICATE."
                ) from None
        if stream.bad_line is None:
            stream.replace_out()  # the whole file was sent: --out holds this run's results, if none came
    except (CliError, KeyboardInterrupt) as stop:
        if stream.answered_total:
            print("\n".join(render_summary(f"{title}, stopped", summary_of(stream.answered))), file=sys.stderr)
        if isinstance(stop, KeyboardInterrupt):
            print(f"tokensend: {stream.stopped_note()}", file=sys.stderr)
        raise
    finally:
        if out is not sys.stdout:
            out.close()
        if not stream.reading:  # a call that ended before its first part; else the writer closes the file
            recipients.close()
    if summary is None:  # the dispatcher sends one last; counted here all the same if it did not
        summary = summary_of(stream.answered)
    print("\n".join(render_summary(title, summary)), file=sys.stderr)
    if stream.bad_line is not None:
        bad = stream.bad_line
        before = (
            f"the {stream.answered_total} recipient(s) before it were dispatched and their results written; fix "
            "the line and run the same command again (same --instance): those are answered DUPLICATE, not sent again"
            if stream.answered_total
            else "no recipient was sent; fix the line and run the command again"
        )
        raise RecipientsError(bad.source, bad.line, f"{bad.problem}\nstopped reading there: {before}")
    return OK
