"""The load test against a running suite: a fixed rate for a fixed time, every tick a call."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import grpc
import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dpb_grpc

from bench.cli import load_main
from bench.load import LoadOptions, LoadResult, calls_csv, render, run_load
from bench.schedule import Schedule
from tests.integration.peers import make_tls_material

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("rate", "duration", "expected"), [(2.0, 2.0, 4), (8.0, 1.5, 12)])
async def test_a_fixed_rate_makes_every_scheduled_call_and_lasts_its_duration(start_suite, rate, duration, expected):
    suite = await start_suite()
    options = LoadOptions(
        target=f"127.0.0.1:{suite.dispatcher.port}",
        workspace=suite.workspace_id,
        concurrency=4,
        rate=rate,
        duration=duration,
        recipients_per_call=1,
        customers=20,
    )
    result = await run_load(options)
    data = result.to_json(options)
    assert (data["count"], data["not_started"], data["late_ticks"]) == (expected, 0, 0)
    assert data["status_codes"] == {"OK": expected} and data["dispatch_statuses"] == {"SENT": expected}
    assert duration <= data["seconds"] < duration + 1
    assert data["rps"] == pytest.approx(rate, rel=0.35)


class SlowDispatcher(dpb_grpc.DispatcherServiceServicer):
    """Answers each Dispatch after `seconds`, every recipient with `status`."""

    def __init__(self, seconds: float, status: int = dpb.DISPATCH_STATUS_SENT) -> None:
        self.seconds = seconds
        self.status = status

    async def Dispatch(self, request, context):  # noqa: N802 - the RPC's name
        await asyncio.sleep(self.seconds)
        return dpb.DispatchResponse(
            results=[dpb.DispatchResult(anonymous_id=r.anonymous_id, status=self.status) for r in request.recipients]
        )


@pytest.fixture
async def serve_dispatcher():
    servers = []

    async def serve(servicer: SlowDispatcher) -> str:
        server = grpc.aio.server()
        dpb_grpc.add_DispatcherServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield serve
    for server in servers:
        await server.stop(None)


async def test_a_step_schedule_makes_each_steps_calls_and_reports_where_errors_began(serve_dispatcher):
    # ghz's --load-schedule step: 4 calls a second, 4 more every 0.5 s up to 12, for 2 s: 2, 4, 6 and
    # 6 calls, each step's last call due at least 83 ms before the next step. The dispatcher fails
    # every call from the seventh on (the third step's first): the report shows it there.
    class FailsFromTheSeventh(SlowDispatcher):
        async def Dispatch(self, request, context):  # noqa: N802 - the RPC's name
            if int(request.campaign_instance_id.rsplit("-", 1)[1]) >= 6:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "storage unavailable")
            return await super().Dispatch(request, context)

    target = await serve_dispatcher(FailsFromTheSeventh(0.0))
    plan = Schedule("step", start=4, step=4, step_seconds=0.5, end=12)
    options = LoadOptions(
        target=target, workspace="w", concurrency=4, duration=2.0, recipients_per_call=1, schedule=plan
    )
    result = await run_load(options)
    data = result.to_json(options)
    assert (data["count"], data["late_ticks"], data["not_started"]) == (18, 0, 0)
    assert data["load_schedule"]["kind"] == "step" and data["rate"] is None
    steps = data["rate_steps"]
    assert [(s["from_s"], s["to_s"], s["scheduled_rps"]) for s in steps] == [
        (0.0, 0.5, 4.0), (0.5, 1.0, 8.0), (1.0, 1.5, 12.0), (1.5, 2.0, 12.0),
    ]  # fmt: skip
    assert [(s["count"], s["rps"]) for s in steps] == [(2, 4.0), (4, 8.0), (6, 12.0), (6, 12.0)]
    assert [s["error_rate"] for s in steps] == [0.0, 0.0, 1.0, 1.0]
    # As ghz, the latencies time the OK calls only: none in the steps that failed every call.
    assert [s["p50_ms"] is not None for s in steps] == [True, True, False, False]
    assert all(s["start_delay_p99_ms"] is not None for s in steps)
    assert (data["latency_over"], data["latency_ms"]["count"]) == ("ok", 6)
    assert "Rate by step (the calls due in it; calls/s scheduled and achieved):" in render(data)
    rows = calls_csv(result.calls).splitlines()[1:]
    assert len(rows) == 18 and [row.split(",")[2] for row in rows] == ["OK"] * 6 + ["UNAVAILABLE"] * 12


async def test_calls_held_back_by_busy_clients_say_how_long_after_their_tick_they_started(serve_dispatcher):
    # One client, a call every 25 ms, each taking 50 ms: the calls fall further behind their ticks
    # with each one, while each call's own latency stays about 50 ms.
    target = await serve_dispatcher(SlowDispatcher(0.05))
    options = LoadOptions(target=target, workspace="w", concurrency=1, rate=40.0, duration=0.5, recipients_per_call=1)
    result = await run_load(options)
    data = result.to_json(options)
    assert data["late_ticks"] > 0 and data["not_started"] > 0
    delay = data["start_delay_ms"]
    assert delay["count"] == data["count"]
    assert delay["maximum"] > 2 * data["latency_ms"]["p50"]
    text = render(data)
    assert f"Start after the tick (left out of the latencies): p50 {delay['p50']:.2f} ms" in text
    assert f"slowest {delay['maximum']:.2f} ms" in text


async def test_an_answered_call_whose_recipients_failed_counts_in_the_recipient_error_rate(serve_dispatcher):
    target = await serve_dispatcher(SlowDispatcher(0.0, dpb.DISPATCH_STATUS_SEND_FAILED))
    options = LoadOptions(target=target, workspace="w", concurrency=2, rate=20.0, duration=0.3, recipients_per_call=2)
    result = await run_load(options)
    data = result.to_json(options)
    assert data["status_codes"] == {"OK": 6} and data["dispatch_statuses"] == {"SEND_FAILED": 12}
    assert (data["error_rate"], data["recipient_error_rate"]) == (0.0, 1.0)
    assert "Error rate:\t0.00 % of calls, 100.00 % of recipients" in render(data)


def test_a_run_too_short_for_any_call_writes_json_and_no_nan():
    # `-z 0.000001` is accepted, and no call starts in it.
    options = LoadOptions(target="127.0.0.1:1", workspace="w", rate=0.0, duration=1e-6)
    data = LoadResult(seconds=1e-6).to_json(options)
    assert data["count"] == 0 and data["quantiles_ms"]["p99"] is None
    json.dumps(data, allow_nan=False)
    assert "nan" not in render(data)


async def test_a_rate_faster_than_the_client_can_tick_still_stops_on_time_and_makes_calls(serve_dispatcher):
    # `-r 10000000 -z 0.3`: the scheduler cannot keep up; the run still lasts its duration, the clients
    # still get ticks, and every tick is either a call or not started.
    target = await serve_dispatcher(SlowDispatcher(0.0))
    options = LoadOptions(target=target, workspace="w", concurrency=2, rate=1e7, duration=0.3, recipients_per_call=1)
    result = await run_load(options)
    data = result.to_json(options)
    assert data["seconds"] < options.duration + 1
    assert data["count"] > 0 and data["status_codes"] == {"OK": data["count"]}
    assert data["count"] + data["not_started"] == pytest.approx(options.rate * options.duration, abs=2)
    assert data["late_ticks"] <= data["count"] + data["not_started"]


async def test_a_dispatcher_of_ones_own_is_reached_through_tls_with_its_token(tmp_path, capsys):
    """A deployment's dispatcher serves TLS and wants a bearer token: the load test gives both, as the
    CLI does, and never prints the token; without --target the flags are refused."""
    material = make_tls_material(tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(material.ca_pem)

    class WantsToken(SlowDispatcher):
        async def Dispatch(self, request, context):  # noqa: N802 - the RPC's name
            if dict(context.invocation_metadata()).get("authorization") != "Bearer s3cret-load":
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
            return await super().Dispatch(request, context)

    server = grpc.aio.server()
    dpb_grpc.add_DispatcherServiceServicer_to_server(WantsToken(0.0), server)
    credentials = grpc.ssl_server_credentials([(material.key_path.read_bytes(), material.cert_path.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    report = tmp_path / "load.json"
    argv = ["--target", f"localhost:{port}", "--workspace", "w", "-c", "1", "-r", "20", "-z", "0.3"]
    argv += ["--recipients", "1", "--tls-ca-file", str(ca_file), "--token", "s3cret-load", "--json", str(report)]
    try:
        assert await asyncio.to_thread(load_main, argv) == 0
    finally:
        await server.stop(None)
    data = json.loads(report.read_text())
    assert data["status_codes"] == {"OK": data["count"]} and data["count"] >= 3
    # Which code and when: what `python -m bench compare` labels two reports by.
    assert data["kind"] == "load" and data["started_at"] and data["machine"]["commit"] not in ("", "?")
    assert "s3cret-load" not in capsys.readouterr().out + report.read_text()
    with pytest.raises(SystemExit) as refused:
        load_main(["--token", "s3cret-load", "-z", "0.1"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--token: for a dispatcher of your own (--target)" in err and "s3cret-load" not in err


async def test_a_total_of_calls_ends_the_run_when_made_at_a_fixed_rate_and_as_fast_as_the_clients_go(
    serve_dispatcher,
):
    # ghz's -n: the run lasts as long as its calls take, not a duration.
    target = await serve_dispatcher(SlowDispatcher(0.0))
    for rate in (20.0, 0.0):
        options = LoadOptions(target=target, workspace="w", concurrency=3, rate=rate, total=7, recipients_per_call=1)
        result = await run_load(options)
        data = result.to_json(options)
        assert (data["count"], data["status_codes"], data["end_reason"]) == (7, {"OK": 7}, "normal")
        assert (data["total"], data["duration"], data["not_started"]) == (7, None, 0)
        if rate:  # the seventh call is due 6 intervals after the first
            assert 6 / rate <= data["seconds"] < 6 / rate + 1


async def test_a_max_duration_stops_a_total_that_takes_longer(serve_dispatcher):
    # ghz's -x: 100 calls at 20 a second would take 5 s; the run stops at 0.5 s with those made.
    target = await serve_dispatcher(SlowDispatcher(0.0))
    options = LoadOptions(
        target=target, workspace="w", concurrency=2, rate=20.0, total=100, max_duration=0.5, recipients_per_call=1
    )
    result = await run_load(options)
    data = result.to_json(options)
    assert data["count"] == 10 and data["end_reason"] == "timeout"
    assert data["max_duration"] == 0.5 and data["seconds"] < 1.5


async def test_warm_up_calls_are_left_out_of_every_figure(serve_dispatcher):
    # ghz's --skipFirst: the first calls to complete (cold channels, caches) count nowhere in the
    # report, the rate included: it is over the time after them.
    target = await serve_dispatcher(SlowDispatcher(0.0))
    options = LoadOptions(
        target=target, workspace="w", concurrency=1, rate=10.0, total=8, skip_first=3, recipients_per_call=2
    )
    result = await run_load(options)
    data = result.to_json(options)
    assert (data["count"], data["skipped"], data["skip_first"]) == (5, 3, 3)
    assert data["latency_ms"]["count"] == data["start_delay_ms"]["count"] == 5
    assert data["status_codes"] == {"OK": 5} and data["dispatch_statuses"] == {"SENT": 10}
    assert 0.2 <= data["warmup_seconds"] < data["seconds"]
    assert data["rps"] == pytest.approx(5 / (data["seconds"] - data["warmup_seconds"]), rel=0.01)
    assert data["rps"] == pytest.approx(10.0, rel=0.35)  # not 5 calls over the whole 0.7 s
    assert "Warm-up:\t3 calls left out (first to complete" in render(data)


async def test_the_json_holds_the_histogram_the_summary_prints(serve_dispatcher):
    target = await serve_dispatcher(SlowDispatcher(0.0))
    options = LoadOptions(target=target, workspace="w", concurrency=2, rate=40.0, duration=0.3, recipients_per_call=1)
    result = await run_load(options)
    data = json.loads(json.dumps(result.to_json(options)))
    buckets = data["histogram"]
    assert sum(b["count"] for b in buckets) == data["count"] and len(buckets) in (1, 10)
    assert buckets[-1]["upper_ms"] == pytest.approx(data["latency_ms"]["maximum"], abs=0.001)
    text = render(data)
    for bucket in buckets:
        assert f"{bucket['upper_ms']:10.3f} [{bucket['count']}]\t|" in text


async def test_an_interrupted_run_still_prints_and_writes_the_report_of_the_calls_that_completed(
    serve_dispatcher, tmp_path
):
    # Ctrl-C (or SIGTERM) in the middle of a long run: what was measured so far is not lost.
    target = await serve_dispatcher(SlowDispatcher(0.01))
    report = tmp_path / "load.json"
    argv = ["-m", "bench", "load", "--target", target, "--workspace", "w", "-c", "2", "-r", "20", "-z", "60"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, "--recipients", "1", "--json", str(report), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(2.5)  # the interpreter's start, the channel, then some calls
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130, err.decode()
    data = json.loads(report.read_text())
    assert data["end_reason"] == "cancel" and data["count"] > 0 and data["seconds"] < 30
    assert data["status_codes"] == {"OK": data["count"]}
    assert f"Count:\t{data['count']}" in out.decode()
    assert "End reason:\tcancel (interrupted: the calls that completed)" in out.decode()
    assert "interrupted" in err.decode()
