"""Why a receipt is refused: each error has a gRPC status and the HTTP status its webhook answers.

Messages are fixed phrases and field names, never a value from the receipt.
"""

from __future__ import annotations

import grpc

from libs.errors import DomainError, InvalidArgument


class SignatureMissing(DomainError):
    """No signature (or no signature timestamp) where the provider always sends one."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class SignatureInvalid(DomainError):
    """The signature does not verify, is stale, or its certificate is not acceptable."""

    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class SnsTopicsNotListed(SignatureInvalid):
    """An SES connector without `sns_topic_arns`: SNS signs for every AWS account, so no topic is known to be ours."""

    def __init__(self) -> None:
        super().__init__(
            "the connector lists no SNS topics: set its sns_topic_arns credential to the ARNs of the topics "
            "whose receipts it accepts, then have SNS send the subscription confirmation again"
        )


class UnknownConnector(DomainError):
    """No such connector, or one of another provider: one answer for both, so neither is revealed."""

    code = grpc.StatusCode.NOT_FOUND
    http_status = 404

    def __init__(self) -> None:
        super().__init__("unknown connector")


class ConnectorUnreadable(DomainError):
    """The connector is stored but does not open with this process's keys: sealed under a key it was not given
    (a rotation rolled out of order) or damaged. The operator can set the key; the provider sends again meanwhile,
    and the receipt is then recorded. Over gRPC the relay is told which setting to fix."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 503
    retry_after_seconds = 60  # an operator's fix takes minutes, not seconds

    def __init__(self) -> None:
        super().__init__(
            "the connector's stored config does not open with TOKENSEND_SECRET_KEY (was the key changed without "
            "re-sealing?); send the receipt again once the key that sealed it is set"
        )


class MalformedReceipt(InvalidArgument):
    """The receipt verified (or could not be verified) but is not the provider's documented shape."""

    http_status = 400


class ReceiptTooLarge(InvalidArgument):
    http_status = 413

    def __init__(self, limit: int, variable: str = "TOKENSEND_MAX_RECEIPT_BYTES") -> None:
        # Named as operators set it: the variable, not the settings field.
        super().__init__("body", f"is larger than the {limit}-byte limit ({variable})")
        self.limit = limit
        self.variable = variable


class UpstreamUnavailable(DomainError):
    """A certificate or subscription URL could not be fetched; the provider should retry."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class NotIndexedYet(DomainError):
    """Events that name only the provider's message ID, not indexed yet, and are young enough that the
    dispatcher may still index it: the rest of the receipt is recorded, and the provider's redelivery
    (whose other events are then duplicates) brings these back."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    # SNS keeps to its subscription's delivery policy; a relay or another provider may read this.
    retry_after_seconds = 20

    def __init__(self) -> None:
        super().__init__("an event names a message not indexed yet; send the receipt again later")


class ClaimedElsewhere(DomainError):
    """Another delivery of the same message (an inbound STOP, an SNS subscription confirmation) holds its claim:
    acting on it now, or failed where the store could not take the claim back, which then lapses. Answered as
    not taken, for the provider to send it again: by then it is done (a duplicate) or free to act on."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    retry_after_seconds = 5

    def __init__(self) -> None:
        super().__init__("the same message is being handled by another delivery; send it again later")


def http_status_of(exc: DomainError) -> int:
    if isinstance(exc, InvalidArgument):
        return getattr(exc, "http_status", 400)
    return getattr(exc, "http_status", 500)
