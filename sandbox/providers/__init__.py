"""Sandbox providers: SendGrid, Twilio, WhatsApp Cloud and a Vonage-style SMS gateway on one HTTP port.

They answer as the real providers do (status codes, bodies, headers, error codes), record every
accepted message in a bounded outbox "as the provider received it", misbehave on request
(latency, error statuses, rate limits, connection resets after the request was taken, refused
recipients) and post signed delivery receipts back to the receipts service. Used by the demo,
benchmarks and end-to-end tests; never imported by a service.

Endpoints
---------
``POST /v3/mail/send``                                 SendGrid Mail Send (Bearer API key)
``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` Twilio Messages (HTTP Basic SID:token, form)
``POST /{version}/{phone_number_id}/messages``           WhatsApp Cloud (Bearer token, JSON)
``POST /sms/json``                                     custom gateway, Vonage SMS shape (api_key/api_secret)

Admin (unauthenticated; this is a sandbox): ``GET /_admin/faults``, ``POST /_admin/faults/{provider}``
(a `Faults` JSON object, replaces that provider's), ``DELETE /_admin/faults``,
``GET /_admin/outbox?provider=&limit=`` (newest ``limit``, default 100, plus ``total``),
``DELETE /_admin/outbox``, ``GET /_admin/stats``, ``POST /_admin/stats/reset``,
``POST /_admin/receipts/drain`` (waits for pending receipts), ``GET /_admin/sendgrid/public-key``.

Receipts: SendGrid events to ``{receipts_url}/webhooks/sendgrid/{workspace}/{connector}`` (ECDSA
signed), WhatsApp statuses to ``{receipts_url}/webhooks/whatsapp/{workspace}/{connector}``
(``X-Hub-Signature-256``), Twilio callbacks to each message's ``StatusCallback``
(``X-Twilio-Signature``); the custom gateway sends none. Which statuses: see `receipts`.

Run it with ``python -m sandbox.providers --help``.
"""

from sandbox.providers.cli import main
from sandbox.providers.model import (
    CUSTOM,
    PROVIDERS,
    SENDGRID,
    TWILIO,
    WHATSAPP,
    Faults,
    Outbox,
    OutboxMessage,
    ProviderAccount,
    ReceiptScript,
    Stats,
)
from sandbox.providers.receipts import ReceiptSettings, default_receipt_script
from sandbox.providers.server import ProviderSandbox, start_providers

__all__ = [
    "CUSTOM",
    "PROVIDERS",
    "SENDGRID",
    "TWILIO",
    "WHATSAPP",
    "Faults",
    "Outbox",
    "OutboxMessage",
    "ProviderAccount",
    "ProviderSandbox",
    "ReceiptScript",
    "ReceiptSettings",
    "Stats",
    "default_receipt_script",
    "main",
    "start_providers",
]
