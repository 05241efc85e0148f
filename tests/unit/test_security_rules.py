"""The tables the request guard relies on: a workspace rule for every RPC, limits that name real fields,
tokens that match only themselves, and log lines that cannot be split."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.auth import WORKSPACE_FIELDS, ClientGrant, ClientRegistry, main, new_client, token_digest, workspaces_of
from libs.errors import InvalidArgument, PermissionDenied
from libs.guard import RequestGuard, _CallScope
from libs.limits import DEFAULT_ITEMS, DEFAULT_STRING_CHARS, FIELD_LIMITS, FieldLimit, RequestLimits
from libs.settings import ResolverSettings, invalid_settings
from libs.store import check_id
from libs.telemetry import ScrubbingFilter
from services.dispatcher.connectors.email_headers import extra_headers

SERVICES = [
    service
    for module in (rpb, dpb, cpb)
    for service in module.DESCRIPTOR.services_by_name.values()
    if service.full_name.startswith("tokensend.")
]
METHODS = [(service.full_name, method) for service in SERVICES for method in service.methods]


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s.split('.')[-1]}.{m.name}" for s, m in METHODS])
def test_every_rpc_has_a_workspace_rule_that_names_a_string_field(service, method):
    """A new RPC fails here until libs/auth.py says where its request names the workspace."""
    paths = WORKSPACE_FIELDS.get(method.input_type.full_name)
    assert paths, f"{service}/{method.name}: add {method.input_type.full_name} to libs.auth.WORKSPACE_FIELDS"
    for path in paths:
        descriptor = method.input_type
        *parents, leaf = path.split(".")
        for name in parents:
            descriptor = descriptor.fields_by_name[name].message_type
        assert descriptor.fields_by_name[leaf].type == FieldDescriptor.TYPE_STRING, path


def workspace_fields_in(message_type, prefix: str = "") -> list[str]:
    """Every path to a field named workspace_id inside `message_type` (maps left out)."""
    paths = []
    for field in message_type.fields:
        if field.name == "workspace_id":
            paths.append(prefix + field.name)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            paths += workspace_fields_in(field.message_type, f"{prefix}{field.name}.")
    return paths


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s.split('.')[-1]}.{m.name}" for s, m in METHODS])
def test_every_workspace_a_request_can_name_is_one_the_guard_reads(service, method):
    """A workspace_id nested anywhere in a request (a config, a connector, a stream's header) is checked
    against the token: none is left for a servicer to act on unchecked."""
    assert sorted(workspace_fields_in(method.input_type)) == sorted(WORKSPACE_FIELDS[method.input_type.full_name])


def test_rules_name_only_existing_request_types():
    pool = descriptor_pool.Default()
    for name in WORKSPACE_FIELDS:
        pool.FindMessageTypeByName(name)  # raises KeyError for a stale entry


def test_limits_name_existing_fields():
    pool = descriptor_pool.Default()
    for name in FIELD_LIMITS:
        pool.FindFieldByName(name)


def test_a_content_api_config_field_has_the_limit_of_its_pii_api_config_counterpart():
    """A content API config is checked by the PII API config's rules: a field the two share is bounded alike,
    so a URL over the limit is told the one limit, 2048 characters, whichever config it is in."""
    limits = RequestLimits()
    pii, content = rpb.PiiApiConfig.DESCRIPTOR, rpb.ContentApiConfig.DESCRIPTOR
    counterpart = {"attribute_paths": "field_paths"}
    for field in pii.fields:
        name = counterpart.get(field.name, field.name)
        if name in content.fields_by_name and field.type in (field.TYPE_STRING, field.TYPE_MESSAGE):
            assert limits.limit_of(content.fields_by_name[name]) == limits.limit_of(field), name
    with pytest.raises(InvalidArgument) as caught:
        limits.check(rpb.PutContentApiConfigRequest(config=rpb.ContentApiConfig(url="https://x/" + "a" * 3000)))
    assert (caught.value.field, caught.value.description) == ("config.url", "must be at most 2048 characters")


def test_workspace_is_read_from_each_branch():
    saved = rpb.TestPiiApiConfigRequest(saved=rpb.TestPiiApiConfigRequest.SavedConfig(workspace_id="acme"))
    assert workspaces_of(saved).workspaces == {"acme"}
    inline = rpb.TestPiiApiConfigRequest(config=rpb.PiiApiConfig(workspace_id="globex"))
    assert workspaces_of(inline).workspaces == {"globex"}
    part = dpb.DispatchStreamRequest(recipients=dpb.DispatchStreamRequest.Recipients())
    assert workspaces_of(part).workspaces == frozenset()
    assert workspaces_of(dpb.PutConnectorRequest(connector=dpb.Connector(workspace_id="a"))).workspaces == {"a"}


def test_tokens_match_only_their_own_client():
    token, grant = new_client("engine", ["acme"])
    other_token, other = new_client("ops", [])
    registry = ClientRegistry([grant, other])
    assert registry.authenticate(f"Bearer {token}") is grant
    assert registry.authenticate(f"bearer {other_token}") is other and other.all_workspaces
    for bad in (None, "", token, f"Bearer {token}x", f"Basic {token}", "Bearer "):
        assert registry.authenticate(bad) is None
    assert grant.may_use("acme") and not grant.may_use("globex")
    assert token not in repr(grant) and token_digest(token) == grant.token_sha256


def test_client_grants_are_validated():
    with pytest.raises(ValidationError):
        ClientGrant(name="x", token_sha256="not-hex", workspaces=["a"])
    with pytest.raises(ValidationError):
        ClientGrant(name="x", token_sha256="a" * 64, workspaces=[])
    with pytest.raises(ValidationError):
        ClientGrant(name="x", token_sha256="a" * 64, workspaces=["bad workspace"])
    with pytest.raises(ValueError, match="share a token"):
        ClientRegistry([ClientGrant(name=n, token_sha256="a" * 64, workspaces=["*"]) for n in ("a", "b")])


def test_the_digest_of_an_empty_token_is_refused_and_an_empty_token_matches_nothing():
    """`echo -n "$TOKEN" | sha256sum` with TOKEN unset gives the digest of the empty string: configured,
    it let any caller sending `authorization: Bearer ` in as that client."""
    empty = hashlib.sha256(b"").hexdigest()
    with pytest.raises(ValidationError) as refused:
        ClientGrant(name="engine", token_sha256=empty, workspaces=["*"])
    assert "empty token" in str(refused.value)
    _, grant = new_client("engine", ["acme"])
    registry = ClientRegistry([grant])
    registry._grants.append((bytes.fromhex(empty), grant))  # as if configured before the rule
    for blank in ("Bearer ", "Bearer    ", "bearer \t"):
        assert registry.authenticate(blank) is None


@pytest.mark.parametrize(
    "extra",
    [{"disabled": True}, {"enabled": False}, {"expires_at": "2026-01-01"}, {"workspace": ["acme"]}, {"s3cr3t": 1}],
    ids=["disabled", "enabled", "expires_at", "workspace", "pasted-token"],
)
def test_a_client_entry_with_a_field_it_does_not_know_is_refused_not_read_past(extra):
    """`"disabled": true` was read past: the client it meant to turn off kept every workspace it had.
    The refusal names the entry, never the field, whose name may be a token pasted in the wrong place."""
    entry = {"name": "engine", "token_sha256": "a" * 64, "workspaces": ["*"], **extra}
    with pytest.raises(ValidationError):
        ClientGrant.model_validate(entry)
    with pytest.raises(ValidationError) as refused:
        ResolverSettings(clients=json.dumps([entry]))
    said = invalid_settings(refused.value)
    assert said.startswith("TOKENSEND_CLIENTS[0]: ") and "remove its entry" in said, said
    assert not any(re.search(rf"\b{name}\b", said) for name in extra), said


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["engine", "acme/prod"], "workspace"), (["the engine", "acme"], "name"), (["e" * 65], "name")],
)
def test_the_token_command_refuses_a_bad_name_or_workspace_with_a_usage_error(argv, named, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "token" not in out  # no token was made, nor shown
    assert named in err and "Traceback" not in err and "pydantic" not in err


@pytest.mark.parametrize(
    ("message", "field", "limit"),
    [
        (rpb.GetPiiApiConfigRequest(workspace_id="w" * 5000), "workspace_id", f"{DEFAULT_STRING_CHARS} characters"),
        (
            dpb.DispatchRequest(recipients=[dpb.Recipient(attributes={f"a{i}": "x" for i in range(51)})]),
            "recipients[0].attributes",
            "50 entries",
        ),
        (
            dpb.DispatchRequest(recipients=[dpb.Recipient(attributes={"tier": "x" * 1025})]),
            "recipients[0].attributes['tier']",
            "1024 characters",
        ),
        (
            rpb.ResolveContactsRequest(anonymous_ids=["x"] * 1001),
            "anonymous_ids",
            "1000 entries",
        ),
        (
            dpb.PutOptOutKeywordsRequest(keywords=dpb.OptOutKeywords(stop_keywords=["s"] * (DEFAULT_ITEMS + 1))),
            "keywords.stop_keywords",
            f"{DEFAULT_ITEMS} entries",
        ),
        (cpb.IngestReceiptRequest(url="u" * 9000), "url", "8192 characters"),
        (
            dpb.DispatchRequest(content=dpb.Content(media_urls=["https://x/" + "a" * 3000])),
            "content.media_urls[0]",
            "2048 characters",
        ),
    ],
)
def test_limits_name_the_field_and_the_limit(message, field, limit):
    with pytest.raises(InvalidArgument) as caught:
        RequestLimits().check(message)
    assert caught.value.field == field
    assert caught.value.description.endswith(f"at most {limit}")


def test_limits_never_echo_a_key_of_a_sensitive_map():
    """A header line pasted whole as a header's name holds its secret: the map is named, not the key."""
    pasted = "Authorization: Bearer sk_live_51Hx"
    config = rpb.PiiApiConfig(headers={pasted: "x" * (DEFAULT_STRING_CHARS + 1)})
    with pytest.raises(InvalidArgument) as caught:
        RequestLimits().check(rpb.PutPiiApiConfigRequest(config=config))
    assert caught.value.field == "config.headers" and "sk_live" not in str(caught.value)


def test_limits_let_ordinary_requests_through():
    content = dpb.Content(subject="Hi {{ first_name }}", html_body="<p>" + "x" * 100_000 + "</p>")
    people = [dpb.Recipient(anonymous_id=f"c-{i}", attributes={"tier": "gold"}) for i in range(10_000)]
    RequestLimits().check(dpb.DispatchRequest(workspace_id="w", content=content, recipients=people))
    RequestLimits().check(cpb.IngestReceiptRequest(body=b"x" * 1024 * 1024))


def test_log_records_cannot_forge_a_line():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "saved %s", ("acme\r\n2024 ERROR forged",), None)
    ScrubbingFilter().filter(record)
    assert "\n" not in record.getMessage() and "\r" not in record.getMessage()
    assert record.getMessage() == "saved acme\\r\\n2024 ERROR forged"


def test_email_headers_with_line_breaks_are_dropped():
    headers = {
        "List-Unsubscribe": "<https://u.example/x>",
        "X-Campaign": "spring\r\nBcc: attacker@evil.example",
        "X-Bad\nName": "v",
        "X-Tab": "folded\tvalue",
        "X-Delete": "printable until \x7f",
        "X-Nul": "caf\u00e9\x00",
        "X-Space": "no\u00a0break",  # unprintable to Python, yet no control character
    }
    assert extra_headers(headers) == {
        "List-Unsubscribe": "<https://u.example/x>",
        "X-Tab": "folded\tvalue",
        "X-Space": "no\u00a0break",
    }


def test_headers_sendgrid_reserves_are_dropped():
    """SendGrid refuses a whole request of up to 1,000 for one reserved header (Reply-To among them)."""
    headers = {"List-Unsubscribe": "<https://u.example/x>", "Reply-To": "x@brand.example", "X-SG-ID": "1"}
    assert extra_headers(headers) == {"List-Unsubscribe": "<https://u.example/x>"}


def test_a_stream_stays_in_the_workspaces_its_messages_were_allowed():
    token, engine = new_client("engine", ["acme"])
    guard = RequestGuard(ClientRegistry([engine]))
    scope = _CallScope(engine)
    method = "/tokensend.dispatcher.v1.DispatcherService/DispatchStream"

    def header(workspace_id):
        return dpb.DispatchStreamRequest(header=dpb.DispatchStreamRequest.Header(workspace_id=workspace_id))

    part = dpb.DispatchStreamRequest(recipients=dpb.DispatchStreamRequest.Recipients())
    with pytest.raises(InvalidArgument):
        guard._admit(part, _CallScope(engine), method)  # nothing allowed yet
    guard._admit(header("acme"), scope, method)
    guard._admit(part, scope, method)  # rides on the header
    with pytest.raises(PermissionDenied):
        guard._admit(header("globex"), scope, method)


def test_a_workspace_that_is_no_workspace_id_is_refused_by_its_field_and_never_echoed(caplog):
    """An address pasted where the workspace goes (or megabytes of anything) is no workspace a client
    may be bound to: refused naming the field, the value in neither the answer nor the log."""
    _, engine = new_client("engine", ["acme"])
    guard = RequestGuard(ClientRegistry([engine]))
    pasted = "jane.doe@example.com"
    saved = rpb.TestPiiApiConfigRequest.SavedConfig(workspace_id=pasted)
    cases = [
        (dpb.GetConnectorRequest(workspace_id=pasted), "workspace_id"),
        (
            dpb.PutConnectorRequest(connector=dpb.Connector(workspace_id=f"{pasted}\n{'x' * 4000}")),
            "connector.workspace_id",
        ),
        (rpb.TestPiiApiConfigRequest(saved=saved), "saved.workspace_id"),
    ]
    caplog.set_level(logging.DEBUG)
    for request, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            guard._admit(request, _CallScope(engine), "/t/M")
        assert caught.value.field == field
        assert pasted not in caught.value.message and len(caught.value.message) < 200
    assert pasted not in caplog.text
    with pytest.raises(InvalidArgument) as servicer_says:
        check_id(pasted, "workspace_id")
    assert caught.value.description == servicer_says.value.description  # one wording, wherever it is refused
    with pytest.raises(PermissionDenied) as caught:  # a workspace ID of another brand is named, as before
        guard._admit(dpb.GetConnectorRequest(workspace_id="globex"), _CallScope(engine), "/t/M")
    assert caught.value.message == "client 'engine' may not use workspace 'globex'"


async def test_a_reused_guarded_handler_keeps_each_client_to_its_own_workspaces():
    acme_token, acme = new_client("acme-engine", ["acme"])
    globex_token, globex = new_client("globex-engine", ["globex"])
    guard = RequestGuard(ClientRegistry([acme, globex]))

    async def resolve(request, context):
        return request.workspace_id

    handler = grpc.unary_unary_rpc_method_handler(resolve)

    async def continuation(details):
        return handler

    class Details:
        method = "/tokensend.resolver.v1.ResolverService/ResolveContacts"

        def __init__(self, token: str) -> None:
            self.invocation_metadata = (("authorization", f"Bearer {token}"),)

    async def call(token: str, workspace_id: str):
        guarded = await guard.intercept_service(continuation, Details(token))
        return guarded, await guarded.unary_unary(rpb.ResolveContactsRequest(workspace_id=workspace_id), None)

    acme_handler, answer = await call(acme_token, "acme")
    assert answer == "acme"
    again, _ = await call(acme_token, "acme")
    assert again is acme_handler  # made once per method and client
    globex_handler, answer = await call(globex_token, "globex")
    assert answer == "globex" and globex_handler is not acme_handler
    with pytest.raises(PermissionDenied):
        await call(acme_token, "globex")
    with pytest.raises(PermissionDenied):
        await call(globex_token, "acme")


def test_enum_values_the_contract_does_not_declare_are_refused():
    with pytest.raises(InvalidArgument) as caught:
        RequestLimits().check(dpb.DispatchRequest(recipients=[dpb.Recipient()], channel=57))
    assert (caught.value.field, caught.value.description) == (
        "channel",
        "is not a known Channel value: one of CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_MMS, CHANNEL_RCS, CHANNEL_WHATSAPP",
    )
    RequestLimits().check(dpb.DispatchRequest(channel=0))  # unset is for the servicer to judge


class _FieldByField(RequestLimits):
    """The limits without the size shortcut: every field of every message read."""

    def floor(self, descriptor):
        return 0, 0


def _outcome(limits: RequestLimits, message) -> str:
    try:
        limits.check(message)
    except InvalidArgument as exc:
        return f"{exc.field}: {exc}"
    return "accepted"


# Each makes one limit the smallest, so the shortcut's bound for that kind of field is what decides.
_TIGHT = [
    None,
    {"tokensend.dispatcher.v1.Recipient.anonymous_id": FieldLimit(length=6)},
    {"tokensend.dispatcher.v1.Recipient.attributes": FieldLimit(length=5)},
    {"tokensend.dispatcher.v1.Recipient.attributes": FieldLimit(items=3)},
    {"tokensend.dispatcher.v1.WhatsAppTemplate.language": FieldLimit(length=4)},
    {"tokensend.dispatcher.v1.WhatsAppTemplate.params": FieldLimit(length=5, items=2)},
]
_TEXT = st.text(alphabet=st.sampled_from("ab\u00e9\u4e2d\U0001f600"), max_size=9)


@settings(max_examples=600, deadline=None)
@given(
    anonymous_id=_TEXT,
    attributes=st.dictionaries(st.text(alphabet="ab\u00e9", max_size=2), st.one_of(st.just(""), _TEXT), max_size=5),
    language=_TEXT,
    params=st.lists(_TEXT, max_size=4),
    overrides=st.sampled_from(_TIGHT),
)
def test_the_size_shortcut_decides_as_the_field_by_field_walk(anonymous_id, attributes, language, params, overrides):
    """A message small enough to skip is one the full walk accepts too, multi-byte text included."""
    recipient = dpb.Recipient(anonymous_id=anonymous_id, attributes=attributes)
    content = dpb.Content(whatsapp_template=dpb.WhatsAppTemplate(name="t", language=language, params=params))
    # In a list too, where each element is judged by its size before it is walked (and named by its index).
    in_a_list = dpb.DispatchRequest(recipients=[dpb.Recipient(anonymous_id="a"), recipient])
    for message in (recipient, content, in_a_list):
        assert _outcome(RequestLimits(overrides), message) == _outcome(_FieldByField(overrides), message)


def test_types_with_enums_or_inside_themselves_are_always_read_field_by_field():
    limits = RequestLimits()
    assert limits.floor(dpb.DispatchRequest.DESCRIPTOR)[0] == 0  # channel: an enum
    assert limits.floor(dpb.Recipient.DESCRIPTOR) == (100, 0)  # 50 attributes, two bytes each at least


@pytest.mark.parametrize(
    ("override", "recipient", "field"),
    [
        ({"anonymous_id": FieldLimit(length=6)}, dpb.Recipient(anonymous_id="abcdefg"), "anonymous_id"),
        ({"attributes": FieldLimit(length=5)}, dpb.Recipient(attributes={"k": "abcdef"}), "attributes['k']"),
        (
            {"attributes": FieldLimit(items=3)},
            dpb.Recipient(attributes=dict.fromkeys(["", "a", "b", "c"], "")),
            "attributes",
        ),
    ],
)
def test_the_smallest_message_over_a_limit_is_still_refused(override, recipient, field):
    """Just over the limit, as small as the encoding allows: below any bound the shortcut may use."""
    limits = RequestLimits({f"tokensend.dispatcher.v1.Recipient.{k}": v for k, v in override.items()})
    with pytest.raises(InvalidArgument) as refused:
        limits.check(recipient)
    assert refused.value.field == field


def test_calls_of_an_rpc_with_no_workspace_rule_are_refused_every_time_and_logged_once_a_minute(caplog):
    """A client bound to some workspaces calling an RPC the rules do not know, again and again: each call
    refused, a line per client, method and reason a minute."""
    _, engine = new_client("engine", ["acme"])
    guard = RequestGuard(ClientRegistry([engine]))
    unknown = rpb.ResolveContactsResponse()  # a response type: no request rule names it
    caplog.set_level(logging.DEBUG, logger="libs.guard")
    for _ in range(5):
        with pytest.raises(PermissionDenied):
            guard._admit(unknown, _CallScope(engine), "/t/M")
    assert [r.getMessage() for r in caplog.records] == ["refused /t/M to client engine: the RPC has no workspace rule"]
