"""Domain errors. Each maps to one gRPC status; their messages never hold PII."""

from __future__ import annotations

import grpc


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


def require(condition: bool, field: str, description: str) -> None:
    """Raise InvalidArgument for `field` unless `condition` holds."""
    if not condition:
        raise InvalidArgument(field, description)
