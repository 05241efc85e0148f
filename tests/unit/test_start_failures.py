"""A start that fails part way closes what it had opened, last to first and each within a bound, and
still says why it failed; a setting's file that can no longer be read is named by its variable."""

from __future__ import annotations

import pytest

from libs.server import SettingFileUnreadable, closed_if_start_fails, reading_setting_files


class PortTaken(OSError):
    """Stands for whatever stops a start: the failure that must still be said."""


async def test_a_failed_start_closes_what_it_opened_last_to_first_and_the_failure_goes_on():
    closed: list[str] = []

    def closer(name: str):
        async def close() -> None:
            closed.append(name)

        return close

    with pytest.raises(PortTaken):
        async with closed_if_start_fails([closer("redis")]) as opened:
            opened.append(closer("http session"))
            opened.append(closer("config cache"))
            raise PortTaken("cannot listen")
    assert closed == ["config cache", "http session", "redis"]  # by close_all: one that hangs is left behind


async def test_a_start_that_succeeds_closes_nothing():
    closed: list[str] = []

    async def close() -> None:
        closed.append("redis")

    async with closed_if_start_fails([close]):
        pass
    assert closed == []


def test_a_file_gone_since_the_settings_were_checked_is_named_by_its_variable_never_its_path(tmp_path):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    key.write_text("key")
    files = {"TOKENSEND_TLS_CERT_FILE": str(cert), "TOKENSEND_TLS_KEY_FILE": str(key)}
    with pytest.raises(SettingFileUnreadable) as refused, reading_setting_files(files):
        key.read_bytes()
        cert.read_bytes()
    assert str(refused.value) == "TOKENSEND_TLS_CERT_FILE: cannot be read (No such file or directory)"


def test_an_error_that_names_no_file_names_every_variable_set():
    files = {"TOKENSEND_HTTP_TLS_CERT_FILE": "/tls/cert.pem", "TOKENSEND_HTTP_TLS_KEY_FILE": "/tls/key.pem", "X": ""}
    with pytest.raises(SettingFileUnreadable) as refused, reading_setting_files(files):
        raise PermissionError(13, "Permission denied")
    said = str(refused.value)
    assert said == "TOKENSEND_HTTP_TLS_CERT_FILE, TOKENSEND_HTTP_TLS_KEY_FILE: cannot be read (Permission denied)"
    assert "/tls" not in said
