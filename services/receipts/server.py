"""Builds the receipts service from settings and dependencies: the gRPC server and the webhook app.

`build_server` and `start_webhooks` start one each (tests bind port 0);
`start_receipts` starts both as one `ReceiptsService`, whose webhook readiness
(`/readyz`) follows the gRPC server's Redis watch, and whose `stop` takes
health and readiness to NOT_SERVING, stops the webhooks and gRPC together
within one grace period, then closes Redis and the HTTP session.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from libs.blind_index import BlindIndex
from libs.config_cache import ConfigCache, running_cache
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from libs.netguard import customer_session
from libs.opt_out import KeywordStore
from libs.server import GrpcService, closed_if_start_fails, reading_setting_files, start_grpc_server
from libs.settings import ReceiptsSettings
from libs.store import prepare_store, service_store
from libs.suppressions import SuppressionStore
from libs.telemetry import Telemetry, aiohttp_trace_configs
from libs.tls import webhook_tls_context
from libs.unsubscribe import UnsubscribeTokens
from services.receipts.intake import ReceiptIntake
from services.receipts.ledger import DeliveryLedger
from services.receipts.opt_outs import OptOuts
from services.receipts.servicer import ReceiptsServicer
from services.receipts.sns import SnsCertificates
from services.receipts.webhooks import Readiness, build_webhook_app, start_webhook_app, stop_webhook_app

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReceiptsService"].full_name


def dedupe_keys(settings: ReceiptsSettings) -> list[bytes]:
    """Key the digests of provider event IDs, one derived from each secret key so every replica agrees:
    markers are written under the first, and looked up under every one, so a key rotation keeps what was
    seen before it (docs/operations.md)."""
    keys = settings.secret_keys()
    if not keys:
        return [os.urandom(32)]  # dev mode: one process, throwaway like the sealing key
    return list(dict.fromkeys(hashlib.sha256(b"tokensend receipts dedupe v1\x00" + key).digest() for key in keys))


@dataclass
class ReceiptsDeps:
    redis: aioredis.Redis
    http: aiohttp.ClientSession  # SNS certificates and subscription confirmations only
    box: SecretBox
    sns: SnsCertificates
    dedupe_keys: list[bytes]  # the first writes dedupe markers, every one reads them
    telemetry: Telemetry | None = None
    config_cache: ConfigCache | None = None  # connectors for webhooks: made by the first server started

    @classmethod
    def from_settings(cls, settings: ReceiptsSettings, telemetry: Telemetry | None = None) -> ReceiptsDeps:
        box = SecretBox.from_settings(settings)  # first: a missing key stops startup before anything opens
        redis = service_store(settings, telemetry)
        http = customer_session(
            settings.allow_private_networks, limit=16, trace_configs=aiohttp_trace_configs(telemetry)
        )
        sns_files = {
            "TOKENSEND_SNS_CA_FILE": settings.sns_ca_file or "",
            "TOKENSEND_SNS_SIGNING_CA_FILE": settings.sns_signing_ca_file or "",
        }
        try:
            with reading_setting_files(sns_files):
                sns = SnsCertificates(settings, http)  # reads its CA files
        except BaseException:
            # Nothing has gone through the session yet: detached, it is closed at once and its connector
            # holds no connection, where closing would need the event loop this method cannot wait on.
            http.detach()
            raise
        return cls(
            redis=redis,
            http=http,
            box=box,
            sns=sns,
            dedupe_keys=dedupe_keys(settings),
            telemetry=telemetry,
        )

    async def close(self) -> None:
        if self.config_cache is not None:
            await self.config_cache.close()
        await self.http.close()
        await self.redis.aclose()

    async def started_cache(self, settings: ReceiptsSettings) -> ConfigCache:
        """The connectors kept for webhooks, shared by the gRPC server and the webhook app."""
        self.config_cache = await running_cache(self.config_cache, self.redis, settings.config_cache_seconds)
        return self.config_cache


def build_ledger(settings: ReceiptsSettings, deps: ReceiptsDeps) -> DeliveryLedger:
    return DeliveryLedger(
        deps.redis,
        dedupe_key=deps.dedupe_keys[0],
        older_dedupe_keys=deps.dedupe_keys[1:],
        dedupe_ttl_seconds=settings.receipt_dedupe_ttl_seconds,
        stream_maxlen=settings.events_stream_maxlen,
        stats_ttl_seconds=settings.stats_ttl_seconds,
        stream_ttl_seconds=settings.events_stream_ttl_seconds,
    )


def build_intake(settings: ReceiptsSettings, deps: ReceiptsDeps, cache: ConfigCache | None = None) -> ReceiptIntake:
    ledger = build_ledger(settings, deps)
    opt_outs = OptOuts(
        deps.redis,
        SuppressionStore(deps.redis),
        BlindIndex(deps.redis, settings.secret_key, settings.blind_index_ttl_seconds),
        KeywordStore(deps.redis),
        UnsubscribeTokens(settings.secret_key),
        ledger,
    )
    return ReceiptIntake(
        settings, ConnectorStore(deps.redis, deps.box, cache), ledger, deps.sns, deps.telemetry, opt_outs=opt_outs
    )


async def build_server(settings: ReceiptsSettings, deps: ReceiptsDeps) -> tuple[GrpcService, int]:
    """The gRPC server, started; it closes the dependencies when stopped (stop the webhooks first), or
    at once if it fails to start."""
    async with closed_if_start_fails([deps.close]):
        await prepare_store(deps.redis, settings.redis_url)
        intake = build_intake(settings, deps, await deps.started_cache(settings))
        servicer = ReceiptsServicer(settings, deps.redis, intake, build_ledger(settings, deps))
        service = await start_grpc_server(
            settings,
            [lambda server: pb_grpc.add_ReceiptsServiceServicer_to_server(servicer, server)],
            [SERVICE_NAME],
            closers=[deps.close],
            telemetry=deps.telemetry,
            store=deps.redis,
        )
    service.drains.append(servicer.drain)
    return service, service.port


async def start_webhooks(
    settings: ReceiptsSettings, deps: ReceiptsDeps, readiness: Readiness | None = None
) -> tuple[web.AppRunner, int]:
    """The webhook app on `http_host:http_port` (port 0 binds a free one); `await runner.cleanup()` stops it.
    Without `readiness`, `/readyz` says ready until the app stops."""
    intake = build_intake(settings, deps, await deps.started_cache(settings))
    app = build_webhook_app(settings, intake, readiness=readiness)
    tls = None
    if settings.http_tls_cert_file:
        tls_files = {
            "TOKENSEND_HTTP_TLS_CERT_FILE": settings.http_tls_cert_file,
            "TOKENSEND_HTTP_TLS_KEY_FILE": settings.http_tls_key_file,
        }
        with reading_setting_files(tls_files):
            tls = webhook_tls_context(settings.http_tls_cert_file, settings.http_tls_key_file)
    return await start_webhook_app(app, settings.http_host, settings.http_port, settings.grace_seconds, tls)


class ReceiptsService(GrpcService):
    """The gRPC server with the webhooks beside it; stopping drains both at once."""

    webhooks: web.AppRunner | None = None

    async def stop_beside(self, grace: float) -> None:
        if self.webhooks is not None:
            await stop_webhook_app(self.webhooks, grace)  # while gRPC drains its calls
            self.webhooks = None


async def start_receipts(settings: ReceiptsSettings, deps: ReceiptsDeps) -> tuple[ReceiptsService, int]:
    """Both servers, started; the port returned is gRPC's."""
    grpc_service, port = await build_server(settings, deps)
    service = ReceiptsService(**{f.name: getattr(grpc_service, f.name) for f in fields(GrpcService)})
    # `/readyz` says what gRPC health says: NOT_SERVING while Redis is away, and from the start of shutdown.
    readiness = Readiness(service.store_answers)
    service.drains.append(readiness.drain)
    try:
        service.webhooks, _ = await start_webhooks(settings, deps, readiness)
    except BaseException:
        await service.stop(0)
        raise
    return service, port
