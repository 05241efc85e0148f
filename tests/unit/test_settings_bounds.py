"""Numeric settings out of range stop a service at start-up, naming the variable, instead of
hanging it (a batch size or send concurrency of 0) or quietly breaking it (XREAD blocking forever,
the only config version deleted as it is saved)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from libs.settings import DispatcherSettings, ReceiptsSettings, ResolverSettings
from libs.settings_doc import value_range

ROOT = Path(__file__).resolve().parents[2]

OUT_OF_RANGE = [
    (DispatcherSettings, "batch_size", "0"),
    (DispatcherSettings, "batch_size", "10001"),
    (DispatcherSettings, "send_concurrency", "0"),
    (DispatcherSettings, "max_recipients_per_call", "0"),
    (DispatcherSettings, "claim_lease_seconds", "0"),
    (DispatcherSettings, "message_ttl_seconds", "-1"),
    (DispatcherSettings, "idempotency_ttl_seconds", "0"),
    (DispatcherSettings, "unsubscribe_link_ttl_seconds", "0"),
    (DispatcherSettings, "archive_retention_seconds", "-1"),
    (DispatcherSettings, "blind_index_ttl_seconds", "-1"),
    (DispatcherSettings, "audit_stream_maxlen", "0"),
    (DispatcherSettings, "resolver_timeout_seconds", "0"),
    (DispatcherSettings, "provider_max_retries", "-1"),
    (DispatcherSettings, "provider_retry_base_ms", "-5"),
    (DispatcherSettings, "provider_max_retry_after_seconds", "-1"),
    (DispatcherSettings, "grpc_port", "65536"),
    (DispatcherSettings, "grace_seconds", "-1"),
    (DispatcherSettings, "grpc_max_message_bytes", "100"),
    (ResolverSettings, "config_versions_kept", "0"),
    (ResolverSettings, "pii_concurrency", "0"),
    (ResolverSettings, "circuit_failure_threshold", "0"),
    (ResolverSettings, "pin_ttl_seconds", "0"),
    (ResolverSettings, "max_response_bytes", "0"),
    (ResolverSettings, "content_cache_entries", "-1"),
    (ResolverSettings, "pii_retry_max_ms", "-1"),
    (ReceiptsSettings, "events_stream_block_ms", "0"),
    (ReceiptsSettings, "events_stream_block_ms", "5000"),
    (ReceiptsSettings, "events_stream_maxlen", "0"),
    (ReceiptsSettings, "receipt_dedupe_ttl_seconds", "0"),
    (ReceiptsSettings, "receipt_read_timeout_seconds", "0"),
    (ReceiptsSettings, "sendgrid_timestamp_tolerance_seconds", "0"),
    (ReceiptsSettings, "max_receipt_bytes", "0"),
    (ReceiptsSettings, "sns_cert_cache_size", "0"),
    (ReceiptsSettings, "sns_fetch_timeout_seconds", "0"),
    (ReceiptsSettings, "http_port", "-1"),
]


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in os.environ:
        if name.startswith("TOKENSEND_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOKENSEND_DEV_MODE", "true")
    return monkeypatch


@pytest.mark.parametrize(("settings", "field", "value"), OUT_OF_RANGE, ids=lambda v: getattr(v, "__name__", v))
def test_an_out_of_range_value_is_refused_by_name(settings, field, value, environment) -> None:
    environment.setenv(f"TOKENSEND_{field.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        settings()
    (error,) = refused.value.errors()
    assert error["loc"] == (field,)
    assert error["type"] in ("greater_than_equal", "greater_than", "less_than_equal")


@pytest.mark.parametrize(
    ("settings", "field", "value"),
    [
        (DispatcherSettings, "batch_size", "1"),
        (DispatcherSettings, "batch_size", "10000"),
        (DispatcherSettings, "archive_retention_seconds", "0"),  # 0 turns the archive off
        (DispatcherSettings, "blind_index_ttl_seconds", "0"),
        (DispatcherSettings, "provider_max_retries", "0"),
        (DispatcherSettings, "grpc_port", "0"),  # a free port
        (ResolverSettings, "config_versions_kept", "1"),
        (ResolverSettings, "content_cache_entries", "0"),
        (ReceiptsSettings, "events_stream_block_ms", "4000"),
    ],
)
def test_the_edges_of_each_range_are_accepted(settings, field, value, environment) -> None:
    environment.setenv(f"TOKENSEND_{field.upper()}", value)
    assert getattr(settings(), field) == type(settings.model_fields[field].default)(value)


@pytest.mark.parametrize("settings", [DispatcherSettings, ResolverSettings, ReceiptsSettings])
def test_the_defaults_are_in_range(settings, environment) -> None:
    settings()


def test_the_service_exits_2_naming_the_variable(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(TOKENSEND_DEV_MODE="true", TOKENSEND_BATCH_SIZE="0", TOKENSEND_REDIS_URL="memory://bounds")
    done = subprocess.run(
        [sys.executable, "-m", "services.dispatcher"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "dispatcher: invalid settings: TOKENSEND_BATCH_SIZE: Input should be greater than or equal to 1" in (
        done.stderr
    )


def test_the_readme_table_shows_each_range() -> None:
    fields = {**DispatcherSettings.model_fields, **ReceiptsSettings.model_fields}
    assert value_range(fields["batch_size"]) == "1 to 10,000"
    assert value_range(fields["resolver_timeout_seconds"]) == "> 0"
    assert value_range(fields["archive_retention_seconds"]) == "≥ 0"
    assert value_range(fields["events_stream_block_ms"]) == "1 to 4,000"
    assert value_range(fields["redis_url"]) == ""
