"""Settings a service cannot run with stop it at start-up with a line naming the variable: numbers
out of range (a batch size or send concurrency of 0 would hang it, XREAD without a timeout block
forever, keeping no config version delete the one just saved), a Redis URL of another scheme, an
unknown log level; an address it cannot bind stops it too, naming the address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ValidationError, field_validator

from libs.auth import token_digest
from libs.settings import DispatcherSettings, ReceiptsSettings, ResolverSettings, cpu_list, invalid_settings
from libs.settings_doc import value_range
from tests.integration.peers import make_tls_material

ROOT = Path(__file__).resolve().parents[2]

OUT_OF_RANGE = [
    (DispatcherSettings, "batch_size", "0"),
    (DispatcherSettings, "batch_size", "10001"),
    (DispatcherSettings, "send_concurrency", "0"),
    (DispatcherSettings, "send_concurrency_per_workspace", "-1"),
    (DispatcherSettings, "max_recipients_per_call", "0"),
    (DispatcherSettings, "max_recipients_per_call", "100001"),
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
    (ResolverSettings, "pii_concurrency_per_workspace", "-1"),
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


def test_the_service_exits_2_naming_the_variable() -> None:
    done = _run("services.dispatcher", TOKENSEND_BATCH_SIZE="0")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "dispatcher: invalid settings: TOKENSEND_BATCH_SIZE: Input should be greater than or equal to 1" in (
        done.stderr
    )


def test_the_dedupe_window_covers_the_message_map_by_default(environment) -> None:
    """A receipt replayed while its message is mapped (WhatsApp, Twilio and SNS signatures carry no
    time) is still recognised."""
    assert ReceiptsSettings().receipt_dedupe_ttl_seconds >= DispatcherSettings().message_ttl_seconds
    environment.setenv("TOKENSEND_MESSAGE_TTL_SECONDS", "3600")
    environment.setenv("TOKENSEND_RECEIPT_DEDUPE_TTL_SECONDS", "3600")
    assert ReceiptsSettings().receipt_dedupe_ttl_seconds == 3600  # as long as the map is enough


def test_a_dedupe_window_shorter_than_the_message_map_stops_the_service_naming_both(environment) -> None:
    environment.setenv("TOKENSEND_RECEIPT_DEDUPE_TTL_SECONDS", str(3 * 86400))
    with pytest.raises(ValidationError) as refused:
        ReceiptsSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("receipt_dedupe_ttl_seconds",)
    done = _run("services.receipts", TOKENSEND_MESSAGE_TTL_SECONDS="7200", TOKENSEND_RECEIPT_DEDUPE_TTL_SECONDS="3600")
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "receipts: invalid settings: TOKENSEND_RECEIPT_DEDUPE_TTL_SECONDS: must be at least "
        "TOKENSEND_MESSAGE_TTL_SECONDS (7200)"
    ) in done.stderr


def test_a_workspaces_share_of_the_pii_api_calls_is_a_quarter_unless_set(environment) -> None:
    assert ResolverSettings().pii_concurrency_per_workspace == 16
    environment.setenv("TOKENSEND_PII_CONCURRENCY", "2")
    assert ResolverSettings().pii_concurrency_per_workspace == 1  # never none
    environment.setenv("TOKENSEND_PII_CONCURRENCY_PER_WORKSPACE", "2")
    assert ResolverSettings().pii_concurrency_per_workspace == 2  # all of them: no share kept for others


def test_a_workspaces_share_larger_than_the_whole_stops_the_service_naming_both(environment) -> None:
    environment.setenv("TOKENSEND_PII_CONCURRENCY", "8")
    environment.setenv("TOKENSEND_PII_CONCURRENCY_PER_WORKSPACE", "9")
    with pytest.raises(ValidationError) as refused:
        ResolverSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("pii_concurrency_per_workspace",)
    assert invalid_settings(refused.value).startswith(
        "TOKENSEND_PII_CONCURRENCY_PER_WORKSPACE: must be at most TOKENSEND_PII_CONCURRENCY (8)"
    )


def test_a_workspaces_share_of_the_send_slots_is_three_quarters_unless_set(environment) -> None:
    assert DispatcherSettings().send_concurrency_per_workspace == 96
    environment.setenv("TOKENSEND_SEND_CONCURRENCY", "4")
    assert DispatcherSettings().send_concurrency_per_workspace == 3  # one kept for the other brands
    environment.setenv("TOKENSEND_SEND_CONCURRENCY", "1")
    assert DispatcherSettings().send_concurrency_per_workspace == 1  # never none
    environment.setenv("TOKENSEND_SEND_CONCURRENCY", "4")
    environment.setenv("TOKENSEND_SEND_CONCURRENCY_PER_WORKSPACE", "4")
    assert DispatcherSettings().send_concurrency_per_workspace == 4  # all of them: no share kept for others


def test_a_workspaces_share_of_the_send_slots_larger_than_the_whole_stops_the_service_naming_both(
    environment,
) -> None:
    environment.setenv("TOKENSEND_SEND_CONCURRENCY", "4")
    environment.setenv("TOKENSEND_SEND_CONCURRENCY_PER_WORKSPACE", "5")
    with pytest.raises(ValidationError) as refused:
        DispatcherSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("send_concurrency_per_workspace",)
    assert invalid_settings(refused.value).startswith(
        "TOKENSEND_SEND_CONCURRENCY_PER_WORKSPACE: must be at most TOKENSEND_SEND_CONCURRENCY (4)"
    )


def test_a_workspaces_share_of_the_event_tails_is_a_quarter_and_never_more_than_the_whole(environment) -> None:
    assert (ReceiptsSettings().events_max_streams, ReceiptsSettings().events_max_streams_per_workspace) == (64, 16)
    environment.setenv("TOKENSEND_EVENTS_MAX_STREAMS", "192")
    assert ReceiptsSettings().events_max_streams_per_workspace == 48
    environment.setenv("TOKENSEND_EVENTS_MAX_STREAMS_PER_WORKSPACE", "193")
    with pytest.raises(ValidationError) as refused:
        ReceiptsSettings()
    assert invalid_settings(refused.value).startswith(
        "TOKENSEND_EVENTS_MAX_STREAMS_PER_WORKSPACE: must be at most TOKENSEND_EVENTS_MAX_STREAMS (192)"
    )
    # Each tail holds a pooled Redis connection: some must be left for webhooks and ledger writes.
    environment.setenv("TOKENSEND_EVENTS_MAX_STREAMS", "193")
    with pytest.raises(ValidationError) as refused:
        ReceiptsSettings()
    assert refused.value.errors()[0]["loc"] == ("events_max_streams",)


def test_the_readme_table_shows_each_range() -> None:
    fields = {**DispatcherSettings.model_fields, **ReceiptsSettings.model_fields}
    assert value_range(fields["batch_size"]) == "1 to 10,000"
    assert value_range(fields["resolver_timeout_seconds"]) == "> 0"
    assert value_range(fields["archive_retention_seconds"]) == "≥ 0"
    assert value_range(fields["events_stream_block_ms"]) == "1 to 4,000"
    assert value_range(fields["redis_url"]) == ""


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("redis_url", "http://user:password@cache:6379", "must start with redis://, rediss://, unix:// or memory://"),
        ("redis_url", "127.0.0.1:6379", "must start with redis://"),
        ("redis_url", "redis://:pa55word@cache:notaport/0", "is not a Redis URL the client can read"),
        ("redis_url", "redis://cache:99999/0", "is not a Redis URL the client can read"),
        ("redis_url", "redis://[::1/0", "is not a Redis URL the client can read"),
        ("redis_url", "redis://cache/0?socket_timeout=soon", "is not a Redis URL the client can read"),
        ("log_level", "LOUD", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused_by_name(field, value, says, environment) -> None:
    environment.setenv(f"TOKENSEND_{field.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        ResolverSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == (field,) and says in error["msg"]
    assert "pa55word" not in error["msg"]  # what a service prints of it


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://cache:6380", "unix:///run/redis.sock", "memory://t"]
)
def test_redis_urls_of_every_supported_scheme_are_accepted(url, environment) -> None:
    environment.setenv("TOKENSEND_REDIS_URL", url)
    assert ResolverSettings().redis_url == url


def test_log_levels_are_read_in_any_case(environment) -> None:
    environment.setenv("TOKENSEND_LOG_LEVEL", " warning")
    assert ResolverSettings().log_level == "WARNING"


def _run(module: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(TOKENSEND_DEV_MODE="true", TOKENSEND_REDIS_URL="memory://checks", TOKENSEND_GRPC_PORT="0")
    env.update(settings)
    return subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _resolver_on_a_held_port(shared: bool) -> tuple[int, subprocess.CompletedProcess]:
    """The resolver started on a port another socket holds, with SO_REUSEPORT (as gRPC binds) or not."""
    with socket.socket(socket.AF_INET6) as held:
        if shared:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("::", 0))
        held.listen()
        taken = held.getsockname()[1]
        return taken, _run("services.resolver", TOKENSEND_GRPC_PORT=str(taken))


def test_a_taken_grpc_port_stops_the_service_naming_the_address() -> None:
    taken, done = _resolver_on_a_held_port(shared=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"resolver: cannot listen for gRPC on [::]:{taken} (TOKENSEND_GRPC_HOST, TOKENSEND_GRPC_PORT)" in done.stderr
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


def test_a_port_another_service_shares_out_is_taken_too_unless_sharing_is_asked_for() -> None:
    """Another gRPC server holding the port with SO_REUSEPORT (as gRPC does by default): a service started
    there by mistake used to start and answer a share of the other's calls."""
    taken, done = _resolver_on_a_held_port(shared=True)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot listen for gRPC on [::]:{taken}" in done.stderr


def test_a_taken_webhook_port_stops_the_receipts_service_naming_it() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        done = _run("services.receipts", TOKENSEND_HTTP_HOST="127.0.0.1", TOKENSEND_HTTP_PORT=str(taken))
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"receipts: cannot listen for webhooks on 127.0.0.1:{taken} (TOKENSEND_HTTP_HOST, TOKENSEND_HTTP_PORT)" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


@pytest.fixture
def pem(tmp_path) -> dict[str, Path]:
    (tmp_path / "server").mkdir()
    (tmp_path / "other").mkdir()
    server = make_tls_material(tmp_path / "server", "server CA")
    other = make_tls_material(tmp_path / "other", "other CA")
    locked_key = tmp_path / "locked.key"
    key = serialization.load_pem_private_key(server.key_path.read_bytes(), password=None)
    locked_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cert, key_path, other_key = server.cert_path, server.key_path, other.key_path
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    return {
        "cert": cert, "key": key_path, "other_key": other_key, "locked_key": locked_key, "garbage": garbage,
        "missing": tmp_path / "missing.pem",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "values", "field", "says"),
    [
        (ResolverSettings, {"tls_cert_file": "missing", "tls_key_file": "key"}, "tls_cert_file",
         "cannot be read (No such file or directory)"),
        (ResolverSettings, {"tls_cert_file": "garbage", "tls_key_file": "key"}, "tls_cert_file",
         "holds no PEM certificate"),
        (ResolverSettings, {"tls_cert_file": "cert", "tls_key_file": "garbage"}, "tls_key_file",
         "holds no PEM private key"),
        (ResolverSettings, {"tls_cert_file": "cert", "tls_key_file": "locked_key"}, "tls_key_file",
         "holds an encrypted private key; give it unencrypted"),
        (ResolverSettings, {"tls_cert_file": "cert", "tls_key_file": "other_key"}, "tls_key_file",
         "is not the key of the certificate in its certificate file"),
        (ResolverSettings, {"tls_cert_file": "cert", "tls_key_file": "key", "tls_client_ca_file": "garbage"},
         "tls_client_ca_file", "holds no PEM certificate"),
        (DispatcherSettings, {"resolver_tls_ca_file": "garbage"}, "resolver_tls_ca_file", "holds no PEM certificate"),
        (DispatcherSettings, {"resolver_tls_ca_file": "cert", "resolver_tls_cert_file": "cert"},
         "resolver_tls_key_file", "are set together"),
        (DispatcherSettings, {"resolver_tls_ca_file": "cert", "resolver_tls_cert_file": "cert",
                              "resolver_tls_key_file": "other_key"}, "resolver_tls_key_file", "is not the key"),
        (ReceiptsSettings, {"http_tls_cert_file": "cert", "http_tls_key_file": "other_key"}, "http_tls_key_file",
         "is not the key"),
        (ReceiptsSettings, {"sns_ca_file": "missing"}, "sns_ca_file", "cannot be read"),
        (ReceiptsSettings, {"sns_signing_ca_file": "garbage"}, "sns_signing_ca_file", "holds no PEM certificate"),
    ],
)  # fmt: skip
def test_pem_files_are_read_at_start_up(settings, values, field, says, pem, environment) -> None:
    for name, which in values.items():
        environment.setenv(f"TOKENSEND_{name.upper()}", str(pem[which]))
    with pytest.raises(ValidationError) as refused:
        settings()
    (error,) = refused.value.errors()
    assert error["loc"] == (field,) and says in error["msg"]
    assert "pa55word" not in error["msg"]  # what a service prints of it
    assert str(pem["missing"].parent) not in error["msg"]  # the message says what is wrong, not where


def test_start_up_says_what_a_validator_said_without_pydantics_prefix(pem, environment) -> None:
    """Said as the validator said it: pydantic's "Value error, " before it means nothing to an operator."""
    environment.setenv("TOKENSEND_TLS_CERT_FILE", str(pem["garbage"]))
    environment.setenv("TOKENSEND_TLS_KEY_FILE", str(pem["key"]))
    environment.setenv("TOKENSEND_GRPC_PORT", "65536")
    with pytest.raises(ValidationError) as refused:
        ResolverSettings()
    assert invalid_settings(refused.value) == (
        "TOKENSEND_GRPC_PORT: Input should be less than or equal to 65535, "
        "TOKENSEND_TLS_CERT_FILE: holds no PEM certificate"
    )


class _Asserted(BaseModel):
    batch_size: int

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:  # raised, not asserted: pytest rewrites the text of a test module's asserts
            raise AssertionError("must be at least 1")
        return value


def test_an_assertion_in_a_validator_is_said_without_pydantics_prefix() -> None:
    with pytest.raises(ValidationError) as refused:
        _Asserted(batch_size=0)
    assert refused.value.errors()[0]["msg"].startswith("Assertion failed, ")
    assert invalid_settings(refused.value) == "TOKENSEND_BATCH_SIZE: must be at least 1"


def test_matching_pem_files_are_accepted(pem, environment) -> None:
    cert, key = str(pem["cert"]), str(pem["key"])
    assert ResolverSettings(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=cert).tls_key_file == key
    dispatcher = DispatcherSettings(resolver_tls_ca_file=cert, resolver_tls_cert_file=cert, resolver_tls_key_file=key)
    assert (dispatcher.resolver_tls_cert_file, dispatcher.resolver_tls_key_file) == (cert, key)
    receipts = ReceiptsSettings(http_tls_cert_file=cert, http_tls_key_file=key, sns_ca_file=cert)
    assert (receipts.http_tls_cert_file, receipts.http_tls_key_file, receipts.sns_ca_file) == (cert, key, cert)


@pytest.mark.parametrize(
    ("settings", "field", "value", "says"),
    [
        (ResolverSettings, "egress_proxy", "s3cr3t-pw@proxy.internal:3128", "must be http://[user:password@]host:port"),
        (ResolverSettings, "egress_proxy", "http://user:s3cr3t-pw@proxy:port", "must be http://"),
        (ResolverSettings, "trace_export_file", "/nonexistent/folder/spans.jsonl", "cannot be written"),
        (ResolverSettings, "metrics_export_file", "/nonexistent/folder/metrics.jsonl", "cannot be written"),
        (DispatcherSettings, "resolver_addr", "resolver", "must be host:port"),
        (DispatcherSettings, "resolver_addr", "resolver:0", "must be host:port"),
        (DispatcherSettings, "resolver_addr", ":50051", "must be host:port"),
        (DispatcherSettings, "public_webhook_url", "hooks.example.com", "must be an http:// or https:// URL"),
        (ReceiptsSettings, "public_webhook_url", "ftp://hooks.example.com", "must be an http:// or https:// URL"),
        (ReceiptsSettings, "sns_cert_host_pattern", "^sns\\.([a-z", "is not a regular expression ("),
        (DispatcherSettings, "public_webhook_url", "https://hooks.b\u00fccher..example", "cannot be written in ASCII"),
    ],
)
def test_addresses_urls_files_and_patterns_are_checked(settings, field, value, says, environment) -> None:
    environment.setenv(f"TOKENSEND_{field.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        settings()
    (error,) = refused.value.errors()
    assert error["loc"] == (field,) and says in error["msg"]
    assert "pa55word" not in error["msg"]  # what a service prints of it
    assert "s3cr3t" not in error["msg"]


@pytest.mark.parametrize(
    ("settings", "field", "value"),
    [
        (ResolverSettings, "egress_proxy", "http://user:password@proxy.internal:3128"),
        (DispatcherSettings, "resolver_addr", "resolver.internal:7000"),
        (DispatcherSettings, "resolver_addr", "[::1]:50051"),
        (DispatcherSettings, "resolver_addr", "dns:///resolver.internal:50051"),
        (DispatcherSettings, "public_webhook_url", "https://hooks.example.com/tokensend"),
    ],
)
def test_good_addresses_and_urls_are_accepted(settings, field, value, environment) -> None:
    environment.setenv(f"TOKENSEND_{field.upper()}", value)
    settings()


@pytest.mark.parametrize("settings", [DispatcherSettings, ReceiptsSettings])
def test_a_public_url_in_unicode_is_kept_in_ascii(settings, environment) -> None:
    """It goes where only ASCII does (List-Unsubscribe headers, providers' callback URL fields): the host in
    Punycode, the path percent-encoded, as a browser sends them."""
    environment.setenv("TOKENSEND_PUBLIC_WEBHOOK_URL", "https://hooks.b\u00fccher.example/r\u00fcckmeldung")
    assert settings().public_webhook_url == "https://hooks.xn--bcher-kva.example/r%C3%BCckmeldung"


def test_an_output_file_in_an_existing_folder_is_accepted(tmp_path, environment) -> None:
    environment.setenv("TOKENSEND_TRACE_EXPORT_FILE", str(tmp_path / "spans.jsonl"))
    assert ResolverSettings().trace_export_file == str(tmp_path / "spans.jsonl")


@pytest.mark.parametrize(
    ("value", "cpus"),
    [("", set()), ("0", {0}), ("0,2", {0, 2}), ("4-7", {4, 5, 6, 7}), ("0-1,6", {0, 1, 6}), (" 1 , 3 ,", {1, 3})],
)
def test_a_cpu_list_reads_as_linux_writes_it(value, cpus) -> None:
    assert cpu_list(value) == cpus


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("first", "not 'first'"),
        ("1-", "not '1-'"),
        ("-1", "not '-1'"),
        ("1.5", "not '1.5'"),
        ("3-1", "'3-1' runs backwards"),
        ("0-99999999999", "up to 8,191 ('0-99999999999' goes past it)"),
    ],
)
def test_a_cpu_list_that_is_not_one_is_refused_saying_what_is_wrong(value, says, environment) -> None:
    environment.setenv("TOKENSEND_CPU_AFFINITY", value)
    with pytest.raises(ValidationError) as refused:
        DispatcherSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("cpu_affinity",) and says in error["msg"]


def test_a_cpu_the_process_may_not_use_is_refused_naming_the_ones_it_may(environment) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    environment.setenv("TOKENSEND_CPU_AFFINITY", f"{allowed[0]},4096")
    with pytest.raises(ValidationError) as refused:
        ResolverSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("cpu_affinity",)
    assert "names CPUs this process may not use: [4096]" in error["msg"]
    assert f"it may use {','.join(map(str, allowed))}" in error["msg"]


def test_a_cpu_list_the_process_may_use_is_kept(environment) -> None:
    first = min(os.sched_getaffinity(0))
    environment.setenv("TOKENSEND_CPU_AFFINITY", f" {first} ")
    assert DispatcherSettings().cpu_affinity == str(first)


def _grant(name: str, token: str, workspaces: str = '["*"]') -> str:
    return f'{{"name": "{name}", "token_sha256": "{token_digest(token)}", "workspaces": {workspaces}}}'


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('[{"name": "engine", "token_sha256": "s3cr3t', "must be a JSON list of clients"),
        ("engine:s3cr3t", "must be a JSON list of clients"),
        ("[" + _grant("engine", "s3cr3t") + ", " + _grant("console", "s3cr3t", '["acme"]') + "]", "share a token"),
    ],
)
def test_clients_a_service_cannot_use_are_refused_by_name(value, says, environment) -> None:
    """Unreadable JSON was a traceback from the settings source, two clients with one token a traceback
    once the server was being built: neither named the variable nor exited 2."""
    environment.setenv("TOKENSEND_CLIENTS", value)
    with pytest.raises(ValidationError) as refused:
        ResolverSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("clients",) and says in error["msg"]
    assert "s3cr3t" not in error["msg"]
    done = _run("services.resolver", TOKENSEND_CLIENTS=value)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "resolver: invalid settings: TOKENSEND_CLIENTS: " in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('[{"name": "engine"}]', "TOKENSEND_CLIENTS[0].token_sha256: Field required, TOKENSEND_CLIENTS[0].workspaces"),
        (
            "[" + _grant("engine", "one") + ', {"name": "console", "token_sha256": "s3cr3t", "workspaces": ["*"]}]',
            "TOKENSEND_CLIENTS[1].token_sha256: token_sha256 must be the 64 hex digits",
        ),
        (
            "[" + _grant("engine", "one", '"acme"') + "]",
            "TOKENSEND_CLIENTS[0].workspaces: Input should be a valid list",
        ),
        ('{"name": "engine"}', "TOKENSEND_CLIENTS: Input should be a valid list"),
    ],
)
def test_a_refused_client_entry_is_named_by_its_place_and_field(value, says, environment) -> None:
    """A list of clients refused for one entry said only `TOKENSEND_CLIENTS: Field required`, twice: not
    which client nor which of its fields, in a list of many."""
    environment.setenv("TOKENSEND_CLIENTS", value)
    with pytest.raises(ValidationError) as refused:
        ResolverSettings()
    said = invalid_settings(refused.value)
    assert said.startswith(says), said
    assert "s3cr3t" not in said


def test_clients_are_read_from_json_and_empty_turns_authentication_off(environment) -> None:
    environment.setenv("TOKENSEND_CLIENTS", f"[{_grant('engine', 'one')}, {_grant('console', 'two')}]")
    assert [c.name for c in ResolverSettings().clients] == ["engine", "console"]
    for empty in ("", " ", "[]"):
        environment.setenv("TOKENSEND_CLIENTS", empty)
        assert ResolverSettings().clients == []


def test_a_message_limit_grpc_cannot_take_is_refused_by_name(environment) -> None:
    """gRPC's channel arguments are 32-bit: 4 GiB was an OverflowError while the server was built."""
    environment.setenv("TOKENSEND_GRPC_MAX_MESSAGE_BYTES", str(4 * 1024**3))
    with pytest.raises(ValidationError) as refused:
        DispatcherSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("grpc_max_message_bytes",) and error["type"] == "less_than_equal"
    environment.setenv("TOKENSEND_GRPC_MAX_MESSAGE_BYTES", str(2**31 - 1))
    assert DispatcherSettings().grpc_max_message_bytes == 2**31 - 1
    done = _run("services.receipts", TOKENSEND_GRPC_MAX_MESSAGE_BYTES=str(4 * 1024**3), TOKENSEND_HTTP_PORT="0")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "receipts: invalid settings: TOKENSEND_GRPC_MAX_MESSAGE_BYTES: " in done.stderr


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("unix:///run/redis.sock", "a Redis Cluster is reached over redis:// or rediss://"),
        ("redis://:pa55word@cache:6379/3", "a Redis Cluster has only database 0"),
    ],
)
def test_a_redis_url_a_cluster_client_cannot_use_is_refused_by_name(url, says, environment) -> None:
    """redis-py's cluster client refuses both when it is made: that was a traceback at start."""
    environment.setenv("TOKENSEND_REDIS_URL", url)
    environment.setenv("TOKENSEND_REDIS_CLUSTER", "true")
    with pytest.raises(ValidationError) as refused:
        DispatcherSettings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("redis_cluster",) and says in error["msg"]
    assert "pa55word" not in error["msg"]
    done = _run("services.resolver", TOKENSEND_REDIS_URL=url, TOKENSEND_REDIS_CLUSTER="true")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "resolver: invalid settings: TOKENSEND_REDIS_CLUSTER: " in done.stderr and "pa55word" not in done.stderr


@pytest.mark.parametrize(
    "url", ["redis://cache:7000", "redis://cache:7000/0", "rediss://:pw@cache:7000", "memory://one-process"]
)
def test_cluster_urls_are_accepted(url, environment) -> None:
    environment.setenv("TOKENSEND_REDIS_URL", url)
    environment.setenv("TOKENSEND_REDIS_CLUSTER", "true")
    assert DispatcherSettings().redis_cluster
    environment.setenv("TOKENSEND_REDIS_CLUSTER", "false")
    environment.setenv("TOKENSEND_REDIS_URL", "redis://cache:6379/3")  # any database outside a cluster
    assert not DispatcherSettings().redis_cluster


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (DispatcherSettings, "resolver_timeout_seconds"),  # gRPC's deadline overflowed: every lookup DEADLINE_EXCEEDED
        (DispatcherSettings, "grace_seconds"),  # the shutdown deadline's timer failed with a traceback
        (DispatcherSettings, "provider_read_timeout_seconds"),
        (ReceiptsSettings, "sns_fetch_timeout_seconds"),
        (ResolverSettings, "circuit_open_seconds"),
    ],
)
def test_an_infinite_duration_is_refused_by_name(settings, field, environment) -> None:
    environment.setenv(f"TOKENSEND_{field.upper()}", "inf")
    with pytest.raises(ValidationError) as refused:
        settings()
    (error,) = refused.value.errors()
    assert error["loc"] == (field,) and error["type"] == "finite_number"


def _durations(settings) -> list[str]:
    names = settings.model_fields
    return [name for name in names if name.endswith(("_seconds", "_ms")) and names[name].annotation in (int, float)]


@pytest.mark.parametrize(
    ("settings", "field"),
    [(s, f) for s in (DispatcherSettings, ReceiptsSettings, ResolverSettings) for f in _durations(s)],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_a_finite_but_absurd_duration_is_refused_by_name(settings, field, environment) -> None:
    """1e18 seconds overflowed the shutdown deadline's timer; a lease or TTL that long, Redis refuses
    as an expiry on every call. Ten years is the most any duration may be."""
    scale = 1000 if field.endswith("_ms") else 1
    environment.setenv(f"TOKENSEND_{field.upper()}", str(10 * 365 * 86400 * scale + 1))
    with pytest.raises(ValidationError) as refused:
        settings()
    (error,) = refused.value.errors()
    assert error["loc"] == (field,)
    assert error["msg"].endswith("(ten years)") or error["type"] == "less_than_equal"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a2V5", "TOKENSEND_SECRET_KEY: must decode to 32 bytes (each key, when several)"),
        ("not*base64", "TOKENSEND_SECRET_KEY: must be urlsafe base64 (each key, when several)"),
    ],
)
def test_a_refused_secret_key_is_named_once_and_never_quoted(value, says, environment) -> None:
    environment.setenv("TOKENSEND_SECRET_KEY", value)
    with pytest.raises(ValidationError) as refused:
        ResolverSettings()
    said = invalid_settings(refused.value)
    assert said == says
    assert value not in said
