"""`tokensend events --workspace W`: a workspace's anonymised delivery events, tailed as JSON lines.

The client of StreamDeliveryEvents for operators. The call streams the whole workspace, oldest
first, then waits for new events for ever: the filters are applied here, and the command ends on
--limit, --idle-seconds, --timeout, Ctrl-C or the server's error. Whatever ends it, stderr says the last
event ID received, for --after-id to go on from there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from types import TracebackType
from typing import IO

import grpc
from google.protobuf import json_format
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from cli.commands.dispatch import Cancellable, interrupt_cancels, open_out
from cli.documents import DocumentError, enum_full_name, enum_short_names
from cli.exits import OK, CliError, OutputFailed
from cli.flags import HelpFormatter
from cli.rpc import RECEIPTS, Connection, RpcFailed, add_client_options, connection_lost, describe_rpc_error
from libs.arguments import number
from libs.errors import InvalidArgument
from libs.store import EVENTS_AFTER_ID_HEADER, check_id, parse_stream_id

STATUSES = enum_short_names(pb.DeliveryStatus.DESCRIPTOR)

EPILOG = """\
Each event is one JSON line, the StreamDeliveryEventsResponse's fields by their
proto names, enums by name, occurred_at in RFC 3339:
  {"event_id": "1718000000000-0", "message_id": "...", "campaign_id": "spring",
   "campaign_instance_id": "spring-1", "anonymous_id": "cust-000001",
   "channel": "CHANNEL_SMS", "provider": "PROVIDER_TWILIO",
   "status": "DELIVERY_STATUS_DELIVERED", "reason_code": "",
   "occurred_at": "2024-06-10T06:13:20Z"}
Events are anonymised by the receipts service: no contact, name or receipt text.

The receipts service streams every event of the workspace; --campaign, --instance
and --status are applied here, so a filtered tail still reads the whole stream.

The stream never ends by itself: the command runs until --limit events are
written, until --idle-seconds pass with no event (caught up and quiet), until
--timeout passes, or until Ctrl-C or SIGTERM (exit 130). Whatever ends it, stderr names the
last event received (written or filtered out), or where a --new-only tail began:
--after-id with that ID goes on from there, and --out appends, so the same file
continues. A --new-only tail whose stream never opened has no such ID: it says
nothing was read and how to go on missing nothing. The command exits 1 when the receipts service ends
the stream: shutting down (UNAVAILABLE, naming the after_id to resume from on
another process), events after --after-id trimmed or expired before they were read,
or an --after-id no event has reached (OUT_OF_RANGE: run again without --after-id to
read from the oldest kept), or
too many streams open (RESOURCE_EXHAUSTED), and when the events cannot be written
(a full disk), naming the last one written to go on after.

examples:
  tokensend events --workspace demo --idle-seconds 5
  tokensend events --workspace demo --new-only --campaign spring --status bounced,failed
  tokensend events --workspace demo --after-id 1718000000000-0 --out events.jsonl"""


def identifier(text: str) -> str:
    """A workspace, campaign or instance ID, by the services' own rule."""
    try:
        return check_id(text, "ID")
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(error.description) from None


def event_id(text: str) -> str:
    position = parse_stream_id(text)
    if not position:
        raise argparse.ArgumentTypeError(f"expected an event ID such as 1718000000000-0 (an event_id), got {text!r}")
    return position


def statuses(text: str) -> list[int]:
    """`bounced,failed` (or DELIVERY_STATUS_BOUNCED ...) → their DeliveryStatus numbers."""
    try:
        names = [enum_full_name(pb.DeliveryStatus.DESCRIPTOR, part) for part in text.split(",") if part.strip()]
    except DocumentError:
        raise argparse.ArgumentTypeError(f"unknown status in {text!r}; expected {', '.join(STATUSES)}") from None
    if not names:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(STATUSES)}")
    return [pb.DeliveryStatus.Value(name) for name in names]


positive_int = number(int, 1)
# No event for this long: caught up. At most a day, as a call's deadline.
idle_seconds = number(float, 0, above=True, high=86400)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "events",
        help="tail a workspace's anonymised delivery events, as JSON lines",
        description="Write a workspace's anonymised delivery events from the receipts service's "
        "StreamDeliveryEvents, one JSON line each, oldest first, then each new one as it comes.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--workspace", required=True, type=identifier, metavar="W", help="the workspace ID")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--after-id",
        type=event_id,
        metavar="ID",
        help="start after this event ID (the last one written by an earlier run); default: the oldest kept",
    )
    start.add_argument("--new-only", action="store_true", help="only events that come after the call")
    filters = parser.add_argument_group("filters (applied here: the whole workspace's stream is read)")
    filters.add_argument("--campaign", type=identifier, metavar="C", help="only this campaign's events")
    filters.add_argument("--instance", type=identifier, metavar="I", help="only this campaign instance's events")
    filters.add_argument(
        "--status",
        type=statuses,
        action="append",
        metavar="S[,S...]",
        help=f"only these statuses; repeat or separate with commas ({', '.join(STATUSES)})",
    )
    ends = parser.add_argument_group("ends (default: Ctrl-C)")
    ends.add_argument("--limit", type=positive_int, metavar="N", help="stop once N events are written, exit 0")
    ends.add_argument(
        "--idle-seconds",
        type=idle_seconds,
        metavar="SECONDS",
        help="stop once the stream has sent no event for SECONDS (caught up and quiet; filtered-out events "
        "count as activity), exit 0",
    )
    parser.add_argument(
        "--out",
        default="-",
        metavar="FILE",
        help="append the JSON lines to FILE (default: - for stdout)",
    )
    add_client_options(
        parser,
        RECEIPTS,
        timeout_help="how long to tail: the command ends then, as on --idle-seconds (default: never); a service "
        "that has not opened the stream by then is an error",
    )
    parser.set_defaults(handler=run)


def event_to_data(event: pb.StreamDeliveryEventsResponse) -> dict[str, object]:
    """Every field by its proto name, in the proto's order, enums by name (empty strings included)."""
    data = json_format.MessageToDict(event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {field.name: data[field.name] for field in event.DESCRIPTOR.fields if field.name in data}


class EventFilter:
    """The client-side filters; an empty one passes every event."""

    def __init__(self, campaign: str | None, instance: str | None, statuses: set[int]) -> None:
        self.campaign = campaign
        self.instance = instance
        self.statuses = statuses

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EventFilter:
        chosen = {status for group in args.status or () for status in group}
        return cls(args.campaign, args.instance, chosen)

    @property
    def empty(self) -> bool:
        return self.campaign is None and self.instance is None and not self.statuses

    def passes(self, event: pb.StreamDeliveryEventsResponse) -> bool:
        return (
            (self.campaign is None or event.campaign_id == self.campaign)
            and (self.instance is None or event.campaign_instance_id == self.instance)
            and (not self.statuses or event.status in self.statuses)
        )


class IdleStop:
    """Cancels the call once it has sent nothing for `seconds`: the stream has caught up and is quiet.
    The call waits for new events for ever, so this is the only way to tell "caught up"."""

    def __init__(self, call: Cancellable, seconds: float | None) -> None:
        self._call = call
        self._seconds = seconds
        self._last = time.monotonic()
        self._ended = threading.Event()
        self.fired = threading.Event()
        self._watch = threading.Thread(target=self._run, name="idle-stop", daemon=True)

    def seen(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        assert self._seconds is not None
        while True:
            left = self._last + self._seconds - time.monotonic()
            if left <= 0:
                self.fired.set()
                self._call.cancel()
                return
            if self._ended.wait(left):
                return

    def __enter__(self) -> IdleStop:
        if self._seconds is not None:
            self._watch.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._ended.set()
        if self._watch.is_alive():
            self._watch.join()


# A new-only tail that ended before its stream opened has no position to go on from.
NEW_ONLY_NOT_BEGUN = (
    "no event was read, and the receipts service had not said where the --new-only tail began (the stream never "
    "opened): --new-only again begins when it runs, missing the events of the time between; to miss none, go on "
    "with --after-id and the last event ID you have, or without it to read every event kept"
)

# Where the receipts service says to resume when it shuts down.
_NAMED_AFTER_ID = re.compile(r"after_id (\d+-\d+)")


class EventTail:
    """One StreamDeliveryEvents call: events filtered and written as they arrive, and where it got to."""

    def __init__(self, workspace: str, start: str, selected: EventFilter, out: IO[str], limit: int | None) -> None:
        self.workspace = workspace
        self.start = start  # the request's after_id: "" the oldest kept, "$" new only, or an event ID
        self.filter = selected
        self.out = out
        self.limit = limit
        self.received = 0
        self.written = 0
        self.last_id = ""  # the last event received, written or filtered out: where to go on from
        self.opened_after = ""  # where the service said the stream reads after: "" until it answered
        self.quiet_end = ""  # what ended a stream that was open and quiet: --idle-seconds or --timeout

    def run(self, connection: Connection, timeout: float | None, idle: float | None) -> None:
        """Until --limit, --idle-seconds, or an error (raised once what was received is written)."""
        stub = connection.stub(pb_grpc.ReceiptsServiceStub)
        request = pb.StreamDeliveryEventsRequest(workspace_id=self.workspace, after_id=self.start)
        responses = stub.StreamDeliveryEvents(request, timeout=timeout, metadata=connection.options.metadata)
        with interrupt_cancels(responses) as interrupted, IdleStop(responses, idle) as idle_stop:
            try:
                for event in responses:
                    idle_stop.seen()
                    self._take(event)
                    if self.limit is not None and self.written >= self.limit:
                        return
            except grpc.RpcError as error:
                # The call has ended: its response header, if the service sent one, is at hand.
                self.opened_after = dict(responses.initial_metadata() or ()).get(EVENTS_AFTER_ID_HEADER, "")
                if interrupted.is_set():  # ended by Ctrl-C: said as such, once the events are written
                    raise KeyboardInterrupt from None
                code = error.code()  # type: ignore[attr-defined]
                if idle_stop.fired.is_set() and code == grpc.StatusCode.CANCELLED:
                    self.quiet_end = "idle"
                    return
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.opened_after:
                    # The stream was open: --timeout said how long to tail, not how long to wait for an answer.
                    self.quiet_end = f"--timeout of {timeout:g}s reached"
                    return
                raise RpcFailed(self._failed(connection, error), error.code()) from None  # type: ignore[attr-defined]
            finally:
                responses.cancel()  # a no-op once the call has ended
            if interrupted.is_set():
                raise KeyboardInterrupt

    def _take(self, event: pb.StreamDeliveryEventsResponse) -> None:
        self.received += 1
        if self.filter.passes(event):
            self.out.write(json.dumps(event_to_data(event)) + "\n")
            self.out.flush()  # a tail shows each event as it comes, and one cut short keeps what it was told
            self.written += 1
        self.last_id = event.event_id  # once written: an event whose writing failed is where to resume

    def _failed(self, connection: Connection, error: grpc.RpcError) -> str:
        if (self.received or self.opened_after) and not connection_lost(error):
            # The stream was open: an UNAVAILABLE came from the service (shutting down, its Redis down),
            # though it may be gone by now, and the channel with it.
            options = connection.options
            message = describe_rpc_error(error, RECEIPTS.title, connection.address, options.timeout, answered=True)
        else:
            message = connection.describe_error(error)
        if error.code() == grpc.StatusCode.OUT_OF_RANGE:  # type: ignore[attr-defined]
            # Going on from here would be refused the same way.
            return f"{message}\n{self.counts()}; run again without --after-id to read from the oldest kept"
        found = _NAMED_AFTER_ID.search(error.details() or "")  # type: ignore[attr-defined]
        named = found.group(1) if found else ""
        if not self.resume_id(named) and self.start != "$":  # ended before it began: the same command goes on
            return message
        return f"{message}\n{self.progress_note(named)}"

    def counts(self) -> str:
        counts = f"{self.written} event(s) written"
        if not self.filter.empty:
            counts += f" of {self.received} received"
        return counts

    def resume_id(self, named: str = "") -> str:
        """The ID to pass as --after-id to go on: the last event received, else the one the server named
        or the one this run started after (a new-only run's as the service resolved it; none for the oldest)."""
        opened = self.opened_after if self.opened_after != "0-0" else ""
        return self.last_id or named or opened or (self.start if self.start not in ("", "$") else "")

    def progress_note(self, named: str = "") -> str:
        ended = f"{self.quiet_end}; " if self.quiet_end.startswith("--") else ""
        resume = self.resume_id(named)
        if resume:
            return f"{ended}{self.counts()}; resume with --after-id {resume}"
        if self.start == "$":
            # The stream never opened: the service had not said where a new-only tail begins.
            return f"{ended}{self.counts()}; {NEW_ONLY_NOT_BEGUN}"
        if self.quiet_end and not self.start and not self.received:
            # Read from the oldest kept, the stream open and quiet: nothing is kept (or the ID is mistyped).
            return f"{ended}{self.counts()}; workspace {self.workspace!r} has no events kept (is --workspace right?)"
        return f"{ended}{self.counts()}; no event received, nothing to resume from"


def run(args: argparse.Namespace) -> int:
    start = "$" if args.new_only else args.after_id or ""
    connection = Connection.open(RECEIPTS, args)  # the flags checked before the file is opened
    try:
        out = open_out(args.out, "a")  # a run resumed with --after-id goes on in the same file
    except BaseException:
        connection.close()
        raise
    tail = EventTail(args.workspace, start, EventFilter.from_args(args), out, args.limit)
    # A tail runs as long as it is wanted: a deadline only when one is asked for.
    timeout = getattr(args, "timeout", None)
    try:
        with connection:
            tail.run(connection, timeout, args.idle_seconds)
    except KeyboardInterrupt:
        print(f"tokensend: {tail.progress_note()}", file=sys.stderr)
        raise
    except OutputFailed as failed:  # a full disk: the event whose writing failed is to be read again
        resume = tail.resume_id()
        again = f"resume with --after-id {resume}" if resume else "none was written before it"
        raise CliError(f"{failed.message}; {tail.counts()}; {again} (the output may end in part of a line)") from None
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"tokensend: {tail.progress_note()}", file=sys.stderr)
    return OK
