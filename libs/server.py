"""gRPC server bootstrap: interceptors, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster

from libs.auth import ClientRegistry
from libs.crypto import SecretKeyMissing
from libs.guard import RequestGuard
from libs.interceptors import ErrorMappingInterceptor
from libs.keepalive import server_options as keepalive_options
from libs.logs import configure_logging
from libs.reflection import enable_reflection
from libs.settings import CommonSettings, cpu_list, invalid_settings
from libs.store import StoreMisconfigured, check_cluster_serves
from libs.tasks import stop_task
from libs.telemetry import Telemetry, server_spans, setup_telemetry
from libs.tls import server_credentials

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]
Closer = Callable[[], Awaitable[None]]


# Health follows Redis, which every call needs: NOT_SERVING after this many failed PINGs in a row
# (one slow answer is not an outage), SERVING again at the first answer.
STORE_CHECK_FAILURES = 2
STORE_PING_TIMEOUT_SECONDS = 1.0


class StoreWatch:
    """Pings Redis every `interval` seconds (asks a cluster whether it serves every slot) and sets the
    server's health from the answers."""

    def __init__(
        self, store: aioredis.Redis, health_servicer: health.aio.HealthServicer, names: Sequence[str], interval: float
    ) -> None:
        self._store, self._health, self._names, self._interval = store, health_servicer, names, interval
        self._failures = 0
        self.serving = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def check(self) -> None:
        try:
            async with asyncio.timeout(min(self._interval, STORE_PING_TIMEOUT_SECONDS)):
                if isinstance(self._store, RedisCluster):
                    await check_cluster_serves(self._store)
                else:
                    await self._store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure to answer is an outage for the callers
            self._failures += 1
            if self.serving and self._failures >= STORE_CHECK_FAILURES:
                log.warning("Redis does not answer (%s): health NOT_SERVING until it does", type(exc).__name__)
                await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
            return
        self._failures = 0
        if not self.serving:
            log.warning("Redis answers again: health SERVING")
            await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def _set(self, status: int) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", *self._names):
            await self._health.set(name, status)


@dataclass
class GrpcService:
    """A started gRPC server and what is needed to stop it cleanly."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    closers: list[Closer] = field(default_factory=list)
    store_watch: asyncio.Task | None = None
    # Told when shutdown starts, so that long calls (a DispatchStream) take no more work and end
    # within the grace period with what they started, rather than being cut off mid-send.
    drains: list[Callable[[], None]] = field(default_factory=list)
    # Awaited once the server has stopped and before the clients close: gRPC cancels the calls left at
    # the end of the grace period and returns at once, while their cancelled work still settles.
    winds_down: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What sets health from Redis's answers (`store_watch` runs it): servers beside this one follow it too.
    watcher: StoreWatch | None = None

    def store_answers(self) -> bool:
        """Whether Redis answered the watch's last pings (health SERVING for it); True with no watch."""
        return self.watcher is None or self.watcher.serving

    async def stop(self, grace: float) -> None:
        """Stop taking new work (health NOT_SERVING first), finish in-flight calls, then close."""
        await self.stop_watching_store()
        await self.health.enter_graceful_shutdown()
        for drain in self.drains:
            drain()
        # The servers beside drain alongside gRPC, each within `grace`: one after the other, a process
        # with calls in flight on both would take twice its grace period to stop. gRPC's stop begins in
        # this step, before anything else runs: a call arriving now is refused UNAVAILABLE by the server
        # itself, where a stop begun a step later let one in only to cancel it.
        beside = asyncio.ensure_future(self.stop_beside(grace))
        stopped: list[BaseException | None] = []
        try:
            await self.server.stop(grace)
        except Exception as exc:  # noqa: BLE001 - the rest still winds down and closes
            stopped.append(exc)
        stopped.extend(await asyncio.gather(beside, return_exceptions=True))
        for failure in stopped:
            if isinstance(failure, BaseException):
                log.error("stopping a server failed: %s", type(failure).__name__)
        for wind_down in self.winds_down:
            await wind_down()
        await close_all(self.closers)

    async def stop_beside(self, grace: float) -> None:
        """Servers beside the gRPC one (the receipts webhooks) stop here, once health says NOT_SERVING,
        while the gRPC server drains: their requests in flight finish within the same `grace`."""

    async def stop_watching_store(self) -> None:
        """Before shutting down: a Redis answer must not turn health back to SERVING."""
        if self.store_watch is not None:
            await stop_task(self.store_watch, "the Redis health watch")
            self.store_watch = None


class CannotListen(OSError):
    """A server could not bind its address: the port is taken, or the host is not one of this machine's."""


class SettingFileUnreadable(OSError):
    """A file a setting names could not be read at start, though it could when the settings were checked
    (moved or its permissions changed since): said naming the variable, never the path."""


@contextlib.contextmanager
def reading_setting_files(files: Mapping[str, str]) -> Iterator[None]:
    """Reads of the files `files` names ({variable: path}); an OSError becomes SettingFileUnreadable naming
    the variable whose file it was (every variable set, when the error does not say which file)."""
    try:
        yield
    except OSError as exc:
        named = [variable for variable, path in files.items() if path and path == exc.filename]
        named = named or [variable for variable, path in files.items() if path]
        raise SettingFileUnreadable(
            f"{', '.join(named)}: cannot be read ({exc.strerror or type(exc).__name__})"
        ) from None


# A client that does not close within this long (a peer that never answers a goodbye) is left behind,
# said in the log, and the rest still close.
CLOSE_SECONDS = 5.0


async def close_all(closers: Sequence[Closer]) -> None:
    """Closes in reverse order of opening; a failure or a hang is reported and the rest still close."""
    for close in reversed(closers):
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await close()
        except TimeoutError:
            log.error("closing %s did not finish within %.0f s; left behind", closer_name(close), CLOSE_SECONDS)
        except Exception as exc:
            log.warning("closing %s failed: %s", closer_name(close), type(exc).__name__)


def closer_name(close: Closer) -> str:
    return getattr(close, "__qualname__", type(close).__name__).replace(".<locals>", "")


@contextlib.asynccontextmanager
async def closed_if_start_fails(opened: list[Closer]) -> AsyncIterator[list[Closer]]:
    """A start-up, whose steps add to `opened` the closer of each client, session or task they open. When a
    step fails (a Redis that is not what the settings say, a port taken, a TLS file gone), what was opened
    closes last to first, each within CLOSE_SECONDS (`close_all`), and the failure goes on to be said:
    a process that stopped at start left sessions and sockets open ("Unclosed client session")."""
    try:
        yield opened
    except BaseException:
        await close_all(opened)
        raise


def grpc_server_options(settings: CommonSettings) -> list[tuple[str, int]]:
    """The options every tokensend gRPC server is built with: what one client connection may hold is
    bounded (its calls at once, its age), and the keepalive pings it may send are those ours send."""
    options = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        # gRPC shares a port by default; a service started twice by mistake would then answer a
        # share of another's calls. Shared only when asked for.
        ("grpc.so_reuseport", int(settings.grpc_reuse_port)),
        # gRPC's default is no bound: one client could hold any number of calls on one connection.
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        # Our own clients' keepalive pings (the dispatcher's, idle or not) are no abuse.
        *keepalive_options(),
    ]
    if settings.grpc_max_connection_age_seconds:
        # GOAWAY once of age: new calls go to a new connection (another replica, behind a load balancer),
        # those open finish within the grace, which gRPC otherwise leaves unbounded.
        options += [
            ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_seconds * 1000),
            ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_seconds * 1000),
        ]
    return options


async def start_grpc_server(
    settings: CommonSettings,
    registrars: Iterable[Registrar],
    service_names: Sequence[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    closers: Sequence[Closer] = (),
    telemetry: Telemetry | None = None,
    store: aioredis.Redis | None = None,
) -> GrpcService:
    """Builds, binds and starts a server; port 0 binds an ephemeral port (tests). With `store`, its
    health follows Redis every `store_check_seconds` (`StoreWatch`). `closers` close when the service
    stops; should this start fail, closing them is the caller's (`closed_if_start_fails`)."""
    guard = RequestGuard(
        ClientRegistry(settings.clients),
        open_health=settings.auth_open_health,
        open_reflection=settings.auth_open_reflection,
    )
    if not settings.clients:
        log.warning("authentication is off: TOKENSEND_CLIENTS is empty, so any caller may use every workspace")
    server = grpc.aio.server(
        # The error mapping opens each call's server span; the guard innermost, so its refusals are
        # mapped (and traced) like any other error.
        interceptors=[*interceptors, ErrorMappingInterceptor(server_spans(telemetry)), guard],
        options=grpc_server_options(settings),
    )
    for register in registrars:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([*service_names, health.SERVICE_NAME], server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = None
    if settings.tls_cert_file:
        tls_files = {
            "TOKENSEND_TLS_CERT_FILE": settings.tls_cert_file,
            "TOKENSEND_TLS_KEY_FILE": settings.tls_key_file,
            "TOKENSEND_TLS_CLIENT_CA_FILE": settings.tls_client_ca_file,
        }
        with reading_setting_files(tls_files):
            credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind", which says no more
        port = 0
    if port == 0:
        raise CannotListen(
            f"cannot listen for gRPC on {address} (TOKENSEND_GRPC_HOST, TOKENSEND_GRPC_PORT): "
            "the port is taken or the host is not an address of this machine"
        )
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "gRPC server serving %s on port %d (%s)",
        ", ".join(service_names),
        port,
        "mTLS" if settings.tls_client_ca_file else "TLS" if settings.tls_cert_file else "plaintext",
    )
    watch = watcher = None
    if store is not None and settings.store_check_seconds > 0:
        watcher = StoreWatch(store, health_servicer, service_names, settings.store_check_seconds)
        watch = asyncio.create_task(watcher.run(), name="store-watch")
    return GrpcService(server, port, health_servicer, service_names, list(closers), watch, watcher=watcher)


# A service allocates and drops many small objects per message (protobuf messages, dicts, aiohttp
# requests). With CPython's defaults the collector ran about 500 times during a 20,000-SMS
# campaign, and each full pass walked the 93,000 objects loaded at start (40-80 ms, a batch's
# worth of latency): 11-15 % of the dispatcher's CPU. Objects alive once serving are left out of
# collection for good, and the young generation is collected every 10,000 net allocations.
GC_YOUNG_THRESHOLD = 10_000


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a service runs on (`TOKENSEND_EVENT_LOOP`); None is asyncio's own.

    uvloop runs the loop, its sockets and its cross-thread wake-ups in C: the dispatcher's provider
    client hands every reply back from its own thread, and uvloop cut the dispatcher's CPU per SMS
    by a tenth (docs/performance-history.md, "The eighth round").
    """
    if name != "uvloop":
        return None
    import uvloop  # here, so a service on asyncio's loop does not need it

    return uvloop.new_event_loop


def bind_to_cpus(cpus: frozenset[int]) -> None:
    """Keeps every thread of this process, and those it starts later, on `cpus` (TOKENSEND_CPU_AFFINITY).

    A dispatcher's event loop and pyreqwest's thread hand each provider reply to one another. On two
    cores, when the system kept them on different cores the dispatcher spent 151-162 µs of CPU per SMS
    and sent 5,200-5,580 a second; bound to one core, 125-130 µs and 6,460-6,790
    (docs/performance-history.md, "The twenty-first round").
    """
    if not cpus:
        return
    for thread in os.listdir("/proc/self/task"):  # threads started before this call (the calling one among them)
        with contextlib.suppress(ProcessLookupError):  # one that ended since the listing
            os.sched_setaffinity(int(thread), cpus)


def tune_gc() -> None:
    """Once the services are up: frees what start-up left, then freezes what survives it."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


# Once shutdown begins, the process exits within its grace period and this long, whatever hangs. After
# the grace, the batches' wind-down takes 5 s at most and closing the clients milliseconds (5 s at most
# for one that hangs, left behind then): the slack is for a process in trouble, not a slow one.
SHUTDOWN_SLACK_SECONDS = 30.0


class ShutdownDeadline:
    """Ends the process (exit code 1, said in the log) if a shutdown has not finished in time: a step
    that never ends would otherwise keep a stopped service's process, and its port, for good."""

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def start(self, seconds: float) -> None:
        self._timer = threading.Timer(seconds, self._expire, args=(seconds,))
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    @staticmethod
    def _expire(seconds: float) -> None:
        log.error("shutdown did not finish within %.0f s; the process ends here (exit code 1)", seconds)
        logging.shutdown()
        os._exit(1)


async def run_until_terminated(service: GrpcService, grace: float, deadline: ShutdownDeadline | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully (within `deadline` once begun)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", grace)
    if deadline is not None:
        deadline.start(grace + SHUTDOWN_SLACK_SECONDS)
    await service.stop(grace)


def run_service(
    name: str,
    load_settings: Callable[[], CommonSettings],
    build: Callable[[CommonSettings, Telemetry], Awaitable[tuple[GrpcService, int]]],
) -> int:
    """A service's `main()`: settings from the environment, logging, serve until SIGTERM.

    Exit codes: 0 after a clean shutdown, 1 when its address cannot be bound, 2 for a configuration
    error (named, never echoed), a Redis that is not what the settings say and a file a setting names
    that can no longer be read included. A start that fails has closed what it opened first
    (`closed_if_start_fails`), and says why in one line.
    """
    try:
        settings = load_settings()
    except ValidationError as exc:
        print(f"{name}: invalid settings: {invalid_settings(exc)}", file=sys.stderr)  # noqa: T201 - before logging exists
        return 2
    configure_logging(settings.log_level, name)
    bind_to_cpus(cpu_list(settings.cpu_affinity))
    telemetry = setup_telemetry(
        name, trace_file=settings.trace_export_file or None, metrics_file=settings.metrics_export_file or None
    )

    deadline = ShutdownDeadline()

    async def serve() -> None:
        service, _ = await build(settings, telemetry)
        tune_gc()
        await run_until_terminated(service, settings.grace_seconds, deadline)

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(serve())
    except (SecretKeyMissing, StoreMisconfigured, SettingFileUnreadable) as exc:
        print(f"{name}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except CannotListen as exc:
        print(f"{name}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    finally:
        telemetry.shutdown()  # flushes the last spans
        deadline.cancel()
    return 0
