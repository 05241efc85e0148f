"""YAML files mapped onto the proto messages, and messages printed back as YAML.

A file holds one config, several YAML documents (`---`), or a list of configs;
each config is a mapping of the message's fields, named as in the proto, with a
`kind:` (`pii-api`, `oauth`, `content-api`, or a connector's provider) wherever the
command does not imply it.
Enum values take their full names (`CHANNEL_EMAIL`) or short forms (`email`,
`bulk`, `post`, `whatsapp-cloud`). Every problem names the file, the document and
the field, so a typo is found before anything is sent.

Plain scalars stay strings when read (`+14155550100` is a phone number, `yes`
is not `true`, `0123` keeps its zero); numbers and booleans are converted per
the field's proto type, which is what decides.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from cli.exits import STDIN_CLOSED, UsageError, reading, stdin_closed
from libs.redaction import is_sensitive


class DocumentError(UsageError):
    """A file that cannot be mapped onto its message; the text names where and which field."""


@dataclass(frozen=True)
class Kind:
    """A kind of config the `config` command reads and writes."""

    name: str  # as written on the command line and in `kind:`
    message: type[Message]
    service: str  # the service that keeps it
    root: str  # the request field that holds it, as the server names fields: `config.url`, `connector.sender`
    describe: Callable[[Any], str]  # "workspace/name", for messages to a person

    def label(self, message: Message) -> str:
        return f"{self.name} {self.describe(message)}"


def _pii_api_name(config: rpb.PiiApiConfig) -> str:
    return f"{config.workspace_id or '?'}/{enum_short_name(common_pb2.Channel.DESCRIPTOR, config.channel) or '?'}"


PII_API = Kind("pii-api", rpb.PiiApiConfig, "resolver", "config", _pii_api_name)
OAUTH = Kind(
    "oauth", rpb.OAuthConfig, "resolver", "config", lambda c: f"{c.workspace_id or '?'}/{c.oauth_config_id or '?'}"
)
CONTENT_API = Kind(
    "content-api", rpb.ContentApiConfig, "resolver", "config", lambda c: f"{c.workspace_id or '?'}/{c.name or '?'}"
)
CONNECTOR = Kind(
    "connector", dpb.Connector, "dispatcher", "connector", lambda c: f"{c.workspace_id or '?'}/{c.connector_id or '?'}"
)
# Saved in this order: a PII API or content API config may only name an OAuth config that already exists.
KINDS = {kind.name: kind for kind in (OAUTH, PII_API, CONTENT_API, CONNECTOR)}
_KIND_ALIASES = {
    "pii-api": PII_API,
    "pii_api": PII_API,
    "piiapiconfig": PII_API,
    "oauth": OAUTH,
    "oauthconfig": OAUTH,
    "content-api": CONTENT_API,
    "content_api": CONTENT_API,
    "contentapiconfig": CONTENT_API,
}
_NOT_PROVIDERS = {*_KIND_ALIASES, "connector"}


def document_kind(value: object, where: str) -> Kind:
    """The kind a document's `kind:` names: `pii-api`, `oauth`, `content-api`, or a connector's provider.

    A Connector has a `kind` field of its own (SENDGRID, TWILIO ...), so a connector
    document says `kind: sendgrid`: its kind is its provider.
    """
    text = str(value).strip()
    kind = _KIND_ALIASES.get(text.lower())
    if kind is not None:
        return kind
    try:
        enum_full_name(dpb.ConnectorKind.DESCRIPTOR, text)
        return CONNECTOR
    except DocumentError:
        pass
    providers = ", ".join(enum_short_names(dpb.ConnectorKind.DESCRIPTOR))
    if text.lower() == "connector":
        raise DocumentError(f"{where}: a connector's kind is its provider: one of {providers}")
    raise DocumentError(
        f"{where}: unknown kind {text!r}; expected pii-api, oauth, content-api, or a connector's provider ({providers})"
    )


@dataclass(frozen=True)
class ConfigDocument:
    """One config read from a file, already a proto message."""

    kind: Kind
    message: Any
    where: str  # "pii-api.yaml (document 2)"

    @property
    def label(self) -> str:
        return self.kind.label(self.message)


# --- reading YAML ----------------------------------------------------------------------------------------------


class _StringScalarLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's guessing: plain scalars stay strings; null and merge keys still work.
    A key written twice in one mapping is an error: YAML would keep the last, silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in (`<<: *defaults`) may be overridden: that is what merging is for
            key = self.construct_object(key_node)
            if not isinstance(key, str):
                continue
            if key in seen:
                name = shown_key(key)
                what = name if name.startswith("'") else f"a key {name}"
                raise yaml.constructor.ConstructorError(None, None, f"{what} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_StringScalarLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# A key shown in an error: what a field's name looks like. A file given in place of another (customers by
# address or phone number) has keys that are personal data, which are not repeated.
_SHOWN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def shown_key(key: object) -> str:
    text = str(key)
    return f"'{text}'" if _SHOWN_KEY.fullmatch(text) else "(its name not shown: not a field's name)"


def read_text(path: str) -> str:
    """The file's text; `-` reads standard input. Bytes that are not UTF-8 are named by their line."""
    if path == "-":
        source = "<stdin>"
        if stdin_closed():
            raise UsageError(STDIN_CLOSED)
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None:  # a standard input replaced by text (tests)
            return sys.stdin.read()
        data = stdin.read()
    else:
        source = path
        with reading(path, "YAML file"):
            data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{source} line {line}: not valid UTF-8") from None


def load_mappings(text: str, source: str) -> list[tuple[str, Any]]:
    """Every config in a YAML text, as (where, value): documents, and the items of documents that are lists."""
    try:
        documents = [doc for doc in yaml.load_all(text, Loader=_StringScalarLoader)]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DocumentError(f"{source}: not valid YAML{at}: {problem}") from None
    present = [(n, doc) for n, doc in enumerate(documents, 1) if doc is not None]
    several = len(present) > 1
    out: list[tuple[str, Any]] = []
    for number, doc in present:
        where = f"{source} (document {number})" if several else source
        if isinstance(doc, list):
            items = [(i, item) for i, item in enumerate(doc, 1) if item is not None]
            many = len(items) > 1
            for index, item in items:
                at = f"document {number}, item {index}" if several else f"item {index}"
                out.append((f"{source} ({at})" if many or several else where, item))
        else:
            out.append((where, doc))
    return out


def load_configs(
    path: str, default_kind: Kind | None = None, *, kinds: Iterable[Kind] | None = None
) -> list[ConfigDocument]:
    """The configs in a file; `default_kind` is the kind of documents without `kind:`.

    With `default_kind`, a document of another kind is an error unless `kinds`
    lists the kinds to keep (others are then skipped).
    """
    keep = set(kinds) if kinds is not None else None
    configs = []
    entries = load_mappings(read_text(path), "<stdin>" if path == "-" else path)
    if not entries:
        raise DocumentError(f"{path}: holds no config")
    for where, data in entries:
        if not isinstance(data, Mapping):
            raise DocumentError(f"{where}: expected a mapping of fields, got {_describe_document(data)}")
        fields = dict(data)
        raw_kind = fields.get("kind")
        if raw_kind is None:
            if default_kind is None:
                raise DocumentError(
                    f"{where}: missing 'kind' (pii-api, oauth, content-api, or a connector's provider such as "
                    "sendgrid); add it, or name the kind on the command line for a file of one kind"
                )
            kind = default_kind
        elif default_kind is CONNECTOR and keep is None and str(raw_kind).strip().lower() not in _NOT_PROVIDERS:
            kind = CONNECTOR  # `kind:` is the connector's provider; a wrong one is named by the field check
        else:
            kind = document_kind(raw_kind, f"{where}: kind")
        if kind is not CONNECTOR:
            fields.pop("kind", None)
        if keep is not None and kind not in keep:
            continue
        if keep is None and default_kind is not None and kind is not default_kind:
            raise DocumentError(
                f"{where}: holds a config of kind '{kind.name}', not '{default_kind.name}'; "
                "leave the kind off the command line to put a file of several kinds"
            )
        configs.append(ConfigDocument(kind, parse_message(fields, kind.message, kind.root, where), where))
    return configs


# --- mapping onto messages -------------------------------------------------------------------------------------


def parse_message(data: Any, message_class: type[Message], root: str, where: str) -> Any:
    """A message from YAML data; errors name `where` and the field path from `root` (`config.url`)."""
    if not isinstance(data, Mapping):
        raise DocumentError(f"{where}: {root}: expected a mapping of fields, got {_describe_document(data)}")
    converted = _convert_message(data, message_class.DESCRIPTOR, root, where)
    message = message_class()
    try:
        json_format.ParseDict(converted, message)
    except json_format.ParseError as exc:  # a backstop: the walk above catches what it can, by field
        raise DocumentError(f"{where}: {root}: {exc}") from None
    return message


_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_UNSIGNED_TYPES = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
}
_64_BIT_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _integer_range(field_type: int) -> tuple[int, int]:
    bits = 64 if field_type in _64_BIT_TYPES else 32
    if field_type in _UNSIGNED_TYPES:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _describe_value(value: Any, secret: bool = False) -> str:
    """The value for an error message; a sensitive field's (credentials, headers) is never repeated."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a single value (not shown: the field is sensitive)" if secret else repr(value)


def _describe_document(value: Any) -> str:
    """What a whole document holds instead of fields, never its text: it may be another file given by mistake
    (a recipients CSV reads as one long line of YAML, its contacts and names included)."""
    if isinstance(value, list):
        return "a list"
    return "a single value, not 'name: value' lines (not shown; is it the right file?)"


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _field_named(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    field = descriptor.fields_by_name.get(key)
    if field is None:  # proto JSON names (camelCase) too, as ParseDict accepts them
        field = next((f for f in descriptor.fields if f.json_name == key), None)
    return field


def _convert_message(data: Any, descriptor: Descriptor, path: str, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise DocumentError(f"{where}: {path}: expected a mapping of fields, got {_describe_value(data)}")
    out: dict[str, Any] = {}
    oneofs: dict[str, str] = {}
    for key, value in data.items():
        field = _field_named(descriptor, str(key))
        if field is None:
            names = [f.name for f in descriptor.fields]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known fields: {', '.join(names)}"
            raise DocumentError(f"{where}: unknown field {shown_key(key)} in {path}{hint}")
        field_path = f"{path}.{field.name}"
        if field.name in out:
            raise DocumentError(f"{where}: {field_path} is given twice")
        if value is None:  # `field:` or `field: null` leaves it unset
            continue
        oneof = field.containing_oneof
        if oneof is not None and len(oneof.fields) > 1:  # proto3 `optional` is a oneof of one: no choice
            if oneof.name in oneofs:
                raise DocumentError(
                    f"{where}: {path}.{oneofs[oneof.name]} and {field_path} exclude each other (set one)"
                )
            oneofs[oneof.name] = field.name
        out[field.name] = _convert_field(field, value, field_path, where)
    return out


def _convert_field(field: FieldDescriptor, value: Any, path: str, where: str) -> Any:
    if _is_map(field):
        if not isinstance(value, Mapping):
            raise DocumentError(
                f"{where}: {path}: expected a mapping, got {_describe_value(value, is_sensitive(field))}"
            )
        value_field = field.message_type.fields_by_name["value"]
        out = {}
        for key, item in value.items():
            if item is None:
                raise DocumentError(f"{where}: {path}[{str(key)!r}]: has no value")
            out[str(key)] = _convert_single(value_field, item, f"{path}[{str(key)!r}]", where)
        return out
    if _is_repeated(field):
        if not isinstance(value, list):
            raise DocumentError(f"{where}: {path}: expected a list, got {_describe_value(value, is_sensitive(field))}")
        return [_convert_single(field, item, f"{path}[{index}]", where) for index, item in enumerate(value)]
    return _convert_single(field, value, path, where)


def _convert_single(field: FieldDescriptor, value: Any, path: str, where: str) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name.startswith("google.protobuf."):
            return value  # well-known types have their own JSON forms; ParseDict knows them
        return _convert_message(value, field.message_type, path, where)
    if isinstance(value, Mapping | list):
        raise DocumentError(f"{where}: {path}: expected a single value, got {_describe_value(value)}")
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_full_name(field.enum_type, value, path, where)
    if field.type in _INTEGER_TYPES:
        try:
            number = int(str(value).strip().replace("_", ""), 10) if not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None:
            raise DocumentError(f"{where}: {path}: expected a whole number, got {value!r}")
        if number < 0 and field.type in _UNSIGNED_TYPES:
            raise DocumentError(f"{where}: {path}: must not be negative, got {number}")
        low, high = _integer_range(field.type)
        # Out of the field's range, protobuf's own refusal would name neither the field's path nor the range.
        if number > high:
            raise DocumentError(f"{where}: {path}: must be at most {high}, got {number}")
        if number < low:
            raise DocumentError(f"{where}: {path}: must be at least {low}, got {number}")
        return number
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        try:
            return float(str(value))
        except ValueError:
            raise DocumentError(f"{where}: {path}: expected a number, got {value!r}") from None
    if field.type == FieldDescriptor.TYPE_BOOL:
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise DocumentError(f"{where}: {path}: expected true or false, got {value!r}")
    return str(value)  # string (and bytes, which proto JSON writes as base64)


# --- enums -----------------------------------------------------------------------------------------------------


def _enum_prefix(enum: EnumDescriptor) -> str:
    zero = enum.values_by_number.get(0)
    return zero.name.removesuffix("UNSPECIFIED") if zero is not None and zero.name.endswith("_UNSPECIFIED") else ""


def enum_short_name(enum: EnumDescriptor, number: int) -> str:
    """`CHANNEL_EMAIL` → `email`; an unknown number stays a number, as text."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name.removeprefix(_enum_prefix(enum)).lower()


def enum_short_names(enum: EnumDescriptor) -> list[str]:
    return [enum_short_name(enum, v.number) for v in enum.values if v.number != 0]


def enum_full_name(enum: EnumDescriptor, value: Any, path: str = "value", where: str = "") -> str:
    """The enum value's full name from `CHANNEL_EMAIL`, `email`, `EMAIL`, `whatsapp-cloud` or a number."""
    text = str(value).strip()
    if text.isdigit() and int(text) in enum.values_by_number:
        return enum.values_by_number[int(text)].name
    candidate = text.upper().replace("-", "_").replace(" ", "_")
    for name in (candidate, _enum_prefix(enum) + candidate):
        if name in enum.values_by_name:
            return name
    prefix = f"{where}: " if where else ""
    raise DocumentError(f"{prefix}{path}: unknown value {text!r}; expected one of {', '.join(enum_short_names(enum))}")


def enum_number(enum: EnumDescriptor, value: str, what: str) -> int:
    """For flags: `--channel email` → CHANNEL_EMAIL's number; the error names the flag."""
    return enum.values_by_name[enum_full_name(enum, value, what)].number


# --- printing --------------------------------------------------------------------------------------------------


def message_to_data(message: Message) -> dict[str, Any]:
    """The set fields of a message as plain data: enums in short form, integers as integers."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _single_to_data(value_field, value[key]) for key in sorted(value)}
        elif _is_repeated(field):
            out[field.name] = [_single_to_data(field, item) for item in value]
        else:
            out[field.name] = _single_to_data(field, value)
    return out


def _single_to_data(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name.startswith("google.protobuf."):
            return json_format.MessageToDict(value)
        return message_to_data(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_short_name(field.enum_type, value)
    return value


def config_to_data(kind: Kind, message: Message) -> dict[str, Any]:
    """A config as a document `config put` reads back: `kind` first (a connector's is its provider)."""
    data = message_to_data(message)
    return {"kind": data.pop("kind", "") if kind is CONNECTOR else kind.name, **data}


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)


def dump_yaml_documents(documents: Iterable[Any]) -> str:
    return yaml.safe_dump_all(list(documents), sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
