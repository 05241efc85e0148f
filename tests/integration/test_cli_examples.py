"""The shipped examples/ against the sample peers as their comments start them: what a comment says, works.

The CLI is synchronous; it runs in a worker thread while the servers serve on the test's loop.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.exits import OK
from cli.main import main
from sandbox.pii_api import OAuthClient
from sandbox.providers import start_providers
from sandbox.providers.cli import _parse_args, build_sandbox

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Configs before the content that is sent with them; within each, file order.
ORDER = ("pii-api-", "connector-", "content-")


@dataclass
class Peers:
    examples: Path  # copies of examples/ pointing at the peers below
    resolver: str
    dispatcher: str


@pytest.fixture
async def peers(start_pii_api_server, start_resolver, start_dispatcher, tmp_path, monkeypatch) -> AsyncIterator[Peers]:
    # As the examples' comments start them: `sandbox pii-api --oauth-client-id demo-app --oauth-client-secret
    # demo-secret --api-key demo-api-key` and `sandbox providers` with its defaults.
    api = await start_pii_api_server(oauth=OAuthClient("demo-app", "demo-secret"), api_key="demo-api-key")
    providers = build_sandbox(_parse_args([]))
    runner, port = await start_providers(providers)
    resolver = await start_resolver()
    dispatcher = await start_dispatcher(resolver)
    copies = tmp_path / "examples"
    copies.mkdir()
    for example in EXAMPLES.glob("*.yaml"):
        text = example.read_text().replace("http://localhost:8090", api.base_url)
        (copies / example.name).write_text(text.replace("http://localhost:8095", f"http://127.0.0.1:{port}"))
    for data in EXAMPLES.glob("*.csv"):  # recipients files the commands read
        (copies / data.name).write_bytes(data.read_bytes())
    monkeypatch.setenv("TOKENSEND_RESOLVER_ADDR", f"127.0.0.1:{resolver.port}")
    monkeypatch.setenv("TOKENSEND_DISPATCHER_ADDR", f"127.0.0.1:{dispatcher.port}")
    yield Peers(copies, f"127.0.0.1:{resolver.port}", f"127.0.0.1:{dispatcher.port}")
    await providers.close()
    await runner.cleanup()


def commented_commands(example: Path) -> list[list[str]]:
    """The `tokensend ...` commands in an example's comments: lines of their own (a trailing `\\` continues
    one) and commands quoted in a sentence."""
    commands, pending = [], ""
    for line in example.read_text().splitlines():
        text = line.removeprefix("#").strip() if line.startswith("#") else ""
        commands += [shlex.split(quoted)[1:] for quoted in re.findall(r"`(tokensend [^`]+)`", text)]
        if pending or text.startswith("tokensend "):
            pending += " " + text.removesuffix("\\")
            if not text.endswith("\\"):
                commands.append(shlex.split(pending, comments=True)[1:])
                pending = ""
    # The peers fixture stands in for `tokensend sandbox ...` and `tokensend serve ...`.
    return [argv for argv in commands if argv[0] not in ("sandbox", "serve")]


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_every_command_in_the_examples_comments_runs_as_written(peers, capsys) -> None:
    examples = sorted(
        peers.examples.glob("*.yaml"), key=lambda p: ([p.name.startswith(o) for o in ORDER].index(True), p.name)
    )
    ran = 0
    for example in examples:
        for argv in commented_commands(example):
            argv = [str(peers.examples / a.removeprefix("examples/")) if a.startswith("examples/") else a for a in argv]
            code = await run_cli(*argv)
            captured = capsys.readouterr()
            assert code == OK, f"{example.name}: tokensend {shlex.join(argv)}\n{captured.out}{captured.err}"
            ran += 1
    assert ran >= 8  # config put/get, test-pii-api and send-test, from six files
    assert {p.name for p in examples} == {p.name for p in EXAMPLES.glob("*.yaml")}


async def test_the_twilio_example_makes_the_connectors_its_comment_describes(peers, capsys) -> None:
    example = (peers.examples / "connector-twilio.yaml").read_text()
    comment = "\n".join(line for line in example.splitlines() if line.startswith("#"))
    # "... looks the same with `channel: mms`": that change alone must make a connector the dispatcher saves.
    same = re.findall(r"looks? the same with ([^;.)]*)", comment)
    channels = [c for part in same for c in re.findall(r"`(?:channel: )?(\w+)`", part)]
    assert channels, "the comment names the channels a Twilio connector looks the same for"
    for channel in channels:
        variant = peers.examples / f"twilio-{channel}.yaml"
        variant.write_text(
            example.replace("channel: sms", f"channel: {channel}").replace(
                "connector_id: twilio", f"connector_id: t-{channel}"
            )
        )
        code = await run_cli("config", "put", str(variant))
        captured = capsys.readouterr()
        assert code == OK, f"channel {channel}: {captured.err}"
    # An RCS connector sends through a messaging service, as the comment says.
    assert "`channel: rcs`" in comment and "`sender: MG`" in comment
    rcs = peers.examples / "twilio-rcs.yaml"
    sender = "MG" + "0" * 31 + "1"
    rcs.write_text(
        example.replace("channel: sms", "channel: rcs")
        .replace("connector_id: twilio", "connector_id: t-rcs")
        .replace("sender: +14155550100", f"sender: {sender}")
    )
    assert await run_cli("config", "put", str(rcs)) == OK, capsys.readouterr().err
