"""Domain errors. Each maps to one gRPC status; their messages never hold PII."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf.message import Message


class DomainError(Exception):
    """An error with a gRPC status and a message safe to show anyone."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """Bad input; `field` is the request path of the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(DomainError):
    """A change that met another made at the same time: the caller may try again."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(DomainError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WithDetails(Exception):
    """A call's error beside the part of its answer it had: the status `cause` maps to (`libs.interceptors`),
    its code and message kept, with `note` added to the message and `details` as google.rpc.Status details.
    Both hold only what the call's reply would (IDs, codes, counts). A wrapper rather than attributes set
    on `cause`, which may be another call's too (one fetch's error given to every call waiting on it)."""

    def __init__(self, cause: Exception, note: str, details: Sequence[Message]) -> None:
        super().__init__(f"{type(cause).__name__}{note}")
        self.cause = cause
        self.note = note
        self.details = tuple(details)


def require(condition: bool, field: str, description: str) -> None:
    """Raise InvalidArgument for `field` unless `condition` holds."""
    if not condition:
        raise InvalidArgument(field, description)
