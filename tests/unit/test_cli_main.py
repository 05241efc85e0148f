"""The `tokensend` command line without servers: help everywhere, exit codes, flags, delegation."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from cli.commands import sandbox as sandbox_command
from cli.commands import serve
from cli.exits import FAILED, OK, USAGE, UsageError
from cli.main import build_parser, main
from cli.rpc import DISPATCHER, RESOLVER, ClientOptions, describe_rpc_error
from libs.auth import token_digest
from libs.server import SettingFileUnreadable

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


COMMANDS = command_paths(build_parser())


def test_every_command_of_the_brief_exists() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {
        "serve",
        "demo",
        "sandbox pii-api",
        "sandbox providers",
        "config put",
        "config get pii-api",
        "config get oauth",
        "config get connector",
        "config get content-api",
        "config list",
        "config delete",
        "test-pii-api",
        "stats",
        "events",
        "send-test",
        "dispatch",
    } <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "tokensend")
def test_every_command_has_help(path: tuple[str, ...], capsys) -> None:
    assert main([*path, "--help"]) == OK
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    assert len(out.splitlines()) > 3


def test_top_level_help_documents_exit_codes_and_environment(capsys) -> None:
    assert main(["--help"]) == OK
    out = capsys.readouterr().out
    for text in (
        "exit codes:",
        "  0 ",
        "  1 ",
        "  2 ",
        "INVALID_ARGUMENT",
        "TOKENSEND_RESOLVER_ADDR",
        "TOKENSEND_TOKEN",
    ):
        assert text in out


def test_help_names_every_config_kind_and_each_service_by_its_name(capsys) -> None:
    assert main(["--help"]) == OK
    assert "PII API, OAuth, content API and connector configs" in " ".join(capsys.readouterr().out.split())
    assert main(["serve", "--help"]) == OK
    out = " ".join(capsys.readouterr().out.split())
    assert "the receipts service's gRPC port" in out
    assert "receipts's" not in out


def test_module_entry_point_and_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.startswith("tokensend ")
    run = subprocess.run([sys.executable, "-m", "cli", "stats"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == USAGE
    assert "the following arguments are required: CAMPAIGN, --workspace" in run.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["launch"], "invalid choice: 'launch'"),
        (["serve", "everything"], "invalid choice: 'everything'"),
        (["config", "get", "pii-api", "fax", "--workspace", "w"], "unknown channel 'fax'"),
        (["config", "delete", "pii-api", "fax", "--workspace", "w"], "unknown channel 'fax'"),
        (["config", "delete", "oauth", "crm"], "the following arguments are required: --workspace"),
        (["config", "get", "content-api", "loyalty"], "the following arguments are required: --workspace"),
        (["config", "get", "content-api", "loyalty", "--workspace", "w", "--version", "-1"], "--version"),
        (["config", "delete", "webhook", "x", "--workspace", "w"], "invalid choice: 'webhook'"),
        (["config", "list", "--workspace", "w", "--addr", "h:1"], "--addr is ambiguous"),
        (["stats", "c", "--workspace", "w", "--timeout", "0"], "--timeout: must be more than 0"),
        (["test-pii-api", "examples/pii-api-bulk-oauth.yaml", "--id", "x", "--version", "3"], "--version picks"),
        (["stats", "c", "--workspace", "w", "--timeout", "soon"], "expected a number, got 'soon'"),
        (["stats", "c", "--workspace", "w", "--timeout", "nan"], "expected a finite number, got 'nan'"),
        (["stats", "c", "--workspace", "w", "--timeout", "1e300"], "--timeout: must be more than 0 and at most 86400"),
        (
            ["send-test", "--workspace", "w", "--campaign", "c", "--channel", "email", "--connector", "x"]
            + ["--id", "a", "--content", "f.yaml", "--attr", "tier"],
            "argument --attr: expected NAME=VALUE",
        ),
        (["serve", "all", "--resolver-port", "70000"], "must be 0..65535"),
        (
            ["dispatch", "r.csv", "--content", "f.yaml", "--workspace", "w", "--campaign", "c", "--channel", "sms"]
            + ["--connector", "x"],
            "the following arguments are required: --instance",
        ),
    ],
)
def test_usage_errors_exit_2(argv: list[str], expected: str, capsys) -> None:
    assert main(argv) == USAGE
    assert expected in capsys.readouterr().err


def test_config_put_dry_run_checks_the_examples(capsys) -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.yaml") if not p.name.startswith("content-"))
    assert main(["config", "put", "--dry-run", *files]) == OK
    out = capsys.readouterr().out
    assert out.index("ok oauth demo/crm") < out.index("ok pii-api demo/email"), "OAuth configs are saved first"
    assert "ok connector demo/twilio" in out
    assert "nothing sent (--dry-run)" in out


CONTENT_API = """\
kind: content-api
workspace_id: demo
name: loyalty
mode: single
method: get
url: https://crm.example/v1/customers/@anonymous_id
oauth_config_id: crm
field_paths:
  tier: customer.tier
non_sensitive_fields: [tier]
"""


def test_config_put_reads_content_api_configs_after_the_oauth_configs_they_name(tmp_path, capsys) -> None:
    content = tmp_path / "loyalty.yaml"
    content.write_text(CONTENT_API)
    files = [str(content), str(EXAMPLES / "pii-api-bulk-oauth.yaml")]
    assert main(["config", "put", "--dry-run", *files]) == OK
    out = capsys.readouterr().out
    assert (
        out.index("ok oauth demo/crm") < out.index("ok pii-api demo/email") < out.index("ok content-api demo/loyalty")
    )
    (tmp_path / "no-kind.yaml").write_text(CONTENT_API.replace("kind: content-api\n", ""))
    assert main(["config", "put", "content-api", str(tmp_path / "no-kind.yaml"), "--dry-run"]) == OK
    assert capsys.readouterr().out.startswith("ok content-api demo/loyalty")

    twice = tmp_path / "twice.yaml"
    twice.write_text(CONTENT_API + "---\n" + CONTENT_API.replace("tier: customer.tier", "tier: tier"))
    assert main(["config", "put", str(twice), "--dry-run"]) == USAGE
    assert "content-api demo/loyalty is also in" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text(CONTENT_API.replace("field_paths", "field_path"))
    assert main(["config", "put", str(tmp_path / "typo.yaml"), "--dry-run"]) == USAGE
    assert "unknown field 'field_path' in config (did you mean 'field_paths'?)" in capsys.readouterr().err


def test_config_put_names_the_unknown_field_and_exits_2(tmp_path, capsys) -> None:
    bad = tmp_path / "pii-api.yaml"
    bad.write_text((EXAMPLES / "pii-api-single-sms.yaml").read_text().replace("contact_path", "contact_pth"))
    assert main(["config", "put", str(bad), "--addr", "127.0.0.1:1"]) == USAGE  # nothing is sent
    err = capsys.readouterr().err
    assert f"tokensend: {bad}: unknown field 'contact_pth' in config (did you mean 'contact_path'?)" in err


def test_config_put_kind_and_file_handling(tmp_path, capsys) -> None:
    assert main(["config", "put", "pii-api"]) == USAGE
    assert "config put pii-api: name the FILE to read" in capsys.readouterr().err
    connector = str(EXAMPLES / "connector-twilio.yaml")
    assert main(["config", "put", "pii-api", connector, "--dry-run"]) == USAGE
    assert "holds a config of kind 'connector', not 'pii-api'" in capsys.readouterr().err
    assert main(["config", "put", "connector", connector, "--dry-run"]) == OK
    mixed = [str(EXAMPLES / "pii-api-single-sms.yaml"), connector]
    assert main(["config", "put", *mixed, "--addr", "127.0.0.1:1"]) == USAGE
    assert "--addr is ambiguous" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text("kind: oauth\nworkspace_id: other\noauth_config_id: x\n")
    assert main(["config", "put", str(other), "--workspace", "demo", "--dry-run"]) == USAGE
    assert "config.workspace_id is 'other' but --workspace is 'demo'" in capsys.readouterr().err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_service_exits_1_and_says_where(capsys) -> None:
    addr = f"127.0.0.1:{closed_port()}"
    code = main(["stats", "welcome", "--workspace", "demo", "--addr", addr, "--timeout", "5"])
    assert code == FAILED
    err = capsys.readouterr().err
    assert f"cannot reach the receipts service at {addr} (UNAVAILABLE" in err
    assert "Traceback" not in err


class RefusedCall(grpc.RpcError):
    """An INVALID_ARGUMENT carrying google.rpc.BadRequest field violations in its trailing metadata."""

    def __init__(self, details: str, violations: list[tuple[str, str]]) -> None:
        status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=details)
        field_violations = [error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=field_violations))
        self.status = rpc_status.to_status(status)

    def code(self) -> grpc.StatusCode:
        return self.status.code

    def details(self) -> str:
        return self.status.details

    def trailing_metadata(self) -> tuple:
        return self.status.trailing_metadata


def test_a_field_violation_the_details_already_say_is_printed_once() -> None:
    """Our servers' details are the violation itself ("field: description")."""
    error = RefusedCall("config.url: must be an https:// URL", [("config.url", "must be an https:// URL")])
    assert describe_rpc_error(error, "resolver", "h:1", 5) == (
        "the resolver refused it as invalid (INVALID_ARGUMENT): config.url: must be an https:// URL"
    )


def test_field_violations_the_details_do_not_say_are_printed_each_on_its_line() -> None:
    error = RefusedCall(
        "2 fields are invalid: config.url: must be an https:// URL",
        [("config.url", "must be an https:// URL"), ("config.batch_size", "must not be negative")],
    )
    assert describe_rpc_error(error, "resolver", "h:1", 5) == (
        "the resolver refused it as invalid (INVALID_ARGUMENT): 2 fields are invalid: config.url: must be an "
        "https:// URL\n  field config.batch_size: must not be negative"
    )


def test_test_pii_api_needs_a_file_or_a_saved_config(capsys) -> None:
    assert main(["test-pii-api", "--id", "cust-1", "--addr", "127.0.0.1:1"]) == USAGE
    assert "give a FILE, or --workspace and --channel" in capsys.readouterr().err
    sms = str(EXAMPLES / "pii-api-single-sms.yaml")
    assert main(["test-pii-api", sms, "--id", "c", "--channel", "email", "--addr", "127.0.0.1:1"]) == USAGE
    assert "holds no pii-api config for that channel" in capsys.readouterr().err


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_client_options_before_or_after_the_command(monkeypatch) -> None:
    monkeypatch.delenv("TOKENSEND_TOKEN", raising=False)
    before = ClientOptions.from_args(parse(["--timeout", "5", "--token", "t1", "stats", "c", "--workspace", "w"]))
    after = ClientOptions.from_args(parse(["stats", "c", "--workspace", "w", "--timeout", "7"]))
    assert (before.timeout, before.metadata) == (5.0, (("authorization", "Bearer t1"),))
    assert (after.timeout, after.metadata) == (7.0, ())
    both = ClientOptions.from_args(parse(["--timeout", "5", "stats", "c", "--workspace", "w", "--timeout", "9"]))
    assert both.timeout == 9.0, "the option nearest the command wins"
    assert before.credentials is None and after.credentials is None, "plaintext unless asked"


def test_token_and_addresses_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TOKENSEND_TOKEN", "from-env")
    monkeypatch.setenv("TOKENSEND_RESOLVER_ADDR", "resolver.internal:7000")
    monkeypatch.delenv("TOKENSEND_DISPATCHER_ADDR", raising=False)
    args = parse(["config", "get", "oauth", "crm", "--workspace", "w"])
    assert ClientOptions.from_args(args).metadata == (("authorization", "Bearer from-env"),)
    assert RESOLVER.address(args) == "resolver.internal:7000"
    assert DISPATCHER.address(args) == "localhost:50052"
    flagged = parse(["config", "get", "oauth", "crm", "--workspace", "w", "--addr", "h:1", "--token", "flag"])
    assert RESOLVER.address(flagged) == "h:1"
    assert ClientOptions.from_args(flagged).metadata == (("authorization", "Bearer flag"),)


def test_an_empty_token_flag_sends_none_whatever_the_environment_holds(monkeypatch) -> None:
    monkeypatch.setenv("TOKENSEND_TOKEN", "from-env")
    for argv in (["stats", "c", "--workspace", "w", "--token", ""], ["--token=", "stats", "c", "--workspace", "w"]):
        assert ClientOptions.from_args(parse(argv)).metadata == (), argv
    monkeypatch.setenv("TOKENSEND_TOKEN", "")  # an empty variable is no token either
    assert ClientOptions.from_args(parse(["stats", "c", "--workspace", "w"])).metadata == ()


def test_tls_options(tmp_path, capsys) -> None:
    args = parse(["stats", "c", "--workspace", "w", "--tls"])
    assert ClientOptions.from_args(args).credentials is not None
    assert main(["stats", "c", "--workspace", "w", "--tls-ca-file", str(tmp_path / "none.pem")]) == USAGE
    assert "--tls-ca-file: cannot read" in capsys.readouterr().err
    (tmp_path / "c.pem").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    assert main(["stats", "c", "--workspace", "w", "--tls-cert-file", str(tmp_path / "c.pem")]) == USAGE
    assert "--tls-cert-file and --tls-key-file go together" in capsys.readouterr().err
    (tmp_path / "not.pem").write_text("x")
    assert main(["stats", "c", "--workspace", "w", "--tls-ca-file", str(tmp_path / "not.pem")]) == USAGE
    assert f"--tls-ca-file: {tmp_path / 'not.pem'} is not PEM" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["é-token", "tab\there", "two\nlines"])
def test_a_token_grpc_could_not_send_is_a_usage_error(token, capsys) -> None:
    assert main(["stats", "c", "--workspace", "w", "--token", token]) == USAGE
    assert "--token must be printable ASCII on one line" in capsys.readouterr().err


def test_a_token_from_the_environment_that_grpc_could_not_send_names_the_variable(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TOKENSEND_TOKEN", "s3cr3t\n")  # `export TOKENSEND_TOKEN="$(cat token; echo)"`
    assert main(["stats", "c", "--workspace", "w"]) == USAGE
    err = capsys.readouterr().err
    assert "$TOKENSEND_TOKEN must be printable ASCII on one line" in err and "s3cr3t" not in err


def test_serve_usage_errors(monkeypatch, capsys) -> None:
    assert main(["serve", "resolver", "--resolver-port", "1"]) == USAGE
    assert "--resolver-port is for 'serve all'" in capsys.readouterr().err
    monkeypatch.setenv("TOKENSEND_GRPC_PORT", "50051")
    assert main(["serve", "all"]) == USAGE
    assert "TOKENSEND_GRPC_PORT is set, but the three services need three ports" in capsys.readouterr().err
    monkeypatch.delenv("TOKENSEND_GRPC_PORT")
    monkeypatch.delenv("TOKENSEND_SECRET_KEY", raising=False)
    monkeypatch.delenv("TOKENSEND_DEV_MODE", raising=False)
    assert main(["serve", "all"]) == USAGE
    assert "TOKENSEND_SECRET_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("TOKENSEND_REDIS_URL", "redis://x")
    monkeypatch.setenv("TOKENSEND_GRACE_SECONDS", "soon")
    assert main(["serve", "all"]) == USAGE
    assert "invalid settings: TOKENSEND_GRACE_SECONDS" in capsys.readouterr().err


def test_serve_all_shares_one_throwaway_key_in_dev_mode(monkeypatch) -> None:
    from cli.commands.serve import load_settings

    for key in ("TOKENSEND_SECRET_KEY", "TOKENSEND_GRPC_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TOKENSEND_DEV_MODE", "true")
    resolver, dispatcher, receipts = load_settings({"resolver": 1, "dispatcher": 2, "receipts": 3})
    assert resolver.secret_key is not None
    keys = {s.secret_key.get_secret_value() for s in (resolver, dispatcher, receipts)}
    assert len(keys) == 1, "a connector sealed by the dispatcher must open in receipts"
    assert (resolver.grpc_port, dispatcher.grpc_port, receipts.grpc_port) == (1, 2, 3)


def test_serve_one_service_runs_its_main(monkeypatch) -> None:
    import services.dispatcher.__main__ as dispatcher_main

    monkeypatch.setattr(dispatcher_main, "main", lambda: 7)
    assert main(["serve", "dispatcher"]) == 7


@pytest.mark.parametrize(
    ("argv", "module", "attribute"),
    [
        (["demo"], "sandbox.demo", "main"),
        (["sandbox", "pii-api"], "sandbox.pii_api", "main"),
        (["sandbox", "providers"], "sandbox.providers.cli", "main"),
    ],
)
def test_sandbox_commands_pass_their_arguments_on_in_order(argv, module, attribute, monkeypatch) -> None:
    import importlib

    seen = {}

    def fake_main(args: list[str] | None = None) -> None:
        seen["args"], seen["argv"] = args, list(sys.argv)

    monkeypatch.setattr(importlib.import_module(module), attribute, fake_main)
    forwarded = ["--port", "9", "--help-me", "x", "-v"]
    assert main([*argv, *forwarded]) == OK
    assert seen["args"] == forwarded
    assert seen["argv"] == [f"tokensend {' '.join(argv)}", *forwarded]


def test_delegated_exit_codes() -> None:
    def exits(code):
        def entry(argv):
            raise SystemExit(code)

        return entry

    assert sandbox_command.delegate(exits(None), [], "x") == OK
    assert sandbox_command.delegate(exits(2), [], "x") == USAGE
    assert sandbox_command.delegate(exits("error: bad account"), [], "x") == FAILED
    assert sandbox_command.delegate(lambda: None, [], "x") == OK, "a main without parameters reads sys.argv"


def test_serve_all_with_clients_but_no_resolver_token_is_a_usage_error(monkeypatch, capsys) -> None:
    """The in-process dispatcher is one more client of the resolver: without a token every send
    would be refused there, one call at a time. Said at start instead."""
    for name in [n for n in os.environ if n.startswith("TOKENSEND_")]:
        monkeypatch.delenv(name)
    grant = '[{"name": "engine", "token_sha256": "' + "ab" * 32 + '", "workspaces": ["*"]}]'
    monkeypatch.setenv("TOKENSEND_CLIENTS", grant)
    monkeypatch.setenv("TOKENSEND_DEV_MODE", "true")
    assert main(["serve", "all"]) == USAGE
    assert "set TOKENSEND_RESOLVER_TOKEN" in capsys.readouterr().err


def test_serve_all_with_a_resolver_token_the_clients_do_not_grant_is_a_usage_error(monkeypatch) -> None:
    """Every send would be refused by the resolver in the same process (UNAUTHENTICATED)."""
    for name in [n for n in os.environ if n.startswith("TOKENSEND_")]:
        monkeypatch.delenv(name)
    grant = '[{"name": "engine", "token_sha256": "' + "ab" * 32 + '", "workspaces": ["*"]}]'
    monkeypatch.setenv("TOKENSEND_CLIENTS", grant)
    monkeypatch.setenv("TOKENSEND_DEV_MODE", "true")
    monkeypatch.setenv("TOKENSEND_RESOLVER_TOKEN", "s3cr3t-not-granted")
    with pytest.raises(UsageError) as refused:
        serve.load_settings({"resolver": 0, "dispatcher": 0, "receipts": 0})  # refused before anything starts
    assert "TOKENSEND_RESOLVER_TOKEN is not one of the tokens TOKENSEND_CLIENTS grants" in refused.value.message
    assert "s3cr3t" not in refused.value.message
    monkeypatch.setenv("TOKENSEND_RESOLVER_TOKEN", "granted")
    monkeypatch.setenv("TOKENSEND_CLIENTS", grant.replace("ab" * 32, token_digest("granted")))
    _, dispatcher, _ = serve.load_settings({"resolver": 0, "dispatcher": 0, "receipts": 0})
    assert dispatcher.resolver_token.get_secret_value() == "granted"


def test_serve_all_with_clients_it_cannot_read_is_a_usage_error_naming_the_variable(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("TOKENSEND_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TOKENSEND_CLIENTS", '[{"name": "engine", "token_sha256": "s3cr3t')
    monkeypatch.setenv("TOKENSEND_DEV_MODE", "true")
    with pytest.raises(UsageError) as refused:
        serve.load_settings({"resolver": 0, "dispatcher": 0, "receipts": 0})
    # The validator's own words, without pydantic's "Value error, " before them.
    assert refused.value.message.startswith("serve all: invalid settings: TOKENSEND_CLIENTS: must be a JSON list")
    assert "s3cr3t" not in refused.value.message


def test_serve_all_with_a_setting_file_gone_at_start_is_a_usage_error(monkeypatch) -> None:
    """A TLS file readable when the settings were checked and gone when a service starts: a setting to fix
    (exit 2, as each service alone says it), not a failure to listen (exit 1)."""
    for name in [n for n in os.environ if n.startswith("TOKENSEND_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TOKENSEND_DEV_MODE", "true")

    async def gone(*_args: object, **_kwargs: object) -> None:
        raise SettingFileUnreadable("resolver: TOKENSEND_TLS_CERT_FILE: cannot be read (No such file or directory)")

    monkeypatch.setattr(serve, "run_all", gone)
    with pytest.raises(UsageError) as refused:
        serve.serve_all({"resolver": 0, "dispatcher": 0, "receipts": 0})
    assert refused.value.message == (
        "serve all: resolver: TOKENSEND_TLS_CERT_FILE: cannot be read (No such file or directory)"
    )
