"""Masks protobuf fields marked `(tokensend.common.v1.sensitive) = true`.

Python protobuf ignores `debug_redact`, so the option is read from the
descriptors here; a new sensitive field is masked by declaring it.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from tokensend.common.v1 import common_pb2

MASK = "[REDACTED]"


def is_sensitive(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[common_pb2.sensitive])


@cache
def _has_sensitive(descriptor: Descriptor) -> bool:
    """True when the message or anything nested in it has a sensitive field.

    A walk over every message type reachable from `descriptor`, each visited once: types may hold
    themselves or each other (google.protobuf.Struct, Value and ListValue do). Only the answer for the
    type asked is cached, never one found midway through a cycle, which may not be complete yet. A map's
    entry type is walked like any message: its key is never marked, its value may be (or lead to) one."""
    seen = {descriptor}
    pending = [descriptor]
    while pending:
        for field in pending.pop().fields:
            if is_sensitive(field):
                return True
            nested = field.message_type
            if nested is not None and nested not in seen:
                seen.add(nested)
                pending.append(nested)
    return False


def redacted(message: Message) -> Message:
    """A copy of `message` with every sensitive field masked, at any depth."""
    copy = type(message)()
    copy.CopyFrom(message)
    _redact_in_place(copy)
    return copy


def to_log_dict(message: Message) -> dict:
    """The redacted message as a dict, for logs and span attributes."""
    return json_format.MessageToDict(redacted(message), preserving_proto_field_name=True)


def _mask_scalar(field: FieldDescriptor, value: object) -> object:
    if field.type == FieldDescriptor.TYPE_STRING:
        return MASK if value else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return MASK.encode() if value else value
    return type(value)()  # numbers and bools read as their zero value


def _mask_everything(message: Message) -> None:
    """Masks every scalar of a message that sits under a sensitive field."""
    for field, value in list(message.ListFields()):
        _mask_field(message, field, value)


def _mask_field(message: Message, field: FieldDescriptor, value: object) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        container = getattr(message, field.name)
        for key in list(container):
            if value_field.message_type is not None:
                _mask_everything(container[key])
            else:
                container[key] = _mask_scalar(value_field, container[key])
        return
    if field.message_type is not None:
        items = value if field.is_repeated else [value]
        for item in items:
            _mask_everything(item)
        return
    if field.is_repeated:
        container = getattr(message, field.name)
        masked = [_mask_scalar(field, v) for v in container]
        del container[:]
        container.extend(masked)
        return
    setattr(message, field.name, _mask_scalar(field, value))


def _redact_in_place(message: Message) -> None:
    if not _has_sensitive(message.DESCRIPTOR):
        return
    for field, value in list(message.ListFields()):
        if is_sensitive(field):
            _mask_field(message, field, value)
        elif field.message_type is None:
            continue
        elif field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for item in getattr(message, field.name).values():
                    _redact_in_place(item)
        elif field.is_repeated:
            for item in value:
                _redact_in_place(item)
        else:
            _redact_in_place(value)
