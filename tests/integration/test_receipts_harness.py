"""Shared pieces of the receipts tests: the service on port 0, an SNS https peer, signed receipts, PII canaries.

The payload builders follow each provider's documented shapes and put a
canary value (`Pii`) in every field that can hold one. Other receipts test
modules import from here; the tests at the bottom check the harness itself.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import ipaddress
import json
import os
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import grpc
import pytest
import yarl
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from libs.campaign_stats import add_counts, read_counts
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from libs.message_map import MessageMap, MessageRecord, is_message_id, split_message_id
from libs.settings import ReceiptsSettings
from libs.telemetry import Telemetry
from sandbox.signing import SendGridSigner, SnsSigner, twilio_signature, whatsapp_signature
from services.receipts.ledger import statuses_key
from services.receipts.server import ReceiptsDeps, build_server, start_webhooks
from tests.canary import redis_dump  # noqa: F401 - the receipts tests import it from here
from tests.conftest import new_secret_key

pytestmark = pytest.mark.integration

WS = "ws-receipts"
PUBLIC_URL = "https://receipts.example.test/hooks"  # as providers see us, behind a proxy
TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:ses-events"


# --- canaries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pii:
    """Unique canary PII; every text value holds `tag`, so any fragment that leaks is found."""

    tag: str
    digits: str

    @classmethod
    def new(cls) -> Pii:
        tag = "cnry" + uuid.uuid4().hex[:10]
        return cls(tag=tag, digits=f"4474{int(tag[4:], 16) % 10**8:08d}")

    @property
    def email(self) -> str:
        return f"jane.{self.tag}@{self.tag}-mail.example"

    @property
    def phone(self) -> str:
        return "+" + self.digits

    @property
    def spaced_phone(self) -> str:
        d = self.digits
        return f"+{d[:2]} {d[2:6]} {d[6:]}"

    @property
    def name(self) -> str:
        return f"Jane{self.tag} Doe{self.tag}"

    @property
    def ip(self) -> str:
        n = int(self.tag[4:], 16)
        return f"198.{51 + n % 40}.{n // 40 % 250}.{n // 10000 % 250 + 1}"

    @property
    def ipv6(self) -> str:
        return f"2001:db8:{self.tag[4:8]}:{self.tag[8:12]}::17"

    @property
    def user_agent(self) -> str:
        return f"Mozilla/5.0 (CanaryPhone; {self.tag}) AppleWebKit/605.1.15"

    @property
    def url(self) -> str:
        return f"https://shop.example/offer?u={self.tag}&email={self.email}"

    @property
    def bounce_text(self) -> str:
        return f"smtp; 550 5.1.1 <{self.email}>: user {self.name} unknown at {self.ip} / {self.ipv6} ({self.phone})"

    @property
    def wamid(self) -> str:
        # A real wamid is base64 of a record that holds the recipient's number.
        return "wamid." + base64.b64encode(f"\x15\x18\x0b{self.digits}\x15\x02\x00\x11{self.tag}".encode()).decode()

    def needles(self) -> set[bytes]:
        values = {
            self.tag,
            self.email,
            self.phone,
            self.digits,
            self.digits[2:],
            self.spaced_phone,
            self.name,
            self.ip,
            self.ipv6,
            self.user_agent,
            self.url,
            self.wamid,
            self.wamid.removeprefix("wamid."),
        }
        return {v.encode() for v in values} | {v.lower().encode() for v in values}


def log_text(caplog) -> list[bytes]:
    """Each captured record as it would be written, traceback included."""
    texts = []
    for record in caplog.records:
        parts = [record.getMessage(), str(record.args), record.exc_text or ""]
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(repr(record.exc_info[1]))
        texts.append(" ".join(parts).encode())
    return texts


def leaks(needles: Iterable[bytes], haystacks: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    found = []
    lowered = [h.lower() for h in haystacks if h]
    for needle in needles:
        for haystack in lowered:
            if needle.lower() in haystack:
                found.append((needle, haystack[:200]))
    return found


# --- provider payloads ----------------------------------------------------------------------


def now_ts() -> int:
    return int(time.time())


def sendgrid_event(
    event: str, pii: Pii, *, message_id: str = "", campaign: str = "", instance: str = "", **extra: Any
) -> dict[str, Any]:
    """One SendGrid event as documented, with PII in every field that can hold it."""
    item: dict[str, Any] = {
        "email": pii.email,
        "timestamp": now_ts(),
        "smtp-id": f"<{pii.tag}@{pii.tag}-mail.example>",
        "event": event,
        "category": [pii.name, "newsletter"],
        "sg_event_id": uuid.uuid4().hex,
        "sg_message_id": f"XMSG{uuid.uuid4().hex[:12]}.recvd-{pii.tag}-1",
        "firstname": pii.name,
        "marketing_campaign_name": pii.name,
        "tls": 1,
        "cert_err": 0,
        "asm_group_id": 7,
    }
    if message_id:
        item["tokensend_message_id"] = message_id
    if campaign:
        item["tokensend_campaign"] = campaign
    if instance:
        item["tokensend_instance"] = instance
    if event in ("processed", "delivered", "deferred", "bounce", "dropped"):
        item["ip"] = pii.ip
    if event == "delivered":
        item["response"] = f"250 2.0.0 OK {pii.email} {pii.ip}"
    if event == "deferred":
        item.update(response=f"400 4.2.2 mailbox of {pii.name} full {pii.email}", attempt="5")
    if event == "bounce":
        item.update(
            type="bounce",
            status="5.1.1",
            reason=pii.bounce_text,
            bounce_classification="Invalid Address",
        )
    if event == "dropped":
        item.update(reason=f"Bounced Address {pii.email}", status="5.0.0")
    if event in ("open", "click", "spamreport", "unsubscribe", "group_unsubscribe", "group_resubscribe"):
        item.update(useragent=pii.user_agent, ip=pii.ip)
    if event == "open":
        item["sg_machine_open"] = False
    if event == "click":
        item.update(url=pii.url, url_offset={"index": 0, "type": "html"})
    if event in ("group_unsubscribe", "group_resubscribe"):
        item["url"] = pii.url
    item.update(extra)
    return item


SENDGRID_EVENTS = (
    "processed",
    "deferred",
    "delivered",
    "open",
    "click",
    "bounce",
    "dropped",
    "spamreport",
    "unsubscribe",
    "group_unsubscribe",
    "group_resubscribe",
)

SES_EVENT_TYPES = (
    "Send",
    "Delivery",
    "Bounce",
    "Complaint",
    "Reject",
    "Open",
    "Click",
    "DeliveryDelay",
    "Rendering Failure",
    "Subscription",
)


def ses_mail(pii: Pii, ses_message_id: str, *, message_id: str, campaign: str, notification: bool) -> dict[str, Any]:
    mail: dict[str, Any] = {
        "timestamp": "2024-05-01T12:00:00.000Z",
        "source": f"{pii.name} <{pii.email}>",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/example.com",
        "sendingAccountId": "123456789012",
        "messageId": ses_message_id,
        "destination": [pii.email, f"{pii.phone}@sms.example"],
        "headersTruncated": False,
        "headers": [
            {"name": "From", "value": f"{pii.name} <{pii.email}>"},
            {"name": "To", "value": pii.email},
            {"name": "Subject", "value": f"Hello {pii.name}"},
            {"name": "X-Originating-IP", "value": f"[{pii.ip}]"},
            {"name": "X-Phone", "value": pii.spaced_phone},
        ],
        "commonHeaders": {
            "from": [f"{pii.name} <{pii.email}>"],
            "to": [pii.email],
            "messageId": f"<{pii.tag}@example.com>",
            "subject": f"Hello {pii.name}",
        },
    }
    if notification:
        mail.update(sourceIp=pii.ip, callerIdentity=f"user-{pii.tag}")
    else:
        tags: dict[str, list[str]] = {
            "ses:source-ip": [pii.ip],
            "ses:from-domain": [f"{pii.tag}-mail.example"],
            "ses:caller-identity": [pii.name],
        }
        if message_id:
            tags["tokensend_message_id"] = [message_id]
        if campaign:
            tags["tokensend_campaign"] = [campaign]
        mail["tags"] = tags
    return mail


def ses_detail(kind: str, pii: Pii, *, bounce_type: str = "Permanent") -> tuple[str, dict[str, Any]]:
    stamp = "2024-05-01T12:00:05.000Z"
    if kind == "Bounce":
        return "bounce", {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": [
                {"emailAddress": pii.email, "action": "failed", "status": "5.1.1", "diagnosticCode": pii.bounce_text}
            ],
            "timestamp": stamp,
            "feedbackId": f"0100-{pii.tag}",
            "reportingMTA": f"dsn; a8-{pii.ip}.smtp-out.amazonses.com",
            "remoteMtaIp": pii.ip,
        }
    if kind == "Complaint":
        return "complaint", {
            "complainedRecipients": [{"emailAddress": pii.email}],
            "timestamp": stamp,
            "feedbackId": f"0100-{pii.tag}",
            "userAgent": pii.user_agent,
            "complaintFeedbackType": "abuse",
            "arrivalDate": stamp,
            "complaintSubType": None,
        }
    if kind == "Delivery":
        return "delivery", {
            "timestamp": stamp,
            "processingTimeMillis": 546,
            "recipients": [pii.email],
            "smtpResponse": f"250 ok dirdel {pii.email}",
            "reportingMTA": f"a8-70.smtp-out.{pii.tag}.amazonses.com",
            "remoteMtaIp": pii.ip,
        }
    if kind == "Send":
        return "send", {}
    if kind == "Reject":
        return "reject", {"reason": "Bad content"}
    if kind == "Open":
        return "open", {"ipAddress": pii.ip, "timestamp": stamp, "userAgent": pii.user_agent}
    if kind == "Click":
        return "click", {
            "ipAddress": pii.ipv6,
            "timestamp": stamp,
            "userAgent": pii.user_agent,
            "link": pii.url,
            "linkTags": {"name": [pii.name]},
        }
    if kind == "DeliveryDelay":
        return "deliveryDelay", {
            "timestamp": stamp,
            "delayType": "MailboxFull",
            "expirationTime": "2024-05-02T12:00:00.000Z",
            "delayedRecipients": [{"emailAddress": pii.email, "status": "4.2.2", "diagnosticCode": pii.bounce_text}],
            "reportingMTA": f"dsn; {pii.ip}",
            "remoteMtaIp": pii.ip,
        }
    if kind == "Rendering Failure":
        return "failure", {
            "errorMessage": f"Attribute 'name' is not present in the rendering data: {pii.name} {pii.email}",
            "templateName": "welcome",
        }
    if kind == "Subscription":
        return "subscription", {
            "contactList": f"list-{pii.tag}",
            "timestamp": stamp,
            "source": "UnsubscribeHeader",
            "newTopicPreferences": {
                "unsubscribeAll": True,
                "topicSubscriptionStatus": [{"topicName": "offers", "subscriptionStatus": "OptOut"}],
            },
            "oldTopicPreferences": {"unsubscribeAll": False},
        }
    raise ValueError(kind)


def ses_message(
    kind: str,
    pii: Pii,
    *,
    message_id: str = "",
    campaign: str = "",
    ses_message_id: str = "",
    notification: bool = False,
    bounce_type: str = "Permanent",
) -> dict[str, Any]:
    """An SES event (`eventType`) or notification (`notificationType`), as SNS carries it in `Message`."""
    key, detail = ses_detail(kind, pii, bounce_type=bounce_type)
    mail = ses_mail(
        pii,
        ses_message_id or f"0100{uuid.uuid4().hex}",
        message_id=message_id,
        campaign=campaign,
        notification=notification,
    )
    document: dict[str, Any] = {"notificationType" if notification else "eventType": kind, "mail": mail}
    if detail or key == "send":
        document[key] = detail
    return document


def sns_timestamp(seconds_ago: float = 0) -> str:
    """An SNS envelope's Timestamp, as SNS writes it (messages older than the dedupe window are refused)."""
    moment = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sns_confirmation(subscribe_url: str, token: str) -> dict:
    """An SNS SubscriptionConfirmation envelope for TOPIC_ARN, to sign."""
    return {
        "Type": "SubscriptionConfirmation",
        "MessageId": str(uuid.uuid4()),
        "Token": token,
        "TopicArn": TOPIC_ARN,
        "Message": "You have chosen to subscribe to the topic. To confirm, visit the SubscribeURL.",
        "SubscribeURL": subscribe_url,
        "Timestamp": sns_timestamp(),
    }


def sns_notification(message: dict[str, Any] | str, pii: Pii | None = None, *, sns_message_id: str = "") -> dict:
    envelope = {
        "Type": "Notification",
        "MessageId": sns_message_id or str(uuid.uuid4()),
        "TopicArn": TOPIC_ARN,
        "Subject": f"Amazon SES Email Event Notification {pii.name if pii else ''}".strip(),
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": sns_timestamp(),
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }
    return envelope


def twilio_params(
    status: str, pii: Pii, *, sid: str = "", error_code: str = "", channel_prefix: str = ""
) -> list[tuple[str, str]]:
    """A status callback's form parameters, including the ones Twilio adds without notice."""
    sid = sid or "SM" + uuid.uuid4().hex
    params = [
        ("AccountSid", "AC" + "1" * 32),
        ("ApiVersion", "2010-04-01"),
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("MessageStatus", status),
        ("SmsStatus", status),
        ("To", channel_prefix + pii.phone),
        ("From", channel_prefix + "+15005550006"),
        ("Body", f"Hi {pii.name}, your code is 1234. Reply to {pii.email}"),
        ("ToCity", f"City{pii.tag}"),
        ("FromCountry", "US"),
        ("ChannelToAddress", pii.spaced_phone),
        ("RawDlrDoneDate", "2405011200"),
    ]
    if error_code:
        params += [("ErrorCode", error_code), ("ErrorMessage", f"Unreachable {pii.phone} {pii.email}")]
    return params


def whatsapp_status(
    status: str, pii: Pii, *, message_id: str = "", wamid: str = "", error_code: int = 0, timestamp: int = 0
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": wamid or pii.wamid,
        "status": status,
        "timestamp": str(timestamp or now_ts()),
        "recipient_id": pii.digits,
        "conversation": {
            "id": f"conv-{pii.tag}",
            "expiration_timestamp": str(now_ts() + 86400),
            "origin": {"type": "marketing"},
        },
        "pricing": {"billable": True, "pricing_model": "CBP", "category": "marketing"},
    }
    if message_id:
        item["biz_opaque_callback_data"] = message_id
    if error_code:
        item["errors"] = [
            {
                "code": error_code,
                "title": f"Message undeliverable to {pii.phone}",
                "message": f"Message undeliverable {pii.name}",
                "error_data": {"details": f"{pii.email} {pii.ip} {pii.spaced_phone}"},
                "href": pii.url,
            }
        ]
    return item


def whatsapp_body(statuses: Sequence[dict[str, Any]], pii: Pii, *, inbound: bool = True) -> dict[str, Any]:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "106540352242922"},
        "statuses": list(statuses),
    }
    if inbound:
        value["contacts"] = [{"profile": {"name": pii.name}, "wa_id": pii.digits}]
        value["messages"] = [
            {
                "from": pii.digits,
                "id": pii.wamid,
                "timestamp": str(now_ts()),
                "type": "text",
                "text": {"body": f"STOP {pii.email}"},
            }
        ]
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}],
    }  # noqa: E501


# --- SNS peer -------------------------------------------------------------------------------


@functools.cache
def shared_sns_signer() -> SnsSigner:
    return SnsSigner()  # RSA key generation is slow: one per test session


def _server_certificate(signer: SnsSigner) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(signer.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.ca_key.public_key()), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(signer.ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class SnsPeer:
    """A local https SNS: serves the signing certificate and records subscription confirmations."""

    signer: SnsSigner
    directory: str
    port: int = 0
    requests: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None
    # A path here is answered only once its event is set (a slow SNS), with the status given in `statuses`.
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def ca_file(self) -> str:
        return os.path.join(self.directory, "ca.pem")

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert_url(self) -> str:
        return f"{self.base}/SimpleNotificationService-test.pem"

    def subscribe_url(self, token: str) -> str:
        return f"{self.base}/?{urlencode({'Action': 'ConfirmSubscription', 'TopicArn': TOPIC_ARN, 'Token': token})}"

    def count(self, prefix: str) -> int:
        return sum(1 for r in self.requests if r.startswith(prefix))

    async def start(self) -> None:
        with open(self.ca_file, "wb") as handle:
            handle.write(self.signer.ca_pem)
        cert_pem, key_pem = _server_certificate(self.signer)
        cert_file, key_file = os.path.join(self.directory, "srv.pem"), os.path.join(self.directory, "srv.key")
        with open(cert_file, "wb") as handle:
            handle.write(cert_pem)
        with open(key_file, "wb") as handle:
            handle.write(key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)

        async def serve(request: web.Request) -> web.Response:
            self.requests.append(request.path_qs)
            if request.path in self.held:
                await self.held[request.path].wait()
            if request.path in self.statuses:
                return web.Response(status=self.statuses[request.path])
            if request.path.endswith(".pem"):
                return web.Response(body=self.signer.cert_pem, content_type="application/x-pem-file")
            if request.query.get("Action") == "ConfirmSubscription":
                return web.Response(text="<ConfirmSubscriptionResponse/>", content_type="text/xml")
            return web.Response(status=404)

        app = web.Application()
        app.router.add_get("/{tail:.*}", serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def sign(self, envelope: dict[str, Any], version: int = 1, cert_url: str = "") -> dict[str, str]:
        return self.signer.sign(envelope, cert_url or self.cert_url, version)


# --- the running service --------------------------------------------------------------------


@dataclass
class ProviderSecrets:
    sendgrid: SendGridSigner = field(default_factory=SendGridSigner)
    twilio_auth_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    whatsapp_app_secret: str = field(default_factory=lambda: uuid.uuid4().hex)
    whatsapp_verify_token: str = field(default_factory=lambda: uuid.uuid4().hex)


CONNECTORS = {"sendgrid": "sg-main", "ses": "ses-main", "twilio": "tw-main", "whatsapp": "wa-main"}


def receipts_settings(redis_url: str, sns: SnsPeer, **overrides: Any) -> ReceiptsSettings:
    values: dict[str, Any] = dict(
        redis_url=redis_url,
        secret_key=new_secret_key(),
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        allow_private_networks=True,
        grace_seconds=1,
        public_webhook_url=PUBLIC_URL,
        sns_cert_host_pattern=rf"^127\.0\.0\.1:{sns.port}$",
        sns_ca_file=sns.ca_file,
        sns_signing_ca_file=sns.ca_file,
        events_stream_block_ms=200,
    )
    values.update(overrides)
    return ReceiptsSettings(**values)


@dataclass
class Reply:
    status: int
    body: dict[str, Any] | str

    def json(self) -> dict[str, Any]:
        assert isinstance(self.body, dict), self.body
        return self.body


@dataclass
class RunningReceipts:
    settings: ReceiptsSettings
    deps: ReceiptsDeps
    stub: pb_grpc.ReceiptsServiceStub
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession
    webhook_port: int
    sns: SnsPeer
    secrets: ProviderSecrets
    redis: Any

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}"

    def path(self, provider: str, connector_id: str = "", workspace_id: str = WS) -> str:
        return f"/webhooks/{provider}/{workspace_id}/{connector_id or CONNECTORS[provider]}"

    def public_url(self, provider: str, connector_id: str = "", workspace_id: str = WS, query: str = "") -> str:
        return PUBLIC_URL + self.path(provider, connector_id, workspace_id) + (f"?{query}" if query else "")

    async def post(
        self,
        provider: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        connector_id: str = "",
        workspace_id: str = WS,
        query: str = "",
    ) -> Reply:
        url = self.local_url + self.path(provider, connector_id, workspace_id) + (f"?{query}" if query else "")
        # encoded=True: send the query byte for byte, as a provider does (Twilio signs it as written).
        async with self.http.post(yarl.URL(url, encoded=True), data=body, headers=headers or {}) as reply:
            text = await reply.text()
            try:
                return Reply(reply.status, json.loads(text))
            except ValueError:
                return Reply(reply.status, text)

    # Signed posts, as each provider makes them.
    def sendgrid_request(self, events: Any, *, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
        body = events if isinstance(events, bytes) else json.dumps(events).encode()
        headers = self.secrets.sendgrid.headers(body, timestamp)
        return body, {**headers, "Content-Type": "application/json"}

    async def post_sendgrid(self, events: Any, **kwargs: Any) -> Reply:
        body, headers = self.sendgrid_request(events, timestamp=kwargs.pop("timestamp", None))
        return await self.post("sendgrid", body, headers, **kwargs)

    def ses_request(self, envelope: dict[str, Any], version: int = 1) -> tuple[bytes, dict[str, str]]:
        signed = self.sns.sign(envelope, version)
        return json.dumps(signed).encode(), {
            "Content-Type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": envelope["Type"],
        }  # noqa: E501

    async def post_ses(self, message: dict[str, Any], pii: Pii | None = None, version: int = 1, **kwargs: Any) -> Reply:
        envelope = sns_notification(message, pii, sns_message_id=kwargs.pop("sns_message_id", ""))
        body, headers = self.ses_request(envelope, version)
        return await self.post("ses", body, headers, **kwargs)

    def twilio_request(
        self,
        params: list[tuple[str, str]],
        message_id: str,
        *,
        connector_id: str = "",
        token: str = "",
        workspace_id: str = WS,
    ) -> tuple[bytes, dict[str, str], str]:
        query = urlencode({"message_id": message_id}) if message_id else ""
        signed_url = self.public_url("twilio", connector_id, workspace_id, query=query)
        headers = {
            "X-Twilio-Signature": twilio_signature(self.secrets.twilio_auth_token, signed_url, params),
            "Content-Type": "application/x-www-form-urlencoded",
            "I-Twilio-Idempotency-Token": token or uuid.uuid4().hex,
        }
        return urlencode(params).encode(), headers, query

    async def post_twilio(self, params: list[tuple[str, str]], message_id: str, **kwargs: Any) -> Reply:
        body, headers, query = self.twilio_request(
            params, message_id, connector_id=kwargs.get("connector_id", ""), token=kwargs.pop("token", "")
        )
        return await self.post("twilio", body, headers, query=query, **kwargs)

    def whatsapp_request(self, document: Any) -> tuple[bytes, dict[str, str]]:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        return body, {
            "X-Hub-Signature-256": whatsapp_signature(self.secrets.whatsapp_app_secret, body),
            "Content-Type": "application/json",
        }

    async def post_whatsapp(self, document: Any, **kwargs: Any) -> Reply:
        body, headers = self.whatsapp_request(document)
        return await self.post("whatsapp", body, headers, **kwargs)


async def save_connectors(redis, settings: ReceiptsSettings, secrets: ProviderSecrets, workspace_id: str = WS) -> None:
    box = SecretBox.from_settings(settings)
    store = ConnectorStore(redis, box)
    common = dict(workspace_id=workspace_id)
    await store.save(
        dpb.Connector(
            connector_id=CONNECTORS["sendgrid"],
            kind=dpb.CONNECTOR_KIND_SENDGRID,
            channel=common_pb2.CHANNEL_EMAIL,
            credentials={"api_key": "SG.x"},
            webhook_secret=secrets.sendgrid.public_key_b64,
            **common,
        )
    )
    await store.save(
        dpb.Connector(
            connector_id=CONNECTORS["ses"],
            kind=dpb.CONNECTOR_KIND_SES,
            channel=common_pb2.CHANNEL_EMAIL,
            credentials={
                "access_key_id": "AKIA",
                "secret_access_key": "x",
                "region": "us-east-1",
                "sns_topic_arns": TOPIC_ARN,
            },
            **common,
        )
    )
    await store.save(
        dpb.Connector(
            connector_id=CONNECTORS["twilio"],
            kind=dpb.CONNECTOR_KIND_TWILIO,
            channel=common_pb2.CHANNEL_SMS,
            credentials={"account_sid": "AC" + "1" * 32, "auth_token": secrets.twilio_auth_token},
            **common,
        )
    )
    await store.save(
        dpb.Connector(
            connector_id=CONNECTORS["whatsapp"],
            kind=dpb.CONNECTOR_KIND_WHATSAPP_CLOUD,
            channel=common_pb2.CHANNEL_WHATSAPP,
            credentials={"access_token": "EAAB", "verify_token": secrets.whatsapp_verify_token},
            webhook_secret=secrets.whatsapp_app_secret,
            **common,
        )
    )


@asynccontextmanager
async def running_receipts(
    redis, redis_url: str, telemetry: Telemetry | None = None, **overrides: Any
) -> AsyncIterator[RunningReceipts]:
    """The service (gRPC and webhooks on port 0), an SNS peer, and connectors for every provider in `WS`."""
    with tempfile.TemporaryDirectory() as directory:
        sns = SnsPeer(shared_sns_signer(), directory)
        await sns.start()
        settings = receipts_settings(redis_url, sns, **overrides)
        secrets = ProviderSecrets()
        await save_connectors(redis, settings, secrets)
        deps = ReceiptsDeps.from_settings(settings, telemetry)
        service, grpc_port = await build_server(settings, deps)
        runner, webhook_port = await start_webhooks(settings, deps)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        http = aiohttp.ClientSession()
        try:
            yield RunningReceipts(
                settings=settings,
                deps=deps,
                stub=pb_grpc.ReceiptsServiceStub(channel),
                channel=channel,
                http=http,
                webhook_port=webhook_port,
                sns=sns,
                secrets=secrets,
                redis=redis,
            )
        finally:
            await http.close()
            await channel.close()
            await runner.cleanup()
            await service.stop(0.5)
            await sns.stop()


PROVIDER_CHANNEL = {
    "sendgrid": common_pb2.CHANNEL_EMAIL,
    "ses": common_pb2.CHANNEL_EMAIL,
    "twilio": common_pb2.CHANNEL_SMS,
    "whatsapp": common_pb2.CHANNEL_WHATSAPP,
}


async def put_messages(
    redis,
    provider: str,
    count: int,
    *,
    campaign: str = "camp-1",
    instance: str = "inst-1",
    workspace_id: str = WS,
    provider_ids: Sequence[str] = (),
    ttl: int = 3600,
) -> list[MessageRecord]:
    """Message-map entries as the dispatcher writes them (and `attempted`/`sent`, so the campaign exists)."""
    records = [
        MessageRecord(
            message_id=uuid.uuid4().hex,
            workspace_id=workspace_id,
            campaign_id=campaign,
            campaign_instance_id=instance,
            anonymous_id=f"anon-{n}",
            channel=PROVIDER_CHANNEL[provider],
            connector_id=CONNECTORS[provider],
            provider=provider,
            provider_message_id=provider_ids[n] if n < len(provider_ids) else "",
        )
        for n in range(count)
    ]
    await MessageMap(redis, ttl).put_many(records)
    async with redis.pipeline(transaction=False) as pipe:
        add_counts(pipe, workspace_id, campaign, instance, {"attempted": count, "sent": count})
        await pipe.execute()
    return records


async def recorded_status(redis, workspace_id: str, message_id: str) -> str | None:
    """The latest status (by rank) the receipts service recorded for the message, None before any or once expired."""
    if is_message_id(message_id):
        group, own = split_message_id(message_id)
        held = await redis.hget(statuses_key(workspace_id, group), own)
        if held is not None:
            return held.decode().split(":", 2)[1]
    status = await redis.hget(MessageMap.key(workspace_id, message_id), "status")
    return status.decode() if status is not None else None


async def expire_map_entry(redis, workspace_id: str, message_id: str) -> None:
    """As when the message's map entry's TTL runs out: its field in its group's hash, and what receipts
    recorded of it, gone."""
    group, own = split_message_id(message_id)
    async with redis.pipeline(transaction=False) as pipe:
        MessageMap(redis, 1).queue_forget(pipe, workspace_id, message_id)
        pipe.hdel(statuses_key(workspace_id, group), own)
        pipe.delete(MessageMap.key(workspace_id, message_id))
        await pipe.execute()


async def stats(redis, campaign: str = "camp-1", instance: str = "", workspace_id: str = WS) -> dict[str, int]:
    return await read_counts(redis, workspace_id, campaign, instance)


async def stream_entries(redis, workspace_id: str = WS) -> list[dict[str, str]]:
    entries = await redis.xrange(f"ts:{{{workspace_id}}}:events")
    return [{k.decode(): v.decode() for k, v in fields.items()} | {"id": i.decode()} for i, fields in entries]


# --- the harness's own tests ----------------------------------------------------------------


@pytest.fixture
async def receipts(redis, redis_url) -> AsyncIterator[RunningReceipts]:
    async with running_receipts(redis, redis_url) as running:
        yield running


async def test_health_endpoint_and_unknown_routes(receipts):
    async with receipts.http.get(receipts.local_url + "/healthz") as reply:
        assert reply.status == 200
    async with receipts.http.post(receipts.local_url + "/webhooks/mailgun/ws/c", data=b"{}") as reply:
        assert reply.status == 404


async def test_sns_peer_serves_over_tls_trusted_by_the_ca_file(receipts):
    context = ssl.create_default_context(cafile=receipts.sns.ca_file)
    async with receipts.http.get(receipts.sns.cert_url, ssl=context) as reply:
        assert reply.status == 200
        assert b"BEGIN CERTIFICATE" in await reply.read()


def test_canary_values_are_spotted_in_their_common_spellings():
    pii = Pii.new()
    assert leaks(pii.needles(), [f"x {pii.email.upper()} y".encode()])
    assert leaks(pii.needles(), [pii.digits.encode()])
    assert not leaks(pii.needles(), [b"ts:{ws}:events", uuid.uuid4().hex.encode()])
