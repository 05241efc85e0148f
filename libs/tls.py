"""TLS and mTLS credentials for the gRPC servers and the dispatcher's channel to the resolver, and
the receipts service's HTTPS for webhooks.

Files are PEM, checked when the settings are read (a missing file, one without a certificate or
key, an encrypted key or a key that is not its certificate's stops the service naming the setting),
then read once at startup. A server with a client CA requires a
client certificate issued by it (mTLS); authorisation still comes from bearer
tokens (`libs.auth`): a certificate proves the caller is one of ours, the token
says which workspaces it may touch.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _pem(path: str) -> bytes:
    try:
        return _read(path)
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or type(exc).__name__})") from None


def checked_certificates(path: str) -> list[x509.Certificate]:
    """The PEM certificates in `path`; ValueError saying what is wrong (never quoting the file)."""
    data = _pem(path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("holds no PEM certificate") from None


def _public_der_of_key_file(path: str) -> bytes:
    """The public key (DER) of the unencrypted PEM private key in `path`; ValueError otherwise."""
    data = _pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("holds an encrypted private key; give it unencrypted") from None
    except ValueError:
        raise ValueError("holds no PEM private key") from None
    return _public_der(key.public_key())


def check_key_pair(cert_file: str, key_file: str) -> None:
    """ValueError unless the key is the private half of the chain's first certificate."""
    if _public_der(checked_certificates(cert_file)[0].public_key()) != _public_der_of_key_file(key_file):
        raise ValueError("is not the key of the certificate in its certificate file")


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    client_ca = _read(client_ca_file) if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(key_file), _read(cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Trusts `ca_file` for the server; presents `cert_file`/`key_file` when given (mTLS)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key (and the key its certificate)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file) if ca_file else None,
        private_key=_read(key_file) if key_file else None,
        certificate_chain=_read(cert_file) if cert_file else None,
    )


def webhook_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """HTTPS for the webhook server: TLS 1.2 or newer, the standard library's default ciphers."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
