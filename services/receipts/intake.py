"""One path for every receipt, from the webhooks and from `IngestReceipt` alike.

Check the IDs and the size, find the connector (its kind must match the
provider), verify the signature with the connector's secret, parse, then
record the events in the ledger. Nothing is parsed into events before the
signature verifies; nothing of the receipt is logged but counts.
Unsubscribes and complaints then suppress their recipients, and inbound
messages (Twilio's incoming-message webhook on the same URL, WhatsApp
`messages[]`) that are STOP or START keywords opt the sender out or back in, as
WhatsApp's `user_preferences[]` (marketing messages stopped or resumed) do.
An SNS SubscriptionConfirmation's SubscribeURL is followed once per subscription (topic and token) within
the dedupe window, remembered as the ledger remembers events (`ts:{ws}:rcpt:seen:<hmac>`): the same
confirmation posted again is answered 200 without a fetch, and a line a minute per connector says so.

An event that names only the provider's message ID (SES's identity notifications carry no tags) may
come before the dispatcher has indexed that ID, which it does once the provider replied. Such an event,
not found and dated within `receipt_index_wait_seconds` of now, is not recorded: the rest of the receipt
is, and the receipt is refused (503, `NotIndexedYet`) for the provider to send again, when the others are
duplicates. Older, it is counted unmapped: a forged or foreign event is refused only while it is young.
A receipt for a connector that does not open with `TOKENSEND_SECRET_KEY` (sealed under a key this process
lacks) is refused whole for the provider to send again once the key is set (`ConnectorUnreadable`: 503 with
Retry-After, `FAILED_PRECONDITION` over gRPC), logged naming the setting and the connector.

Metrics: `tokensend.receipts` (events by provider and status, each once: redeliveries are left out, and
a receipt refused for a store outage counts when its redelivery is recorded), `tokensend.receipts.unmapped`
(events acknowledged for no known message, by provider: one refused to wait for the index is not; one
whose other shape maps later stays counted, though the stats take it back), `tokensend.receipts.ignored`
(verified entries deliberately left out, by provider: statuses not tracked, such as Twilio's
partially_delivered or WhatsApp's deleted, inbound messages, another number's entries; as received) and
`tokensend.receipts.refused` (receipts refused, by provider and a reason from `REFUSAL_REASONS` as `code`):
names only, never a value from a receipt. Entries of a batch that are not the provider's documented shape
(not an object, no event type) are among the ignored, and named by their place in the receipt in the
webhook's reply and in a line a minute per connector, so that an operator can find what was left out.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from multidict import CIMultiDict
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb

from libs.connector_store import ConnectorStore
from libs.crypto import SealedDataInvalid
from libs.errors import DomainError, InvalidArgument
from libs.logs import LogThrottle
from libs.settings import ReceiptsSettings
from libs.store import STORE_ERRORS, check_id
from libs.suppressions import channel_family
from libs.telemetry import Telemetry, meter, named_span, tracer
from services.receipts.errors import (
    ClaimedElsewhere,
    ConnectorUnreadable,
    MalformedReceipt,
    NotIndexedYet,
    ReceiptTooLarge,
    SignatureInvalid,
    SignatureMissing,
    SnsTopicsNotListed,
    UnknownConnector,
    UpstreamUnavailable,
)
from services.receipts.ledger import DeliveryLedger, LedgerResult
from services.receipts.model import INDEXED_ONLY_PROVIDERS, PROVIDERS, ParsedReceipt, ReceiptEvent
from services.receipts.opt_outs import InboundText, OptOuts, twilio_inbound, whatsapp_inbound
from services.receipts.parsing import (
    SES_TOPIC_VALIDATION,
    load_json,
    parse_sendgrid,
    parse_ses,
    parse_twilio,
    parse_whatsapp,
)
from services.receipts.sns import SnsCertificates
from services.receipts.verification import (
    SNS_TYPES,
    TWILIO_SIGNATURE_HEADER,
    check_sns_age,
    sns_signature_fields,
    twilio_body_hash,
    verify_sendgrid,
    verify_sns_signature,
    verify_twilio,
    verify_whatsapp,
)

log = logging.getLogger(__name__)
# What a peer repeats at will is logged a line a minute per kind, saying how many more since: every receipt
# of a connector that does not open, a refused receipt (anyone can post one), a message for a connector that
# lists no SNS topics (any AWS account can sign one) and a signed SubscriptionConfirmation posted again.
REPEATED_LOG_SECONDS = 60.0

CONNECTOR_KIND = {
    "sendgrid": dpb.CONNECTOR_KIND_SENDGRID,
    "ses": dpb.CONNECTOR_KIND_SES,
    "twilio": dpb.CONNECTOR_KIND_TWILIO,
    "whatsapp": dpb.CONNECTOR_KIND_WHATSAPP_CLOUD,
}
TWILIO_IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"
MAX_FORM_FIELDS = 1000
_TOKEN = re.compile(r"^[A-Za-z0-9._:=+/-]{1,128}\Z")
# An SNS topic's ARN (partition, region, account, name): quoted in a log only when it has this shape.
_TOPIC_ARN = re.compile(r"^arn:aws[a-z-]{0,16}:sns:[a-z0-9-]{1,32}:[0-9]{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?\Z")

DEPENDENCY_TIMEOUT = "dependency_timeout"
# Why a receipt was refused, as `tokensend.receipts.refused` names it, most specific first. A spike of
# signature_invalid is a misconfigured secret or a forger; topic_not_listed an SES connector to finish.
_REASONS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (ConnectorUnreadable, "connector_unreadable"),  # TOKENSEND_SECRET_KEY lacks the key that sealed it
    (SignatureMissing, "signature_missing"),
    (SnsTopicsNotListed, "topic_not_listed"),
    (SignatureInvalid, "signature_invalid"),
    (UnknownConnector, "unknown_connector"),
    (ReceiptTooLarge, "too_large"),
    (InvalidArgument, "malformed"),  # MalformedReceipt, and IDs in the path that are not IDs
    (UpstreamUnavailable, "upstream_unavailable"),  # an SNS certificate that could not be fetched
    (NotIndexedYet, "not_indexed_yet"),  # sent again by the provider; many: the dispatcher's settles lag
    (ClaimedElsewhere, "claimed_elsewhere"),  # an inbound message or SNS confirmation another delivery holds
    # The store or a certificate host too slow (an OSError, so before the store's errors); never the body.
    (TimeoutError, DEPENDENCY_TIMEOUT),
    (STORE_ERRORS, "store_unavailable"),
    (DomainError, "refused"),
)
# The webhooks' own: a body that did not arrive in time, whose sender hung up, or whose Content-Encoding
# does not decode.
BODY_TIMEOUT = "body_timeout"
BODY_INCOMPLETE = "body_incomplete"
BODY_UNDECODABLE = "body_undecodable"
REFUSAL_REASONS = (
    *(reason for _, reason in _REASONS),
    BODY_TIMEOUT,
    BODY_INCOMPLETE,
    BODY_UNDECODABLE,
    "internal",
)


def refusal_reason(exc: BaseException) -> str:
    """The reason `exc` refused a receipt, one of `REFUSAL_REASONS`: named by its type, never its text."""
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "internal"


def may_wait_for_index(event: ReceiptEvent, now: float, window_seconds: float) -> bool:
    """Whether `event`, should it map to no message, may be one the dispatcher has not indexed yet: of a
    provider whose receipts for our sends may name only its own ID, naming none of ours, and dated by the
    provider within `window_seconds` of `now` (an undated one, or one from further off, cannot wait)."""
    return (
        window_seconds > 0
        and event.provider in INDEXED_ONLY_PROVIDERS
        and not event.message_id
        and bool(event.provider_message_id)
        and event.dated
        and abs(now - event.occurred_at) <= window_seconds
    )


@dataclass(frozen=True)
class RawReceipt:
    """A receipt exactly as the provider sent it: the URL it saw, its headers and the raw body."""

    provider: str
    workspace_id: str
    connector_id: str
    url: str
    headers: Mapping[str, str]
    body: bytes


@dataclass
class IngestOutcome:
    events: int = 0
    mapped: int = 0
    unmapped: int = 0
    duplicates: int = 0
    ignored: int = 0
    note: str = ""  # "subscription confirmed" and the like, for the HTTP reply
    inbound: int = 0  # customers' messages (Twilio wants TwiML back for those)
    opted_out: int = 0
    opted_in: int = 0
    waiting: int = 0  # events left for the provider's redelivery: their message's provider ID not indexed yet
    # Entries not the provider's documented shape, left out (in `ignored`): the first few named by place.
    unusable: int = 0
    named_unusable: list[str] = field(default_factory=list)


class ReceiptIntake:
    def __init__(
        self,
        settings: ReceiptsSettings,
        connectors: ConnectorStore,
        ledger: DeliveryLedger,
        sns: SnsCertificates,
        telemetry: Telemetry | None = None,
        opt_outs: OptOuts | None = None,
    ) -> None:
        self._settings = settings
        self._connectors = connectors
        self._ledger = ledger
        self._sns = sns
        self._repeated_logs = LogThrottle(REPEATED_LOG_SECONDS)
        self.opt_outs = opt_outs
        self._tracer = tracer(telemetry.tracer_provider if telemetry else None, __name__)
        m = meter(telemetry.meter_provider if telemetry else None, __name__)
        self._receipts = m.create_counter(
            "tokensend.receipts",
            description="Verified receipt events, each once (not its redeliveries), by provider and status",
        )
        self._unmapped = m.create_counter(
            "tokensend.receipts.unmapped",
            description="Verified receipt events for no message in the map (unknown or expired), by provider",
        )
        self._refused = m.create_counter(
            "tokensend.receipts.refused", description="Receipts refused, by provider and reason (code)"
        )
        self._ignored = m.create_counter(
            "tokensend.receipts.ignored",
            description="Verified receipt entries that are no delivery status tracked (another status, an inbound "
            "message, another number's, not an object), by provider, as received: redeliveries included",
        )

    def count_refused(self, provider: str, reason: str) -> None:
        """One receipt refused; `provider` as the request named it, counted as "other" when it is none of ours."""
        self._refused.add(1, {"provider": _named(provider), "code": reason})

    async def find_connector(self, provider: str, workspace_id: str, connector_id: str) -> dpb.Connector:
        check_id(workspace_id, "workspace_id")
        check_id(connector_id, "connector_id")
        try:
            connector = await self._connectors.find_for_call(workspace_id, connector_id)
        except SealedDataInvalid as exc:
            # Its text is one of libs.crypto's fixed phrases: an unknown key (a rotation rolled out of order)
            # or a value that does not open (damaged). Not found nor forged: the provider sends it again.
            held = self._repeated_logs.due(("unreadable", provider, workspace_id, connector_id))
            if held is not None:  # each of its receipts is refused: a line a minute says so
                log.error(
                    "%s connector %s of workspace %s does not open with TOKENSEND_SECRET_KEY (%s): its receipts are "
                    "refused (connector_unreadable) for the provider to send again until the key that sealed it is "
                    "set (%d more refused since the last line)",
                    provider,
                    connector_id,
                    workspace_id,
                    exc,
                    held,
                )
            raise ConnectorUnreadable() from None
        if connector is None or connector.kind != CONNECTOR_KIND[provider]:
            raise UnknownConnector()
        return connector

    async def ingest(self, receipt: RawReceipt) -> IngestOutcome:
        # The span holds the provider and counts only; exceptions are named, never recorded (their text may
        # quote the receipt).
        provider = _named(receipt.provider)
        with named_span(self._tracer, "receipts.ingest", {"receipt.provider": provider}) as span:
            try:
                outcome = await self._ingest(receipt)
            except DomainError as exc:
                # Refusals are worth seeing (forgeries, misconfigured providers): by kind only, and since a
                # forger repeats them at will, a line per provider and kind a minute, saying how many since.
                kind = type(exc).__name__
                self._repeated_logs.log(
                    ("refused", provider, kind), log, logging.INFO, "%s receipt refused: %s", provider, kind
                )
                self.count_refused(receipt.provider, refusal_reason(exc))
                raise
            except Exception as exc:
                self.count_refused(receipt.provider, refusal_reason(exc))  # the store away, or a fault of ours
                raise
            span.set_attributes(
                {
                    "receipt.events": outcome.events,
                    "receipt.mapped": outcome.mapped,
                    "receipt.unmapped": outcome.unmapped,
                    "receipt.duplicates": outcome.duplicates,
                    "receipt.opted_out": outcome.opted_out,
                    "receipt.opted_in": outcome.opted_in,
                }
            )
            return outcome

    async def _ingest(self, receipt: RawReceipt) -> IngestOutcome:
        if receipt.provider not in PROVIDERS:
            raise MalformedReceipt("provider", "must be one of " + ", ".join(PROVIDERS))
        limit, variable = self._settings.receipt_limit(receipt.provider)
        if len(receipt.body) > limit:
            raise ReceiptTooLarge(limit, variable)
        connector = await self.find_connector(receipt.provider, receipt.workspace_id, receipt.connector_id)
        headers = CIMultiDict(receipt.headers)
        received_at = time.time()
        outcome = IngestOutcome()
        inbound: list[InboundText] = []
        if receipt.provider == "sendgrid":
            verify_sendgrid(
                connector.webhook_secret,
                headers,
                receipt.body,
                now=received_at,
                tolerance_seconds=self._settings.sendgrid_timestamp_tolerance_seconds,
            )
            parsed = parse_sendgrid(load_json(receipt.body), received_at)
        elif receipt.provider == "whatsapp":
            verify_whatsapp(connector.webhook_secret, headers, receipt.body)
            document = load_json(receipt.body)
            parsed = parse_whatsapp(document, received_at, connector.sender)
            inbound = whatsapp_inbound(document, received_at, connector.sender)
        elif receipt.provider == "twilio":
            parsed, inbound = self._twilio(connector, receipt, headers, received_at)
        else:
            parsed = await self._ses(connector, receipt, received_at, outcome)
        if parsed.events:
            if self.opt_outs is not None:  # first: a recorded event is a duplicate when redelivered
                outcome.opted_out = await self.opt_outs.from_events(receipt.workspace_id, parsed.events)
            window = self._settings.receipt_index_wait_seconds
            result = LedgerResult()
            try:
                await self._ledger.record(
                    receipt.workspace_id,
                    parsed.events,
                    lambda event: may_wait_for_index(event, received_at, window),
                    result,
                )
            finally:
                # Counted once recorded: a provider's redelivery, or a receipt retried after a store outage,
                # once. A store failing part way through a large body leaves the batches recorded before it
                # counted here, since its redelivery finds them duplicates.
                for status, count in result.recorded.items():
                    self._receipts.add(count, {"provider": receipt.provider, "status": str(status)})
                if result.unmapped:
                    self._unmapped.add(result.unmapped, {"provider": receipt.provider})
            outcome.mapped, outcome.unmapped, outcome.duplicates = result.mapped, result.unmapped, result.duplicates
            outcome.waiting = result.waiting
        if parsed.resubscribes and self.opt_outs is not None:
            outcome.opted_in += await self.opt_outs.resubscribed(receipt.workspace_id, parsed.resubscribes)
        if inbound:
            outcome.inbound = len(inbound)
            if self.opt_outs is not None:
                family = channel_family(connector.channel)
                opted_out, opted_in = await self.opt_outs.inbound(receipt.workspace_id, family, inbound)
                outcome.opted_out += opted_out
                outcome.opted_in += opted_in
            del inbound
        outcome.events, outcome.ignored = parsed.total, parsed.ignored
        if parsed.ignored:
            self._ignored.add(parsed.ignored, {"provider": receipt.provider})
        if parsed.unusable:
            outcome.unusable, outcome.named_unusable = parsed.unusable, parsed.named_unusable
            self._log_unusable(receipt, parsed)
        log.debug(
            "%s receipt for workspace %s: %d events, %d mapped, %d unmapped, %d duplicates, %d ignored",
            receipt.provider,
            receipt.workspace_id,
            outcome.events,
            outcome.mapped,
            outcome.unmapped,
            outcome.duplicates,
            outcome.ignored,
        )
        if outcome.waiting:
            raise NotIndexedYet()  # last, once the rest is recorded: in the redelivery those are duplicates
        return outcome

    def _log_unusable(self, receipt: RawReceipt, parsed: ParsedReceipt) -> None:
        """The provider sends what it sends: the operator is told where, a line a minute per connector, naming
        the first entries by place (positions and fixed phrases: nothing of the entry itself)."""
        self._repeated_logs.log(
            ("unusable", receipt.provider, receipt.workspace_id, receipt.connector_id),
            log,
            logging.WARNING,
            "%s receipt for connector %s of workspace %s: %d of its %d entries left out, not the provider's "
            "documented shape (%s)",
            receipt.provider,
            receipt.connector_id,
            receipt.workspace_id,
            parsed.unusable,
            parsed.total,
            "; ".join(parsed.named_unusable[:5]) + ("; ..." if parsed.unusable > 5 else ""),
        )

    def _twilio(
        self, connector: dpb.Connector, receipt: RawReceipt, headers: CIMultiDict[str], received_at: float
    ) -> tuple[ParsedReceipt, list[InboundText]]:
        signature = headers.get(TWILIO_SIGNATURE_HEADER, "")
        if not signature:
            raise SignatureMissing("X-Twilio-Signature header is missing")
        if not receipt.url:
            raise MalformedReceipt("url", "is required: Twilio signs the URL it posted to")
        auth_token = connector.credentials.get("auth_token", "")
        if twilio_body_hash(receipt.url) is not None:
            # JSON body, bound to the signature through bodySHA256 in the URL.
            verify_twilio(auth_token, receipt.url, [], signature, body=receipt.body)
            document = load_json(receipt.body)
            if not isinstance(document, dict):
                raise MalformedReceipt("body", "must be a JSON object")
            params = [(str(k), v if isinstance(v, str) else str(v)) for k, v in document.items()]
        else:
            params = _form(receipt.body)
            verify_twilio(auth_token, receipt.url, params, signature)
        message = twilio_inbound(params, received_at)
        if message is not None:
            # The number's incoming-message webhook may point here too: a customer's reply, not a status.
            return ParsedReceipt(ignored=1), [message]
        query = dict(parse_qsl(urlsplit(receipt.url).query, keep_blank_values=True))
        token = headers.get(TWILIO_IDEMPOTENCY_HEADER, "").strip()
        parsed = parse_twilio(params, query.get("message_id", ""), token if _TOKEN.match(token) else "", received_at)
        return parsed, []

    async def _ses(
        self, connector: dpb.Connector, receipt: RawReceipt, received_at: float, outcome: IngestOutcome
    ) -> ParsedReceipt:
        envelope = load_json(receipt.body)
        if not isinstance(envelope, dict):
            raise MalformedReceipt("body", "must be an SNS message (a JSON object)")
        kind = envelope.get("Type")
        if kind is None and ("eventType" in envelope or "notificationType" in envelope):
            raise SignatureMissing("SES events must come as signed SNS messages (raw message delivery is unsigned)")
        if not isinstance(kind, str) or kind not in SNS_TYPES:  # a JSON list or object is not hashable
            raise MalformedReceipt("Type", "must be Notification, SubscriptionConfirmation or UnsubscribeConfirmation")
        sns_signature_fields(envelope)  # 401 before any fetch when unsigned
        public_key = await self._sns.public_key(envelope.get("SigningCertURL"))
        verify_sns_signature(envelope, public_key)
        check_sns_age(envelope, now=received_at, max_age_seconds=self._settings.receipt_dedupe_ttl_seconds)
        self._check_topic(connector, receipt.workspace_id, envelope.get("TopicArn"))
        if kind == "SubscriptionConfirmation":
            outcome.note = await self._confirm_subscription(connector, receipt.workspace_id, envelope)
            return ParsedReceipt()
        if kind == "UnsubscribeConfirmation":
            # Its SubscribeURL is never followed: re-subscribing is an operator's decision. No SES receipt
            # comes from that topic any more, so the operator is told which one to subscribe again.
            log.warning(
                "SNS unsubscribed SES connector %s of workspace %s from topic %s: its receipts stop until the "
                "topic is subscribed again",
                connector.connector_id,
                receipt.workspace_id,
                _topic_for_log(envelope.get("TopicArn")),
            )
            outcome.note = "unsubscribe acknowledged"
            return ParsedReceipt()
        message_id, message = envelope.get("MessageId"), envelope.get("Message")
        if not isinstance(message_id, str) or not message_id:
            raise MalformedReceipt("MessageId", "is required")
        if not isinstance(message, str):
            raise MalformedReceipt("Message", "must be a JSON string")
        if message.strip() == SES_TOPIC_VALIDATION:
            # SES's plain-text test message when a configuration set gets this topic as a destination.
            log.info("SES validated its SNS topic for workspace %s", receipt.workspace_id)
            outcome.note = "topic validation acknowledged"
            return ParsedReceipt(ignored=1)
        return parse_ses(load_json(message.encode(), "Message"), message_id, envelope.get("Timestamp"), received_at)

    async def _confirm_subscription(
        self, connector: dpb.Connector, workspace_id: str, envelope: Mapping[str, object]
    ) -> str:
        """Follows SubscribeURL once per subscription (its topic and token) within the replay window: the
        same signed confirmation posted again is answered without fetching. Claimed before the fetch, as
        inbound messages are, so two at once fetch once; released when the fetch fails, for SNS's retry."""
        token = envelope.get("Token")
        if not isinstance(token, str) or not token:
            raise MalformedReceipt("Token", "is required")
        subscription = ("sns-subscription", str(envelope.get("TopicArn")), token)  # stored as a keyed digest
        async with self._ledger.acting_once(workspace_id, subscription) as acting:
            if acting is None:
                self._repeated_logs.log(
                    ("confirmed again", workspace_id, connector.connector_id),
                    log,
                    logging.INFO,
                    "SNS subscription confirmation for SES connector %s of workspace %s posted again: already "
                    "confirmed, not followed again",
                    connector.connector_id,
                    workspace_id,
                )
                return "subscription already confirmed"
            await self._sns.confirm_subscription(envelope.get("SubscribeURL"))
        log.info("SNS subscription confirmed for workspace %s", workspace_id)
        return "subscription confirmed"

    def _check_topic(self, connector: dpb.Connector, workspace_id: str, topic_arn: object) -> None:
        """Only the SNS topics the connector lists are accepted: SNS signs for every AWS account, so any
        account's topic could subscribe our URL. Checked once the signature verified (the ARN is AWS's)."""
        allowed = {t.strip() for t in connector.credentials.get("sns_topic_arns", "").split(",") if t.strip()}
        if not allowed:
            # The operator needs the topic to fill the list in: the first one's, then a line a minute.
            self._repeated_logs.log(
                ("no topics", workspace_id, connector.connector_id),
                log,
                logging.WARNING,
                "SES connector %s of workspace %s lists no SNS topics: refused a message from topic %s; "
                "set the connector's sns_topic_arns to accept its topics",
                connector.connector_id,
                workspace_id,
                _topic_for_log(topic_arn),
            )
            raise SnsTopicsNotListed()
        if topic_arn not in allowed:
            raise SignatureInvalid("SNS topic is not one of the connector's topics")


def _named(provider: str) -> str:
    """`provider` as a metric or a span names it: one of ours, else "other" (a gRPC caller names it freely)."""
    return provider if provider in PROVIDERS else "other"


def _topic_for_log(topic_arn: object) -> str:
    """An SNS topic's ARN, quoted only when it has an ARN's shape: it names an AWS resource, not a person."""
    return topic_arn if isinstance(topic_arn, str) and _TOPIC_ARN.match(topic_arn) else "(no valid ARN)"


def _form(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise MalformedReceipt("body", "is not a valid form (application/x-www-form-urlencoded)") from None
