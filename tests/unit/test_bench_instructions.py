"""`python -m bench instructions`: callgrind's dumps read back, one count per size and server."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import dispatcher_instructions, instructions


def dump(path: Path, total: int) -> None:
    # What callgrind writes: a summary line of 0 when counting was switched on and off, then the totals.
    path.write_text(
        f"version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 0\n\nfn=(1) main\n5 3\ntotals: {total}\n"
    )


def test_dumps_are_read_in_dump_order_past_the_tenth(tmp_path: Path) -> None:
    out = tmp_path / "resolver-this.callgrind"
    out.write_text("totals: 0\n")  # the file written at exit: not a dump
    for n in range(1, 12):
        dump(tmp_path / f"{out.name}.{n}", n * 1000)
    assert instructions.dumped_totals(out) == [n * 1000 for n in range(1, 12)]


def test_report_divides_by_the_calls_and_compares_with_the_bare_server_and_the_other_tree() -> None:
    counts = {
        "bare": [700_000, 2_800_000],
        "this (abc1234)": [1_050_000, 5_600_000],
        "other (def5678)": [1_400_000, 5_600_000],
    }
    rows = instructions.report((1, 100), 1, counts)
    assert "|   1 | this (abc1234) |         1,050,000 |    1.50 |" in rows
    assert "| 100 | other (def5678) |         5,600,000 |    2.00 |" in rows
    assert "|   1 | change, other to this |            -25.0 % | |" in rows
    assert "| 100 | change, other to this |             +0.0 % | |" in rows


def test_it_names_what_is_missing_without_valgrind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instructions.shutil, "which", lambda tool: None)
    with pytest.raises(SystemExit, match="needs valgrind"):
        instructions.main([])


def test_the_dispatcher_report_divides_by_the_emails_and_compares_the_trees() -> None:
    counts = {"this (abc1234)": 600_000_000, "other (def5678)": 750_000_000}
    rows = dispatcher_instructions.report(3000, 500, counts, {"this (abc1234)": 3000, "other (def5678)": 3000})
    assert rows[0].startswith("instructions per Email in the dispatcher, 3,000 Emails via sendgrid in batches of 500")
    assert "| this (abc1234) | 3,000 |            200,000 |" in rows
    assert "| other (def5678) | 3,000 |            250,000 |" in rows
    assert "| change, other to this | |            -20.0 % |" in rows


def test_the_dispatcher_mode_names_what_is_missing_without_valgrind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatcher_instructions.shutil, "which", lambda tool: None)
    with pytest.raises(SystemExit, match="needs valgrind"):
        instructions.main(["--dispatcher"])
