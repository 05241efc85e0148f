"""`tokensend dispatch`: a campaign sent through DispatchStream from a recipients file.

Also the reference client of DispatchStream. The call is bidirectional: the header goes first,
then parts of at most PART_SIZE recipients read lazily from the file, while the results are read
as they come and written at once. gRPC's sending thread pulls the parts from a generator (the
writer) while this thread reads the results (the reader); a send waits for the one before it, and
the dispatcher reads no more than it is working on, so a file of millions of lines is never in
memory, on either side. The dispatcher stops reading when the results are not read: reading them
concurrently is what keeps the stream going.

A file on disk is read by the writer itself. A pipe (standard input, a FIFO) is read on a thread of its
own, a part ahead at most, so that the writer can send a part partly filled once the producer pauses
(PART_LINGER_SECONDS): the recipients read so far are answered while it waits, not once it goes on.
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
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import IO, Protocol

import grpc
from google.protobuf import json_format
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from cli import flags
from cli.commands.send_test import read_content
from cli.exits import (
    OK,
    STDOUT_CLOSED,
    CliError,
    GuardedOutput,
    OutputFailed,
    UsageError,
    discard_stdout,
    stdout_closed,
)
from cli.flags import HelpFormatter
from cli.recipients import FORMATS, RecipientsError, RecipientsFile, recipients_format
from cli.rpc import DISPATCHER, Connection, RpcFailed, add_client_options

PART_SIZE = 1000
# A part's size on the wire stays well under any server's message limit (gRPC's default is 4 MiB).
PART_BYTES = 1024 * 1024
# From a pipe, a part partly filled is sent once no recipient has come for this long (the dispatcher, too,
# begins a partly filled batch when no next part comes within 50 ms), and at the latest this long after its
# first recipient came, for a producer that writes one ID at a time, slowly.
PART_LINGER_SECONDS = 0.05
PART_MAX_WAIT_SECONDS = 1.0

EPILOG = """\
The recipients file is CSV with a header row (an anonymous_id column; every other
column is an attribute, {{ recipient.NAME }}; an empty cell leaves it out) or JSON
lines ({"anonymous_id": "...", "attributes": {"tier": "gold"}}), by its extension
or --format; '-' reads standard input. Whitespace around an anonymous ID is
dropped (no ID holds any). The content file is send-test's.

The recipients go in parts of at most 1,000. From a pipe ('-', a FIFO), a part
partly filled goes once no recipient has come for 50 ms (and at the latest 1 s
after its first), so the results of what was read come back while the producer
pauses.

Results go out as they arrive, one JSON line per recipient (the DispatchResult's
proto JSON, every field in this order: anonymous_id, message_id, status,
error_code, error_message); the summary goes to stderr. --out is written anew from the first result on: a run
that gets none (the dispatcher not reached) leaves what an earlier run wrote.

The campaign instance (--instance) is the idempotency scope: a recipient is sent
once per instance. It belongs to the campaign that started it: another --campaign
naming it is refused, as instance IDs must be unique within a workspace. If the run
stops (a bad line in the file, the dispatcher shutting down, Redis down, Ctrl-C or SIGTERM),
the results received are written and running the same command again with the same
--instance sends only what was not sent: the recipients already sent are answered
DUPLICATE. A bad line stops the reading there: the recipients before it are sent
and their results written, then the command exits 2. The command exits 0 when the
stream completed, even if some recipients failed (their results say so), 1 when it
ended on an error (the results' output closed too, as by '| head', or failing to be
written, as on a full disk: the stream stops there), 2 for bad input.

examples:
  tokensend dispatch examples/recipients.csv --content examples/content-email.yaml \\
      --workspace demo --campaign welcome --instance welcome-1 --channel email \\
      --connector sendgrid --out results.jsonl
  export-audience | tokensend dispatch - --format jsonl --content sms.yaml \\
      --workspace demo --campaign spring --instance spring-2 --channel sms --connector twilio"""


# Whole numbers in ASCII digits, a sign let through so that -1/60 is told its bound rather than its form.
_CAP = re.compile(r"\s*([+-]?[0-9]+)\s*/\s*([+-]?[0-9]+)\s*")


def frequency_cap(value: str) -> pb.FrequencyCap:
    """`3/86400` → at most 3 messages per 86400 seconds."""
    given = _CAP.fullmatch(value)
    if given is None:
        raise argparse.ArgumentTypeError(f"expected N/SECONDS (3/86400: 3 messages a day), got {value!r}")
    messages, window = int(given[1]), int(given[2])
    if messages < 1 or window < 1:
        raise argparse.ArgumentTypeError("N and SECONDS must be at least 1")
    # The proto's bounds, said here: a number past uint32 failed as "invalid frequency_cap value".
    if messages > MAX_CAP_MESSAGES:
        raise argparse.ArgumentTypeError(f"N must be at most {MAX_CAP_MESSAGES}")
    if window > MAX_CAP_WINDOW_SECONDS:
        raise argparse.ArgumentTypeError(f"SECONDS must be at most {MAX_CAP_WINDOW_SECONDS} (366 days)")
    return pb.FrequencyCap(max_messages=messages, window_seconds=window)


MAX_CAP_MESSAGES = 2**32 - 1  # uint32
MAX_CAP_WINDOW_SECONDS = 31_622_400  # FrequencyCap.window_seconds: 366 days at most


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


# What a feed gives the writer: a recipient and its line, the bad line the reading stopped at, an error no
# check names, or one of the markers: the end of the file, or no recipient within the wait.
Arrival = tuple[int, pb.Recipient] | RecipientsError | Exception
END = object()
QUIET = object()


def may_pause(stream: IO[bytes]) -> bool:
    """Whether reading `stream` may wait on its producer: a pipe, a terminal, a socket. A file on disk, or
    one in memory, gives what it holds at once."""
    try:
        return not stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError):  # no descriptor: in memory
        return False


class RecipientsFeed(Protocol):
    def take(self, due: float | None) -> Arrival | object:
        """The next arrival, or END. QUIET when none comes within PART_LINGER_SECONDS, or by `due` (a
        time.monotonic() time) when one is given: the part partly filled is then sent."""
        ...

    def stop(self) -> None:
        """The call has ended: nothing more is read (from any thread)."""
        ...

    def close(self) -> None:
        """The writer takes no more (from the writer's thread)."""
        ...


class DirectFeed:
    """A file that never waits on a producer, read by the writer itself as it takes each recipient."""

    def __init__(self, arrivals: Iterator[Arrival], on_end: Callable[[], None]) -> None:
        self._arrivals = arrivals
        self._on_end = on_end

    def take(self, due: float | None) -> Arrival | object:
        return next(self._arrivals, END)

    def stop(self) -> None:
        pass  # the writer reads, and closes the file once it ends: closed here, it could be under a read

    def close(self) -> None:
        self._on_end()


class ThreadFeed:
    """A pipe read on a thread of its own, at most a part ahead, while the writer takes what has come: so
    the writer is not held in a read when the producer pauses. The file is closed by that thread.

    The recipients pass through a deque (whose append and popleft are atomic) rather than a queue.Queue,
    whose locks cost more than reading a line: each side signals the other only when it waits, and each
    clears its event before looking again, so that a signal given meanwhile is never missed."""

    # How often a reader that waits for room checks whether the call has ended.
    STOP_CHECK_SECONDS = 0.1

    def __init__(self, arrivals: Iterator[Arrival], on_end: Callable[[], None]) -> None:
        self._arrived: deque[Arrival | object] = deque()
        self._arrival = threading.Event()  # something arrived since the writer found none
        self._room = threading.Event()  # something was taken since the reader found no room
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._read, args=(arrivals, on_end), name="recipients-reader", daemon=True
        )
        self._thread.start()

    def _read(self, arrivals: Iterator[Arrival], on_end: Callable[[], None]) -> None:
        try:
            for arrival in arrivals:
                if not self._put(arrival):
                    return
            self._put(END)
        except Exception as exc:  # given to the writer, which fails the call with it, as if it had read
            self._put(exc)
        finally:
            on_end()

    def _put(self, arrival: Arrival | object) -> bool:
        while len(self._arrived) >= PART_SIZE:
            self._room.clear()
            if len(self._arrived) < PART_SIZE:
                break
            self._room.wait(self.STOP_CHECK_SECONDS)
            if self._stopped.is_set():
                return False
        if self._stopped.is_set():
            return False
        self._arrived.append(arrival)
        if not self._arrival.is_set():
            self._arrival.set()
        return True

    def take(self, due: float | None) -> Arrival | object:
        while True:
            if self._arrived:
                arrival = self._arrived.popleft()
                if not self._room.is_set():
                    self._room.set()
                return arrival
            self._arrival.clear()
            if self._arrived:
                continue
            wait = PART_LINGER_SECONDS if due is None else min(PART_LINGER_SECONDS, due - time.monotonic())
            if (wait <= 0 or not self._arrival.wait(wait)) and not self._arrived:
                return QUIET

    def stop(self) -> None:
        """The reader ends once its read returns (a pipe's may wait for ever: the thread is a daemon)."""
        self._stopped.set()
        self._room.set()

    def close(self) -> None:
        self.stop()


class CampaignStream:
    """One DispatchStream call: the writer (a generator gRPC pulls parts from, on its own thread) and
    the reader (`run`, on this one), and what each knows of the other's progress."""

    def __init__(self, header: pb.DispatchStreamRequest.Header, recipients: RecipientsFile, out: IO[str]) -> None:
        self.header = header
        self.recipients = recipients
        self.out = out
        self.answered: Counter[int] = Counter()  # results written, by status
        self.reading = False  # whether the writer has begun reading the file, which its reader then closes
        self.reading_stopped = False  # whether the call has ended, so that no reading begins or goes on
        self._reading_lock = threading.Lock()
        self._feed: RecipientsFeed | None = None
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
        feed: RecipientsFeed | None = None
        try:
            yield pb.DispatchStreamRequest(header=self.header)
            feed = self._open_feed()
            if feed is None:
                return
            part: list[pb.Recipient] = []
            size = 0
            due = 0.0  # when the part partly filled goes, whatever comes
            while True:
                arrival = feed.take(due if part else None)
                if type(arrival) is not tuple:
                    if arrival is QUIET:  # the producer pauses: what was read goes now
                        if part:
                            yield self._part(part)
                            part, size = [], 0
                        elif self.reading_stopped:  # the call has ended while nothing came
                            return
                        continue
                    if arrival is END:
                        break
                    if isinstance(arrival, RecipientsError):
                        self.bad_line = arrival
                        break
                    raise arrival  # no check names it: the call fails, as it would had it been raised here
                line, recipient = arrival
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
                if not part:
                    due = time.monotonic() + PART_MAX_WAIT_SECONDS
                part.append(recipient)
                size += recipient_size
                self.unanswered_lines.append(line)
                if len(part) == PART_SIZE:  # sent now, not once the next line comes: a pipe may be slow to give it
                    yield self._part(part)
                    part, size = [], 0
            if part:
                yield self._part(part)
        finally:
            if feed is not None:
                feed.close()

    def _open_feed(self) -> RecipientsFeed | None:
        """The file's recipients, read here (a file on disk) or on a thread of their own (a pipe, whose
        producer may pause); None when the call ended before the reading began."""
        with self._reading_lock:
            if self.reading_stopped:
                return None
            self.reading = True
            if may_pause(self.recipients.stream):
                self._feed = ThreadFeed(self._read(), on_end=self.recipients.close)
            else:
                self._feed = DirectFeed(self._read(), on_end=self.recipients.close)
            return self._feed

    def stop_reading(self) -> None:
        """The call has ended: the file is closed when its reading never began, else by its reader, once
        its read (which may wait on a pipe) returns: never under a read."""
        with self._reading_lock:
            self.reading_stopped = True
            feed = self._feed
            if not self.reading:
                self.recipients.close()
        if feed is not None:
            feed.stop()

    def _part(self, part: list[pb.Recipient]) -> pb.DispatchStreamRequest:
        return pb.DispatchStreamRequest(recipients=pb.DispatchStreamRequest.Recipients(recipients=part))

    def _read(self) -> Iterator[Arrival]:
        """The file's recipients, then, if the reading stopped short of its end, the bad line as an error."""
        try:
            yield from self.recipients
        except RecipientsError as error:
            yield error
        except OSError as exc:
            line = self.recipients.lines_read + 1
            yield RecipientsError(self.recipients.source, line, f"cannot read: {exc.strerror}")
        except ValueError:
            if not self.recipients.stream.closed:  # not the end of the call: the reading failed, as with OSError
                line = self.recipients.lines_read + 1
                yield RecipientsError(self.recipients.source, line, "cannot be read as a recipient")
            # else closed as the call ended: nothing is sent any more

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
    """Within, a Ctrl-C (or SIGTERM: `timeout`, a job stopped) cancels `call`, from a thread of its own, and
    sets the event: the caller raises KeyboardInterrupt once the call has ended, having written what came and
    said where to go on from. Raised as it comes, it could land inside gRPC's own code with a lock of the call
    held, and closing the channel then waited for ever (the command hung after Ctrl-C); left to its default,
    SIGTERM ended the command at once, saying nothing. A second one is raised at once. Only the main thread
    receives signals: elsewhere (the CLI run from a thread) nothing changes."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_interrupt(_signum: int, _frame: object) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        threading.Thread(target=call.cancel, name="cancel-on-interrupt", daemon=True).start()

    previous = {sig: signal.signal(sig, on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


RERUN_AFTER_LOST_RESULTS = (
    "Running the same command again (same --instance) sends only what was not sent: the recipients already sent "
    "are answered DUPLICATE."
)


def open_out(path: str, mode: str = "w") -> IO[str]:
    """`--out`: standard output for -, else the file, written anew ("w") or added to ("a"); a write that fails
    (a full disk) raises OutputFailed naming it."""
    if path == "-":
        if stdout_closed():  # refused before anything is sent: the results would have nowhere to go
            raise UsageError(f"--out -: {STDOUT_CLOSED}; give --out FILE")
        return sys.stdout
    try:
        file = open(path, mode, encoding="utf-8")  # noqa: SIM115 - closed by run()
    except OSError as exc:
        raise UsageError(f"--out: cannot write {path}: {exc.strerror}") from None
    return GuardedOutput(file, f"--out {path}")  # type: ignore[return-value]


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
                    f"was stopped, and the results not yet written are lost. {RERUN_AFTER_LOST_RESULTS}"
                ) from None
            except OutputFailed as failed:  # a full disk: the call is cancelled as for a broken pipe
                raise CliError(
                    f"{failed.message}: the stream was stopped, and the results not yet written are lost. "
                    f"{RERUN_AFTER_LOST_RESULTS}"
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
        stream.stop_reading()
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
