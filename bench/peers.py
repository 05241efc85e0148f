"""Starts and stops the processes a benchmark measures: the sandbox peers and the services.

Each runs as its own process (`python -m ...`), as in production, so no two share an event
loop; peak memory is read from `/proc/<pid>/status` (VmHWM, the kernel's high-water mark of
resident memory), which needs no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from libs.derived_keys import new_secret_key
from sandbox.processes import free_port, wait_serving
from sandbox.workspace import (
    GATEWAY_KEY,
    GATEWAY_SECRET,
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    SENDGRID_KEY,
    TWILIO_SID,
    TWILIO_TOKEN,
    WHATSAPP_APP_SECRET,
    WHATSAPP_PHONE_ID,
    WHATSAPP_TOKEN,
)

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 120.0  # 200,000 made-up customers take a while to generate on a slow machine


def git_commit(root: Path = ROOT) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def machine_facts() -> dict[str, object]:
    """What a results file says of the machine and the code it measured."""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
    }


def read_status_kb(pid: int, name: str) -> int | None:
    """A `kB` line of /proc/<pid>/status (VmHWM: peak resident memory, VmRSS: current), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return parse_status_kb(text, name)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far (/proc/<pid>/stat), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return parse_stat_cpu(text)


def parse_stat_cpu(text: str) -> float:
    # The command name (field 2) may hold spaces: count fields from the closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def parse_status_kb(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any TOKENSEND_ or OTEL_ setting, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSEND_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


@dataclass
class Peer:
    """A running process of the benchmark, with its log file."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    port: int
    peak_rss_kb: int | None = None  # read when stopped, or by `sample`

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid) or 0.0

    def sample(self) -> int | None:
        """The peak resident memory so far (kB); kept, so it survives the process."""
        value = read_status_kb(self.pid, "VmHWM")
        if value is not None:
            self.peak_rss_kb = max(value, self.peak_rss_kb or 0)
        return self.peak_rss_kb

    async def stop(self, timeout: float = 15.0) -> None:
        if self.process.returncode is None:
            self.sample()
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class PeerStartError(RuntimeError):
    """A process the benchmark started that exited or never answered: its log's last lines say why (a
    setting it refused, a port taken), which the CLI prints instead of a traceback."""

    def __init__(self, peer: Peer) -> None:
        code = peer.process.returncode
        how = f"exited at startup (code {code})" if code is not None else f"did not start in {STARTUP_SECONDS:.0f} s"
        super().__init__(f"{peer.name} {how}; the last lines of {peer.log}:\n{peer.tail()}")


def cpu_since(watched: list[Peer], before: list[float]) -> dict[str, float]:
    """Each process's CPU seconds since `before` was read, by name. A process that ended meanwhile (a dispatcher
    killed during a load test) is left out: its time is no longer there to read, and 0 less `before` would read
    as negative CPU, taken off the total too."""
    spent = {}
    for peer, then in zip(watched, before, strict=True):
        now = cpu_seconds(peer.pid)
        if now is not None and now >= then:
            spent[peer.name] = now - then
    return spent


async def spawn(
    name: str,
    args: list[str],
    env: dict[str, str],
    log_dir: Path,
    port: int,
    root: Path = ROOT,
    prefix: Sequence[str] = (),
) -> Peer:
    """`python ARGS` run from `root` (a work tree of another commit, for side-by-side runs), under
    `prefix` when given (a program that runs the interpreter, such as valgrind)."""
    log = log_dir / f"{name}.log"
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            *args,
            cwd=root,
            env=env,
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
        )
    return Peer(name, process, log, port)


async def _wait_http(peer: Peer, path: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if peer.process.returncode is not None:
                raise PeerStartError(peer)
            try:
                async with session.get(f"http://127.0.0.1:{peer.port}{path}") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise PeerStartError(peer)


async def _wait_grpc(peer: Peer) -> None:
    try:
        await wait_serving(peer.port, peer.process, peer.log, STARTUP_SECONDS)
    except RuntimeError:
        raise PeerStartError(peer) from None


async def start_pii_api(log_dir: Path, customers: int, port: int = 0) -> Peer:
    """The sample PII API with OAuth, serving `customers` made-up customers."""
    port = port or free_port()
    args = [
        "-m",
        "sandbox.pii_api",
        "--port",
        str(port),
        "--customers",
        str(customers),
        "--oauth-client-id",
        OAUTH_CLIENT_ID,
        "--oauth-client-secret",
        OAUTH_CLIENT_SECRET,
        "--log-level",
        "WARNING",
    ]
    peer = await spawn("pii_api", args, clean_env(), log_dir, port)
    return await _ready(peer, _wait_http(peer, "/_admin/stats"))


async def start_bare_resolver(log_dir: Path, pii_api_url: str, port: int = 0, prefix: Sequence[str] = ()) -> Peer:
    """`python -m bench.bare_resolver`: the resolver-overhead section's reference server."""
    port = port or free_port()
    args = ["-m", "bench.bare_resolver", "--port", str(port), "--pii-api", pii_api_url]
    peer = await spawn("bare_resolver", args, clean_env(), log_dir, port, prefix=prefix)
    return await _ready(peer, _wait_grpc(peer))


async def start_providers(log_dir: Path, port: int = 0) -> Peer:
    """The sandbox providers with the sandbox workspace's credentials; no receipts, a small outbox."""
    port = port or free_port()
    args = [
        "-m",
        "sandbox.providers",
        "--port",
        str(port),
        "--no-receipts",
        "--outbox-limit",
        "1000",
        "--sendgrid-key",
        SENDGRID_KEY,
        "--twilio-account-sid",
        TWILIO_SID,
        "--twilio-auth-token",
        TWILIO_TOKEN,
        "--whatsapp-phone-number-id",
        WHATSAPP_PHONE_ID,
        "--whatsapp-access-token",
        WHATSAPP_TOKEN,
        "--whatsapp-app-secret",
        WHATSAPP_APP_SECRET,
        "--custom-api-key",
        GATEWAY_KEY,
        "--custom-api-secret",
        GATEWAY_SECRET,
        "--custom-connector",
        "gateway",
        "--log-level",
        "WARNING",
    ]
    peer = await spawn("providers", args, clean_env(), log_dir, port)
    return await _ready(peer, _wait_http(peer, "/_admin/stats"))


@dataclass
class ServiceOptions:
    """How the benchmark runs the services."""

    redis_url: str
    secret_key: str = field(default_factory=new_secret_key)
    trace_file: str = ""  # tracing on: spans exported to this file
    log_level: str = "INFO"
    extra_env: dict[str, str] = field(default_factory=dict)  # TOKENSEND_* overrides (batch size, concurrency)
    dispatcher_cpus: tuple[str, ...] = ()  # TOKENSEND_CPU_AFFINITY of each dispatcher process in turn; () = unbound


def dispatcher_cpus(spec: str, count: int) -> tuple[str, ...]:
    """Each dispatcher process's CPU (`--dispatcher-cpus`): `auto` gives them one CPU each from the last
    one this process may use down, `none` leaves them where the system puts them, a list (`1,0`) names
    them in turn."""
    if spec == "none":
        return ()
    if spec == "auto":
        allowed = sorted(os.sched_getaffinity(0), reverse=True)
        return tuple(str(allowed[i % len(allowed)]) for i in range(count))
    cpus = [part.strip() for part in spec.split(",") if part.strip()]
    return tuple(cpus[i % len(cpus)] for i in range(count))


def service_env(options: ServiceOptions, port: int, **values: str) -> dict[str, str]:
    env = clean_env(
        TOKENSEND_REDIS_URL=options.redis_url,
        TOKENSEND_SECRET_KEY=options.secret_key,
        TOKENSEND_GRPC_HOST="127.0.0.1",
        TOKENSEND_GRPC_PORT=str(port),
        TOKENSEND_ALLOW_PRIVATE_NETWORKS="true",  # the sandbox peers are on loopback
        TOKENSEND_LOG_LEVEL=options.log_level,
        **values,
    )
    if options.trace_file:
        env["TOKENSEND_TRACE_EXPORT_FILE"] = options.trace_file
    env.update(options.extra_env)
    return env


async def _wait_log(peer: Peer, needle: str) -> None:
    """For a process sharing its port: the health check could be answered by a sibling."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if peer.process.returncode is not None:
            raise PeerStartError(peer)
        if needle in peer.log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.1)
    raise PeerStartError(peer)


async def _ready(peer: Peer, waiting: Awaitable[None]) -> Peer:
    """`peer` once `waiting` is done; stopped when it fails or is cancelled (Ctrl-C during start-up)."""
    try:
        await waiting
    except BaseException:
        await peer.stop()
        raise
    return peer


async def start_service(
    name: str,
    module: str,
    options: ServiceOptions,
    log_dir: Path,
    port: int = 0,
    shared_port: bool = False,
    root: Path = ROOT,
    prefix: Sequence[str] = (),
    **env_values: str,
) -> Peer:
    port = port or free_port()
    peer = await spawn(name, ["-m", module], service_env(options, port, **env_values), log_dir, port, root, prefix)

    async def serving() -> None:
        if shared_port:
            await _wait_log(peer, "gRPC server serving")
        await _wait_grpc(peer)

    return await _ready(peer, serving())


@dataclass
class Services:
    resolver: Peer
    dispatchers: list[Peer]

    @property
    def dispatcher(self) -> Peer:
        return self.dispatchers[0]

    @property
    def all(self) -> list[Peer]:
        return [self.resolver, *self.dispatchers]

    def sample(self) -> None:
        for peer in self.all:
            peer.sample()

    async def stop(self) -> None:
        for peer in reversed(self.all):
            await peer.stop()


def bound_to(cpus: tuple[str, ...], i: int) -> dict[str, str]:
    return {"TOKENSEND_CPU_AFFINITY": cpus[i % len(cpus)]} if cpus else {}


async def start_services(options: ServiceOptions, log_dir: Path, dispatchers: int = 1, port: int = 0) -> Services:
    """A resolver and `dispatchers` dispatcher processes sharing one port (SO_REUSEPORT)."""
    resolver = await start_service("resolver", "services.resolver", options, log_dir)
    port = port or free_port()
    started = []
    try:
        for i in range(dispatchers):
            name = "dispatcher" if dispatchers == 1 else f"dispatcher-{i + 1}"
            started.append(
                await start_service(
                    name,
                    "services.dispatcher",
                    options,
                    log_dir,
                    port=port,
                    shared_port=i > 0,
                    TOKENSEND_RESOLVER_ADDR=f"127.0.0.1:{resolver.port}",
                    TOKENSEND_GRPC_REUSE_PORT="true" if dispatchers > 1 else "false",
                    **bound_to(options.dispatcher_cpus, i),
                )
            )
    except BaseException:
        for peer in [*started, resolver]:
            await peer.stop()
        raise
    return Services(resolver, started)
