"""Builds the resolver's gRPC server from settings and dependencies."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from tokensend.resolver.v1 import resolver_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as pb_grpc

from libs.config_cache import ConfigCache, running_cache
from libs.config_index import IndexBackfill
from libs.crypto import SecretBox
from libs.rate_limit import RateLimiter
from libs.server import Closer, GrpcService, closed_if_start_fails, start_grpc_server
from libs.settings import ResolverSettings
from libs.store import prepare_store, service_store
from libs.telemetry import Telemetry, aiohttp_trace_configs
from services.resolver.circuit import CircuitBreaker
from services.resolver.configs import OAuthConfigStore, PiiApiConfigStore
from services.resolver.content_apis import ContentApiConfigStore, ContentApis, ContentCache
from services.resolver.egress import egress_session
from services.resolver.oauth import OAuthTokens, TokenBackoff
from services.resolver.pii_client import PiiApiClient
from services.resolver.servicer import ResolverServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ResolverService"].full_name


@dataclass
class ResolverDeps:
    redis: aioredis.Redis
    http: aiohttp.ClientSession
    box: SecretBox
    breaker: CircuitBreaker
    telemetry: Telemetry | None = None
    config_cache: ConfigCache | None = None  # made at start when not given

    @classmethod
    def from_settings(cls, settings: ResolverSettings, telemetry: Telemetry | None = None) -> ResolverDeps:
        box = SecretBox.from_settings(settings)  # first: a missing key stops startup before anything opens
        redis = service_store(settings, telemetry)
        return cls(
            redis=redis,
            # Through TOKENSEND_EGRESS_PROXY when set; else straight out, behind the network guard.
            http=egress_session(settings, aiohttp_trace_configs(telemetry)),
            box=box,
            breaker=CircuitBreaker(settings.circuit_failure_threshold, settings.circuit_open_seconds),
            telemetry=telemetry,
        )


async def build_server(settings: ResolverSettings, deps: ResolverDeps) -> tuple[GrpcService, int]:
    async def close_redis() -> None:
        await deps.redis.aclose()

    # In the order they open, to close last to first: at stop, or as soon as a step of the start fails.
    closers: list[Closer] = [close_redis, deps.http.close]
    async with closed_if_start_fails(closers):
        await prepare_store(deps.redis, settings.redis_url)
        cache = deps.config_cache = await running_cache(deps.config_cache, deps.redis, settings.config_cache_seconds)
        closers.append(cache.close)
        pii_configs = PiiApiConfigStore(
            deps.redis, deps.box, settings.config_versions_kept, settings.pin_ttl_seconds, cache
        )
        # Configs saved before the list index existed are indexed in the background; lists and deletes wait for it.
        backfill = IndexBackfill(deps.redis, [OAuthConfigStore.layout, ContentApiConfigStore.layout])
        backfill.start()
        closers.append(backfill.close)
        oauth_configs = OAuthConfigStore(deps.redis, deps.box, cache, backfill)
        tokens = OAuthTokens(
            deps.http, oauth_configs, settings.allow_private_networks, backoff=TokenBackoff.of(settings)
        )
        closers.append(tokens.close)
        limiter = RateLimiter(deps.redis)  # configs' max_requests_per_second, across every resolver process
        client = PiiApiClient(
            deps.http, tokens, oauth_configs, deps.breaker, settings, limiter, telemetry=deps.telemetry
        )
        content_apis = ContentApis(
            ContentApiConfigStore(
                deps.redis, deps.box, settings.config_versions_kept, settings.pin_ttl_seconds, cache, backfill
            ),
            oauth_configs,
            client,
            ContentCache(settings.content_cache_entries),
            settings.allow_private_networks,
        )
        servicer = ResolverServicer(settings, pii_configs, oauth_configs, tokens, client, content_apis)
        service = await start_grpc_server(
            settings,
            [lambda server: pb_grpc.add_ResolverServiceServicer_to_server(servicer, server)],
            [SERVICE_NAME],
            closers=closers,
            telemetry=deps.telemetry,
            store=deps.redis,
        )
    return service, service.port
