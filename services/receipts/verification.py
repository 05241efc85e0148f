"""Signature checks, one per provider, as each provider documents them.

- SendGrid: ECDSA P-256 / SHA-256 over the timestamp header + the raw body;
  timestamps outside a tolerance are refused (replays).
- Twilio: base64 HMAC-SHA1 over the URL as Twilio saw it + the form
  parameters sorted by name and value; tried with and without the default port, as Twilio's own
  validator does; JSON bodies are bound through the `bodySHA256` query value.
- WhatsApp: `X-Hub-Signature-256` = sha256=<hex HMAC-SHA256(app secret, body)>.
- SNS (SES events): RSA PKCS#1 v1.5 with SHA1 (v1) or SHA256 (v2) over the
  canonical string; the certificate URL must be https on an SNS host and end
  in `.pem` (the certificate itself is fetched by `sns.py`); a message whose
  signed Timestamp is older than the dedupe window is refused (a replay).

Every comparison is constant-time. Errors say what is wrong, never what was sent.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from urllib.parse import SplitResult, parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from libs.netguard import port_of, split_url
from services.receipts.errors import MalformedReceipt, SignatureInvalid, SignatureMissing

SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
WHATSAPP_SIGNATURE_HEADER = "X-Hub-Signature-256"

SNS_NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
SNS_CONFIRMATION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
SNS_TYPES = frozenset({"Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"})


def _utf8(text: str) -> bytes:
    """Text as bytes, whatever it holds: a header aiohttp could not decode (or JSON's lone surrogate
    escapes) keeps surrogates, which then fail to match rather than fail to encode."""
    return text.encode("utf-8", "surrogatepass")


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureInvalid("signature is not valid base64") from None


# --- SendGrid -------------------------------------------------------------------------------


def sendgrid_public_key(webhook_secret: str) -> ec.EllipticCurvePublicKey:
    """The connector's event-webhook key (base64 DER SPKI); a broken one verifies nothing."""
    try:
        key = load_der_public_key(base64.b64decode(webhook_secret.strip(), validate=True))
    except (binascii.Error, ValueError, TypeError):
        raise SignatureInvalid("the connector's webhook key is not a valid public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SignatureInvalid("the connector's webhook key is not an ECDSA P-256 key")
    return key


def verify_sendgrid(
    webhook_secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance_seconds: float
) -> None:
    signature = headers.get(SENDGRID_SIGNATURE_HEADER, "")
    timestamp = headers.get(SENDGRID_TIMESTAMP_HEADER, "")
    if not signature or not timestamp:
        raise SignatureMissing("SendGrid signature or timestamp header is missing")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp.strip()):
        raise SignatureInvalid("SendGrid timestamp is not a Unix time")
    if tolerance_seconds > 0 and abs(now - int(timestamp)) > tolerance_seconds:
        raise SignatureInvalid("SendGrid timestamp is outside the allowed window")
    key = sendgrid_public_key(webhook_secret)
    try:
        key.verify(_b64decode(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid("SendGrid signature does not verify") from None


# --- Twilio ---------------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's algorithm: the URL, then name+value for each parameter sorted by name, then value.

    A repeated parameter contributes every value (sorted), as Twilio's own validator does.
    """
    payload = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), _utf8(payload), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _posted_url(url: str) -> SplitResult:
    """The parts of the URL Twilio posted to, as the caller gave it."""
    parts = split_url(url)
    if parts is None:
        raise MalformedReceipt("url", "is not a valid URL")
    return parts


def twilio_url_variants(url: str) -> tuple[str, str]:
    """The URL with the scheme's default port added (when none) and with any port removed."""
    parts = _posted_url(url)
    port = port_of(parts)
    if port is False:
        raise MalformedReceipt("url", "has an invalid port")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    prefix = userinfo + "@" if userinfo else ""
    if hostport.startswith("["):  # IPv6 literal
        host = hostport[: hostport.index("]") + 1] if "]" in hostport else hostport
    else:
        host = hostport.split(":", 1)[0]
    default_port = 443 if parts.scheme == "https" else 80
    with_port = url if port else parts._replace(netloc=f"{prefix}{host}:{default_port}").geturl()
    without_port = parts._replace(netloc=prefix + host).geturl() if port else url
    return with_port, without_port


def twilio_body_hash(url: str) -> str | None:
    """The `bodySHA256` query value Twilio adds when it posts a JSON body, if any."""
    values = parse_qs(_posted_url(url).query, keep_blank_values=True).get("bodySHA256")
    return values[0] if values else None


def verify_twilio(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], signature: str, body: bytes | None = None
) -> None:
    """Form callbacks pass their parameters; JSON callbacks pass `body`, bound by `bodySHA256` in the URL."""
    if not signature:
        raise SignatureMissing("X-Twilio-Signature header is missing")
    if not auth_token:
        raise SignatureInvalid("the connector has no auth_token to verify Twilio signatures")
    pairs = list(params)
    expected_body_hash = twilio_body_hash(url)
    if body is not None:
        if expected_body_hash is None:
            raise SignatureInvalid("a JSON body needs bodySHA256 in the URL")
        if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), expected_body_hash.lower()):
            raise SignatureInvalid("bodySHA256 does not match the body")
        pairs = []
    given = _utf8(signature.strip())
    if not any(
        hmac.compare_digest(twilio_signature(auth_token, candidate, pairs).encode(), given)
        for candidate in twilio_url_variants(url)
    ):
        raise SignatureInvalid("X-Twilio-Signature does not verify")


# --- WhatsApp -------------------------------------------------------------------------------


def whatsapp_signature(app_secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def verify_whatsapp(app_secret: str, headers: Mapping[str, str], body: bytes) -> None:
    given = headers.get(WHATSAPP_SIGNATURE_HEADER, "").strip()
    if not given:
        raise SignatureMissing("X-Hub-Signature-256 header is missing")
    if not app_secret:
        raise SignatureInvalid("the connector has no app secret to verify WhatsApp signatures")
    if not hmac.compare_digest(whatsapp_signature(app_secret, body).encode(), _utf8(given.lower())):
        raise SignatureInvalid("X-Hub-Signature-256 does not verify")


def verify_token_matches(expected: str, given: str) -> bool:
    """The WhatsApp subscription handshake's verify token, compared in constant time."""
    return bool(expected) and hmac.compare_digest(_utf8(expected), _utf8(given))


# --- SNS ------------------------------------------------------------------------------------


def check_sns_url(url: object, host_pattern: re.Pattern[str], *, certificate: bool, field: str) -> str:
    """An SNS URL we may fetch: https, no user info, host[:port] matching the pattern, `.pem` for certificates."""
    if url is not None and not isinstance(url, str):  # a JSON list, object or number: not a missing field
        raise MalformedReceipt(field, "must be a string (a URL)")
    if not url:
        if certificate:
            raise SignatureMissing(f"{field} is missing")
        raise MalformedReceipt(field, "is required")
    parts = split_url(url)
    if parts is None:
        raise SignatureInvalid(f"{field} is not a valid URL")
    port = port_of(parts)
    if port is False:
        raise SignatureInvalid(f"{field} has an invalid port")
    host = (parts.hostname or "").lower()
    authority = f"{host}:{port}" if port is not None else host
    if parts.scheme.lower() != "https" or parts.username is not None or parts.password is not None:
        raise SignatureInvalid(f"{field} must be an https URL without credentials")
    if not host or not host_pattern.fullmatch(authority):
        raise SignatureInvalid(f"{field} is not on an SNS host")
    if certificate and not parts.path.endswith(".pem"):
        raise SignatureInvalid(f"{field} must point at a .pem certificate")
    return url


def sns_string_to_sign(envelope: Mapping[str, object]) -> bytes:
    keys = SNS_NOTIFICATION_KEYS if envelope.get("Type") == "Notification" else SNS_CONFIRMATION_KEYS
    text = "".join(f"{key}\n{envelope[key]}\n" for key in keys if isinstance(envelope.get(key), str))
    return _utf8(text)  # SNS signs UTF-8: a lone surrogate makes it not verify


def sns_signature_fields(envelope: Mapping[str, object]) -> tuple[int, str]:
    """The signature version and value; 401 when missing, 403 for a version we do not know."""
    version, signature = envelope.get("SignatureVersion"), envelope.get("Signature")
    if not isinstance(signature, str) or not signature or version is None:
        raise SignatureMissing("SNS Signature or SignatureVersion is missing")
    if str(version) not in ("1", "2"):
        raise SignatureInvalid("SNS SignatureVersion must be 1 or 2")
    return int(str(version)), signature


def verify_sns_signature(envelope: Mapping[str, object], public_key: rsa.RSAPublicKey) -> None:
    version, signature = sns_signature_fields(envelope)
    digest = hashes.SHA1() if version == 1 else hashes.SHA256()  # noqa: S303 - SNS v1 is SHA1 by definition
    try:
        public_key.verify(_b64decode(signature), sns_string_to_sign(envelope), padding.PKCS1v15(), digest)
    except InvalidSignature:
        raise SignatureInvalid("SNS signature does not verify") from None


def sns_sent_at(envelope: Mapping[str, object]) -> float:
    """The envelope's signed Timestamp (ISO 8601, as SNS writes it) in Unix seconds."""
    text = envelope.get("Timestamp")
    sent = None
    if isinstance(text, str) and 0 < len(text) <= 40:
        try:
            sent = datetime.datetime.fromisoformat(text.strip())
        except ValueError:
            sent = None
    if sent is None:
        raise MalformedReceipt("Timestamp", "must be the ISO 8601 time SNS signed")
    if sent.tzinfo is None:
        sent = sent.replace(tzinfo=datetime.UTC)
    return sent.timestamp()


def check_sns_age(envelope: Mapping[str, object], *, now: float, max_age_seconds: float) -> None:
    """SNS documents no replay window, but signs its Timestamp and stops retrying within an hour: a
    message older than the dedupe window is a replay no marker remembers any more, so it is refused."""
    if now - sns_sent_at(envelope) > max_age_seconds:
        raise SignatureInvalid("SNS message is older than the replay window (TOKENSEND_RECEIPT_DEDUPE_TTL_SECONDS)")
