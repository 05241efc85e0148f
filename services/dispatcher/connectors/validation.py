"""Validation of a Connector before it is saved; every error names the offending field.

Nothing here echoes a credential: descriptions say what is wrong, never the value.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.serialization import load_der_public_key
from email_validator import EmailNotValidError, validate_email
from jmespath.exceptions import JMESPathError
from pyreqwest.http import Url
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import require
from libs.header_rules import BAD_HEADER_NAME, CLIENT_HEADERS, CONTROL, HEADER_NAME
from libs.http_bodies import NotXml, body_kind, content_type_header, guessed_body_kind, looks_like_json, xml_escape
from libs.jsonpath import compile_expression
from libs.netguard import BlockedAddress, check_literal_host, port_of, split_url
from libs.store import check_id
from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.connectors.custom_http import (
    PLACEHOLDER,
    RECIPIENT_PLACEHOLDERS,
    SUPPORTED_CONTENT_TYPES,
    CompiledRequest,
    content_type_charset,
    referenced_credentials,
)
from services.dispatcher.connectors.twilio import (
    ALPHANUMERIC_SENDER_ID,
    API_VERSION,
    E164,
    MESSAGING_SERVICE_SID,
    SHORT_CODE,
)

K = pb.ConnectorKind
C = common_pb2
FieldPath = Callable[[str], str]

MAX_CREDENTIALS = 50
MAX_VALUE_LENGTH = 4096
MAX_PEM_LENGTH = 64 * 1024
MAX_URL_LENGTH = 2048
MAX_BODY_LENGTH = 16 * 1024
MAX_HEADERS = 50
MAX_SENDER_LENGTH = 256
MAX_RATE_LIMIT = 100_000

CHANNELS: dict[int, frozenset[int]] = {
    K.CONNECTOR_KIND_SENDGRID: frozenset({C.CHANNEL_EMAIL}),
    K.CONNECTOR_KIND_SES: frozenset({C.CHANNEL_EMAIL}),
    K.CONNECTOR_KIND_SMTP: frozenset({C.CHANNEL_EMAIL}),
    K.CONNECTOR_KIND_TWILIO: frozenset({C.CHANNEL_SMS, C.CHANNEL_MMS, C.CHANNEL_RCS}),
    K.CONNECTOR_KIND_WHATSAPP_CLOUD: frozenset({C.CHANNEL_WHATSAPP}),
    K.CONNECTOR_KIND_CUSTOM_HTTP: frozenset({C.CHANNEL_SMS, C.CHANNEL_MMS, C.CHANNEL_RCS, C.CHANNEL_WHATSAPP}),
}

# (required, optional) credential names; CUSTOM_HTTP takes any names its template uses.
CREDENTIALS: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    K.CONNECTOR_KIND_SENDGRID: (("api_key",), ()),
    # sns_topic_arns: the SNS topics whose receipts are accepted (comma-separated); unset, SNS messages are
    # refused (SNS signs for every AWS account). Optional: sending needs none.
    K.CONNECTOR_KIND_SES: (("access_key_id", "secret_access_key", "region"), ("sns_topic_arns",)),
    K.CONNECTOR_KIND_SMTP: ((), ("username", "password", "ca_cert_pem")),
    K.CONNECTOR_KIND_TWILIO: (("account_sid", "auth_token"), ()),
    K.CONNECTOR_KIND_WHATSAPP_CLOUD: (("access_token",), ("verify_token",)),
}

# Keys and tokens a provider issues, sent in every request's Authorization header (SES's secret signs it): each
# is visible ASCII. A space or an invisible character pasted with one would have every message fetched, then
# refused by the provider (or its header refused by the client).
PROVIDER_TOKENS: dict[int, frozenset[str]] = {
    K.CONNECTOR_KIND_SENDGRID: frozenset({"api_key"}),
    K.CONNECTOR_KIND_SES: frozenset({"access_key_id", "secret_access_key"}),
    K.CONNECTOR_KIND_TWILIO: frozenset({"auth_token"}),
    K.CONNECTOR_KIND_WHATSAPP_CLOUD: frozenset({"access_token"}),
}
VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]*\Z")
NOT_AS_ISSUED = (
    "must be as the provider issued it: visible ASCII characters only, no spaces or invisible characters "
    "(often pasted with it)"
)

EMAIL_KINDS = frozenset({K.CONNECTOR_KIND_SENDGRID, K.CONNECTOR_KIND_SES, K.CONNECTOR_KIND_SMTP})
# Email providers whose API takes no address outside ASCII (SendGrid's schema: format `email`).
ASCII_ONLY_SENDERS = {K.CONNECTOR_KIND_SENDGRID: "SendGrid", K.CONNECTOR_KIND_SES: "SES"}

# Kinds whose receipts are checked some other way, or that have none: a webhook secret saved on one
# would check nothing. SendGrid's is its event-webhook key; WhatsApp Cloud's its app secret (required).
NO_WEBHOOK_SECRET: dict[int, str] = {
    K.CONNECTOR_KIND_SES: "SES receipts come through SNS, checked against its certificates",
    K.CONNECTOR_KIND_SMTP: "SMTP sends no receipts",
    K.CONNECTOR_KIND_TWILIO: "Twilio signs its callbacks with credentials['auth_token']",
    K.CONNECTOR_KIND_CUSTOM_HTTP: "custom gateways send no receipts",
}

ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}\Z")
PHONE_NUMBER_ID = re.compile(r"^[0-9]{1,32}\Z")
AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}\Z")
# arn:<partition>:sns:<region>:<12-digit account>:<topic name, 1-256 of letters, digits, '-' and '_'; .fifo>
SNS_TOPIC_ARN = re.compile(
    r"^arn:aws(-[a-z]+)*:sns:[a-z]{2}(-[a-z]+)+-[0-9]{1,2}:[0-9]{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?\Z"
)
CONFIGURATION_SET = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
CREDENTIAL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
NOT_XML_CHARACTERS = "a control character other than tab and line breaks, U+FFFE or U+FFFF"


def _no_line_breaks(value: str) -> bool:
    return "\r" not in value and "\n" not in value


def _blocked(field: str) -> None:
    require(False, field, "points at a private, loopback or link-local address, which is not allowed")


def check_http_url(url: str, field: str, allow_private: bool, *, allow_query: bool) -> None:
    """An https URL (http only with private networks allowed) to a public host, without userinfo."""
    require(len(url) <= MAX_URL_LENGTH, field, f"must be at most {MAX_URL_LENGTH} characters")
    require(not any(c.isspace() for c in url) and not CONTROL.search(url), field, "must not contain whitespace")
    parts = split_url(url)
    require(parts is not None, field, "is not a valid URL")
    allowed = ("https", "http") if allow_private else ("https",)
    require(parts.scheme in allowed, field, "must be an https:// URL")
    require("@" not in parts.netloc, field, "must not carry credentials or placeholders in the host")
    require(bool(parts.hostname), field, "must name a host")
    require(port_of(parts) is not False, field, "has an invalid port")
    if not allow_query:
        require(not parts.query and not parts.fragment, field, "must not have a query or fragment")
    try:
        check_literal_host(url, allow_private)
        check_literal_host(_as_reqwest_reads(url), allow_private)
    except BlockedAddress:
        _blocked(field)


def _as_reqwest_reads(url: str) -> str:
    """The URL's host as the per-message client reads it (message_client.py): to it `0x`, `0x.1` and
    `%31%32%37.1` are IP addresses (0.0.0.0, 0.0.0.1, 127.0.0.1). "" when it sends to no such URL."""
    try:
        host = Url(url).host_str
    except ValueError:
        return ""
    return f"https://{host}/" if host else ""


def parse_smtp_url(url: str) -> tuple[str, int, bool]:
    """(host, port, implicit TLS) of a validated `smtp://host:port` or `smtps://host:port`."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 0, parts.scheme == "smtps"


def check_smtp_url(url: str, field: str, allow_private: bool) -> None:
    require(bool(url), field, "is required: smtp://host:port (STARTTLS when offered) or smtps://host:port")
    require(len(url) <= MAX_URL_LENGTH, field, f"must be at most {MAX_URL_LENGTH} characters")
    require(not any(c.isspace() for c in url) and not CONTROL.search(url), field, "must not contain whitespace")
    parts = split_url(url)
    require(parts is not None, field, "is not a valid URL")
    require(parts.scheme in ("smtp", "smtps"), field, "must be smtp://host:port or smtps://host:port")
    require("@" not in parts.netloc, field, "must not carry credentials; use credentials username and password")
    require(bool(parts.hostname), field, "must name a host")
    port = port_of(parts)
    require(bool(port) and 0 < port < 65536, field, "must give a port (smtp://host:587, smtps://host:465)")
    require(parts.path in ("", "/") and not parts.query and not parts.fragment, field, "must be only host and port")
    try:
        check_literal_host(url, allow_private)
    except BlockedAddress:
        _blocked(field)


def _check_credentials(connector: pb.Connector, f: FieldPath) -> None:
    credentials = dict(connector.credentials)
    require(len(credentials) <= MAX_CREDENTIALS, f("credentials"), f"must have at most {MAX_CREDENTIALS} entries")
    known = CREDENTIALS.get(connector.kind)
    for name, value in credentials.items():
        field = f(f"credentials[{name!r}]")
        require(bool(CREDENTIAL_NAME.match(name)), f("credentials"), "names must be letters, digits and '_'")
        if known is not None:
            required, optional = known
            require(name in required or name in optional, field, "is not a credential of this kind of connector")
        if name == "ca_cert_pem":
            require(len(value) <= MAX_PEM_LENGTH, field, f"must be at most {MAX_PEM_LENGTH} characters")
            try:
                ssl.create_default_context(cadata=value)
            except (ssl.SSLError, ValueError):
                require(False, field, "must be PEM certificates")
            continue
        require(len(value) <= MAX_VALUE_LENGTH, field, f"must be at most {MAX_VALUE_LENGTH} characters")
        require(_no_line_breaks(value), field, "must not contain line breaks")
        require(not CONTROL.search(value), field, "must not contain control characters")
        if name in PROVIDER_TOKENS.get(connector.kind, ()):
            require(bool(VISIBLE_ASCII.match(value)), field, NOT_AS_ISSUED)
    if known is not None:
        for name in known[0]:
            require(bool(credentials.get(name)), f(f"credentials[{name!r}]"), "is required")


def _check_email_sender(sender: str, field: str) -> None:
    require(bool(sender), field, "is required: the from address")
    require(len(sender) <= MAX_SENDER_LENGTH, field, f"must be at most {MAX_SENDER_LENGTH} characters")
    try:
        validate_email(sender, check_deliverability=False)
    except EmailNotValidError as exc:
        require(False, field, f"must be a plain email address (name@domain): {exc}")


# MG and hex digits, too short for a messaging service SID: one cut short when pasted. "MGA" or "MGM Resorts"
# is a sender ID.
CUT_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{10,30}\Z")  # longer than any sender ID: MG2024 is one
TWILIO_SENDERS = (
    "a +E.164 number, a short code (5 or 6 digits), an alphanumeric sender ID (up to 11 letters, digits, "
    "spaces and + - _ &, at least one letter) or MG followed by 32 hex digits (a messaging service)"
)


def twilio_sender_problem(sender: str, channel: int) -> str:
    """What Twilio would refuse in a connector's sender for `channel`, said without the value; "" if none."""
    if not sender:
        return f"is required: {TWILIO_SENDERS}"
    if MESSAGING_SERVICE_SID.match(sender):
        return ""
    if channel == C.CHANNEL_RCS:
        return "RCS is sent through a messaging service: MG followed by 32 hex digits"
    if E164.match(sender) or SHORT_CODE.match(sender):
        return ""
    if CUT_SERVICE_SID.match(sender):
        # Taken as a sender ID, it would be the name every recipient sees.
        return "looks like a messaging service SID cut short: MG followed by 32 hex digits"
    if ALPHANUMERIC_SENDER_ID.match(sender):
        # Twilio refuses MMS from one (error 21212): a sender ID sends SMS only.
        if channel != C.CHANNEL_SMS:
            return "is an alphanumeric sender ID, which sends SMS only: MMS goes from a number, a short code or MG..."
        return ""
    if sender.isascii() and sender.isdigit():
        return f"must be {TWILIO_SENDERS}; a short code has 5 or 6 digits, a number its + and country code"
    if sender.strip() != sender:
        return f"must not start or end with a space; it must be {TWILIO_SENDERS}"
    if sender.startswith("MG"):
        return f"must be {TWILIO_SENDERS}; a messaging service SID is MG followed by 32 hex digits"
    return f"must be {TWILIO_SENDERS}"


def _check_twilio_base_url(url: str, field: str) -> None:
    """The API's root, to which the connector adds the API version (unless it ends the URL) and the
    Messages path: an endpoint's URL pasted whole would have every message refused 404."""
    parts = split_url(url)
    path = parts.path.lower() if parts is not None else ""
    require(
        "accounts" not in path.split("/") and not path.endswith(".json"),
        field,
        f"must be the API's root (https://api.twilio.com, or a proxy's prefix, with or without {API_VERSION}), "
        "not the Messages URL: the connector adds /Accounts/<sid>/Messages.json",
    )


def _check_sendgrid_base_url(url: str, field: str) -> None:
    """The API's root, to which the connector adds /v3 (unless it ends the URL) and /mail/send: the Mail
    Send URL pasted whole would have every message refused 404."""
    parts = split_url(url)
    path = parts.path.lower().rstrip("/") if parts is not None else ""
    require(
        not path.endswith("/mail/send") and not path.endswith("/mail"),
        field,
        "must be the API's root (https://api.sendgrid.com, or a proxy's prefix, with or without /v3), "
        "not the Mail Send URL: the connector adds /mail/send",
    )


def _check_kind_specifics(connector: pb.Connector, f: FieldPath, allow_private: bool) -> None:
    kind = connector.kind
    credentials = dict(connector.credentials)  # a proto map inserts missing keys on [] lookups
    if kind in EMAIL_KINDS:
        _check_email_sender(connector.sender, f("sender"))
    if kind in ASCII_ONLY_SENDERS:
        # Neither has SMTPUTF8: a domain goes in Punycode (`ascii_domain`), a local part cannot.
        require(
            connector.sender.rpartition("@")[0].isascii(),
            f("sender"),
            f"{ASCII_ONLY_SENDERS[kind]} takes only ASCII before the @ (it has no SMTPUTF8); the domain may be Unicode",
        )
    if kind == K.CONNECTOR_KIND_SES:
        require(bool(AWS_REGION.match(credentials["region"])), f("credentials['region']"), "must be an AWS region")
        if credentials.get("sns_topic_arns"):
            # The receipts service accepts SNS messages only from these topics: one mistyped, none is counted.
            topics = [topic.strip() for topic in credentials["sns_topic_arns"].split(",")]
            require(
                all(SNS_TOPIC_ARN.match(topic) for topic in topics),
                f("credentials['sns_topic_arns']"),
                "must be SNS topic ARNs (arn:aws:sns:<region>:<account>:<topic>), separated by commas",
            )
    if kind == K.CONNECTOR_KIND_SMTP:
        has_user, has_password = bool(credentials.get("username")), bool(credentials.get("password"))
        require(has_user or not has_password, f("credentials['username']"), "is required with a password")
        require(has_password or not has_user, f("credentials['password']"), "is required with a username")
    if kind == K.CONNECTOR_KIND_TWILIO:
        require(
            bool(ACCOUNT_SID.match(credentials["account_sid"])),
            f("credentials['account_sid']"),
            "must be AC followed by 32 hex digits",
        )
        require(not (why := twilio_sender_problem(connector.sender, connector.channel)), f("sender"), why)
    if kind == K.CONNECTOR_KIND_WHATSAPP_CLOUD:
        require(bool(connector.sender), f("sender"), "is required: the WhatsApp phone-number ID")
        require(bool(PHONE_NUMBER_ID.match(connector.sender)), f("sender"), "must be the numeric phone-number ID")
    if kind == K.CONNECTOR_KIND_SENDGRID and connector.webhook_secret:
        try:
            load_der_public_key(base64.b64decode(connector.webhook_secret, validate=True))
        except (binascii.Error, ValueError, TypeError):
            require(False, f("webhook_secret"), "must be the event webhook's public key (base64 DER)")

    if kind == K.CONNECTOR_KIND_SMTP:
        check_smtp_url(connector.base_url, f("base_url"), allow_private)
    elif connector.base_url:
        check_http_url(connector.base_url, f("base_url"), allow_private, allow_query=False)
        if kind == K.CONNECTOR_KIND_TWILIO:
            _check_twilio_base_url(connector.base_url, f("base_url"))
        elif kind == K.CONNECTOR_KIND_SENDGRID:
            _check_sendgrid_base_url(connector.base_url, f("base_url"))


def _check_custom_http(connector: pb.Connector, f: FieldPath, allow_private: bool) -> None:
    require(connector.HasField("custom_http"), f("custom_http"), "is required for CUSTOM_HTTP")
    template = connector.custom_http
    g = lambda name: f(f"custom_http.{name}")  # noqa: E731 - field path helper
    method = template.method.upper()
    require(method in ("GET", "POST"), g("method"), "must be GET or POST")
    require(bool(template.url), g("url"), "is required")
    probe = PLACEHOLDER.sub("x", template.url)
    if template.url.startswith("/"):
        require(bool(connector.base_url), g("url"), "a path needs base_url; or give an absolute https:// URL")
        check_http_url(connector.base_url.rstrip("/") + probe, g("url"), allow_private, allow_query=True)
    else:
        parts = split_url(template.url)
        require(parts is not None, g("url"), "is not a valid URL")
        require("@" not in parts.netloc, g("url"), "the host must be fixed: no placeholders or credentials")
        check_http_url(probe, g("url"), allow_private, allow_query=True)
    require(len(template.headers) <= MAX_HEADERS, g("headers"), f"must have at most {MAX_HEADERS} entries")
    require(
        len({name.lower() for name in template.headers}) == len(template.headers),
        g("headers"),
        "names a header twice: header names are the same whatever their case",
    )
    for name, value in template.headers.items():
        require(bool(HEADER_NAME.match(name)), g("headers"), BAD_HEADER_NAME)
        field = g(f"headers[{name!r}]")
        require(
            name.lower() not in CLIENT_HEADERS, field, "is written by the HTTP client from the request: leave it out"
        )
        require(len(value) <= MAX_VALUE_LENGTH, field, f"must be at most {MAX_VALUE_LENGTH} characters")
        require(_no_line_breaks(value), field, "must not contain line breaks")
        require(not CONTROL.search(value), field, "must not contain control characters")  # no request could carry it
        # A header is one line and a message can be several (its text, or a recipient's value in it):
        # every multi-line SMS would fail, after its recipient's contact was fetched.
        require(
            not any(match.group(2) == "text" for match in PLACEHOLDER.finditer(value)),
            field,
            "must not use @text: a message can be several lines and a header is one; put @text in the body or the url",
        )
    require(len(template.body) <= MAX_BODY_LENGTH, g("body"), f"must be at most {MAX_BODY_LENGTH} characters")
    if method == "GET":
        require(not template.body, g("body"), "a GET request has no body; use POST")
    declared = content_type_header(template.headers)
    if template.body and declared is not None:
        # The body's placeholders are escaped for the type it declares: one whose escaping is not known
        # would reach the gateway escaped for another.
        field = g(f"headers[{declared[0]!r}]")
        require(
            body_kind(declared[1]) is not None,
            field,
            f"is not a type the body's placeholders can be escaped for; supported: {SUPPORTED_CONTENT_TYPES}",
        )
        require(
            content_type_charset(declared[1]) in ("", "utf-8", "utf8"),
            field,
            "names a charset other than UTF-8, the body's encoding: use charset=utf-8 or none",
        )
    if template.message_id_path:
        try:
            compile_expression(template.message_id_path)
        except JMESPathError:
            require(False, g("message_id_path"), "is not a valid JMESPath expression")
    parts = [("url", template.url), ("body", template.body)]
    parts += [(f"headers[{name!r}]", value) for name, value in template.headers.items()]
    # Without the recipient's number the gateway could not tell where any message of a campaign goes.
    require(
        any(match.group(2) in RECIPIENT_PLACEHOLDERS for _, text in parts for match in PLACEHOLDER.finditer(text)),
        f("custom_http"),
        "must use @to or @to_digits (the recipient's number) in its url, a header or the body",
    )
    for where, text in parts:
        for name in sorted(referenced_credentials(text)):
            require(name in dict(connector.credentials), g(where), f"uses @credentials.{name}, which is not set")
        if "@sender" in text:
            require(bool(connector.sender), f("sender"), f"is required: custom_http.{where} uses @sender")
    require(len(connector.sender) <= MAX_SENDER_LENGTH, f("sender"), f"must be at most {MAX_SENDER_LENGTH} characters")
    require(not CONTROL.search(connector.sender), f("sender"), "must not contain control characters")
    _check_xml_body_values(connector, f)
    _check_json_body(connector, f)
    if connector.base_url:
        check_http_url(connector.base_url, f("base_url"), allow_private, allow_query=False)


def _check_xml_body_values(connector: pb.Connector, f: FieldPath) -> None:
    """The sender and the credentials an XML body carries, which are the same in every message: one XML
    cannot carry would fail each message at send time, after its contact was fetched. Named by field, never
    by value (a credential is a secret)."""
    template = connector.custom_http
    if template.method.upper() == "GET" or not template.body:
        return
    declared = content_type_header(template.headers)
    # As the request is built (custom_http.CompiledRequest): the declared type, else the body's first character.
    if ((body_kind(declared[1]) if declared else None) or guessed_body_kind(template.body)) != "xml":
        return
    credentials = dict(connector.credentials)
    for match in PLACEHOLDER.finditer(template.body):
        name = match.group(1)
        if name:
            field, value = f(f"credentials[{name!r}]"), credentials.get(name, "")
        elif match.group(2) == "sender":
            field, value = f("sender"), connector.sender
        else:
            continue
        placeholder = match.group(0)
        try:
            xml_escape(value)  # a CDATA section carries no more than text does
        except NotXml:
            require(
                False,
                field,
                f"holds a character XML 1.0 cannot carry ({NOT_XML_CHARACTERS}), and custom_http.body, which is "
                f"XML, uses {placeholder}: no message could be sent",
            )


# A message as a send fills it into a template: what a JSON body is checked with.
SAMPLE_MESSAGE = OutboundMessage(
    message_id="0123456789abcdef" * 2,
    anonymous_id="sample",
    campaign_id="sample",
    campaign_instance_id="sample",
    to="+15005550006",
    sms_body="Hello",
)


def _check_json_body(connector: pb.Connector, f: FieldPath) -> None:
    """A JSON body must be JSON once a message is filled in (its placeholders are escaped as the inside of a
    string): otherwise every message would reach the gateway malformed, after its contact was fetched. The
    parser's reason is given, never the body, which may hold a credential. Only a body that opens as JSON
    (`{` or `[`) is parsed; one of another shape is left to the gateway."""
    template = connector.custom_http
    if template.method.upper() == "GET" or not looks_like_json(template.body):
        return
    declared = content_type_header(template.headers)
    if ((body_kind(declared[1]) if declared else None) or guessed_body_kind(template.body)) != "json":
        return
    request = CompiledRequest(template, sender=connector.sender, credentials=dict(connector.credentials))
    try:
        orjson.loads(request.render(SAMPLE_MESSAGE).body or b"")
    except orjson.JSONDecodeError as exc:
        reason = exc.msg.split(":", 1)[0]  # its position would be in the filled-in body, not the template
        require(
            False,
            f("custom_http.body"),
            f'is not JSON once a message is filled in ({reason}); placeholders go inside strings ("@to"), '
            "except a credential that is a JSON value itself",
        )


def validate_connector(connector: pb.Connector, allow_private: bool, prefix: str = "connector") -> None:
    """Raises InvalidArgument naming the first bad field of `connector`."""
    f = lambda name: f"{prefix}.{name}"  # noqa: E731 - field path helper
    check_id(connector.workspace_id, f("workspace_id"))
    check_id(connector.connector_id, f("connector_id"))
    kind = connector.kind
    require(kind in CHANNELS, f("kind"), "is required: SENDGRID, SES, SMTP, TWILIO, WHATSAPP_CLOUD or CUSTOM_HTTP")
    require(connector.channel != C.CHANNEL_UNSPECIFIED, f("channel"), "is required")
    if kind == K.CONNECTOR_KIND_TWILIO and connector.channel == C.CHANNEL_WHATSAPP:
        require(False, f("channel"), "WhatsApp through Twilio is not supported; use a WHATSAPP_CLOUD connector")
    allowed = CHANNELS[kind]
    names = ", ".join(sorted(C.Channel.Name(c) for c in allowed))
    require(connector.channel in allowed, f("channel"), f"{K.Name(kind)} sends only {names}")
    _check_credentials(connector, f)
    require(
        connector.rate_limit_per_second <= MAX_RATE_LIMIT,
        f("rate_limit_per_second"),
        f"must be at most {MAX_RATE_LIMIT} (0 means no limit)",
    )
    require(len(connector.webhook_secret) <= MAX_VALUE_LENGTH, f("webhook_secret"), "is too long")
    require(_no_line_breaks(connector.webhook_secret), f("webhook_secret"), "must not contain line breaks")
    if kind in NO_WEBHOOK_SECRET:
        require(
            not connector.webhook_secret,
            f("webhook_secret"),
            f"{K.Name(kind)} connectors have none: {NO_WEBHOOK_SECRET[kind]}; leave it empty",
        )
    if kind == K.CONNECTOR_KIND_WHATSAPP_CLOUD:
        # The key of every webhook's signature: one with a pasted space would match none of them.
        require(bool(VISIBLE_ASCII.match(connector.webhook_secret)), f("webhook_secret"), NOT_AS_ISSUED)
        # Without it every webhook is refused: no delivery receipt, no STOP reply would ever count.
        require(
            bool(connector.webhook_secret),
            f("webhook_secret"),
            "is required: WhatsApp signs its webhooks with the app secret",
        )
    if connector.configuration_set:
        require(kind == K.CONNECTOR_KIND_SES, f("configuration_set"), "applies only to SES connectors")
        require(
            bool(CONFIGURATION_SET.match(connector.configuration_set)),
            f("configuration_set"),
            "must be 1-64 letters, digits, '_' or '-'",
        )
    if kind == K.CONNECTOR_KIND_CUSTOM_HTTP:
        _check_custom_http(connector, f, allow_private)
    else:
        require(not connector.HasField("custom_http"), f("custom_http"), "applies only to CUSTOM_HTTP connectors")
        _check_kind_specifics(connector, f, allow_private)
