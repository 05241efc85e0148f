"""YAML files onto the proto messages: short enum forms, field-naming errors, several configs per file."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from cli.commands.config import read_documents
from cli.commands.send_test import read_content
from cli.documents import (
    CONNECTOR,
    OAUTH,
    PII_API,
    DocumentError,
    config_to_data,
    dump_yaml,
    load_configs,
    load_mappings,
    parse_message,
)
from cli.exits import UsageError

ROOT = Path(__file__).resolve().parents[2]
# A value no message may repeat: it stands for a customer's address in a file given by mistake.
PRIVATE = "canary-contact-5e1d"

BULK = """\
kind: pii-api
workspace_id: demo
channel: email
mode: bulk
method: post
url: https://crm.example/v1/customers:batchGet
body: '{"ids": "@anonymous_ids"}'
batch_size: 250
max_retries: 0
contact_path: email
attribute_paths:
  first_name: profile.first_name
headers:
  X-Api-Key: secret-1
"""
SINGLE_SMS = """\
kind: pii-api
workspace_id: demo
channel: sms
mode: single
method: get
url: https://crm.example/v1/customers/@anonymous_id
contact_path: phone
"""


def write(tmp_path: Path, text: str, name: str = "pii-api.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str, kind=None, name: str = "pii-api.yaml") -> str:
    with pytest.raises(DocumentError) as raised:
        load_configs(write(tmp_path, text, name), kind)
    assert raised.value.exit_code == 2
    return raised.value.message


def test_a_pii_api_config_maps_onto_the_message(tmp_path) -> None:
    [doc] = load_configs(write(tmp_path, BULK))
    assert doc.kind is PII_API
    assert doc.message == rpb.PiiApiConfig(
        workspace_id="demo",
        channel=common_pb2.CHANNEL_EMAIL,
        mode=rpb.MODE_BULK,
        method=rpb.HTTP_METHOD_POST,
        url="https://crm.example/v1/customers:batchGet",
        body='{"ids": "@anonymous_ids"}',
        batch_size=250,
        max_retries=0,
        contact_path="email",
        attribute_paths={"first_name": "profile.first_name"},
        headers={"X-Api-Key": "secret-1"},
    )
    assert doc.message.HasField("max_retries"), "an explicit 0 is kept: it means no retries, not the default"
    assert doc.label == "pii-api demo/email"


@pytest.mark.parametrize("written", ["email", "EMAIL", "CHANNEL_EMAIL", "Email", "1"])
def test_enums_take_full_names_and_short_forms(written: str) -> None:
    config = parse_message({"channel": written}, rpb.PiiApiConfig, "config", "f.yaml")
    assert config.channel == common_pb2.CHANNEL_EMAIL


@pytest.mark.parametrize(
    ("field", "written", "expected"),
    [
        ("mode", "single", rpb.MODE_SINGLE),
        ("mode", "MODE_BULK", rpb.MODE_BULK),
        ("method", "post", rpb.HTTP_METHOD_POST),
        ("method", "GET", rpb.HTTP_METHOD_GET),
    ],
)
def test_resolver_enums_short_forms(field: str, written: str, expected: int) -> None:
    config = parse_message({field: written}, rpb.PiiApiConfig, "config", "f.yaml")
    assert getattr(config, field) == expected


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("sendgrid", dpb.CONNECTOR_KIND_SENDGRID),
        ("whatsapp-cloud", dpb.CONNECTOR_KIND_WHATSAPP_CLOUD),
        ("whatsapp_cloud", dpb.CONNECTOR_KIND_WHATSAPP_CLOUD),
        ("custom-http", dpb.CONNECTOR_KIND_CUSTOM_HTTP),
        ("CONNECTOR_KIND_TWILIO", dpb.CONNECTOR_KIND_TWILIO),
    ],
)
def test_connector_kinds_short_forms(written: str, expected: int) -> None:
    assert parse_message({"kind": written}, dpb.Connector, "connector", "f.yaml").kind == expected


def test_an_unknown_field_is_named_with_the_file(tmp_path) -> None:
    message = error_of(tmp_path, BULK.replace("contact_path", "contact_pth"))
    assert message.startswith(f"{tmp_path}/pii-api.yaml: unknown field 'contact_pth' in config")
    assert "did you mean 'contact_path'?" in message


def test_an_unknown_nested_field_names_its_path(tmp_path) -> None:
    text = "kind: custom_http\nworkspace_id: w\nconnector_id: gw\ncustom_http:\n  mthod: POST\n"
    message = error_of(tmp_path, text, name="gw.yaml")
    assert "unknown field 'mthod' in connector.custom_http (did you mean 'method'?)" in message


def test_an_unknown_enum_value_names_the_field_and_the_choices(tmp_path) -> None:
    message = error_of(tmp_path, BULK.replace("channel: email", "channel: emial"))
    assert "config.channel: unknown value 'emial'; expected one of email, sms, mms, rcs, whatsapp" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("batch_size: lots", "config.batch_size: expected a whole number, got 'lots'"),
        ("batch_size: -1", "config.batch_size: must not be negative"),
        ("timeout_ms: 99999999999999", "config.timeout_ms: must be at most 4294967295, got 99999999999999"),
        ("max_retries: 4294967296", "config.max_retries: must be at most 4294967295"),
        ("headers: [a, b]", "config.headers: expected a mapping, got a list"),
        ("url: {host: x}", "config.url: expected a single value, got a mapping"),
        ("headers: {X-Api-Key: }", "config.headers['X-Api-Key']: has no value"),
    ],
)
def test_bad_values_name_the_field(tmp_path, line: str, expected: str) -> None:
    field = line.split(":")[0]
    text = "\n".join(x for x in BULK.splitlines() if not x.startswith(field + ":") and not x.startswith("  X-Api"))
    assert expected in error_of(tmp_path, text + "\n" + line + "\n")


def test_repeated_fields_need_a_list() -> None:
    with pytest.raises(DocumentError) as raised:
        parse_message({"media_urls": "https://x/a.png"}, dpb.Content, "content", "c.yaml")
    assert "c.yaml: content.media_urls: expected a list" in raised.value.message


@pytest.mark.parametrize(
    ("message", "data", "says"),
    [
        (dpb.Connector, {"credentials": "SG.s3cr3t-key"}, "connector.credentials: expected a mapping, got a single"),
        (rpb.PiiApiConfig, {"headers": "Authorization: Bearer s3cr3t"}, "connector.headers: expected a mapping"),
        (dpb.Connector, {"custom_http": {"headers": "X-Key: s3cr3t"}}, "connector.custom_http.headers: expected a"),
    ],
)
def test_a_sensitive_field_written_as_a_single_value_is_refused_without_repeating_it(message, data, says) -> None:
    # `credentials: SG....` (the API key where a mapping of credentials belongs) is an easy slip.
    with pytest.raises(DocumentError) as raised:
        parse_message(data, message, "connector", "c.yaml")
    assert says in raised.value.message
    assert "s3cr3t" not in raised.value.message


def test_scalars_stay_text_where_the_proto_wants_text() -> None:
    connector = parse_message(
        {"sender": "+14155550100", "connector_id": "0123", "base_url": "yes", "rate_limit_per_second": "10"},
        dpb.Connector,
        "connector",
        "t.yaml",
    )
    assert (connector.sender, connector.connector_id, connector.base_url) == ("+14155550100", "0123", "yes")
    assert connector.rate_limit_per_second == 10


def test_yaml_numbers_and_phone_numbers_keep_their_text(tmp_path) -> None:
    text = "kind: twilio\nworkspace_id: 007\nconnector_id: tw\nsender: +14155550100\nrate_limit_per_second: 5\n"
    [doc] = load_configs(write(tmp_path, text, "tw.yaml"))
    assert (doc.message.workspace_id, doc.message.sender, doc.message.rate_limit_per_second) == (
        "007",
        "+14155550100",
        5,
    )


def test_oneof_members_exclude_each_other() -> None:
    with pytest.raises(DocumentError) as raised:
        parse_message(
            {"header": {"workspace_id": "w"}, "recipients": {"recipients": []}},
            dpb.DispatchStreamRequest,
            "request",
            "s.yaml",
        )
    assert "request.header and request.recipients exclude each other" in raised.value.message


def test_several_documents_each_with_its_kind(tmp_path) -> None:
    text = (
        "kind: oauth\nworkspace_id: demo\noauth_config_id: crm\ntoken_url: https://crm.example/token\n"
        "client_id: app\nclient_secret: s3cret\n---\n" + BULK + "---\n"
        "kind: sendgrid\nworkspace_id: demo\nconnector_id: sg\nchannel: email\n"
    )
    docs = load_configs(write(tmp_path, text, "all.yaml"))
    assert [doc.kind for doc in docs] == [OAUTH, PII_API, CONNECTOR]
    assert docs[0].message.client_secret == "s3cret"
    assert docs[2].message.kind == dpb.CONNECTOR_KIND_SENDGRID, "a connector's kind is its provider"
    assert [doc.where for doc in docs] == [f"{tmp_path}/all.yaml (document {n})" for n in (1, 2, 3)]


def test_a_list_of_configs(tmp_path) -> None:
    text = (
        "- {kind: oauth, workspace_id: demo, oauth_config_id: crm}\n"
        "- {kind: pii-api, workspace_id: demo, channel: sms, mode: single}\n"
    )
    docs = load_configs(write(tmp_path, text, "list.yaml"))
    assert [(doc.kind, doc.where.rsplit(" ", 2)[-2:]) for doc in docs] == [
        (OAUTH, ["(item", "1)"]),
        (PII_API, ["(item", "2)"]),
    ]
    message = error_of(tmp_path, text.replace("oauth_config_id", "oauth_id"), name="list.yaml")
    assert message.startswith(f"{tmp_path}/list.yaml (item 1): unknown field 'oauth_id' in config")


def test_an_error_in_a_later_document_names_that_document(tmp_path) -> None:
    message = error_of(tmp_path, BULK + "---\n" + BULK.replace("mode: bulk", "mode: bulky"), name="two.yaml")
    assert message.startswith(f"{tmp_path}/two.yaml (document 2): config.mode: unknown value 'bulky'")


def test_the_command_line_kind_applies_to_documents_without_one(tmp_path) -> None:
    text = BULK.replace("kind: pii-api\n", "")
    assert error_of(tmp_path, text).endswith(
        "missing 'kind' (pii-api, oauth, content-api, or a connector's provider such as sendgrid); "
        "add it, or name the kind on the command line for a file of one kind"
    )
    [doc] = load_configs(write(tmp_path, text), PII_API)
    assert doc.kind is PII_API
    message = error_of(tmp_path, "kind: oauth\nworkspace_id: w\n", PII_API)
    assert "holds a config of kind 'oauth', not 'pii-api'" in message


def test_a_connector_file_without_a_document_kind(tmp_path) -> None:
    [doc] = load_configs(write(tmp_path, "kind: twilio\nworkspace_id: w\n", "c.yaml"), CONNECTOR)
    assert doc.message.kind == dpb.CONNECTOR_KIND_TWILIO
    assert "connector.kind: unknown value 'twilo'" in error_of(tmp_path, "kind: twilo\n", CONNECTOR, "c.yaml")
    assert "a connector's kind is its provider" in error_of(tmp_path, "kind: connector\n", None, "c.yaml")
    assert "unknown kind 'pii'" in error_of(tmp_path, "kind: pii\n", None, "c.yaml")


def test_other_kinds_can_be_skipped(tmp_path) -> None:
    text = "kind: oauth\nworkspace_id: demo\n---\n" + BULK
    path = write(tmp_path, text, "mixed.yaml")
    assert [doc.kind for doc in load_configs(path, PII_API, kinds=[PII_API])] == [PII_API]


def test_invalid_yaml_says_where(tmp_path) -> None:
    message = error_of(tmp_path, "kind: pii-api\nworkspace_id: demo\n  url: [\n", name="broken.yaml")
    assert message.startswith(f"{tmp_path}/broken.yaml: not valid YAML (line 3, column 6)")


def test_a_key_given_twice_is_refused_where_it_repeats(tmp_path) -> None:
    """YAML keeps the last of two equal keys: `channel: email` then `channel: sms` saved SMS silently."""
    text = "kind: pii-api\nworkspace_id: demo\nchannel: email\nchannel: sms\n"
    message = error_of(tmp_path, text, name="twice.yaml")
    assert message == f"{tmp_path}/twice.yaml: not valid YAML (line 4, column 1): 'channel' is given twice"
    merged = "defaults: &d\n  workspace_id: demo\nkind: oauth\n<<: *d\nworkspace_id: other\n"
    assert load_mappings(merged, "m.yaml")[0][1]["workspace_id"] == "other"  # merged keys may be overridden


def test_empty_and_missing_files(tmp_path) -> None:
    assert error_of(tmp_path, "# nothing\n", name="empty.yaml").endswith("empty.yaml: holds no config")
    with pytest.raises(UsageError) as raised:
        load_configs(str(tmp_path / "absent.yaml"))
    assert raised.value.message == f"{tmp_path}/absent.yaml: no such file"
    assert raised.value.exit_code == 2


def test_a_document_that_is_not_a_mapping_is_refused_without_repeating_it(tmp_path) -> None:
    # Another file given by mistake, a recipients CSV, reads as one long YAML text: its contacts and names.
    csv = f"anonymous_id,email\ncust-1,{PRIVATE}@example.com\n"
    error = error_of(tmp_path, csv)
    assert "expected a mapping of fields, got a single value, not 'name: value' lines (not shown" in error
    assert PRIVATE not in error
    path = tmp_path / "content.yaml"
    path.write_text(csv)
    with pytest.raises(DocumentError) as raised:
        read_content(str(path))
    assert raised.value.message.startswith(f"{path}: content: expected a mapping of fields, got a single value")
    assert PRIVATE not in raised.value.message


def test_printed_configs_read_back_to_the_same_message(tmp_path) -> None:
    for kind, message in [
        (PII_API, load_configs(write(tmp_path, BULK))[0].message),
        (
            CONNECTOR,
            dpb.Connector(
                workspace_id="w",
                connector_id="gw",
                kind=dpb.CONNECTOR_KIND_CUSTOM_HTTP,
                channel=common_pb2.CHANNEL_SMS,
                sender="+14155550100",
                credentials={"api_key": "********"},
                custom_http=dpb.CustomHttpTemplate(method="POST", url="/sms", body="to=@to&text=@text"),
            ),
        ),
    ]:
        data = config_to_data(kind, message)
        assert next(iter(data)) == "kind"
        text = dump_yaml(data)
        [doc] = load_configs(write(tmp_path, text, "back.yaml"))
        assert (doc.kind, doc.message) == (kind, message)
    assert config_to_data(CONNECTOR, dpb.Connector(kind=dpb.CONNECTOR_KIND_SES))["kind"] == "ses"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_parse(path: Path) -> None:
    if path.name.startswith("content-"):
        from cli.commands.send_test import read_content

        assert read_content(str(path)).ListFields()
        return
    docs = load_configs(str(path))
    assert docs and all(doc.message.workspace_id for doc in docs)


@pytest.mark.parametrize(
    ("first", "second", "says"),
    [
        (BULK, BULK, "pii-api demo/email"),
        # SMS, MMS and RCS share one PII API config: the second would replace the first.
        (SINGLE_SMS, SINGLE_SMS.replace("channel: sms", "channel: mms"), "pii-api demo/sms"),
    ],
)
def test_two_documents_for_the_same_config_are_refused_before_anything_is_sent(tmp_path, first, second, says) -> None:
    with pytest.raises(DocumentError) as raised:
        read_documents([write(tmp_path, first + "---\n" + second)], None, None)
    assert says in raised.value.message
    assert "document 1" in raised.value.message and "document 2" in raised.value.message


def test_the_same_connector_id_twice_is_refused_across_files(tmp_path) -> None:
    connector = "kind: sendgrid\nworkspace_id: demo\nconnector_id: mail\nchannel: email\n"
    with pytest.raises(DocumentError) as raised:
        read_documents([write(tmp_path, connector, "a.yaml"), write(tmp_path, connector, "b.yaml")], None, None)
    assert "connector demo/mail" in raised.value.message and "a.yaml" in raised.value.message


def test_configs_of_other_workspaces_or_families_are_not_duplicates(tmp_path) -> None:
    other = SINGLE_SMS.replace("channel: sms", "channel: whatsapp")
    elsewhere = SINGLE_SMS.replace("workspace_id: demo", "workspace_id: other")
    documents = read_documents([write(tmp_path, "---\n".join([SINGLE_SMS, other, elsewhere]))], None, None)
    assert len(documents) == 3
