"""Provider connectors: validating a saved Connector and building the client that sends through it.

`validate_connector` runs when a connector is saved; `build_connector` turns a
saved (valid) connector into a client implementing `base.Connector`. Each
client talks to the real provider API, or to `base_url` when it is set (how
tests reach local peers).
"""

from __future__ import annotations

import aiohttp
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors.base import Connector
from services.dispatcher.connectors.custom_http import CustomHttpConnector
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.message_client import MessageClient
from services.dispatcher.connectors.sendgrid import SendGridConnector
from services.dispatcher.connectors.ses import SesConnector
from services.dispatcher.connectors.smtp import SmtpConnector
from services.dispatcher.connectors.twilio import TwilioConnector
from services.dispatcher.connectors.validation import parse_smtp_url, validate_connector
from services.dispatcher.connectors.whatsapp import WhatsAppCloudConnector

__all__ = ["INBOUND", "PROVIDER_NAMES", "RECEIPTLESS", "RetryPolicy", "build_connector", "validate_connector"]

K = pb.ConnectorKind

PROVIDER_NAMES: dict[int, str] = {
    K.CONNECTOR_KIND_SENDGRID: "sendgrid",
    K.CONNECTOR_KIND_SES: "ses",
    K.CONNECTOR_KIND_SMTP: "smtp",
    K.CONNECTOR_KIND_TWILIO: "twilio",
    K.CONNECTOR_KIND_WHATSAPP_CLOUD: "whatsapp",
    K.CONNECTOR_KIND_CUSTOM_HTTP: "custom",
}

# Kinds whose messages never get a receipt, a one-click unsubscribe or anything else that reads the
# message map: custom gateways (DESIGN: "Custom connectors have no receipts"). Their sends write no
# map entry and no provider-ID index. SMTP has no receipts either, but its emails' unsubscribe links
# read the map to count the unsubscribe in the campaign's funnel.
RECEIPTLESS = frozenset({K.CONNECTOR_KIND_CUSTOM_HTTP})
# Connectors whose customers' replies reach the receipts service (Twilio's incoming-message webhook,
# WhatsApp Cloud's messages): only their sends link a number's blind index to the recipient, the
# link an inbound STOP is matched by. Another connector's link would never be read, only kept.
INBOUND = frozenset({K.CONNECTOR_KIND_TWILIO, K.CONNECTOR_KIND_WHATSAPP_CLOUD})


def build_connector(
    connector: pb.Connector,
    *,
    http: aiohttp.ClientSession,
    public_webhook_url: str,
    retry: RetryPolicy,
    allow_private: bool,
    message_http: MessageClient | None = None,
) -> Connector:
    """The client for a validated connector. HTTP connectors share `http`; SES and SMTP hold their own transport.

    Connectors that make one request per message use `message_http` when given (the dispatcher
    always gives it); otherwise `http`, with its tracing hooks turned off per request.
    """
    per_message = message_http or http
    credentials = dict(connector.credentials)
    kind = connector.kind
    if kind == K.CONNECTOR_KIND_SENDGRID:
        return SendGridConnector(
            api_key=credentials["api_key"],
            sender=connector.sender,
            http=http,
            retry=retry,
            base_url=connector.base_url,
        )
    if kind == K.CONNECTOR_KIND_SES:
        return SesConnector(
            access_key_id=credentials["access_key_id"],
            secret_access_key=credentials["secret_access_key"],
            region=credentials["region"],
            sender=connector.sender,
            retry=retry,
            configuration_set=connector.configuration_set,
            base_url=connector.base_url,
            allow_private=allow_private,
        )
    if kind == K.CONNECTOR_KIND_SMTP:
        host, port, implicit_tls = parse_smtp_url(connector.base_url)
        return SmtpConnector(
            host=host,
            port=port,
            implicit_tls=implicit_tls,
            sender=connector.sender,
            retry=retry,
            allow_private=allow_private,
            username=credentials.get("username", ""),
            password=credentials.get("password", ""),
            ca_cert_pem=credentials.get("ca_cert_pem", ""),
        )
    if kind == K.CONNECTOR_KIND_TWILIO:
        return TwilioConnector(
            account_sid=credentials["account_sid"],
            auth_token=credentials["auth_token"],
            sender=connector.sender,
            workspace_id=connector.workspace_id,
            connector_id=connector.connector_id,
            public_webhook_url=public_webhook_url,
            http=per_message,
            suppress_tracing=message_http is None,
            retry=retry,
            base_url=connector.base_url,
        )
    if kind == K.CONNECTOR_KIND_WHATSAPP_CLOUD:
        return WhatsAppCloudConnector(
            access_token=credentials["access_token"],
            phone_number_id=connector.sender,
            http=per_message,
            suppress_tracing=message_http is None,
            retry=retry,
            base_url=connector.base_url,
        )
    if kind == K.CONNECTOR_KIND_CUSTOM_HTTP:
        return CustomHttpConnector(
            template=connector.custom_http,
            sender=connector.sender,
            credentials=credentials,
            http=per_message,
            suppress_tracing=message_http is None,
            retry=retry,
            base_url=connector.base_url,
        )
    raise ValueError(f"no connector for kind {kind}")
