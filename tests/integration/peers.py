"""Provider peers that nobody here wrote, started for connector tests.

- Prism (`node_modules/.bin/prism mock --errors`) serving the providers' official
  OpenAPI specs from `../shared/specs/`: a request that breaks the spec gets a 4xx.
- moto's server for SES v2, with its request recorder on so a test can read
  exactly what SES received (moto does not keep message tags).
- aiosmtpd relays, plain, STARTTLS, implicit TLS and AUTH, with a private CA made
  per test module.

Import the fixtures explicitly: `from tests.integration.peers import prism_twilio  # noqa: F401`.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandbox.processes import free_port

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[3] / "shared"
SPECS = SHARED / "specs"
PRISM = REPO / "node_modules" / ".bin" / "prism"
STARTUP_SECONDS = 60.0


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- processes ---------------------------------------------------------------


@dataclass
class PeerProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, size: int = 4000) -> str:
        return self.log_path.read_bytes()[-size:].decode(errors="replace") if self.log_path.exists() else ""


def start_peer(name: str, argv: list[str], port: int, log_dir: Path, **popen: Any) -> PeerProcess:
    """Starts `argv` in its own process group and waits until `port` accepts connections."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    peer = PeerProcess(name, process, port, log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while not port_answers(port):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{peer.log_tail()}")
        if time.monotonic() > deadline:
            stop_peer(peer)
            raise RuntimeError(f"{name} did not listen on {port} within {STARTUP_SECONDS:.0f}s:\n{peer.log_tail()}")
        time.sleep(0.1)
    return peer


def stop_peer(peer: PeerProcess) -> None:
    """Stops the process group this module started (and only it)."""
    if peer.process.poll() is not None:
        return
    os.killpg(peer.process.pid, signal.SIGTERM)
    try:
        peer.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(peer.process.pid, signal.SIGKILL)
        peer.process.wait(timeout=5)


# -- Prism --------------------------------------------------------------------


def start_prism(name: str, spec: Path, log_dir: Path) -> PeerProcess:
    if not PRISM.exists():
        raise RuntimeError(f"Prism is not installed at {PRISM}: run `npm ci` in the repository")
    port = free_port()
    argv = [str(PRISM), "mock", "-h", "127.0.0.1", "-p", str(port), "--errors", str(spec)]
    return start_peer(name, argv, port, log_dir, cwd=log_dir)


def spec_with_explicit_form_encoding(source: Path, target: Path) -> Path:
    """The spec with OpenAPI's default form encoding (style form, explode true) written out for array fields.

    OpenAPI 3 sends an array in a form body as repeated keys (`MediaUrl=a&MediaUrl=b`),
    which is what Twilio takes. Prism 5 applies no default encoding and answers
    "MediaUrl must be array" (stoplightio/prism#2473, fix proposed in #2654), so
    the default is spelled out. Nothing else changes; Prism still sees only the
    last repeated value, so only that one is validated.
    """
    spec = json.loads(source.read_text())
    for item in spec["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            form = operation.get("requestBody", {}).get("content", {}).get("application/x-www-form-urlencoded")
            if not form:
                continue
            properties = form.get("schema", {}).get("properties", {})
            arrays = [name for name, schema in properties.items() if schema.get("type") == "array"]
            encoding = form.setdefault("encoding", {})
            for name in arrays:
                encoding.setdefault(name, {"style": "form", "explode": True})
    target.write_text(json.dumps(spec))
    return target


@pytest.fixture(scope="module")
def prism_sendgrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerProcess]:
    """SendGrid's official Mail Send spec (servers: https://api.sendgrid.com, no base path)."""
    log_dir = tmp_path_factory.mktemp("prism-sendgrid")
    peer = start_prism("prism-sendgrid", SPECS / "sendgrid_tsg_mail_v3.json", log_dir)
    yield peer
    stop_peer(peer)


@pytest.fixture(scope="module")
def prism_twilio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerProcess]:
    """Twilio's official Messages spec (servers: https://api.twilio.com, no base path)."""
    log_dir = tmp_path_factory.mktemp("prism-twilio")
    spec = spec_with_explicit_form_encoding(
        SPECS / "twilio_api_v2010_messages_only.json", log_dir / "twilio_api_v2010_messages_only.json"
    )
    peer = start_prism("prism-twilio", spec, log_dir)
    yield peer
    stop_peer(peer)


# -- moto ---------------------------------------------------------------------


@dataclass
class MotoServer:
    peer: PeerProcess

    @property
    def base_url(self) -> str:
        return self.peer.base_url

    def _call(self, path: str, method: str = "GET") -> bytes:
        request = urllib.request.Request(self.base_url + path, method=method)
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.read()

    def start_recording(self) -> None:
        self._call("/moto-api/recorder/reset-recording", "POST")
        self._call("/moto-api/recorder/start-recording", "POST")

    def recorded_requests(self) -> list[dict[str, Any]]:
        """Every request moto received since `start_recording`, bodies decoded."""
        requests = []
        for line in self._call("/moto-api/recorder/download-recording").decode().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded") and body:
                body = base64.b64decode(body).decode()
            entry["body"] = body
            requests.append(entry)
        return requests

    def sent_messages(self) -> list[dict[str, Any]]:
        """moto's SES backend messages (id, source, destinations, subject, body; no tags)."""
        data = json.loads(self._call("/moto-api/data.json"))
        return data.get("ses", {}).get("Message", [])


@pytest.fixture(scope="module")
def moto_ses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    log_dir = tmp_path_factory.mktemp("moto")
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    env = {
        **os.environ,
        "MOTO_ENABLE_RECORDING": "True",
        # The recorder writes to the working directory unless told otherwise.
        "MOTO_RECORDER_FILEPATH": str(log_dir / "moto_recording"),
    }
    peer = start_peer("moto", [str(moto), "-H", "127.0.0.1", "-p", str(port)], port, log_dir, env=env, cwd=log_dir)
    yield MotoServer(peer)
    stop_peer(peer)


# -- TLS material ---------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    ca_pem: str
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def make_tls_material(directory: Path, common_name: str = "tokensend test CA") -> TlsMaterial:
    """A private CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsMaterial(ca.public_bytes(serialization.Encoding.PEM).decode(), cert_path, key_path)


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


# -- aiosmtpd ---------------------------------------------------------------------


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool
    authenticated: bool

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.raw, policy=policy.default)  # type: ignore[return-value]


@dataclass
class RecordingHandler:
    """An aiosmtpd handler that keeps what it receives; optional canned refusals."""

    rcpt_reply: str = ""
    data_reply: str = ""
    drop_after_data: bool = False
    received: list[ReceivedMail] = field(default_factory=list)
    rcpt_calls: int = 0
    auth_attempts: int = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001, ANN201
        self.rcpt_calls += 1
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        self.received.append(
            ReceivedMail(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                raw=envelope.original_content or envelope.content,
                tls=session.ssl is not None or server.transport.get_extra_info("sslcontext") is not None,
                authenticated=bool(session.authenticated),
            )
        )
        if self.drop_after_data:
            # The relay has the message, but the client never hears so.
            server.transport.close()
        return self.data_reply or "250 2.0.0 queued"


@dataclass
class SmtpRelay:
    controller: Controller
    handler: RecordingHandler
    port: int

    def url(self, scheme: str = "smtp") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"


@pytest.fixture
def smtp_relay() -> Iterator[Callable[..., SmtpRelay]]:
    """Starts aiosmtpd relays on free ports: `start(handler, tls_context=..., ssl_context=..., users={...})`."""
    started: list[Controller] = []

    def start(
        handler: RecordingHandler | None = None,
        *,
        users: dict[str, str] | None = None,
        **options: Any,
    ) -> SmtpRelay:
        handler = handler or RecordingHandler()
        if users is not None:

            def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
                handler.auth_attempts += 1
                ok = isinstance(auth_data, LoginPassword) and users.get(auth_data.login.decode()) == (
                    auth_data.password.decode()
                )
                # handled=False makes aiosmtpd answer 535 itself; its default leaves the client waiting.
                return AuthResult(success=ok, handled=False)

            options["authenticator"] = authenticator
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **options)
        controller.start()
        started.append(controller)
        return SmtpRelay(controller, handler, port)

    yield start
    for controller in started:
        if controller._thread is not None:  # a test may have stopped it already
            controller.stop()
