"""The dispatcher's client of the resolver service (gRPC; services never import each other)."""

from __future__ import annotations

import asyncio

import grpc
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from libs.errors import FailedPrecondition, Unavailable

MAX_IDS_PER_CALL = 1000


class ResolverClient:
    def __init__(self, address: str, timeout_seconds: float, interceptors: list | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.enable_retries", 1)],
            interceptors=interceptors or None,
        )
        self._stub = rpb_grpc.ResolverServiceStub(self._channel)
        self._timeout = timeout_seconds

    async def resolve(
        self, workspace_id: str, channel: int, anonymous_ids: list[str], campaign_id: str, campaign_instance_id: str
    ) -> list[rpb.ResolvedContact]:
        """One entry per ID, in order; the instance pins the PII API config version."""
        chunks = [anonymous_ids[i : i + MAX_IDS_PER_CALL] for i in range(0, len(anonymous_ids), MAX_IDS_PER_CALL)]
        replies = await asyncio.gather(
            *(
                self._call(
                    rpb.ResolveContactsRequest(
                        workspace_id=workspace_id,
                        channel=channel,
                        anonymous_ids=chunk,
                        campaign_id=campaign_id,
                        campaign_instance_id=campaign_instance_id,
                    )
                )
                for chunk in chunks
            )
        )
        return [contact for reply in replies for contact in reply.contacts]

    async def test_saved_config(
        self, workspace_id: str, channel: int, anonymous_id: str
    ) -> rpb.TestPiiApiConfigResponse:
        request = rpb.TestPiiApiConfigRequest(
            saved=rpb.TestPiiApiConfigRequest.SavedConfig(workspace_id=workspace_id, channel=channel),
            test_anonymous_id=anonymous_id,
        )
        try:
            return await self._stub.TestPiiApiConfig(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None

    async def _call(self, request: rpb.ResolveContactsRequest) -> rpb.ResolveContactsResponse:
        try:
            return await self._stub.ResolveContacts(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from None

    async def close(self) -> None:
        await self._channel.close()


def _translate(exc: grpc.aio.AioRpcError) -> Exception:
    """The resolver's errors are PII-free by construction; pass their text on."""
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"resolver unavailable ({exc.code().name}), retry later")
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return FailedPrecondition(f"resolver: {exc.details()}")
    return FailedPrecondition(f"resolver refused the lookup ({exc.code().name}): {exc.details()}")
