"""`tokensend`: the command line of the suite.

    tokensend serve resolver|dispatcher|receipts|all
    tokensend demo
    tokensend sandbox pii-api|providers
    tokensend config put [KIND] FILE... | config get KIND NAME --workspace W
    tokensend test-pii-api [FILE] --id ANON_ID
    tokensend stats CAMPAIGN --workspace W
    tokensend events --workspace W [--after-id ID | --new-only] [--campaign C] [--status S] [--limit N]
    tokensend send-test --workspace W --campaign C --channel CH --connector ID --id ANON --content FILE
    tokensend dispatch RECIPIENTS --content FILE --workspace W --campaign C --instance I --channel CH --connector ID

`main(argv)` returns the exit code (see `cli.exits`); nothing here calls sys.exit
but the entry points, so tests call `main([...])` directly.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from cli.commands import config, dispatch, events, pii_test, sandbox, send_test, serve, stats
from cli.exits import (
    EXIT_CODES_HELP,
    FAILED,
    INTERRUPTED,
    OK,
    STDOUT_CLOSED,
    USAGE,
    CliError,
    discard_stdout,
    guarded_stdout,
    stdout_lost,
)
from cli.flags import NOT_TEXT, HelpFormatter, is_text, join_dash_values
from cli.rpc import add_client_options, grpc_address

EPILOG = f"""\
{EXIT_CODES_HELP}

environment:
  TOKENSEND_RESOLVER_ADDR    the resolver's address (default localhost:50051)
  TOKENSEND_DISPATCHER_ADDR  the dispatcher's address (default localhost:50052)
  TOKENSEND_RECEIPTS_ADDR    the receipts service's address (default localhost:50053)
  TOKENSEND_TOKEN            bearer token sent with every call (--token)
  TOKENSEND_*                the services' settings, for 'serve' (see the README)

Run 'tokensend COMMAND --help' for a command's options and examples."""


# The options whose value may begin with "-": a number given negative (refused by the option's own check, which
# names it), a token, an anonymous ID, an attribute or a file name that begins so. Given apart from it, the value
# would read as an option. (`config get --version N` is left out: before the command, --version takes none.)
DASH_VALUE_OPTIONS = frozenset(
    {
        "--frequency-cap",
        "--limit",
        "--idle-seconds",
        "--timeout",
        "--if-version",
        "--resolver-port",
        "--dispatcher-port",
        "--receipts-port",
        "--after-id",
        "--token",
        "--id",
        "--attr",
        "--out",
        "--content",
        "--tls-ca-file",
        "--tls-cert-file",
        "--tls-key-file",
    }
)


def version() -> str:
    try:
        return metadata.version("tokensend")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokensend",
        description="Send messages to customers known only by anonymous ID: run the services and the sandbox, "
        "manage PII API, OAuth, content API and connector configs, test them, send campaigns from files, read "
        "campaign stats and tail delivery events.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tokensend {version()}")
    add_client_options(parser, None)
    parser.add_argument(
        "--addr",
        type=grpc_address,
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="address of the service the command talks to (defaults per command, see its --help)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands)
    sandbox.register(commands)
    config.register(commands)
    pii_test.register(commands)
    stats.register(commands)
    events.register(commands)
    send_test.register(commands)
    dispatch.register(commands)
    return parser


def not_text_argument(argv: list[str]) -> str | None:
    """The argument holding bytes that are not UTF-8, named by its flag or its place, never by its value."""
    for place, argument in enumerate(argv, 1):
        if is_text(argument):
            continue
        flag, sep, _ = argument.partition("=")
        if sep and flag.startswith("--") and is_text(flag):
            return f"the value of {flag}"
        before = argv[place - 2] if place > 1 else ""
        if before.startswith("-") and "=" not in before:
            return f"the value of {before}"
        return f"argument {place}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = join_dash_values(sys.argv[1:] if argv is None else argv, DASH_VALUE_OPTIONS)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    with guarded_stdout():  # after parsing: --help goes to stderr when standard output is closed
        return run(args, arguments)


def run(args: argparse.Namespace, arguments: list[str]) -> int:
    try:
        code = args.handler(args)
        if stdout_lost():
            print(f"tokensend: {STDOUT_CLOSED}: what the command printed was lost", file=sys.stderr)
            return FAILED if code == OK else code
        return code
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 (Python keeps them as lone surrogates) go into no request; a file's path
        # may hold them, so they are found only where a request is made.
        named = not_text_argument(arguments)
        if named is None:
            raise
        print(f"tokensend: {named} {NOT_TEXT}", file=sys.stderr)
        return USAGE
    except CliError as error:
        print(f"tokensend: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("tokensend: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `tokensend config get ... | head`: stop quietly, as if the output was read
        discard_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())
