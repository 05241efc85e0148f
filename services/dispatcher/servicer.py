"""DispatcherService handlers: connectors, Dispatch, DispatchStream, SendTest, suppressions,
opt-out keywords, the masked preview, the audited reconstruction and its audit log."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TypeVar

import grpc
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.anonymous_ids import RULE as ANONYMOUS_ID_RULE
from libs.anonymous_ids import valid_anonymous_id
from libs.config_index import FOREIGN_PAGE_TOKEN, check_page_size
from libs.connector_store import ConnectorStore, keep_masked_secrets, masked_connector
from libs.crypto import SealedDataInvalid
from libs.errors import FailedPrecondition, InvalidArgument, Unavailable, WithDetails, require
from libs.ids import MAX_ID_LENGTH
from libs.netguard import port_of, split_url
from libs.opt_out import ALWAYS_STOP, START, KeywordStore, check_apart, clean_keywords
from libs.scrub import error_text, quoted_record_values, scrub_text, value_types
from libs.settings import DispatcherSettings
from libs.store import MAX_U64, check_id, parse_cursor, parse_stream_id
from libs.suppressions import channel_family, family_channel
from services.dispatcher.campaign import CampaignCall, CampaignSender, status_counts
from services.dispatcher.connector_pool import ConnectorPool
from services.dispatcher.connectors import validate_connector
from services.dispatcher.connectors.twilio import MESSAGING_SERVICE_SID
from services.dispatcher.guards import CampaignInstances
from services.dispatcher.rendering import CompiledContents
from services.dispatcher.resolver_client import ResolverClient
from services.dispatcher.review import MessagePreview, MessageReconstruction, failure_text

T = TypeVar("T")
log = logging.getLogger(__name__)

C = common_pb2.Channel
MAX_ATTRIBUTES = 50
MAX_ATTRIBUTE_LENGTH = 1024
MAX_MEDIA_URLS = 10
# As a client writes them (proto JSON, grpcurl); UNSPECIFIED is never stored.
REASON_RULE = "must be one of " + ", ".join(n for n in pb.SuppressionReason.keys() if not n.endswith("_UNSPECIFIED"))
# The connectors that send content.media_urls (Twilio's MediaUrl); the others have no place for them.
MEDIA_CONNECTOR_KINDS = frozenset({pb.CONNECTOR_KIND_TWILIO})
# The connectors that send content.whatsapp_template; a custom gateway's request has only @text.
TEMPLATE_CONNECTOR_KINDS = frozenset({pb.CONNECTOR_KIND_WHATSAPP_CLOUD})
# Six digits, each at most one separator from the next ("0740.0123.456", "44-7400-12345"): part of a
# phone number, however written.
_LONG_DIGIT_RUN = re.compile(r"\d(?:[._:-]?\d){5}")
# What Dispatch returns as a message ID. Anything else (a phone number pasted in its place) would be
# echoed into the audit log and the error.
_MESSAGE_ID = re.compile(r"^[0-9a-f]{32}\Z")
# The last ID a stream can hold: Redis refuses to read after it, so no page token of ours names it.
LAST_STREAM_ID = f"{MAX_U64}-{MAX_U64}"
# Meta's rules: a template name is lowercase letters, digits and underscores; a language code is a language
# (en, fil) with, for a locale, its region (en_US, prs_AF). Anything else fails every recipient at the provider.
_WHATSAPP_TEMPLATE_NAME = re.compile(r"[a-z0-9_]+")
_WHATSAPP_LANGUAGE = re.compile(r"[a-z]{2,3}(?:_[A-Za-z0-9]{2,4})?")
# A test send's receipts count under "<campaign_id>:test", itself an ID.
MAX_TEST_CAMPAIGN_ID_LENGTH = MAX_ID_LENGTH - len(":test")
# DispatchStream batches worked on at once: one being sent while the next is claimed and resolved.
BATCHES_IN_FLIGHT = 2
SHUTTING_DOWN_MESSAGE = "the dispatcher shut down before this recipient's batch began: run the instance again"
# How long a call ending on an error or a cancellation waits for its cancelled batches to settle.
ABANDON_SECONDS = 2.0
# Through a connector that sends a batch in a request or a few (SendGrid), a batch is a chain of
# short waits (claim, resolve, send, settle) rather than hundreds of requests: a third batch keeps
# the machine busy through them. Measured: +9-17 % Emails a second; for SMS a third only queues.
BATCHED_SEND_BATCHES_IN_FLIGHT = 3
# A stream takes its instance's record again before its next batch once this long has passed since it
# last did (a tenth of the record's TTL, if shorter): the claims written since outlive the record by
# this and a batch's sending at most, not by the stream's length; one round trip a minute, not a batch.
INSTANCE_REFRESH_SECONDS = 60.0
# How long recipients that do not fill a batch wait for the client's next part before their batch begins
# as it is: a client streaming its campaign sends the parts back to back, while one that reads a part's
# results before it sends more (memory bounded on its side too) would wait for them forever.
PART_LINGER_SECONDS = 0.05


def batches_in_flight(max_batch: int) -> int:
    """How many of a stream's batches are worked on at once, for a connector sending `max_batch`
    messages a request."""
    return BATCHED_SEND_BATCHES_IN_FLIGHT if max_batch > 1 else BATCHES_IN_FLIGHT


# The results a failed Dispatch call's error holds: gRPC clients take 8 KiB of metadata (the status with
# its details) by default, refusing some calls past it and every one past 16 KiB, the error itself lost.
# Some 90 results, beside a message of a few hundred characters sent twice (as the status's, and in it).
PARTIAL_RESULTS_BYTES = 5000

MAX_SUPPRESSIONS_PER_CALL = 1000
MAX_PAGE_SIZE = 1000


# The summary's count of each status, by the status's name as `BatchReport.statuses` counts it.
_SUMMARY_FIELDS = {
    "SENT": "sent",
    "RESOLVE_FAILED": "resolve_failed",
    "SEND_FAILED": "send_failed",
    "CAPPED": "capped",
    "DUPLICATE": "duplicate",
    "SUPPRESSED": "suppressed",
}


def summarize(results: Iterable[pb.DispatchResult], summary: pb.DispatchSummary) -> None:
    summarize_statuses(status_counts(r.status for r in results), summary)


def summarize_statuses(statuses: Mapping[str, int], summary: pb.DispatchSummary) -> None:
    """`summarize` from results already counted by status (a batch's `BatchReport.statuses`): a
    summary's field read and written once per status, not once per result."""
    for status, count in statuses.items():
        name = _SUMMARY_FIELDS[status]
        setattr(summary, name, getattr(summary, name) + count)
        summary.attempted += count


def call_batches(recipients: list[pb.Recipient], size: int) -> list[list[int]]:
    """A Dispatch call's batches, as indexes of its recipients: `size` each, and every repeat of an
    anonymous ID in the batch of its first occurrence, answered DUPLICATE there. In a later batch a
    repeat of a recipient not sent (its contact not found, say) would be tried again: the PII API
    asked twice and the recipient counted twice, depending on where the batches were cut."""
    if len(recipients) <= size:
        return [list(range(len(recipients)))] if recipients else []
    batches: list[list[int]] = []
    batch_of: dict[str, list[int]] = {}
    fresh = 0  # recipients that are no repeat
    for i, recipient in enumerate(recipients):
        batch = batch_of.get(recipient.anonymous_id)
        if batch is None:
            if fresh % size == 0:
                batches.append([])
            fresh += 1
            batch = batch_of[recipient.anonymous_id] = batches[-1]
        batch.append(i)
    return batches


def shutting_down_results(recipients: list[pb.Recipient]) -> list[pb.DispatchResult]:
    """The answer for recipients whose batch shutdown kept from beginning: nothing was claimed for
    them, so a run of the instance again sends them."""
    return [
        pb.DispatchResult(
            anonymous_id=r.anonymous_id,
            status=pb.DISPATCH_STATUS_SEND_FAILED,
            error_code="SHUTTING_DOWN",
            error_message=SHUTTING_DOWN_MESSAGE,
        )
        for r in recipients
    ]


def with_partial_results(exc: Exception, results: list[pb.DispatchResult | None], failed_batch: int) -> WithDetails:
    """The error of a Dispatch call one of whose batches failed (`failed_batch` recipients; 0 when the take
    of its instance before it did) after others were answered: `exc`'s code and message, saying how many
    were answered, and their results as a DispatchResponse in its details, as many as
    `PARTIAL_RESULTS_BYTES` holds, with the summary of all."""
    answered = [r for r in results if r is not None]
    unanswered = len(results) - len(answered)
    partial = pb.DispatchResponse()
    summarize(answered, partial.summary)
    room = PARTIAL_RESULTS_BYTES
    for result in answered:
        room -= result.ByteSize() + 3  # its tag and length
        if room < 0:
            break
        partial.results.append(result)
    held = ""
    if len(partial.results) < len(answered):
        held = (
            f" (the first {len(partial.results):,} and the summary of all: a gRPC client takes 8 KiB of "
            "metadata by default)"
        )
    note = (
        f"; {len(answered):,} of the call's {len(results):,} recipients were answered, their results are in the "
        f"error's details{held}"
    )
    if failed_batch:
        # The failed batch settled what it knew first (`CampaignSender._abandon`): a message the provider
        # took is kept as sent, with its message ID; the others are released.
        note += (
            f"; of the other {unanswered:,}, the failed batch's were sent only where the provider took them "
            "before it failed, and none after it was: a re-run of the instance sends those not sent and answers "
            "the others DUPLICATE with their message IDs"
        )
    elif not isinstance(exc, FailedPrecondition):  # which says it already, the instance being another's
        note += f"; the other {unanswered:,} were not sent (nothing claimed): a re-run of the instance sends them"
    return WithDetails(exc, note, [partial])


def validate_content(channel: int, content: pb.Content) -> None:
    if channel == C.CHANNEL_EMAIL:
        require(bool(content.subject), "content.subject", "is required for email")
        require(bool(content.html_body or content.text_body), "content.html_body", "email needs html_body or text_body")
    elif channel == C.CHANNEL_WHATSAPP:
        require(
            bool(content.sms_body or content.whatsapp_template.name),
            "content.sms_body",
            "WhatsApp needs sms_body (text) or whatsapp_template",
        )
        template = content.whatsapp_template
        if template.language or template.params:
            # Without its name a template is not sent at all: the text would go instead, or nothing.
            require(bool(template.name), "content.whatsapp_template.name", "is required with language or params")
        if template.name:
            require(
                _WHATSAPP_TEMPLATE_NAME.fullmatch(template.name) is not None,
                "content.whatsapp_template.name",
                "must be the template's name as Meta keeps it: lowercase letters, digits and underscores",
            )
            require(bool(template.language), "content.whatsapp_template.language", "is required")
            require(
                _WHATSAPP_LANGUAGE.fullmatch(template.language) is not None,
                "content.whatsapp_template.language",
                "must be a language code as Meta writes it, such as en or en_US (an underscore, not a hyphen)",
            )
    elif channel == C.CHANNEL_MMS:
        require(bool(content.sms_body or content.media_urls), "content.media_urls", "MMS needs media_urls or sms_body")
    else:
        require(bool(content.sms_body), "content.sms_body", "is required for SMS and RCS")
    # Sent on another channel, media would be dropped (WhatsApp, Email) or turn an SMS into an MMS,
    # billed as one.
    require(
        channel == C.CHANNEL_MMS or not content.media_urls,
        "content.media_urls",
        f"only the MMS channel sends media; leave media_urls empty on {C.Name(channel)}",
    )
    require(len(content.media_urls) <= MAX_MEDIA_URLS, "content.media_urls", f"at most {MAX_MEDIA_URLS}")
    for i, url in enumerate(content.media_urls):
        check_media_url(url, f"content.media_urls[{i}]")


def check_media_url(url: str, field: str) -> None:
    """A link the provider fetches the media from (not us: which host is the brand's choice), which
    must be one it can fetch. Its length is a request limit (`libs.limits`)."""
    require(url.isprintable() and " " not in url, field, "must not contain whitespace or control characters")
    parts = split_url(url)
    require(parts is not None and parts.scheme in ("https", "http"), field, "must be an http(s) URL")
    require(bool(parts.hostname), field, "must name a host")
    require(port_of(parts) is not False, field, "has an invalid port")


def validate_recipients(recipients, prefix: str = "recipients") -> None:
    # Every recipient of every batch passes here: the messages are built only for one that fails.
    for i, recipient in enumerate(recipients):
        attributes = recipient.attributes
        if not attributes:
            continue
        if len(attributes) > MAX_ATTRIBUTES:
            raise InvalidArgument(f"{prefix}[{i}].attributes", f"at most {MAX_ATTRIBUTES} attributes")
        # The map's keys and indexing, not its items() view (collections.abc per entry); a loop, not
        # max() over map() twice, which cost three times as much for the usual one or two attributes.
        for name in attributes:
            if len(name) > 64 or len(attributes[name]) > MAX_ATTRIBUTE_LENGTH:
                raise InvalidArgument(
                    f"{prefix}[{i}].attributes", f"names up to 64 and values up to {MAX_ATTRIBUTE_LENGTH} characters"
                )
            # Of all whitespace only the space is printable. strip() hands back the name itself when it has
            # none at its ends, which compares equal at once: cheaper than reading both ends.
            if not name.isprintable() or not name or name.strip() != name:
                # No template reads such a name; never quoted, as a value pasted in a name's place would be.
                raise InvalidArgument(f"{prefix}[{i}].attributes", _attribute_name_problem(name))


def _attribute_name_problem(name: str) -> str:
    if not name:
        return "names must not be empty"
    if not name.isprintable():
        return "names must not hold control characters or other non-printing ones (line breaks, tabs)"
    # " tier" is no `recipient.tier`: every render of the campaign would fail.
    return "names must not begin or end with a space"


def validate_recipient(recipient: pb.Recipient, field: str = "recipient") -> None:
    """The one recipient of a test send or a preview, its errors named by its own field."""
    try:
        validate_recipients([recipient], field)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}.attributes", exc.description) from None


def check_topic(topic: str, field: str = "topic") -> str:
    """A topic is an ID like a campaign's, or empty (every topic)."""
    return check_id(topic, field) if topic else ""


def check_anonymous_ids(values, field: str = "anonymous_ids") -> list[str]:
    require(len(values) > 0, field, "is required")
    require(len(values) <= MAX_SUPPRESSIONS_PER_CALL, field, f"at most {MAX_SUPPRESSIONS_PER_CALL} per call")
    for i, value in enumerate(values):
        require(valid_anonymous_id(value), f"{field}[{i}]", ANONYMOUS_ID_RULE)
    return list(values)


class DispatcherServicer(pb_grpc.DispatcherServiceServicer):
    def __init__(
        self,
        settings: DispatcherSettings,
        connectors: ConnectorStore,
        pool: ConnectorPool,
        sender: CampaignSender,
        resolver: ResolverClient,
    ) -> None:
        self._settings = settings
        self._connectors = connectors
        self._pool = pool
        self._sender = sender
        self._resolver = resolver
        self._suppressions = sender.suppressions
        self._keywords = KeywordStore(sender.suppressions.redis)
        self._instances = CampaignInstances(sender.suppressions.redis, settings.idempotency_ttl_seconds)
        self._preview = MessagePreview(resolver, sender.suppressions)
        self._reconstruction = MessageReconstruction(resolver, sender.archive, sender.unsubscribe_tokens, settings)
        self._compiled = CompiledContents()
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Shutdown has begun: calls start no more batches, and end with what they started (UNAVAILABLE)."""
        self._draining.set()

    async def PutConnector(self, request: pb.PutConnectorRequest, context: grpc.aio.ServicerContext):
        require(request.HasField("connector"), "connector", "is required")
        connector = pb.Connector()
        connector.CopyFrom(request.connector)
        connector.ClearField("version")  # set by the server; the expectation is expected_version
        check_id(connector.workspace_id, "connector.workspace_id")
        check_id(connector.connector_id, "connector.connector_id")
        try:
            previous = await self._connectors.find(connector.workspace_id, connector.connector_id)
        except SealedDataInvalid:  # sealed under a key no longer set: nothing to keep, save what is given
            previous = None
        keep_masked_secrets(connector, previous)
        validate_connector(connector, self._settings.allow_private_networks)
        connector.version = await self._connectors.save(connector, request.expected_version)
        log.info(
            "saved connector %s/%s (%s)",
            connector.workspace_id,
            connector.connector_id,
            pb.ConnectorKind.Name(connector.kind),
        )
        return pb.PutConnectorResponse(connector=masked_connector(connector))

    async def GetConnector(self, request: pb.GetConnectorRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        check_id(request.connector_id, "connector_id")
        connector = await self._connectors.load(request.workspace_id, request.connector_id)
        return pb.GetConnectorResponse(connector=masked_connector(connector))

    async def ListConnectors(self, request: pb.ListConnectorsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        page_size = check_page_size(request.page_size)
        connectors, token = await self._connectors.summaries(request.workspace_id, page_size, request.page_token)
        return pb.ListConnectorsResponse(connectors=connectors, next_page_token=token)

    async def DeleteConnector(self, request: pb.DeleteConnectorRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        check_id(request.connector_id, "connector_id")
        await self._connectors.delete(request.workspace_id, request.connector_id, request.expected_version)
        await self._pool.forget(request.workspace_id, request.connector_id)
        log.info("deleted connector %s/%s", request.workspace_id, request.connector_id)
        return pb.DeleteConnectorResponse()

    async def _call(
        self,
        prefix: str,
        workspace_id: str,
        campaign_id: str,
        campaign_instance_id: str,
        channel: int,
        connector_id: str,
        content: pb.Content,
        frequency_cap: pb.FrequencyCap | None,
        track: bool = True,
        topic: str = "",
    ) -> CampaignCall:
        check_id(workspace_id, f"{prefix}workspace_id")
        check_id(campaign_id, f"{prefix}campaign_id")
        if track:
            check_id(campaign_instance_id, f"{prefix}campaign_instance_id")
        require(channel != C.CHANNEL_UNSPECIFIED, f"{prefix}channel", "is required")
        check_topic(topic, f"{prefix}topic")
        check_id(connector_id, f"{prefix}connector_id")
        if frequency_cap is not None and frequency_cap.max_messages:
            require(
                1 <= frequency_cap.window_seconds <= 366 * 86400,
                f"{prefix}frequency_cap.window_seconds",
                "must be 1 second to 366 days",
            )
        try:
            validate_content(channel, content)
            templates = await self._compiled.load(content)
        except InvalidArgument as exc:  # content errors name "content.…": under a stream's header, "header.content.…"
            if not prefix:
                raise
            raise InvalidArgument(f"{prefix}{exc.field}", exc.description) from None
        connector, client = await self._pool.get(workspace_id, connector_id)
        if channel_family(connector.channel) != channel_family(channel):
            raise FailedPrecondition(
                f"{prefix}connector_id: connector {connector_id!r} sends {C.Name(connector.channel)}, "
                f"not {C.Name(channel)}"
            )
        if (
            channel == C.CHANNEL_RCS
            and connector.kind == pb.CONNECTOR_KIND_TWILIO
            and not MESSAGING_SERVICE_SID.match(connector.sender)
        ):
            # Twilio sends RCS through a messaging service only: from a number, the message goes as an SMS.
            raise FailedPrecondition(
                f"{prefix}connector_id: connector {connector_id!r} sends from a number or sender ID, and Twilio sends "
                "RCS only through a messaging service (sender MG...): use a connector whose sender is one"
            )
        if content.media_urls and connector.kind not in MEDIA_CONNECTOR_KINDS:
            # A custom gateway's template has no place for media: the text would go alone.
            raise InvalidArgument(
                f"{prefix}content.media_urls",
                f"connector {connector_id!r} ({pb.ConnectorKind.Name(connector.kind)}) sends no media; "
                "only CONNECTOR_KIND_TWILIO connectors send MMS media",
            )
        if (
            channel == C.CHANNEL_WHATSAPP
            and content.whatsapp_template.name
            and connector.kind not in TEMPLATE_CONNECTOR_KINDS
        ):
            # The template would be dropped: the text sent alone, or with none an empty message to every
            # recipient, each one's contact fetched first.
            raise InvalidArgument(
                f"{prefix}content.whatsapp_template.name",
                f"connector {connector_id!r} ({pb.ConnectorKind.Name(connector.kind)}) sends no WhatsApp templates; "
                "only CONNECTOR_KIND_WHATSAPP_CLOUD connectors send them",
            )
        taken_at = time.monotonic()  # just before the take: on the safe side
        if track:
            # Last, once the call is valid, and before anything is claimed or fetched: one round trip a call.
            await self._take_instance(prefix, workspace_id, campaign_id, campaign_instance_id)
        return CampaignCall(
            workspace_id=workspace_id,
            campaign_id=campaign_id,
            campaign_instance_id=campaign_instance_id,
            channel=channel,
            connector=connector,
            client=client,
            content=content,
            templates=templates,
            frequency_cap=frequency_cap,
            track=track,
            topic=topic,
            instance_taken_at=taken_at,
        )

    async def _keep_instance(self, call: CampaignCall, prefix: str, unsent: str) -> None:
        """Before each batch: the instance's record must outlive the claims the batch writes, so a
        call running longer than `INSTANCE_REFRESH_SECONDS` (or a tenth of the TTL) takes it again. Lost to
        another campaign (it expired meanwhile), or Redis failing, the call ends as on a batch's error; `unsent`
        says which recipients that leaves unsent."""
        every = min(INSTANCE_REFRESH_SECONDS, self._settings.idempotency_ttl_seconds / 10)
        if not call.track or time.monotonic() - call.instance_taken_at < every:
            return
        call.instance_taken_at = time.monotonic()
        await self._take_instance(prefix, call.workspace_id, call.campaign_id, call.campaign_instance_id, unsent=unsent)

    async def _take_instance(
        self, prefix: str, workspace_id: str, campaign_id: str, instance: str, unsent: str = ""
    ) -> None:
        """Records the instance as the campaign's, or keeps its record for another TTL; refused when it
        is another campaign's. `unsent`: taken again by a call that has sent some of it already, and what it
        has not sent."""
        owner = await self._instances.take(workspace_id, campaign_id, instance)
        if owner is None:
            return
        taken = f"; its record expired while this call ran and that campaign took it: {unsent}" if unsent else ""
        raise FailedPrecondition(
            f"{prefix}campaign_instance_id: instance {instance!r} was started by campaign {owner!r}; campaign "
            "instance IDs must be unique within a workspace (a recipient is sent once per instance, so this "
            f"campaign's would be answered DUPLICATE, not sent){taken}"
        )

    async def Dispatch(self, request: pb.DispatchRequest, context: grpc.aio.ServicerContext):
        require(
            len(request.recipients) <= self._settings.max_recipients_per_call,
            "recipients",
            f"at most {self._settings.max_recipients_per_call} per call; use DispatchStream for more",
        )
        validate_recipients(request.recipients)
        call = await self._call(
            "",
            request.workspace_id,
            request.campaign_id,
            request.campaign_instance_id,
            request.channel,
            request.connector_id,
            request.content,
            request.frequency_cap if request.HasField("frequency_cap") else None,
            topic=request.topic,
        )
        response = pb.DispatchResponse()
        recipients = list(request.recipients)
        batches = call_batches(recipients, self._settings.batch_size)
        if len(batches) == 1:
            response.results.extend((await self._sender.send_batch(call, recipients)).results)
        else:
            results: list[pb.DispatchResult | None] = [None] * len(recipients)
            begun = 0  # the recipients of the batches begun before this one: every one answered
            for n, batch in enumerate(batches):
                chunk = [recipients[i] for i in batch]
                if n and self._draining.is_set():
                    # A batch begun is finished; none is begun once shutdown has started. The rest are
                    # answered as such (nothing claimed), so that the call still says what became of each.
                    answered = shutting_down_results(chunk)
                else:
                    failed_batch = 0  # the take of the instance fails before the batch begins
                    try:
                        if n:
                            unsent = (
                                f"{len(recipients) - begun} of the call's {len(recipients)} recipients were not sent"
                            )
                            await self._keep_instance(call, "", unsent)
                        failed_batch = len(batch)
                        answered = (await self._sender.send_batch(call, chunk)).results
                    except Exception as exc:
                        if not begun:
                            raise
                        # The results of the batches before are not lost with the call.
                        raise with_partial_results(exc, results, failed_batch) from exc
                for i, result in zip(batch, answered, strict=True):
                    results[i] = result
                begun += len(batch)
            response.results.extend(results)
        summarize(list(response.results), response.summary)
        return response

    async def DispatchStream(
        self, request_iterator: AsyncIterator[pb.DispatchStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DispatchStreamResponse]:
        # A reader turns the incoming stream into batches, a few at once (`batches_in_flight`: the next
        # is claimed and resolved while this one is sent); results go out in order as each finishes,
        # so a client waiting for a batch's results before sending more is never kept waiting.
        batches: asyncio.Queue[Started | None] = asyncio.Queue()
        summary = pb.DispatchSummary()
        reader = asyncio.create_task(self._read_batches(request_iterator, batches, summary))
        pending: list[asyncio.Future] = []
        try:
            while (queued := await batches.get()) is not None:
                task, slot = queued
                pending.append(task)
                yield await task
                pending.remove(task)
                if slot is not None:
                    slot.release()
            await reader  # raises what the reader refused (a missing header, a bad recipient)
            yield pb.DispatchStreamResponse(summary=summary)
        except Exception:
            # A batch failed and the call ends on its error. The batches beside it are claimed and
            # may be sending: they finish and settle (a re-run finds them sent), rather than being
            # cut off mid-send and left OUTCOME_UNKNOWN, and their results still reach the client
            # before the error. A call the client cancels stops at once.
            dismiss(reader)
            others = [*pending, *drained(batches)]
            if others:
                await asyncio.wait(others, timeout=self._settings.grace_seconds)
            pending = others
            for task in others:
                if task.done() and not task.cancelled() and task.exception() is None:
                    yield task.result()
            raise
        finally:
            dismiss(reader)
            leftover = [*pending, *drained(batches)]
            for task in leftover:
                dismiss(task)
            if leftover:
                # A cancelled batch settles what it knows of each recipient (`CampaignSender._abandon`);
                # given a moment, before a shutting-down process closes the clients it needs.
                await asyncio.wait(leftover, timeout=ABANDON_SECONDS)

    async def _read_batches(
        self,
        request_iterator: AsyncIterator[pb.DispatchStreamRequest],
        batches: asyncio.Queue[Started | None],
        summary: pb.DispatchSummary,
    ) -> None:
        slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)  # sized for the call's connector once its header is read
        call: CampaignCall | None = None
        batch: list[pb.Recipient] = []
        size = self._settings.batch_size
        received = 0

        async def stop_if_draining(not_started: list[pb.Recipient]) -> None:
            # Shutdown has begun: the recipients received and not begun are answered SHUTTING_DOWN
            # (nothing claimed), after the results of the batches begun, and the call ends UNAVAILABLE.
            # Those the client has not sent yet are not read: the status tells it to run the instance again.
            if not self._draining.is_set():
                return
            if not_started:
                answered = asyncio.get_running_loop().create_future()
                answered.set_result(pb.DispatchStreamResponse(results=shutting_down_results(not_started)))
                await batches.put((answered, None))
            told = f" ({len(not_started)} of them SHUTTING_DOWN, not sent)" if not_started else ""
            raise Unavailable(
                f"the dispatcher is shutting down and read no more recipients: every recipient it read has a "
                f"result{told}; run the campaign instance again, which skips what was sent"
            )

        async def start(chunk: list[pb.Recipient]) -> None:
            # A slot is given back once the batch's results are sent (`DispatchStream`), not once it is
            # done: a client that does not read its results stops the stream taking more recipients,
            # rather than finished batches piling up in memory.
            await slots.acquire()
            if self._draining.is_set():  # shutdown began while this waited: the batches begun finish alone
                slots.release()
                await stop_if_draining([*chunk, *batch])
            try:
                await self._keep_instance(call, "header.", "recipients without a result were not sent")
            except BaseException:
                slots.release()
                raise
            await batches.put((asyncio.create_task(self._stream_batch(call, chunk, summary)), slots))

        def linger() -> float | None:
            return PART_LINGER_SECONDS if batch else None

        try:
            async for part in parts_until(request_iterator, self._draining, linger):
                if part is None:  # no part came to fill the batch: it begins with what it has
                    chunk, batch = batch, []
                    await start(chunk)
                    continue
                kind = part.WhichOneof("part")
                if kind == "header":
                    require(call is None, "header", "must be sent once, first")
                    h = part.header
                    call = await self._call(
                        "header.",
                        h.workspace_id,
                        h.campaign_id,
                        h.campaign_instance_id,
                        h.channel,
                        h.connector_id,
                        h.content,
                        h.frequency_cap if h.HasField("frequency_cap") else None,
                        topic=h.topic,
                    )
                    slots = asyncio.Semaphore(batches_in_flight(call.client.max_batch))
                    continue
                require(kind == "recipients", "part", "set header or recipients")
                require(call is not None, "header", "must come before recipients")
                validate_recipients(part.recipients.recipients, "recipients.recipients")
                received += len(part.recipients.recipients)
                batch.extend(part.recipients.recipients)
                while len(batch) >= size:
                    chunk, batch = batch[:size], batch[size:]
                    await start(chunk)
            await stop_if_draining(batch)
            require(call is not None, "header", "is required")
            if batch:
                chunk, batch = batch, []
                await start(chunk)
        except InvalidArgument as exc:
            # What came before the refused part is sent and its results given before the error, which
            # says where the part began: every recipient before it was answered.
            if call is not None and batch:
                chunk, batch = batch, []
                await start(chunk)
            if not exc.field.startswith("recipients."):
                raise
            where = f"the part after recipient #{received}, all {received} answered" if received else "the first part"
            raise InvalidArgument(exc.field, f"{exc.description} (in {where})") from None
        finally:
            await batches.put(None)

    async def _stream_batch(
        self, call: CampaignCall, chunk: list[pb.Recipient], summary: pb.DispatchSummary
    ) -> pb.DispatchStreamResponse:
        report = await self._sender.send_batch(call, chunk)
        summarize_statuses(report.statuses, summary)
        return report.response

    async def SendTest(self, request: pb.SendTestRequest, context: grpc.aio.ServicerContext):
        require(request.HasField("recipient"), "recipient", "is required")
        # One recipient, named by the caller: an ID no PII API is asked for is the request's error, as in a
        # preview or TestPiiApiConfig, not a result (a campaign's batch reports it per recipient instead).
        require(valid_anonymous_id(request.recipient.anonymous_id), "recipient.anonymous_id", ANONYMOUS_ID_RULE)
        validate_recipient(request.recipient)
        check_id(request.campaign_id, "campaign_id")
        require(
            len(request.campaign_id) <= MAX_TEST_CAMPAIGN_ID_LENGTH,
            "campaign_id",
            f"at most {MAX_TEST_CAMPAIGN_ID_LENGTH} characters for a test send, whose receipts count under "
            "'<campaign_id>:test'",
        )
        # Test sends are kept out of the campaign's funnel: their receipts count under "<campaign>:test".
        call = await self._call(
            "",
            request.workspace_id,
            f"{request.campaign_id}:test",
            f"test-{uuid.uuid4().hex[:12]}",
            request.channel,
            request.connector_id,
            request.content,
            None,
            track=False,
            topic=request.topic,
        )
        report = await self._sender.send_batch(call, [request.recipient])
        response = pb.SendTestResponse(result=report.results[0])
        error = report.resolve_errors.get(request.recipient.anonymous_id)
        if error is not None:
            response.pii_api_http_status = error.http_status
            # The marketer sees the PII API's own answer, with contacts taken out.
            test = await self._resolver.test_saved_config(
                request.workspace_id, request.channel, request.recipient.anonymous_id
            )
            detail = failure_text(error)
            body = pii_api_answer(test)
            response.pii_api_error = f"{detail}; HTTP {test.http_status}: {body}" if body else detail
        return response

    # -- suppressions ------------------------------------------------------------------------

    async def SuppressRecipients(self, request: pb.SuppressRecipientsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.channel != C.CHANNEL_UNSPECIFIED, "channel", "is required")
        topic = check_topic(request.topic)
        ids = check_anonymous_ids(request.anonymous_ids)
        reason = request.reason or pb.SUPPRESSION_REASON_MANUAL
        require(reason in pb.SuppressionReason.values(), "reason", REASON_RULE)
        family = channel_family(request.channel)
        done = await self._suppressions.suppress(request.workspace_id, family, topic, ids, reason)
        log.info(
            "suppressed %d of %d ids in %s/%s (topic %s)",
            done.changed,
            len(ids),
            request.workspace_id,
            family,
            topic or "*",
        )
        return pb.SuppressRecipientsResponse(suppressed=done.changed, already_suppressed=done.held)

    async def UnsuppressRecipients(self, request: pb.UnsuppressRecipientsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.channel != C.CHANNEL_UNSPECIFIED, "channel", "is required")
        topic = check_topic(request.topic)
        ids = check_anonymous_ids(request.anonymous_ids)
        reasons = list(request.reasons) or [pb.SUPPRESSION_REASON_MANUAL]
        for i, reason in enumerate(reasons):
            valid = reason in pb.SuppressionReason.values() and reason != pb.SUPPRESSION_REASON_UNSPECIFIED
            require(valid, f"reasons[{i}]", REASON_RULE)
        family = channel_family(request.channel)
        done = await self._suppressions.lift(request.workspace_id, family, topic, ids, reasons)
        log.info(
            "unsuppressed %d ids in %s/%s (topic %s; %d still suppressed for other reasons)",
            done.changed,
            request.workspace_id,
            family,
            topic or "*",
            done.held,
        )
        return pb.UnsuppressRecipientsResponse(unsuppressed=done.changed, still_suppressed=done.held)

    async def ListSuppressions(self, request: pb.ListSuppressionsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.channel != C.CHANNEL_UNSPECIFIED, "channel", "is required")
        topic = check_topic(request.topic)
        require(request.page_size <= MAX_PAGE_SIZE, "page_size", f"at most {MAX_PAGE_SIZE}")
        cursor, after = 0, ""
        if request.page_token:
            # "<cursor>", or "<cursor>~<the last ID given, base64url>" within one SCAN step of a small list
            given, _, last = request.page_token.partition("~")
            cursor_given = parse_cursor(given)
            after = decoded_id(last) if last else ""
            require(cursor_given is not None and after is not None, "page_token", FOREIGN_PAGE_TOKEN)
            cursor = cursor_given
        family = channel_family(request.channel)
        entries, next_cursor, next_after = await self._suppressions.page(
            request.workspace_id, family, topic, cursor, after, request.page_size or 100
        )
        known = pb.SuppressionReason.values()
        if next_after:
            token = f"{next_cursor}~{base64.urlsafe_b64encode(next_after.encode()).decode()}"
        else:
            token = str(next_cursor) if next_cursor else ""
        return pb.ListSuppressionsResponse(
            suppressions=[
                pb.Suppression(
                    anonymous_id=e.anonymous_id,
                    channel=family_channel(e.family),
                    topic=e.topic,
                    reason=e.reason if e.reason in known else 0,
                    created_at_ms=e.created_at_ms,
                    reasons=[r if r in known else 0 for r, _ in e.reasons],
                )
                for e in entries
            ],
            next_page_token=token,
        )

    async def PutOptOutKeywords(self, request: pb.PutOptOutKeywordsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        stop = clean_keywords(request.keywords.stop_keywords, "keywords.stop_keywords")
        start = clean_keywords(request.keywords.start_keywords, "keywords.start_keywords", START)
        check_apart(request.keywords.stop_keywords, request.keywords.start_keywords)
        keywords = await self._keywords.save(request.workspace_id, stop, start)
        log.info(
            "opt-out keywords of %s: %d stop, %d start", request.workspace_id, len(keywords.stop), len(keywords.start)
        )
        return pb.PutOptOutKeywordsResponse(
            keywords=pb.OptOutKeywords(stop_keywords=keywords.stop, start_keywords=keywords.start),
            always_stop_keywords=ALWAYS_STOP,
        )

    async def GetOptOutKeywords(self, request: pb.GetOptOutKeywordsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        keywords = await self._keywords.load(request.workspace_id)
        return pb.GetOptOutKeywordsResponse(
            keywords=pb.OptOutKeywords(stop_keywords=keywords.stop, start_keywords=keywords.start),
            always_stop_keywords=ALWAYS_STOP,
        )

    # -- preview and reconstruction --------------------------------------------------------------

    async def PreviewMessage(self, request: pb.PreviewMessageRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.channel != C.CHANNEL_UNSPECIFIED, "channel", "is required")
        require(request.HasField("recipient"), "recipient", "is required")
        require(valid_anonymous_id(request.recipient.anonymous_id), "recipient.anonymous_id", ANONYMOUS_ID_RULE)
        validate_recipient(request.recipient)
        topic = check_topic(request.topic)
        validate_content(request.channel, request.content)
        templates = await self._compiled.load(request.content)
        return await self._preview.preview(request.workspace_id, request.channel, templates, request.recipient, topic)

    async def ReconstructMessage(self, request: pb.ReconstructMessageRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(
            bool(_MESSAGE_ID.match(request.message_id)),
            "message_id",
            "must be a message ID as Dispatch returned it (32 hex digits)",
        )
        # Who and why go to the audit log as IDs and codes: never an address or free text.
        for name in ("requested_by", "reason"):
            value = check_id(getattr(request, name), name)
            # An ID or a code, never a number: six digits close together could be part of a phone number.
            require(_LONG_DIGIT_RUN.search(value) is None, name, "must be an ID or a code, not hold a number")
        return await self._reconstruction.reconstruct(request)

    async def ListReconstructions(self, request: pb.ListReconstructionsRequest, context: grpc.aio.ServicerContext):
        check_id(request.workspace_id, "workspace_id")
        require(request.page_size <= MAX_PAGE_SIZE, "page_size", f"at most {MAX_PAGE_SIZE}")
        if request.page_token:
            given = parse_stream_id(request.page_token)
            require("-" in request.page_token and given not in ("", LAST_STREAM_ID), "page_token", FOREIGN_PAGE_TOKEN)
        entries, after = await self._sender.archive.audit_page(
            request.workspace_id, request.page_token, request.page_size or 100
        )
        return pb.ListReconstructionsResponse(
            reconstructions=[
                pb.Reconstruction(
                    audit_id=e.audit_id,
                    at_ms=e.at_ms,
                    message_id=e.message_id,
                    anonymous_id=e.anonymous_id,
                    requested_by=e.requested_by,
                    reason=e.reason,
                    outcome=e.outcome,
                    client=e.client,
                )
                for e in entries
            ],
            next_page_token=after,
        )


def pii_api_answer(test: rpb.TestPiiApiConfigResponse) -> str:
    """The PII API's body for the test screen, without the customer's data. A successful reply is
    customer data through and through (the failure was ours to read it: a path that finds nothing, an
    invalid contact), so only its shape is shown; of an error reply, the API's own text (a JSON reply's
    message, code and the like; any record it quotes by its shape), scrubbed of contacts, of every
    value the test read from it and of the values of the record it quotes (a message naming the customer
    whose record stands beside it)."""
    if not test.response_body:
        return ""
    read = [test.contact, *test.attributes.values()]
    if 200 <= test.http_status < 300:
        return scrub_text(value_types(test.response_body), limit=2048, extra=read)
    quoted = quoted_record_values(test.response_body)
    return scrub_text(error_text(test.response_body), limit=2048, extra=[*read, *quoted])


# A stream's batch under way, with the semaphore whose slot it holds until its results are sent; or
# the answer for the recipients shutdown kept from beginning, which holds no slot.
Started = tuple[asyncio.Future[pb.DispatchStreamResponse], asyncio.Semaphore | None]


def decoded_id(value: str) -> str | None:
    """An anonymous ID from a page token's base64url, or None when it is not one of ours."""
    try:
        decoded = base64.urlsafe_b64decode(value.encode("ascii")).decode()
    except (ValueError, UnicodeError):
        return None
    return decoded if valid_anonymous_id(decoded) else None


async def parts_until(
    parts: AsyncIterator[T], stop: asyncio.Event, linger: Callable[[], float | None] | None = None
) -> AsyncIterator[T | None]:
    """`parts` until they end or `stop` is set, whichever comes first: a client slow to send its next
    part does not hold a shutting-down server until its grace period is over. When `linger()` gives
    seconds and the next part has not come within them, None first, then the part when it comes."""
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[T] | None = None
    try:
        while not stop.is_set():
            following = asyncio.ensure_future(anext(parts))
            waits = (following, stopped)
            wait = linger() if linger is not None else None
            done, _ = await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield None
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            try:
                part = following.result()
            except StopAsyncIteration:
                return
            yield part
    finally:
        stopped.cancel()
        # The read in flight when the call ended (stopped, or cancelled: a caller gone) would end later on
        # its own, with an error nobody takes: asyncio would log it with its traceback.
        if following is not None:
            dismiss(following)


def drained(batches: asyncio.Queue[Started | None]) -> list[asyncio.Future]:
    """The batch tasks waiting in the queue, taken out of it."""
    tasks = []
    while not batches.empty():
        queued = batches.get_nowait()
        if queued is not None:
            tasks.append(queued[0])
    return tasks


def dismiss(task: asyncio.Future) -> None:
    """A task the call no longer waits for: cancelled if still running; if it already failed, its error
    is taken as seen (the call has ended on an error of its own), so that asyncio does not log it, with
    its traceback, when the task is collected."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()
