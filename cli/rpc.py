"""Calling the services: addresses, the bearer token, deadlines, and gRPC errors turned into exit codes."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cli.exits import FAILED, USAGE, CliError, UsageError
from libs import keepalive
from libs.arguments import number
from libs.grpc_targets import target_problem

DEFAULT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Service:
    """A service the CLI calls, and where to find it when no --addr is given."""

    name: str
    title: str  # for sentences: "the receipts service"
    env: str
    default_addr: str

    def address(self, args: argparse.Namespace) -> str:
        """--addr (checked as it was parsed), else $ENV, checked here, else the default."""
        flag = getattr(args, "addr", None)
        if flag:
            return flag
        configured = os.environ.get(self.env)
        if not configured:
            return self.default_addr
        problem = address_problem(configured)
        if problem is not None:
            raise UsageError(f"${self.env}: {problem}")
        return configured


def address_problem(text: str) -> str | None:
    """Why `text` is no address gRPC can dial as meant, or None, by the rule the services' settings use
    (libs.grpc_targets): HOST:PORT, [IPv6]:PORT, or a target of gRPC's own schemes (dns:///, unix:, ...)."""
    problem = target_problem(text)
    return None if problem is None else f"{problem}, got {text!r}"


def grpc_address(text: str) -> str:
    """An argparse type: a HOST:PORT flag, refused at once when gRPC could not dial it as meant."""
    problem = address_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


RESOLVER = Service("resolver", "resolver", "TOKENSEND_RESOLVER_ADDR", "localhost:50051")
DISPATCHER = Service("dispatcher", "dispatcher", "TOKENSEND_DISPATCHER_ADDR", "localhost:50052")
RECEIPTS = Service("receipts", "receipts service", "TOKENSEND_RECEIPTS_ADDR", "localhost:50053")
SERVICES = {s.name: s for s in (RESOLVER, DISPATCHER, RECEIPTS)}


def add_client_options(
    parser: argparse.ArgumentParser, service: Service | None, timeout_help: str | None = None
) -> None:
    """--addr (when the command talks to one service), --timeout, --token, --tls. `timeout_help`: what
    --timeout bounds when it is not each call (a stream's whole length, which has no default).

    Defaults are SUPPRESS so the options work before and after the command name
    without one position overwriting the other; `client_options` fills them in.
    """
    group = parser.add_argument_group("connection")
    if service is not None:
        group.add_argument(
            "--addr",
            type=grpc_address,
            metavar="HOST:PORT",
            default=argparse.SUPPRESS,
            help=f"the {service.title}'s gRPC address (default: ${service.env} or {service.default_addr})",
        )
    group.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help=timeout_help or f"deadline of each call (default: {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    group.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="bearer token, sent as 'authorization: Bearer TOKEN' (default: $TOKENSEND_TOKEN); --token '' sends "
        "none, even when $TOKENSEND_TOKEN is set",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=argparse.SUPPRESS,
        help="use TLS (default: plaintext, unless a --tls-* file is given)",
    )
    group.add_argument(
        "--tls-ca-file",
        metavar="PEM",
        default=argparse.SUPPRESS,
        help="CA bundle trusted for the server's certificate (default: the system's)",
    )
    group.add_argument("--tls-cert-file", metavar="PEM", default=argparse.SUPPRESS, help="client certificate, for mTLS")
    group.add_argument(
        "--tls-key-file", metavar="PEM", default=argparse.SUPPRESS, help="the client certificate's private key"
    )


# A call's deadline: more than nothing, and at most a day.
_positive_seconds = number(float, 0, above=True, high=86400)


@dataclass(frozen=True)
class ClientOptions:
    timeout: float
    token: str | None
    credentials: grpc.ChannelCredentials | None  # None: plaintext

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientOptions:
        flag = getattr(args, "token", None)
        # --token '' sends none, whatever $TOKENSEND_TOKEN holds: only a flag not given falls back to it.
        token = (flag if flag is not None else os.environ.get("TOKENSEND_TOKEN")) or None
        if token is not None and not (token.isascii() and token.isprintable()):
            # What an HTTP/2 header value may hold; gRPC would refuse it as "Invalid metadata".
            raise UsageError(
                f"{'--token' if flag is not None else '$TOKENSEND_TOKEN'} must be printable ASCII on one line"
            )
        return cls(
            timeout=getattr(args, "timeout", DEFAULT_TIMEOUT_SECONDS),
            token=token,
            credentials=_channel_credentials(args),
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _read_pem(args: argparse.Namespace, name: str) -> bytes | None:
    path = getattr(args, name, None)
    if not path:
        return None
    flag = f"--{name.replace('_', '-')}"
    try:
        with open(path, "rb") as pem:
            data = pem.read()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise UsageError(f"{flag}: {path} is not PEM (no -----BEGIN line)")
    return data


def _channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    ca, cert, key = (_read_pem(args, name) for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"))
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert-file and --tls-key-file go together")
    if not getattr(args, "tls", False) and ca is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class RpcFailed(CliError):
    """A call that ended with a gRPC error; INVALID_ARGUMENT exits 2, anything else 1."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message, USAGE if code == grpc.StatusCode.INVALID_ARGUMENT else FAILED)
        self.code = code


class Connection:
    """One channel to one service; `call` runs a unary RPC with the deadline and token."""

    def __init__(self, service: Service, address: str, options: ClientOptions) -> None:
        self.service = service
        self.address = address
        self.options = options
        # Pinged as the dispatcher pings the resolver: a `dispatch` of a long file, which has no deadline, would
        # otherwise wait on a server whose host vanished until the kernel gives up on the connection.
        channel_options = keepalive.channel_options()
        if options.credentials is not None:
            self._channel = grpc.secure_channel(address, options.credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(address, options=channel_options)

    @classmethod
    def open(cls, service: Service, args: argparse.Namespace) -> Connection:
        return cls(service, service.address(args), ClientOptions.from_args(args))

    def stub(self, stub_class: Callable[[grpc.Channel], Any]) -> Any:
        return stub_class(self._channel)

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.options.timeout, metadata=self.options.metadata)
        except grpc.RpcError as error:
            raise RpcFailed(self.describe_error(error), error.code()) from None

    def describe_error(self, error: grpc.RpcError) -> str:
        answered = (
            error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            and not connection_lost(error)
            and self.connected()
        )
        return describe_rpc_error(error, self.service.title, self.address, self.options.timeout, answered=answered)

    def connected(self) -> bool:
        """Whether the channel holds a connection: an UNAVAILABLE then came from the service itself
        (its Redis is down, it is shutting down), not from failing to reach it."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=0.1)
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()
        return True

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations in an error's trailing metadata."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # a status detail that does not match the call's code and message
        return []
    violations = []
    for detail in status.details if status is not None else []:
        bad_request = error_details_pb2.BadRequest()
        if detail.Is(bad_request.DESCRIPTOR) and detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations


# What grpc says when the channel closed a connection whose ping went unanswered: the server's host or the network
# between went away mid-call, whatever a new connection finds there now.
_CONNECTION_LOST = ("ping timeout", "keepalive watchdog timeout")


def connection_lost(error: grpc.RpcError) -> bool:
    if error.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
        return False
    details = (error.details() or "").lower()  # type: ignore[attr-defined]
    return any(sign in details for sign in _CONNECTION_LOST)


# What grpc says when a connection was made but TLS failed: the service is running, the certificates are wrong.
_TLS_FAILURES = ("handshake", "ssl_error", "certificate", "hostname verification")


def describe_rpc_error(
    error: grpc.RpcError,
    service: str,
    address: str,
    timeout: float,
    *,
    answered: bool = False,
    address_flag: str = "--addr",
) -> str:
    """A message for a person: what went wrong, and for INVALID_ARGUMENT every field the server named, once.
    `answered`: an UNAVAILABLE came from the service over a working connection, not from trying to reach it.
    `address_flag`: the flag that gave `address`, named where it may be wrong."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    name = code.name if code is not None else "UNKNOWN"
    if connection_lost(error):
        return (
            f"lost the connection to the {service} at {address}: it stopped answering mid-call (UNAVAILABLE: "
            f"{details}); its host or the network between may be down"
        )
    if code == grpc.StatusCode.UNAVAILABLE and answered:
        return f"the {service} at {address} answered UNAVAILABLE: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        problem = connection_problem(service, address, details, address_flag)
        if problem is not None:
            return problem
        # A TLS server closes a plaintext connection without a word.
        hint = f"{address_flag}; --tls if it serves TLS" if "socket closed" in lowered else address_flag
        return f"cannot reach the {service} at {address} (UNAVAILABLE: {details}); is it running? ({hint})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the {service} at {address} did not answer within {timeout:g}s (DEADLINE_EXCEEDED; --timeout)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the {service} refused the credentials (UNAUTHENTICATED: {details}); check --token / $TOKENSEND_TOKEN"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        # Every method of ours is served by its service: most likely the address is another service's.
        return f"the {service} answered UNIMPLEMENTED: {details}; is {address} the {service}? ({address_flag})"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        lines = [f"the {service} refused it as invalid (INVALID_ARGUMENT): {details}"]
    else:
        lines = [f"the {service} answered {name}: {details}"]
    # Our servers' details are the violation itself ("field: description"): said once. Another server's
    # details may say less, so the violations they leave out get a line each.
    lines += [
        f"  field {field}: {description}"
        for field, description in field_violations(error)
        if f"{field}: {description}" not in details
    ]
    return "\n".join(lines)


def connection_problem(service: str, address: str, details: str, address_flag: str = "--addr") -> str | None:
    """What a failed connection's UNAVAILABLE details say is at `address` when it is not simply down: a plaintext
    port reached with TLS, a server that does not speak gRPC, a certificate not trusted; else None."""
    lowered = details.lower()
    if "wrong_version_number" in lowered:  # what a TLS client reads when the server's first bytes are not TLS
        return (
            f"no TLS connection to the {service} at {address} (UNAVAILABLE: {details}); it answers without "
            f"TLS: leave out --tls and the --tls-* files, or check {address_flag}"
        )
    if "failed parsing http/2" in lowered:  # an HTTP/1 server (the webhook port, a PII API), Redis ...
        return (
            f"no gRPC server at {address} (UNAVAILABLE: {details}); something answers there, but not over "
            f"gRPC: is it the {service}'s port? ({address_flag})"
        )
    if any(sign in lowered for sign in _TLS_FAILURES):
        return (
            f"no TLS connection to the {service} at {address} (UNAVAILABLE: {details}); check --tls-ca-file "
            f"(the CA that issued its certificate), that the certificate names the host of {address_flag}, and "
            "--tls-cert-file / --tls-key-file if it wants a client certificate"
        )
    return None
