"""Maps exceptions raised by servicers to gRPC statuses.

Domain errors carry their own code and a PII-free message; Redis trouble is
UNAVAILABLE; anything else is INTERNAL with a reference, logged by type and
location only, because an exception's text may quote the data it choked on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from libs.config_index import describe_config_key
from libs.crypto import SealedDataInvalid
from libs.errors import DomainError, InvalidArgument, WithDetails
from libs.store import STORE_ERRORS
from libs.telemetry import ServerSpans

log = logging.getLogger(__name__)


class WrappedHandlers:
    """The handlers an interceptor made from the server's own, kept by what each was made from: a
    call finds its wrapped handler instead of building closures and a handler tuple again (11 µs a
    call for the error mapping and the guard together). The server hands out the same handler
    objects call after call; the bound only guards against handlers made afresh."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._made: dict[Any, grpc.RpcMethodHandler] = {}

    def get(self, key: Any, make: Callable[[], grpc.RpcMethodHandler]) -> grpc.RpcMethodHandler:
        made = self._made.get(key)
        if made is None:
            if len(self._made) >= self.LIMIT:
                self._made.clear()
            made = self._made[key] = make()
        return made


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))


def _answer(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
    # The status is set and the handler returns, rather than `context.abort` raising: an exception
    # would make the tracing layer above format a traceback for an answer as ordinary as NOT_FOUND.
    if trailing:
        context.set_trailing_metadata(trailing)
    context.set_details(details)
    context.set_code(code)


def _status_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    note, answered = "", ()
    if isinstance(exc, WithDetails):  # the error of a call that had part of its answer, and that part
        exc, note, answered = exc.cause, exc.note, exc.details
    code, message, details = _status_of(exc, method)
    message += note
    details += answered
    if not details:
        _answer(context, code, message)
        return
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    _answer(context, rich.code, rich.details, rich.trailing_metadata)


def _status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str, tuple[Message, ...]]:
    """The code, message and google.rpc.Status details `exc` is answered with."""
    if isinstance(exc, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
        return exc.code, exc.message, (error_details_pb2.BadRequest(field_violations=[violation]),)
    if isinstance(exc, DomainError):
        return exc.code, exc.message, ()
    if isinstance(exc, SealedDataInvalid):
        # Named by kind, workspace and ID (never by contents), so the operator knows which one to save again.
        what = describe_config_key(exc.record)
        log.error("sealed data in %s does not open with the configured keys: %s", method, what or "unnamed")
        return (
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{what or 'a stored config'} does not open with TOKENSEND_SECRET_KEY: it was sealed under another "
            "key (a dev-mode key of an earlier run, or a key changed without re-sealing); save it again with its "
            "secrets, or delete it",
            (),
        )
    if isinstance(exc, STORE_ERRORS):
        log.warning("store unavailable in %s: %s", method, type(exc).__name__)
        return grpc.StatusCode.UNAVAILABLE, "storage unavailable, retry later", ()
    ref = uuid.uuid4().hex[:12]
    log.error("unhandled %s in %s (ref %s) at %s", type(exc).__name__, method, ref, _where(exc))
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref})", ()


# What a request's bytes that do not decode as its message read as (a string that is not UTF-8, damaged
# bytes), for the handler to answer INVALID_ARGUMENT: grpc itself would answer UNKNOWN and log a traceback.
_UNDECODABLE = object()


class _Requests:
    """How a method's requests are read: decoded leniently, and an undecodable one refused naming its type."""

    def __init__(self, handler: grpc.RpcMethodHandler) -> None:
        deserialize = handler.request_deserializer
        descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        self._name = descriptor.full_name if descriptor is not None else "the method's request message"
        self._deserialize = deserialize
        self.streaming = handler.request_streaming

    def deserializer(self) -> Callable[[bytes], Any] | None:
        deserialize = self._deserialize
        if deserialize is None:
            return None

        def decode(data: bytes) -> Any:
            try:
                return deserialize(data)
            except DecodeError:
                return _UNDECODABLE

        return decode

    def refusal(self) -> InvalidArgument:
        return InvalidArgument(
            "request", f"does not decode as {self._name} (a string that is not UTF-8, or damaged bytes)"
        )

    async def checked(self, requests: Any) -> Any:
        async for request in requests:
            if request is _UNDECODABLE:
                raise self.refusal()
            yield request

    def read(self, request_or_iterator: Any) -> Any:
        """The request, or the stream of them checked one by one; raises when the one request did not decode."""
        if self.streaming:
            return self.checked(request_or_iterator)
        if request_or_iterator is _UNDECODABLE:
            raise self.refusal()
        return request_or_iterator


def _is_abort(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError)


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str, spans: ServerSpans | None, requests: _Requests
) -> Callable[..., Awaitable[Any]]:
    read = requests.read

    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        opened = spans.start(method, context) if spans is not None else None
        cancelled = False
        try:
            return await behavior(read(request_or_iterator), context)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if _is_abort(exc) or not isinstance(exc, Exception):
                raise
            _status_for(exc, context, method)
            return None  # a non-OK status: gRPC sends no message
        finally:
            if opened is not None:
                spans.finish(opened, context, cancelled)

    return handler


def _wrap_streaming(
    behavior: Callable[..., Any], method: str, spans: ServerSpans | None, requests: _Requests
) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_unary(behavior, method, spans, requests)
    read = requests.read

    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        opened = spans.start(method, context) if spans is not None else None
        cancelled = False
        try:
            async for response in behavior(read(request_or_iterator), context):
                yield response
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
            if _is_abort(exc) or not isinstance(exc, Exception):
                raise
            _status_for(exc, context, method)
        finally:
            if opened is not None:
                spans.finish(opened, context, cancelled)

    return handler


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns servicer exceptions into statuses a client can act on; with `spans`, each call also
    gets its server span, which so sees the status the mapping produced."""

    def __init__(self, spans: ServerSpans | None = None) -> None:
        self._spans = spans
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        return self._wrapped.get((handler, method), lambda: self._wrap(handler, method))

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        spans = self._spans if self._spans is not None and self._spans.traced(method) else None
        requests = _Requests(handler)
        kwargs = {"request_deserializer": requests.deserializer(), "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, spans, requests), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_streaming(handler.unary_stream, method, spans, requests), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, spans, requests), **kwargs
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_streaming(handler.stream_stream, method, spans, requests), **kwargs
        )
