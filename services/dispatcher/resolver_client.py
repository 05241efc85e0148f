"""The dispatcher's client of the resolver service (gRPC; services never import each other)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from libs import keepalive
from libs.errors import FailedPrecondition, ResourceExhausted, Unavailable
from libs.telemetry import trace_metadata

MAX_IDS_PER_CALL = 1000


def resolve_error_code(code: int) -> str:
    """A resolver error code as results name it, without its prefix ("NOT_FOUND"); "UNKNOWN" for one
    this dispatcher's contract does not declare (a newer resolver's), rather than failing the batch."""
    value = rpb.ResolveErrorCode.DESCRIPTOR.values_by_number.get(code)
    return value.name.removeprefix("RESOLVE_ERROR_CODE_") if value is not None else "UNKNOWN"


@dataclass
class Resolution:
    """Contacts (PII: for this batch only), the PII API config version and the content APIs that answered."""

    contacts: list[rpb.ResolvedContact]
    config_version: int = 0
    content_apis: list[rpb.ContentApiUsage] = field(default_factory=list)


RECONNECT_INITIAL_MS = 250
RECONNECT_MAX_MS = 1000
# The longest a connect attempt waits for the resolver's answer (TCP, TLS, its first SETTINGS frame).
# gRPC's 20 s is for hosts across the internet; meanwhile the calls wait, and a resolver back at the
# address (or a name now pointing at a live one) goes unused. One in our data centre answers in
# milliseconds: 5 s still lets two lost SYNs be sent again (at 1 s and 3 s).
CONNECT_TIMEOUT_MS = 5000


class ResolverClient:
    def __init__(
        self,
        address: str,
        timeout_seconds: float,
        interceptors: list | None = None,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        """`token`: the bearer token the resolver knows this dispatcher by; `credentials`: TLS (or mTLS)
        to the resolver, whose certificate must name `server_name` when given."""
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.enable_retries", 1),
            # A resolver away (a rollout, a crash) is tried again at most every RECONNECT_MAX_MS: gRPC's
            # own backoff grows to two minutes, and calls fail UNAVAILABLE until its next try, long after
            # the resolver is back.
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
            # gRPC core's name for the minimum connect timeout; the backoff is not changed by it.
            ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
            # A resolver gone without closing the connection is found by pings, not after the kernel's timeout.
            *keepalive.channel_options(),
        ]
        if credentials is not None:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.aio.secure_channel(
                address, credentials, options=options, interceptors=interceptors or None
            )
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors or None)
        self._stub = rpb_grpc.ResolverServiceStub(self._channel)
        self._timeout = timeout_seconds
        self._token: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        # Without the tracing interceptors (nothing records spans), each call carries the trace on itself.
        self._carry_trace = not interceptors

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (trace_metadata(self._token) if self._carry_trace else self._token) or None

    async def resolve(
        self, workspace_id: str, channel: int, anonymous_ids: list[str], campaign_id: str, campaign_instance_id: str
    ) -> list[rpb.ResolvedContact]:
        """One entry per ID, in order; the instance pins the PII API config version."""
        resolution = await self.resolve_for_sending(
            workspace_id, channel, anonymous_ids, campaign_id, campaign_instance_id
        )
        return resolution.contacts

    async def resolve_for_sending(
        self,
        workspace_id: str,
        channel: int,
        anonymous_ids: list[str],
        campaign_id: str,
        campaign_instance_id: str,
        content_api_names: list[str] = (),
        config_version: int = 0,
        content_api_versions: dict[str, int] | None = None,
    ) -> Resolution:
        """Like `resolve`, with the named content APIs' fields and the versions that answered
        (what the archive keeps); explicit versions re-fetch exactly what an archived message used."""
        chunks = [anonymous_ids[i : i + MAX_IDS_PER_CALL] for i in range(0, len(anonymous_ids), MAX_IDS_PER_CALL)]
        calls = [
            asyncio.ensure_future(
                self._call(
                    rpb.ResolveContactsRequest(
                        workspace_id=workspace_id,
                        channel=channel,
                        anonymous_ids=chunk,
                        campaign_id=campaign_id,
                        campaign_instance_id=campaign_instance_id,
                        config_version=config_version,
                        content_api_names=content_api_names,
                        content_api_versions=content_api_versions or {},
                    )
                )
            )
            for chunk in chunks
        ]
        try:
            replies = await asyncio.gather(*calls)
        except BaseException:
            # One call failed and so does the batch: the others would go on fetching contacts in the
            # background, for recipients the batch is releasing (gather cancels them only when it is).
            for call in calls:
                call.cancel()
            raise
        return Resolution(
            contacts=[contact for reply in replies for contact in reply.contacts],
            config_version=replies[0].config_version if replies else 0,
            content_apis=list(replies[0].content_apis) if replies else [],
        )

    async def test_saved_config(
        self, workspace_id: str, channel: int, anonymous_id: str
    ) -> rpb.TestPiiApiConfigResponse:
        request = rpb.TestPiiApiConfigRequest(
            saved=rpb.TestPiiApiConfigRequest.SavedConfig(workspace_id=workspace_id, channel=channel),
            test_anonymous_id=anonymous_id,
        )
        try:
            return await self._stub.TestPiiApiConfig(request, timeout=self._timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None

    async def _call(self, request: rpb.ResolveContactsRequest) -> rpb.ResolveContactsResponse:
        try:
            return await self._stub.ResolveContacts(request, timeout=self._timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None

    async def close(self) -> None:
        await self._channel.close()


# The resolver's own faults, not the caller's state to fix.
RESOLVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)


class ResolverFault(RuntimeError):
    """The resolver failed on a call (a bug there): answered INTERNAL, like any fault of ours."""


def _translate(exc: grpc.aio.AioRpcError) -> Exception:
    """The resolver's errors are PII-free by construction; pass their text on."""
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"resolver unavailable ({exc.code().name}), retry later")
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return FailedPrecondition(f"resolver: {exc.details()}")
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"resolver: {exc.details()}")
    if exc.code() in RESOLVER_FAULTS:
        return ResolverFault(f"resolver failed ({exc.code().name})")
    return FailedPrecondition(f"resolver refused the lookup ({exc.code().name}): {exc.details()}")
