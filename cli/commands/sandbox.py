"""`tokensend demo` and `tokensend sandbox pii-api|providers`: the sandbox's own commands, arguments passed on.

Their parsers take every argument as it is (`--help` included), so the
delegated command sees exactly what followed its name.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from typing import Any

from cli.exits import FAILED, INTERRUPTED, OK

# No prefix character a user would type: `--port 1` reaches the delegate in order instead of being parsed here.
_PASS_THROUGH = {"add_help": False, "prefix_chars": "\x00"}


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the demo end to end (arguments go to sandbox.demo; 'demo --help' shows them)",
        description="Run the demo: `python -m sandbox.demo`.",
        **_PASS_THROUGH,
    )
    demo.add_argument("args", nargs=argparse.REMAINDER)
    demo.set_defaults(handler=run_demo)

    sandbox = commands.add_parser(
        "sandbox",
        help="run the sample PII API or the sandbox providers",
        description="Run a sandbox peer for the demo and manual tests. Arguments after the peer's name go to it; "
        "'tokensend sandbox pii-api --help' shows them.",
    )
    peers = sandbox.add_subparsers(dest="peer", required=True, metavar="PEER")
    pii_api = peers.add_parser(
        "pii-api",
        help="the sample PII API (python -m sandbox.pii_api)",
        description="Run the sample PII API.",
        **_PASS_THROUGH,
    )
    pii_api.add_argument("args", nargs=argparse.REMAINDER)
    pii_api.set_defaults(handler=run_pii_api)
    providers = peers.add_parser(
        "providers",
        help="sandbox SendGrid, Twilio, WhatsApp and an SMS gateway (python -m sandbox.providers)",
        description="Run the sandbox providers.",
        **_PASS_THROUGH,
    )
    providers.add_argument("args", nargs=argparse.REMAINDER)
    providers.set_defaults(handler=run_providers)


def delegate(entry: Callable[..., Any], argv: list[str], prog: str) -> int:
    """Runs another command's `main`, with `argv` as its arguments (and in sys.argv, for parsers that read it)."""
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        takes_argv = bool(inspect.signature(entry).parameters)
        result = entry(argv) if takes_argv else entry()
    except SystemExit as exc:
        return exit_code(exc.code)
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        sys.argv = saved
    return result if isinstance(result, int) else OK


def exit_code(code: object) -> int:
    if code is None:
        return OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message") prints the message and exits 1
    return FAILED


def run_demo(args: argparse.Namespace) -> int:
    from sandbox.demo import main

    return delegate(main, args.args, "tokensend demo")


def run_pii_api(args: argparse.Namespace) -> int:
    from sandbox.pii_api import main

    return delegate(main, args.args, "tokensend sandbox pii-api")


def run_providers(args: argparse.Namespace) -> int:
    from sandbox.providers.cli import main

    return delegate(main, args.args, "tokensend sandbox providers")
