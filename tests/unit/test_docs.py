"""The README's configuration reference matches the settings classes."""

from __future__ import annotations

from pathlib import Path

from libs.settings_doc import BEGIN, END, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    text = README.read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert table == settings_table(), "regenerate with: .venv/bin/python -m libs.settings_doc"
