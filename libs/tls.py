"""TLS and mTLS credentials for the gRPC servers and the dispatcher's channel to the resolver, and
the receipts service's HTTPS for webhooks.

Files are PEM and read once at startup. A server with a client CA requires a
client certificate issued by it (mTLS); authorisation still comes from bearer
tokens (`libs.auth`): a certificate proves the caller is one of ours, the token
says which workspaces it may touch.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


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
