"""Looking at messages without storing PII: the masked preview and the audited reconstruction.

`MessagePreview` renders a campaign's content for one anonymous ID with the live
PII API and masks every fetched value wherever it shows in the output (any
letter case, URL-encoded, HTML-escaped), so a marketer checks layout and logic
without seeing personal data. `MessageReconstruction` renders an archived
message again with the PII API and content API versions it was sent with, and
refuses to return anything it could not write to the audit log first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from libs.guard import calling_client
from libs.masking import mask_contact, mask_fetched, stand_in
from libs.settings import DispatcherSettings
from libs.suppressions import SuppressionStore, channel_family
from libs.telemetry import taint, taint_scope
from libs.unsubscribe import UnsubscribeTokens, list_unsubscribe_headers
from services.dispatcher.archive import MessageArchive
from services.dispatcher.campaign import fetched_field_names, non_sensitive_fields, sensitive_values
from services.dispatcher.connectors import PROVIDER_NAMES
from services.dispatcher.connectors.whatsapp import template_param
from services.dispatcher.rendering import ContentTemplates, RenderedContent, RenderFailed
from services.dispatcher.resolver_client import ResolverClient, resolve_error_code

log = logging.getLogger(__name__)

AUDIT_OK = "reconstructed"
WHATSAPP_CLOUD = PROVIDER_NAMES[pb.CONNECTOR_KIND_WHATSAPP_CLOUD]


def failure_text(error: rpb.ResolveError) -> str:
    """The display message and, when there is one, its cause (which content API, which HTTP status): the
    detail names causes, never a value."""
    return f"{error.message} [{error.detail}]" if error.detail else error.message


def rendered_message(rendered: RenderedContent, headers: dict[str, str] | None = None) -> pb.RenderedMessage:
    return pb.RenderedMessage(
        subject=rendered.subject,
        html_body=rendered.html_body,
        text_body=rendered.text_body,
        sms_body=rendered.sms_body,
        whatsapp_params=rendered.whatsapp_params,
        headers=headers or {},
    )


def masked(rendered: RenderedContent, values: list[str], shadow: RenderedContent | None = None) -> pb.RenderedMessage:
    """`rendered` with the fetched `values` masked; with `shadow` (the same content rendered with
    stand-ins for them), whatever else came from a value is starred too (`mask_fetched`)."""
    if shadow is not None and len(shadow.whatsapp_params) != len(rendered.whatsapp_params):
        shadow = None  # cannot happen for one template; without a pair, no comparison
    return pb.RenderedMessage(
        subject=mask_fetched(rendered.subject, values, shadow=shadow and shadow.subject),
        html_body=mask_fetched(rendered.html_body, values, html=True, shadow=shadow and shadow.html_body),
        text_body=mask_fetched(rendered.text_body, values, shadow=shadow and shadow.text_body),
        sms_body=mask_fetched(rendered.sms_body, values, shadow=shadow and shadow.sms_body),
        whatsapp_params=[
            mask_fetched(p, values, shadow=shadow and shadow.whatsapp_params[i])
            for i, p in enumerate(rendered.whatsapp_params)
        ],
    )


class LookupStandIn(str):
    """A value's stand-in that, as a key, finds what the value finds (`{{ stores[city] }}`), and so
    compares equal to it: a branch on the value takes the same way. It prints as the stand-in."""

    _value: str

    def __new__(cls, shown: str, value: str) -> LookupStandIn:
        stand_in = super().__new__(cls, shown)
        stand_in._value = value  # underscored: out of a sandboxed template's reach
        return stand_in

    def __eq__(self, other: object) -> bool:
        return self._value == other

    def __ne__(self, other: object) -> bool:
        return self._value != other

    def __hash__(self) -> int:
        return hash(self._value)


class MessagePreview:
    def __init__(self, resolver: ResolverClient, suppressions: SuppressionStore) -> None:
        self._resolver = resolver
        self._suppressions = suppressions

    async def preview(
        self, workspace_id: str, channel: int, templates: ContentTemplates, recipient: pb.Recipient, topic: str
    ) -> pb.PreviewMessageResponse:
        response = pb.PreviewMessageResponse()
        suppressed = await self._suppressions.find(
            workspace_id, channel_family(channel), topic, [recipient.anonymous_id]
        )
        response.suppressed = bool(suppressed)
        with taint_scope():
            # No campaign instance: the latest configs, and no version is pinned by a preview.
            resolution = await self._resolver.resolve_for_sending(
                workspace_id, channel, [recipient.anonymous_id], "", "", templates.content_apis
            )
            contact = resolution.contacts[0]
            if contact.HasField("error"):
                response.error_code = resolve_error_code(contact.error.code)
                response.error_message = failure_text(contact.error)
                return response
            content = {name: dict(values.fields) for name, values in contact.content.items()}
            non_sensitive = non_sensitive_fields(resolution)
            secret = [contact.contact, *contact.attributes.values()]
            secret += sensitive_values(content, non_sensitive)
            # Stand-ins are the values turned letter by letter: as much PII as the values themselves.
            stand_ins = {value: stand_in(value) for value in secret}
            taint([*secret, *stand_ins.values()])
            response.fetched_fields.extend(fetched_field_names(contact.attributes, content))
            response.masked_contact = mask_contact(contact.contact)
            recipient_attributes = dict(recipient.attributes)
            try:
                rendered = templates.render(dict(contact.attributes), recipient_attributes, content)
            except RenderFailed as exc:
                response.error_code, response.error_message = "RENDER_FAILED", exc.reason
                return response
            shadow = self._shadow(templates, contact, recipient_attributes, content, non_sensitive, stand_ins)
            if shadow is None:
                # Nothing tells what came from a value apart from the template's own text: all is starred.
                shadow = RenderedContent(whatsapp_params=[""] * len(rendered.whatsapp_params))
            response.rendered.CopyFrom(masked(rendered, secret, shadow))
            if channel == common_pb2.CHANNEL_WHATSAPP:
                # Only WhatsApp Cloud sends a template, its parameters' line breaks and tabs as spaces:
                # shown as sent. Masked first, as the values were fetched.
                params = response.rendered.whatsapp_params
                params[:] = [template_param(p) for p in params]
            return response

    @staticmethod
    def _shadow(
        templates: ContentTemplates,
        contact: rpb.ResolvedContact,
        recipient_attributes: dict[str, str],
        content: dict[str, dict[str, str]],
        non_sensitive: dict[str, set[str]],
        stand_ins: dict[str, str],
    ) -> RenderedContent | None:
        """The content rendered with stand-ins for the fetched values. A template that looks keys up
        by a value (`{{ stores[city] }}`) does not render with them: then with stand-ins that find the
        keys their values find. None when neither renders."""
        for stand_in_of in (stand_ins.__getitem__, lambda value: LookupStandIn(stand_ins[value], value)):
            attributes = {name: stand_in_of(value) for name, value in contact.attributes.items()}
            shadow_content = {
                api: {k: v if k in non_sensitive.get(api, set()) else stand_in_of(v) for k, v in fields.items()}
                for api, fields in content.items()
            }
            try:
                return templates.render(attributes, recipient_attributes, shadow_content)
            except RenderFailed:
                continue
        return None


class MessageReconstruction:
    def __init__(
        self,
        resolver: ResolverClient,
        archive: MessageArchive,
        tokens: UnsubscribeTokens,
        settings: DispatcherSettings,
    ) -> None:
        self._resolver = resolver
        self._archive = archive
        self._tokens = tokens
        self._settings = settings

    async def reconstruct(self, request: pb.ReconstructMessageRequest) -> pb.ReconstructMessageResponse:
        workspace_id, message_id = request.workspace_id, request.message_id
        await self._admit(request)
        found = await self._archive.load(workspace_id, message_id)
        if found is None:
            await self._audit(request, "", "not_archived")
            raise NotFound(f"message {message_id!r} is not in the archive (kept {self._archive.retention_days:g} days)")
        entry, content = found
        if content is None:
            await self._audit(request, entry.anonymous_id, "template_expired")
            raise NotFound(f"the content of message {message_id!r} is no longer archived")
        audited = [False]

        async def audit(outcome: str) -> str:
            # Audited once written: a call cut off during the write is audited as cut off (below), or its
            # fetch would be in no entry. One whose write landed unanswered may so have two.
            audit_id = await self._audit(request, entry.anonymous_id, outcome)
            audited[0] = True
            return audit_id

        # Every call is in the audit log, those that fail on the way too (a config version no longer
        # kept, the resolver or the brand's API unreachable): the outcome names the error's kind.
        try:
            try:
                templates = await asyncio.to_thread(ContentTemplates, content)  # seconds, for a big one
            except InvalidArgument as exc:
                # The request is fine: the archived content compiled when it was sent, and a limit or
                # rule has changed since. The field and the rule are named, the content is not quoted.
                await audit("render_failed")
                raise FailedPrecondition(
                    f"the archived content cannot be rebuilt now: {exc.field} {exc.description} "
                    "(it compiled when the message was sent; a limit or rule has changed since)"
                ) from None
            with taint_scope():
                # The versions it was sent with: a later config change does not change the past message.
                resolution = await self._resolver.resolve_for_sending(
                    workspace_id,
                    entry.channel,
                    [entry.anonymous_id],
                    entry.campaign_id,
                    "",
                    templates.content_apis,
                    config_version=entry.pii_config_version,
                    content_api_versions=entry.content_api_versions,
                )
                contact = resolution.contacts[0]
                if contact.HasField("error"):
                    await audit("resolve_failed")
                    what = "content" if contact.error.code == rpb.RESOLVE_ERROR_CODE_CONTENT_API_FAILED else "PII"
                    raise FailedPrecondition(f"the {what} could not be fetched again: {failure_text(contact.error)}")
                content_fields = {name: dict(values.fields) for name, values in contact.content.items()}
                taint(
                    [
                        contact.contact,
                        *contact.attributes.values(),
                        *sensitive_values(content_fields, non_sensitive_fields(resolution)),
                    ]
                )
                try:
                    rendered = templates.render(dict(contact.attributes), entry.recipient, content_fields)
                except RenderFailed as exc:
                    await audit("render_failed")
                    raise FailedPrecondition(f"the message does not render any more: {exc.reason}") from None
                if entry.provider == WHATSAPP_CLOUD:
                    # As Meta was sent them: the connector sends a parameter's line breaks and tabs as spaces.
                    rendered.whatsapp_params = [template_param(p) for p in rendered.whatsapp_params]
                headers = {}
                if entry.unsubscribe_expires_at:
                    token = self._tokens.sign(workspace_id, message_id, entry.unsubscribe_expires_at)
                    headers = list_unsubscribe_headers(self._settings.public_webhook_url, token)
                # Nothing is returned that the audit log does not record.
                audit_id = await audit(AUDIT_OK)
                # Not the audit ID: a stream ID's digits read as a phone number, and the log's scrubbing
                # blanks it. ListReconstructions finds the entry by the message.
                log.info("message %s/%s reconstructed for review", workspace_id, message_id)
                return pb.ReconstructMessageResponse(
                    message_id=message_id,
                    campaign_id=entry.campaign_id,
                    campaign_instance_id=entry.campaign_instance_id,
                    anonymous_id=entry.anonymous_id,
                    channel=entry.channel,
                    connector_id=entry.connector_id,
                    sent_at_ms=entry.sent_at_ms,
                    contact=contact.contact,
                    rendered=rendered_message(rendered, headers),
                    fetched_fields=fetched_field_names(contact.attributes, content_fields),
                    pii_api_config_version=resolution.config_version,
                    audit_id=audit_id,
                    fetched_fields_at_send=entry.fetched_fields,
                )
        except BaseException as exc:
            # A call cut off by its deadline or its client (CancelledError) may already have reached
            # the brand's API: it is audited as well, the write shielded from a second cancellation.
            if not audited[0]:
                if isinstance(exc, asyncio.CancelledError):
                    kind = "CANCELLED"
                else:
                    kind = exc.code.name if isinstance(exc, DomainError) else type(exc).__name__
                with contextlib.suppress(Exception):  # the store may be what failed: the error stands
                    await asyncio.shield(self._audit(request, entry.anonymous_id, f"error:{kind}"))
            raise

    async def _admit(self, request: pb.ReconstructMessageRequest) -> None:
        """At most `reconstructions_per_minute` calls a minute per client and workspace. Only the first
        refusal of a minute is audited, so a flood leaves one entry, not a million."""
        limit = self._settings.reconstructions_per_minute
        if not limit:
            return
        count, wait = await self._archive.count_reconstruction(request.workspace_id)
        if count <= limit:
            return
        if count == limit + 1:
            await self._audit(request, "", "refused:rate_limited")
            log.warning("reconstructions refused for client %r: over %d a minute", calling_client.get(), limit)
        raise ResourceExhausted(
            f"at most {limit} ReconstructMessage calls a minute per client; try again in {math.ceil(wait)} s"
        )

    async def _audit(self, request: pb.ReconstructMessageRequest, anonymous_id: str, outcome: str) -> str:
        return await self._archive.audit(
            request.workspace_id, request.message_id, anonymous_id, request.requested_by, request.reason, outcome
        )
