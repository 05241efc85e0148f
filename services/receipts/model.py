"""What a receipt becomes once parsed: normalised events in one status set, and the status rank.

Status rank (a message's stored status only moves up; equal ranks keep the first):

    accepted 1 < deferred 2 < delivered 3 < opened = read 4 < clicked 5
        < bounced = failed 6 < complained = unsubscribed 7

Bounces and failures outrank engagement because they are final for delivery
(an asynchronous bounce after "delivered" is the truth), and a complaint or an
unsubscribe is the last word a recipient says. Funnel counters are separate
from the rank: each is counted once per message, whatever order events come in
(a "read" also counts the delivery it proves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Status(StrEnum):
    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    OPENED = "opened"
    READ = "read"
    CLICKED = "clicked"
    BOUNCED = "bounced"
    FAILED = "failed"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


STATUS_RANK: dict[Status, int] = {
    Status.ACCEPTED: 1,
    Status.DEFERRED: 2,
    Status.DELIVERED: 3,
    Status.OPENED: 4,
    Status.READ: 4,
    Status.CLICKED: 5,
    Status.BOUNCED: 6,
    Status.FAILED: 6,
    Status.COMPLAINED: 7,
    Status.UNSUBSCRIBED: 7,
}

# The campaign counter each status feeds, once per message. "read" (WhatsApp, RCS) is the
# channel's open; accepted and deferred are not part of the funnel.
FUNNEL_COUNTER: dict[Status, str] = {
    Status.DELIVERED: "delivered",
    Status.BOUNCED: "bounced",
    Status.FAILED: "failed",
    Status.OPENED: "opened",
    Status.READ: "opened",
    Status.CLICKED: "clicked",
    Status.COMPLAINED: "complained",
    Status.UNSUBSCRIBED: "unsubscribed",
}

# Counters a status proves besides its own, also once per message: WhatsApp may skip "delivered" and
# report "read" (Twilio's WhatsApp and RCS too), and a message read was delivered.
IMPLIED_COUNTERS: dict[Status, tuple[str, ...]] = {Status.READ: ("delivered",)}

PROVIDERS = ("sendgrid", "ses", "twilio", "whatsapp")

# Providers some of whose receipts for our own sends name only the provider's message ID, found through
# the index the dispatcher writes once the provider replied: SES's identity notifications carry no tags.
# The others always echo our ID (SendGrid's custom_args, Twilio's callback URL, WhatsApp's
# biz_opaque_callback_data), so one of theirs naming only the provider's ID is not from a send of ours.
INDEXED_ONLY_PROVIDERS = frozenset({"ses"})

# Statuses after which the recipient is suppressed (an unsubscribe, or a spam complaint); a failure
# suppresses too when the provider refused the message because the recipient opted out with it
# (`ReceiptEvent.opted_out`) or had reported its mail as spam (`ReceiptEvent.complained_before`).
OPT_OUT_STATUSES = frozenset({Status.UNSUBSCRIBED, Status.COMPLAINED})


@dataclass(frozen=True)
class ReceiptEvent:
    """One provider event, reduced to what mapping and counting need.

    `identities` are the provider's event identities used for dedupe; they are
    only ever stored as keyed digests. `message_id`, `campaign_hint` and
    `instance_hint` are our own IDs echoed back, used for lookups and never
    stored unless they match a real message or campaign.
    """

    provider: str
    status: Status
    identities: tuple[tuple[str, ...], ...]
    message_id: str = ""
    provider_message_id: str = ""
    campaign_hint: str = ""
    instance_hint: str = ""
    reason_code: str = ""
    occurred_at: float = 0.0
    # Whether `occurred_at` is the provider's own time for the event; False: when we received it.
    dated: bool = False
    # The topic an opt-out (or opt-in) is for, "" for every topic: SendGrid's unsubscribe groups.
    topic: str = ""
    # A failure because the recipient had opted out with the provider (Twilio's 21610, reported in the
    # status callback of a send a messaging service accepted; SendGrid's drop of an address on its
    # unsubscribe lists): suppressed as the provider's unsubscribe, counted as the failure it is.
    opted_out: bool = False
    # A failure because the recipient had reported the provider's mail as spam (SendGrid's drop of an
    # address on its spam report list): suppressed as a complaint, counted as the failure it is.
    complained_before: bool = False

    @property
    def opts_out(self) -> bool:
        """Whether the event suppresses its recipient."""
        return self.status in OPT_OUT_STATUSES or self.opted_out or self.complained_before

    @property
    def complains(self) -> bool:
        """Whether the recipient is suppressed as a complaint rather than an unsubscribe."""
        return self.status is Status.COMPLAINED or self.complained_before


# Unusable entries a receipt names (the rest are counted in `ParsedReceipt.unusable`): enough for an operator
# to find what a provider sent wrong, bounded whatever the batch holds.
MAX_NAMED_UNUSABLE = 20


@dataclass
class ParsedReceipt:
    """Events of one receipt; `ignored` counts entries that carry no status we track, those not the
    provider's documented shape (`unusable`) included."""

    events: list[ReceiptEvent] = field(default_factory=list)
    ignored: int = 0
    # Opt-ins (SendGrid's group_resubscribe), each undoing the opt-out of its `topic`: not delivery
    # events, so never recorded or counted; `status` is the unsubscribe they undo.
    resubscribes: list[ReceiptEvent] = field(default_factory=list)
    # Entries skipped because they are not the provider's documented shape (not an object, no event type):
    # how many, and the first `MAX_NAMED_UNUSABLE` as "<path>: <problem>" (positions and fixed phrases only).
    unusable: int = 0
    named_unusable: list[str] = field(default_factory=list)

    def skip(self, path: str, problem: str) -> None:
        """An entry left out as unusable: ignored, and named by its place in the receipt."""
        self.ignored += 1
        self.unusable += 1
        if len(self.named_unusable) < MAX_NAMED_UNUSABLE:
            self.named_unusable.append(f"{path}: {problem}")

    @property
    def total(self) -> int:
        return len(self.events) + len(self.resubscribes) + self.ignored
