"""Signature checks against the providers' official vectors and our signers."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.signing import SendGridSigner, SnsSigner, sns_string_to_sign, twilio_signature, whatsapp_signature
from services.receipts.errors import MalformedReceipt, SignatureInvalid, SignatureMissing
from services.receipts.verification import (
    check_sns_url,
    sendgrid_public_key,
    twilio_body_hash,
    twilio_url_variants,
    verify_sendgrid,
    verify_sns_signature,
    verify_token_matches,
    verify_twilio,
    verify_whatsapp,
)
from services.receipts.verification import sns_string_to_sign as our_sns_string_to_sign
from services.receipts.verification import twilio_signature as our_twilio_signature

VECTORS = Path("/work/shared/providers/vectors")
SNS_HOSTS = re.compile(r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")


@pytest.fixture(scope="module")
def sendgrid_vector() -> tuple[dict, bytes]:
    vector = json.loads((VECTORS / "sendgrid_event_signed_example.json").read_text())
    return vector, (VECTORS / vector["raw_body_file"]).read_bytes()


@pytest.fixture(scope="module")
def twilio_vector() -> dict:
    return json.loads((VECTORS / "twilio_signature_test_vector.json").read_text())


# --- SendGrid -------------------------------------------------------------------------------


def test_sendgrid_official_vector_verifies(sendgrid_vector):
    vector, body = sendgrid_vector
    assert body.endswith(b"\r\n")
    stamp = int(vector["headers"]["X-Twilio-Email-Event-Webhook-Timestamp"])
    verify_sendgrid(
        vector["public_key_base64_der_spki_p256"], vector["headers"], body, now=stamp, tolerance_seconds=600
    )


def test_sendgrid_official_vector_fails_when_anything_changes(sendgrid_vector):
    vector, body = sendgrid_vector
    key, headers = vector["public_key_base64_der_spki_p256"], vector["headers"]
    stamp = int(headers["X-Twilio-Email-Event-Webhook-Timestamp"])
    with pytest.raises(SignatureInvalid):
        verify_sendgrid(key, headers, body.rstrip(b"\r\n"), now=stamp, tolerance_seconds=600)
    with pytest.raises(SignatureInvalid):
        later = {**headers, "X-Twilio-Email-Event-Webhook-Timestamp": str(stamp + 1)}
        verify_sendgrid(key, later, body, now=stamp, tolerance_seconds=600)
    with pytest.raises(SignatureInvalid):
        verify_sendgrid(SendGridSigner().public_key_b64, headers, body, now=stamp, tolerance_seconds=600)


def test_sendgrid_stale_and_future_timestamps_are_refused(sendgrid_vector):
    vector, body = sendgrid_vector
    key, headers = vector["public_key_base64_der_spki_p256"], vector["headers"]
    stamp = int(headers["X-Twilio-Email-Event-Webhook-Timestamp"])
    for now in (stamp + 601, stamp - 601):
        with pytest.raises(SignatureInvalid, match="window"):
            verify_sendgrid(key, headers, body, now=now, tolerance_seconds=600)
    verify_sendgrid(key, headers, body, now=stamp + 599, tolerance_seconds=600)


def test_sendgrid_missing_headers_are_unauthenticated(sendgrid_vector):
    vector, body = sendgrid_vector
    key = vector["public_key_base64_der_spki_p256"]
    for drop in vector["headers"]:
        headers = {k: v for k, v in vector["headers"].items() if k != drop}
        with pytest.raises(SignatureMissing):
            verify_sendgrid(key, headers, body, now=0, tolerance_seconds=0)


def test_sendgrid_signer_round_trip_and_bad_keys():
    signer = SendGridSigner()
    body = b'[{"event":"delivered"}]'
    headers = signer.headers(body, timestamp=1_700_000_000)
    verify_sendgrid(signer.public_key_b64, headers, body, now=1_700_000_000, tolerance_seconds=600)
    with pytest.raises(SignatureInvalid):
        verify_sendgrid(
            signer.public_key_b64,
            {**headers, "X-Twilio-Email-Event-Webhook-Signature": "!!"},
            body,
            now=1_700_000_000,
            tolerance_seconds=600,
        )  # noqa: E501
    with pytest.raises(SignatureInvalid):
        sendgrid_public_key("not base64 at all")
    p384 = SendGridSigner(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(SignatureInvalid, match="P-256"):
        sendgrid_public_key(p384.public_key_b64)


# --- Twilio ---------------------------------------------------------------------------------


def test_twilio_official_vector(twilio_vector):
    v = twilio_vector
    params = list(v["params"].items())
    assert our_twilio_signature(v["auth_token"], v["url"], params) == v["expected_X-Twilio-Signature"]
    verify_twilio(v["auth_token"], v["url"], params, v["expected_X-Twilio-Signature"])
    with pytest.raises(SignatureInvalid):
        verify_twilio(v["auth_token"], v["url"], [*params, ("Extra", "1")], v["expected_X-Twilio-Signature"])
    with pytest.raises(SignatureInvalid):
        verify_twilio("54321", v["url"], params, v["expected_X-Twilio-Signature"])


def test_twilio_repeated_parameters(twilio_vector):
    case = twilio_vector["duplicate_params_case"]
    pairs = [tuple(p) for p in case["params_multi"]]
    verify_twilio(twilio_vector["auth_token"], twilio_vector["url"], pairs, case["expected"])
    # Order of arrival does not matter: names and values are sorted.
    verify_twilio(twilio_vector["auth_token"], twilio_vector["url"], list(reversed(pairs)), case["expected"])


def test_twilio_json_body_with_body_sha256(twilio_vector):
    case = twilio_vector["json_body_case"]
    body = case["body"].encode()
    verify_twilio(twilio_vector["auth_token"], case["url"], [], case["expected"], body=body)
    with pytest.raises(SignatureInvalid, match="bodySHA256"):
        verify_twilio(twilio_vector["auth_token"], case["url"], [], case["expected"], body=body + b" ")
    with pytest.raises(SignatureInvalid):
        verify_twilio(twilio_vector["auth_token"], twilio_vector["url"], [], case["expected"], body=body)


@pytest.mark.parametrize(
    ("url", "variant"),
    [
        # Twilio's validator tests: a port in the URL is also tried without it, a URL without one with the default.
        ("https://mycompany.com:1234/myapp.php?foo=1&bar=2", "https_with_:1234_removed_validates_same"),
        ("https://mycompany.com/myapp.php?foo=1&bar=2", "https_with_:443_added"),
        ("http://mycompany.com/myapp.php?foo=1&bar=2", "http_with_:80_added"),
        ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", "http_with_:1234"),
    ],
)
def test_twilio_port_variants(twilio_vector, url, variant):
    signature = twilio_vector["port_variants"][variant]
    verify_twilio(twilio_vector["auth_token"], url, list(twilio_vector["params"].items()), signature)


def test_twilio_port_variant_signatures_are_what_they_say(twilio_vector):
    token, params = twilio_vector["auth_token"], list(twilio_vector["params"].items())
    variants = twilio_vector["port_variants"]
    assert (
        our_twilio_signature(token, "https://mycompany.com:443/myapp.php?foo=1&bar=2", params)
        == variants["https_with_:443_added"]
    )
    assert (
        our_twilio_signature(token, "http://mycompany.com:80/myapp.php?foo=1&bar=2", params)
        == variants["http_with_:80_added"]
    )
    assert twilio_url_variants("https://a.example/x?y=1") == ("https://a.example:443/x?y=1", "https://a.example/x?y=1")
    assert twilio_url_variants("http://u:p@a.example:8080/x") == (
        "http://u:p@a.example:8080/x",
        "http://u:p@a.example/x",
    )
    for malformed in ("https://a.example:99999/x", "https://[a.example/x"):
        with pytest.raises(MalformedReceipt):
            twilio_url_variants(malformed)
    with pytest.raises(MalformedReceipt):
        twilio_body_hash("https://[a.example/x?bodySHA256=abc")


def test_twilio_signature_agrees_with_the_sandbox_signer(twilio_vector):
    params = {"MessageSid": "SM" + "a" * 32, "MessageStatus": "delivered", "To": "+15005550006"}
    url = "https://receipts.example/webhooks/twilio/ws/c?message_id=abc"
    assert our_twilio_signature("tok", url, params.items()) == twilio_signature("tok", url, params)


def test_twilio_missing_signature_and_token():
    with pytest.raises(SignatureMissing):
        verify_twilio("token", "https://a.example/", [], "")
    with pytest.raises(SignatureInvalid):
        verify_twilio("", "https://a.example/", [], "c2ln")


# --- WhatsApp -------------------------------------------------------------------------------


def test_whatsapp_signature():
    body = b'{"object":"whatsapp_business_account","entry":[]}'
    header = whatsapp_signature("app-secret", body)
    verify_whatsapp("app-secret", {"X-Hub-Signature-256": header}, body)
    verify_whatsapp("app-secret", {"X-Hub-Signature-256": header.upper().replace("SHA256=", "sha256=")}, body)
    with pytest.raises(SignatureInvalid):
        verify_whatsapp("other-secret", {"X-Hub-Signature-256": header}, body)
    with pytest.raises(SignatureInvalid):
        verify_whatsapp("app-secret", {"X-Hub-Signature-256": header}, body + b" ")
    with pytest.raises(SignatureInvalid):
        verify_whatsapp("app-secret", {"X-Hub-Signature-256": header.removeprefix("sha256=")}, body)
    with pytest.raises(SignatureMissing):
        verify_whatsapp("app-secret", {}, body)


def test_verify_token_compare():
    assert verify_token_matches("t0ken", "t0ken")
    assert not verify_token_matches("t0ken", "t0ken2")
    assert not verify_token_matches("", "")


# --- SNS ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-abc.pem",
        "https://evil.example/sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com@evil.example/x.pem",
        "https://user@sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.txt",
        "https://sns.us-east-1.amazonaws.com:8443/x.pem",
        "https://s3.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com:notaport/x.pem",
        "https://[sns.us-east-1.amazonaws.com/x.pem",  # urlsplit refuses it
    ],
)
def test_sns_certificate_url_refused(url):
    with pytest.raises(SignatureInvalid):
        check_sns_url(url, SNS_HOSTS, certificate=True, field="SigningCertURL")


def test_sns_urls_accepted():
    for url in (
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://SNS.eu-west-2.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
    ):
        assert check_sns_url(url, SNS_HOSTS, certificate=True, field="SigningCertURL") == url
    subscribe = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn&Token=t"
    assert check_sns_url(subscribe, SNS_HOSTS, certificate=False, field="SubscribeURL") == subscribe
    with pytest.raises(SignatureMissing):
        check_sns_url("", SNS_HOSTS, certificate=True, field="SigningCertURL")
    with pytest.raises(MalformedReceipt):
        check_sns_url(None, SNS_HOSTS, certificate=False, field="SubscribeURL")


@pytest.mark.parametrize("field", ["SigningCertURL", "SubscribeURL"])
@pytest.mark.parametrize("url", [["https://sns.us-east-1.amazonaws.com/x.pem"], {"url": "x"}, 7, True])
def test_an_sns_url_that_is_not_a_string_is_malformed_not_missing(field, url):
    with pytest.raises(MalformedReceipt, match=f"^{field}: must be a string") as refused:
        check_sns_url(url, SNS_HOSTS, certificate=field == "SigningCertURL", field=field)
    assert "missing" not in str(refused.value) and "required" not in str(refused.value)


@pytest.fixture(scope="module")
def sns_signer() -> SnsSigner:
    return SnsSigner()


@pytest.mark.parametrize("version", [1, 2])
def test_sns_signature_versions(sns_signer, version):
    envelope = {
        "Type": "Notification",
        "MessageId": "m-1",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:ses-events",
        "Subject": "Amazon SES Email Event Notification",
        "Message": '{"eventType":"Delivery"}',
        "Timestamp": "2024-01-01T00:00:00.000Z",
    }
    signed = sns_signer.sign(envelope, "https://sns.us-east-1.amazonaws.com/x.pem", version)
    assert our_sns_string_to_sign(signed) == sns_string_to_sign(signed)
    verify_sns_signature(signed, sns_signer.cert.public_key())
    with pytest.raises(SignatureInvalid):
        verify_sns_signature({**signed, "Message": '{"eventType":"Bounce"}'}, sns_signer.cert.public_key())
    with pytest.raises(SignatureInvalid):
        verify_sns_signature({**signed, "SignatureVersion": "1" if version == 2 else "2"}, sns_signer.cert.public_key())
    with pytest.raises(SignatureInvalid):
        verify_sns_signature({**signed, "SignatureVersion": "3"}, sns_signer.cert.public_key())
    with pytest.raises(SignatureMissing):
        verify_sns_signature({k: v for k, v in signed.items() if k != "Signature"}, sns_signer.cert.public_key())
    with pytest.raises(SignatureInvalid):
        verify_sns_signature(
            {**signed, "Signature": base64.b64encode(b"x" * 256).decode()}, sns_signer.cert.public_key()
        )


def test_sns_confirmation_string_to_sign(sns_signer):
    envelope = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "m-2",
        "Token": "tok",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:ses-events",
        "Message": "You have chosen to subscribe",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
        "Timestamp": "2024-01-01T00:00:00.000Z",
    }
    signed = sns_signer.sign(envelope, "https://sns.us-east-1.amazonaws.com/x.pem", 2)
    assert our_sns_string_to_sign(signed) == sns_string_to_sign(signed)
    verify_sns_signature(signed, sns_signer.cert.public_key())
