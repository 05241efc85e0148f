"""Unit tests for libs/redaction.py: masking driven by the `sensitive` field option."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.receipts.v1 import receipts_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.redaction import MASK, is_sensitive, redacted, to_log_dict

PROTO_MODULES = (common_pb2, pb, dpb, rpb)

CANARY = "canary-5f0c1e"


# --- the declarations are the source of truth -------------------------------------------------

# Names that carry PII or a secret wherever they appear.
PII_NAMES_EVERYWHERE = {
    "contact",
    "client_secret",
    "encryption_key",
    "credentials",
    "webhook_secret",
    "response_body",
    # not in the contracts today; a field added under one of these names must be marked
    "email",
    "email_address",
    "phone",
    "phone_number",
    "password",
    "api_key",
    "access_token",
    "auth_token",
    "first_name",
    "last_name",
}

# Names whose meaning depends on the message: PII or a secret only in these messages.
PII_FIELDS_IN_CONTEXT = {
    ("tokensend.resolver.v1.ResolvedContact", "attributes"),
    ("tokensend.resolver.v1.TestPiiApiConfigResponse", "attributes"),
    ("tokensend.resolver.v1.PiiApiConfig", "headers"),
    ("tokensend.resolver.v1.PiiApiConfig", "query_params"),  # `?api_key=...`
    ("tokensend.resolver.v1.ContentApiConfig", "query_params"),
    ("tokensend.dispatcher.v1.CustomHttpTemplate", "headers"),
    ("tokensend.receipts.v1.IngestReceiptRequest", "headers"),
    ("tokensend.receipts.v1.IngestReceiptRequest", "body"),
}

# Every field the contracts must mark today (the walk must find each of them).
EXPECTED_SENSITIVE = PII_FIELDS_IN_CONTEXT | {
    ("tokensend.resolver.v1.PiiApiConfig", "encryption_key"),
    ("tokensend.resolver.v1.OAuthConfig", "client_secret"),
    ("tokensend.resolver.v1.TestPiiApiConfigResponse", "response_body"),
    ("tokensend.resolver.v1.TestPiiApiConfigResponse", "contact"),
    ("tokensend.resolver.v1.ResolvedContact", "contact"),
    ("tokensend.dispatcher.v1.Connector", "credentials"),
    ("tokensend.dispatcher.v1.Connector", "webhook_secret"),
}


def _walk(descriptors) -> Iterator[Descriptor]:
    for d in descriptors:
        if d.GetOptions().map_entry:
            continue
        yield d
        yield from _walk(d.nested_types)


def all_message_types() -> list[Descriptor]:
    return [d for m in PROTO_MODULES for d in _walk(m.DESCRIPTOR.message_types_by_name.values())]


def test_the_walk_sees_every_proto_file_and_nested_messages() -> None:
    names = {d.full_name for d in all_message_types()}
    for package in ("tokensend.resolver.v1.", "tokensend.dispatcher.v1.", "tokensend.receipts.v1."):
        assert any(n.startswith(package) for n in names), package
    assert "tokensend.resolver.v1.TestPiiApiConfigRequest.SavedConfig" in names
    assert "tokensend.dispatcher.v1.DispatchStreamRequest.Header" in names
    assert not any(n.endswith("Entry") for n in names), "map entries are not messages of their own"


def test_every_field_named_like_pii_or_a_secret_is_marked_sensitive() -> None:
    unmarked: list[str] = []
    seen: set[tuple[str, str]] = set()
    for message in all_message_types():
        for field in message.fields:
            key = (message.full_name, field.name)
            if field.name in PII_NAMES_EVERYWHERE or key in PII_FIELDS_IN_CONTEXT:
                seen.add(key)
                if not is_sensitive(field):
                    unmarked.append(f"{message.full_name}.{field.name}")
    assert unmarked == [], f"PII/secret fields missing [(tokensend.common.v1.sensitive) = true]: {unmarked}"
    # the rules matched the fields we know of, so the walk is not vacuous and renames show up
    assert EXPECTED_SENSITIVE <= seen, EXPECTED_SENSITIVE - seen


@pytest.mark.parametrize(("message_name", "field_name"), sorted(EXPECTED_SENSITIVE))
def test_known_sensitive_field_is_declared(message_name: str, field_name: str) -> None:
    by_name = {d.full_name: d for d in all_message_types()}
    assert message_name in by_name, f"{message_name} disappeared from the contracts"
    field = by_name[message_name].fields_by_name.get(field_name)
    assert field is not None, f"{message_name}.{field_name} disappeared from the contracts"
    assert is_sensitive(field)


def test_is_sensitive_is_false_for_ordinary_fields() -> None:
    fields = pb.PiiApiConfig.DESCRIPTOR.fields_by_name
    assert is_sensitive(fields["headers"])
    assert is_sensitive(fields["encryption_key"])
    assert is_sensitive(fields["query_params"])
    for name in ("url", "body", "contact_path", "workspace_id"):
        assert not is_sensitive(fields[name]), name
    assert not is_sensitive(pb.ResolvedContact.DESCRIPTOR.fields_by_name["anonymous_id"])


# --- masking ----------------------------------------------------------------------------------


def test_map_values_are_masked_and_keys_kept() -> None:
    config = pb.PiiApiConfig(
        url="https://pii.example.com/v1/customers/@anonymous_id",
        headers={"X-Api-Key": "sk_live_123", "Authorization": "Bearer abc"},
        query_params={"fields": "email"},
        attribute_paths={"first_name": "profile.first"},
    )
    out = redacted(config)
    assert dict(out.headers) == {"X-Api-Key": MASK, "Authorization": MASK}
    assert dict(out.query_params) == {"fields": MASK}
    # non-sensitive fields and maps untouched
    assert out.url == config.url
    assert dict(out.attribute_paths) == {"first_name": "profile.first"}


def test_redacted_does_not_mutate_the_input() -> None:
    config = pb.PiiApiConfig(url="https://pii.example.com/x", headers={"X-Api-Key": "sk_live_123"})
    before = config.SerializeToString(deterministic=True)
    out = redacted(config)
    assert out is not config
    assert config.SerializeToString(deterministic=True) == before
    assert config.headers["X-Api-Key"] == "sk_live_123"


def test_to_log_dict_masks_and_keeps_proto_field_names() -> None:
    config = pb.PiiApiConfig(
        workspace_id="ws-1",
        contact_path="data.email",
        headers={"X-Api-Key": "sk_live_123"},
    )
    logged = to_log_dict(config)
    assert logged["contact_path"] == "data.email"
    assert logged["workspace_id"] == "ws-1"
    assert logged["headers"] == {"X-Api-Key": MASK}
    assert "sk_live_123" not in repr(logged)


def test_message_without_sensitive_fields_is_copied_unchanged() -> None:
    request = pb.ResolveContactsRequest(workspace_id="ws-1", anonymous_ids=["a1", "a2"], campaign_id="c1")
    assert redacted(request) == request
    assert to_log_dict(request)["anonymous_ids"] == ["a1", "a2"]


def test_sensitive_scalar_is_masked() -> None:
    config = pb.OAuthConfig(
        workspace_id="ws-1", token_url="https://auth.example.com/token", client_id="cid", client_secret="hunter2"
    )
    out = redacted(config)
    assert out.client_secret == MASK
    assert out.client_id == "cid"
    assert out.token_url == "https://auth.example.com/token"
    assert "hunter2" not in str(to_log_dict(config))


def test_sensitive_fields_inside_a_nested_message_are_masked() -> None:
    request = pb.PutPiiApiConfigRequest(
        config=pb.PiiApiConfig(
            workspace_id="ws-1",
            url="https://pii.example.com/@anonymous_id",
            headers={"X-Api-Key": "sk_live_123"},
            encryption_key="a2V5LWtleS1rZXk=",
        )
    )
    out = redacted(request)
    assert out.config.encryption_key == MASK
    assert dict(out.config.headers) == {"X-Api-Key": MASK}
    assert out.config.workspace_id == "ws-1"
    assert out.config.url == "https://pii.example.com/@anonymous_id"
    # the input is untouched
    assert request.config.encryption_key == "a2V5LWtleS1rZXk="
    assert request.config.headers["X-Api-Key"] == "sk_live_123"


def test_repeated_nested_messages_are_each_masked() -> None:
    response = pb.ResolveContactsResponse(
        contacts=[
            pb.ResolvedContact(anonymous_id="a1", contact="alice@example.com", attributes={"first_name": "Alice"}),
            pb.ResolvedContact(anonymous_id="a2", contact="+447400123456"),
            pb.ResolvedContact(
                anonymous_id="a3", error=pb.ResolveError(code=pb.RESOLVE_ERROR_CODE_NOT_FOUND, message="not found")
            ),
        ],
        config_version=7,
    )
    out = redacted(response)
    assert [c.anonymous_id for c in out.contacts] == ["a1", "a2", "a3"]
    assert [c.contact for c in out.contacts] == [MASK, MASK, ""]
    assert dict(out.contacts[0].attributes) == {"first_name": MASK}
    assert out.contacts[2].error.message == "not found"
    assert out.config_version == 7
    text = str(to_log_dict(response))
    for secret in ("alice@example.com", "+447400123456", "Alice"):
        assert secret not in text
    assert response.contacts[0].contact == "alice@example.com"


def test_oneof_member_is_masked_and_stays_selected() -> None:
    request = pb.TestPiiApiConfigRequest(
        config=pb.PiiApiConfig(url="https://pii.example.com/@anonymous_id", headers={"X-Api-Key": "sk_live_123"}),
        test_anonymous_id="anon-1",
    )
    out = redacted(request)
    assert out.WhichOneof("target") == "config"
    assert dict(out.config.headers) == {"X-Api-Key": MASK}
    assert out.config.url == "https://pii.example.com/@anonymous_id"
    assert out.test_anonymous_id == "anon-1"


def test_bytes_field_is_masked() -> None:
    request = rpb.IngestReceiptRequest(
        workspace_id="ws-1",
        url="https://hooks.example.com/twilio",
        headers={"X-Twilio-Signature": "sig"},
        body=b"To=%2B447400123456&MessageStatus=delivered",
    )
    out = redacted(request)
    assert out.body == MASK.encode()
    assert dict(out.headers) == {"X-Twilio-Signature": MASK}
    assert out.url == "https://hooks.example.com/twilio"
    assert b"447400123456" not in out.SerializeToString()
    assert request.body == b"To=%2B447400123456&MessageStatus=delivered"


# --- every message type, filled with canaries ------------------------------------------------


def _scalar(field: FieldDescriptor, sensitive: bool) -> object:
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{CANARY}-{field.name}" if sensitive else "plain-value"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return f"{CANARY}-{field.name}".encode() if sensitive else b"plain-value"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return 7.5
    return 7


def _fill(message: Message, under_sensitive: bool, depth: int, sensitive_numbers: list[str]) -> None:
    """Sets every field; sensitive strings and bytes hold the canary. One member per oneof."""
    chosen_oneofs: set[str] = set()
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):
            if oneof.name in chosen_oneofs:
                continue
            chosen_oneofs.add(oneof.name)
        sensitive = under_sensitive or is_sensitive(field)
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            key = "key-name" if key_field.type == FieldDescriptor.TYPE_STRING else 1
            container = getattr(message, field.name)
            if value_field.message_type is not None:
                _fill(container[key], sensitive, depth - 1, sensitive_numbers)
            else:
                container[key] = _scalar(value_field, sensitive)
                if sensitive and value_field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                    sensitive_numbers.append(field.name)
        elif field.message_type is not None:
            if depth <= 0:
                continue
            if repeated:
                for _ in range(2):
                    _fill(getattr(message, field.name).add(), sensitive, depth - 1, sensitive_numbers)
            else:
                getattr(message, field.name).SetInParent()
                _fill(getattr(message, field.name), sensitive, depth - 1, sensitive_numbers)
        else:
            value = _scalar(field, sensitive)
            if repeated:
                getattr(message, field.name).extend([value, value])
            else:
                setattr(message, field.name, value)
            if sensitive and field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                sensitive_numbers.append(field.name)


def test_every_message_type_leaks_no_sensitive_value_after_redaction() -> None:
    leaks: list[str] = []
    checked = 0
    for descriptor in all_message_types():
        message_class = _message_class(descriptor)
        original = message_class()
        sensitive_numbers: list[str] = []
        _fill(original, False, 4, sensitive_numbers)
        assert not sensitive_numbers, "extend this test for sensitive non-text fields"
        before = original.SerializeToString(deterministic=True)
        out = redacted(original)
        text = text_format.MessageToString(out) + repr(to_log_dict(original))
        if CANARY in text:
            leaks.append(descriptor.full_name)
        if "plain-value" in text_format.MessageToString(original):
            assert "plain-value" in text_format.MessageToString(out), f"{descriptor.full_name} lost plain fields"
        assert original.SerializeToString(deterministic=True) == before, f"{descriptor.full_name} was mutated"
        if CANARY in text_format.MessageToString(original):
            checked += 1
    assert leaks == [], f"sensitive values survive redaction in {leaks}"
    assert checked >= 10, "the canary fill reached too few messages to mean anything"


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


# --- message types that contain themselves ------------------------------------------------------


def _self_referencing_types() -> tuple[type[Message], type[Message]]:
    """`Outer { Inner inner; string email [sensitive]; }` and `Inner { Outer outer; repeated Inner more; }`:
    types that hold each other (and themselves), the sensitive field reachable from both."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    name = "tokensend/test/v1/redaction_cycle.proto"
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(
            name=name, package="tokensend.test.v1", syntax="proto3", dependency=[common_pb2.DESCRIPTOR.name]
        )
        outer = proto.message_type.add(name="Outer")
        outer.field.add(
            name="inner", number=1, type=FieldDescriptor.TYPE_MESSAGE, type_name=".tokensend.test.v1.Inner"
        ).label = FieldDescriptor.LABEL_OPTIONAL
        email = outer.field.add(name="email", number=2, type=FieldDescriptor.TYPE_STRING)
        email.label = FieldDescriptor.LABEL_OPTIONAL
        email.options.Extensions[common_pb2.sensitive] = True
        inner = proto.message_type.add(name="Inner")
        inner.field.add(
            name="outer", number=1, type=FieldDescriptor.TYPE_MESSAGE, type_name=".tokensend.test.v1.Outer"
        ).label = FieldDescriptor.LABEL_OPTIONAL
        inner.field.add(
            name="more", number=2, type=FieldDescriptor.TYPE_MESSAGE, type_name=".tokensend.test.v1.Inner"
        ).label = FieldDescriptor.LABEL_REPEATED
        pool.Add(proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tokensend.test.v1.Outer")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tokensend.test.v1.Inner")),
    )


def test_struct_and_value_which_contain_themselves_are_copied_unchanged() -> None:
    """google.protobuf.Struct holds Values that hold Structs and ListValues: the walk must end."""
    from google.protobuf import struct_pb2

    value = struct_pb2.Value()
    value.struct_value.update({"plan": "gold", "tags": ["a", {"deep": 1}]})
    for message in (value, value.struct_value, value.struct_value["tags"]):
        assert redacted(message) == message
    assert to_log_dict(value.struct_value) == {"plan": "gold", "tags": ["a", {"deep": 1.0}]}


def test_sensitive_fields_of_types_that_contain_each_other_are_masked_at_any_depth() -> None:
    outer_type, inner_type = _self_referencing_types()
    # Outer first: its walk meets Inner, then Outer again, before the sensitive field; what it finds for
    # Inner on the way must not be taken for Inner's own answer.
    outer = outer_type(email=CANARY)
    outer.inner.outer.email = CANARY
    assert CANARY not in str(redacted(outer)) and CANARY in str(outer)
    inner = inner_type()
    inner.outer.email = CANARY
    inner.more.add().more.add().outer.inner.outer.email = CANARY
    assert CANARY not in str(redacted(inner))
    assert redacted(inner).outer.email == MASK
