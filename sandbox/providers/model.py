"""State of the sandbox providers: accounts, injected faults, the outbox and counters.

Everything here is plain data; the HTTP handling lives in the provider modules and `server`.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from aiohttp import web

from sandbox.faults import CountedFaults
from sandbox.signing import SendGridSigner

SENDGRID = "sendgrid"
TWILIO = "twilio"
WHATSAPP = "whatsapp"
CUSTOM = "custom"
# The connector-side names (DESIGN.md); "custom" is the Vonage-style SMS gateway.
PROVIDERS = (SENDGRID, TWILIO, WHATSAPP, CUSTOM)

DEFAULT_OUTBOX_LIMIT = 100_000

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def looks_like_email(value: str) -> bool:
    return bool(_EMAIL.match(value))


def is_e164(value: str) -> bool:
    return bool(_E164.match(value))


def recipient_key(value: str) -> str:
    """How `Faults.reject_to` compares recipients: emails case-insensitively, numbers by digits only.

    So ``+447700900001`` in ``reject_to`` also refuses WhatsApp's ``447700900001``.
    """
    value = value.strip()
    if "@" in value:
        return value.lower()
    return re.sub(r"\D", "", value)


def random_token(chars: int) -> str:
    """`chars` random url-safe characters (SendGrid message IDs, fbtrace IDs, event IDs)."""
    return secrets.token_urlsafe(chars)[:chars]


def random_hex(chars: int, *, upper: bool = False) -> str:
    value = secrets.token_hex((chars + 1) // 2)[:chars]
    return value.upper() if upper else value


@dataclass(frozen=True)
class ProviderAccount:
    """One provider account the sandbox accepts, and where its receipts go.

    ``credential`` identifies the account in a send request: the SendGrid API key, the Twilio
    AccountSid, the WhatsApp phone number ID or the gateway's ``api_key``. ``secret`` is the
    Twilio auth token, the WhatsApp app secret (signs webhooks) or the gateway's ``api_secret``;
    for SendGrid it may be a `SendGridSigner` of its own (default: the sandbox's signer).
    ``access_token`` is the WhatsApp bearer token. ``workspace_id``/``connector_id`` build the
    receipt URLs, since a send request does not say which connector sent it.
    """

    provider: str
    credential: str
    workspace_id: str = ""
    connector_id: str = ""
    secret: str | SendGridSigner | None = None
    access_token: str = ""
    display_phone_number: str = "15550001234"  # WhatsApp webhook metadata
    business_account_id: str = "102290129340398"  # WhatsApp webhook entry id

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; expected one of {PROVIDERS}")
        if not self.credential:
            raise ValueError("credential is required")
        if self.provider == TWILIO and not re.fullmatch(r"AC[0-9a-fA-F]{32}", self.credential):
            raise ValueError("a Twilio credential is an AccountSid, AC + 32 hex digits")
        if self.provider in (TWILIO, WHATSAPP, CUSTOM) and not isinstance(self.secret, str):
            raise ValueError(f"a {self.provider} account needs a string secret")
        if self.provider == SENDGRID and not (self.secret is None or isinstance(self.secret, SendGridSigner)):
            raise ValueError("a SendGrid account's secret is a SendGridSigner, or None for the sandbox's own")
        if self.provider == WHATSAPP and not self.access_token:
            raise ValueError("a WhatsApp account needs an access_token")

    @property
    def secret_text(self) -> str:
        return self.secret if isinstance(self.secret, str) else ""


@dataclass
class Faults(CountedFaults):
    """Injected misbehaviour for one provider. Counts go down by one each time the fault fires; -1 means always.

    Order per request: the body is read, then ``latency_ms``, then a rate limit (429 with
    ``Retry-After``; SendGrid's says when in ``X-RateLimit-Reset`` instead), then ``status``, then
    normal handling (auth, validation, ``reject_to``), then ``reset_count``, which aborts the
    connection after the request was handled: an accepted message stays in the outbox (and gets its
    receipts), as it might at a real provider, so the client cannot know the outcome. A client that
    times out during the latency is in the same spot.
    """

    latency_ms: int = 0
    status: int | None = None
    status_count: int = 0
    rate_limit_count: int = 0
    retry_after_seconds: int = 1
    reset_count: int = 0
    reject_to: set[str] = field(default_factory=set)
    # Recipients who opted out with the provider itself (Twilio answers 21610 for them, WhatsApp 131050).
    opted_out: set[str] = field(default_factory=set)
    # WhatsApp templates refused by name, with Meta's code for each (132001 not found, 132015 paused ...).
    template_errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Any) -> Faults:
        """Build from an admin request body; raises ValueError naming the first bad field."""
        if not isinstance(body, dict):
            raise ValueError("faults must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in body.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}")
            if name in ("reject_to", "opted_out"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of strings")
                values[name] = set(value)
            elif name == "template_errors":
                if not isinstance(value, dict) or not all(
                    isinstance(code, int) and not isinstance(code, bool) and 0 <= code < 10**6
                    for code in value.values()
                ):
                    raise ValueError("template_errors must map template names to Meta's numeric error codes")
                values[name] = dict(value)
            elif name == "status":
                if value is not None and not (isinstance(value, int) and 400 <= value <= 599):
                    raise ValueError("status must be an HTTP error status (400-599) or null")
                values[name] = value
            else:
                if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                    raise ValueError(f"{name} must be an integer >= -1")
                values[name] = value
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["reject_to"] = sorted(body["reject_to"])
        body["opted_out"] = sorted(body["opted_out"])
        return body

    def rejects(self, recipient: str) -> bool:
        return _among(recipient, self.reject_to)

    def has_opted_out(self, recipient: str) -> bool:
        return _among(recipient, self.opted_out)


def _among(recipient: str, recipients: set[str]) -> bool:
    return bool(recipients) and recipient_key(recipient) in {recipient_key(r) for r in recipients}


@dataclass(frozen=True)
class OutboxMessage:
    """One message as a provider received it (holds the recipient: sandbox data only).

    SendGrid gives one entry per ``to`` address of each personalization (cc/bcc are validated,
    not recorded). ``receipt_message_id`` is the ID receipts carry: SendGrid's ``sg_message_id``
    (``X-Message-Id`` + "." + suffix), else the provider message ID.
    """

    provider: str
    provider_message_id: str
    to: str
    sender: str = ""
    subject: str = ""
    text: str = ""  # text/plain part, SMS text or WhatsApp text body
    html: str = ""
    template: Mapping[str, Any] | None = None  # WhatsApp template, or SendGrid template_id + data
    media_urls: tuple[str, ...] = ()
    custom_args: Mapping[str, str] = field(default_factory=dict)  # SendGrid
    status_callback: str = ""  # Twilio
    biz_opaque_callback_data: str = ""  # WhatsApp
    client_ref: str = ""  # custom gateway
    headers: Mapping[str, str] = field(default_factory=dict)  # SendGrid personalization headers (List-Unsubscribe)
    callback: str = ""  # custom gateway; recorded only, it posts no receipts
    workspace_id: str = ""
    connector_id: str = ""
    receipt_message_id: str = ""
    received_at: float = 0.0

    @property
    def body(self) -> str:
        """Twilio's and the gateway's word for ``text``."""
        return self.text

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["media_urls"] = list(self.media_urls)
        body["custom_args"] = dict(self.custom_args)
        body["headers"] = dict(self.headers)
        body["template"] = dict(self.template) if self.template is not None else None
        return body


class Outbox(Sequence[OutboxMessage]):
    """The most recent accepted messages, oldest first, bounded so long benchmarks do not grow memory."""

    def __init__(self, limit: int = DEFAULT_OUTBOX_LIMIT) -> None:
        if limit < 1:
            raise ValueError("outbox limit must be at least 1")
        self._messages: deque[OutboxMessage] = deque(maxlen=limit)

    @property
    def limit(self) -> int:
        return self._messages.maxlen or 0

    def append(self, message: OutboxMessage) -> None:
        self._messages.append(message)

    def clear(self) -> None:
        self._messages.clear()

    def for_provider(self, provider: str) -> list[OutboxMessage]:
        return [m for m in self._messages if m.provider == provider]

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[OutboxMessage]:
        return iter(self._messages)

    @overload
    def __getitem__(self, index: int) -> OutboxMessage: ...

    @overload
    def __getitem__(self, index: slice) -> list[OutboxMessage]: ...

    def __getitem__(self, index: int | slice) -> OutboxMessage | list[OutboxMessage]:
        if isinstance(index, slice):
            return list(self._messages)[index]
        return self._messages[index]

    def __repr__(self) -> str:
        return f"Outbox({len(self)} of at most {self.limit})"


@dataclass
class Stats:
    """What clients asked for and what the sandbox did, per provider, for tests and benchmarks."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # "twilio 201", "sendgrid 400" ...
    accepted: Counter[str] = field(default_factory=Counter)  # messages recorded in the outbox
    faults: Counter[str] = field(default_factory=Counter)  # "whatsapp rate_limit", "custom reset" ...
    resets: int = 0
    receipts_posted: Counter[str] = field(default_factory=Counter)  # receipt POSTs answered 2xx
    receipt_events: Counter[str] = field(default_factory=Counter)  # events/statuses in those POSTs
    receipt_retries: Counter[str] = field(default_factory=Counter)
    receipts_failed: Counter[str] = field(default_factory=Counter)  # POSTs given up after all attempts
    receipts_skipped: Counter[str] = field(default_factory=Counter)  # no receipts URL / callback to post to
    peak_in_flight: Counter[str] = field(default_factory=Counter)  # the most requests served at once

    def reset(self) -> None:
        # In place, so tests holding ``sandbox.stats`` see the reset.
        for value in self.__dict__.values():
            if isinstance(value, Counter):
                value.clear()
        self.resets = 0

    def to_json(self) -> dict[str, Any]:
        return {name: dict(value) if isinstance(value, Counter) else value for name, value in self.__dict__.items()}


@dataclass(frozen=True)
class SendContext:
    """What a provider's send handler may know: its accounts (by credential), faults and the clock."""

    accounts: Mapping[str, ProviderAccount]
    faults: Faults
    now: float


@dataclass
class SendResult:
    """A provider's answer to a send request and the messages it accepted (none when refused)."""

    response: web.Response
    accepted: list[OutboxMessage] = field(default_factory=list)
    account: ProviderAccount | None = None


@dataclass(frozen=True)
class ReceiptPost:
    """One webhook request a provider would make; signed when it is sent, so timestamps are fresh."""

    url: str
    body: bytes
    sign: Callable[[bytes], Mapping[str, str]]
    content_type: str
    events: int


ReceiptScript = Callable[[str, OutboxMessage], Sequence[str]]
"""Which receipt statuses a message gets, in order: ``(provider, outbox_entry) -> statuses``."""


def index_accounts(accounts: Iterable[ProviderAccount], provider: str) -> dict[str, ProviderAccount]:
    return {a.credential: a for a in accounts if a.provider == provider}
