"""What every provider connector takes and returns.

A connector sends already-rendered messages; it knows nothing of campaigns,
caps or idempotency. `OutboundMessage.to` and the rendered content hold PII:
they live only for the batch and never reach a log, an error or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from services.dispatcher.rendering import SubstitutionPattern


# Providers' error codes have at most six digits (Twilio's five, Meta's 131047). A longer number in
# that place may be the recipient's own, echoed back: it is not repeated.
MAX_ERROR_CODE_DIGITS = 6

# What a refusal that stops a batch refused, as `not_attempted` tells the messages it left unsent.
REFUSED_FOR_ACCOUNT = "the connector's account"
REFUSED_FOR_TEMPLATE = "the campaign's whatsapp template"


def numeric_error_code(value: object) -> int | None:
    """`value` when it is a provider's numeric error code (an int of at most six digits), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**MAX_ERROR_CODE_DIGITS:
        return value
    return None


@dataclass(frozen=True)
class WhatsAppTemplateContent:
    name: str
    language: str
    params: list[str] = field(default_factory=list)  # rendered: may hold PII


# Not frozen, though nothing changes it once built: a frozen dataclass sets each field through
# object.__setattr__, 1.8 µs a message instead of 0.7.
@dataclass(slots=True)
class OutboundMessage:
    message_id: str  # ours; travels with the message wherever the provider echoes it back
    anonymous_id: str
    campaign_id: str
    campaign_instance_id: str
    to: str  # email address or E.164 number (PII)
    subject: str = ""
    html_body: str = ""
    text_body: str = ""
    sms_body: str = ""  # SMS, MMS, RCS and WhatsApp text
    media_urls: list[str] = field(default_factory=list)
    whatsapp_template: WhatsAppTemplateContent | None = None
    headers: dict[str, str] = field(default_factory=dict)  # extra email headers (List-Unsubscribe ...)
    # The content with a tag where each value goes, and this message's value for each tag (PII):
    # messages of one pattern can share a request with a provider that substitutes (SendGrid).
    pattern: SubstitutionPattern | None = None
    substitutions: dict[str, str] | None = None


class SendStatus(Enum):
    SENT = "sent"  # the provider accepted it
    FAILED = "failed"  # the provider refused it, or gave up after retries: not sent
    OUTCOME_UNKNOWN = "outcome_unknown"  # the request may have reached the provider: never resent blindly


@dataclass
class SendOutcome:
    message_id: str
    status: SendStatus
    provider_message_id: str = ""
    # One of DispatchResult.error_code's, one code a remedy: HTTP_400, RATE_LIMITED, PROVIDER_AUTH_FAILED,
    # ACCOUNT_SUSPENDED, SENDER_REFUSED, SENDING_PAUSED, QUOTA_EXCEEDED, TEMPLATE_REFUSED, SERVER_ERROR,
    # OUTCOME_UNKNOWN ...
    error_code: str = ""
    error_message: str = ""  # PII-free: never quotes a provider's body or an address
    attempts: int = 1
    opted_out: bool = False  # refused because the recipient opted out with the provider: to suppress
    # Refused for what every message of the batch shares, not for this message: the connector's account
    # (its credentials, its quota, its standing) or the campaign's WhatsApp template. Every other message
    # of the batch would meet the same refusal, so they are not sent.
    account_refused: bool = False
    refused_for: str = REFUSED_FOR_ACCOUNT  # what was refused, when `account_refused`: `not_attempted` names it


def not_attempted(message: OutboundMessage, refused: SendOutcome) -> SendOutcome:
    """The outcome of a message of a batch left unsent because an earlier one met `refused`, a refusal
    of what the batch shares (the connector's account, the campaign's template): failed with its code,
    never attempted, so released for a re-run."""
    return SendOutcome(
        message.message_id,
        SendStatus.FAILED,
        error_code=refused.error_code,
        error_message=f"not attempted: an earlier message of the batch was refused for {refused.refused_for} "
        f"({refused.error_message})",
        attempts=0,
        refused_for=refused.refused_for,
    )


async def send_each(
    messages: list[OutboundMessage], send_one: Callable[[OutboundMessage], Awaitable[SendOutcome]]
) -> list[SendOutcome]:
    """`send_one` for each message in turn, until one meets a refusal of the connector's account or of the
    campaign's template: the rest fail with it, unsent (a thousand requests with an expired token or a
    misspelled template only provoke the provider)."""
    outcomes = []
    refused: SendOutcome | None = None
    for message in messages:
        if refused is not None:
            outcomes.append(not_attempted(message, refused))
            continue
        outcome = await send_one(message)
        if outcome.account_refused:
            refused = outcome
        outcomes.append(outcome)
    return outcomes


class Connector(Protocol):
    """A provider client. `max_batch` messages go to one `send` call (SendGrid: 1000; others: 1)."""

    provider: str  # sendgrid | ses | smtp | twilio | whatsapp | custom
    max_batch: int

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        """One outcome per message, in order; retries 429/5xx/refused connections itself. Once a message
        meets a refusal of the account or the template (`account_refused`), the rest fail unsent (`not_attempted`)."""
        ...

    async def close(self) -> None: ...
