"""Size limits on every string, bytes, list and map of every gRPC request, and declared enum values.

Applied to each request message (each message of a stream) before a servicer
sees it, so no RPC, present or future, takes unbounded input. A field gets the
default limits unless `FIELD_LIMITS` names it; an enum field must hold a value
its enum declares. The servicers' own, stricter checks (config validation,
`max_recipients_per_call`, ...) still apply after this and keep their more
specific messages, so the limits here are never lower than theirs. A refusal is
INVALID_ARGUMENT naming the field path and the limit, never the value.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from libs.errors import InvalidArgument
from libs.redaction import is_sensitive

DEFAULT_STRING_CHARS = 4096
DEFAULT_BYTES = 64 * 1024
DEFAULT_ITEMS = 1000
MAX_MAP_KEY_CHARS = 256
MAX_DEPTH = 16
MAX_ENUM_CHOICES = 12  # an enum with more values is named, not listed, in a refusal


@dataclass(frozen=True)
class FieldLimit:
    """`length`: characters of a string (bytes of a bytes field), of each element or map value;
    `items`: elements of a repeated field or entries of a map."""

    length: int | None = None
    items: int | None = None


_TEMPLATE = 256 * 1024  # services.dispatcher.rendering.MAX_TEMPLATE_LENGTH
_HTTP_BODY = 16 * 1024  # the config validators' MAX_BODY_LENGTH

# Full field name → limits that differ from the defaults.
FIELD_LIMITS: dict[str, FieldLimit] = {
    # campaign content: templates may be long; the dispatcher checks counts more strictly
    "tokensend.dispatcher.v1.Content.subject": FieldLimit(length=2048),
    "tokensend.dispatcher.v1.Content.html_body": FieldLimit(length=_TEMPLATE),
    "tokensend.dispatcher.v1.Content.text_body": FieldLimit(length=_TEMPLATE),
    "tokensend.dispatcher.v1.Content.sms_body": FieldLimit(length=_TEMPLATE),
    "tokensend.dispatcher.v1.Content.media_urls": FieldLimit(length=2048, items=10),
    "tokensend.dispatcher.v1.WhatsAppTemplate.name": FieldLimit(length=512),
    "tokensend.dispatcher.v1.WhatsAppTemplate.language": FieldLimit(length=16),
    "tokensend.dispatcher.v1.WhatsAppTemplate.params": FieldLimit(items=100),
    # an ID over 256 characters fails its recipient (INVALID_ID), not the call: the guard only bounds memory
    "tokensend.dispatcher.v1.Recipient.anonymous_id": FieldLimit(length=4096),
    "tokensend.dispatcher.v1.Recipient.attributes": FieldLimit(length=1024, items=50),
    # recipients: the configured max_recipients_per_call (default 10,000) is checked by the dispatcher
    "tokensend.dispatcher.v1.DispatchRequest.recipients": FieldLimit(items=100_000),
    "tokensend.dispatcher.v1.DispatchStreamRequest.Recipients.recipients": FieldLimit(items=10_000),
    # connectors
    "tokensend.dispatcher.v1.Connector.credentials": FieldLimit(length=64 * 1024, items=50),  # ca_cert_pem
    "tokensend.dispatcher.v1.Connector.base_url": FieldLimit(length=2048),
    "tokensend.dispatcher.v1.CustomHttpTemplate.url": FieldLimit(length=2048),
    "tokensend.dispatcher.v1.CustomHttpTemplate.body": FieldLimit(length=_HTTP_BODY),
    "tokensend.dispatcher.v1.CustomHttpTemplate.headers": FieldLimit(items=50),
    "tokensend.dispatcher.v1.CustomHttpTemplate.message_id_path": FieldLimit(length=512),
    # suppressions: lists of IDs, each checked by the dispatcher
    "tokensend.dispatcher.v1.SuppressRecipientsRequest.anonymous_ids": FieldLimit(length=256, items=10_000),
    "tokensend.dispatcher.v1.UnsuppressRecipientsRequest.anonymous_ids": FieldLimit(length=256, items=10_000),
    # PII API and content API configs
    "tokensend.resolver.v1.PiiApiConfig.url": FieldLimit(length=2048),
    "tokensend.resolver.v1.PiiApiConfig.body": FieldLimit(length=_HTTP_BODY),
    "tokensend.resolver.v1.PiiApiConfig.query_params": FieldLimit(items=50),
    "tokensend.resolver.v1.PiiApiConfig.headers": FieldLimit(items=50),
    "tokensend.resolver.v1.PiiApiConfig.attribute_paths": FieldLimit(length=1024, items=50),
    "tokensend.resolver.v1.PiiApiConfig.contact_path": FieldLimit(length=1024),
    "tokensend.resolver.v1.PiiApiConfig.results_path": FieldLimit(length=1024),
    "tokensend.resolver.v1.PiiApiConfig.id_path": FieldLimit(length=1024),
    # a content API config passes the PII API config's rules: the fields they share are bounded alike
    "tokensend.resolver.v1.ContentApiConfig.url": FieldLimit(length=2048),
    "tokensend.resolver.v1.ContentApiConfig.body": FieldLimit(length=_HTTP_BODY),
    "tokensend.resolver.v1.ContentApiConfig.query_params": FieldLimit(items=50),
    "tokensend.resolver.v1.ContentApiConfig.headers": FieldLimit(items=50),
    "tokensend.resolver.v1.ContentApiConfig.field_paths": FieldLimit(length=1024, items=50),
    "tokensend.resolver.v1.ContentApiConfig.results_path": FieldLimit(length=1024),
    "tokensend.resolver.v1.ContentApiConfig.id_path": FieldLimit(length=1024),
    "tokensend.resolver.v1.ResolveContactsRequest.anonymous_ids": FieldLimit(length=4096, items=1000),
    "tokensend.resolver.v1.TestPiiApiConfigRequest.test_anonymous_id": FieldLimit(length=256),
    "tokensend.resolver.v1.OAuthConfig.token_url": FieldLimit(length=2048),
    # relayed receipts: the body is checked against max_receipt_bytes by the receipts service
    "tokensend.receipts.v1.IngestReceiptRequest.body": FieldLimit(length=64 * 1024 * 1024),
    "tokensend.receipts.v1.IngestReceiptRequest.url": FieldLimit(length=8192),
    "tokensend.receipts.v1.IngestReceiptRequest.headers": FieldLimit(length=8192, items=100),
}

_STRINGY = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    # `label` is deprecated in newer protobuf releases; `is_repeated` is not in older ones.
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


_MAP, _REPEATED, _SINGULAR = 0, 1, 2


class RequestLimits:
    """Checks messages against `FIELD_LIMITS` and the defaults; raises InvalidArgument on the first excess."""

    def __init__(self, overrides: dict[str, FieldLimit] | None = None) -> None:
        self._limits = {**FIELD_LIMITS, **(overrides or {})}
        # Per field: (shape, length, items); the walk runs for every message of every call.
        self._plans: dict[str, tuple[int, int, int]] = {}
        # Per message type: (encoded size up to which it cannot break a limit, levels it nests).
        self._floors: dict[str, tuple[int, int]] = {}

    def limit_of(self, field: FieldDescriptor) -> tuple[int, int]:
        """(length, items) in force for `field`."""
        chosen = self._limits.get(field.full_name, FieldLimit())
        default_length = DEFAULT_BYTES if field.type == FieldDescriptor.TYPE_BYTES else DEFAULT_STRING_CHARS
        if _is_map(field):
            value = field.message_type.fields_by_name["value"]
            default_length = DEFAULT_BYTES if value.type == FieldDescriptor.TYPE_BYTES else DEFAULT_STRING_CHARS
        return (
            chosen.length if chosen.length is not None else default_length,
            chosen.items if chosen.items is not None else DEFAULT_ITEMS,
        )

    def _plan(self, field: FieldDescriptor) -> tuple[int, int, int]:
        plan = self._plans.get(field.full_name)
        if plan is None:
            shape = _MAP if _is_map(field) else _REPEATED if _is_repeated(field) else _SINGULAR
            plan = (shape, *self.limit_of(field))
            self._plans[field.full_name] = plan
        return plan

    def floor(self, descriptor: Descriptor) -> tuple[int, int]:
        """(size, levels): a message of this type encoded in at most `size` bytes breaks no limit, at any
        depth up to MAX_DEPTH - `levels`. A string of n characters takes at least n bytes, and each
        element of a list or map at least one (two when it is length-delimited), so the smallest limit
        inside bounds every one. Size is 0 when no size can vouch: the type holds an enum (a value is
        declared or not whatever its size) or contains itself."""
        known = self._floors.get(descriptor.full_name)
        if known is None:
            self._floors[descriptor.full_name] = (0, 0)  # while being worked out: a type inside itself
            known = self._floors[descriptor.full_name] = self._work_out_floor(descriptor)
        return known

    def _work_out_floor(self, descriptor: Descriptor) -> tuple[int, int]:
        size, levels = MAX_MAP_KEY_CHARS * 1024, 0
        for field in descriptor.fields:
            shape, length, items = self._plan(field)
            target = field.message_type.fields_by_name["value"] if shape == _MAP else field
            if target.type == FieldDescriptor.TYPE_ENUM:
                return 0, 0
            if shape == _MAP:
                size = min(size, 2 * items, MAX_MAP_KEY_CHARS)
            elif shape == _REPEATED:
                delimited = target.type in _STRINGY or target.type == FieldDescriptor.TYPE_MESSAGE
                size = min(size, 2 * items if delimited else items)
            if target.type in _STRINGY:
                size = min(size, length)
            elif target.type == FieldDescriptor.TYPE_MESSAGE:
                inner, inner_levels = self.floor(target.message_type)
                if inner == 0:
                    return 0, 0
                size, levels = min(size, inner), max(levels, inner_levels + 1)
        return size, levels

    def check(self, message: Message, path: str = "", depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise InvalidArgument(path or message.DESCRIPTOR.name, f"nests deeper than {MAX_DEPTH} levels")
        size, levels = self.floor(message.DESCRIPTOR)
        if size and depth + levels <= MAX_DEPTH and message.ByteSize() <= size:
            return  # too small to break any limit: the usual recipient, skipped field by field
        for field, value in message.ListFields():
            shape, length, items = self._plan(field)
            kind = field.type
            if shape == _SINGULAR:
                if kind == FieldDescriptor.TYPE_MESSAGE:
                    self.check(value, _join(path, field.name), depth + 1)
                elif kind in _STRINGY:
                    if len(value) > length:
                        _check_length(field, value, _join(path, field.name), length)
                elif kind == FieldDescriptor.TYPE_ENUM:
                    _check_enum(field, value, _join(path, field.name))
                continue
            name = _join(path, field.name)
            if shape == _MAP:
                self._check_map(field, value, name, length, items, depth)
                continue
            if len(value) > items:
                raise InvalidArgument(name, f"must have at most {items} entries")
            if kind == FieldDescriptor.TYPE_MESSAGE:
                # Elements too small to break a limit are passed over here, without a call and a path
                # each: a stream's recipients, 0.84 µs a recipient before.
                bound, nested = self.floor(field.message_type)
                if not bound or depth + 1 + nested > MAX_DEPTH:
                    bound = -1  # no size vouches for an element: each is walked
                for i, element in enumerate(value):
                    if element.ByteSize() > bound:
                        self.check(element, f"{name}[{i}]", depth + 1)
            elif kind in _STRINGY:
                for i, element in enumerate(value):
                    if len(element) > length:
                        _check_length(field, element, f"{name}[{i}]", length)
            elif kind == FieldDescriptor.TYPE_ENUM:
                for i, element in enumerate(value):
                    _check_enum(field, element, f"{name}[{i}]")

    def _check_map(self, field: FieldDescriptor, value, name: str, length: int, items: int, depth: int) -> None:
        if len(value) > items:
            raise InvalidArgument(name, f"must have at most {items} entries")
        entry: Descriptor = field.message_type
        value_field = entry.fields_by_name["value"]
        # A sensitive map's keys are not echoed either: a header line pasted whole as a name holds its secret.
        secret = is_sensitive(field)
        for key in value:
            if isinstance(key, str | bytes) and len(key) > MAX_MAP_KEY_CHARS:
                raise InvalidArgument(name, f"keys must be at most {MAX_MAP_KEY_CHARS} characters")
            element = value[key]
            path = name if secret else _key_path(name, key)
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                self.check(element, path, depth + 1)
            elif value_field.type in _STRINGY:
                if len(element) > length:
                    _check_length(value_field, element, path, length)
            elif value_field.type == FieldDescriptor.TYPE_ENUM:
                _check_enum(value_field, element, path)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key_path(name: str, key: object) -> str:
    return f"{name}[{key!r}]" if isinstance(key, str | bytes) else f"{name}[{key}]"


def _check_length(field: FieldDescriptor, value: str | bytes, name: str, limit: int) -> None:
    if len(value) > limit:
        unit = "bytes" if field.type == FieldDescriptor.TYPE_BYTES else "characters"
        raise InvalidArgument(name, f"must be at most {limit} {unit}")


def _check_enum(field: FieldDescriptor, value: int, name: str) -> None:
    """proto3 enums are open: a number the contract does not declare is refused here, once, rather than
    met by code that only knows the declared ones."""
    if value not in field.enum_type.values_by_number:
        raise InvalidArgument(name, f"is not a known {field.enum_type.name} value: {_enum_choices(field.enum_type)}")


def _enum_choices(enum: EnumDescriptor) -> str:
    """The names a client writes (proto JSON, grpcurl), UNSPECIFIED left out: it is never a choice."""
    names = [v.name for v in enum.values if not v.name.endswith("_UNSPECIFIED")]
    return "one of " + ", ".join(names) if len(names) <= MAX_ENUM_CHOICES else f"{len(names)} values, see the proto"
