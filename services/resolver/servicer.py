"""ResolverService handlers: config CRUD (PII and content APIs), the Test button and ResolveContacts."""

from __future__ import annotations

import logging
import time

import grpc
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as pb_grpc

from libs.anonymous_ids import RULE as ANONYMOUS_ID_RULE
from libs.anonymous_ids import valid_anonymous_id
from libs.config_index import check_page_size
from libs.crypto import SealedDataInvalid
from libs.errors import Aborted, FailedPrecondition, NotFound, require
from libs.json_documents import parse
from libs.masked_secrets import masked_reply
from libs.netguard import origin
from libs.scrub import scrub_text
from libs.settings import ResolverSettings
from libs.store import check_id
from libs.telemetry import taint_scope
from services.resolver.configs import (
    MASK,
    OAuthConfigStore,
    PiiApiConfigStore,
    Unopened,
    keep_masked_secrets,
    kept_url,
    masked_oauth_config,
    masked_pii_config,
    tested_config_secrets,
)
from services.resolver.content_apis import CONTENT_FAILED_MESSAGE, ContentApis
from services.resolver.content_apis import MAX_APIS_PER_CALL as MAX_CONTENT_APIS
from services.resolver.content_apis import NAME as CONTENT_API_NAME
from services.resolver.extraction import leaf_paths
from services.resolver.oauth import OAuthTokens, TokenUnavailable
from services.resolver.pii_client import (
    CallResult,
    Extraction,
    PiiApiClient,
    caller_deadline,
    display_message,
    pii_rate,
)
from services.resolver.validation import (
    apply_defaults,
    check_attribute_names,
    validate_oauth_config,
    validate_pii_api_config,
)

log = logging.getLogger(__name__)

MAX_IDS_PER_CALL = 1000
# Checks of which configs use an OAuth config before its delete gives up, while configs naming it are saved.
OAUTH_DELETE_ATTEMPTS = 3
# Of the time a caller gives ResolveContacts, the share kept for content APIs and the reply's way back.
REPLY_SHARE = 0.1


class ResolverServicer(pb_grpc.ResolverServiceServicer):
    def __init__(
        self,
        settings: ResolverSettings,
        pii_configs: PiiApiConfigStore,
        oauth_configs: OAuthConfigStore,
        tokens: OAuthTokens,
        client: PiiApiClient,
        content_apis: ContentApis | None = None,
    ) -> None:
        self._settings = settings
        self._pii_configs = pii_configs
        self._oauth_configs = oauth_configs
        self._tokens = tokens
        self._client = client
        self._content_apis = content_apis

    async def _previous(self, config: pb.PiiApiConfig) -> pb.PiiApiConfig | None:
        try:
            return await self._pii_configs.load(config.workspace_id, config.channel)
        except (NotFound, SealedDataInvalid):  # nothing readable to keep secrets from: save as given
            return None

    async def _prepare(self, config: pb.PiiApiConfig, prefix: str) -> pb.PiiApiConfig:
        """Defaults, masked secrets restored from the saved version, validation, OAuth status."""
        prepared = pb.PiiApiConfig()
        prepared.CopyFrom(config)
        prepared.ClearField("version")
        require(prepared.channel != common_pb2.CHANNEL_UNSPECIFIED, f"{prefix}.channel", "is required")
        check_id(prepared.workspace_id, f"{prefix}.workspace_id")
        keep_masked_secrets(prepared, await self._previous(prepared), prefix)
        apply_defaults(prepared)
        validate_pii_api_config(prepared, self._settings.allow_private_networks, prefix)
        check_attribute_names(prepared, prefix)
        if prepared.oauth_config_id:
            try:
                oauth = await self._oauth_configs.load(prepared.workspace_id, prepared.oauth_config_id)
            except NotFound:
                raise FailedPrecondition(
                    f"{prefix}.oauth_config_id: OAuth config {prepared.oauth_config_id!r} does not exist"
                ) from None
            if oauth.status != pb.TOKEN_STATUS_ACTIVE:
                raise FailedPrecondition(
                    f"{prefix}.oauth_config_id: OAuth config {prepared.oauth_config_id!r} is "
                    f"{pb.TokenStatus.Name(oauth.status)}, only a TOKEN_STATUS_ACTIVE one can be used"
                )
        return prepared

    async def PutPiiApiConfig(self, request: pb.PutPiiApiConfigRequest, context: grpc.aio.ServicerContext):
        require(request.HasField("config"), "config", "is required")
        config = await self._prepare(request.config, "config")
        version = await self._pii_configs.save(config, request.expected_version)
        config.version = version
        log.info(
            "saved PII API config %s/%s v%d", config.workspace_id, common_pb2.Channel.Name(config.channel), version
        )
        return pb.PutPiiApiConfigResponse(config=masked_pii_config(config), version=version)

    async def GetPiiApiConfig(self, request: pb.GetPiiApiConfigRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.channel != common_pb2.CHANNEL_UNSPECIFIED, "channel", "is required")
        config = await self._pii_configs.load(request.workspace_id, request.channel, request.version)
        return pb.GetPiiApiConfigResponse(config=masked_pii_config(config), version=config.version)

    async def PutOAuthConfig(self, request: pb.PutOAuthConfigRequest, context: grpc.aio.ServicerContext):
        require(request.HasField("config"), "config", "is required")
        config = pb.OAuthConfig()
        config.CopyFrom(request.config)
        config.ClearField("status")
        config.ClearField("status_reason")
        config.ClearField("version")
        secret_masked = config.client_secret == MASK
        if secret_masked or MASK in config.token_url:
            # A config read back (masked) and saved again keeps what it had.
            check_id(config.workspace_id, "config.workspace_id")
            check_id(config.oauth_config_id, "config.oauth_config_id")
            try:
                previous = await self._oauth_configs.load(config.workspace_id, config.oauth_config_id)
            except NotFound:
                field = "config.client_secret" if secret_masked else "config.token_url"
                require(False, field, "is masked but no saved config exists")
            if secret_masked:
                same_host = origin(config.token_url) == origin(previous.token_url)
                require(same_host, "config.client_secret", "is masked, and token_url points at another host: enter it")
                config.client_secret = previous.client_secret
            # An edited URL keeps no mask it has no saved value for: it would be saved, and sent, as eight stars.
            config.token_url = kept_url(config.token_url, previous.token_url, "config.token_url")
        validate_oauth_config(config, self._settings.allow_private_networks)
        await self._oauth_configs.check_version(config.workspace_id, config.oauth_config_id, request.expected_version)
        try:
            token, lifetime = await self._tokens.request_token(config)
            config.status = pb.TOKEN_STATUS_ACTIVE
            self._tokens.remember(config, token, lifetime)
        except TokenUnavailable as exc:
            config.status, config.status_reason = pb.TOKEN_STATUS_FAILED, exc.reason
        config.version = await self._oauth_configs.save(config, request.expected_version)
        log.info(
            "saved OAuth config %s/%s: %s",
            config.workspace_id,
            config.oauth_config_id,
            pb.TokenStatus.Name(config.status),
        )
        return pb.PutOAuthConfigResponse(config=masked_oauth_config(config))

    async def GetOAuthConfig(self, request: pb.GetOAuthConfigRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        check_id(request.oauth_config_id, "oauth_config_id")
        config = await self._oauth_configs.load(request.workspace_id, request.oauth_config_id)
        return pb.GetOAuthConfigResponse(config=masked_oauth_config(config))

    async def TestPiiApiConfig(self, request: pb.TestPiiApiConfigRequest, context: grpc.aio.ServicerContext):
        require(bool(request.test_anonymous_id), "test_anonymous_id", "is required")
        require(valid_anonymous_id(request.test_anonymous_id), "test_anonymous_id", ANONYMOUS_ID_RULE)
        target = request.WhichOneof("target")
        require(target is not None, "target", "set config (unsaved) or saved (workspace_id, channel)")
        if target == "config":
            config = await self._prepare(request.config, "config")
        else:
            check_id(request.saved.workspace_id, "saved.workspace_id")
            require(request.saved.channel != common_pb2.CHANNEL_UNSPECIFIED, "saved.channel", "is required")
            config = await self._pii_configs.load(
                request.saved.workspace_id, request.saved.channel, request.saved.version
            )
        started = time.monotonic()
        _keep_to_deadline(context)
        with taint_scope():
            return await self._test(config, request.test_anonymous_id, started)

    async def _test(
        self, config: pb.PiiApiConfig, test_anonymous_id: str, started: float
    ) -> pb.TestPiiApiConfigResponse:
        result, extraction = await self._client.test(config, config.channel, test_anonymous_id, rate=pii_rate(config))
        response = pb.TestPiiApiConfigResponse()
        code = _fill_test_reply(response, result, extraction, started, tested_config_secrets(config, result.tokens))
        if code:
            response.error.message = display_message(code, config.channel)
        else:
            response.contact = extraction.contact
            response.attributes.update(extraction.attributes)
        return response

    async def TestContentApiConfig(self, request: pb.TestContentApiConfigRequest, context: grpc.aio.ServicerContext):
        require(self._content_apis is not None, "target", "content APIs are not available")
        require(bool(request.test_anonymous_id), "test_anonymous_id", "is required")
        require(valid_anonymous_id(request.test_anonymous_id), "test_anonymous_id", ANONYMOUS_ID_RULE)
        target = request.WhichOneof("target")
        require(target is not None, "target", "set config (unsaved) or saved (workspace_id, name)")
        if target == "config":
            config = await self._content_apis.prepare(request.config)
        else:
            check_id(request.saved.workspace_id, "saved.workspace_id")
            require(bool(CONTENT_API_NAME.match(request.saved.name)), "saved.name", "must be an identifier")
            config = await self._content_apis.store.load(
                request.saved.workspace_id, request.saved.name, request.saved.version
            )
        started = time.monotonic()
        _keep_to_deadline(context)
        with taint_scope():
            result, extraction = await self._content_apis.test(config, request.test_anonymous_id)
            response = pb.TestContentApiConfigResponse()
            secrets = tested_config_secrets(config, result.tokens)
            if _fill_test_reply(response, result, extraction, started, secrets):
                response.error.message = CONTENT_FAILED_MESSAGE
            else:
                response.fields.update(extraction.attributes)
            return response

    async def ResolveContacts(self, request: pb.ResolveContactsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.channel != common_pb2.CHANNEL_UNSPECIFIED, "channel", "is required")
        require(
            len(request.anonymous_ids) <= MAX_IDS_PER_CALL,
            "anonymous_ids",
            f"at most {MAX_IDS_PER_CALL} per call, got {len(request.anonymous_ids)}",
        )
        if request.campaign_id:
            check_id(request.campaign_id, "campaign_id")
        version, pin_for = request.config_version, ""
        if version == 0 and request.campaign_instance_id:
            pin_for = check_id(request.campaign_instance_id, "campaign_instance_id")
        # The request is checked whole before anything is read: a bad one is INVALID_ARGUMENT whatever is saved.
        names = list(dict.fromkeys(request.content_api_names))
        if names:
            require(self._content_apis is not None, "content_api_names", "content APIs are not available")
            require(len(names) <= MAX_CONTENT_APIS, "content_api_names", f"at most {MAX_CONTENT_APIS}")
            for i, name in enumerate(names):
                require(bool(CONTENT_API_NAME.match(name)), f"content_api_names[{i}]", "must be an identifier")
        for name in sorted(request.content_api_versions):
            # A pin for an API not fetched pins nothing: most likely a name misspelt in one of the two.
            if name not in names:
                field = f"content_api_versions[{name!r}]" if CONTENT_API_NAME.match(name) else "content_api_versions"
                require(False, field, "pins a content API that content_api_names does not name")
        config, oauth = await self._pii_configs.load_with_oauth(
            self._oauth_configs, request.workspace_id, request.channel, version, pin_for
        )
        _keep_to_deadline(context)
        with taint_scope():
            response = pb.ResolveContactsResponse(config_version=config.version)
            await self._client.resolve(config, request.channel, list(request.anonymous_ids), oauth, response.contacts)
            if names:
                usage = await self._content_apis.attach(
                    list(response.contacts),
                    request.workspace_id,
                    names,
                    dict(request.content_api_versions),
                    request.campaign_instance_id,
                )
                response.content_apis.extend(usage)
            return response

    async def PutContentApiConfig(self, request: pb.PutContentApiConfigRequest, context: grpc.aio.ServicerContext):
        require(request.HasField("config"), "config", "is required")
        require(self._content_apis is not None, "config", "content APIs are not available")
        config = await self._content_apis.prepare(request.config)
        version = await self._content_apis.store.save(config, request.expected_version)
        config.version = version
        log.info("saved content API config %s/%s v%d", config.workspace_id, config.name, version)
        return pb.PutContentApiConfigResponse(config=masked_pii_config(config), version=version)

    async def GetContentApiConfig(self, request: pb.GetContentApiConfigRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(bool(CONTENT_API_NAME.match(request.name)), "name", "must be an identifier")
        require(self._content_apis is not None, "name", "content APIs are not available")
        config = await self._content_apis.store.load(request.workspace_id, request.name, request.version)
        return pb.GetContentApiConfigResponse(config=masked_pii_config(config), version=config.version)

    # -- listing and deleting configs ----------------------------------------------------------------

    async def ListPiiApiConfigs(self, request: pb.ListPiiApiConfigsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        configs = await self._pii_configs.summaries(request.workspace_id)
        return pb.ListPiiApiConfigsResponse(configs=configs)

    async def ListOAuthConfigs(self, request: pb.ListOAuthConfigsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        page_size = check_page_size(request.page_size)
        configs, token = await self._oauth_configs.summaries(request.workspace_id, page_size, request.page_token)
        return pb.ListOAuthConfigsResponse(configs=configs, next_page_token=token)

    async def ListContentApiConfigs(self, request: pb.ListContentApiConfigsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        page_size = check_page_size(request.page_size)
        if self._content_apis is None:
            return pb.ListContentApiConfigsResponse()
        configs, token = await self._content_apis.store.summaries(request.workspace_id, page_size, request.page_token)
        return pb.ListContentApiConfigsResponse(configs=configs, next_page_token=token)

    async def DeletePiiApiConfig(self, request: pb.DeletePiiApiConfigRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.channel != common_pb2.CHANNEL_UNSPECIFIED, "channel", "is required")
        version = await self._pii_configs.delete(request.workspace_id, request.channel, request.expected_version)
        log.info(
            "deleted PII API config %s/%s (versions up to %d)",
            request.workspace_id,
            common_pb2.Channel.Name(request.channel),
            version,
        )
        return pb.DeletePiiApiConfigResponse(version=version)

    async def DeleteOAuthConfig(self, request: pb.DeleteOAuthConfigRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        check_id(request.oauth_config_id, "oauth_config_id")
        workspace_id, oauth_config_id = request.workspace_id, request.oauth_config_id
        for _ in range(OAUTH_DELETE_ATTEMPTS):
            # The delete goes ahead only if no config naming it was saved while we checked (its uses count).
            uses = await self._oauth_configs.uses(workspace_id, oauth_config_id)
            user, unopened = await self._pii_configs.oauth_user(workspace_id, oauth_config_id)
            if not user and self._content_apis is not None:
                user, unopened_content = await self._content_apis.store.oauth_user(workspace_id, oauth_config_id)
                unopened = unopened or unopened_content
            if user:
                raise FailedPrecondition(
                    f"oauth_config_id: OAuth config {oauth_config_id!r} is used by {user}: "
                    "save that config without it, or delete it, first"
                )
            if unopened:
                raise _may_be_used(oauth_config_id, unopened)
            if await self._oauth_configs.delete(workspace_id, oauth_config_id, uses, request.expected_version):
                break
        else:
            raise Aborted(
                f"oauth_config_id: configs naming OAuth config {oauth_config_id!r} kept being saved: try again"
            )
        self._tokens.forget(workspace_id, oauth_config_id)
        log.info("deleted OAuth config %s/%s", request.workspace_id, request.oauth_config_id)
        return pb.DeleteOAuthConfigResponse()

    async def DeleteContentApiConfig(
        self, request: pb.DeleteContentApiConfigRequest, context: grpc.aio.ServicerContext
    ):
        check_id(request.workspace_id, "workspace_id")
        require(bool(CONTENT_API_NAME.match(request.name)), "name", "must be an identifier")
        require(self._content_apis is not None, "name", "content APIs are not available")
        version = await self._content_apis.store.delete(request.workspace_id, request.name, request.expected_version)
        log.info("deleted content API config %s/%s (versions up to %d)", request.workspace_id, request.name, version)
        return pb.DeleteContentApiConfigResponse(version=version)


def _may_be_used(oauth_config_id: str, unopened: Unopened) -> FailedPrecondition:
    """Why an OAuth config is kept that a config which does not open may use, and what mends that."""
    if unopened.pinned:
        which = f"version {unopened.version}, which a campaign instance is pinned to"
        mend = "delete that config, or wait until the pins on that version end (TOKENSEND_PIN_TTL_SECONDS)"
    else:
        which, mend = f"version {unopened.version}", "save that config again with its secrets, or delete it"
    return FailedPrecondition(
        f"oauth_config_id: OAuth config {oauth_config_id!r} cannot be deleted while {unopened.what} ({which}) "
        "does not open with TOKENSEND_SECRET_KEY: it was sealed under a key not configured, so whether it uses "
        f"this OAuth config cannot be checked; add that key to TOKENSEND_SECRET_KEY, or {mend}, first"
    )


def _keep_to_deadline(context: grpc.aio.ServicerContext | None) -> None:
    """Attempts and retries of this call's API calls stop at the caller's deadline, less a share kept
    for the reply: each ends with its error (a timeout, the attempts made), not DEADLINE_EXCEEDED."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        caller_deadline.set(time.monotonic() + remaining * (1 - REPLY_SHARE))


MAX_PATH_SHOWN = 1024
# What a Test reply shows of the API's reply: gRPC clients (grpcurl, the dispatcher's, the stubs) take
# 4 MiB by default, and a reply up to TOKENSEND_MAX_RESPONSE_BYTES (8 MiB) shown whole, or one path per
# leaf of a large document, would reach them as RESOURCE_EXHAUSTED instead of the call's outcome.
MAX_BODY_SHOWN = 256 * 1024
MAX_PATHS_SHOWN = 1000


def shown_body(text: str) -> str:
    """`text` (masked already) cut to MAX_BODY_SHOWN characters, saying how much more there was."""
    if len(text) <= MAX_BODY_SHOWN:
        return text
    return f"{text[:MAX_BODY_SHOWN]}\n[... {len(text) - MAX_BODY_SHOWN} more characters not shown]"


def _fill_test_reply(
    response: pb.TestPiiApiConfigResponse | pb.TestContentApiConfigResponse,
    result: CallResult,
    extraction: Extraction,
    started: float,
    secrets: list[str],
) -> int:
    """What both Test screens show of a call: status, body, its leaf paths, time and the error, if any
    (returned; the caller adds the error's display text). The config's `secrets` an API quotes back (its
    key in an error) are masked: the Test screen shows no more of the config than a read does."""
    response.http_status = result.http_status
    # Masked whole, then cut: a secret the cut would halve is masked already.
    response.response_body = shown_body(masked_reply(result.body.decode("utf-8", errors="replace"), secrets))
    response.latency_ms = int((time.monotonic() - started) * 1000)
    try:
        paths = leaf_paths(parse(result.body))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than its paths can be listed
        paths = []
    # The paths are shown unmasked, and an API may key its records by contact (`{"ann@x.org": {...}}`)
    # or by a value the call read: those parts are scrubbed out.
    read = [extraction.contact, *extraction.attributes.values()]
    response.response_keys.extend(
        scrub_text(masked_reply(path, secrets), limit=MAX_PATH_SHOWN, extra=read) for path in paths[:MAX_PATHS_SHOWN]
    )
    code = extraction.error or result.error
    if code:
        response.error.CopyFrom(
            pb.ResolveError(
                code=code,
                http_status=result.http_status,
                attempts=result.attempts,
                detail=masked_reply(extraction.detail or result.detail, secrets),
            )
        )
    return code
