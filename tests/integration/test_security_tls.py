"""TLS and mTLS on the gRPC servers and on the dispatcher's channel to the resolver.

Certificates are made here with `cryptography`: a CA, the resolver's server certificate
(127.0.0.1 and localhost), a client certificate it issued, and one from another CA.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from libs.errors import FailedPrecondition, Unavailable
from libs.tls import channel_credentials
from tests.pii_configs import bulk_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(cert_path, key_path)


class Authority:
    """A throwaway CA that issues server and client certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.issued = _write(directory, name, self.cert, self.key)

    def issue(self, stem: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return _write(self.directory, stem, builder.sign(self.key, hashes.SHA256()), key)


@pytest.fixture
def pki(tmp_path):
    ca = Authority(tmp_path, "tokensend-test-ca")
    rogue = Authority(tmp_path, "rogue-ca")
    return {
        "ca": ca.issued.cert,
        "server": ca.issue("resolver", server=True),
        "client": ca.issue("dispatcher", server=False),
        "rogue": rogue.issue("intruder", server=False),
    }


def secure_stub(port: int, ca: Path, client: Issued | None) -> tuple[grpc.aio.Channel, rpb_grpc.ResolverServiceStub]:
    credentials = channel_credentials(str(ca), str(client.cert) if client else "", str(client.key) if client else "")
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)
    return channel, rpb_grpc.ResolverServiceStub(channel)


async def reaches_the_servicer(stub) -> bool:
    """True when the call got through TLS (the servicer answers NOT_FOUND), False when the handshake failed."""
    try:
        await stub.GetPiiApiConfig(rpb.GetPiiApiConfigRequest(workspace_id="nobody", channel=EMAIL), timeout=5)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return True
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return False
    return True


async def test_mtls_admits_only_clients_with_a_certificate_from_the_ca(start_resolver, pki):
    resolver = await start_resolver(
        tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key), tls_client_ca_file=str(pki["ca"])
    )
    plaintext = rpb_grpc.ResolverServiceStub(resolver.channel)  # the fixture's channel has no TLS
    assert not await reaches_the_servicer(plaintext)
    for client, admitted in ((None, False), (pki["rogue"], False), (pki["client"], True)):
        channel, stub = secure_stub(resolver.port, pki["ca"], client)
        try:
            assert await reaches_the_servicer(stub) is admitted, client
        finally:
            await channel.close()


async def test_tls_without_client_ca_needs_no_client_certificate(start_resolver, pki):
    resolver = await start_resolver(tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key))
    channel, stub = secure_stub(resolver.port, pki["ca"], None)
    try:
        assert await reaches_the_servicer(stub)
    finally:
        await channel.close()


async def test_dispatcher_reaches_the_resolver_over_mtls(start_resolver, start_dispatcher, pii_api, customers, pki):
    resolver = await start_resolver(
        tls_cert_file=str(pki["server"].cert), tls_key_file=str(pki["server"].key), tls_client_ca_file=str(pki["ca"])
    )
    channel, stub = secure_stub(resolver.port, pki["ca"], pki["client"])
    try:
        await stub.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    finally:
        await channel.close()

    dispatcher = await start_dispatcher(
        resolver,
        resolver_tls_ca_file=str(pki["ca"]),
        resolver_tls_cert_file=str(pki["client"].cert),
        resolver_tls_key_file=str(pki["client"].key),
        resolver_tls_server_name="localhost",
    )
    [contact] = await dispatcher.deps.resolver.resolve("ws-1", EMAIL, ["cust-000001"], "spring", "run-1")
    assert contact.contact == customers["cust-000001"].email

    without_certificate = await start_dispatcher(resolver, resolver_tls_ca_file=str(pki["ca"]))
    with pytest.raises(Unavailable):
        await without_certificate.deps.resolver.resolve("ws-1", EMAIL, ["cust-000001"], "spring", "run-1")
    plaintext = await start_dispatcher(resolver)
    with pytest.raises((Unavailable, FailedPrecondition)):
        await plaintext.deps.resolver.resolve("ws-1", EMAIL, ["cust-000001"], "spring", "run-1")


def test_tls_settings_come_in_pairs(pki):
    from pydantic import ValidationError

    from libs.settings import ResolverSettings

    with pytest.raises(ValidationError, match="set together"):
        ResolverSettings(tls_cert_file=str(pki["server"].cert))
    with pytest.raises(ValidationError, match="mTLS needs"):
        ResolverSettings(tls_client_ca_file=str(pki["ca"]))
