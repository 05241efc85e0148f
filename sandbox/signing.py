"""Signs receipts the way the providers do, for the sandbox providers and tests.

SendGrid: ECDSA P-256/SHA-256 over timestamp + raw body. Twilio: HMAC-SHA1 over
the URL and the sorted form parameters. WhatsApp: HMAC-SHA256 of the raw body.
SNS (SES events): RSA over the canonical string, SHA1 (v1) or SHA256 (v2), with
a certificate from a throwaway CA the test trusts.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

SNS_NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
SNS_CONFIRMATION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")


class SendGridSigner:
    """Holds an event-webhook key pair; `public_key_b64` is what the connector's webhook_secret holds."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self._key = private_key or ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key_b64(self) -> str:
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self._key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {SENDGRID_SIGNATURE_HEADER: base64.b64encode(signature).decode(), SENDGRID_TIMESTAMP_HEADER: stamp}


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1 of the URL followed by each name+value, sorted by name."""
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    payload = url + "".join(name + value for name, value in sorted(pairs, key=lambda p: (p[0], p[1])))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def whatsapp_signature(app_secret: str, body: bytes) -> str:
    """X-Hub-Signature-256 header value."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def sns_string_to_sign(envelope: Mapping[str, str]) -> bytes:
    keys = SNS_NOTIFICATION_KEYS if envelope.get("Type") == "Notification" else SNS_CONFIRMATION_KEYS
    return "".join(f"{k}\n{envelope[k]}\n" for k in keys if k in envelope).encode()


class SnsSigner:
    """A throwaway CA and an SNS signing certificate issued by it."""

    def __init__(self, cert_host: str = "sns.us-east-1.amazonaws.com") -> None:
        now = datetime.datetime.now(datetime.UTC)
        validity = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        self.ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokensend test SNS CA")])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cert_host)]))
            .issuer_name(ca_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .sign(self.ca_key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, envelope: dict[str, str], cert_url: str, version: int = 1) -> dict[str, str]:
        """The envelope with SignatureVersion, SigningCertURL and Signature added."""
        digest = hashes.SHA1() if version == 1 else hashes.SHA256()  # noqa: S303 - SNS v1 is SHA1 by definition
        signature = self.key.sign(sns_string_to_sign(envelope), padding.PKCS1v15(), digest)
        return {
            **envelope,
            "SignatureVersion": str(version),
            "SigningCertURL": cert_url,
            "Signature": base64.b64encode(signature).decode(),
        }
