"""`tokensend events` without a server: its flags, the filters, the JSON line of an event and the resume note."""

from __future__ import annotations

import io
import json

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tokensend.common.v1 import common_pb2
from tokensend.receipts.v1 import receipts_service_pb2 as pb

from cli.commands.events import EventFilter, EventTail, event_to_data
from cli.exits import USAGE
from cli.main import build_parser, main


def parse(*argv: str):
    return build_parser().parse_args(["events", "--workspace", "demo", *argv])


def delivery_event(event_id: str = "1718000000000-0", **fields) -> pb.StreamDeliveryEventsResponse:
    values = dict(
        message_id="m-1",
        campaign_id="spring",
        campaign_instance_id="spring-1",
        anonymous_id="cust-000001",
        channel=common_pb2.CHANNEL_SMS,
        provider=pb.PROVIDER_TWILIO,
        status=pb.DELIVERY_STATUS_DELIVERED,
        occurred_at=Timestamp(seconds=1718000000),
    )
    return pb.StreamDeliveryEventsResponse(event_id=event_id, **{**values, **fields})


def test_the_start_is_the_oldest_kept_an_event_id_or_new_only() -> None:
    assert (parse().after_id, parse().new_only) == (None, False)
    assert parse("--after-id", "1718000000000-3").after_id == "1718000000000-3"
    assert parse("--after-id", "1718000000000").after_id == "1718000000000-0"  # as Redis reads it
    assert parse("--new-only").new_only


def test_statuses_repeat_or_come_in_lists_by_any_spelling() -> None:
    args = parse("--status", "bounced,FAILED", "--status", "DELIVERY_STATUS_OPENED")
    assert EventFilter.from_args(args).statuses == {
        pb.DELIVERY_STATUS_BOUNCED,
        pb.DELIVERY_STATUS_FAILED,
        pb.DELIVERY_STATUS_OPENED,
    }


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--workspace", "no spaces"], "--workspace"),
        (["--workspace", ""], "--workspace"),
        (["--campaign", "spring/2"], "--campaign"),
        (["--instance", "-lead"], "--instance"),
        (["--after-id", "yesterday"], "--after-id"),
        (["--after-id", "1-18446744073709551616"], "--after-id"),  # past Redis's 64 bits
        (["--after-id", "1-0", "--new-only"], "--new-only"),
        (["--status", "lost"], "--status"),
        (["--status", ","], "--status"),
        (["--limit", "0"], "--limit"),
        (["--idle-seconds", "0"], "--idle-seconds"),
        (["--follow"], "--follow"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_it(argv: list[str], named: str, capsys) -> None:
    assert main(["events", "--workspace", "demo", *argv]) == USAGE
    assert named in capsys.readouterr().err


def test_the_workspace_is_required(capsys) -> None:
    assert main(["events"]) == USAGE
    assert "--workspace" in capsys.readouterr().err


def test_an_event_is_every_field_by_its_proto_name_in_the_protos_order() -> None:
    data = event_to_data(delivery_event())
    assert list(data) == [field.name for field in pb.StreamDeliveryEventsResponse.DESCRIPTOR.fields]
    assert data["channel"] == "CHANNEL_SMS" and data["provider"] == "PROVIDER_TWILIO"
    assert data["status"] == "DELIVERY_STATUS_DELIVERED"
    assert data["reason_code"] == ""  # present though empty, as in every line
    assert data["occurred_at"] == "2024-06-10T06:13:20Z"


def test_filters_take_every_condition_given() -> None:
    event = delivery_event()
    assert EventFilter(None, None, set()).passes(event)
    assert EventFilter("spring", "spring-1", {pb.DELIVERY_STATUS_DELIVERED}).passes(event)
    assert not EventFilter("autumn", None, set()).passes(event)
    assert not EventFilter(None, "spring-2", set()).passes(event)
    assert not EventFilter(None, None, {pb.DELIVERY_STATUS_FAILED}).passes(event)


def test_the_resume_id_is_the_last_event_received_even_one_filtered_out() -> None:
    out = io.StringIO()
    tail = EventTail("demo", "", EventFilter("spring", None, set()), out, None)
    assert tail.progress_note() == "0 event(s) written of 0 received; no event received, nothing to resume from"
    tail._take(delivery_event("1-0"))
    tail._take(delivery_event("2-0", campaign_id="autumn"))
    assert [json.loads(line)["event_id"] for line in out.getvalue().splitlines()] == ["1-0"]
    assert tail.progress_note() == "1 event(s) written of 2 received; resume with --after-id 2-0"


def test_with_nothing_received_the_resume_id_is_where_the_run_started_or_what_the_server_named() -> None:
    started_after = EventTail("demo", "5-0", EventFilter(None, None, set()), io.StringIO(), None)
    assert started_after.progress_note() == "0 event(s) written; resume with --after-id 5-0"
    new_only = EventTail("demo", "$", EventFilter(None, None, set()), io.StringIO(), None)
    assert new_only.resume_id() == ""
    assert new_only.resume_id("9-1") == "9-1"
    new_only.opened_after = "7-0"  # where the service said the stream began
    assert new_only.progress_note() == "0 event(s) written; resume with --after-id 7-0"
    from_oldest = EventTail("demo", "", EventFilter(None, None, set()), io.StringIO(), None)
    from_oldest.opened_after = "0-0"  # the oldest kept: nothing to resume from
    assert from_oldest.resume_id() == ""


def test_an_open_quiet_stream_ended_by_the_timeout_says_so_and_one_from_the_oldest_that_got_nothing_says_why() -> None:
    tail = EventTail("demo", "", EventFilter(None, None, set()), io.StringIO(), None)
    tail.opened_after, tail.quiet_end = "0-0", "--timeout of 3s reached"
    assert tail.progress_note() == (
        "--timeout of 3s reached; 0 event(s) written; workspace 'demo' has no events kept (is --workspace right?)"
    )
    tail._take(delivery_event("4-0"))
    assert tail.progress_note() == "--timeout of 3s reached; 1 event(s) written; resume with --after-id 4-0"
    idle = EventTail("demo", "", EventFilter(None, None, set()), io.StringIO(), None)
    idle.opened_after, idle.quiet_end = "0-0", "idle"
    assert idle.progress_note() == "0 event(s) written; workspace 'demo' has no events kept (is --workspace right?)"
