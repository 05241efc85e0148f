"""Runs tokensend's services as real processes, for the demo, end-to-end tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def command_name(module_form: str) -> str:
    """How a sandbox command was called: `tokensend sandbox ...` when the CLI runs it (it sets
    sys.argv[0]), else `python -m ...`."""
    return sys.argv[0] if sys.argv[0].startswith("tokensend") else module_form


def serve(app: web.Application, host: str, port: int) -> None:
    """aiohttp's run_app until interrupted; a port that cannot be bound is one line, not a traceback."""
    try:
        web.run_app(app, host=host, port=port, print=None)
    except OSError as exc:
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or type(exc).__name__}") from None


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM ends the run as Ctrl-C does: `asyncio.run` cancels its main task, whose
    cleanup stops the processes it started. Left to its default, SIGTERM ends this process at once
    and leaves them running."""
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with it ignored
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


@dataclass
class ServiceProcess:
    name: str
    grpc_port: int
    process: asyncio.subprocess.Process
    log_path: Path
    http_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode


def service_env(settings: dict[str, str]) -> dict[str, str]:
    """The current environment without inherited TOKENSEND_* settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update({f"TOKENSEND_{k.upper()}": str(v) for k, v in settings.items()})
    return env


async def wait_serving(port: int, process: asyncio.subprocess.Process, log_path: Path, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"service exited at startup (code {process.returncode}); see {log_path}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"service did not become healthy; see {log_path}")


async def start_service(
    name: str, grpc_port: int, settings: dict[str, str], log_dir: Path, http_port: int = 0
) -> ServiceProcess:
    """`python -m services.<name>` with TOKENSEND_<KEY> for each setting; returns once it is SERVING."""
    log_path = log_dir / f"{name}.log"
    env = service_env({**settings, "grpc_port": str(grpc_port), **({"http_port": str(http_port)} if http_port else {})})
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{name}", cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        await wait_serving(grpc_port, process, log_path)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return ServiceProcess(name, grpc_port, process, log_path, http_port, env)


@dataclass
class InProcessService:
    """A service started in this process (the demo's fallback when no Redis answers)."""

    name: str
    grpc_port: int
    log_path: Path
    service: Any
    http_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def stop(self, timeout: float = 15.0) -> int:
        await self.service.stop(min(timeout, 5.0))
        return 0


async def start_in_process(
    settings: dict[str, str], ports: dict[str, int], http_port: int, log_dir: Path
) -> list[InProcessService]:
    """The three services in this event loop, sharing one store (typically memory://NAME)."""
    from libs.settings import DispatcherSettings, ReceiptsSettings, ResolverSettings
    from libs.telemetry import ScrubbingFilter, setup_telemetry
    from services.dispatcher.server import DispatcherDeps
    from services.dispatcher.server import build_server as build_dispatcher
    from services.receipts.server import ReceiptsDeps, start_receipts
    from services.resolver.server import ResolverDeps
    from services.resolver.server import build_server as build_resolver

    log_path = log_dir / "suite.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ScrubbingFilter())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    common = {k: v for k, v in settings.items() if k != "trace_export_file"}
    started: list[InProcessService] = []
    for name in ("resolver", "receipts", "dispatcher"):
        trace_file = str(log_dir / f"{name}.spans.jsonl")
        telemetry = setup_telemetry(name, trace_file=trace_file)
        values = {**common, "grpc_host": "127.0.0.1", "grpc_port": ports[name]}
        if name == "resolver":
            s = ResolverSettings(**values)
            service, _ = await build_resolver(s, ResolverDeps.from_settings(s, telemetry))
        elif name == "receipts":
            s = ReceiptsSettings(**values, http_port=http_port, http_host="127.0.0.1")
            service, _ = await start_receipts(s, ReceiptsDeps.from_settings(s, telemetry))
        else:
            s = DispatcherSettings(**values, resolver_addr=started[0].address)
            service, _ = await build_dispatcher(s, DispatcherDeps.from_settings(s, telemetry))
        started.append(InProcessService(name, ports[name], log_path, service, http_port if name == "receipts" else 0))
    return started
