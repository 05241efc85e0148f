"""Connector clients, built once per saved connector and reused across calls."""

from __future__ import annotations

from collections import OrderedDict

import aiohttp
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.connector_store import ConnectorStore
from libs.settings import DispatcherSettings
from services.dispatcher.connectors import RetryPolicy, build_connector
from services.dispatcher.connectors.base import Connector
from services.dispatcher.connectors.message_client import MessageClient

MAX_CLIENTS = 256


class ConnectorPool:
    def __init__(
        self,
        store: ConnectorStore,
        http: aiohttp.ClientSession,
        settings: DispatcherSettings,
        message_http: MessageClient | None = None,
    ) -> None:
        self._store = store
        self._http = http
        self._message_http = message_http
        self._settings = settings
        self._retry = RetryPolicy(
            max_retries=settings.provider_max_retries,
            base_seconds=settings.provider_retry_base_ms / 1000,
            cap_seconds=settings.provider_retry_max_ms / 1000,
            max_retry_after_seconds=settings.provider_max_retry_after_seconds,
            connect_timeout_seconds=settings.provider_connect_timeout_seconds,
            read_timeout_seconds=settings.provider_read_timeout_seconds,
        )
        # Keyed by the saved bytes, so an edited connector gets a fresh client.
        self._clients: OrderedDict[str, Connector] = OrderedDict()

    async def get(self, workspace_id: str, connector_id: str) -> tuple[pb.Connector, Connector]:
        config, fingerprint = await self._store.load_for_call(workspace_id, connector_id)
        client = self._clients.get(fingerprint)
        if client is None:
            client = build_connector(
                config,
                http=self._http,
                message_http=self._message_http,
                public_webhook_url=self._settings.public_webhook_url,
                retry=self._retry,
                allow_private=self._settings.allow_private_networks,
            )
            self._clients[fingerprint] = client
            while len(self._clients) > MAX_CLIENTS:
                _, evicted = self._clients.popitem(last=False)
                await evicted.close()
        else:
            self._clients.move_to_end(fingerprint)
        return config, client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
