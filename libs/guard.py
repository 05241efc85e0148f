"""The request guard: authentication, workspace authorisation and size limits for every RPC.

Runs inside the error mapping (`libs.interceptors`), so its refusals become
statuses like any servicer error: no or an unknown bearer token →
UNAUTHENTICATED; a workspace the client is not bound to → PERMISSION_DENIED;
an oversized field → INVALID_ARGUMENT naming it. Every message of a client
stream is checked as it arrives. Health and reflection are open or need any
valid token, as configured. Tokens are never logged: only client names.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from libs.auth import (
    ClientGrant,
    ClientRegistry,
    NoWorkspaceRule,
    bearer_token,
    workspaces_of,
)
from libs.errors import DomainError, InvalidArgument, PermissionDenied
from libs.ids import ID_RULE
from libs.interceptors import WrappedHandlers
from libs.limits import RequestLimits
from libs.logs import LogThrottle

log = logging.getLogger(__name__)
# The authenticated client of the call being served ("" without authentication): what an audit
# records as who asked, whatever the request itself says.
calling_client: ContextVar[str] = ContextVar("calling_client", default="")

HEALTH_SERVICES = frozenset({"grpc.health.v1.Health"})
REFLECTION_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})
# Anyone who reaches the port can call without a token, or with a wrong one, at will, and a client with a
# valid token can repeat a refused call: a line a minute per method and reason (and client), saying how many
# more were refused since. The methods are the server's own (an unknown one is answered before the guard),
# so the keys are few; never per workspace, which the caller names freely: the line names the first one.
REFUSAL_LOG_SECONDS = 60.0


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self) -> None:
        super().__init__("missing or unknown bearer token (metadata 'authorization: Bearer <token>')")


@dataclass
class _CallScope:
    """What one call has been allowed so far (a stream's later messages ride on its first)."""

    client: ClientGrant | None
    workspaces: set[str] = field(default_factory=set)


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _missing(authorization: str | None) -> str:
    """What a refused call's metadata lacked, for the log: never anything of the token."""
    return "unknown bearer token" if bearer_token(authorization) else "no bearer token"


class RequestGuard(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        registry: ClientRegistry,
        limits: RequestLimits | None = None,
        *,
        open_health: bool = True,
        open_reflection: bool = False,
    ) -> None:
        self._registry = registry
        self._limits = limits or RequestLimits()
        self._wrapped = WrappedHandlers()
        self._refusal_logs = LogThrottle(REFUSAL_LOG_SECONDS)
        self._open = set()
        if open_health:
            self._open |= HEALTH_SERVICES
        if open_reflection:
            self._open |= REFLECTION_SERVICES

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service = details.method.lstrip("/").split("/", 1)[0]
        infrastructure = service in HEALTH_SERVICES or service in REFLECTION_SERVICES
        client: ClientGrant | None = None
        if self._registry.enabled and service not in self._open:
            authorization = _authorization(details.invocation_metadata)
            client = self._registry.authenticate(authorization)
            if client is None:
                reason = _missing(authorization)
                self._refusal_logs.log(
                    (details.method, reason), log, logging.INFO, "refused %s: %s", details.method, reason
                )
                return _replace(handler, _refusal(handler, Unauthenticated()))
        if infrastructure:
            return handler
        # By the grant's identity: the registry holds the same grants for as long as this guard lives.
        return self._wrapped.get(
            (handler, details.method, id(client)),
            lambda: _replace(handler, self._guarded(handler, details.method, client)),
        )

    # -- per message --------------------------------------------------------------------------------

    def _admit(self, request: Message, scope: _CallScope, method: str) -> None:
        if scope.client is not None:
            self._authorize(request, scope, method)
        self._limits.check(request)

    def _authorize(self, request: Message, scope: _CallScope, method: str) -> None:
        client = scope.client
        assert client is not None
        try:
            claim = workspaces_of(request)
        except NoWorkspaceRule:
            if client.all_workspaces:
                return
            self._refusal_logs.log(
                (client.name, method, "no workspace rule"),
                log,
                logging.WARNING,
                "refused %s to client %s: the RPC has no workspace rule",
                method,
                client.name,
            )
            raise PermissionDenied(
                "this RPC has no workspace rule; only clients of every workspace may call it"
            ) from None
        if not claim.workspaces:
            if scope.workspaces or client.all_workspaces:
                return  # a stream's later part, or a client of every workspace (the servicer checks the IDs)
            raise InvalidArgument(claim.first_path, claim.missing)
        if not client.all_workspaces and (path := claim.not_an_id()) is not None:
            # Not an ID at all (an address pasted in its place, say): refused by its field, since a
            # refusal naming the workspace would echo whatever the value holds, into the log as well.
            raise InvalidArgument(path, ID_RULE)
        for workspace_id in sorted(claim.workspaces):
            if not client.may_use(workspace_id):
                self._refusal_logs.log(
                    (client.name, method, "workspace not allowed"),
                    log,
                    logging.INFO,
                    "refused %s to client %s for workspace %s",
                    method,
                    client.name,
                    workspace_id,
                )
                raise PermissionDenied(f"client {client.name!r} may not use workspace {workspace_id!r}")
        scope.workspaces |= claim.workspaces

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str, client: ClientGrant | None):
        behavior = _behavior(handler)
        checks = self._admit
        name = client.name if client is not None else ""

        def admit(request: Message, scope: _CallScope, method: str) -> None:
            calling_client.set(name)  # each call is a task of its own: this stays with the call
            checks(request, scope, method)

        if handler.request_streaming:

            async def checked(requests: AsyncIterator[Message], scope: _CallScope) -> AsyncIterator[Message]:
                async for request in requests:
                    admit(request, scope, method)
                    yield request

            if inspect.isasyncgenfunction(behavior):

                async def stream_in_stream_out(requests, context):
                    async for response in behavior(checked(requests, _CallScope(client)), context):
                        yield response

                return stream_in_stream_out

            async def stream_in(requests, context):
                return await behavior(checked(requests, _CallScope(client)), context)

            return stream_in

        if inspect.isasyncgenfunction(behavior):

            async def unary_in_stream_out(request, context):
                admit(request, _CallScope(client), method)
                async for response in behavior(request, context):
                    yield response

            return unary_in_stream_out

        async def unary_in(request, context):
            admit(request, _CallScope(client), method)
            return await behavior(request, context)

        return unary_in


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _refusal(handler: grpc.RpcMethodHandler, error: DomainError) -> Callable[..., Any]:
    async def refuse(request_or_iterator, context):
        raise error

    return refuse


def _replace(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(behavior, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(behavior, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(behavior, **kwargs)
    return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)
