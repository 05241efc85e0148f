"""Validation of PII API and OAuth configs; errors name the offending field."""

from __future__ import annotations

import json
import re

import phonenumbers
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb
from yarl import URL

from libs.errors import require
from libs.header_rules import BAD_HEADER_NAME, CLIENT_HEADERS, CONTROL, HEADER_NAME
from libs.netguard import BlockedAddress, check_literal_host, port_of, split_url
from libs.store import check_id
from services.resolver.extraction import decode_key, path_error
from services.resolver.requests import BULK_PLACEHOLDER, SINGLE_PLACEHOLDER, looks_like_json

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 1000
DEFAULT_TIMEOUT_MS = 5000
MAX_TIMEOUT_MS = 60_000
DEFAULT_MAX_RETRIES = 3
MAX_RETRIES = 10
# Slots 10 µs apart at most: the limiter counts whole microseconds between them.
MAX_REQUESTS_PER_SECOND = 100_000
MAX_URL_LENGTH = 2048
MAX_BODY_LENGTH = 16 * 1024
MAX_ENTRIES = 50
MAX_VALUE_LENGTH = 4096
DUPLICATE_HEADER = "names a header twice: header names are the same whatever their case"

_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
# Names a template already gives a meaning: the recipient's own attributes and the content APIs' fields.
# A fetched attribute by one of these names would be hidden by it, never rendered.
TEMPLATE_NAMES = frozenset({"recipient", "content"})


# What ends a query parameter's name in a URL, or could not stand in one.
QUERY_NAME_BREAKS = re.compile(r"[=&?#\s\x00-\x1f\x7f]")
BAD_QUERY_NAME = "holds a name with '=', '&', '?', '#', whitespace or control characters: put the value apart"


def check_url(url: str, field: str, allow_private: bool) -> None:
    require(bool(url), field, "is required")
    require(len(url) <= MAX_URL_LENGTH, field, f"must be at most {MAX_URL_LENGTH} characters")
    require(not any(c in url for c in "\r\n\t "), field, "must not contain whitespace")
    require(not CONTROL.search(url), field, "must not contain control characters")
    parts = split_url(url)
    require(parts is not None, field, "is not a valid URL")
    allowed = ("https", "http") if allow_private else ("https",)
    require(parts.scheme in allowed, field, "must be an https:// URL")
    require(bool(parts.hostname), field, "must name a host")
    require(port_of(parts) not in (False, 0), field, "has an invalid port")
    require(parts.username is None and parts.password is None, field, "must not carry credentials; use headers")
    require(not parts.fragment and "#" not in url, field, "must not have a fragment (#...): it is never sent")
    require(_connectable_host(url), field, BAD_HOST)
    try:
        check_literal_host(url, allow_private)
    except BlockedAddress:
        raise_blocked(field)


BAD_HOST = (
    "names a host the HTTP client cannot connect to: a character no host name holds (a zero-width or soft "
    "hyphen), an empty label (..) or a label longer than 63 characters"
)


def _connectable_host(url: str) -> bool:
    """Whether the HTTP client can send to the URL's host: yarl refuses some characters outright, and the
    name is IDNA-encoded to be looked up. Saved otherwise, every call would fail on it."""
    try:
        (URL(url).raw_host or "").encode("idna")
    except ValueError:  # UnicodeError included
        return False
    return True


def raise_blocked(field: str) -> None:
    require(False, field, "points at a private, loopback or link-local address, which is not allowed")


def _check_map(values: dict[str, str], field: str, *, header: bool) -> None:
    require(len(values) <= MAX_ENTRIES, field, f"must have at most {MAX_ENTRIES} entries")
    if header:
        require(len({k.lower() for k in values}) == len(values), field, DUPLICATE_HEADER)
    for key, value in values.items():
        if header:
            require(bool(HEADER_NAME.match(key)), field, BAD_HEADER_NAME)
            require(
                key.lower() not in CLIENT_HEADERS,
                f"{field}[{key!r}]",
                "is set by the HTTP client from the request itself; it cannot be configured",
            )
        else:
            require(0 < len(key) <= 256, f"{field}", "keys must be 1-256 characters")
            # A name holding '=' or '&' is a pair pasted whole ("api_key=..."): the map is named, never the name.
            require(not QUERY_NAME_BREAKS.search(key), field, BAD_QUERY_NAME)
        require(len(value) <= MAX_VALUE_LENGTH, f"{field}[{key!r}]", f"must be at most {MAX_VALUE_LENGTH} characters")
        require("\r" not in value and "\n" not in value, f"{field}[{key!r}]", "must not contain line breaks")
        if header:
            require(not CONTROL.search(value), f"{field}[{key!r}]", "must not contain control characters")


def _check_path(expression: str, field: str, required: bool) -> None:
    if not expression:
        require(not required, field, "is required")
        return
    reason = path_error(expression)
    require(reason is None, field, reason or "")


def apply_defaults(config: pb.PiiApiConfig) -> None:
    if config.mode == pb.MODE_BULK and config.batch_size == 0:
        config.batch_size = DEFAULT_BATCH_SIZE
    if config.timeout_ms == 0:
        config.timeout_ms = DEFAULT_TIMEOUT_MS
    if not config.HasField("max_retries"):
        config.max_retries = DEFAULT_MAX_RETRIES


def validate_pii_api_config(config: pb.PiiApiConfig, allow_private: bool, prefix: str = "config") -> None:
    """Checks a config (defaults applied) and raises InvalidArgument naming the first bad field."""
    f = lambda name: f"{prefix}.{name}"  # noqa: E731 - field path helper
    check_id(config.workspace_id, f("workspace_id"))
    require(config.channel != common_pb2.CHANNEL_UNSPECIFIED, f("channel"), "is required")
    require(config.mode in (pb.MODE_SINGLE, pb.MODE_BULK), f("mode"), "must be MODE_SINGLE or MODE_BULK")
    require(
        config.method in (pb.HTTP_METHOD_GET, pb.HTTP_METHOD_POST),
        f("method"),
        "must be HTTP_METHOD_GET or HTTP_METHOD_POST",
    )
    if config.mode == pb.MODE_BULK:
        require(
            config.method == pb.HTTP_METHOD_POST, f("method"), "bulk mode sends the IDs in a body: use HTTP_METHOD_POST"
        )
    check_url(config.url, f("url"), allow_private)
    _check_map(dict(config.query_params), f("query_params"), header=False)
    _check_map(dict(config.headers), f("headers"), header=True)
    require(len(config.body) <= MAX_BODY_LENGTH, f("body"), f"must be at most {MAX_BODY_LENGTH} characters")
    if config.oauth_config_id:
        check_id(config.oauth_config_id, f("oauth_config_id"))
        for name in config.headers:
            # The token's header replaces it: an @anonymous_id there would never be sent.
            require(
                name.lower() != "authorization",
                f(f"headers[{name!r}]"),
                "is set from the OAuth token when oauth_config_id is set",
            )
    require(1 <= config.timeout_ms <= MAX_TIMEOUT_MS, f("timeout_ms"), f"must be 1..{MAX_TIMEOUT_MS}")
    require(config.max_retries <= MAX_RETRIES, f("max_retries"), f"must be 0..{MAX_RETRIES}")
    require(
        config.max_requests_per_second <= MAX_REQUESTS_PER_SECOND,
        f("max_requests_per_second"),
        f"must be 0..{MAX_REQUESTS_PER_SECOND} (0: no limit)",
    )
    _check_path(config.contact_path, f("contact_path"), required=True)
    require(
        len(config.attribute_paths) <= MAX_ENTRIES, f("attribute_paths"), f"must have at most {MAX_ENTRIES} entries"
    )
    for name, path in config.attribute_paths.items():
        require(
            bool(_ATTRIBUTE_NAME.match(name)),
            f(f"attribute_paths[{name!r}]"),
            "name must be a template identifier (letters, digits, '_')",
        )
        _check_path(path, f(f"attribute_paths[{name!r}]"), required=True)
    if config.default_region:
        require(config.channel != common_pb2.CHANNEL_EMAIL, f("default_region"), "is for phone numbers (SMS, WhatsApp)")
        require(
            config.default_region in phonenumbers.SUPPORTED_REGIONS,
            f("default_region"),
            'must be a region code in capitals, such as "US" or "GB"',
        )
    if config.encryption_key:
        try:
            decode_key(config.encryption_key)
        except ValueError as exc:
            require(False, f("encryption_key"), str(exc))

    if config.mode == pb.MODE_BULK:
        require(1 <= config.batch_size <= MAX_BATCH_SIZE, f("batch_size"), f"must be 1..{MAX_BATCH_SIZE}")
        require(BULK_PLACEHOLDER in config.body, f("body"), 'bulk mode needs "@anonymous_ids" in the body')
        # Nothing replaces it in a bulk request: it would reach the API as the text "@anonymous_id".
        require(
            not SINGLE_PLACEHOLDER.search(config.body),
            f("body"),
            'holds @anonymous_id, which bulk mode does not fill in: the batch\'s IDs go where "@anonymous_ids" is',
        )
        try:
            json.loads(config.body.replace(BULK_PLACEHOLDER, "[]"))
        except ValueError:
            require(False, f("body"), 'must be JSON once "@anonymous_ids" is replaced by the ID array')
        templated = [config.url, *config.query_params.values(), *config.headers.values()]
        require(
            not any(SINGLE_PLACEHOLDER.search(t) for t in templated),
            f("url"),
            "bulk mode personalises only the body; @anonymous_id is not allowed in the URL, query or headers",
        )
        _check_path(config.results_path, f("results_path"), required=True)
        _check_path(config.id_path, f("id_path"), required=True)
    else:
        require(config.batch_size <= 1, f("batch_size"), "applies to bulk mode only")
        require("@anonymous_ids" not in config.body, f("body"), '"@anonymous_ids" is for bulk mode; use @anonymous_id')
        if config.method == pb.HTTP_METHOD_GET:
            require(not config.body, f("body"), "a GET request has no body")
        templated = [config.url, config.body, *config.query_params.values(), *config.headers.values()]
        require(
            any(SINGLE_PLACEHOLDER.search(t) for t in templated),
            f("url"),
            "single mode needs @anonymous_id in the URL, a query parameter, a header or the body",
        )
        if config.body and looks_like_json(config.body):
            try:
                json.loads(SINGLE_PLACEHOLDER.sub("x", config.body))
            except ValueError:
                require(False, f("body"), "looks like JSON but does not parse")
        _check_path(config.results_path, f("results_path"), required=False)
        # Optional: set, each reply's record must carry the ID asked for there.
        _check_path(config.id_path, f("id_path"), required=False)


def check_attribute_names(config: pb.PiiApiConfig, prefix: str = "config") -> None:
    """A PII API's attributes are template variables ({{ first_name }}): none may take a name templates
    use for something else. (A content API's fields sit under its name, and may.)"""
    for name in config.attribute_paths:
        require(
            name not in TEMPLATE_NAMES,
            f"{prefix}.attribute_paths[{name!r}]",
            "is a name templates keep for the recipient's attributes and content APIs ({{ recipient.x }}, "
            "{{ content.x }}); choose another",
        )


# RFC 6749 appendix A: a client_id is VSCHARs (%x20-7E). Anything else goes as such into the token request,
# which the endpoint refuses.
_CLIENT_ID = re.compile(r"[\x20-\x7e]*")


def validate_oauth_config(config: pb.OAuthConfig, allow_private: bool, prefix: str = "config") -> None:
    check_id(config.workspace_id, f"{prefix}.workspace_id")
    check_id(config.oauth_config_id, f"{prefix}.oauth_config_id")
    check_url(config.token_url, f"{prefix}.token_url", allow_private)
    require(0 < len(config.client_id) <= 512, f"{prefix}.client_id", "is required (at most 512 characters)")
    require(0 < len(config.client_secret) <= 4096, f"{prefix}.client_secret", "is required (at most 4096 characters)")
    for name in ("client_id", "client_secret", "scope", "audience"):
        value = getattr(config, name)
        require("\r" not in value and "\n" not in value, f"{prefix}.{name}", "must not contain line breaks")
    require(
        _CLIENT_ID.fullmatch(config.client_id) is not None,
        f"{prefix}.client_id",
        "must be printable ASCII, spaces allowed (RFC 6749): no control or non-ASCII characters",
    )
    require(config.client_secret.isprintable(), f"{prefix}.client_secret", "must not contain control characters")
    require(len(config.scope) <= 1024, f"{prefix}.scope", "must be at most 1024 characters")
    require(
        config.scope.isprintable(),
        f"{prefix}.scope",
        "must not contain control characters (scopes are separated by spaces)",
    )
    require(len(config.audience) <= 1024, f"{prefix}.audience", "must be at most 1024 characters")
    require(config.audience.isprintable(), f"{prefix}.audience", "must not contain control characters")
