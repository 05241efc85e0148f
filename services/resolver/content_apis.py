"""Named content APIs: a brand's other APIs whose fields templates use as `{{ content.<name>.<field> }}`.

They share the PII API's request machinery (single or bulk, OAuth, retries,
circuit breaker, decryption); only the extraction differs: named fields, no
contact. Every field is PII unless the config declares it non-sensitive, so
fetched values are tainted like contacts. Only replies whose every field is
non-sensitive may be cached, and only in this process's memory (a bounded TTL
cache per config version and anonymous ID); nothing fetched ever reaches Redis.

Configs are versioned and sealed like PII API configs, and a campaign instance
keeps the version it started with:
- `ts:{ws}:content:<name>:latest` version counter, `...:v:<n>` sealed config,
  `...:pin:<instance>` the instance's version (TTL `pin_ttl_seconds`).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs import config_index
from libs.errors import FailedPrecondition, InvalidArgument, NotFound, require
from libs.store import check_id, workspace_key
from libs.telemetry import taint
from services.resolver.configs import (
    OAuthConfigStore,
    Unopened,
    VersionedConfigStore,
    keep_masked_secrets,
    summary_of,
)
from services.resolver.pii_client import CallResult, Extraction, PiiApiClient, RequestRate, gather_or_cancel
from services.resolver.validation import apply_defaults, validate_pii_api_config

E = pb.ResolveErrorCode
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
MAX_APIS_PER_CALL = 10
MAX_CACHE_TTL_SECONDS = 86400
CONTENT_FAILED_MESSAGE = "Invalid API response (fetching content)"


def request_config(config: pb.ContentApiConfig) -> pb.PiiApiConfig:
    """The same call as a PII API config, so the PII API client's machinery makes it."""
    return pb.PiiApiConfig(
        workspace_id=config.workspace_id,
        channel=common_pb2.CHANNEL_EMAIL,  # unused: content APIs return no contact
        mode=config.mode,
        method=config.method,
        url=config.url,
        query_params=config.query_params,
        headers=config.headers,
        body=config.body,
        oauth_config_id=config.oauth_config_id,
        batch_size=config.batch_size,
        timeout_ms=config.timeout_ms,
        max_retries=config.max_retries if config.HasField("max_retries") else None,
        contact_path="@",
        results_path=config.results_path,
        id_path=config.id_path,
        attribute_paths=config.field_paths,
        encryption_key=config.encryption_key,
        version=config.version,
        max_requests_per_second=config.max_requests_per_second,  # validated with the rest; kept by `content_rate`
    )


def content_rate(config: pb.ContentApiConfig) -> RequestRate | None:
    """A content API's cap, by its name: its own API, apart from the PII API and the other content APIs."""
    if not config.max_requests_per_second:
        return None
    return RequestRate(workspace_key(config.workspace_id, "content-rate", config.name), config.max_requests_per_second)


def prepare_content_config(config: pb.ContentApiConfig, allow_private: bool, prefix: str = "config") -> None:
    """Defaults applied in place, then every rule of a PII API config plus the content API's own."""
    check_id(config.workspace_id, f"{prefix}.workspace_id")
    require(bool(NAME.match(config.name)), f"{prefix}.name", "must be an identifier (letters, digits, '_')")
    as_request = request_config(config)
    apply_defaults(as_request)
    try:
        validate_pii_api_config(as_request, allow_private, prefix)
    except InvalidArgument as exc:
        # The shared rules name PII API fields; the content API calls them fields.
        raise InvalidArgument(exc.field.replace("attribute_paths", "field_paths"), exc.description) from None
    config.batch_size, config.timeout_ms = as_request.batch_size, as_request.timeout_ms
    config.max_retries = as_request.max_retries
    require(len(config.field_paths) > 0, f"{prefix}.field_paths", "name at least one field")
    for i, field in enumerate(config.non_sensitive_fields):
        if field not in config.field_paths:
            # Named by its place, and echoed only when it is a field name: never a value pasted in its place.
            if NAME.match(field):
                description = f"{field!r} is not a field of field_paths"
            else:
                description = "is not a field of field_paths (their names are letters, digits and '_')"
            raise InvalidArgument(f"{prefix}.non_sensitive_fields[{i}]", description)
    require(
        config.cache_ttl_seconds <= MAX_CACHE_TTL_SECONDS,
        f"{prefix}.cache_ttl_seconds",
        f"must be at most {MAX_CACHE_TTL_SECONDS}",
    )
    if config.cache_ttl_seconds:
        require(
            set(config.field_paths) <= set(config.non_sensitive_fields),
            f"{prefix}.cache_ttl_seconds",
            "only a content API whose every field is non-sensitive may be cached",
        )


class ContentApiConfigStore(VersionedConfigStore):
    message_type = pb.ContentApiConfig
    kind = "content"
    # Where configs saved before the index are found: their version counter.
    layout = config_index.Layout(kind, "content", lambda name: bool(NAME.match(name)), ":latest")

    @staticmethod
    def _base(workspace_id: str, name: str) -> str:
        return workspace_key(workspace_id, "content", name)

    @staticmethod
    def _what(workspace_id: str, name: str) -> str:
        return f"content API {name!r} in workspace {workspace_id!r}"

    async def save(self, config: pb.ContentApiConfig, expected_version: int = 0) -> int:
        """Saves a new version; with `expected_version`, only while the latest is that one (Aborted)."""
        base = self._base(config.workspace_id, config.name)
        what = self._what(config.workspace_id, config.name)
        return await self._save_at(base, config, config.workspace_id, config.name, what, expected_version)

    async def delete(self, workspace_id: str, name: str, expected_version: int = 0) -> int:
        """Deletes the content API's config, every version; NotFound when there is none. With
        `expected_version`, only while the latest version is that one (Aborted)."""
        await self._backfill.wait()
        base, what = self._base(workspace_id, name), self._what(workspace_id, name)
        version = await self._delete_at(base, workspace_id, name, what, expected_version)
        if not version:
            raise NotFound(f"no content API {name!r} in workspace {workspace_id!r}")
        return version

    async def summaries(
        self, workspace_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.ContentApiConfigSummary], str]:
        """One page of the workspace's content API configs by name, and the next page's token."""
        await self._backfill.wait()
        names, updated, token = await config_index.page(
            self._redis, workspace_id, self.kind, page_size, page_token, lambda name: bool(NAME.match(name))
        )
        configs = await self._latest_configs([self._base(workspace_id, name) for name in names])
        return [
            summary_of(pb.ContentApiConfigSummary(name=name, updated_at_ms=updated[name]), config)
            for name, config in zip(names, configs, strict=True)
            if config is not None
        ], token

    async def oauth_user(self, workspace_id: str, oauth_config_id: str) -> tuple[str, Unopened | None]:
        """Which content API config (and version) uses the OAuth config, "" when none does; and, when none
        does, the first version found that does not open, so may use it."""
        await self._backfill.wait()
        unopened = None
        for name in await config_index.all_names(self._redis, workspace_id, self.kind):
            version, found = await self._version_using_oauth(self._base(workspace_id, name), oauth_config_id)
            if version:
                return f"content API {name!r} (version {version})", None
            if found and not unopened:
                unopened = replace(found, what=f"content API {name!r}")
        return "", unopened

    async def latest_version(self, workspace_id: str, name: str) -> int:
        return await self._latest_at(self._base(workspace_id, name))

    async def find(self, workspace_id: str, name: str) -> pb.ContentApiConfig | None:
        try:
            return await self.load(workspace_id, name)
        except NotFound:
            return None

    async def load(
        self, workspace_id: str, name: str, version: int = 0, campaign_instance_id: str = "", *, cached: bool = False
    ) -> pb.ContentApiConfig:
        """`cached`: for a call, which may use (and keep) what this process read before."""
        what = self._what(workspace_id, name)
        return await self._load_at(self._base(workspace_id, name), version, what, campaign_instance_id, cached=cached)


class ContentCache:
    """Replies of all-non-sensitive content APIs, in process memory only, per config version and ID."""

    def __init__(self, max_entries: int, clock=time.monotonic) -> None:
        self._entries: OrderedDict[tuple[str, str, int, str], tuple[float, dict[str, str]]] = OrderedDict()
        self._max = max(0, max_entries)
        self._clock = clock

    def get(self, key: tuple[str, str, int, str]) -> dict[str, str] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: tuple[str, str, int, str], fields: dict[str, str], ttl_seconds: int) -> None:
        if self._max == 0 or ttl_seconds <= 0:
            return
        self._entries[key] = (self._clock() + ttl_seconds, dict(fields))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


@dataclass
class ContentOutcome:
    """Per API: its usage (for the caller), and per ID either the fields or a PII-free failure detail."""

    usage: pb.ContentApiUsage
    fields: dict[str, dict[str, str]]
    failures: dict[str, str]


class ContentApis:
    """Saves content API configs and fetches their fields for resolved IDs."""

    def __init__(
        self,
        store: ContentApiConfigStore,
        oauth_configs: OAuthConfigStore,
        client: PiiApiClient,
        cache: ContentCache,
        allow_private: bool,
    ) -> None:
        self.store = store
        self._oauth_configs = oauth_configs
        self._client = client
        self._cache = cache
        self._allow_private = allow_private

    async def prepare(self, config: pb.ContentApiConfig) -> pb.ContentApiConfig:
        prepared = pb.ContentApiConfig()
        prepared.CopyFrom(config)
        prepared.ClearField("version")
        check_id(prepared.workspace_id, "config.workspace_id")
        require(bool(NAME.match(prepared.name)), "config.name", "must be an identifier (letters, digits, '_')")
        keep_masked_secrets(prepared, await self.store.find(prepared.workspace_id, prepared.name))
        prepare_content_config(prepared, self._allow_private)
        if prepared.oauth_config_id:
            try:
                oauth = await self._oauth_configs.load(prepared.workspace_id, prepared.oauth_config_id)
            except NotFound:
                raise FailedPrecondition(
                    f"config.oauth_config_id: OAuth config {prepared.oauth_config_id!r} does not exist"
                ) from None
            if oauth.status != pb.TOKEN_STATUS_ACTIVE:
                raise FailedPrecondition(
                    f"config.oauth_config_id: OAuth config {prepared.oauth_config_id!r} is "
                    f"{pb.TokenStatus.Name(oauth.status)}, only a TOKEN_STATUS_ACTIVE one can be used"
                )
        return prepared

    async def configs_for(
        self, workspace_id: str, names: Sequence[str], versions: dict[str, int], campaign_instance_id: str
    ) -> list[pb.ContentApiConfig]:
        """The configs to use: an asked-for version, else the instance's pin, else the latest."""
        configs = []
        for name in names:
            version = versions.get(name, 0)
            configs.append(await self.store.load(workspace_id, name, version, campaign_instance_id, cached=True))
        return configs

    async def fetch(self, config: pb.ContentApiConfig, anonymous_ids: list[str]) -> ContentOutcome:
        usage = pb.ContentApiUsage(
            name=config.name, version=config.version, non_sensitive_fields=config.non_sensitive_fields
        )
        outcome = ContentOutcome(usage, {}, {})
        cacheable = config.cache_ttl_seconds > 0 and set(config.field_paths) <= set(config.non_sensitive_fields)
        wanted = []
        for anonymous_id in anonymous_ids:
            cached = self._cache.get(self._cache_key(config, anonymous_id)) if cacheable else None
            if cached is not None:
                outcome.fields[anonymous_id] = cached
            else:
                wanted.append(anonymous_id)
        if wanted:
            extractions = await self._client.fetch_fields(request_config(config), wanted, content_rate(config))
            sensitive = set(config.field_paths) - set(config.non_sensitive_fields)
            for anonymous_id in wanted:
                extraction = extractions.get(anonymous_id)
                if extraction is None or extraction.error:
                    code = E.Name(extraction.error) if extraction else "RESOLVE_ERROR_CODE_INVALID_ID"
                    detail = extraction.detail if extraction else ""
                    outcome.failures[anonymous_id] = (
                        f"content API {config.name!r}: {code.removeprefix('RESOLVE_ERROR_CODE_')}"
                        + (f" ({detail})" if detail else "")
                    )
                    continue
                # Values are PII unless the brand declared the field otherwise.
                taint(v for k, v in extraction.attributes.items() if k in sensitive)
                outcome.fields[anonymous_id] = extraction.attributes
                if cacheable:
                    key = self._cache_key(config, anonymous_id)
                    self._cache.put(key, extraction.attributes, config.cache_ttl_seconds)
        return outcome

    async def test(self, config: pb.ContentApiConfig, anonymous_id: str) -> tuple[CallResult, Extraction]:
        """One call for the config screen: the raw reply and the fields found in it (never cached)."""
        result, extraction = await self._client.test(
            request_config(config), common_pb2.CHANNEL_EMAIL, anonymous_id, rate=content_rate(config), fields_only=True
        )
        sensitive = set(config.field_paths) - set(config.non_sensitive_fields)
        taint(v for k, v in extraction.attributes.items() if k in sensitive)
        return result, extraction

    @staticmethod
    def _cache_key(config: pb.ContentApiConfig, anonymous_id: str) -> tuple[str, str, int, str]:
        return (config.workspace_id, config.name, config.version, anonymous_id)

    async def attach(
        self,
        contacts: list[pb.ResolvedContact],
        workspace_id: str,
        names: Sequence[str],
        versions: dict[str, int],
        campaign_instance_id: str,
    ) -> list[pb.ContentApiUsage]:
        """Fetches every named API for the IDs whose contact resolved and puts the fields on them;
        an ID for which any API failed becomes a CONTENT_API_FAILED error (its contact dropped)."""
        configs = await self.configs_for(workspace_id, names, versions, campaign_instance_id)
        resolved = list(dict.fromkeys(c.anonymous_id for c in contacts if not c.HasField("error")))
        outcomes = await gather_or_cancel(self.fetch(c, resolved) for c in configs) if resolved else []
        for contact in contacts:
            if contact.HasField("error"):
                continue
            failures = [o.failures[contact.anonymous_id] for o in outcomes if contact.anonymous_id in o.failures]
            if failures:
                anonymous_id = contact.anonymous_id
                contact.Clear()
                contact.anonymous_id = anonymous_id
                contact.error.CopyFrom(
                    pb.ResolveError(
                        code=E.RESOLVE_ERROR_CODE_CONTENT_API_FAILED,
                        message=CONTENT_FAILED_MESSAGE,
                        detail="; ".join(failures)[:512],
                    )
                )
                continue
            for o in outcomes:
                contact.content[o.usage.name].fields.update(o.fields.get(contact.anonymous_id, {}))
        return [o.usage for o in outcomes] or [
            pb.ContentApiUsage(name=c.name, version=c.version, non_sensitive_fields=c.non_sensitive_fields)
            for c in configs
        ]
