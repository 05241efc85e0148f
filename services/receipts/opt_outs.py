"""Opting out without PII: unsubscribe links, providers' unsubscribe events, and inbound STOP/START.

Every path ends in a suppression keyed by anonymous ID (libs.suppressions):
- a one-click unsubscribe (RFC 8058) POST carries a signed token naming our
  message; the message's unsubscribe link (or its map entry) names the recipient;
- a provider's unsubscribe or spam-complaint event, once the ledger counted it,
  names the message and so the recipient; an unsubscribe from one of SendGrid's
  groups suppresses for that group's topic only, and the group's resubscribe
  lifts it, whichever arrives first: their timestamps order them;
- a Twilio status callback failing a message because its number had opted out
  with Twilio (21610, reported there for a messaging service's sends) names its
  recipient too, suppressed as when Twilio refuses the send itself; so does
  SendGrid's drop of a message to an address on its unsubscribe lists (for the
  send's group topic when it had one) or its spam report list (a complaint);
- an inbound SMS or WhatsApp message that is exactly a STOP (or START) keyword is
  matched by the keyed hash of the sender's number (libs.blind_index); the number
  and the text are used in memory for that and nothing else. Their send times order
  them as a group's unsubscribe and resubscribe are: a START's time is kept, so a
  STOP sent before it and delivered after it changes nothing;
- a WhatsApp failure because the recipient had stopped the business's marketing
  messages (131050) names its recipient, suppressed as Twilio's 21610 is, for every
  topic of the WhatsApp family; and WhatsApp's `user_preferences` webhook, a customer
  stopping or resuming those messages in WhatsApp's settings, acts as a STOP or a START
  of the `wa_id`'s number, matched and ordered the same way, but held as the provider's
  unsubscribe (what the 131050 failure holds, which a resume lifts, as Meta does).
Nothing here logs or stores a number, a text or an address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from libs.blind_index import BlindIndex
from libs.logs import LogThrottle
from libs.message_map import MessageMap, MessageRecord
from libs.opt_out import START, STOP, KeywordStore
from libs.suppressions import (
    COMPLAINT,
    INBOUND_STOP,
    PROVIDER_UNSUBSCRIBE,
    UNSUBSCRIBE_LINK,
    OptIn,
    OptOut,
    SuppressionStore,
    channel_family,
)
from libs.telemetry import taint, taint_scope
from libs.unsubscribe import (
    InvalidToken,
    UnsubscribeTokens,
    linked_anonymous_id,
    linked_anonymous_ids,
)
from services.receipts.ledger import DeliveryLedger
from services.receipts.model import ReceiptEvent, Status
from services.receipts.parsing import event_time, for_another_number, whatsapp_preference

log = logging.getLogger(__name__)
# Whoever holds an email's link, or texts the brand's number, repeats what these lines say at will.
REPEATED_LOG_SECONDS = 60.0
# What a START lifts: the customer's STOP, and a provider's refusal because they opted out with it
# (Twilio's 21610, which Twilio lifts on START as well).
START_LIFTS = (INBOUND_STOP, PROVIDER_UNSUBSCRIBE)
# What a group's resubscribe lifts for its topic: the group's unsubscribe (or SendGrid's drop for it).
RESUBSCRIBE_LIFTS = (PROVIDER_UNSUBSCRIBE,)

INBOUND_STATES = frozenset({"received", "receiving"})
RCS_PREFIX = "rcs:"
TWILIO_OPT_OUT_TYPES = {"STOP": STOP, "START": START}
WHATSAPP_PREFERENCE_KEYWORDS = {"stop": STOP, "resume": START}


@dataclass(frozen=True)
class InboundText:
    """A message a customer sent us: `sender` and `text` are PII, for matching in memory only.

    `message_id` is the provider's (a WhatsApp one encodes the number: it is only ever hashed);
    `sent_at_ms` is when the customer sent it (WhatsApp says; Twilio does not, so its arrival)."""

    sender: str
    text: str
    message_id: str = ""
    sent_at_ms: int = 0
    provider_keyword: str = ""  # STOP or START when the provider matched a keyword of its own
    # WhatsApp's `user_preferences`: a choice made in the provider's settings, not a message, so a STOP is
    # held as the provider's unsubscribe (as its refusal for that choice, 131050, is).
    preference: bool = False


def twilio_inbound(params: Sequence[tuple[str, str]], received_at: float = 0.0) -> InboundText | None:
    """An incoming-message webhook (not a status callback): `From` and `Body`, and no MessageStatus."""
    values = dict(params)
    if "MessageStatus" in values or "From" not in values or "Body" not in values:
        return None
    if values.get("SmsStatus", "received").lower() not in INBOUND_STATES:
        return None
    message_id = values.get("MessageSid") or values.get("SmsMessageSid") or ""
    sender = values["From"]
    # Twilio writes an RCS reply's sender as `rcs:+<E.164>`: the number the message went to.
    if sender[: len(RCS_PREFIX)].lower() == RCS_PREFIX:
        sender = sender[len(RCS_PREFIX) :]
    # Advanced Opt-Out tags a reply matching a keyword set in Twilio's console (HELP changes nothing):
    # Twilio itself stops or resumes sending to the number on it, so we follow.
    keyword = TWILIO_OPT_OUT_TYPES.get(values.get("OptOutType", "").strip().upper(), "")
    return InboundText(sender, values["Body"], message_id, int(received_at * 1000), keyword)


def _text_of(message: Mapping[str, Any]) -> str:
    """The words of an inbound WhatsApp message: text, a quick-reply button, or an interactive reply."""
    kind = message.get("type")
    part = message.get(kind) if isinstance(kind, str) else None
    if not isinstance(part, dict):
        return ""
    if kind == "text":
        value = part.get("body")
    elif kind == "button":
        value = part.get("text") or part.get("payload")
    elif kind == "interactive":
        reply = part.get("button_reply") or part.get("list_reply")
        value = reply.get("title") if isinstance(reply, dict) else None
    else:
        value = None
    return value if isinstance(value, str) else ""


def whatsapp_inbound(document: Any, received_at: float = 0.0, phone_number_id: str = "") -> list[InboundText]:
    """`entry[].changes[].value.messages[]` and `.user_preferences[]` of a Cloud API webhook (already
    verified), those for the connector's `phone_number_id`: a STOP to another business's number is not
    the brand's. A preference's `detail` (a free text) is never read."""
    found = []
    entries = document.get("entry") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else []:
            value = change.get("value") if isinstance(change, dict) else None
            if isinstance(value, dict) and for_another_number(value, phone_number_id):
                continue
            messages = value.get("messages") if isinstance(value, dict) else None
            for message in messages if isinstance(messages, list) else []:
                if isinstance(message, dict) and isinstance(message.get("from"), str):
                    text = _text_of(message)
                    if text:
                        message_id = message.get("id")
                        # Unix seconds, as a string; the arrival when it is none that could be: a time far
                        # ahead would date a STOP after every START to come.
                        sent = event_time(message.get("timestamp"), received_at)
                        found.append(
                            InboundText(
                                message["from"],
                                text,
                                message_id if isinstance(message_id, str) else "",
                                int(sent * 1000),
                            )
                        )
            preferences = value.get("user_preferences") if isinstance(value, dict) else None
            for item in preferences if isinstance(preferences, list) else []:
                preference = whatsapp_preference(item)
                if preference:
                    # When the customer made the choice (Unix seconds), ordered against their STOPs and STARTs.
                    # Meta gives the item no ID: its number, choice and time name it, and are only ever hashed.
                    stamp = item.get("timestamp")
                    stamp_text = str(stamp) if isinstance(stamp, int | str) and not isinstance(stamp, bool) else ""
                    sender = item["wa_id"].strip()
                    found.append(
                        InboundText(
                            sender,
                            "",
                            f"user_preferences:{preference}:{stamp_text}:{sender}",
                            int(event_time(stamp, received_at) * 1000),
                            WHATSAPP_PREFERENCE_KEYWORDS[preference],
                            preference=True,
                        )
                    )
    return found


@dataclass
class UnsubscribeOutcome:
    done: bool
    expired: bool = False


class OptOuts:
    def __init__(
        self,
        redis: aioredis.Redis,
        suppressions: SuppressionStore,
        blind_index: BlindIndex,
        keywords: KeywordStore,
        tokens: UnsubscribeTokens,
        ledger: DeliveryLedger,
    ) -> None:
        self._redis = redis
        self._suppressions = suppressions
        self._blind_index = blind_index
        self._keywords = keywords
        self._tokens = tokens
        self._ledger = ledger
        self._map = MessageMap(redis, 0)  # read only
        self._repeated_logs = LogThrottle(REPEATED_LOG_SECONDS)

    async def from_events(self, workspace_id: str, events: Sequence[ReceiptEvent]) -> int:
        """Suppresses the recipients of the unsubscribes, complaints and opted-out refusals among `events`;
        returns how many were not suppressed before.

        Called before the ledger records the events: once recorded, a redelivery is a duplicate, and a
        suppression whose write had failed would never be retried. Suppressing is idempotent, so a
        redelivered opt-out suppresses again what it suppressed (and counts no one twice). The batch's
        opt-outs are written in order in one round trip (a few for the largest)."""
        opting_out = [e for e in events if e.opts_out]
        if not opting_out:
            return 0
        records = await self._ledger.attribute(workspace_id, opting_out)
        opt_outs = []
        for record, event, found in zip(
            records, opting_out, await self._recipients_of_events(workspace_id, records, opting_out), strict=True
        ):
            if found is not None:
                anonymous_id, family = found
                reason = COMPLAINT if event.complains else PROVIDER_UNSUBSCRIBE
                # A group's unsubscribe is ordered by its time against the group's resubscribe. A refusal
                # is as of the send (Twilio's callback carries no time, SendGrid's drop may not): a START the
                # customer sent since, or a group's resubscribe, which the provider honours too, is not
                # undone by the refusal arriving, or arriving again, later.
                at_ms = int(event.occurred_at * 1000) if event.topic else None
                if event.opted_out and record is not None and record.sent_at:
                    at_ms = int(record.sent_at * 1000)
                opt_outs.append(OptOut(family, event.topic, anonymous_id, reason, at_ms, after_opt_ins=True))
        suppressed = (await self._suppressions.suppress_many(workspace_id, opt_outs)).changed
        if suppressed:
            log.info("receipt opted out %d recipients in workspace %s", suppressed, workspace_id)
        return suppressed

    async def resubscribed(self, workspace_id: str, events: Sequence[ReceiptEvent]) -> int:
        """Lifts the unsubscribe of each event's topic (SendGrid's group_resubscribe) for its message's
        recipient, if made before the event; returns how many are no longer suppressed there.

        Only the group's own hold goes: an unsubscribe from every topic, a complaint, a STOP or the
        brand's hold stay. The time is kept, so the group's unsubscribe made before it and delivered
        after it changes nothing; a redelivery lifts nothing more."""
        resubscribing = [e for e in events if e.topic]
        if not resubscribing:
            return 0
        records = await self._ledger.attribute(workspace_id, resubscribing)
        opt_ins = []
        for event, found in zip(
            resubscribing, await self._recipients_of_events(workspace_id, records, resubscribing), strict=True
        ):
            if found is not None:
                anonymous_id, family = found
                at_ms = int(event.occurred_at * 1000)
                opt_ins.append(OptIn(family, event.topic, anonymous_id, RESUBSCRIBE_LIFTS, at_ms, keep_opt_in=True))
        lifted = (await self._suppressions.lift_many(workspace_id, opt_ins)).changed
        if lifted:
            log.info("receipt resubscribed %d recipients in workspace %s", lifted, workspace_id)
        return lifted

    async def _recipients_of_events(
        self, workspace_id: str, records: Sequence[MessageRecord | None], events: Sequence[ReceiptEvent]
    ) -> list[tuple[str, str] | None]:
        """(anonymous ID, channel family) of each event's message: its map record, or once that expired,
        an email's unsubscribe link, which lives longer and names the recipient (those read in one
        round trip)."""
        expired = sorted({e.message_id for r, e in zip(records, events, strict=True) if r is None and e.message_id})
        linked = await linked_anonymous_ids(self._redis, workspace_id, expired) if expired else {}
        found: list[tuple[str, str] | None] = []
        for record, event in zip(records, events, strict=True):
            if record is not None:
                found.append((record.anonymous_id, channel_family(record.channel)))
            elif linked.get(event.message_id):
                found.append((linked[event.message_id], "email"))
            else:
                found.append(None)
        return found

    async def inbound(self, workspace_id: str, family: str, messages: Sequence[InboundText]) -> tuple[int, int]:
        """STOP suppresses, START lifts what a STOP did: (opted out, opted in); unmatched numbers change nothing."""
        if not messages:
            return 0, 0
        opted_out = opted_in = 0
        with taint_scope():
            taint(v for m in messages for v in (m.sender, m.text, m.sender.removeprefix("whatsapp:").lstrip("+")))
            keywords = await self._keywords.load(workspace_id)
            # In the order they were sent: a webhook may hold a STOP and a later START.
            for message in sorted(messages, key=lambda m: m.sent_at_ms):
                action = message.provider_keyword or keywords.classify(message.text)
                if action is None:
                    continue
                if not message.message_id:
                    done = await self._act(workspace_id, family, action, message)
                else:
                    # A message redelivered (or replayed: Twilio's signature carries no time) acts once, even
                    # two deliveries at once: it is claimed before acting, marked seen once acted on, and
                    # released when it matched no one or its write failed, to act when redelivered.
                    seen = ("inbound", family, message.message_id)
                    async with self._ledger.acting_once(workspace_id, seen) as acting:
                        if acting is None:
                            continue
                        done = await self._act(workspace_id, family, action, message)
                        acting.acted = done is not None
                if done is not None:
                    opted_out += done[0]
                    opted_in += done[1]
        if opted_out or opted_in:
            log.info(
                "inbound keywords in workspace %s (%s): %d opted out, %d opted in",
                workspace_id,
                family,
                opted_out,
                opted_in,
            )
        return opted_out, opted_in

    async def _act(self, workspace_id: str, family: str, action: str, message: InboundText) -> tuple[int, int] | None:
        """A STOP's or START's effect: (opted out, opted in); None when its number matched no recent recipient."""
        anonymous_id = await self._blind_index.lookup(workspace_id, family, message.sender)
        if anonymous_id is None:
            # Anyone can text the number.
            self._repeated_logs.log(
                ("no recipient", workspace_id, action),
                log,
                logging.INFO,
                "inbound %s in workspace %s matched no recent recipient",
                action,
                workspace_id,
            )
            return None
        if action == STOP:
            # A STOP sent before the customer's last START, delivered after it (a redelivery, a
            # webhook that raced it), changes nothing: their last word was START.
            done = await self._suppressions.suppress(
                workspace_id,
                family,
                "",
                [anonymous_id],
                PROVIDER_UNSUBSCRIBE if message.preference else INBOUND_STOP,
                at_ms=message.sent_at_ms or None,
                after_opt_ins=True,
            )
            if done.opted_in_later:
                log.info("inbound stop in workspace %s was sent before a later start: ignored", workspace_id)
            else:
                await self._blind_index.renew(workspace_id, family, message.sender)
            return done.changed, 0
        if action == START:
            # Only a START sent after the STOP lifts it: one delivered late stays without effect. It
            # lifts what the customer's own opt-outs made (their STOP, and a provider's refusal
            # because they had opted out with it, which the provider lifts on START too), never
            # the brand's own hold. Its time is kept even when it lifts nothing, for a STOP sent
            # before it that is still to come.
            done = await self._suppressions.lift(
                workspace_id,
                family,
                "",
                [anonymous_id],
                START_LIFTS,
                sent_after_ms=message.sent_at_ms or None,
                keep_opt_in=True,
            )
            return 0, done.changed
        return 0, 0

    async def check(self, token: str) -> UnsubscribeOutcome | None:
        """None when the token is ours, not expired and names a message still known (what the page shows
        its button for); else why not, as the POST would answer."""
        try:
            request = self._tokens.verify(token)
        except InvalidToken as exc:
            return UnsubscribeOutcome(done=False, expired=exc.expired)
        if await self._recipient_of(request.workspace_id, request.message_id) is None:
            return UnsubscribeOutcome(done=False, expired=True)
        return None

    async def _recipient_of(self, workspace_id: str, message_id: str) -> tuple[MessageRecord | None, str, str] | None:
        """The message's map record (None once expired), anonymous ID and channel family; None when the
        message is no longer known (its link expired too, or its send was never settled)."""
        record = await self._map.get(workspace_id, message_id)
        if record is not None:
            return record, record.anonymous_id, channel_family(record.channel)
        # The link is read only once the map entry has expired: it names the same recipient.
        linked = await linked_anonymous_id(self._redis, workspace_id, message_id)
        if linked:
            return None, linked, "email"
        self._repeated_logs.log(
            ("link unknown", workspace_id),
            log,
            logging.INFO,
            "unsubscribe link for workspace %s names a message no longer known",
            workspace_id,
        )
        return None

    async def unsubscribe(self, token: str) -> UnsubscribeOutcome:
        """A one-click unsubscribe: suppresses the message's recipient on its channel family, every topic."""
        try:
            request = self._tokens.verify(token)
        except InvalidToken as exc:
            return UnsubscribeOutcome(done=False, expired=exc.expired)
        workspace_id, message_id = request.workspace_id, request.message_id
        found = await self._recipient_of(workspace_id, message_id)
        if found is None:
            return UnsubscribeOutcome(done=False, expired=True)
        record, anonymous_id, family = found
        added = (await self._suppressions.suppress(workspace_id, family, "", [anonymous_id], UNSUBSCRIBE_LINK)).changed
        if record is not None:
            # Counted in the campaign's funnel and the event stream once per message, like a provider's event.
            await self._ledger.record(
                workspace_id,
                [
                    ReceiptEvent(
                        provider=record.provider,
                        status=Status.UNSUBSCRIBED,
                        identities=(("unsubscribe-link", message_id),),
                        message_id=message_id,
                        reason_code="one_click",
                        occurred_at=time.time(),
                    )
                ],
            )
        # A line when it suppressed someone: the same link posted again changes nothing, and says so only at debug.
        log.log(
            logging.INFO if added else logging.DEBUG,
            "one-click unsubscribe in workspace %s (%s): %d new",
            workspace_id,
            family,
            added,
        )
        return UnsubscribeOutcome(done=True)
