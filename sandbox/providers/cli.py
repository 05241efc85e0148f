"""`python -m sandbox.providers`: run the sandbox providers on one port for the demo and manual tests."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from libs.arguments import number, port
from sandbox.processes import LOG_LEVELS, command_name, serve
from sandbox.providers.model import CUSTOM, DEFAULT_OUTBOX_LIMIT, SENDGRID, TWILIO, WHATSAPP, ProviderAccount
from sandbox.providers.server import ProviderSandbox
from sandbox.signing import SendGridSigner

# Sandbox-only credentials, so the command works with no arguments.
DEFAULT_SENDGRID_KEY = "SG.sandbox-key"
DEFAULT_TWILIO_ACCOUNT_SID = "AC" + "0" * 31 + "1"
DEFAULT_TWILIO_AUTH_TOKEN = "sandbox-auth-token"
DEFAULT_WHATSAPP_PHONE_NUMBER_ID = "106540352242922"
DEFAULT_WHATSAPP_ACCESS_TOKEN = "sandbox-access-token"
DEFAULT_WHATSAPP_APP_SECRET = "sandbox-app-secret"
DEFAULT_CUSTOM_API_KEY = "abcd1234"
DEFAULT_CUSTOM_API_SECRET = "sandbox-secret"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=command_name("python -m sandbox.providers"),
        description="Run sandbox SendGrid, Twilio, WhatsApp Cloud and a Vonage-style SMS gateway on one port.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8095)
    parser.add_argument("--receipts-url", help="receipts service base URL for SendGrid and WhatsApp webhooks")
    parser.add_argument(
        "--receipt-delay", type=number(float, 0), default=0.2, help="seconds before each receipt is posted"
    )
    parser.add_argument("--no-receipts", action="store_true", help="post no receipts at all")
    parser.add_argument("--outbox-limit", type=number(int, 1), default=DEFAULT_OUTBOX_LIMIT)
    parser.add_argument("--workspace", default="demo", help="default workspace ID of every account")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")

    sendgrid = parser.add_argument_group("SendGrid")
    sendgrid.add_argument("--sendgrid-key", default=DEFAULT_SENDGRID_KEY, help="API key to accept")
    sendgrid.add_argument("--sendgrid-workspace")
    sendgrid.add_argument("--sendgrid-connector", default="sendgrid")
    sendgrid.add_argument("--sendgrid-signing-key", type=Path, help="PEM EC P-256 private key (default: a new one)")

    twilio = parser.add_argument_group("Twilio")
    twilio.add_argument("--twilio-account-sid", default=DEFAULT_TWILIO_ACCOUNT_SID)
    twilio.add_argument("--twilio-auth-token", default=DEFAULT_TWILIO_AUTH_TOKEN)
    twilio.add_argument("--twilio-workspace")
    twilio.add_argument("--twilio-connector", default="twilio")

    whatsapp = parser.add_argument_group("WhatsApp Cloud")
    whatsapp.add_argument("--whatsapp-phone-number-id", default=DEFAULT_WHATSAPP_PHONE_NUMBER_ID)
    whatsapp.add_argument("--whatsapp-access-token", default=DEFAULT_WHATSAPP_ACCESS_TOKEN)
    whatsapp.add_argument("--whatsapp-app-secret", default=DEFAULT_WHATSAPP_APP_SECRET)
    whatsapp.add_argument("--whatsapp-workspace")
    whatsapp.add_argument("--whatsapp-connector", default="whatsapp")

    custom = parser.add_argument_group("custom SMS gateway (Vonage-style)")
    custom.add_argument("--custom-api-key", default=DEFAULT_CUSTOM_API_KEY)
    custom.add_argument("--custom-api-secret", default=DEFAULT_CUSTOM_API_SECRET)
    custom.add_argument("--custom-workspace")
    custom.add_argument("--custom-connector", default="custom")

    args = parser.parse_args(argv)
    if args.sendgrid_signing_key is not None:
        try:
            key = serialization.load_pem_private_key(args.sendgrid_signing_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            parser.error(f"--sendgrid-signing-key: {exc}")
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            parser.error("--sendgrid-signing-key must be an EC P-256 private key")
        args.sendgrid_signing_key = key
    return args


def build_sandbox(args: argparse.Namespace) -> ProviderSandbox:
    def workspace(value: str | None) -> str:
        return value or args.workspace

    accounts = [
        ProviderAccount(SENDGRID, args.sendgrid_key, workspace(args.sendgrid_workspace), args.sendgrid_connector),
        ProviderAccount(
            TWILIO,
            args.twilio_account_sid,
            workspace(args.twilio_workspace),
            args.twilio_connector,
            secret=args.twilio_auth_token,
        ),
        ProviderAccount(
            WHATSAPP,
            args.whatsapp_phone_number_id,
            workspace(args.whatsapp_workspace),
            args.whatsapp_connector,
            secret=args.whatsapp_app_secret,
            access_token=args.whatsapp_access_token,
        ),
        ProviderAccount(
            CUSTOM, args.custom_api_key, workspace(args.custom_workspace), args.custom_connector, args.custom_api_secret
        ),
    ]
    sandbox = ProviderSandbox(
        accounts,
        receipts_url=args.receipts_url,
        receipt_delay_seconds=args.receipt_delay,
        sendgrid_signer=SendGridSigner(args.sendgrid_signing_key),
        outbox_limit=args.outbox_limit,
    )
    sandbox.receipts.enabled = not args.no_receipts
    return sandbox


def main(argv: list[str] | None = None) -> None:
    try:
        args = _parse_args(argv)
        sandbox = build_sandbox(args)
    except ValueError as exc:  # a malformed account, e.g. a Twilio SID that is not AC + 32 hex
        raise SystemExit(f"error: {exc}") from exc
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    base = f"http://{args.host}:{args.port}"
    print(f"sandbox providers on {base}")  # noqa: T201 - a CLI talks to a person
    print(f"  SendGrid   {base}/v3/mail/send  key {args.sendgrid_key}")  # noqa: T201
    print(f"  Twilio     {base}/2010-04-01/Accounts/{args.twilio_account_sid}/Messages.json")  # noqa: T201
    print(f"  WhatsApp   {base}/v21.0/{args.whatsapp_phone_number_id}/messages")  # noqa: T201
    print(f"  custom     {base}/sms/json  api_key {args.custom_api_key}")  # noqa: T201
    print(f"  receipts   {args.receipts_url or '(no receipts URL: SendGrid/WhatsApp receipts skipped)'}")  # noqa: T201
    print("SendGrid event-webhook public key (the connector's webhook_secret):")  # noqa: T201
    print(sandbox.sendgrid_public_key, flush=True)  # noqa: T201
    serve(sandbox.build_app(), args.host, args.port)
