"""ReceiptsService handlers: IngestReceipt (relayed receipts), GetCampaignStats and StreamDeliveryEvents."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as pb_grpc

from libs.campaign_stats import FUNNEL, RESOLVE_REASON_PREFIX, read_counts
from libs.errors import OutOfRange, ResourceExhausted, Unavailable, require
from libs.settings import ReceiptsSettings
from libs.store import EVENTS_AFTER_ID_HEADER, check_id, parse_stream_id
from services.receipts.intake import RawReceipt, ReceiptIntake
from services.receipts.ledger import WORKSPACE_COUNTERS, DeliveryLedger, EventsAhead, EventsTrimmed, StoredEvent

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    pb.PROVIDER_SENDGRID: "sendgrid",
    pb.PROVIDER_SES: "ses",
    pb.PROVIDER_TWILIO: "twilio",
    pb.PROVIDER_WHATSAPP: "whatsapp",
}
# A streamed event's provider: those that send receipts, and an SMTP relay, whose emails' one-click
# unsubscribes are events though it sends no receipt (IngestReceipt refuses it).
PROVIDER_VALUES = {name: value for value, name in PROVIDER_NAMES.items()} | {"smtp": pb.PROVIDER_SMTP}
# As a client writes them (proto JSON, grpcurl): the enum's own names, not the short ones above.
PROVIDER_CHOICES = [value.name for value in pb.Provider.DESCRIPTOR.values if value.number in PROVIDER_NAMES]
PROVIDER_RULE = f"must be {', '.join(PROVIDER_CHOICES[:-1])} or {PROVIDER_CHOICES[-1]}"
# The response carries every funnel counter it has a field for.
STATS_FIELDS = tuple(name for name in FUNNEL if name in pb.GetCampaignStatsResponse.DESCRIPTOR.fields_by_name)
STREAM_BATCH = 100


def event_message(event: StoredEvent) -> pb.StreamDeliveryEventsResponse:
    occurred_at = Timestamp()
    occurred_at.FromMilliseconds(event.occurred_at_ms)
    status_name = "DELIVERY_STATUS_" + event.status.upper()
    return pb.StreamDeliveryEventsResponse(
        event_id=event.event_id,
        message_id=event.message_id,
        campaign_id=event.campaign_id,
        campaign_instance_id=event.campaign_instance_id,
        anonymous_id=event.anonymous_id,
        channel=event.channel,
        provider=PROVIDER_VALUES.get(event.provider, pb.PROVIDER_UNSPECIFIED),
        status=pb.DeliveryStatus.Value(status_name) if status_name in pb.DeliveryStatus.keys() else 0,
        reason_code=event.reason_code,
        occurred_at=occurred_at,
    )


class ReceiptsServicer(pb_grpc.ReceiptsServiceServicer):
    def __init__(
        self, settings: ReceiptsSettings, redis: aioredis.Redis, intake: ReceiptIntake, ledger: DeliveryLedger
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._intake = intake
        self._ledger = ledger
        # Each tailing stream holds a pooled Redis connection in its blocking read: bounded, so that
        # webhooks and ledger writes always find one.
        self._streams = asyncio.Semaphore(settings.events_max_streams)
        self._streams_by_workspace: Counter[str] = Counter()
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Shutdown has begun: tails end after their current read (at most `events_stream_block_ms`)
        rather than hold the process for its whole grace period."""
        self._draining.set()

    async def IngestReceipt(self, request: pb.IngestReceiptRequest, context: grpc.aio.ServicerContext):
        provider = PROVIDER_NAMES.get(request.provider)
        require(provider is not None, "provider", PROVIDER_RULE)
        outcome = await self._intake.ingest(
            RawReceipt(
                provider=provider,
                workspace_id=request.workspace_id,
                connector_id=request.connector_id,
                url=request.url,
                headers=dict(request.headers),
                body=request.body,
            )
        )
        return pb.IngestReceiptResponse(
            events=outcome.events,
            mapped=outcome.mapped,
            unmapped=outcome.unmapped,
            duplicates=outcome.duplicates,
            opted_out=outcome.opted_out,
            opted_in=outcome.opted_in,
            ignored=outcome.ignored,
            unusable=outcome.unusable,
            unusable_entries=outcome.named_unusable,
        )

    async def GetCampaignStats(self, request: pb.GetCampaignStatsRequest, context: grpc.aio.ServicerContext):
        """Counters of a campaign, or of one instance; an empty campaign_id reads the workspace's own
        counters (unmapped receipts that named no known campaign)."""
        check_id(request.workspace_id, "workspace_id")
        if request.campaign_id:
            check_id(request.campaign_id, "campaign_id")
        else:
            require(not request.campaign_instance_id, "campaign_instance_id", "needs a campaign_id")
        if request.campaign_instance_id:
            check_id(request.campaign_instance_id, "campaign_instance_id")
        counts = await read_counts(
            self._redis, request.workspace_id, request.campaign_id or WORKSPACE_COUNTERS, request.campaign_instance_id
        )
        response = pb.GetCampaignStatsResponse(**{name: max(0, counts.get(name, 0)) for name in STATS_FIELDS})
        for name, value in counts.items():
            if name.startswith(RESOLVE_REASON_PREFIX) and value > 0:
                response.resolve_failed_by_reason[name[len(RESOLVE_REASON_PREFIX) :]] = value
        return response

    async def StreamDeliveryEvents(
        self, request: pb.StreamDeliveryEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamDeliveryEventsResponse]:
        """Events after `after_id` (empty: from the oldest kept; "$": only new ones), then tails until cancelled
        or shutdown."""
        check_id(request.workspace_id, "workspace_id")
        if request.after_id == "$":
            position = await self._ledger.last_id(request.workspace_id)
        elif request.after_id:
            position = parse_stream_id(request.after_id)
            require(bool(position), "after_id", "must be a stream event ID such as 1700000000000-0, or '$'")
        else:
            position = "0-0"
        block_ms = self._settings.events_stream_block_ms
        workspace_id = request.workspace_id
        per_workspace = self._settings.events_max_streams_per_workspace
        if self._streams_by_workspace[workspace_id] >= per_workspace:
            raise ResourceExhausted(
                f"{per_workspace} event streams are open for this workspace on this process "
                "(the limit per workspace, TOKENSEND_EVENTS_MAX_STREAMS_PER_WORKSPACE); close one or try again later"
            )
        if self._streams.locked():
            raise ResourceExhausted(
                f"{self._settings.events_max_streams} event streams are open on this process "
                "(TOKENSEND_EVENTS_MAX_STREAMS); try again later"
            )
        async with self._streams:
            self._streams_by_workspace[workspace_id] += 1
            try:
                await context.send_initial_metadata(((EVENTS_AFTER_ID_HEADER, position),))
                resumed = True  # the client's position; after the first read, the one this call reached
                while not self._draining.is_set():
                    try:
                        events = await self._ledger.read(
                            workspace_id, position, STREAM_BATCH, block_ms, resumed=resumed
                        )
                    except EventsTrimmed as gap:
                        raise OutOfRange(self._gap_message(gap)) from None
                    except EventsAhead as ahead:
                        newest = f"the newest is {ahead.newest}" if ahead.newest else "none is kept now"
                        raise OutOfRange(
                            f"after_id {ahead.after_id} is after every event of this workspace ({newest}) and the "
                            "store's clock, so no event would follow it: resume with an empty after_id to read from "
                            "the oldest kept, or '$' for new events only"
                        ) from None
                    resumed = False
                    for event in events:
                        yield event_message(event)
                        position = event.event_id
                raise Unavailable(
                    f"the receipts service is shutting down: resume on another process with after_id {position}"
                )
            finally:
                self._streams_by_workspace[workspace_id] -= 1
                if not self._streams_by_workspace[workspace_id]:
                    del self._streams_by_workspace[workspace_id]

    def _gap_message(self, gap: EventsTrimmed) -> str:
        if not gap.expired:
            return (
                f"events after {gap.after_id} may have been trimmed before they were read (the stream keeps about "
                f"{self._settings.events_stream_maxlen} events); the oldest kept is {gap.oldest_kept}: resume with "
                "an empty after_id to read from it"
            )
        kept = (
            f"the oldest kept is {gap.oldest_kept}: resume with an empty after_id to read from it"
            if gap.oldest_kept
            else "none is kept now: resume with an empty after_id to read from the oldest kept"
        )
        return (
            f"events after {gap.after_id} may have expired before they were read (the stream is kept "
            f"{self._settings.events_stream_ttl_seconds} s after its newest event); {kept}"
        )
