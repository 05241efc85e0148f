"""PiiApiClient calls a brand's PII API and turns replies into per-ID outcomes.

Single mode makes one call per ID (bounded concurrency), its reply checked to carry
that ID at `id_path` when the config sets one; bulk mode one call per batch, matched
back by `id_path`. Every call has a timeout, retries with full
jitter or the server's Retry-After, a circuit breaker per endpoint and one token
refresh on 401. A config's `max_requests_per_second` is kept across processes by
reserving a slot in Redis before each request, retries included. Outcomes carry
PII only in `contact` and `attributes`; errors carry codes, statuses and counts,
never values.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from email.message import Message
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from opentelemetry.metrics import Observation
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.anonymous_ids import INVALID_ID_MESSAGE, valid_anonymous_ids
from libs.backoff import full_jitter_delay, parse_retry_after
from libs.concurrency import ConcurrentCalls
from libs.http_bodies import read_at_most
from libs.json_documents import MAX_DEPTH, NestedTooDeeply, parse
from libs.jsonpath import compile_getter, field_names
from libs.netguard import BlockedAddress, check_literal_host
from libs.per_object import PerObject
from libs.rate_limit import RateLimiter
from libs.settings import ResolverSettings
from libs.store import workspace_key
from libs.telemetry import REQUEST_SECONDS_BUCKETS, Telemetry, meter, named_span, taint, tracer
from services.resolver.circuit import CircuitBreaker
from services.resolver.configs import NotLoaded, OAuthConfigStore
from services.resolver.contacts import (
    EMAIL,
    InvalidContact,
    channel_family,
    contact_label,
    normalize_contact,
    normalize_email,
    normalize_phone,
)
from services.resolver.extraction import (
    ValueDecryptionFailed,
    ValueNotText,
    as_text,
    check_text,
    decode_key,
    decrypt_value,
    null_record,
    path_error,
    record_steps,
    select,
)
from services.resolver.oauth import OAuthTokens, TokenUnavailable
from services.resolver.requests import IdNotSendable, PiiApiRequest, bulk_request, single_request

log = logging.getLogger(__name__)

E = pb.ResolveErrorCode
_NO_ERROR = pb.RESOLVE_ERROR_CODE_UNSPECIFIED  # checked per contact: a module constant, not an enum lookup

# When the caller stops waiting (its gRPC deadline, less time for the reply to get back), as
# `time.monotonic()`: an attempt is cut to the time left, and a retry that cannot get an answer by
# then is not started. Each ID then gets its error rather than the whole call DEADLINE_EXCEEDED.
caller_deadline: ContextVar[float | None] = ContextVar("caller_deadline", default=None)
# The least an attempt is given: below it, another attempt would only time out.
MIN_ATTEMPT_SECONDS = 0.05


def _time_left() -> float | None:
    deadline = caller_deadline.get()
    return None if deadline is None else deadline - time.monotonic()


# Why an ID's request was not made: its slot would have come too late. The code is RATE_LIMITED, as the
# cap is a rate limit of the brand's; the detail says it is the config's own, not the API's 429s.
NO_SLOT = "the config's max_requests_per_second leaves no slot before the caller's deadline"
NO_SLOT_FOR_RETRY = "the config's max_requests_per_second leaves no slot for another before the caller's deadline"


@dataclass(frozen=True, slots=True)
class RequestRate:
    """A config's `max_requests_per_second` and the Redis key its slots are reserved under."""

    key: str
    per_second: int


def pii_rate(config: pb.PiiApiConfig) -> RequestRate | None:
    """A PII API config's cap, shared by every config of its workspace and channel family (versions,
    and unsaved ones on the Test screen, call the same API); None without one."""
    if not config.max_requests_per_second:
        return None
    key = workspace_key(config.workspace_id, "pii-rate", channel_family(config.channel))
    return RequestRate(key, config.max_requests_per_second)


T = TypeVar("T")


async def gather_or_cancel(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Awaits the calls together; when one raises (Redis down under a rate limit: the reply fails
    UNAVAILABLE), the others are cancelled, not left calling the API for a reply already given."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def display_message(code: int, channel: int) -> str:
    """The analytics text of the reference product for this failure."""
    if code == E.RESOLVE_ERROR_CODE_INVALID_ID:
        return INVALID_ID_MESSAGE
    return f"Invalid API response (fetching {contact_label(channel)})"


@dataclass
class CallResult:
    """The end of one call with its retries. `body` holds PII: never log it."""

    http_status: int = 0
    attempts: int = 0
    error: int = E.RESOLVE_ERROR_CODE_UNSPECIFIED
    detail: str = ""
    body: bytes = b""
    document: Any = None
    # The OAuth access tokens the attempts sent: a Test reply masks them should the API quote them back.
    tokens: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error == _NO_ERROR


@dataclass
class _Attempt:
    status: int = 0
    body: bytes = b""
    document: Any = None  # the parsed body of a 2xx reply
    retry_after: float | None = None
    failure: int = E.RESOLVE_ERROR_CODE_UNSPECIFIED
    detail: str = ""
    retryable: bool = False
    circuit: str = "success"  # success | failure | neutral


@dataclass(slots=True)
class Extraction:
    contact: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    error: int = E.RESOLVE_ERROR_CODE_UNSPECIFIED
    detail: str = ""


# One ID's outcome: what was extracted (or why not), with the HTTP status and attempts of its call.
_Outcome = tuple[Extraction, int, int]
_INVALID_ID = Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_ID)
_MISSING = Extraction(error=E.RESOLVE_ERROR_CODE_NOT_FOUND, detail="ID not in the reply")
_NOT_TEXT = Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail=f"a value {ValueNotText()}")
_NOT_A_LIST = "results_path did not select a list"
_NESTED_TOO_DEEPLY = f"reply is JSON nested deeper than {MAX_DEPTH:,} levels, which cannot be read"
_NO_CONTACT = Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_CONTACT, detail="contact_path matched nothing")
# A list of addresses, or an object around one: the path is to mend, not the address (nor is it quoted).
_LIST_CONTACT = Extraction(
    error=E.RESOLVE_ERROR_CODE_INVALID_CONTACT,
    detail="contact_path selected a list, not one email address or phone number: select one item "
    "(a path such as emails[0])",
)
_OBJECT_CONTACT = Extraction(
    error=E.RESOLVE_ERROR_CODE_INVALID_CONTACT,
    detail="contact_path selected an object, not one email address or phone number: select the field "
    "holding it (a path such as email.address)",
)


def _not_one_contact(selected: Any) -> Extraction | None:
    """Why what contact_path selected is no contact when it is a list or an object (written out as JSON
    text, it fails as a malformed address would); None for a single value. Asked on failure only."""
    if type(selected) is list:
        return _LIST_CONTACT if selected else _NO_CONTACT
    if type(selected) is dict:
        return _OBJECT_CONTACT if selected else _NO_CONTACT
    return None


# A single-mode reply checked at `id_path` and found to be someone else's, or no one's. Neither ID is quoted:
# the reply's is another customer's, and the one asked for is told by the contact the error comes with.
_ANOTHER_CUSTOMER = Extraction(
    error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE,
    detail="the reply is for another customer: its ID at id_path is not the one asked for",
)
_NO_ID_IN_REPLY = Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail="the reply holds no ID at id_path")
_NO_RESULTS = Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail="results_path matched nothing")


def _no_record(where: str) -> Extraction:
    """The API's "no such customer" said in JSON: null (or no items) where the record is, as `null_record`
    says it."""
    return Extraction(error=E.RESOLVE_ERROR_CODE_NOT_FOUND, detail=f"the API has no record for this ID ({where})")


_NULL_ITEM = _no_record("a null record at results_path")


def _record_at(contact_path: str) -> tuple[str | int, ...]:
    """Where contact_path finds the customer: the outermost object on its way (`customer` of
    `customer.contact.email`), or the first after the last item it takes (`data.customers[0]`). Null there,
    or no items, is no such customer; a null `contact` inside a customer present is a record without one."""
    steps = record_steps(contact_path)
    items = [at for at, step in enumerate(steps) if type(step) is int]
    return steps[: items[-1] + 2] if items else steps[:1]


def _no_results(config: pb.PiiApiConfig, document: Any, selected: Any) -> Extraction:
    """Why a single-mode reply's `results_path` selected no record (null, or an empty list)."""
    if selected is not None:
        return Extraction(
            error=E.RESOLVE_ERROR_CODE_NOT_FOUND,
            detail="the API has no record for this ID (results_path selected an empty list)",
        )
    where = null_record(document, record_steps(config.results_path, whole=True), empty_list=True)
    return _NO_RESULTS if where is None else _no_record(where)


_NOT_JSON = object()  # no document: JSON's own null is None
# aiohttp refuses a URL or header it cannot write (a line break, a host it cannot encode) before sending
# anything: asked again, it refuses the same, and the API was never reached, so no mark against its circuit.
_NOT_BUILT = "request could not be built (a header or the URL holds characters HTTP cannot carry)"


def _as_utf8(body: bytes, content_type: str | None) -> bytes | None:
    """`body` in UTF-8 when its Content-Type declares another charset it reads in; None otherwise."""
    if not content_type:
        return None
    header = Message()
    header["Content-Type"] = content_type
    charset = header.get_content_charset()
    try:
        if charset is None or codecs.lookup(charset).name == "utf-8":
            return None
        return body.decode(charset).encode()
    except (LookupError, UnicodeError):  # a charset unknown, or one the body is not in
        return None


# The content codings IANA registers (RFC 9110 8.4.1). A reply's coding is named only when it is one of these:
# the header is the API's, and could hold anything.
_CONTENT_CODINGS = frozenset(
    {
        "aes128gcm",
        "br",
        "compress",
        "dcb",
        "dcz",
        "deflate",
        "exi",
        "gzip",
        "pack200-gzip",
        "x-compress",
        "x-gzip",
        "zstd",
    }
)
# What aiohttp decodes (and, of these, asks for those it has a decoder for); any other coding is left as sent.
_DECODED_CODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})
_CODING_IN_MESSAGE = re.compile(r"\b(gzip|deflate|br|zstd)\b")


def _coding_name(codings: str) -> str:
    """`codings` (a Content-Encoding) as a detail may name it: registered codings only, never the API's text."""
    tokens = [token.strip() for token in codings.lower().split(",")]
    if 0 < len(tokens) <= 3 and all(token in _CONTENT_CODINGS for token in tokens):
        return ", ".join(tokens)
    return "not a registered content coding"


def _not_asked_for(codings: str) -> str:
    return f"reply is compressed with an encoding not asked for ({_coding_name(codings)})"


def _undecodable(exc: aiohttp.ClientError) -> str | None:
    """The detail of a reply aiohttp could not decode, None when `exc` is no such failure. Raised before the
    body is read for a coding it has no decoder for (so never asked for: br without Brotli, zstd without
    backports.zstd), and while reading for bytes that do not decode. aiohttp's message names the coding."""
    cause: BaseException | None = exc
    for _ in range(4):  # ClientResponseError <- HttpProcessingError <- ContentEncodingError
        if cause is None or isinstance(cause, ContentEncodingError):
            break
        cause = cause.__cause__
    if not isinstance(cause, ContentEncodingError):
        return None
    named = _CODING_IN_MESSAGE.search(str(cause.message))
    coding = named.group(1) if named else ""
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"reply does not decode as its Content-Encoding says ({_coding_name(coding)})"
    return _not_asked_for(coding)


def _id_text(value: Any) -> str | None:
    """An ID read from a reply as IDs are matched: text as it stands, a number as its decimal (7 and 7.0 are
    "7", never "007"); None for what names no customer (null, true, a list or an object)."""
    if type(value) is str:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return as_text(value)


def _not_sendable(exc: IdNotSendable) -> Extraction:
    return Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_ID, detail=f"the ID {exc}")


def _disagreement(records: list[Any], extract: Callable[[Any], Extraction], what: str) -> str | None:
    """What records said to be one customer's give differently (`what`, or "fields"), or None when any
    of them would do: the same contact and fields, or no contact from any."""
    first, extracted = records[0], None
    for record in records[1:]:
        try:
            if record == first:
                continue
        except RecursionError:  # nested too deeply to compare: what is read from them decides
            pass
        extracted = extracted or extract(first)
        other = extract(record)
        if extracted.error and other.error:
            continue
        if extracted.contact != other.contact or extracted.error != other.error:
            return what
        if extracted.attributes != other.attributes:
            return "fields"
    return None


def _ambiguous(records: str, differs: str) -> Extraction:
    return Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail=f"{records} with different {differs}")


def _add_outcome(
    contacts: Any, anonymous_id: str, extraction: Extraction, status: int, attempts: int, channel: int, errors: dict
) -> None:
    """One ID's outcome as the next contact of a reply's repeated field; a failure also counted in
    `errors`, by code."""
    code = extraction.error
    if code:
        errors[code] = errors.get(code, 0) + 1
        error = pb.ResolveError(
            code=code,
            message=display_message(code, channel),
            http_status=status,
            attempts=attempts,
            detail=extraction.detail,
        )
        contacts.add(anonymous_id=anonymous_id, error=error)
        return
    # In place, item by item: a map given to `add` goes through MutableMapping.update in Python.
    attributes = contacts.add(anonymous_id=anonymous_id, contact=extraction.contact).attributes
    for name, value in extraction.attributes.items():
        attributes[name] = value


@dataclass(frozen=True)
class _Paths:
    """A config's paths compiled, and its decryption key, once per call rather than per record."""

    contact: Callable[[Any], Any]
    attributes: tuple[tuple[str, Callable[[Any], Any]], ...]
    key: AESGCM | None
    # What PII APIs' paths mostly are, read with `dict.get` in a bulk reply's loop instead of a
    # getter's call per value (a 100-record reply 25 µs faster): the contact path when it is one
    # field; per attribute (name, getter, field, inner field), the fields set for a path of one or
    # two fields, None for any other, read by its getter.
    contact_field: str | None = None
    attribute_plan: tuple[tuple[str, Callable[[Any], Any], str | None, str | None], ...] = ()
    # A single-mode reply's ID, checked against the one asked for when the config sets `id_path`; why
    # the path does not compile, for a config saved before single mode's was validated.
    id_of: Callable[[Any], Any] | None = None
    id_error: str | None = None
    # Where contact_path finds the object holding the contact (`customer` of `customer.email`): null
    # there is the API saying it has no such customer, not a customer without a contact.
    record_at: tuple[str | int, ...] = ()

    @classmethod
    def of(cls, config: pb.PiiApiConfig) -> _Paths:
        contact = field_names(config.contact_path)
        attributes, plan = [], []
        for name, path in config.attribute_paths.items():
            get, names = compile_getter(path), field_names(path)
            attributes.append((name, get))
            if names is not None and len(names) <= 2:
                plan.append((name, get, names[0], names[1] if len(names) == 2 else None))
            else:
                plan.append((name, get, None, None))
        id_error = path_error(config.id_path) if config.id_path else None
        return cls(
            compile_getter(config.contact_path),
            tuple(attributes),
            AESGCM(decode_key(config.encryption_key)) if config.encryption_key else None,
            contact[0] if contact is not None and len(contact) == 1 else None,
            tuple(plan),
            compile_getter(config.id_path) if config.id_path and id_error is None else None,
            id_error,
            _record_at(config.contact_path),
        )

    def no_record(self, record: Any) -> Extraction | None:
        """NOT_FOUND when `record` is null, or null where contact_path looks for the customer; None
        otherwise. Asked only of a record without a contact."""
        where = null_record(record, self.record_at)
        return None if where is None else _no_record(where)

    def text(self, selected: Any) -> str | None:
        """A value a path selected as text, decrypted when the config has a key; raises ValueDecryptionFailed."""
        value = as_text(selected)
        if value is not None and self.key is not None and value != "":
            return decrypt_value(self.key, value)
        return value

    def attributes_of(self, record: Any) -> dict[str, str]:
        """The values at `attribute_paths` that are present (`read` inlined: it runs per attribute of
        every record), text decrypted when the config has a key; raises ValueDecryptionFailed or
        ValueNotText."""
        found = {}
        key = self.key
        unchecked = key is None  # a decrypted value is UTF-8 already
        for name, get in self.attributes:
            value = get(record)
            if value is None:
                continue
            if type(value) is not str:
                # Ciphertext is text: a number or true/false is no secret the API sealed (loyalty points
                # beside an encrypted name), and is read as it is rather than failing the customer.
                value = as_text(value)
                if value is None:  # nested deeper than can be written out: no value, as a missing one
                    continue
                unchecked = True
            elif key is not None and value != "":
                value = decrypt_value(key, value)
            found[name] = value
        if unchecked and found:
            check_text(found.values())
        return found


# A stored config's paths, for as long as the config cache hands out the same object. Not for a
# config under test: each is a request's own, seen once.
_paths_for: PerObject[pb.PiiApiConfig, _Paths] = PerObject(_Paths.of)


def endpoint_of(config: pb.PiiApiConfig) -> str:
    """The breaker key: workspace, method and URL template, so every ID of one API shares a circuit,
    and no workspace's calls (a test of a config pointing at another brand's URL) open another's."""
    return f"{config.workspace_id} {pb.HttpMethod.Name(config.method)} {config.url}"


class PiiApiClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        tokens: OAuthTokens,
        oauth_configs: OAuthConfigStore,
        breaker: CircuitBreaker,
        settings: ResolverSettings,
        limiter: RateLimiter,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._oauth_configs = oauth_configs
        self._breaker = breaker
        self._settings = settings
        self._limiter = limiter
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._calls = ConcurrentCalls(
            settings.pii_concurrency,
            settings.pii_concurrency_per_workspace,
            calls="concurrent PII API calls",
            process="the resolver's",
        )
        self._tracer = tracer(telemetry.tracer_provider if telemetry else None, __name__)
        m = meter(telemetry.meter_provider if telemetry else None, __name__)
        self._latency = m.create_histogram(
            "tokensend.pii_api.duration",
            unit="s",
            description="PII API call latency, retries included",
            explicit_bucket_boundaries_advisory=REQUEST_SECONDS_BUCKETS,  # seconds, not the SDK's milliseconds
        )
        self._errors = m.create_counter("tokensend.pii_api.errors", description="IDs not resolved, by error code")
        self._resolved = m.create_counter("tokensend.pii_api.resolved", description="IDs resolved")
        m.create_observable_gauge(
            "tokensend.pii_api.circuits_open",
            callbacks=[self._observe_circuits],
            description="PII API endpoints whose circuit is open or half-open, by host",
        )
        m.create_observable_gauge(
            "tokensend.pii_api.waiting",
            callbacks=[self._calls.observe_waiting],
            description="PII API calls waiting for a place among the concurrent calls, by workspace",
        )

    def _observe_circuits(self, _options: object) -> list[Observation]:
        hosts = Counter(urlsplit(e.rsplit(" ", 1)[-1]).hostname or "" for e in self._breaker.open_endpoints())
        return [Observation(count, {"host": host}) for host, count in hosts.items()] or [Observation(0)]

    # -- public -------------------------------------------------------------

    async def resolve(
        self,
        config: pb.PiiApiConfig,
        channel: int,
        anonymous_ids: list[str],
        oauth: pb.OAuthConfig | None | NotLoaded,
        contacts: Any,
    ) -> None:
        """Adds one outcome per requested ID to `contacts`, a reply's repeated field, in request order;
        `oauth` when read with the config. In place: a contact made on its own and then put in a reply
        is copied, 1.5 µs a contact."""
        with named_span(self._tracer, "pii_api.resolve") as span:
            span.set_attribute("tokensend.workspace_id", config.workspace_id)
            span.set_attribute("tokensend.batch.size", len(anonymous_ids))
            span.set_attribute("tokensend.pii_api.mode", pb.Mode.Name(config.mode))
            span.set_attribute("tokensend.config_version", config.version)
            failed = await self._resolve(config, channel, anonymous_ids, oauth, contacts)
            span.set_attribute("tokensend.resolve.errors", failed)

    async def _oauth_for(self, config: pb.PiiApiConfig) -> pb.OAuthConfig | None:
        if not config.oauth_config_id:
            return None
        return await self._oauth_configs.load(config.workspace_id, config.oauth_config_id)

    async def _resolve(
        self,
        config: pb.PiiApiConfig,
        channel: int,
        anonymous_ids: list[str],
        oauth: pb.OAuthConfig | None | NotLoaded,
        contacts: Any,
    ) -> int:
        """Adds one contact per requested ID to `contacts`, in request order; returns how many failed."""
        unique = valid_anonymous_ids(list(dict.fromkeys(anonymous_ids)))
        # Each requested ID once and valid, as the dispatcher asks: outcomes are written straight into
        # the reply, batch after batch. Otherwise into a reply of their own, then copied in request
        # order beside the invalid IDs' errors (1.5 µs a contact, for the rare request that needs it).
        direct = len(unique) == len(anonymous_ids)
        into = contacts if direct else pb.ResolveContactsResponse().contacts
        errors: dict[int, int] = {}  # a plain dict: Counter() is built in Python, on every call
        if unique:
            if isinstance(oauth, NotLoaded):
                oauth = await self._oauth_for(config)
            if config.mode == pb.MODE_BULK:
                await self._resolve_bulk(config, oauth, channel, unique, into, errors)
            else:
                outcomes = await self._resolve_each(config, oauth, channel, unique)
                for anonymous_id, (extraction, status, attempts) in zip(unique, outcomes, strict=True):
                    _add_outcome(into, anonymous_id, extraction, status, attempts, channel, errors)
        if not direct:
            errors = self._in_request_order(anonymous_ids, into, contacts, channel)
        names = {E.Name(code): count for code, count in errors.items()}
        for code, count in names.items():
            self._errors.add(count, {"code": code.removeprefix("RESOLVE_ERROR_CODE_")})
        failed = sum(errors.values())
        self._resolved.add(len(anonymous_ids) - failed, {"mode": pb.Mode.Name(config.mode)})
        # A line per call at rates of thousands a second is noise: clean calls are logged at debug level.
        log.log(
            logging.INFO if errors else logging.DEBUG,
            "resolved %d of %d ids for workspace %s (%s mode), errors %s",
            len(anonymous_ids) - failed,
            len(anonymous_ids),
            config.workspace_id,
            pb.Mode.Name(config.mode),
            names or "none",
        )
        return failed

    @staticmethod
    def _in_request_order(anonymous_ids: list[str], resolved: Any, contacts: Any, channel: int) -> dict[int, int]:
        """The contacts of `resolved` (each valid ID once) copied into `contacts` in request order, a
        repeated ID as often as asked, an invalid one as its error; returns the failures by code,
        counted per requested ID."""
        by_id = {contact.anonymous_id: contact for contact in resolved}
        errors: dict[int, int] = {}
        for anonymous_id in anonymous_ids:
            found = by_id.get(anonymous_id)
            if found is None:
                _add_outcome(contacts, anonymous_id, _INVALID_ID, 0, 0, channel, errors)
                continue
            contacts.add().CopyFrom(found)
            if found.HasField("error"):
                errors[found.error.code] = errors.get(found.error.code, 0) + 1
        return errors

    async def test(
        self,
        config: pb.PiiApiConfig,
        channel: int,
        anonymous_id: str,
        *,
        rate: RequestRate | None,
        fields_only: bool = False,
    ) -> tuple[CallResult, Extraction]:
        """One lookup for the config screen: the raw reply and what the paths extract from it (for a
        content API, `fields_only`: the values at `attribute_paths`, no contact). Within `rate`, as
        the config's other calls: the test goes to the same API."""
        oauth = await self._oauth_for(config)
        # A test's failures are its own: they neither open the circuit sends go through nor wait on it.
        breaker = CircuitBreaker(threshold=1_000_000, open_seconds=0)
        paths = _Paths.of(config)

        def extract(record: Any) -> Extraction:
            if fields_only:
                return self._extract_fields(paths, record)
            return self._extract(config, channel, record, paths)

        if config.mode == pb.MODE_BULK:
            result = await self._call(config, oauth, bulk_request(config, [anonymous_id]), False, rate, breaker=breaker)
            if not result.ok:
                return result, Extraction(error=result.error, detail=result.detail)
            records = self._records_by_id(config, result.document, extract, "fields" if fields_only else "contacts")
            if records is None:
                return result, Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail=_NOT_A_LIST)
            record = records.get(anonymous_id)
            if record is None:
                return result, Extraction(error=E.RESOLVE_ERROR_CODE_NOT_FOUND, detail="ID not in the reply")
            return result, record if type(record) is Extraction else extract(record)
        try:
            request = single_request(config, anonymous_id)
        except IdNotSendable as exc:
            return CallResult(), _not_sendable(exc)
        result = await self._call(config, oauth, request, True, rate, breaker=breaker)
        if not result.ok:
            return result, Extraction(error=result.error, detail=result.detail)
        what = "fields" if fields_only else "contacts"
        record = self._single_record(config, result.document, anonymous_id, paths, extract, what)
        return result, record if type(record) is Extraction else extract(record)

    async def fetch_fields(
        self, config: pb.PiiApiConfig, anonymous_ids: list[str], rate: RequestRate | None
    ) -> dict[str, Extraction]:
        """Content APIs: per valid ID, the values at `attribute_paths` (no contact); errors per ID, no
        values. Requests within `rate` (the content API's own)."""
        unique = valid_anonymous_ids(list(dict.fromkeys(anonymous_ids)))
        if not unique:
            return {}
        oauth = await self._oauth_for(config)
        outcomes: dict[str, Extraction] = {}
        paths = _Paths.of(config)
        if config.mode == pb.MODE_BULK:
            size = config.batch_size or 500

            async def batch(ids: list[str]) -> None:
                result = await self._call(config, oauth, bulk_request(config, ids), False, rate)
                records = None
                if result.ok:
                    records = self._records_by_id(
                        config, result.document, partial(self._extract_fields, paths), "fields"
                    )
                for anonymous_id in ids:
                    if not result.ok:
                        outcomes[anonymous_id] = Extraction(error=result.error, detail=result.detail)
                    elif records is None:
                        outcomes[anonymous_id] = Extraction(
                            error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail=_NOT_A_LIST
                        )
                    elif anonymous_id not in records:
                        outcomes[anonymous_id] = Extraction(
                            error=E.RESOLVE_ERROR_CODE_NOT_FOUND, detail="ID not in the reply"
                        )
                    elif type(record := records[anonymous_id]) is Extraction:  # records that disagree
                        outcomes[anonymous_id] = record
                    else:
                        outcomes[anonymous_id] = self._extract_fields(paths, record)

            await gather_or_cancel(batch(unique[i : i + size]) for i in range(0, len(unique), size))
        else:

            async def one(anonymous_id: str) -> None:
                try:
                    request = single_request(config, anonymous_id)
                except IdNotSendable as exc:
                    outcomes[anonymous_id] = _not_sendable(exc)
                    return
                result = await self._call(config, oauth, request, True, rate)
                if not result.ok:
                    outcomes[anonymous_id] = Extraction(error=result.error, detail=result.detail)
                else:
                    record = self._single_record(
                        config, result.document, anonymous_id, paths, partial(self._extract_fields, paths), "fields"
                    )
                    outcomes[anonymous_id] = (
                        record if type(record) is Extraction else self._extract_fields(paths, record)
                    )

            await gather_or_cancel(one(i) for i in unique)
        return outcomes

    @staticmethod
    def _extract_fields(paths: _Paths, record: Any) -> Extraction:
        try:
            return Extraction(attributes=paths.attributes_of(record))
        except ValueDecryptionFailed as exc:
            return Extraction(error=E.RESOLVE_ERROR_CODE_DECRYPTION_FAILED, detail=f"encrypted value {exc}")
        except ValueNotText:
            return _NOT_TEXT

    # -- per ID / per batch -----------------------------------------------

    async def _resolve_each(
        self, config: pb.PiiApiConfig, oauth: pb.OAuthConfig | None, channel: int, ids: list[str]
    ) -> list[_Outcome]:
        """Single mode: a request per ID, all at once, their outcomes in the IDs' order."""
        rate = pii_rate(config)
        if len(ids) == 1:  # a triggered message's lookup: awaited here, not as a task of its own
            return [await self._resolve_one(config, oauth, channel, ids[0], rate)]
        return await gather_or_cancel(self._resolve_one(config, oauth, channel, i, rate) for i in ids)

    async def _resolve_one(
        self,
        config: pb.PiiApiConfig,
        oauth: pb.OAuthConfig | None,
        channel: int,
        anonymous_id: str,
        rate: RequestRate | None,
    ) -> _Outcome:
        try:
            request = single_request(config, anonymous_id)
        except IdNotSendable as exc:
            return _not_sendable(exc), 0, 0
        result = await self._call(config, oauth, request, True, rate)
        if not result.ok:
            return Extraction(error=result.error, detail=result.detail), result.http_status, result.attempts
        paths = _paths_for(config)
        record = self._single_record(
            config, result.document, anonymous_id, paths, lambda r: self._extract(config, channel, r, paths)
        )
        extraction = record if type(record) is Extraction else self._extract(config, channel, record, paths)
        return extraction, result.http_status, result.attempts

    async def _resolve_bulk(
        self,
        config: pb.PiiApiConfig,
        oauth: pb.OAuthConfig | None,
        channel: int,
        ids: list[str],
        into: Any,
        errors: dict[int, int],
    ) -> None:
        """One request per `batch_size` IDs, all at once; their records then written in request order."""
        size = config.batch_size or 500
        rate = pii_rate(config)
        if len(ids) <= size:  # one request: awaited here, not as a task of its own
            batches = [ids]
            results = [await self._call(config, oauth, bulk_request(config, ids), False, rate)]
        else:
            batches = [ids[i : i + size] for i in range(0, len(ids), size)]
            results = await gather_or_cancel(self._parsed_call(config, oauth, b, rate) for b in batches)
        for batch, result in zip(batches, results, strict=True):
            self._add_batch(config, channel, batch, result, into, errors)

    async def _parsed_call(
        self, config: pb.PiiApiConfig, oauth: pb.OAuthConfig | None, ids: list[str], rate: RequestRate | None
    ) -> CallResult:
        """A bulk call among several awaited together: only its parsed reply is kept until all are in
        (the raw body is for the Test screens), not twice each reply."""
        result = await self._call(config, oauth, bulk_request(config, ids), False, rate)
        result.body = b""
        return result

    @classmethod
    def _add_batch(
        cls, config: pb.PiiApiConfig, channel: int, batch: list[str], result: CallResult, into: Any, errors: dict
    ) -> None:
        status, attempts = result.http_status, result.attempts
        records = None
        if result.ok:
            paths = _paths_for(config)
            records = cls._records_by_id(config, result.document, lambda r: cls._extract(config, channel, r, paths))
        if records is None:
            if result.ok:
                failure = Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail=_NOT_A_LIST)
            else:
                failure = Extraction(error=result.error, detail=result.detail)
            for anonymous_id in batch:
                _add_outcome(into, anonymous_id, failure, status, attempts, channel, errors)
            return
        cls._add_records(config, channel, batch, records, status, attempts, into, errors)

    @classmethod
    def _add_records(
        cls,
        config: pb.PiiApiConfig,
        channel: int,
        batch: list[str],
        records: dict[str, Any],
        status: int,
        attempts: int,
        into: Any,
        errors: dict[int, int],
    ) -> None:
        """Each ID of a bulk reply as the next contact of `into`, in one loop: a record whose contact is
        a non-blank string of a config without a key (what PII APIs mostly send) is read and written
        into the reply here, its values tainted once for the batch; any other goes through `_extract`.
        No outcome object in between: 2 % of a 100-ID call's CPU, 4 % of a 500-ID one."""
        paths = _paths_for(config)
        if channel == EMAIL:
            normalize = normalize_email
        elif config.default_region:
            normalize = partial(normalize_phone, region=config.default_region)
        else:
            normalize = normalize_phone
        contact_of, plan, plain = paths.contact, paths.attribute_plan, paths.key is None
        contact_field = paths.contact_field
        add = into.add
        fetched: list[str] = []
        keep = fetched.append
        try:
            for anonymous_id in batch:
                record = records.get(anonymous_id)
                if record is None:
                    _add_outcome(into, anonymous_id, _MISSING, status, attempts, channel, errors)
                    continue
                if type(record) is Extraction:  # records that disagree
                    _add_outcome(into, anonymous_id, record, status, attempts, channel, errors)
                    continue
                if contact_field is None:
                    raw = contact_of(record)
                else:
                    raw = record.get(contact_field) if type(record) is dict else None
                if not plain or type(raw) is not str or not raw or raw.isspace():
                    extraction = cls._extract(config, channel, record, paths)
                    _add_outcome(into, anonymous_id, extraction, status, attempts, channel, errors)
                    continue
                try:
                    contact = normalize(raw)
                except InvalidContact as exc:
                    invalid = Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_CONTACT, detail=str(exc))
                    _add_outcome(into, anonymous_id, invalid, status, attempts, channel, errors)
                    continue
                keep(contact)
                if raw is not contact:  # mostly it is: an address or number already in its normal form
                    keep(raw)
                attributes = add(anonymous_id=anonymous_id, contact=contact).attributes
                a_dict = type(record) is dict
                try:
                    for name, get, field, inner in plan:  # `_Paths.attributes_of` without a key, into the reply
                        if field is None:
                            value = get(record)
                        elif not a_dict:
                            continue
                        else:
                            value = record.get(field)
                            if inner is not None:
                                if type(value) is not dict:
                                    continue
                                value = value.get(inner)
                        if value is None:
                            continue
                        if type(value) is not str:
                            value = as_text(value)
                            if value is None:  # nested deeper than can be written out
                                continue
                        attributes[name] = value
                        keep(value)
                except UnicodeEncodeError:  # what `check_text` finds, found here by the write itself
                    del into[-1]
                    _add_outcome(into, anonymous_id, _NOT_TEXT, status, attempts, channel, errors)
        finally:
            # Fetched values may never reach a span or a log line, wherever they would show up.
            taint(fetched)

    # -- extraction ---------------------------------------------------------

    @staticmethod
    def _single_record(
        config: pb.PiiApiConfig,
        document: Any,
        anonymous_id: str,
        paths: _Paths,
        extract: Callable[[Any], Extraction],
        what: str = "contacts",
    ) -> Any:
        """The record of `anonymous_id`'s reply: the document, or what `results_path` selects; of a list,
        the first, when the others give the same (an API that ignores an unknown filter answers with every
        customer). With `id_path`, each record must carry `anonymous_id` there, matched as a bulk reply's
        are: an API that ignored the ID asked for (a misrouted path, a cache keyed wrongly) answers with
        another customer's record. Records that disagree, or are another's, give the ID's failure, an
        Extraction. No record (the reply null, null or no items at `results_path`, null where contact_path
        looks for the customer) is NOT_FOUND: the API's answer; `results_path` missing from the reply is a
        path to mend."""
        if paths.id_error is not None:
            return Extraction(error=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail=f"id_path {paths.id_error}")
        if not config.results_path:
            records = [document]
        else:
            selected = select(config.results_path, document)
            if selected is None or (isinstance(selected, list) and not selected):
                return _no_results(config, document, selected)
            records = selected if isinstance(selected, list) else [selected]
        id_of = paths.id_of
        if id_of is not None:
            # Null items (no record, so no ID either) are left out; nothing but them is NOT_FOUND.
            kept, absent, no_id = [], None, False
            for record in records:
                ident = _id_text(id_of(record))
                if not ident:
                    missing = paths.no_record(record) if record is not None or not config.results_path else _NULL_ITEM
                    if missing is None:
                        no_id = True
                    elif absent is None:
                        absent = missing
                elif ident != anonymous_id:
                    return _ANOTHER_CUSTOMER
                else:
                    kept.append(record)
            if no_id:
                return _NO_ID_IN_REPLY
            if not kept:
                return absent
            records = kept
        if len(records) > 1:
            differs = _disagreement(records, extract, what)
            if differs is not None:
                return _ambiguous(f"the reply holds {len(records)} records", differs)
        return records[0]

    @staticmethod
    def _records_by_id(
        config: pb.PiiApiConfig, document: Any, extract: Callable[[Any], Extraction], what: str = "contacts"
    ) -> dict[str, Any] | None:
        """A bulk reply's records by the ID at `id_path`, text as it stands or a number (7 and 7.0 are
        "7", never "007"). An ID whose records disagree on what `extract` reads from them maps to its
        failure, an Extraction: any one of them may be another customer's. None when `results_path`
        selects no list, but for null where the list is: no records."""
        records = select(config.results_path, document)
        if not isinstance(records, list):
            if records is None and null_record(document, record_steps(config.results_path, whole=True)) is not None:
                return {}  # null where the list is (the reply null): no record for any ID, as an empty list
            return None
        by_id: dict[str, Any] = {}
        repeated: dict[str, list[Any]] = {}
        id_of = compile_getter(config.id_path) if records else None
        for record in records:
            ident = id_of(record)
            if type(ident) is not str:
                # true, a list or an object names no customer: "true" or '["a"]' is no match for it
                ident = _id_text(ident)
                if ident is None:
                    continue
            first = by_id.setdefault(ident, record)
            if first is not record:
                repeated.setdefault(ident, [first]).append(record)
        for ident, same_id in repeated.items():
            differs = _disagreement(same_id, extract, what)
            if differs is not None:
                by_id[ident] = _ambiguous(f"the bulk reply holds {len(same_id)} records for this ID", differs)
        return by_id

    @staticmethod
    def _extract(config: pb.PiiApiConfig, channel: int, record: Any, paths: _Paths | None = None) -> Extraction:
        paths = paths or _Paths.of(config)
        selected = paths.contact(record)
        try:
            raw_contact = paths.text(selected)
            if raw_contact is None:
                return paths.no_record(record) or _NO_CONTACT
            try:
                contact = normalize_contact(channel, raw_contact, config.default_region)
            except InvalidContact as exc:
                return _not_one_contact(selected) or Extraction(
                    error=E.RESOLVE_ERROR_CODE_INVALID_CONTACT, detail=str(exc)
                )
            attributes = paths.attributes_of(record)
        except ValueDecryptionFailed as exc:
            return _not_one_contact(selected) or Extraction(
                error=E.RESOLVE_ERROR_CODE_DECRYPTION_FAILED, detail=f"encrypted value {exc}"
            )
        except ValueNotText:
            return _NOT_TEXT
        # Fetched values may never reach a span or a log line, wherever they would show up.
        taint([contact, raw_contact, *attributes.values()])
        return Extraction(contact=contact, attributes=attributes)

    # -- calls --------------------------------------------------------------

    async def _call(
        self,
        config: pb.PiiApiConfig,
        oauth: pb.OAuthConfig | None,
        request: PiiApiRequest,
        not_found_status: bool,
        rate: RequestRate | None,
        breaker: CircuitBreaker | None = None,
    ) -> CallResult:
        """One request with its retries, each attempt within `rate` (None: no cap)."""
        started = time.monotonic()
        result = await self._call_with_retries(config, oauth, request, not_found_status, rate, breaker or self._breaker)
        self._latency.record(
            time.monotonic() - started,
            {"outcome": "ok" if result.ok else E.Name(result.error).removeprefix("RESOLVE_ERROR_CODE_")},
        )
        return result

    async def _call_with_retries(
        self,
        config: pb.PiiApiConfig,
        oauth: pb.OAuthConfig | None,
        request: PiiApiRequest,
        not_found_status: bool,
        rate: RequestRate | None,
        breaker: CircuitBreaker,
    ) -> CallResult:
        endpoint = endpoint_of(config)
        rejected_token: str | None = None
        refreshed = False
        retries_used = 0
        probes_waited = 0
        result = CallResult()
        while True:
            if not breaker.allow(endpoint):
                if breaker.probing(endpoint) and self._may_wait_for_probe(config, probes_waited):
                    # Another call is probing an API that may be back: its verdict, due within one attempt's
                    # time, decides this call, which would otherwise fail as if the API were still down. A
                    # probe that ends without one (a 429) hands the probe to a call that waited: the others
                    # wait for that one's verdict in turn, while their deadline leaves time.
                    probes_waited += 1
                    if await breaker.probe_ended(endpoint, self._probe_wait(config)):
                        continue
                opened = f"circuit open for {urlsplit(config.url).hostname}"
                if result.attempts:
                    # Only the retry is not made: the last attempt's failure says what went wrong.
                    made = f" after {result.attempts} attempts" if result.attempts > 1 else ""
                    result.detail = f"{result.detail}{made}; {opened}, no retry"
                else:
                    result.error, result.detail = E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN, opened
                return result
            # A probe that ends without a verdict (its caller gone, the token store failing) frees the
            # half-open slot: kept, it would fail every later call fast until the process restarts.
            probe, verdict = breaker.probing(endpoint), False
            try:
                headers = request.headers
                token = None
                if oauth is not None:
                    # A token that comes later than this leaves the call it is for no time to go out.
                    left = _time_left()
                    wait = None if left is None else left - MIN_ATTEMPT_SECONDS
                    try:
                        token = await self._tokens.token(
                            oauth, rejected=rejected_token, wait=wait, retries=config.max_retries
                        )
                    except TokenUnavailable as exc:
                        # Retried already, as this call's own attempts are; no mark against the API's
                        # circuit either way: the API was not asked, and answers for itself.
                        result.error, result.detail = exc.code, exc.reason
                        return result
                    headers = {**headers, "Authorization": f"Bearer {token}"}
                    if token not in result.tokens:
                        result.tokens.append(token)
                # Once the circuit lets the call out: a call it stops takes no slot from those that go out.
                if rate is not None and not await self._slot_in_time(rate):
                    if result.attempts:  # the last attempt's failure stands; only its retry is not made
                        made = f" after {result.attempts} attempts" if result.attempts > 1 else ""
                        result.detail = f"{result.detail}{made}; {NO_SLOT_FOR_RETRY}"
                    else:
                        result.error, result.detail = E.RESOLVE_ERROR_CODE_RATE_LIMITED, NO_SLOT
                    return result
                result.attempts += 1
                attempt = await self._attempt(config, request, headers, not_found_status)
                if attempt.circuit == "failure":
                    breaker.record_failure(endpoint)
                elif attempt.circuit == "success":
                    breaker.record_success(endpoint)
                elif probe:  # only the probe's own place: a call sent before the circuit opened holds none
                    breaker.release_probe(endpoint)
                verdict = True
            finally:
                if probe and not verdict:
                    breaker.release_probe(endpoint)
            result.http_status, result.body = attempt.status, attempt.body
            if not attempt.failure:
                result.error, result.detail = _NO_ERROR, ""
                result.document = attempt.document
                return result
            result.error, result.detail = attempt.failure, attempt.detail
            if attempt.status == 401 and oauth is not None and not refreshed:
                # One refresh and one more try; a second 401 means the credentials are wrong.
                refreshed, rejected_token = True, token
                continue
            if not attempt.retryable or retries_used >= config.max_retries:
                if result.attempts > 1:
                    result.detail = f"{result.detail} after {result.attempts} attempts"
                return result
            retries_used += 1
            # A Retry-After of no wait (0, a date already past: the API's clock behind ours) would spend every
            # retry within milliseconds on an API that is throttling or failing: backoff then, as without one.
            if attempt.retry_after:
                if attempt.retry_after > self._settings.pii_max_retry_after_seconds:
                    result.detail = f"{result.detail}; Retry-After {attempt.retry_after:.0f}s is beyond the limit"
                    return result
                delay = attempt.retry_after
            else:
                delay = full_jitter_delay(
                    retries_used,
                    self._settings.pii_retry_base_ms / 1000,
                    self._settings.pii_retry_max_ms / 1000,
                    self._rng,
                )
            left = _time_left()
            if left is not None and left < delay + MIN_ATTEMPT_SECONDS:
                made = f" after {result.attempts} attempts" if result.attempts > 1 else ""
                result.detail = f"{result.detail}{made}; no time for another before the caller's deadline"
                return result
            await self._sleep(delay)

    @staticmethod
    def _may_wait_for_probe(config: pb.PiiApiConfig, waited: int) -> bool:
        """Whether a call held back by a probe waits for it, having waited for `waited` before: while the
        caller's deadline leaves time (`_probe_wait` bounds each wait), or without a deadline for as many
        probes as the attempts it would make itself."""
        return caller_deadline.get() is not None or waited <= config.max_retries

    @staticmethod
    def _probe_wait(config: pb.PiiApiConfig) -> float:
        """How long a call waits for a probe's verdict: the probe's one attempt, and no later than an
        attempt of its own could still start before the caller's deadline."""
        wait = config.timeout_ms / 1000 + MIN_ATTEMPT_SECONDS
        left = _time_left()
        return wait if left is None else min(wait, left - MIN_ATTEMPT_SECONDS)

    async def _slot_in_time(self, rate: RequestRate) -> bool:
        """Waits for this request's slot under the config's cap; False when none starts early enough to
        leave an attempt time before the caller's deadline. Such a slot is not reserved: held unused, it
        would push every later request of the API (any process's) back by its interval. A slot reserved
        and then not used (the caller gone while it waits) is lost: one interval, before that caller's
        deadline, never after it."""
        left = _time_left()
        if left is None:
            wait, _ = await self._limiter.reserve(rate.key, rate.per_second, 1)
        elif left < MIN_ATTEMPT_SECONDS:
            return True  # no attempt goes out: `_attempt` answers TIMEOUT, and needs no slot
        else:
            found = await self._limiter.reserve_within(rate.key, rate.per_second, left - MIN_ATTEMPT_SECONDS)
            if found is None:
                return False
            wait = found
        if wait > 0:
            await self._sleep(wait)
        return True

    async def _attempt(
        self, config: pb.PiiApiConfig, request: PiiApiRequest, headers: dict[str, str], not_found_status: bool
    ) -> _Attempt:
        limit = self._settings.max_response_bytes
        try:
            check_literal_host(str(request.url), self._settings.allow_private_networks)
        except BlockedAddress:
            return _Attempt(
                failure=E.RESOLVE_ERROR_CODE_BLOCKED_URL, detail="URL points at a private network", circuit="neutral"
            )
        # A place among the concurrent calls, its workspace's and the process's: they may all be held by
        # slower calls, other callers' (of a hung API), so the wait ends at the caller's deadline.
        workspace_id = config.workspace_id
        left = _time_left()
        missed = await self._calls.enter(workspace_id, None if left is None else left - MIN_ATTEMPT_SECONDS)
        if missed is not None:
            return _Attempt(
                failure=E.RESOLVE_ERROR_CODE_TIMEOUT,
                detail=f"the caller's deadline came first, {missed}",
                circuit="neutral",
            )
        try:
            # The time left is read once the call may go out: time spent queued behind other calls is
            # the caller's too.
            timeout, cut = config.timeout_ms / 1000, False
            left = _time_left()
            if left is not None and left < timeout:
                if left < MIN_ATTEMPT_SECONDS:
                    return _Attempt(
                        failure=E.RESOLVE_ERROR_CODE_TIMEOUT,
                        detail="the caller's deadline came first",
                        circuit="neutral",
                    )
                timeout, cut = left, True
            async with self._session.request(
                request.method,
                request.url,
                params=request.params or None,
                headers=headers,
                data=request.body,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                body = await read_at_most(response.content, limit)
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                content_type = response.headers.get("Content-Type")
                content_encoding = response.headers.get("Content-Encoding", "").strip().lower()
        except TimeoutError:
            if cut:  # our caller's deadline, not the API's slowness: no mark against its circuit
                return _Attempt(
                    failure=E.RESOLVE_ERROR_CODE_TIMEOUT,
                    detail=f"the caller's deadline came first, after {timeout * 1000:.0f} ms",
                    circuit="neutral",
                )
            return _Attempt(
                failure=E.RESOLVE_ERROR_CODE_TIMEOUT,
                detail=f"timed out after {config.timeout_ms} ms",
                retryable=True,
                circuit="failure",
            )
        except BlockedAddress:
            # A name that resolves to a private address (or the egress guard's refusal): asked again, it
            # resolves the same, and the API itself was never reached, so no mark against its circuit.
            return _Attempt(
                failure=E.RESOLVE_ERROR_CODE_BLOCKED_URL,
                detail="URL's host resolves to a private network address",
                circuit="neutral",
            )
        except aiohttp.InvalidURL:
            return _Attempt(failure=E.RESOLVE_ERROR_CODE_CONNECTION_FAILED, detail=_NOT_BUILT, circuit="neutral")
        except aiohttp.ClientError as exc:
            undecodable = _undecodable(exc)
            if undecodable is not None:
                # The API answered, and asked again it answers the same (a proxy compressing whatever it is
                # asked): neither retried nor a mark against its circuit, as for a 204, and the circuit
                # opening would hide this detail behind "circuit open".
                return _Attempt(failure=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, detail=undecodable)
            return _Attempt(
                failure=E.RESOLVE_ERROR_CODE_CONNECTION_FAILED,
                detail=f"connection failed ({type(exc).__name__})",
                retryable=True,
                circuit="failure",
            )
        except ValueError:
            return _Attempt(failure=E.RESOLVE_ERROR_CODE_CONNECTION_FAILED, detail=_NOT_BUILT, circuit="neutral")
        finally:
            self._calls.leave(workspace_id)
        if 200 <= status < 300:
            if status == 204:
                # The API's deliberate answer, as a 404 is: asked again, it answers the same, and it is well.
                return _Attempt(
                    status=status,
                    failure=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE,
                    detail="reply has no content (HTTP 204): no record to read",
                )
            if len(body) > limit:
                # The API's whole answer to a batch too large for the limit: asked again, it answers the
                # same. Neither retried nor a mark against a circuit that smaller batches get through.
                return _Attempt(
                    status=status,
                    failure=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE,
                    detail=f"reply larger than {limit} bytes",
                )
            try:
                document = parse(body)
            except NestedTooDeeply:
                # JSON, but deeper than it can be read: asked again, the API answers the same, and it is well.
                return _Attempt(
                    status=status,
                    body=body,
                    failure=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE,
                    detail=_NESTED_TOO_DEEPLY,
                )
            except ValueError:
                if not body.strip():
                    # Nothing at all, as a 204 is (a handler that returned no record): the API's answer, the
                    # same asked again. Retried and held against the circuit, a few customers the API does
                    # not know would open it for every other one.
                    return _Attempt(
                        status=status,
                        failure=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE,
                        detail=f"reply is empty (HTTP {status}): no record to read",
                    )
                # A body that is no UTF-8 JSON (as RFC 8259 has it) is read in the charset it declares;
                # one that is UTF-8 stands, whatever it declares (servers put a default ISO-8859-1 over
                # what their JSON library wrote in UTF-8).
                document, transcoded = _NOT_JSON, _as_utf8(body, content_type)
                if transcoded is not None:
                    with suppress(ValueError):
                        document, body = parse(transcoded), transcoded
                if document is _NOT_JSON and content_encoding not in _DECODED_CODINGS:
                    # Left as sent, in a coding no client decodes: the same answer again, as above. A plain
                    # reply mislabelled so (`utf-8`) is read as it is.
                    return _Attempt(
                        status=status,
                        failure=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE,
                        detail=_not_asked_for(content_encoding),
                    )
                if document is _NOT_JSON:
                    # Mostly a proxy's or a load balancer's error page sent with a 200: a sick API, as a 5xx is.
                    return _Attempt(
                        status=status,
                        body=body,
                        failure=E.RESOLVE_ERROR_CODE_INVALID_RESPONSE,
                        detail="reply is not JSON",
                        retryable=True,
                        circuit="failure",
                    )
            return _Attempt(status=status, body=body, document=document)
        # An error reply goes by its status whatever its size: a 5xx error page larger than the limit is
        # retried and counted against the circuit like a small one.
        attempt = _Attempt(status=status, body=body, detail=f"HTTP {status}", retry_after=retry_after)
        if status == 429:
            attempt.failure, attempt.retryable, attempt.circuit = E.RESOLVE_ERROR_CODE_RATE_LIMITED, True, "neutral"
        elif status == 408:
            attempt.failure, attempt.retryable, attempt.circuit = E.RESOLVE_ERROR_CODE_TIMEOUT, True, "failure"
        elif status >= 500:
            attempt.failure, attempt.retryable, attempt.circuit = E.RESOLVE_ERROR_CODE_SERVER_ERROR, True, "failure"
        elif status in (401, 403):
            attempt.failure = E.RESOLVE_ERROR_CODE_AUTH_FAILED
        elif 300 <= status < 400:
            # Never followed (it could lead anywhere, a private address too); where it leads is not told.
            attempt.failure = E.RESOLVE_ERROR_CODE_HTTP_ERROR
            attempt.detail = f"HTTP {status}: a redirect, which is not followed (set url to where it leads)"
        elif status == 404 and not_found_status:
            attempt.failure, attempt.detail = E.RESOLVE_ERROR_CODE_NOT_FOUND, "the API does not know this ID (HTTP 404)"
        else:
            attempt.failure = E.RESOLVE_ERROR_CODE_HTTP_ERROR
        return attempt
