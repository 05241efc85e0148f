"""An option's value that begins with "-" reaches the option's own check, which names the option and says what
it takes: argparse read `--frequency-cap -1/5`, `--limit -1_000` or `--token -abc` as an option and said only
"expected one argument" (a plain `-5` it took, being a negative number). A value left out is still told as such."""

from __future__ import annotations

import pytest

from bench import load
from bench.cli import load_main
from cli.exits import USAGE
from cli.flags import join_dash_values
from cli.main import DASH_VALUE_OPTIONS, build_parser, main
from tests.unit.test_cli_dispatch import dispatch_argv

EVENTS = ["events", "--workspace", "demo", "--addr", "127.0.0.1:1"]


def test_a_negative_frequency_cap_is_refused_by_its_own_check_naming_it(tmp_path, capsys) -> None:
    assert main(dispatch_argv(tmp_path / "audience.csv", "--frequency-cap", "-1/5")) == USAGE
    err = capsys.readouterr().err
    assert "argument --frequency-cap: N and SECONDS must be at least 1" in err
    assert "expected one argument" not in err


@pytest.mark.parametrize(
    ("more", "said"),
    [
        (["--frequency-cap", "-x/5"], "argument --frequency-cap: expected N/SECONDS (3/86400: 3 messages a day)"),
        (["--limit", "-1_000"], "argument --limit: must be at least 1"),
        (["--limit", "-5"], "argument --limit: must be at least 1"),
        (["--idle-seconds", "-1e3"], "argument --idle-seconds: must be more than 0 and at most 86400"),
        (["--timeout", "-inf"], "argument --timeout: expected a finite number, got '-inf'"),
        (["--after-id", "-1-0"], "argument --after-id: expected an event ID such as 1718000000000-0"),
    ],
)
def test_every_value_beginning_with_a_dash_is_told_by_its_option(tmp_path, more: list[str], said: str, capsys) -> None:
    argv = dispatch_argv(tmp_path / "audience.csv", *more) if more[0] == "--frequency-cap" else [*EVENTS, *more]
    assert main(argv) == USAGE
    err = capsys.readouterr().err
    assert said in err and "expected one argument" not in err


def test_a_token_or_a_file_name_that_begins_with_a_dash_is_taken() -> None:
    argv = [*EVENTS, "--token", "-tok3n", "--out", "-events.jsonl"]
    args = build_parser().parse_args(join_dash_values(argv, DASH_VALUE_OPTIONS))
    assert (args.token, args.out) == ("-tok3n", "-events.jsonl")


def test_a_value_left_out_before_the_next_option_is_still_said_to_be_missing(capsys) -> None:
    assert main([*EVENTS, "--limit", "--out", "events.jsonl"]) == USAGE
    assert "argument --limit: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "joined"),
    [
        (["--limit", "-5", "--out", "-"], ["--limit=-5", "--out", "-"]),
        (["-r", "-5", "-z", "1"], ["-r-5", "-z", "1"]),
        (["--limit", "--out", "-x"], ["--limit", "--out=-x"]),
        (["--workspace", "-w", "--limit"], ["--workspace", "-w", "--limit"]),
        (["--", "--limit", "-5"], ["--", "--limit", "-5"]),
    ],
)
def test_only_the_options_named_are_joined_to_their_value(argv: list[str], joined: list[str]) -> None:
    assert join_dash_values(argv, {"--limit", "--out", "-r"}) == joined


def test_the_load_tests_numbers_are_told_by_their_option_and_a_step_down_is_taken(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        load_main(["--target", "127.0.0.1:1", "--workspace", "w", "-r", "-1e3"])
    assert refused.value.code == USAGE
    assert "argument -r/--rate: must not be negative" in capsys.readouterr().err

    given: list[load.LoadOptions] = []

    async def run(options: load.LoadOptions) -> dict:
        given.append(options)
        return {"end_reason": "normal", "count": 1, "status_codes": {"OK": 1}}

    monkeypatch.setattr(load, "main_async", run)
    step_down = ["--load-schedule", "step", "--load-start", "20", "--load-step", "-5e0", "--load-end", "5"]
    assert load_main(["--target", "127.0.0.1:1", "--workspace", "w", *step_down, "--load-step-duration", "1"]) == 0
    assert given[0].schedule is not None and given[0].schedule.step == -5.0
