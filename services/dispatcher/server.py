"""Builds the dispatcher's gRPC server from settings and dependencies."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from libs.config_cache import ConfigCache, running_cache
from libs.config_index import IndexBackfill
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from libs.message_map import MessageMap
from libs.netguard import customer_session
from libs.server import Closer, GrpcService, closed_if_start_fails, reading_setting_files, start_grpc_server
from libs.settings import DispatcherSettings
from libs.store import prepare_store, service_store
from libs.telemetry import Telemetry, aiohttp_trace_configs, grpc_client_interceptors
from libs.tls import channel_credentials
from services.dispatcher.campaign import CampaignSender
from services.dispatcher.connector_pool import ConnectorPool
from services.dispatcher.connectors.message_client import MessageClient
from services.dispatcher.resolver_client import ResolverClient
from services.dispatcher.servicer import DispatcherServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DispatcherService"].full_name


@dataclass
class DispatcherDeps:
    redis: aioredis.Redis
    http: aiohttp.ClientSession
    box: SecretBox
    resolver: ResolverClient
    telemetry: Telemetry | None = None
    # For one-request-per-message providers (pyreqwest; the batch span covers their requests).
    message_http: MessageClient | None = None
    config_cache: ConfigCache | None = None  # made at start when not given

    @classmethod
    def from_settings(cls, settings: DispatcherSettings, telemetry: Telemetry | None = None) -> DispatcherDeps:
        # What can refuse to start (a missing key, a TLS file no longer readable) comes before anything
        # opens: nothing is left open by a failure here.
        box = SecretBox.from_settings(settings)
        credentials = None
        if settings.resolver_tls_ca_file or settings.resolver_tls_cert_file:
            resolver_tls_files = {
                "TOKENSEND_RESOLVER_TLS_CA_FILE": settings.resolver_tls_ca_file,
                "TOKENSEND_RESOLVER_TLS_CERT_FILE": settings.resolver_tls_cert_file,
                "TOKENSEND_RESOLVER_TLS_KEY_FILE": settings.resolver_tls_key_file,
            }
            with reading_setting_files(resolver_tls_files):
                credentials = channel_credentials(
                    settings.resolver_tls_ca_file, settings.resolver_tls_cert_file, settings.resolver_tls_key_file
                )
        redis = service_store(settings, telemetry)
        return cls(
            redis=redis,
            http=customer_session(
                settings.allow_private_networks,
                limit=settings.send_concurrency * 2,
                trace_configs=aiohttp_trace_configs(telemetry),
            ),
            box=box,
            resolver=ResolverClient(
                settings.resolver_addr,
                settings.resolver_timeout_seconds,
                grpc_client_interceptors(telemetry),
                token=settings.resolver_token.get_secret_value() if settings.resolver_token else None,
                credentials=credentials,
                server_name=settings.resolver_tls_server_name,
            ),
            telemetry=telemetry,
            message_http=MessageClient(settings.allow_private_networks, max_connections=settings.send_concurrency * 2),
        )


async def build_server(settings: DispatcherSettings, deps: DispatcherDeps) -> tuple[GrpcService, int]:
    async def close_redis() -> None:
        await deps.redis.aclose()

    async def close_message_http() -> None:
        if deps.message_http is not None:
            await deps.message_http.close()

    # In the order they open, to close last to first: at stop, or as soon as a step of the start fails.
    closers: list[Closer] = [close_redis, deps.http.close, deps.resolver.close, close_message_http]
    async with closed_if_start_fails(closers):
        await prepare_store(deps.redis, settings.redis_url)
        cache = deps.config_cache = await running_cache(deps.config_cache, deps.redis, settings.config_cache_seconds)
        closers.append(cache.close)
        # Connectors saved before the list index existed are indexed in the background; lists and deletes wait for it.
        backfill = IndexBackfill(deps.redis, [ConnectorStore.layout])
        backfill.start()
        closers.append(backfill.close)
        connectors = ConnectorStore(deps.redis, deps.box, cache, backfill)
        pool = ConnectorPool(connectors, deps.http, settings, deps.message_http)
        closers.append(pool.close)
        sender = CampaignSender(
            deps.redis, deps.resolver, MessageMap(deps.redis, settings.message_ttl_seconds), settings, deps.telemetry
        )
        servicer = DispatcherServicer(settings, connectors, pool, sender, deps.resolver)
        service = await start_grpc_server(
            settings,
            [lambda server: pb_grpc.add_DispatcherServiceServicer_to_server(servicer, server)],
            [SERVICE_NAME],
            closers=closers,
            telemetry=deps.telemetry,
            store=deps.redis,
        )
    service.drains.append(servicer.drain)
    service.winds_down.append(sender.wind_down)
    return service, service.port
