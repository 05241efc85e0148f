"""`tokensend events` against the receipts service on port 0: events as JSON lines in order, resumed
after an ID, filtered here, and every way the tail ends (--limit, --idle-seconds, Ctrl-C, the
service shutting down, trimmed events, too many streams).

Receipts come in through the webhooks, as providers send them. The CLI is synchronous; it runs in a
worker thread (or a process, for Ctrl-C) while the servers serve on the test's loop.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from cli.exits import FAILED, INTERRUPTED, OK
from libs.message_map import MessageRecord
from libs.server import GrpcService
from libs.settings import ReceiptsSettings
from libs.store import EVENTS_AFTER_ID_HEADER, parse_stream_id
from services.receipts.server import ReceiptsDeps, build_server
from tests.integration.test_cli_dispatch import ROOT, lines_written, run_cli
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    RunningReceipts,
    leaks,
    put_messages,
    running_receipts,
    sendgrid_event,
    twilio_params,
)

pytestmark = pytest.mark.integration

# Long enough for a busy machine to hand over the events already kept; the stream is caught up after it.
IDLE = "3"
FIELDS = [field.name for field in pb.StreamDeliveryEventsResponse.DESCRIPTOR.fields]
# Canary values in every receipt: none may reach a line the command writes.
PII = Pii.new()


@dataclass
class EventsServer:
    """A receipts gRPC server of its own, beside the harness's: the CLI's, stopped as SIGTERM stops one."""

    service: GrpcService
    address: str
    settings: ReceiptsSettings
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.service.stop(self.settings.grace_seconds)


@asynccontextmanager
async def events_server_for(receipts: RunningReceipts, **updates: object) -> AsyncIterator[EventsServer]:
    settings = receipts.settings.model_copy(update={"grace_seconds": 10.0, **updates})
    service, port = await build_server(settings, ReceiptsDeps.from_settings(settings))
    server = EventsServer(service, f"127.0.0.1:{port}", settings)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def receipts(redis, redis_url) -> AsyncIterator[RunningReceipts]:
    async with running_receipts(redis, redis_url) as running:
        yield running


@pytest.fixture
async def server(receipts) -> AsyncIterator[EventsServer]:
    async with events_server_for(receipts) as running:
        yield running


async def sms_receipts(
    receipts: RunningReceipts, statuses: Sequence[str], campaign: str = "camp-1", instance: str = "inst-1"
) -> list[MessageRecord]:
    """One Twilio status callback per status, each for a message of its own, in order."""
    records = await put_messages(receipts.redis, "twilio", len(statuses), campaign=campaign, instance=instance)
    for record, status in zip(records, statuses, strict=True):
        params = twilio_params(status, PII, error_code="30003" if status == "failed" else "")
        assert (await receipts.post_twilio(params, record.message_id)).status == 200
    return records


def events_argv(server: EventsServer, *more: str) -> list[str]:
    return ["events", "--workspace", WS, "--addr", server.address, *more]


def events_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def cli(*argv: str) -> int:
    return await asyncio.wait_for(run_cli(*argv), 60)


async def test_events_are_json_lines_in_order_and_a_rerun_after_the_last_id_goes_on_in_the_same_file(
    receipts, server, tmp_path, capsys
) -> None:
    records = await sms_receipts(receipts, ["sent", "delivered", "failed"])
    out = tmp_path / "events.jsonl"

    assert await cli(*events_argv(server, "--idle-seconds", IDLE, "--out", str(out))) == OK
    events = events_in(out)
    assert [e["message_id"] for e in events] == [r.message_id for r in records]
    assert [e["status"] for e in events] == [
        "DELIVERY_STATUS_ACCEPTED",
        "DELIVERY_STATUS_DELIVERED",
        "DELIVERY_STATUS_FAILED",
    ]
    first = events[0]
    assert list(first) == FIELDS  # the proto's names, in its order
    assert [first[name] for name in ("campaign_id", "campaign_instance_id", "anonymous_id")] == [
        "camp-1",
        "inst-1",
        "anon-0",
    ]
    assert (first["channel"], first["provider"]) == ("CHANNEL_SMS", "PROVIDER_TWILIO")
    assert [e["reason_code"] for e in events[1:]] == ["", "30003"]
    assert datetime.datetime.fromisoformat(first["occurred_at"]).year >= 2024
    err = capsys.readouterr().err
    assert err == f"tokensend: 3 event(s) written; resume with --after-id {events[-1]['event_id']}\n"

    # Two more; the same command after the ID it named: the file goes on, nothing twice.
    more = await sms_receipts(receipts, ["delivered", "delivered"])
    argv = events_argv(server, "--after-id", events[-1]["event_id"], "--limit", "2", "--out", str(out))
    assert await cli(*argv) == OK
    resumed = events_in(out)
    assert [e["message_id"] for e in resumed] == [r.message_id for r in [*records, *more]]
    assert len({e["event_id"] for e in resumed}) == 5
    last = resumed[-1]["event_id"]
    assert capsys.readouterr().err == f"tokensend: 2 event(s) written; resume with --after-id {last}\n"

    # To stdout, after an earlier ID: only what follows it.
    assert await cli(*events_argv(server, "--after-id", events[0]["event_id"], "--limit", "4")) == OK
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == resumed[1:]
    assert not leaks(PII.needles(), [out.read_bytes(), err.encode()])


async def test_campaign_instance_and_status_filters_pick_the_events_and_the_resume_id_is_the_last_received(
    receipts, server, tmp_path, capsys
) -> None:
    spring = await sms_receipts(receipts, ["delivered", "failed"], campaign="spring", instance="spring-1")
    autumn = await sms_receipts(receipts, ["delivered", "failed"], campaign="autumn", instance="autumn-1")
    autumn_2 = await sms_receipts(receipts, ["sent"], campaign="autumn", instance="autumn-2")

    async def picked(*flags: str) -> list[str]:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        assert await cli(*events_argv(server, *flags, "--out", str(out))) == OK
        return [e["message_id"] for e in events_in(out)]

    assert await picked("--campaign", "autumn", "--limit", "3") == [r.message_id for r in [*autumn, *autumn_2]]
    assert await picked("--instance", "autumn-1", "--limit", "2") == [r.message_id for r in autumn]
    assert await picked("--status", "failed", "--limit", "2") == [spring[1].message_id, autumn[1].message_id]
    assert await picked("--campaign", "autumn", "--status", "delivered,accepted", "--limit", "2") == [
        autumn[0].message_id,
        autumn_2[0].message_id,
    ]
    capsys.readouterr()

    # Caught up with two written: where to go on is the last event received, though it was filtered out.
    flags = ("--campaign", "spring", "--status", "delivered", "--status", "failed", "--idle-seconds", IDLE)
    out = tmp_path / "spring.jsonl"
    assert await cli(*events_argv(server, *flags, "--out", str(out))) == OK
    assert [e["message_id"] for e in events_in(out)] == [r.message_id for r in spring]
    last = await receipts.redis.xrevrange(f"ts:{{{WS}}}:events", count=1)
    assert capsys.readouterr().err == (
        f"tokensend: 2 event(s) written of 5 received; resume with --after-id {last[0][0].decode()}\n"
    )


async def test_new_only_tails_what_comes_after_the_call_until_the_limit(receipts, server, tmp_path) -> None:
    [earlier] = await sms_receipts(receipts, ["delivered"])
    out = tmp_path / "events.jsonl"
    tail = asyncio.create_task(cli(*events_argv(server, "--new-only", "--limit", "2", "--out", str(out))))
    # Receipts keep coming until the tail has two: those before its call began are not for it.
    sent: list[str] = []
    while not tail.done() and len(sent) < 200:
        sent += [r.message_id for r in await sms_receipts(receipts, ["delivered"])]
        await asyncio.sleep(0.1)
    assert await tail == OK
    written = [e["message_id"] for e in events_in(out)]
    assert len(written) == 2 and earlier.message_id not in written
    assert written == sent[sent.index(written[0]) :][:2]  # consecutive, in order


async def test_a_workspace_without_events_waits_and_stops_when_idle_saying_it_has_none(server, capsys) -> None:
    argv = ["events", "--workspace", "ws-quiet", "--addr", server.address, "--idle-seconds", "1"]
    assert await cli(*argv) == OK
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "tokensend: 0 event(s) written; workspace 'ws-quiet' has no events kept (is --workspace right?)\n"
    )


async def test_the_timeout_ends_an_open_tail_as_idleness_does_with_the_id_to_resume_from(
    receipts, server, tmp_path, capsys
) -> None:
    await sms_receipts(receipts, ["sent", "delivered"])
    out = tmp_path / "events.jsonl"
    assert await cli(*events_argv(server, "--timeout", "2", "--out", str(out))) == OK
    events = events_in(out)
    assert len(events) == 2
    assert capsys.readouterr().err == (
        f"tokensend: --timeout of 2s reached; 2 event(s) written; resume with --after-id {events[-1]['event_id']}\n"
    )


async def test_a_service_that_never_opens_the_stream_is_an_error_at_the_timeout(capsys) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections wait in its backlog, never answered
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        assert await cli("events", "--workspace", WS, "--addr", address, "--timeout", "1") == FAILED
    assert capsys.readouterr().err.startswith(
        f"tokensend: the receipts service at {address} did not answer within 1s (DEADLINE_EXCEEDED; --timeout)"
    )


async def test_a_new_only_tail_that_received_nothing_resumes_where_it_began(receipts, server, tmp_path, capsys):
    [before] = await sms_receipts(receipts, ["delivered"])
    assert await cli(*events_argv(server, "--new-only", "--idle-seconds", "1")) == OK
    err = capsys.readouterr().err
    began = err.removeprefix("tokensend: 0 event(s) written; resume with --after-id ").strip()
    assert parse_stream_id(began) == began, err
    # What came between the two runs is the next run's first event: nothing falls between them.
    [meanwhile] = await sms_receipts(receipts, ["failed"])
    out = tmp_path / "events.jsonl"
    assert await cli(*events_argv(server, "--after-id", began, "--idle-seconds", IDLE, "--out", str(out))) == OK
    assert [e["message_id"] for e in events_in(out)] == [meanwhile.message_id]
    assert before.message_id != meanwhile.message_id


async def test_the_stream_names_where_it_reads_after_in_its_response_header(receipts, server) -> None:
    """For grpcurl and other clients: the header comes as the stream opens, before any event."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.ReceiptsServiceStub(channel)
        empty = stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id="ws-quiet", after_id="$"))
        # An empty stream's "$": a position every event to come follows (a later trimming passes it), not "0-0".
        began = dict(await asyncio.wait_for(empty.initial_metadata(), 10))[EVENTS_AFTER_ID_HEADER]
        assert parse_stream_id(began) == began and began != "0-0"
        empty.cancel()
        await sms_receipts(receipts, ["delivered"])
        [(newest, _)] = await receipts.redis.xrevrange(f"ts:{{{WS}}}:events", count=1)
        new_only = stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="$"))
        assert dict(await asyncio.wait_for(new_only.initial_metadata(), 10))[EVENTS_AFTER_ID_HEADER] == newest.decode()
        new_only.cancel()


async def test_ctrl_c_exits_130_with_the_events_written_and_the_id_to_resume_from(receipts, server, tmp_path) -> None:
    await sms_receipts(receipts, ["sent", "delivered", "delivered"])
    out = tmp_path / "events.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        *events_argv(server, "--out", str(out)),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert await lines_written(out, 3)
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == INTERRUPTED
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    events = events_in(out)
    assert len(events) == 3
    err = (await process.stderr.read()).decode()
    assert err == (
        f"tokensend: 3 event(s) written; resume with --after-id {events[-1]['event_id']}\ntokensend: interrupted\n"
    )


async def test_the_service_shutting_down_exits_1_naming_the_id_to_resume_from(receipts, server, tmp_path, capsys):
    await sms_receipts(receipts, ["delivered", "failed"])
    out = tmp_path / "events.jsonl"
    tail = asyncio.create_task(cli(*events_argv(server, "--out", str(out))))
    assert await lines_written(out, 2)
    await server.stop()
    assert await tail == FAILED
    last = events_in(out)[-1]["event_id"]
    err = capsys.readouterr().err
    assert err.startswith(
        f"tokensend: the receipts service at {server.address} answered UNAVAILABLE: the receipts service is "
        f"shutting down: resume on another process with after_id {last}\n"
    )
    assert err.endswith(f"\n2 event(s) written; resume with --after-id {last}\n")


async def test_events_trimmed_after_the_id_exit_1_with_the_services_message(redis, redis_url, capsys) -> None:
    async with running_receipts(redis, redis_url, events_stream_maxlen=10) as receipts:
        first = await put_messages(redis, "sendgrid", 5)
        await receipts.post_sendgrid([sendgrid_event("delivered", PII, message_id=r.message_id) for r in first])
        seen = [i.decode() for i, _ in await redis.xrange(f"ts:{{{WS}}}:events")]
        later = await put_messages(redis, "sendgrid", 300)
        await receipts.post_sendgrid([sendgrid_event("delivered", PII, message_id=r.message_id) for r in later])
        async with events_server_for(receipts) as server:
            assert await cli(*events_argv(server, "--after-id", seen[1])) == FAILED
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"answered OUT_OF_RANGE: events after {seen[1]} may have been trimmed" in captured.err
    assert captured.err.endswith("0 event(s) written; run again without --after-id to read from the oldest kept\n")


async def test_too_many_streams_exit_1_with_the_services_message(receipts, capsys) -> None:
    async with (
        events_server_for(receipts, events_max_streams_per_workspace=1) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        # The workspace's one tail on the process, held by another reader.
        held = pb_grpc.ReceiptsServiceStub(channel).StreamDeliveryEvents(
            pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="$")
        )
        reading = asyncio.ensure_future(held.read())
        await asyncio.sleep(0.3)  # tailing
        assert not reading.done()
        assert await cli(*events_argv(server, "--idle-seconds", IDLE)) == FAILED
        held.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    err = capsys.readouterr().err
    assert err.startswith("tokensend: the receipts service answered RESOURCE_EXHAUSTED: ")
    assert "event streams are open for this workspace" in err
