"""The leak scanners the PII tests rely on must find a leak and nothing else."""

from __future__ import annotations

import pytest

from tests.canary import holds_number


@pytest.mark.parametrize("dump", [b"1001", b'{"points":1001,"tier":"Gold"}', b"points 1001 gold", b"x:1001"])
def test_a_number_standing_alone_is_found(dump: bytes) -> None:
    assert holds_number(b"1001", dump)


@pytest.mark.parametrize("dump", [b"1764431001234", b"d7fd1001ab5e", b"10010", b"a1001", b""])
def test_a_number_inside_a_timestamp_or_digest_is_not(dump: bytes) -> None:
    assert not holds_number(b"1001", dump)
