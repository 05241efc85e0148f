"""Service settings, read from `TOKENSEND_*` environment variables."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from redis.connection import parse_url
from yarl import URL

from libs.auth import ClientGrant, ClientRegistry
from libs.grpc_targets import target_problem
from libs.tls import check_key_pair, checked_certificates

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "memory://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
GRPC_MAX_INT = 2**31 - 1  # gRPC's channel arguments are 32-bit


def _is_web_url(value: str) -> bool:
    """http(s)://host[:port]..., its port (when given) a number."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _web_url(value: str) -> str:
    if not _is_web_url(value):
        raise ValueError("must be an http:// or https:// URL with a host")
    if value.isascii():
        return value
    # Written where only ASCII goes (a List-Unsubscribe header, a provider's callback URL field): the
    # host in Punycode, the rest percent-encoded, as a browser would send it.
    try:
        return str(URL(value))
    except ValueError:  # UnicodeError included: a label IDNA cannot encode
        raise ValueError("names a host that cannot be written in ASCII (IDNA)") from None


def _grpc_target(value: str) -> str:
    """host:port, [v6]:port, or one of gRPC's own targets (dns:///host:port, unix:/path ...), by the rule the
    command line checks its addresses with."""
    problem = target_problem(value)
    if problem is not None:
        raise ValueError(f"must be host:port or a gRPC target such as dns:///host:port ({problem})")
    return value


def _pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a regular expression ({exc.msg})") from None
    return value


def _writable(path: str) -> str:
    """An output file: its folder must exist and the file be writable, or the service stops at start-up."""
    if path:
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot be written ({exc.strerror or type(exc).__name__})") from None
    return path


def invalid_settings(exc: ValidationError) -> str:
    """What start-up says of settings it refused: each variable and what is wrong with it.

    A validator's own text comes without pydantic's "Value error, " (or "Assertion failed, "), which
    means nothing to whoever sets the variable. No value is quoted: the validators' texts quote none."""
    said = []
    for error in exc.errors():
        reason = error["msg"]
        raised = error.get("ctx", {}).get("error")
        if error["type"] in ("value_error", "assertion_error") and isinstance(raised, Exception) and str(raised):
            reason = str(raised)
        variable = "TOKENSEND_" + str(error["loc"][0]).upper() if error["loc"] else ""
        # Inside a structured value (TOKENSEND_CLIENTS), the entry and its field: `[1].token_sha256`. The
        # path holds list indexes and model field names only, never a value.
        variable += "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:])
        said.append(f"{variable}: {reason}" if variable else reason)
    return ", ".join(said)


MAX_CPU = 8191  # Linux numbers at most 8,192 CPUs (NR_CPUS): a list is refused before it is built


def cpu_list(value: str) -> frozenset[int]:
    """CPU numbers as Linux writes them (`3`, `0,2`, `4-7`, `0-1,6`); empty: none."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in value.split(","))):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"must be CPU numbers such as 3, 0,2 or 4-7 (not {part!r})")
        low, high = int(first), int(last) if dash else int(first)
        if high > MAX_CPU:
            raise ValueError(f"must be CPU numbers up to {MAX_CPU:,} ({part!r} goes past it)")
        if high < low:
            raise ValueError(f"must be CPU numbers such as 3, 0,2 or 4-7 ({part!r} runs backwards)")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def _cpus(value: str) -> str:
    """A CPU list this process may run on (its affinity when started), checked at start-up."""
    cpus = cpu_list(value)
    if cpus:
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("needs Linux (this system cannot bind a process to CPUs)")
        allowed = os.sched_getaffinity(0)
        if missing := sorted(cpus - allowed):
            may_use = ",".join(map(str, sorted(allowed)))
            raise ValueError(f"names CPUs this process may not use: {missing} (it may use {may_use})")
    return value.strip()


def _certificates(path: str | None) -> str | None:
    """A PEM certificate file read at start-up: a missing or wrong file stops the service naming the setting."""
    if path:
        checked_certificates(path)
    return path


def _workspace_share(value: int, info: ValidationInfo, total_field: str, what: str, quarters: int = 1) -> int:
    """A per-workspace share of a process-wide bound: 0 is `quarters` quarters of it (by default one: four
    brands at their share before a fifth waits), and more than the whole is refused."""
    total = info.data.get(total_field)
    if total is None:  # absent: its own error says what is wrong
        return value
    if not value:
        return max(1, total * quarters // 4)
    if value > total:
        raise ValueError(
            f"must be at most TOKENSEND_{total_field.upper()} ({total}): a workspace's {what} are among it"
        )
    return value


def _key_beside_certificate(info: ValidationInfo, key_file: str) -> str:
    """A `..._key_file` setting, checked against its `..._cert_file` (defined, so validated, before it)."""
    cert_field = info.field_name.replace("_key_file", "_cert_file")
    if cert_field not in info.data:
        return key_file  # the certificate file's own error says what is wrong
    cert_file = info.data[cert_field]
    if bool(cert_file) != bool(key_file):
        raise ValueError(f"TOKENSEND_{cert_field.upper()} and TOKENSEND_{info.field_name.upper()} are set together")
    if key_file:
        check_key_pair(cert_file, key_file)
    return key_file


# Settings whose value names something checked when the settings are read.
Certificates = Annotated[str, AfterValidator(_certificates)]
CpuList = Annotated[str, AfterValidator(_cpus)]
OptionalCertificates = Annotated[str | None, AfterValidator(_certificates)]
GrpcTarget = Annotated[str, AfterValidator(_grpc_target)]
OutputFile = Annotated[str, AfterValidator(_writable)]
Pattern = Annotated[str, AfterValidator(_pattern)]
WebUrl = Annotated[str, AfterValidator(_web_url)]


MAX_DURATION_SECONDS = 10 * 365 * 86400
STATS_TTL_SECONDS = 400 * 86400  # past a year, so a campaign's counters outlast its yearly report
MAX_DURATION_TEXT = "ten years"
# The dispatcher's and the receipts service's alike: both count into a campaign's counters.
StatsTtl = Annotated[
    int,
    Field(
        ge=0,
        description="How long a campaign's counters are kept after their last count (a send or a receipt); "
        "0 keeps them until deleted.",
    ),
]


class CommonSettings(BaseSettings):
    """Settings every service shares."""

    # No float setting means "forever": gRPC deadlines and the shutdown timer overflow on infinity.
    model_config = SettingsConfigDict(env_prefix="TOKENSEND_", extra="ignore", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _duration_in_range(cls, value: object, info: ValidationInfo) -> object:
        """No duration longer than MAX_DURATION_SECONDS: a longer one, finite but absurd, overflows a
        timer (the shutdown deadline's thread) or is refused by Redis as an expiry, later and per call."""
        name = info.field_name or ""
        if isinstance(value, int | float) and not isinstance(value, bool):
            scale = 1000 if name.endswith("_ms") else 1 if name.endswith("_seconds") else 0
            if scale and value > MAX_DURATION_SECONDS * scale:
                raise ValueError(f"must be at most {MAX_DURATION_SECONDS * scale:,} ({MAX_DURATION_TEXT})")
        return value

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for configs, maps and counters (redis://, rediss://, unix://; "
        "memory://NAME: embedded, one process).",
    )
    secret_key: SecretStr | None = Field(
        None,
        description=(
            "32 random bytes, urlsafe base64: encrypts secrets at rest. Required unless TOKENSEND_DEV_MODE. "
            "While rotating, several comma-separated: the first seals, every one opens."
        ),
    )
    dev_mode: bool = Field(False, description="Allows starting without a secret key (a throwaway one is made).")
    grpc_host: str = Field("[::]", description="Address the gRPC server binds.")
    grpc_port: int = Field(0, ge=0, le=65535, description="The service's gRPC port (0 binds a free one).")
    grace_seconds: float = Field(
        10.0,
        ge=0,
        description="How long in-flight calls may finish after SIGTERM, and a stream's batches after one failed.",
    )
    allow_private_networks: bool = Field(
        False, description="Lets customer URLs reach loopback, private and link-local hosts (tests, demo)."
    )
    log_level: str = Field("INFO", description="Python logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="The event loop the service runs on: uvloop (libuv) or asyncio's own."
    )
    cpu_affinity: CpuList = Field(
        "",
        description=(
            "CPUs the service's process runs on, e.g. 3, 0,2 or 4-7 (Linux); empty: wherever the system puts "
            "it. One CPU per dispatcher process keeps its event loop and its provider client's thread on one "
            "core: about a fifth more SMS a second for a sixth less CPU each on a busy machine."
        ),
    )
    trace_export_file: OutputFile = Field(
        "", description="Also write finished spans to this file as JSON lines (benchmarks, offline review)."
    )
    metrics_export_file: OutputFile = Field(
        "", description="Also write metric points to this file as JSON lines, every 5 s and at shutdown."
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(REDIS_SCHEMES):  # the value is not echoed: it may hold a password
            raise ValueError(f"must start with {', '.join(REDIS_SCHEMES[:-1])} or {REDIS_SCHEMES[-1]}")
        if not value.startswith("memory://"):
            try:
                parse_url(value)  # what the client will read, read now: a bad port was a traceback at start
            except ValueError:
                raise ValueError("is not a Redis URL the client can read: check its host, port and options") from None
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("secret_key")
    @classmethod
    def _key_is_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        # Several keys, comma-separated, while secrets are re-sealed: the first seals, all open.
        for part in value.get_secret_value().split(","):
            try:
                raw = base64.urlsafe_b64decode(part.strip() + "==")
            except (binascii.Error, ValueError) as exc:
                raise ValueError("must be urlsafe base64 (each key, when several)") from exc
            if len(raw) != 32:
                raise ValueError("must decode to 32 bytes (each key, when several)")
        return value

    # -- access control, transport security, limits, Redis Cluster (docs/operations.md) --------------
    # Read as JSON here rather than by the settings source, whose errors were tracebacks naming no variable.
    clients: Annotated[list[ClientGrant], NoDecode] = Field(
        [],
        description=(
            'Clients allowed to call the gRPC services, JSON: [{"name": "engine", "token_sha256": "<hex>", '
            '"workspaces": ["acme"] or ["*"]}]; empty turns authentication off (development only).'
        ),
    )
    auth_open_health: bool = Field(True, description="Health checks need no token (load balancers, probes).")
    auth_open_reflection: bool = Field(
        False, description="Server reflection needs no token; when false any authenticated client may use it."
    )
    tls_cert_file: Certificates = Field(
        "", description="PEM certificate (chain) of the gRPC server; set with the key for TLS."
    )
    tls_key_file: str = Field("", description="PEM private key of the gRPC server's certificate.")
    tls_client_ca_file: Certificates = Field(
        "", description="PEM CA bundle; when set, gRPC clients must present a certificate it issued (mTLS)."
    )
    grpc_max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=4096,
        le=GRPC_MAX_INT,
        description="Largest gRPC message received; larger ones fail RESOURCE_EXHAUSTED.",
    )
    grpc_reuse_port: bool = Field(
        False,
        description="Share the gRPC port with other processes of the same service (SO_REUSEPORT: several "
        "dispatchers on one port). Off, a port another process holds stops the service with exit code 1.",
    )
    grpc_max_concurrent_streams: int = Field(
        256,
        ge=1,
        le=GRPC_MAX_INT,
        description="Calls one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); "
        "gRPC clients queue the ones past it until one ends. Each DispatchStream and StreamDeliveryEvents "
        "holds one for its whole length.",
    )
    grpc_max_connection_age_seconds: int = Field(
        1800,
        ge=0,
        le=GRPC_MAX_INT // 1000,
        description="Age (give or take a tenth, as gRPC spreads it) after which a client connection is asked "
        "to go away (GOAWAY): its client opens a new one for its next calls, so connections rebalance across "
        "replicas behind a load balancer. 0: connections live as long as their clients keep them.",
    )
    grpc_max_connection_age_grace_seconds: int = Field(
        86400,
        ge=0,
        le=GRPC_MAX_INT // 1000,
        description="How long the calls still open on a connection asked to go away may run on before it is "
        "closed (cut off UNAVAILABLE): a day, so that a DispatchStream campaign runs to its end. 0: none, they "
        "are cut off at once.",
    )
    redis_cluster: bool = Field(
        False, description="TOKENSEND_REDIS_URL names a node of a Redis Cluster (redis.asyncio.cluster)."
    )
    store_check_seconds: float = Field(
        2.0,
        ge=0,
        description="How often each service pings Redis: after two failed pings in a row its gRPC health is "
        "NOT_SERVING until Redis answers again. 0 turns the check off.",
    )
    config_cache_seconds: float = Field(
        60.0,
        ge=0,
        description="Longest a process keeps a connector, PII API, content API or OAuth config it read for a "
        "call; a save reaches every process at once through Redis pub/sub, this bounds the rest. "
        "0 reads on every call.",
    )

    @field_validator("clients", mode="before")
    @classmethod
    def _clients_json(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if not value.strip():
            return []
        try:
            return json.loads(value)
        except ValueError as exc:  # the value is not echoed: it may be a token pasted in place of its digest
            raise ValueError(f"must be a JSON list of clients ({exc.msg} at character {exc.pos})") from None

    @field_validator("clients")
    @classmethod
    def _one_client_a_token(cls, value: list[ClientGrant]) -> list[ClientGrant]:
        ClientRegistry(value)  # what every server builds: its refusal (two clients, one token) said now
        return value

    @field_validator("redis_cluster")
    @classmethod
    def _cluster_url(cls, value: bool, info: ValidationInfo) -> bool:
        url = info.data.get("redis_url", "")  # absent: its own error says what is wrong
        if not value or not url or url.startswith("memory://"):
            return value
        # redis-py's cluster client refuses these when it is made, a traceback at start; never echo the URL.
        if url.startswith("unix://"):
            raise ValueError("a Redis Cluster is reached over redis:// or rediss://, not unix://")
        if parse_url(url).get("db"):
            raise ValueError("a Redis Cluster has only database 0: drop the database from TOKENSEND_REDIS_URL")
        return value

    @field_validator("tls_key_file", "tls_client_ca_file")
    @classmethod
    def _tls_needs_a_certificate(cls, value: str, info: ValidationInfo) -> str:
        if info.field_name == "tls_key_file":
            return _key_beside_certificate(info, value)
        if value and not info.data.get("tls_cert_file", True):  # absent: its own error says what is wrong
            raise ValueError("mTLS needs the server's own TOKENSEND_TLS_CERT_FILE and TOKENSEND_TLS_KEY_FILE")
        return value

    def secret_keys(self) -> list[bytes]:
        """The keys of `TOKENSEND_SECRET_KEY`, first (sealing, and the root of derived keys) first."""
        if self.secret_key is None:
            return []
        return [base64.urlsafe_b64decode(p.strip() + "==") for p in self.secret_key.get_secret_value().split(",")]


class ResolverSettings(CommonSettings):
    """Settings of the resolver service."""

    grpc_port: int = Field(50051, ge=0, le=65535, description="The resolver's gRPC port.")
    pii_retry_base_ms: int = Field(500, ge=0, description="First retry delay of a PII API call (full jitter).")
    pii_retry_max_ms: int = Field(5000, ge=0, description="Longest delay between PII API retries.")
    pii_max_retry_after_seconds: float = Field(30.0, ge=0, description="Longest Retry-After the resolver will wait.")
    pii_concurrency: int = Field(
        64,
        ge=1,
        description="Concurrent PII API calls per resolver process, shared by all its calls; each workspace's "
        "within TOKENSEND_PII_CONCURRENCY_PER_WORKSPACE.",
    )
    pii_concurrency_per_workspace: int = Field(
        0,
        ge=0,
        validate_default=True,
        description="Concurrent PII API calls one workspace's APIs may hold in a resolver process, so a brand "
        "whose API hangs leaves the others their places; at most TOKENSEND_PII_CONCURRENCY. "
        "0: a quarter of TOKENSEND_PII_CONCURRENCY (at least 1).",
    )
    circuit_failure_threshold: int = Field(
        5, ge=1, description="Consecutive failed calls that open a PII API's circuit."
    )
    circuit_open_seconds: float = Field(30.0, ge=0, description="How long an open circuit fails fast before a probe.")
    config_versions_kept: int = Field(
        20,
        ge=1,
        description=(
            "Versions of each PII API or content API config kept, the latest included;"
            " older ones stay while a campaign instance's pin holds them."
            " Lowered, the versions beyond the new window go at each config's next save."
        ),
    )
    pin_ttl_seconds: int = Field(7 * 86400, ge=1, description="How long a campaign instance keeps its config version.")
    max_response_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Largest PII API reply read.")

    egress_proxy: SecretStr | None = Field(
        None,
        description="http://[user:pass@]host:port proxy that PII API, token endpoint and content API calls go "
        "through (fixed egress IPs for brands' allow-lists).",
    )

    content_cache_entries: int = Field(
        10_000, ge=0, description="Replies of all-non-sensitive content APIs cached in memory (per ID); 0 disables."
    )

    @field_validator("pii_concurrency_per_workspace")
    @classmethod
    def _workspace_share(cls, value: int, info: ValidationInfo) -> int:
        return _workspace_share(value, info, "pii_concurrency", "calls")

    @field_validator("egress_proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not _is_web_url(value.get_secret_value()):  # not echoed: it may hold a password
            raise ValueError("must be http://[user:password@]host:port")
        return value


class DispatcherSettings(CommonSettings):
    """Settings of the dispatcher service."""

    grpc_port: int = Field(50052, ge=0, le=65535, description="The dispatcher's gRPC port.")
    resolver_addr: GrpcTarget = Field(
        "127.0.0.1:50051", description="Where the dispatcher finds the resolver (host:port)."
    )
    message_ttl_seconds: int = Field(7 * 86400, ge=1, description="Lifetime of a message-ID map entry.")
    stats_ttl_seconds: StatsTtl = STATS_TTL_SECONDS
    public_webhook_url: WebUrl = Field(
        "http://127.0.0.1:8080", description="The receipts webhooks' base URL as providers see it."
    )
    batch_size: int = Field(
        500,
        ge=1,
        le=10_000,
        description="Recipients resolved and sent together (a resolver call and an admission script per 1,000).",
    )
    # The request guard refuses a call of over 100,000 recipients (`libs.limits`): more would do nothing.
    max_recipients_per_call: int = Field(
        10_000, ge=1, le=100_000, description="Most recipients one Dispatch call may carry."
    )
    send_concurrency: int = Field(
        128,
        ge=1,
        le=10_000,
        description="Provider requests in flight per dispatcher process, shared by all its campaigns; each "
        "workspace's within TOKENSEND_SEND_CONCURRENCY_PER_WORKSPACE.",
    )
    send_concurrency_per_workspace: int = Field(
        0,
        ge=0,
        validate_default=True,
        description="Provider requests one workspace's campaigns may have in flight in a dispatcher process, so a "
        "brand whose provider hangs leaves the others their send slots; at most TOKENSEND_SEND_CONCURRENCY. "
        "0: three quarters of it (at least 1), not a quarter as for PII API calls: waiting for the provider "
        "takes most of a send, so a lone brand's sends per second follow its requests in flight (at 100 ms a "
        "request a quarter cut its SMS by 59%, three quarters by 7%). Set it to the whole where one brand "
        "needs every slot.",
    )
    claim_lease_seconds: int = Field(
        300, ge=1, description="How long a recipient stays claimed by a send in progress; a crashed send frees it then."
    )
    paced_fetch_seconds: float = Field(
        5.0,
        ge=0.1,
        le=3600,
        description="Under a connector's rate limit, the seconds of sending one PII API fetch covers: a batch "
        "fetches its contacts part by part as its send slots come near, so they wait about this long at most.",
    )
    idempotency_ttl_seconds: int = Field(
        30 * 86400,
        ge=1,
        description="How long a sent recipient is remembered per instance, and the campaign an instance belongs to "
        "(from its latest call).",
    )
    resolver_timeout_seconds: float = Field(60.0, gt=0, description="Deadline of one ResolveContacts call.")
    provider_max_retries: int = Field(
        3, ge=0, description="Retries of a provider call on 429, 5xx or refused connections."
    )
    provider_retry_base_ms: int = Field(200, ge=0, description="First retry delay of a provider call (full jitter).")
    provider_retry_max_ms: int = Field(5000, ge=0, description="Longest delay between provider retries.")
    provider_max_retry_after_seconds: float = Field(30.0, ge=0, description="Longest Retry-After a send will wait.")
    provider_connect_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="How long one attempt may take to connect to a provider, an SMTP relay's greeting included "
        "(then retried).",
    )
    provider_read_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a connected provider has to answer one attempt (then OUTCOME_UNKNOWN, never resent); "
        "an HTTP attempt gets connect + read as one deadline.",
    )

    archive_retention_seconds: int = Field(
        90 * 86400,
        ge=0,
        description="How long the archive keeps what reconstructs a sent message (never its PII); 0 disables it.",
    )

    blind_index_ttl_seconds: int = Field(
        30 * 86400,
        ge=0,
        description="How long a keyed hash of a number sent to by SMS/WhatsApp maps to its anonymous ID (for STOP); "
        "0 keeps none, so a STOP reply is not matched to its recipient.",
    )

    unsubscribe_link_ttl_seconds: int = Field(
        60 * 86400, ge=1, description="How long an email's one-click unsubscribe link works."
    )

    audit_stream_maxlen: int = Field(
        1_000_000, ge=1, description="Approximate length the per-workspace reconstruction audit stream is trimmed to."
    )
    reconstructions_per_minute: int = Field(
        60,
        ge=0,
        description="ReconstructMessage calls one client may make per workspace and minute (0: no limit). Past it "
        "the call is RESOURCE_EXHAUSTED, the minute's first refusal audited: a flood of calls neither fetches PII "
        "in bulk nor pushes real entries out of the audit stream.",
    )

    # -- the dispatcher as a client of the resolver (docs/operations.md) ------------------------------
    resolver_token: SecretStr | None = Field(
        None, description="Bearer token the dispatcher presents to the resolver (one of the resolver's clients)."
    )
    resolver_tls_ca_file: Certificates = Field(
        "", description="PEM CA bundle trusted for the resolver's certificate; set to reach the resolver over TLS."
    )
    resolver_tls_cert_file: Certificates = Field("", description="PEM client certificate for mTLS to the resolver.")
    resolver_tls_key_file: str = Field("", description="PEM private key of the client certificate.")
    resolver_tls_server_name: str = Field(
        "", description="Name expected in the resolver's certificate when it differs from the address's host."
    )

    @field_validator("resolver_tls_key_file")
    @classmethod
    def _client_key(cls, value: str, info: ValidationInfo) -> str:
        return _key_beside_certificate(info, value)

    @field_validator("send_concurrency_per_workspace")
    @classmethod
    def _workspace_share(cls, value: int, info: ValidationInfo) -> int:
        return _workspace_share(value, info, "send_concurrency", "provider requests", quarters=3)


class ReceiptsSettings(CommonSettings):
    """Settings of the receipts service."""

    grpc_port: int = Field(50053, ge=0, le=65535, description="The receipts service's gRPC port.")
    http_port: int = Field(8080, ge=0, le=65535, description="The receipts webhook port.")
    public_webhook_url: WebUrl = Field(
        "http://127.0.0.1:8080", description="The receipts webhooks' base URL as providers see it."
    )
    http_host: str = Field("", description="Address the webhook server binds; empty binds every interface.")
    http_tls_cert_file: Certificates = Field(
        "", description="PEM certificate (chain) of the webhook server; set with the key to serve HTTPS."
    )
    http_tls_key_file: str = Field("", description="PEM private key of the webhook server's certificate.")
    # Each provider's documented maximum fits its limit: SNS messages (SES's receipts) are at most 256 KiB,
    # SendGrid's event batches and Twilio's status callbacks stay under 1 MiB; Meta's WhatsApp webhooks carry
    # up to 3 MB (batches of statuses and messages).
    max_receipt_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Largest SendGrid, SES or Twilio receipt body accepted (webhook 413, IngestReceipt "
        "INVALID_ARGUMENT). The webhook bodies held at once, any provider's, total at most 256 times this "
        "(past it: 503 with Retry-After).",
    )
    max_whatsapp_receipt_bytes: int = Field(
        3 * 1024 * 1024,
        ge=1,
        description="Largest WhatsApp Cloud API receipt body accepted (Meta's webhooks carry up to 3 MB), "
        "held within the same bound as the other providers' bodies.",
    )
    receipt_read_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a webhook request may take to send its body before it is refused (408)."
    )
    sendgrid_timestamp_tolerance_seconds: int = Field(
        600, ge=1, description="SendGrid webhook timestamps further than this from now are refused as replays."
    )
    # The dispatcher's setting, read here too: the dedupe window must cover the map's lifetime.
    message_ttl_seconds: int = Field(7 * 86400, ge=1, description="Lifetime of a message-ID map entry.")
    stats_ttl_seconds: StatsTtl = STATS_TTL_SECONDS
    # The dispatcher's setting, read here too: a STOP renews its number's link for that long.
    blind_index_ttl_seconds: int = Field(
        30 * 86400,
        ge=0,
        description="How long a keyed hash of a number sent to by SMS/WhatsApp maps to its anonymous ID (for STOP); "
        "0 keeps none, so a STOP reply is not matched to its recipient.",
    )
    receipt_dedupe_ttl_seconds: int = Field(
        7 * 86400,
        ge=1,
        description="How long a provider event's identity is remembered, to drop redeliveries and replays "
        "(WhatsApp and Twilio signatures carry no time; an SNS message signed longer ago than this is refused); "
        "at least TOKENSEND_MESSAGE_TTL_SECONDS, which the "
        "receipts service reads too. A STOP replayed after it suppresses its sender again, even after a START, "
        "unless that START was sent after it and less than a week ago (WhatsApp dates both; Twilio does not).",
    )
    # SNS gives up on an HTTP(S) endpoint within an hour whatever its delivery policy says: a longer window
    # would only lose events that counting them unmapped keeps. 45 s: SNS's default policy tries again at
    # about 20, 40 and 60 s, and that last attempt is then acknowledged.
    receipt_index_wait_seconds: int = Field(
        45,
        ge=0,
        le=3600,
        description="How long after its own time an SES event that names only SES's message ID (an identity's "
        "notification), not indexed yet by the dispatcher, is answered 503 for SNS to deliver again rather than "
        "counted unmapped; keep it under the SNS subscription's retry span (about 60 s by default); 0 counts it "
        "unmapped at once.",
    )
    events_stream_maxlen: int = Field(
        100_000, ge=1, description="Approximate length the per-workspace delivery event stream is trimmed to."
    )
    events_stream_ttl_seconds: int = Field(
        7 * 86400,
        ge=1,
        description="How long the per-workspace delivery event stream is kept after its newest event; a "
        "StreamDeliveryEvents resumed with an after_id from before it expired is answered OUT_OF_RANGE.",
    )
    events_stream_block_ms: int = Field(
        2000,
        ge=1,
        le=4000,
        description="How long one XREAD of StreamDeliveryEvents blocks; below the Redis socket timeout (5 s).",
    )
    # A tail holds one of the process's 256 pooled Redis connections in its blocking read: at most 192, so
    # that webhooks and ledger writes always find one.
    events_max_streams: int = Field(
        64,
        ge=1,
        le=192,
        description="StreamDeliveryEvents calls tailing at once per receipts process, each holding a Redis "
        "connection in its blocking read; one more is refused RESOURCE_EXHAUSTED until one ends.",
    )
    events_max_streams_per_workspace: int = Field(
        0,
        ge=0,
        validate_default=True,
        description="Of TOKENSEND_EVENTS_MAX_STREAMS, the tails one workspace may hold on a process, so that "
        "one brand's idle tails cannot lock the others out; at most TOKENSEND_EVENTS_MAX_STREAMS. 0: a quarter "
        "of it (at least 1).",
    )
    sns_cert_host_pattern: Pattern = Field(
        r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$",
        description="Regex the host[:port] of SNS SigningCertURL and SubscribeURL must match (https only).",
    )
    sns_ca_file: OptionalCertificates = Field(
        None, description="CA bundle trusted when fetching SNS certificates and SubscribeURLs; default the system's."
    )
    sns_signing_ca_file: OptionalCertificates = Field(
        None,
        description="If set, the SNS signing certificate must be issued by a CA in this file (in addition to https).",
    )
    sns_cert_cache_size: int = Field(32, ge=1, description="SNS signing certificates kept in memory, by URL.")
    sns_fetch_timeout_seconds: float = Field(
        5.0, gt=0, description="Timeout for fetching an SNS certificate or confirming a subscription."
    )

    @field_validator("http_tls_key_file")
    @classmethod
    def _https_needs_both(cls, value: str, info: ValidationInfo) -> str:
        return _key_beside_certificate(info, value)

    def receipt_limit(self, provider: str) -> tuple[int, str]:
        """The largest receipt body accepted from `provider`, and the variable that sets it."""
        if provider == "whatsapp":
            return self.max_whatsapp_receipt_bytes, "TOKENSEND_MAX_WHATSAPP_RECEIPT_BYTES"
        return self.max_receipt_bytes, "TOKENSEND_MAX_RECEIPT_BYTES"

    @field_validator("events_max_streams_per_workspace")
    @classmethod
    def _workspace_streams(cls, value: int, info: ValidationInfo) -> int:
        return _workspace_share(value, info, "events_max_streams", "tails")

    @field_validator("receipt_dedupe_ttl_seconds")
    @classmethod
    def _dedupe_outlives_the_map(cls, value: int, info: ValidationInfo) -> int:
        # A receipt replayed once its marker expired, its message still mapped, would be counted again.
        message_ttl = info.data.get("message_ttl_seconds")
        if message_ttl is not None and value < message_ttl:
            raise ValueError(
                f"must be at least TOKENSEND_MESSAGE_TTL_SECONDS ({message_ttl}): a receipt replayed after "
                "its dedupe marker expires, while its message is still mapped, would be counted again"
            )
        return value
