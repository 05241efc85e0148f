"""The README's configuration reference matches the settings classes, and the docs name every RPC."""

from __future__ import annotations

import re
from pathlib import Path

from tokensend.dispatcher.v1 import dispatcher_service_pb2
from tokensend.receipts.v1 import receipts_service_pb2
from tokensend.resolver.v1 import resolver_service_pb2

from libs.settings_doc import BEGIN, END, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    text = README.read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert table == settings_table(), "regenerate with: .venv/bin/python -m libs.settings_doc"


def test_every_rpc_is_named_in_the_readme_or_docs() -> None:
    text = README.read_text() + "".join(page.read_text() for page in (README.parent / "docs").glob("*.md"))
    named = set(re.findall(r"\w+", text))
    services = [
        service
        for module in (resolver_service_pb2, dispatcher_service_pb2, receipts_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    ]
    missing = [f"{s.name}/{m.name}" for s in services for m in s.methods if m.name not in named]
    assert not missing, f"RPCs the README and docs/ never name: {missing}"
