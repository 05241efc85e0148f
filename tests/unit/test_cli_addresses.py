"""An address gRPC would not dial as written is refused at once, naming where it came from: gRPC takes a
port past 65535 modulo 65536 (127.0.0.1:99999 is port 34463, whatever listens there) and fails on an empty
or named port only once the deadline has passed."""

from __future__ import annotations

import pytest

from cli.exits import USAGE
from cli.main import main
from cli.rpc import address_problem

FAR = "127.0.0.1:99999"


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "spring", "--workspace", "demo", "--addr", FAR],
        ["--addr", FAR, "stats", "spring", "--workspace", "demo"],
        ["events", "--workspace", "demo", "--addr", FAR],
        ["config", "list", "--workspace", "demo", "--addr", FAR],
        ["config", "list", "--workspace", "demo", "--resolver-addr", FAR],
        ["config", "get", "connector", "twilio", "--workspace", "demo", "--addr", FAR],
        ["config", "put", "examples/connector-twilio.yaml", "--dispatcher-addr", FAR],
        ["test-pii-api", "--workspace", "demo", "--id", "cust-000001", "--addr", FAR],
    ],
)
def test_a_port_past_65535_is_refused_naming_the_flag(argv: list[str], capsys) -> None:
    # It went to port 34463: "cannot reach the receipts service at 127.0.0.1:99999 (... ipv4:127.0.0.1:34463 ...)".
    assert main(argv) == USAGE
    flag = next(a for a in argv if a.endswith("addr"))
    err = capsys.readouterr().err
    assert f"argument {flag}: expected HOST:PORT with a port of 1..65535, got '{FAR}'" in err


@pytest.mark.parametrize(
    "address",
    ["localhost:0", "receipts:", "receipts:grpc", ":50053", "localhost", "receipts.internal", "[::1]", "host:٣"],
)
def test_an_address_from_the_environment_is_checked_too_naming_the_variable(address, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TOKENSEND_RECEIPTS_ADDR", address)
    assert main(["stats", "spring", "--workspace", "demo"]) == USAGE
    assert capsys.readouterr().err.strip() == (
        f"tokensend: $TOKENSEND_RECEIPTS_ADDR: expected HOST:PORT with a port of 1..65535, got {address!r}"
    )


@pytest.mark.parametrize(
    "address",
    ["localhost:50053", "[::1]:50053", "receipts.internal:443", "dns:///receipts:50053", "unix:/run/r.sock"],
)
def test_the_addresses_grpc_dials_are_taken_as_given(address) -> None:
    assert address_problem(address) is None
