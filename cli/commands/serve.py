"""`tokensend serve`: one service (as `python -m services.<name>`), or all three in one process."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal

from pydantic import SecretStr, ValidationError

from cli.exits import FAILED, OK, CliError, UsageError
from cli.flags import HelpFormatter
from libs.arguments import port
from libs.auth import token_digest
from libs.crypto import SecretBox, SecretKeyMissing
from libs.derived_keys import new_secret_key
from libs.logs import configure_logging
from libs.server import CannotListen, GrpcService, SettingFileUnreadable, bind_to_cpus, loop_factory, tune_gc
from libs.settings import (
    CommonSettings,
    DispatcherSettings,
    ReceiptsSettings,
    ResolverSettings,
    cpu_list,
    invalid_settings,
)
from libs.store import StoreMisconfigured
from libs.telemetry import Telemetry, setup_telemetry

log = logging.getLogger(__name__)

NAMES = ("resolver", "dispatcher", "receipts")
DEFAULT_PORTS = {
    name: settings.model_fields["grpc_port"].default
    for name, settings in (
        ("resolver", ResolverSettings),
        ("dispatcher", DispatcherSettings),
        ("receipts", ReceiptsSettings),
    )
}
# How help text names each service ("the receipts's port" reads wrong).
SERVICE_NAMES = {"resolver": "resolver", "dispatcher": "dispatcher", "receipts": "receipts service"}

EPILOG = """\
Settings come from TOKENSEND_* environment variables (see the README's
configuration reference): TOKENSEND_REDIS_URL, TOKENSEND_SECRET_KEY (or
TOKENSEND_DEV_MODE=true for a throwaway key), TOKENSEND_GRPC_PORT, ...

'serve all' runs the three services in one process and one event loop, for
development and the demo: the gRPC ports come from the --*-port options above
(one TOKENSEND_GRPC_PORT cannot serve three), the dispatcher calls the resolver in
the same process, and in dev mode the three share one throwaway key. SIGTERM or
Ctrl-C stops them gracefully (health NOT_SERVING, in-flight calls finish).
Exits 0 after a clean shutdown, 2 for invalid settings, 1 when a port cannot be
bound.

examples:
  TOKENSEND_DEV_MODE=true tokensend serve all
  TOKENSEND_SECRET_KEY=... TOKENSEND_GRPC_PORT=50051 tokensend serve resolver"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="run a service, or all three in one process",
        description="Run the resolver, the dispatcher or the receipts service until SIGTERM, or all three.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("service", choices=(*NAMES, "all"), help="the service to run, or all three")
    ports = parser.add_argument_group("ports of 'serve all'")
    for name in NAMES:
        ports.add_argument(
            f"--{name}-port",
            type=port,
            metavar="PORT",
            help=f"the {SERVICE_NAMES[name]}'s gRPC port (default: {DEFAULT_PORTS[name]}; 0 picks a free one)",
        )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    ports = {name: getattr(args, f"{name}_port") for name in NAMES}
    if args.service != "all":
        given = [f"--{name}-port" for name, value in ports.items() if value is not None]
        if given:
            raise UsageError(f"serve {args.service}: {', '.join(given)} is for 'serve all'; set TOKENSEND_GRPC_PORT")
        return importlib.import_module(f"services.{args.service}.__main__").main()
    return serve_all({name: DEFAULT_PORTS[name] if value is None else value for name, value in ports.items()})


def _invalid_settings(exc: ValidationError) -> UsageError:
    return UsageError(f"serve all: invalid settings: {invalid_settings(exc)}")


def load_settings(ports: dict[str, int]) -> tuple[ResolverSettings, DispatcherSettings, ReceiptsSettings]:
    """Each service's settings from the environment, with its own port and, in dev mode, one shared key."""
    if os.environ.get("TOKENSEND_GRPC_PORT"):
        raise UsageError(
            "serve all: TOKENSEND_GRPC_PORT is set, but the three services need three ports; "
            "unset it and use --resolver-port, --dispatcher-port and --receipts-port"
        )
    try:
        resolver = ResolverSettings(grpc_port=ports["resolver"])
        dispatcher = DispatcherSettings(grpc_port=ports["dispatcher"])
        receipts = ReceiptsSettings(grpc_port=ports["receipts"])
    except ValidationError as exc:
        raise _invalid_settings(exc) from None
    token = dispatcher.resolver_token
    if resolver.clients:
        # The dispatcher is a client of this process's resolver like any other: without a token the
        # resolver grants, every send would be refused there (UNAUTHENTICATED), one call at a time.
        if token is None:
            raise UsageError(
                "serve all: TOKENSEND_CLIENTS is set, so the resolver wants a token from the dispatcher too: "
                "set TOKENSEND_RESOLVER_TOKEN to a token TOKENSEND_CLIENTS grants"
            )
        if token_digest(token.get_secret_value()) not in {client.token_sha256 for client in resolver.clients}:
            raise UsageError(  # said without the token, a secret
                "serve all: TOKENSEND_RESOLVER_TOKEN is not one of the tokens TOKENSEND_CLIENTS grants, "
                "so the resolver would refuse every lookup the dispatcher makes"
            )
    try:
        SecretBox.from_settings(resolver)  # before anything opens: a missing key is a usage error
    except SecretKeyMissing as exc:
        raise UsageError(f"serve all: {exc}") from None
    if resolver.secret_key is None:
        # Dev mode: each service would make its own throwaway key, and could not read what the others sealed.
        key = SecretStr(new_secret_key())
        resolver, dispatcher, receipts = (
            s.model_copy(update={"secret_key": key}) for s in (resolver, dispatcher, receipts)
        )
    return resolver, dispatcher, receipts


def serve_all(ports: dict[str, int]) -> int:
    resolver, dispatcher, receipts = load_settings(ports)
    configure_logging(resolver.log_level, "tokensend")
    bind_to_cpus(cpu_list(resolver.cpu_affinity))
    telemetry = {
        name: setup_telemetry(
            name,
            trace_file=settings.trace_export_file or None,
            metrics_file=settings.metrics_export_file or None,
        )
        for name, settings in zip(NAMES, (resolver, dispatcher, receipts), strict=True)
    }
    try:
        with asyncio.Runner(loop_factory=loop_factory(resolver.event_loop)) as runner:
            runner.run(run_all(resolver, dispatcher, receipts, telemetry, tune=True))
    except (StoreMisconfigured, SettingFileUnreadable) as exc:  # settings to fix: as each service says them
        raise UsageError(f"serve all: {exc}") from None
    except OSError as exc:  # a port already taken
        raise CliError(f"serve all: {exc}", FAILED) from None
    finally:
        for each in telemetry.values():
            each.shutdown()  # flushes the last spans
    return OK


def _local_address(settings: CommonSettings, port: int) -> str:
    host = settings.grpc_host
    if host in ("", "[::]", "::", "0.0.0.0"):
        host = "127.0.0.1"
    return f"{host}:{port}"


async def run_all(
    resolver: ResolverSettings,
    dispatcher: DispatcherSettings,
    receipts: ReceiptsSettings,
    telemetry: dict[str, Telemetry],
    stop: asyncio.Event | None = None,
    *,
    tune: bool = False,
) -> None:
    """Starts the three services, serves until SIGTERM/SIGINT (or `stop` is set), then stops them gracefully.
    `tune`: the process is only these services, so its garbage collector is set for them (`tune_gc`)."""
    from services.dispatcher.server import DispatcherDeps
    from services.dispatcher.server import build_server as build_dispatcher
    from services.receipts.server import ReceiptsDeps, start_receipts
    from services.resolver.server import ResolverDeps
    from services.resolver.server import build_server as build_resolver

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    started: list[tuple[str, GrpcService, float]] = []
    building = "resolver"
    try:
        service, resolver_port = await build_resolver(
            resolver, ResolverDeps.from_settings(resolver, telemetry["resolver"])
        )
        started.append(("resolver", service, resolver.grace_seconds))
        building = "dispatcher"
        # The dispatcher calls this process's resolver, whatever TOKENSEND_RESOLVER_ADDR says.
        dispatcher = dispatcher.model_copy(update={"resolver_addr": _local_address(resolver, resolver_port)})
        service, dispatcher_port = await build_dispatcher(
            dispatcher, DispatcherDeps.from_settings(dispatcher, telemetry["dispatcher"])
        )
        started.append(("dispatcher", service, dispatcher.grace_seconds))
        building = "receipts"
        service, receipts_port = await start_receipts(
            receipts, ReceiptsDeps.from_settings(receipts, telemetry["receipts"])
        )
        started.append(("receipts", service, receipts.grace_seconds))
        if tune:
            tune_gc()
        log.info(
            "serving resolver on port %d, dispatcher on port %d, receipts on port %d",
            resolver_port,
            dispatcher_port,
            receipts_port,
        )
        await stop.wait()
        log.info("shutting down")
    except CannotListen as exc:
        # Here each gRPC port comes from its flag (TOKENSEND_GRPC_PORT is refused): name the flag instead.
        raise CannotListen(str(exc).replace("TOKENSEND_GRPC_PORT", f"--{building}-port")) from None
    finally:
        await stop_all(started)


async def stop_all(started: list[tuple[str, GrpcService, float]]) -> None:
    """The dispatcher and receipts first (in-flight sends still need the resolver), then the resolver."""
    first = [service.stop(grace) for name, service, grace in started if name != "resolver"]
    for result in await asyncio.gather(*first, return_exceptions=True):
        if isinstance(result, Exception):
            log.warning("stopping failed: %s", type(result).__name__)
    for name, service, grace in started:
        if name == "resolver":
            await service.stop(grace)
