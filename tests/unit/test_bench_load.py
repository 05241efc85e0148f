"""The customers a load run's calls send to; its report per step and its calls as CSV."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb

from bench.cli import main as bench_main
from bench.load import (
    Call,
    LoadOptions,
    LoadResult,
    calls_csv,
    customer_numbers,
    drive_load,
    rate_steps,
    render,
    write_report,
)
from bench.report import main as report_main
from bench.schedule import Schedule
from tests.closed_output import closed_stdout


def sent_to(calls: int, per: int, customers: int) -> list[int]:
    return [number for call in range(calls) for number in customer_numbers(call, per, customers)]


@pytest.mark.parametrize(
    ("customers", "per"), [(1, 1), (2, 1), (10, 1), (10, 3), (10, 5), (10, 9), (10, 10), (7, 4), (20_000, 10)]
)
def test_every_customer_in_turn_within_range(customers: int, per: int) -> None:
    sequence = sent_to(3 * customers, per, customers)
    assert all(1 <= number <= customers for number in sequence)
    # In turn: 1, 2, ..., customers, 1, 2, ... with no gap and no repeat before the wrap.
    assert sequence == [k % customers + 1 for k in range(len(sequence))]
    assert set(sequence) == set(range(1, customers + 1))


def test_calls_wrap_past_the_last_customer() -> None:
    assert customer_numbers(0, 3, 7) == [1, 2, 3]
    assert customer_numbers(2, 3, 7) == [7, 1, 2]
    assert customer_numbers(3, 3, 7) == [3, 4, 5]


def test_more_recipients_than_customers_stay_in_range() -> None:
    assert customer_numbers(0, 5, 2) == [1, 2, 1, 2, 1]
    assert customer_numbers(1, 5, 2) == [2, 1, 2, 1, 2]


def test_each_call_is_a_csv_row_in_the_order_the_calls_started() -> None:
    calls = [
        Call(0.25, 0.0123456, "OK", statuses=Counter(SENT=9, SEND_FAILED=1), delay=0.001),
        Call(0.0, 0.004, "UNAVAILABLE", "storage unavailable, try again", delay=0.002),
        Call(0.5, 0.2, "DEADLINE_EXCEEDED", 'said "late"\nand more'),
    ]
    rows = list(csv.reader(io.StringIO(calls_csv(calls))))
    assert rows == [
        ["start_s", "duration_ms", "status", "error", "SENT", "RESOLVE_FAILED", "SEND_FAILED", "CAPPED",
         "DUPLICATE", "SUPPRESSED"],
        ["0.000000", "4.000", "UNAVAILABLE", "storage unavailable, try again", "0", "0", "0", "0", "0", "0"],
        ["0.250000", "12.346", "OK", "", "9", "0", "1", "0", "0", "0"],
        ["0.500000", "200.000", "DEADLINE_EXCEEDED", 'said "late"\nand more', "0", "0", "0", "0", "0", "0"],
    ]  # fmt: skip
    assert calls_csv([]) == ",".join(rows[0]) + "\n"


def test_the_report_per_step_counts_the_calls_due_in_each() -> None:
    plan = Schedule("step", start=4, step=4, step_seconds=0.5, end=8)
    calls = [
        Call(0.01, 0.010, "OK", delay=0.001),
        Call(0.26, 0.030, "OK", delay=0.003),
        *(Call(0.51 + k / 8, 0.020, "OK" if k % 2 else "UNAVAILABLE", "x", delay=0.002) for k in range(4)),
        Call(1.01, 0.050, "OK"),  # after the run's 1 s: counted in its last step, not dropped
    ]
    steps = rate_steps(calls, plan, until=1.0)
    assert [(s["from_s"], s["to_s"], s["scheduled_rps"]) for s in steps] == [(0.0, 0.5, 4.0), (0.5, 1.0, 8.0)]
    assert [(s["count"], s["rps"], s["error_rate"]) for s in steps] == [(2, 4.0, 0.0), (5, 10.0, 0.4)]
    assert steps[0]["p50_ms"] == 20.0 and steps[0]["start_delay_p99_ms"] == pytest.approx(2.98)
    assert rate_steps([], plan, until=0.0) == []


def test_a_call_started_late_is_counted_in_the_step_its_tick_was_in() -> None:
    plan = Schedule("step", start=4, step=4, step_seconds=0.5, end=8)
    calls = [Call(0.52, 0.010, "OK", delay=0.04), Call(0.6, 0.010, "UNAVAILABLE", "x", delay=0.001)]
    steps = rate_steps(calls, plan, until=1.0)
    assert [(s["count"], s["error_rate"]) for s in steps] == [(1, 0.0), (1, 1.0)]
    assert steps[0]["start_delay_p99_ms"] == pytest.approx(40.0)


def run_of(plan: Schedule | None, **options) -> tuple[LoadOptions, LoadResult]:
    options = LoadOptions(target="127.0.0.1:1", workspace="w", duration=1.0, schedule=plan, **options)
    result = LoadResult(seconds=1.02, calls=[Call(0.1, 0.01, "OK", statuses=Counter(SENT=1))])
    result.codes["OK"] = 1
    return options, result


def test_the_report_says_which_schedule_ran_and_the_rate_of_each_step() -> None:
    options, result = run_of(Schedule("step", start=1, step=1, step_seconds=0.5))
    data = json.loads(json.dumps(result.to_json(options), allow_nan=False))
    assert data["load_schedule"] == {
        "kind": "step", "start": 1, "step": 1, "step_duration": 0.5, "end": None, "max_duration": None,
    }  # fmt: skip
    assert data["rate"] is None
    assert [(s["to_s"], s["scheduled_rps"], s["count"]) for s in data["rate_steps"]] == [(0.5, 1, 1), (1.0, 2, 0)]
    text = render(data)
    assert "Schedule:\tstep, from 1 calls/s, +1 every 0.5 s" in text
    assert "Rate by step (the calls due in it; calls/s scheduled and achieved):" in text
    assert "    0.50 s   1.00 s       2.00       0.00       0   0.00 %          -          -          -" in text
    options, result = run_of(None, rate=20.0)
    data = result.to_json(options)
    assert data["load_schedule"] == {"kind": "const", "rate": 20.0} and "rate_steps" not in data
    assert "Schedule:\tconst, 20 calls/s" in render(data)


def test_csv_on_stdout_leaves_the_summary_to_stderr(capsys, tmp_path) -> None:
    options, result = run_of(None, output_format="csv")
    write_report(result.to_json(options), result, options)
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == ["0.100000,10.000,OK,,1,0,0,0,0,0"]
    assert err.startswith("Summary:")
    # To a file (-o), the summary stays on stdout; --json is written either way.
    options, result = run_of(None, output_format="csv", output_path=str(tmp_path / "calls.csv"))
    options.json_path = str(tmp_path / "load.json")
    write_report(result.to_json(options), result, options)
    out, err = capsys.readouterr()
    assert out.startswith("Summary:") and err == ""
    assert (tmp_path / "calls.csv").read_text().splitlines()[1] == "0.100000,10.000,OK,,1,0,0,0,0,0"
    assert json.loads((tmp_path / "load.json").read_text())["count"] == 1


def test_a_run_of_n_calls_reports_its_steps_up_to_where_its_schedule_ended() -> None:
    # -n 6 at 4 calls a second, then 8 from 0.5 s: calls due at 0, 0.25, then 0.5 to 0.875 every 0.125 s,
    # the last back at 0.88 s. The second step holds the 4 calls due in it at 8 a second, as a -z run's
    # would; not 4 calls over the 0.38 s until the last reply (10.5 a second).
    plan = Schedule("step", start=4, step=4, step_seconds=0.5, end=12)
    calls = [Call(due + 0.001, 0.004, "OK", delay=0.001) for due in (0.0, 0.25, 0.5, 0.625, 0.75, 0.875)]
    options = LoadOptions(target="127.0.0.1:1", workspace="w", total=6, schedule=plan)
    result = LoadResult(seconds=0.88, calls=calls)
    result.codes["OK"] = 6
    steps = result.to_json(options)["rate_steps"]
    assert [(s["from_s"], s["to_s"], s["count"], s["rps"]) for s in steps] == [(0.0, 0.5, 2, 4.0), (0.5, 1.0, 4, 8.0)]
    # -x stops the schedule at 1 s, as the third step (12 a second) would begin: no row for that step from
    # the calls in flight then, back at 1.05 s (it would read 12 a second set, none made).
    options = LoadOptions(target="127.0.0.1:1", workspace="w", total=100, max_duration=1.0, schedule=plan)
    result = LoadResult(seconds=1.05, calls=calls, end_reason="timeout")
    result.codes["OK"] = 6
    steps = result.to_json(options)["rate_steps"]
    assert [(s["from_s"], s["to_s"], s["count"], s["rps"]) for s in steps] == [(0.0, 0.5, 2, 4.0), (0.5, 1.0, 4, 8.0)]


def test_the_json_says_what_was_sent_and_how_so_that_two_runs_can_be_compared() -> None:
    # The channel, the connector, the channels opened and the deadline move the figures as much as the
    # code does: two reports that differ in them do not compare.
    options, result = run_of(None, family="email", connections=4, timeout=5.0, customers=500)
    data = json.loads(json.dumps(result.to_json(options)))
    assert (data["family"], data["connector"], data["connections"], data["timeout"], data["customers"]) == (
        "email", "sendgrid", 4, 5.0, 500,
    )  # fmt: skip
    options, result = run_of(None, connector="twilio")
    assert (result.to_json(options)["family"], result.to_json(options)["connector"]) == ("sms", "twilio")


def mixed_run(count_errors: bool = False) -> tuple[LoadOptions, LoadResult]:
    """Three OK calls of 10, 20 and 30 ms and three that failed in 0.25 ms (a dispatcher gone), as
    drive_load records them."""
    options = LoadOptions(target="127.0.0.1:1", workspace="w", duration=1.0, count_errors=count_errors)
    result = LoadResult(seconds=1.0)
    for k, seconds in enumerate((0.010, 0.020, 0.030)):
        result.calls.append(Call(k / 6, seconds, "OK", statuses=Counter(SENT=1), delay=0.001))
        result.calls.append(Call(k / 6 + 0.05, 0.00025, "UNAVAILABLE", "failed to connect", delay=0.002))
    result.start_delays = [c.delay for c in result.calls]
    result.codes.update(OK=3, UNAVAILABLE=3)
    result.errors["UNAVAILABLE: failed to connect"] = 3
    result.dispatch_statuses["SENT"] = 3
    return options, result


def test_the_latency_figures_time_the_ok_calls_only_as_ghz_does() -> None:
    # Fast failures would pull every figure down (p10 0.25 ms, the average 10.1 ms): left out.
    options, result = mixed_run()
    data = json.loads(json.dumps(result.to_json(options), allow_nan=False))
    assert data["latency_over"] == "ok"
    latency = data["latency_ms"]
    assert (latency["count"], latency["minimum"], latency["mean"], latency["p50"], latency["maximum"]) == (
        3, 10.0, 20.0, 20.0, 30.0,
    )  # fmt: skip
    assert data["quantiles_ms"]["p10"] == 12.0
    assert sum(b["count"] for b in data["histogram"]) == 3 and data["histogram"][0]["upper_ms"] == 12.0
    # What is not a latency still counts every call.
    assert (data["count"], data["error_rate"], data["rps"], data["start_delay_ms"]["count"]) == (6, 0.5, 6.0, 6)
    assert data["errors"] == {"UNAVAILABLE: failed to connect": 3}
    text = render(data)
    assert "Latency over:\tthe 3 OK calls; 3 failed left out (--count-errors times them too)" in text
    assert "Fastest:\t10.00 ms" in text and "10 % in 12.00 ms" in text


def test_count_errors_times_the_failed_calls_too() -> None:
    options, result = mixed_run(count_errors=True)
    data = result.to_json(options)
    assert data["latency_over"] == "all"
    latency = data["latency_ms"]
    assert (latency["count"], latency["minimum"], latency["maximum"]) == (6, 0.25, 30.0)
    assert latency["mean"] == pytest.approx(10.125) and latency["p50"] == pytest.approx(5.125)
    assert sum(b["count"] for b in data["histogram"]) == 6
    assert "Latency over:\tall 6 calls, failed ones included (--count-errors)" in render(data)


def test_a_run_with_no_ok_call_says_there_is_no_latency_rather_than_printing_zeros() -> None:
    options, result = mixed_run()
    result.calls = [c for c in result.calls if c.code != "OK"]
    result.codes, result.dispatch_statuses = Counter(UNAVAILABLE=3), Counter()
    data = json.loads(json.dumps(result.to_json(options), allow_nan=False))
    assert data["latency_ms"]["count"] == 0 and data["latency_ms"]["p50"] is None
    assert set(data["quantiles_ms"].values()) == {None} and data["histogram"] == []
    text = render(data)
    assert "Latency over:\tnone: no call was OK (--count-errors times the failed ones)" in text
    assert text.count("  none: no call was OK") == 2  # the histogram and the distribution
    assert " % in " not in text and "0.00 ms" not in text
    assert "Fastest:\t-" in text
    # A run in which no call completed says that instead.
    assert "Latency over:\tnone: no call completed" in render(LoadResult(seconds=1.0).to_json(options))


def test_each_steps_latencies_time_its_ok_calls_only() -> None:
    plan = Schedule("step", start=4, step=4, step_seconds=0.5, end=8)
    calls = [
        Call(0.01, 0.010, "OK", delay=0.001),
        Call(0.2, 0.0002, "UNAVAILABLE", "x", delay=0.001),
        *(Call(0.51 + k / 8, 0.0002, "UNAVAILABLE", "x", delay=0.002) for k in range(3)),
    ]
    steps = rate_steps(calls, plan, until=1.0)
    assert [(s["count"], s["error_rate"], s["p50_ms"], s["p99_ms"]) for s in steps] == [
        (2, 0.5, 10.0, 10.0), (3, 1.0, None, None),
    ]  # fmt: skip
    assert steps[1]["start_delay_p99_ms"] == 2.0  # every call's, as ever
    steps = rate_steps(calls, plan, until=1.0, count_errors=True)
    assert [s["p50_ms"] for s in steps] == [pytest.approx(5.1), 0.2]
    # And through the report, as the flag sets it.
    options = LoadOptions(target="127.0.0.1:1", workspace="w", duration=1.0, schedule=plan)
    result = LoadResult(seconds=1.0, calls=calls)
    result.codes.update(OK=1, UNAVAILABLE=4)
    assert [s["p50_ms"] for s in result.to_json(options)["rate_steps"]] == [10.0, None]
    options.count_errors = True
    assert [s["p50_ms"] for s in result.to_json(options)["rate_steps"]] == [pytest.approx(5.1), 0.2]


def test_a_load_report_read_back_prints_the_summary_it_printed(capsys, tmp_path) -> None:
    from bench import report

    options, result = run_of(None, rate=20.0)
    options.json_path = str(tmp_path / "load.json")
    write_report(result.to_json(options), result, options)
    printed = capsys.readouterr().out
    assert report.main([options.json_path]) == 0
    assert capsys.readouterr().out == printed


class AnsweringChannel:
    """A channel whose Dispatch answers at once, every recipient SENT: a dispatcher with no cost of its own."""

    def unary_unary(self, *args, **kwargs):
        async def dispatch(request, timeout=None, metadata=None):
            return dpb.DispatchResponse(
                results=[dpb.DispatchResult(anonymous_id=r.anonymous_id, status=1) for r in request.recipients]
            )

        return dispatch

    def __getattr__(self, name: str):  # the stub's other methods, never called here
        return lambda *args, **kwargs: None

    async def close(self) -> None:
        pass


async def test_many_clients_start_before_the_clock_and_stop_after_it_so_neither_counts_in_the_run() -> None:
    # Tens of thousands of clients take the machine a while to start and to stop: none of that may count
    # as the dispatcher falling behind (start delays, late ticks, calls not started) or lower the rates.
    options = LoadOptions(
        target="fake", workspace="w", concurrency=50_000, rate=10, duration=0.5, recipients_per_call=1
    )
    result = await drive_load(options, [AnsweringChannel()])  # type: ignore[list-item]
    assert (result.count, result.late, result.not_started) == (5, 0, 0)
    assert max(result.start_delays) < 0.05
    assert result.seconds < 0.55  # nor does stopping them after the run: the rates are over its time


def test_the_json_file_is_written_though_standard_output_was_closed(tmp_path) -> None:
    options, result = run_of(None, output_format="json")
    options.json_path = str(tmp_path / "load.json")
    with closed_stdout(), contextlib.suppress(BrokenPipeError):
        write_report(result.to_json(options), result, options)
    assert json.loads((tmp_path / "load.json").read_text())["count"] == 1


def test_a_report_piped_to_a_reader_that_stops_early_ends_quietly(tmp_path, capsys) -> None:
    options, result = run_of(None)
    report = tmp_path / "load.json"
    report.write_text(json.dumps(result.to_json(options)))
    with closed_stdout():
        assert bench_main(["compare", str(report), str(report)]) == 0
        assert report_main([str(report)]) == 0
    assert "Traceback" not in capsys.readouterr().err
