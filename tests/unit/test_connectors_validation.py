"""Unit tests for validate_connector: every rule refuses with the exact field it is about."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.connector_store import keep_masked_secrets
from libs.errors import InvalidArgument
from libs.masked_secrets import MASK
from services.dispatcher.connectors import validate_connector
from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.connectors.custom_http import CompiledRequest, TemplateError
from services.dispatcher.connectors.sendgrid import mail_send_url

K = pb.ConnectorKind
C = common_pb2
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
SERVICE_SID = "MG" + "0123456789abcdef" * 2
SECRET = "s3cr3t-value-never-echoed"
# An event-webhook verification key as SendGrid hands it out: base64 DER SPKI of a P-256 key.
SENDGRID_PUBLIC_KEY = base64.b64encode(
    ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
).decode()


def connector(kind: int, **fields: object) -> pb.Connector:
    """A valid connector of `kind`; `fields` override (credentials replace the whole map)."""
    base: dict[int, dict[str, object]] = {
        K.CONNECTOR_KIND_SENDGRID: dict(
            channel=C.CHANNEL_EMAIL, sender="news@brand.example.com", credentials={"api_key": SECRET}
        ),
        K.CONNECTOR_KIND_SES: dict(
            channel=C.CHANNEL_EMAIL,
            sender="news@brand.example.com",
            credentials={"access_key_id": "AKIDEXAMPLE", "secret_access_key": SECRET, "region": "eu-west-1"},
        ),
        K.CONNECTOR_KIND_SMTP: dict(
            channel=C.CHANNEL_EMAIL, sender="news@brand.example.com", base_url="smtps://smtp.brand.example.com:465"
        ),
        K.CONNECTOR_KIND_TWILIO: dict(
            channel=C.CHANNEL_SMS, sender="+14155550100", credentials={"account_sid": ACCOUNT_SID, "auth_token": SECRET}
        ),
        K.CONNECTOR_KIND_WHATSAPP_CLOUD: dict(
            channel=C.CHANNEL_WHATSAPP,
            sender="106540352242922",
            credentials={"access_token": SECRET},
            webhook_secret=SECRET,
        ),
        K.CONNECTOR_KIND_CUSTOM_HTTP: dict(
            channel=C.CHANNEL_SMS,
            sender="Brand",
            credentials={"api_key": SECRET},
            custom_http=pb.CustomHttpTemplate(
                method="POST",
                url="https://gateway.example.com/sms",
                headers={"Authorization": "Bearer @credentials.api_key"},
                body='{"to": "@to", "text": "@text", "ref": "@message_id", "from": "@sender"}',
                message_id_path="messages[0].id",
            ),
        ),
    }
    values = {**base[kind], **fields}
    return pb.Connector(workspace_id="ws-1", connector_id="conn-1", kind=kind, **values)  # type: ignore[arg-type]


def refused(c: pb.Connector, allow_private: bool = False) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        validate_connector(c, allow_private)
    assert SECRET not in caught.value.message
    return caught.value


@pytest.mark.parametrize("kind", list(K.values())[1:])
def test_every_kind_has_a_valid_example(kind: int) -> None:
    validate_connector(connector(kind), allow_private=False)


def test_the_prefix_names_the_request_path() -> None:
    c = connector(K.CONNECTOR_KIND_SENDGRID, sender="")
    with pytest.raises(InvalidArgument) as caught:
        validate_connector(c, False, prefix="request.connector")
    assert caught.value.field == "request.connector.sender"


# -- kind and channel -----------------------------------------------------------


def test_unspecified_kind_is_refused() -> None:
    c = connector(K.CONNECTOR_KIND_SENDGRID)
    c.kind = K.CONNECTOR_KIND_UNSPECIFIED
    assert refused(c).field == "connector.kind"


def test_unspecified_channel_is_refused() -> None:
    assert refused(connector(K.CONNECTOR_KIND_SENDGRID, channel=C.CHANNEL_UNSPECIFIED)).field == "connector.channel"


@pytest.mark.parametrize(
    ("kind", "channel"),
    [
        (K.CONNECTOR_KIND_SENDGRID, C.CHANNEL_SMS),
        (K.CONNECTOR_KIND_SES, C.CHANNEL_WHATSAPP),
        (K.CONNECTOR_KIND_SMTP, C.CHANNEL_MMS),
        (K.CONNECTOR_KIND_TWILIO, C.CHANNEL_EMAIL),
        (K.CONNECTOR_KIND_WHATSAPP_CLOUD, C.CHANNEL_SMS),
        (K.CONNECTOR_KIND_CUSTOM_HTTP, C.CHANNEL_EMAIL),
    ],
)
def test_kind_and_channel_must_match(kind: int, channel: int) -> None:
    assert refused(connector(kind, channel=channel)).field == "connector.channel"


def test_whatsapp_through_twilio_is_refused() -> None:
    error = refused(connector(K.CONNECTOR_KIND_TWILIO, channel=C.CHANNEL_WHATSAPP))
    assert error.field == "connector.channel"
    assert "not supported" in error.description


@pytest.mark.parametrize("channel", [C.CHANNEL_SMS, C.CHANNEL_MMS])
def test_twilio_sends_sms_and_mms(channel: int) -> None:
    validate_connector(connector(K.CONNECTOR_KIND_TWILIO, channel=channel), False)


@pytest.mark.parametrize("channel", [C.CHANNEL_SMS, C.CHANNEL_MMS, C.CHANNEL_RCS, C.CHANNEL_WHATSAPP])
def test_custom_http_sends_every_phone_channel(channel: int) -> None:
    validate_connector(connector(K.CONNECTOR_KIND_CUSTOM_HTTP, channel=channel), False)


# -- credentials ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (K.CONNECTOR_KIND_SENDGRID, "api_key"),
        (K.CONNECTOR_KIND_SES, "access_key_id"),
        (K.CONNECTOR_KIND_SES, "secret_access_key"),
        (K.CONNECTOR_KIND_SES, "region"),
        (K.CONNECTOR_KIND_TWILIO, "account_sid"),
        (K.CONNECTOR_KIND_TWILIO, "auth_token"),
        (K.CONNECTOR_KIND_WHATSAPP_CLOUD, "access_token"),
    ],
)
def test_required_credentials(kind: int, name: str) -> None:
    c = connector(kind)
    del c.credentials[name]
    error = refused(c)
    assert error.field == f"connector.credentials[{name!r}]"
    assert error.description == "is required"


def test_an_empty_required_credential_counts_as_missing() -> None:
    error = refused(connector(K.CONNECTOR_KIND_SENDGRID, credentials={"api_key": ""}))
    assert error.field == "connector.credentials['api_key']"


def test_smtp_needs_no_credentials_but_username_and_password_come_together() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_SMTP, credentials={"username": "u", "password": SECRET}), False)
    assert refused(connector(K.CONNECTOR_KIND_SMTP, credentials={"username": "u"})).field == (
        "connector.credentials['password']"
    )
    assert refused(connector(K.CONNECTOR_KIND_SMTP, credentials={"password": SECRET})).field == (
        "connector.credentials['username']"
    )


def test_whatsapp_verify_token_is_optional() -> None:
    c = connector(K.CONNECTOR_KIND_WHATSAPP_CLOUD, credentials={"access_token": SECRET, "verify_token": "v"})
    validate_connector(c, False)


def test_twilio_account_sid_format() -> None:
    c = connector(K.CONNECTOR_KIND_TWILIO, credentials={"account_sid": "AC123", "auth_token": SECRET})
    assert refused(c).field == "connector.credentials['account_sid']"


def test_ses_region_format() -> None:
    c = connector(
        K.CONNECTOR_KIND_SES,
        credentials={"access_key_id": "AKID", "secret_access_key": SECRET, "region": "https://evil"},
    )
    assert refused(c).field == "connector.credentials['region']"


def test_unknown_credentials_of_a_fixed_kind_are_refused() -> None:
    c = connector(K.CONNECTOR_KIND_SENDGRID, credentials={"api_key": SECRET, "apikey": SECRET})
    assert refused(c).field == "connector.credentials['apikey']"


@pytest.mark.parametrize("value", [SECRET + "\r\nX-Injected: 1", SECRET + "\n"])
def test_credentials_without_line_breaks(value: str) -> None:
    error = refused(connector(K.CONNECTOR_KIND_SENDGRID, credentials={"api_key": value}))
    assert error.field == "connector.credentials['api_key']"


def test_credential_values_are_bounded() -> None:
    error = refused(connector(K.CONNECTOR_KIND_SENDGRID, credentials={"api_key": "k" * 4097}))
    assert error.field == "connector.credentials['api_key']"


def test_credential_count_is_bounded() -> None:
    credentials = {f"key_{i}": "v" for i in range(51)}
    error = refused(connector(K.CONNECTOR_KIND_CUSTOM_HTTP, credentials={**credentials, "api_key": SECRET}))
    assert error.field == "connector.credentials"


def test_smtp_ca_certificate_must_be_pem() -> None:
    error = refused(connector(K.CONNECTOR_KIND_SMTP, credentials={"ca_cert_pem": "not a certificate"}))
    assert error.field == "connector.credentials['ca_cert_pem']"


# -- sender -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [K.CONNECTOR_KIND_SENDGRID, K.CONNECTOR_KIND_SES, K.CONNECTOR_KIND_SMTP])
@pytest.mark.parametrize("sender", ["", "not-an-address", "Brand <news@brand.example.com>", "news@localhost"])
def test_email_sender_is_a_plain_address(kind: int, sender: str) -> None:
    assert refused(connector(kind, sender=sender)).field == "connector.sender"


def test_an_ses_sender_has_an_ascii_local_part() -> None:
    # SES has no SMTPUTF8: a from address with a Unicode local part would fail every message of every campaign.
    error = refused(connector(K.CONNECTOR_KIND_SES, sender="nöreply@brand.example.com"))
    assert error.field == "connector.sender"
    assert "ASCII" in error.description
    validate_connector(connector(K.CONNECTOR_KIND_SES, sender="noreply@bränd.example.com"), False)  # Punycode
    validate_connector(connector(K.CONNECTOR_KIND_SMTP, sender="nöreply@brand.example.com"), False)  # SMTPUTF8


@pytest.mark.parametrize("sender", ["", "14155550100", "+0123", "BRAND.NAME", "MG" + "0" * 31])
def test_twilio_sender_is_a_number_a_sender_id_or_a_messaging_service(sender: str) -> None:
    assert refused(connector(K.CONNECTOR_KIND_TWILIO, sender=sender)).field == "connector.sender"


def test_twilio_sender_may_be_a_messaging_service() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_TWILIO, sender=SERVICE_SID), False)


def test_twilio_rcs_needs_a_messaging_service() -> None:
    assert refused(connector(K.CONNECTOR_KIND_TWILIO, channel=C.CHANNEL_RCS)).field == "connector.sender"
    validate_connector(connector(K.CONNECTOR_KIND_TWILIO, channel=C.CHANNEL_RCS, sender=SERVICE_SID), False)


@pytest.mark.parametrize("sender", ["", "+14155550100", "abc"])
def test_whatsapp_sender_is_a_numeric_phone_number_id(sender: str) -> None:
    assert refused(connector(K.CONNECTOR_KIND_WHATSAPP_CLOUD, sender=sender)).field == "connector.sender"


def test_custom_sender_is_required_when_the_template_uses_it() -> None:
    assert refused(connector(K.CONNECTOR_KIND_CUSTOM_HTTP, sender="")).field == "connector.sender"


# -- base_url ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://api.example.com",
        "http://api.example.com",
        "https://user:pw@api.example.com",
        "https://api.example.com/?q=1",
        "https://api.example.com/ path",
        "https://127.0.0.1:8443",
        "https://10.1.2.3",
        "https://localhost",
        "https://[::1]/",
        "https://169.254.169.254/",
        "https://127.1:8443",  # numeric spellings the resolver reads as private addresses
        "https://2130706433/",
        "https://0x7f.1/",
        "https://0177.0.0.1/",
        "https://0xa9.0xfe.0xa9.0xfe/",
        # as the per-message client (reqwest) reads hosts: 0.0.0.0, 0.0.0.1, 127.0.0.1, 169.254.169.254
        "https://0x/",
        "https://0x.1/",
        "https://%31%32%37.1/",
        "https://%31%36%39.254.169.254/",
        "https://[::1/x",  # urlsplit refuses it
        "https://api.example\uff03b@c.com/",  # NFKC turns the fullwidth sign into a '#'
        "https://api.example.com:99999",
    ],
)
def test_base_url_must_be_public_https(url: str) -> None:
    assert refused(connector(K.CONNECTOR_KIND_TWILIO, base_url=url)).field == "connector.base_url"


@pytest.mark.parametrize(
    "url",
    ["https://0x7f.example.com/", "https://1e100.net/", "https://%61pi.example.com/", "https://134744072/"],
)
def test_base_url_names_that_only_look_numeric_are_public(url: str) -> None:
    validate_connector(connector(K.CONNECTOR_KIND_TWILIO, base_url=url), allow_private=False)


def test_base_url_may_be_local_http_when_private_networks_are_allowed() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_TWILIO, base_url="http://127.0.0.1:4010"), allow_private=True)


def test_base_url_may_carry_a_path() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_WHATSAPP_CLOUD, base_url="https://graph.facebook.com/v21.0"), False)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "https://smtp.brand.example.com:465",
        "smtp://smtp.brand.example.com",
        "smtp://user:pw@smtp.brand.example.com:587",
        "smtp://smtp.brand.example.com:587/path",
        "smtp://smtp.brand.example.com:99999",
        "smtp://127.0.0.1:25",
        "smtps://192.168.1.10:465",
        "smtp://127.1:25",
        "smtps://0xc0a8010a:465",
    ],
)
def test_smtp_url_is_smtp_or_smtps_with_host_and_port(url: str) -> None:
    assert refused(connector(K.CONNECTOR_KIND_SMTP, base_url=url)).field == "connector.base_url"


def test_smtp_url_may_be_local_when_private_networks_are_allowed() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_SMTP, base_url="smtp://127.0.0.1:2525"), allow_private=True)


# -- custom http template -----------------------------------------------------------------


def custom(**template: object) -> pb.Connector:
    c = connector(K.CONNECTOR_KIND_CUSTOM_HTTP)
    for name, value in template.items():
        if name == "headers":
            c.custom_http.headers.clear()
            c.custom_http.headers.update(value)  # type: ignore[arg-type]
        else:
            setattr(c.custom_http, name, value)
    return c


def test_custom_http_needs_a_template() -> None:
    c = connector(K.CONNECTOR_KIND_CUSTOM_HTTP)
    c.ClearField("custom_http")
    assert refused(c).field == "connector.custom_http"


@pytest.mark.parametrize("method", ["", "PUT", "DELETE"])
def test_custom_http_method_is_get_or_post(method: str) -> None:
    assert refused(custom(method=method)).field == "connector.custom_http.method"


def test_custom_http_get_has_no_body() -> None:
    assert refused(custom(method="GET")).field == "connector.custom_http.body"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://gateway.example.com/sms",
        "https://127.0.0.1/sms",
        "https://127.1/sms",
        "https://0x7f.1/sms?to=@to",
        "https://%31%30.0.0.1/sms?to=@to",
        "https://@to.example.com/",
        "gateway.example.com",
    ],
)
def test_custom_http_url_rules(url: str) -> None:
    assert refused(custom(url=url)).field == "connector.custom_http.url"


def test_custom_http_url_may_carry_placeholders_in_path_and_query() -> None:
    validate_connector(
        custom(method="GET", body="", url="https://gw.example.com/send/@to?text=@text&id=@message_id"), False
    )


def test_custom_http_template_must_carry_the_recipient() -> None:
    """A template without @to would send every message of a campaign without its recipient's number."""
    error = refused(custom(body='{"text": "@text", "today": "@today"}'))
    assert error.field == "connector.custom_http"
    assert "@to" in error.description


@pytest.mark.parametrize(
    "where",
    [
        {"method": "GET", "body": "", "url": "https://gw.example.com/send?to=@to&text=@text"},
        {"headers": {"X-Recipient": "@to", "Authorization": "Bearer @credentials.api_key"}, "body": "@text"},
    ],
)
def test_custom_http_recipient_may_go_in_the_url_or_a_header(where: dict[str, object]) -> None:
    validate_connector(custom(**where), False)


def test_custom_http_relative_url_needs_base_url() -> None:
    assert refused(custom(url="/sms/json")).field == "connector.custom_http.url"
    c = custom(url="/sms/json")
    c.base_url = "https://rest.example.com"
    validate_connector(c, False)


def test_custom_http_message_id_path_must_compile() -> None:
    assert refused(custom(message_id_path="messages[0")).field == "connector.custom_http.message_id_path"


def test_custom_http_message_id_path_is_optional() -> None:
    validate_connector(custom(message_id_path=""), False)


def test_custom_http_header_values_without_line_breaks() -> None:
    error = refused(custom(headers={"X-Api-Key": "abc\r\nX-Evil: 1"}))
    assert error.field == "connector.custom_http.headers['X-Api-Key']"


@pytest.mark.parametrize("value", ["@text", "Bearer @credentials.api_key; note=@text"])
def test_custom_http_header_values_cannot_carry_the_text(value: str) -> None:
    """A message can be several lines and a header is one: every multi-line SMS would fail, after its
    recipient's contact was fetched. Refused when saved, naming the header."""
    error = refused(custom(headers={"X-Text": value}))
    assert error.field == "connector.custom_http.headers['X-Text']"
    assert "@text" in error.description and "body" in error.description


def test_custom_http_header_values_may_carry_the_one_line_placeholders() -> None:
    """The number (E.164), our message ID, the sender and the credentials hold no line break."""
    headers = {"X-To": "@to", "X-Ref": "@message_id", "X-From": "@sender", "X-Key": "@credentials.api_key"}
    validate_connector(custom(headers=headers, body='{"text": "@text"}'), False)
    validate_connector(custom(headers={"X-Context": "@textual"}), False)  # not a placeholder


def test_custom_http_header_values_without_control_characters_no_request_could_carry() -> None:
    error = refused(custom(headers={"X-Api-Key": "abc\x00def"}))
    assert error.field == "connector.custom_http.headers['X-Api-Key']"
    assert error.description == "must not contain control characters"


def test_custom_http_header_names_are_tokens() -> None:
    assert refused(custom(headers={"Bad Name": "v"})).field == "connector.custom_http.headers"
    twice = refused(custom(headers={"Authorization": "Bearer a", "authorization": "Bearer b"}))
    assert twice.field == "connector.custom_http.headers" and "twice" in twice.message


def test_a_header_line_pasted_as_its_name_is_refused_without_echoing_the_secret() -> None:
    error = refused(custom(headers={"Authorization: Bearer gw_live_canary_51f0": ""}))
    assert error.field == "connector.custom_http.headers"
    assert "gw_live_canary_51f0" not in str(error) and "gw_live_canary_51f0" not in error.field


def test_custom_http_credentials_it_uses_must_exist() -> None:
    error = refused(custom(headers={"Authorization": "Bearer @credentials.token"}))
    assert error.field == "connector.custom_http.headers['Authorization']"


def test_custom_http_body_is_bounded() -> None:
    assert refused(custom(body="x" * (16 * 1024 + 1))).field == "connector.custom_http.body"


def test_custom_http_template_belongs_only_to_custom_connectors() -> None:
    c = connector(K.CONNECTOR_KIND_TWILIO, custom_http=pb.CustomHttpTemplate(method="POST", url="https://x.example"))
    assert refused(c).field == "connector.custom_http"


def xml_gateway(sender: str = "Brand", api_key: str = SECRET, **template: object) -> pb.Connector:
    """A connector whose XML body carries the sender and a credential; the URL carries another."""
    fields: dict[str, object] = {
        "method": "POST",
        "url": "https://gateway.example.com/sms?account=@credentials.account",
        "headers": {"Content-Type": "application/xml"},
        "body": "<sms><to>@to</to><text>@text</text><from>@sender</from><key>@credentials.api_key</key></sms>",
        **template,
    }
    return connector(
        K.CONNECTOR_KIND_CUSTOM_HTTP,
        sender=sender,
        credentials={"api_key": api_key, "account": "acct\ufffe"},  # in the URL: percent-encoded, never XML
        custom_http=pb.CustomHttpTemplate(**fields),  # type: ignore[arg-type]
    )


def test_an_xml_body_whose_values_xml_can_carry_is_saved() -> None:
    validate_connector(xml_gateway(), False)


@pytest.mark.parametrize("character", ["\ufffe", "\uffff"])
@pytest.mark.parametrize(
    "body",
    [
        "<sms><to>@to</to><from>@sender</from><key>@credentials.api_key</key></sms>",
        "<sms to='@to' from='@sender' key='@credentials.api_key'/>",
        "<sms><to>@to</to><from><![CDATA[@sender]]></from><key><![CDATA[@credentials.api_key]]></key></sms>",
    ],
    ids=["text", "attribute", "cdata"],
)
@pytest.mark.parametrize("headers", [{"Content-Type": "text/xml; charset=utf-8"}, {}], ids=["declared", "guessed"])
def test_a_sender_an_xml_body_cannot_carry_is_refused_at_save_without_quoting_it(character, body, headers) -> None:
    """Saved, every message through the connector would fail at send time, after its contact was fetched."""
    sender = f"Brand{character}Co"
    error = refused(xml_gateway(sender=sender, body=body, headers=headers))
    assert error.field == "connector.sender"
    assert error.description == (
        "holds a character XML 1.0 cannot carry (a control character other than tab and line breaks, U+FFFE or "
        "U+FFFF), and custom_http.body, which is XML, uses @sender: no message could be sent"
    )
    assert sender not in error.message and character not in error.message


@pytest.mark.parametrize("character", ["\ufffe", "\uffff"])
def test_a_credential_an_xml_body_cannot_carry_is_refused_at_save_without_quoting_it(character) -> None:
    error = refused(xml_gateway(api_key=f"{SECRET}{character}"))
    assert error.field == "connector.credentials['api_key']"
    assert "XML 1.0 cannot carry" in error.description and "uses @credentials.api_key" in error.description
    assert character not in error.message  # the secret itself: checked by `refused`


@pytest.mark.parametrize(
    "change",
    [
        {"headers": {"Content-Type": "application/json"}, "body": '{"to": "@to", "from": "@sender"}'},
        {"body": "<sms><to>@to</to></sms>", "url": "https://gateway.example.com/sms?from=@sender"},
        {"method": "GET", "body": "", "url": "https://gateway.example.com/sms?to=@to&from=@sender"},
    ],
    ids=["json body", "sender in the url", "no body"],
)
def test_a_character_xml_cannot_carry_is_saved_where_no_xml_body_carries_it(change) -> None:
    validate_connector(xml_gateway(sender="Brand\ufffe", **change), False)


def test_a_connector_saved_before_the_rule_still_fails_each_message_without_quoting_the_secret() -> None:
    saved = xml_gateway(api_key=f"{SECRET}\uffff")
    request = CompiledRequest(saved.custom_http, sender=saved.sender, credentials=dict(saved.credentials))
    outbound = OutboundMessage(
        message_id="m-1", anonymous_id="a-1", campaign_id="c", campaign_instance_id="i", to="+14155550100"
    )
    with pytest.raises(TemplateError) as caught:
        request.render(outbound)
    assert "custom_http.body is XML" in str(caught.value) and SECRET not in str(caught.value)


# -- the rest ------------------------------------------------------------------------------------


def test_rate_limit_is_bounded() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_TWILIO, rate_limit_per_second=100_000), False)
    error = refused(connector(K.CONNECTOR_KIND_TWILIO, rate_limit_per_second=100_001))
    assert error.field == "connector.rate_limit_per_second"


def test_configuration_set_only_for_ses() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_SES, configuration_set="marketing-1"), False)
    assert refused(connector(K.CONNECTOR_KIND_SES, configuration_set="bad name")).field == "connector.configuration_set"
    error = refused(connector(K.CONNECTOR_KIND_SENDGRID, configuration_set="marketing"))
    assert error.field == "connector.configuration_set"


def test_sendgrid_webhook_secret_is_a_public_key() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_SENDGRID, webhook_secret=SENDGRID_PUBLIC_KEY), False)
    error = refused(connector(K.CONNECTOR_KIND_SENDGRID, webhook_secret="not-a-key"))
    assert error.field == "connector.webhook_secret"


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (K.CONNECTOR_KIND_SES, "SNS"),
        (K.CONNECTOR_KIND_SMTP, "no receipts"),
        (K.CONNECTOR_KIND_TWILIO, "auth_token"),
        (K.CONNECTOR_KIND_CUSTOM_HTTP, "no receipts"),
    ],
)
def test_a_webhook_secret_is_refused_where_nothing_checks_receipts_with_it(kind: int, why: str) -> None:
    error = refused(connector(kind, webhook_secret=SECRET))
    assert error.field == "connector.webhook_secret"
    assert why in error.description and "leave it empty" in error.description


def test_whatsapp_needs_its_app_secret_to_verify_webhooks() -> None:
    error = refused(connector(K.CONNECTOR_KIND_WHATSAPP_CLOUD, webhook_secret=""))
    assert error.field == "connector.webhook_secret"
    assert error.description == "is required: WhatsApp signs its webhooks with the app secret"


def test_a_sendgrid_connector_may_go_without_its_event_webhook_key() -> None:
    validate_connector(connector(K.CONNECTOR_KIND_SENDGRID, webhook_secret=""), False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: setattr(c, "workspace_id", ""), "connector.workspace_id"),
        (lambda c: setattr(c, "connector_id", "has space"), "connector.connector_id"),
    ],
)
def test_ids_are_checked(change: Callable[[pb.Connector], None], field: str) -> None:
    c = connector(K.CONNECTOR_KIND_SENDGRID)
    change(c)
    assert refused(c).field == field


def test_validation_does_not_change_the_connector() -> None:
    c = connector(K.CONNECTOR_KIND_TWILIO)
    before = c.SerializeToString(deterministic=True)
    validate_connector(c, False)
    assert c.SerializeToString(deterministic=True) == before


def test_a_line_break_after_a_header_name_or_sender_is_refused() -> None:
    """`$` matches before a final line break; every pattern ends at the text's end instead."""
    assert refused(custom(headers={"X-Api-Key\n": "v"})).field == "connector.custom_http.headers"
    assert refused(connector(K.CONNECTOR_KIND_TWILIO, sender="+14155550100\n")).field == "connector.sender"


@pytest.mark.parametrize(
    "saved",
    [
        connector(K.CONNECTOR_KIND_SENDGRID, webhook_secret=""),  # no key saved: the mask stands for nothing
        connector(K.CONNECTOR_KIND_WHATSAPP_CLOUD),  # another kind's secret means something else
    ],
)
def test_a_masked_webhook_secret_with_no_saved_secret_of_its_kind_behind_it_is_refused(saved: pb.Connector) -> None:
    edited = connector(K.CONNECTOR_KIND_SENDGRID, webhook_secret=MASK)
    with pytest.raises(InvalidArgument) as caught:
        keep_masked_secrets(edited, saved)
    assert caught.value.field == "connector.webhook_secret"
    assert "enter it" in caught.value.description


def test_a_masked_webhook_secret_keeps_the_saved_one() -> None:
    saved = connector(K.CONNECTOR_KIND_SENDGRID, webhook_secret=SENDGRID_PUBLIC_KEY)
    edited = connector(K.CONNECTOR_KIND_SENDGRID, webhook_secret=MASK, credentials={"api_key": MASK})
    keep_masked_secrets(edited, saved)
    assert (edited.webhook_secret, edited.credentials["api_key"]) == (SENDGRID_PUBLIC_KEY, SECRET)


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("", "https://api.sendgrid.com/v3/mail/send"),
        ("https://api.sendgrid.com/", "https://api.sendgrid.com/v3/mail/send"),
        ("https://api.sendgrid.com/v3", "https://api.sendgrid.com/v3/mail/send"),
        ("https://api.sendgrid.com/v3/", "https://api.sendgrid.com/v3/mail/send"),
        ("https://proxy.example.com/sendgrid", "https://proxy.example.com/sendgrid/v3/mail/send"),
    ],
)
def test_a_sendgrid_base_url_gets_the_api_version_once(base_url: str, url: str) -> None:
    # As SendGrid's docs write the API's URL (https://api.sendgrid.com/v3), it is not doubled into /v3/v3.
    assert mail_send_url(base_url) == url
    if base_url:
        validate_connector(connector(K.CONNECTOR_KIND_SENDGRID, base_url=base_url), False)


@pytest.mark.parametrize("base_url", ["https://api.sendgrid.com/v3/mail/send", "https://api.sendgrid.com/v3/mail/"])
def test_the_mail_send_url_pasted_whole_is_refused_naming_base_url(base_url: str) -> None:
    error = refused(connector(K.CONNECTOR_KIND_SENDGRID, base_url=base_url))
    assert error.field == "connector.base_url" and "not the Mail Send URL" in error.description
