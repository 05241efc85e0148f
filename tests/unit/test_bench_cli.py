"""`python -m bench --help` and the load test's help work; options parse as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import build_load_parser, build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [["--help"], ["load", "--help"], ["ab", "--help"]])
def test_help_runs(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m bench" in done.stdout


def test_sections_sizes_and_settings_parse() -> None:
    args = build_parser().parse_args(
        ["--quick", "--only", "sms,resolver", "--sizes", "1000,20_000", "--set", "send_concurrency=128"]
    )
    assert args.quick and args.only == ("sms", "resolver")
    assert args.sizes == (1000, 20_000)
    assert args.settings == [("TOKENSEND_SEND_CONCURRENCY", "128")]


BAD_OPTIONS = [
    (["--only", "nope"], "argument --only: sections are some of"),
    (["--sizes", "0"], "argument --sizes: at least one positive size"),
    (["--set", "novalue"], "argument --set: use NAME=VALUE"),
    (["--batch-size", "0"], "argument --batch-size: must be 1..10000"),
    (["--batch-size", "10001"], "argument --batch-size: must be 1..10000"),
    (["--window", "0"], "argument --window: must be at least 1"),
    (["--overhead-calls", "-3"], "argument --overhead-calls: must be at least 1"),
    (["--tracing-size", "-1"], "argument --tracing-size: must not be negative"),
    (["--batch-size", "many"], "argument --batch-size: expected a whole number, got 'many'"),
    (["--dispatcher-cpus", "0-1"], "argument --dispatcher-cpus: auto, none, or CPU numbers separated by commas"),
]
BAD_LOAD_OPTIONS = [
    (["-c", "0"], "argument -c/--concurrency: must be at least 1"),
    (["-r", "-1"], "argument -r/--rate: must not be negative"),
    (["-z", "0"], "argument -z/--duration: must be more than 0"),
    (["--recipients", "0"], "argument --recipients: must be at least 1"),
    (["--customers", "0"], "argument --customers: must be at least 1"),
    (["--timeout", "0"], "argument --timeout: must be more than 0"),
    (["--timeout", "1e10"], "argument --timeout: must be more than 0 and at most 86400"),  # else every call fails
    (["--connections", "0"], "argument --connections: must be at least 1"),
    (["--dispatchers", "0"], "argument --dispatchers: must be at least 1"),
    (["--dispatcher-cpus", "last"], "argument --dispatcher-cpus: auto, none, or CPU numbers separated by commas"),
    (["-z", "soon"], "argument -z/--duration: expected a number, got 'soon'"),
    (["-z", "inf"], "argument -z/--duration: expected a finite number, got 'inf'"),
    (["-n", "0"], "argument -n/--total: must be at least 1"),
    (["-x", "0"], "argument -x/--max-duration: must be more than 0"),
    (["--skip-first", "-1"], "argument --skip-first: must not be negative"),
    (["--load-schedule", "ramp"], "argument --load-schedule: invalid choice: 'ramp'"),
    (["--load-start", "0"], "argument --load-start: must be more than 0"),
    (["--load-end", "-5"], "argument --load-end: must be more than 0"),
    (["--load-step", "nan"], "argument --load-step: expected a finite number, got 'nan'"),
    (["--load-step-duration", "0"], "argument --load-step-duration: must be more than 0"),
    (["--load-max-duration", "5s"], "argument --load-max-duration: expected a number, got '5s'"),
    (["-O", "html"], "argument -O/--format: invalid choice: 'html'"),
]


@pytest.mark.parametrize(
    ("build", "argv", "says"),
    [(build_parser, *case) for case in BAD_OPTIONS] + [(build_load_parser, *case) for case in BAD_LOAD_OPTIONS],
)
def test_bad_options_are_refused_by_name(build, argv, says, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        build().parse_args(argv)
    assert refused.value.code == 2
    assert says in capsys.readouterr().err


def test_unlimited_rate_and_edges_are_accepted() -> None:
    args = build_load_parser().parse_args(["-r", "0", "-z", "0.5", "-c", "1", "--recipients", "1"])
    assert (args.rate, args.duration, args.concurrency, args.recipients) == (0.0, 0.5, 1, 1)
    assert build_parser().parse_args(["--batch-size", "10_000", "--tracing-size", "0"]).batch_size == 10_000


def test_each_dispatcher_is_bound_to_a_cpu_of_its_own_unless_told_otherwise(monkeypatch) -> None:
    from bench import peers

    assert build_parser().parse_args([]).dispatcher_cpus == "auto"
    assert build_load_parser().parse_args(["--dispatcher-cpus", "1,0"]).dispatcher_cpus == "1,0"
    monkeypatch.setattr(peers.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert peers.dispatcher_cpus("auto", 1) == ("2",)
    assert peers.dispatcher_cpus("auto", 4) == ("2", "1", "0", "2")
    assert peers.dispatcher_cpus("none", 2) == ()
    assert peers.dispatcher_cpus("1,0", 3) == ("1", "0", "1")
    assert peers.bound_to(("1", "0"), 1) == {"TOKENSEND_CPU_AFFINITY": "0"}
    assert peers.bound_to((), 0) == {}


STEP = ["load", "--load-schedule", "step", "--load-start", "50", "--load-step-duration", "5"]


def test_a_load_schedule_is_read_from_its_flags() -> None:
    from bench.cli import load_schedule
    from bench.schedule import Schedule

    parser = build_load_parser()
    args = parser.parse_args(STEP[1:] + ["--load-step", "-10", "--load-max-duration", "12"])
    assert load_schedule(parser, args) == Schedule("step", 50, -10, 5, 0.0, 12)
    args = parser.parse_args(["--load-schedule", "line", "--load-start", "5", "--load-step", "2.5", "--load-end", "9"])
    assert load_schedule(parser, args) == Schedule("line", 5, 2.5, 0.0, 9)
    args = parser.parse_args(["-O", "csv", "-o", "calls.csv"])
    assert load_schedule(parser, args) is None and args.rate == 50.0  # const, -r's default
    assert (args.output_format, args.output_path) == ("csv", "calls.csv")


def test_load_options() -> None:
    args = build_load_parser().parse_args(["--target", "127.0.0.1:50052", "-c", "8", "-r", "100", "-z", "5"])
    assert (args.target, args.concurrency, args.rate, args.duration) == ("127.0.0.1:50052", 8, 100.0, 5.0)
    args = build_load_parser().parse_args(["-n", "1_000", "-x", "30", "--skip-first", "50"])
    assert (args.total, args.max_duration, args.skip_first, args.duration) == (1000, 30.0, 50, None)


@pytest.mark.parametrize(("flags", "count_errors"), [([], False), (["--count-errors"], True)])
def test_count_errors_reaches_the_run(monkeypatch, flags: list[str], count_errors: bool) -> None:
    # As ghz, the latencies time the OK calls only unless --count-errors.
    from bench import load
    from bench.cli import load_main

    given = []

    async def run(options: load.LoadOptions) -> dict:
        given.append(options)
        return {"end_reason": "normal", "count": 1, "status_codes": {"OK": 1}}

    monkeypatch.setattr(load, "main_async", run)
    assert load_main(["--target", "127.0.0.1:1", "--workspace", "w", *flags]) == 0
    assert given[0].count_errors is count_errors


async def test_a_load_test_against_a_dispatcher_that_is_not_there_says_so(monkeypatch) -> None:
    from bench import load
    from sandbox.processes import free_port

    monkeypatch.setattr(load, "CONNECT_SECONDS", 0.3)
    target = f"127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as refused:
        await load.main_async(load.LoadOptions(target=target, workspace="acme", duration=1))
    assert str(refused.value) == (
        f"cannot reach a dispatcher at {target} in 0.3 s; is it running? (--target; --tls and --tls-ca-file if it "
        "serves TLS)"
    )


async def test_a_benchmark_without_redis_says_where_it_looked_and_never_the_password() -> None:
    from bench.workload import require_redis
    from sandbox.processes import free_port

    port = free_port()
    with pytest.raises(SystemExit) as refused:
        await require_redis(f"redis://user:s3cr3t@127.0.0.1:{port}/10")
    assert str(refused.value) == (
        f"Redis at 127.0.0.1:{port} does not answer (ConnectionError): start it (`make redis`) or pass --redis-url"
    )


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["load", "--target", "127.0.0.1:1"], "--workspace is required with --target"),
        (
            ["load", "--target", "127.0.0.1:1", "--workspace", "w", "--dispatchers", "2", "--redis-url", "redis://x"],
            "--dispatchers, --redis-url: for the suite started here, not with --target",
        ),
        (["load", "--json", "/nonexistent-dir/x.json"], "--json: cannot write in /nonexistent-dir"),
        (["load", "--recipients", "50", "--customers", "10"], "--recipients (50) must not exceed --customers (10)"),
        (["load", "--redis-url", "notaurl"], "--redis-url: expected redis://host:port/db"),
        (["--redis-url", "notaurl"], "--redis-url: expected redis://host:port/db"),
        (["load", "-n", "100", "-z", "5"], "-n/--total, -z/--duration: one or the other"),
        (["load", "-x", "5"], "-x/--max-duration: caps a -n/--total run"),
        (["load", "-z", "5", "-x", "5"], "-x/--max-duration: caps a -n/--total run"),
        (["load", "-n", "3", "--skip-first", "3"], "--skip-first (3) must be less than -n/--total (3)"),
        (STEP, "--load-step must be non-zero with --load-schedule step"),
        ([*STEP, "--load-step", "0"], "--load-step must be non-zero with --load-schedule step"),
        (
            ["load", "--load-schedule", "line", "--load-start", "5"],
            "--load-step must be non-zero with --load-schedule line",
        ),
        (["load", "--load-schedule", "step", "--load-step", "5"], "--load-start is required with --load-schedule step"),
        (
            ["load", "--load-schedule", "step", "--load-start", "5", "--load-step", "5"],
            "--load-step-duration is required with --load-schedule step",
        ),
        (
            ["load", "--load-schedule", "line", "--load-start", "5", "--load-step", "5", "--load-step-duration", "2"],
            "--load-step-duration: for --load-schedule step (line adds --load-step each second)",
        ),
        (
            ["load", "--load-start", "5", "--load-end", "9"],
            "--load-start, --load-end: for --load-schedule step or line (const keeps -r/--rate throughout)",
        ),
        ([*STEP, "--load-step", "5", "-r", "20"], "-r/--rate: for --load-schedule const (step sets the rate with"),
        (
            [*STEP, "--load-step", "10", "--load-end", "50"],
            "--load-end (50) must be above --load-start (50) with a positive --load-step",
        ),
        (
            [*STEP, "--load-step", "-10", "--load-end", "60"],
            "--load-end (60) must be below --load-start (50) with a negative --load-step",
        ),
        (
            [*STEP, "--load-step", "-10"],
            "--load-step below 0 needs --load-end or --load-max-duration: the rate would fall to 0",
        ),
        (
            [*STEP, "--load-step", "-10", "--load-max-duration", "25"],
            "--load-max-duration (25): the rate falls to 0 by then; give a shorter one or --load-end",
        ),
        (["load", "-O", "csv", "-o", "/nonexistent-dir/calls.csv"], "-o/--output: cannot write in /nonexistent-dir"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2_before_anything_runs(argv, said, capsys) -> None:
    from bench.cli import _main

    with pytest.raises(SystemExit) as stopped:
        _main(argv)
    assert stopped.value.code == 2
    assert said in capsys.readouterr().err


def test_an_output_path_that_cannot_take_the_results_is_refused_before_the_run(tmp_path, capsys) -> None:
    # Found after a run of minutes, it would end in a traceback with the results lost.
    from bench.cli import _main

    nowhere = ["--redis-url", "redis://127.0.0.1:1/0"]  # were the run to start, it would stop at once
    with pytest.raises(SystemExit) as stopped:
        _main(["load", "--json", str(tmp_path), *nowhere])
    assert stopped.value.code == 2
    assert f"--json: {tmp_path} is a directory; name a file" in capsys.readouterr().err
    (tmp_path / "results").write_text("")
    with pytest.raises(SystemExit) as stopped:
        _main(["--results-dir", str(tmp_path / "results"), *nowhere])
    assert stopped.value.code == 2
    assert f"--results-dir: {tmp_path / 'results'} is not a directory" in capsys.readouterr().err
