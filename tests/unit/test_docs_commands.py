"""The commands the README, docs/ and examples/ show are commands the CLI and the services take as written:
every `tokensend ...` line parses, every file it names exists, every grpcurl method exists and every
grpcurl `-d` body reads into that method's request message."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from google.protobuf import json_format, symbol_database
from tokensend.dispatcher.v1 import dispatcher_service_pb2
from tokensend.receipts.v1 import receipts_service_pb2
from tokensend.resolver.v1 import resolver_service_pb2

from cli.main import build_parser
from sandbox import pii_api
from sandbox.providers import cli as providers_cli

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SHELL_BLOCKS = ("sh", "bash")
# Where a shown command line ends: a pipe, a redirection, a background `&`.
COMMAND_ENDS = {"&", "|", ">", ">>", "<", "2>", "&&", ";"}


def shell_text(page: Path) -> list[str]:
    """The shell a page shows: its ```sh blocks (others hold output, JSON, diagrams), and an example's
    commented command lines."""
    text = page.read_text()
    if page.suffix == ".md":
        blocks, block, tag = [], None, ""
        for line in text.splitlines():
            fence = line.strip()
            if fence.startswith("```"):
                if block is None:
                    block, tag = [], fence[3:].strip()
                else:
                    if tag in SHELL_BLOCKS:
                        blocks.append("\n".join(block))
                    block = None
            elif block is not None:
                block.append(line)
        return blocks
    shown, going_on = [], False
    for line in (line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#")):
        if going_on or line.startswith("tokensend "):
            shown.append(line)
            going_on = line.endswith("\\")
    return ["\n".join(shown)]


def command_lines(shell: str) -> list[str]:
    """Lines with their `\\` continuations joined; a quote left open goes on to the next line too."""
    lines, pending = [], ""
    for line in shell.splitlines():
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: a JSON body spread over lines
            pending += "\n"
            continue
        lines.append(pending)
        pending = ""
    return lines


def tokensend_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in (*PAGES, *EXAMPLES):
        for shell in shell_text(page):
            for line in command_lines(shell):
                words = shlex.split(line, comments=True)
                if not words or words[0] not in ("tokensend", ".venv/bin/tokensend"):
                    continue
                end = next((i for i, word in enumerate(words) if word in COMMAND_ENDS), len(words))
                found.append((f"{page.relative_to(ROOT)}: {line.strip()}", words[1:end]))
    return found


COMMANDS = tokensend_commands()


def test_the_pages_show_tokensend_commands() -> None:
    shown = {argv[0] for _, argv in COMMANDS}
    assert {"config", "test-pii-api", "stats", "dispatch", "events", "sandbox", "serve", "send-test"} <= shown


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_shown_tokensend_command_parses_and_names_files_that_exist(where: str, argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
        if argv[0] == "sandbox":  # the peers parse their own arguments
            peer = {"pii-api": pii_api._parse_args, "providers": providers_cli._parse_args}[argv[1]]
            peer(args.args)
    except SystemExit as exc:
        pytest.fail(f"{where}: refused (exit {exc.code})")
    missing = [word for word in argv if word.startswith("examples/") and not (ROOT / word).exists()]
    assert not missing, f"{where}: no such file {missing}"


SERVICES = {
    service.full_name: service
    for module in (resolver_service_pb2, dispatcher_service_pb2, receipts_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}
GRPCURL_CALL = re.compile(r"(?:grpcurl|\$G)\b(?P<flags>.*?)\s(?P<method>tokensend\.[\w.]+/\w+)", re.S)


def grpcurl_calls_in(shell: str) -> list[tuple[str, str | None]]:
    """Each grpcurl call's method and `-d` body (None without one)."""
    found = []
    for line in command_lines(shell):
        for call in GRPCURL_CALL.finditer(line):
            words = shlex.split(call["flags"])
            found.append((call["method"], words[words.index("-d") + 1] if "-d" in words else None))
    return found


def grpcurl_calls() -> list[tuple[str, str, str | None]]:
    return [
        (f"{page.relative_to(ROOT)}: {method}", method, body)
        for page in PAGES
        for shell in shell_text(page)
        for method, body in grpcurl_calls_in(shell)
    ]


CALLS = grpcurl_calls()


def test_the_pages_show_grpcurl_calls() -> None:
    assert any(method.endswith("/Dispatch") for _, method, _ in CALLS)


@pytest.mark.parametrize(("where", "method", "body"), CALLS, ids=[where for where, _, _ in CALLS])
def test_every_shown_grpcurl_call_names_a_method_and_a_body_it_takes(where: str, method: str, body: str | None) -> None:
    service_name, _, method_name = method.partition("/")
    service = SERVICES.get(service_name)
    assert service is not None, f"{where}: no service {service_name}"
    rpc = service.methods_by_name.get(method_name)
    assert rpc is not None, f"{where}: {service_name} has no method {method_name}"
    if body is not None:
        request = symbol_database.Default().GetSymbol(rpc.input_type.full_name)()
        try:
            json_format.Parse(body, request)  # strict: a field the message lacks is an error
        except json_format.ParseError as exc:
            pytest.fail(f"{where}: the body does not read as {rpc.input_type.name}: {exc}")


# `SuppressRecipients{workspace_id, channel, topic, anonymous_ids ≤1000, reason}`: a request by its fields.
REQUEST_SKETCH = re.compile(r"`(?P<method>[A-Z]\w+)\{(?P<fields>[^}`]*)\}")
METHODS = {method.name: method for service in SERVICES.values() for method in service.methods}


def request_sketches() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for sketch in REQUEST_SKETCH.finditer(page.read_text()):
            # `config | saved (workspace_id, name, version)`: a oneof's members, a member's own fields left out.
            fields = re.sub(r"\([^)]*\)", "", sketch["fields"])
            names = [re.match(r"\w+", part.strip())[0] for part in re.split(r"[,|]", fields) if part.strip()]
            found.append((f"{page.relative_to(ROOT)}: {sketch['method']}", sketch["method"], names))
    return found


SKETCHES = request_sketches()


def test_the_pages_sketch_requests() -> None:
    assert any(method == "SuppressRecipients" for _, method, _ in SKETCHES)


@pytest.mark.parametrize(("where", "method", "fields"), SKETCHES, ids=[where for where, _, _ in SKETCHES])
def test_every_request_sketched_in_the_docs_has_those_fields(where: str, method: str, fields: list[str]) -> None:
    assert method in METHODS, f"{where}: no method {method}"
    request = METHODS[method].input_type
    unknown = [name for name in fields if name not in request.fields_by_name]
    assert not unknown, f"{where}: {request.name} has no field {unknown}"
