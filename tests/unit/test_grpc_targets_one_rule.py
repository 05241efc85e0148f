"""The services' settings (TOKENSEND_RESOLVER_ADDR) and the command line (--addr, $TOKENSEND_*_ADDR, the
benchmark's --target) check a gRPC address by one rule, libs.grpc_targets: they took `::1:50051` (which gRPC
looks up as a host name), `vsock:` targets (which this gRPC looks up as host names too) and any `unix:` target,
an empty path or a host included, and the settings took a port in other digits than ASCII."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from cli.exits import USAGE
from cli.main import main
from cli.rpc import address_problem
from libs.grpc_targets import target_problem
from libs.settings import DispatcherSettings

ACCEPTED = [
    "localhost:50051",
    "10.0.0.7:50051",
    "[::1]:50051",
    "[fe80::1%eth0]:50051",
    "dns:///resolver.internal:50051",
    "dns:resolver.internal:50051",
    "unix:/run/tokensend/resolver.sock",
    "unix:///run/tokensend/resolver.sock",
    "unix:resolver.sock",
    "unix-abstract:tokensend-resolver",
    "ipv4:127.0.0.1:50051,127.0.0.2:50051",
    "ipv6:[::1]:50051",
]

REFUSED = [
    ("::1:50051", "an IPv6 address in brackets ([::1]:50051)"),
    ("::1", "an IPv6 address in brackets"),
    ("[::1]", "with a port of 1..65535"),
    ("[resolver]:50051", "an IPv6 address in brackets"),
    ("resolver:٥٠٠٥١", "with a port of 1..65535"),
    ("vsock:3:50051", "vsock: targets are not dialled"),
    ("unix:", "the socket's name is empty"),
    ("unix://resolver/run/r.sock", "a unix: target names no host"),
    ("unix:/" + "r" * 107, "at most 107 bytes"),
    ("ipv4:127.0.0.1", "expected ipv4:ADDRESS:PORT"),
    ("ipv6:::1:50051", "expected ipv6:[ADDRESS]:PORT"),
    ("dns:///resolver.internal", "with a port of 1..65535"),
    ("http://resolver:50051", "a gRPC target (dns:, unix:"),
]


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in os.environ:
        if name.startswith("TOKENSEND_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOKENSEND_DEV_MODE", "true")
    return monkeypatch


@pytest.mark.parametrize("target", ACCEPTED)
def test_the_settings_and_the_command_line_take_the_same_targets(target: str, environment) -> None:
    assert target_problem(target) is None
    assert address_problem(target) is None
    environment.setenv("TOKENSEND_RESOLVER_ADDR", target)
    assert DispatcherSettings().resolver_addr == target


@pytest.mark.parametrize(("target", "says"), REFUSED)
def test_the_settings_and_the_command_line_refuse_the_same_targets_saying_why(target, says, environment) -> None:
    problem = target_problem(target)
    assert problem is not None and says in problem
    assert address_problem(target) == f"{problem}, got {target!r}"
    environment.setenv("TOKENSEND_RESOLVER_ADDR", target)
    with pytest.raises(ValidationError) as refused:
        DispatcherSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("resolver_addr",) and problem in error["msg"]


def test_a_bare_ipv6_address_given_to_the_command_is_refused_saying_to_bracket_it(capsys) -> None:
    assert main(["stats", "spring", "--workspace", "demo", "--addr", "::1:50053"]) == USAGE
    assert (
        "argument --addr: expected HOST:PORT with an IPv6 address in brackets ([::1]:50051), got '::1:50053'"
        in capsys.readouterr().err
    )
