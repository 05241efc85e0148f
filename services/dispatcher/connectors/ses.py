"""Amazon SES v2 connector (`SendEmail`, through aiobotocore).

One client per connector, created on first use and reused. botocore's own
retries are off: its legacy mode resends after read timeouts, which could send
a message twice; our loop retries only throttling, 5xx and connections that
never carried the request. Our IDs travel as message tags, which SES echoes in
its events. botocore logs whole request bodies at DEBUG, so its loggers are
held at WARNING while a connector exists.

botocore signs the request; the HTTP exchange itself goes through the transport
every HTTP connector uses (`AiohttpTransport`, on a guarded session), answering
botocore's `before-send` event. So an endpoint whose name resolves to a private
address is refused, one timer bounds the whole exchange (aiobotocore's timers
restart on every chunk: a reply dripping a byte a second never ended), and a
reply is read to at most 1 MiB. What reaches botocore's parser is cut down to
the fields we read, so a hostile body cannot overflow its recursion.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from typing import Any

import aiohttp
import orjson
from aiobotocore.awsrequest import AioAWSResponse
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from libs.netguard import BlockedAddress, customer_session
from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus, send_each
from services.dispatcher.connectors.email_headers import ascii_domain, extra_headers
from services.dispatcher.connectors.http_retry import (
    AiohttpTransport,
    AttemptLogs,
    AttemptTimer,
    HttpRequest,
    InvalidRequest,
    MaybeSent,
    NotSent,
    RetryPolicy,
    Sleep,
    UntrustedCertificate,
)
from services.dispatcher.connectors.provider_ids import safe_provider_id

log = logging.getLogger(__name__)

THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "TooManyRequestsException"})
# SES answers a used-up daily sending quota as throttling (or LimitExceededException), told apart only by
# its message, "Daily message quota exceeded.". The quota is a rolling 24 hours': no retry in a batch meets it.
DAILY_QUOTA_CODES = THROTTLING_CODES | {"LimitExceededException"}
DAILY_QUOTA_TEXT = "daily message quota exceeded"
# Sending paused for the account (SESv2; v1 says AccountSendingPausedException) or its configuration set:
# it stays paused until someone resumes it, so no retry either.
SENDING_PAUSED_CODES = frozenset(
    {"SendingPausedException", "AccountSendingPausedException", "ConfigurationSetSendingPausedException"}
)
# AWS's refusals of the connector's access key: unknown, expired, or its secret wrong (the signature).
CREDENTIAL_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
# The key's IAM policy refused the send. Its remedy is the connector's permissions, as for the codes
# above, but it is not a refusal of the account: a condition on ses:Recipients or ses:FromAddress may
# refuse some messages and allow the rest, so the batch goes on.
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException"})
# SESv2's permanent restriction of the account (a review, an Acceptable Use Policy breach).
ACCOUNT_SUSPENDED = "AccountSuspendedException"
# SendEmail names nothing that may be missing but the connector's configuration set (no template, no contact
# list): SES not finding it refuses every message of the batch.
NOT_FOUND = "NotFoundException"
# The custom MAIL FROM domain of the sender's identity is not verified (SESv2; v1 drops "Exception").
MAIL_FROM_UNVERIFIED_CODES = frozenset({"MailFromDomainNotVerifiedException", "MailFromDomainNotVerified"})
# MessageRejected "Email address is not verified. The following identities failed the check in region
# EU-WEST-1: a@b.example, c@d.example" (moto: "Email address not verified a@b.example"). SES's sandbox
# refuses recipients not verified in these words too, so only the sender among them refuses the batch.
MESSAGE_REJECTED = "MessageRejected"
UNVERIFIED_TEXT = "not verified"
_IDENTITY = re.compile(r"[^\s,:;<>()\[\]\"']+@[^\s,:;<>()\[\]\"']+")
# SES's sending quota is a number of messages a second; jittered backoff alone retried within
# milliseconds and gave up after about 1.4 s in all.
THROTTLED_WAIT_SECONDS = 1.0
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# AWS error codes are words run together (MessageRejected, TooManyRequestsException). Anything else
# in that place (an address a proxy echoed into x-amzn-ErrorType) is not repeated.
_ERROR_CODE = re.compile(r"[A-Z][A-Za-z]{1,63}")
# The only fields of a reply botocore is given to parse: SendEmail's result, an error's code and text.
_REPLY_FIELDS = ("MessageId", "__type", "code", "Code", "message", "Message")
_MAX_FIELD_CHARS = 1024
# Loggers that print request and response bodies (the recipient, the content) at DEBUG.
SDK_LOGGERS = ("botocore", "aiobotocore", "boto3", "urllib3")


def quiet_sdk_loggers() -> None:
    """Keeps AWS SDK debug logging (which prints whole requests) out of every sink."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def tag_value(value: str) -> str:
    """SES tag values allow only letters, digits, '_' and '-', at most 256 of them."""
    return _TAG_UNSAFE.sub("_", value)[:256]


def email_tags(message: OutboundMessage) -> list[dict[str, str]]:
    tags = [{"Name": "tokensend_message_id", "Value": message.message_id}]
    if message.campaign_id:
        tags.append({"Name": "tokensend_campaign", "Value": tag_value(message.campaign_id)})
    if message.campaign_instance_id:
        tags.append({"Name": "tokensend_instance", "Value": tag_value(message.campaign_instance_id)})
    return tags


def send_email_params(message: OutboundMessage, sender: str, configuration_set: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {}
    if message.text_body:
        body["Text"] = {"Data": message.text_body, "Charset": "UTF-8"}
    if message.html_body:
        body["Html"] = {"Data": message.html_body, "Charset": "UTF-8"}
    simple: dict[str, Any] = {"Subject": {"Data": message.subject, "Charset": "UTF-8"}, "Body": body}
    headers = extra_headers(message.headers)
    if headers:
        simple["Headers"] = [{"Name": k, "Value": v} for k, v in headers.items()]
    params: dict[str, Any] = {
        "FromEmailAddress": sender,
        "Destination": {"ToAddresses": [ascii_domain(message.to)]},  # SES has no SMTPUTF8
        "Content": {"Simple": simple},
        "EmailTags": email_tags(message),
    }
    if configuration_set:
        params["ConfigurationSetName"] = configuration_set
    return params


def refusal(code: str, http_status: int) -> tuple[str, str, bool] | None:
    """What an AWS error code that is final whatever the message fails with: (error code, message,
    whether it refuses the account, so the batch's other messages would meet it too); None for others."""
    if code in SENDING_PAUSED_CODES:
        return (
            "SENDING_PAUSED",
            f"ses sending is paused for the account or its configuration set ({code}, HTTP {http_status}); "
            "not retried: resume sending in SES, then re-run the instance",
            True,
        )
    if code in CREDENTIAL_CODES:
        return (
            "PROVIDER_AUTH_FAILED",
            f"ses refused the connector's access key ({code}, HTTP {http_status}); "
            "not retried: check the connector's access key ID and secret access key",
            True,
        )
    if code in ACCESS_DENIED_CODES:
        return (
            "PROVIDER_AUTH_FAILED",
            f"the access key's IAM policy refused the send ({code}, HTTP {http_status}); not retried: "
            "check the policy's ses:SendEmail permission and its conditions on recipients and sender",
            False,
        )
    if code == ACCOUNT_SUSPENDED:
        return (
            "ACCOUNT_SUSPENDED",
            f"ses suspended the account ({code}, HTTP {http_status}); "
            "not retried: take it up with AWS, then re-run the instance",
            True,
        )
    if code == NOT_FOUND:
        return (
            "SENDER_REFUSED",
            f"ses refused the connector's configuration: its configuration set was not found ({code}, HTTP "
            f"{http_status}); not retried: create it in SES or fix the connector's configuration set, "
            "then re-run the instance",
            True,
        )
    if code in MAIL_FROM_UNVERIFIED_CODES:
        return (
            "SENDER_REFUSED",
            "ses refused the connector's sender: the custom MAIL FROM domain of its identity is not verified "
            f"({code}, HTTP {http_status}); not retried: verify that domain in SES or fix the connector's sender, "
            "then re-run the instance",
            True,
        )
    return None


def unverified_sender(code: str, http_status: int, text: str, sender: str) -> tuple[str, str, bool] | None:
    """A MessageRejected whose "not verified" `text` names `sender` among the identities that failed SES's
    check, as `refusal` says it; None for any other. The text names recipients too (SES's sandbox): it is
    read here, never repeated."""
    if code != MESSAGE_REJECTED or UNVERIFIED_TEXT not in text.lower():
        return None
    sender = sender.casefold()
    if not any(identity.rstrip(".").casefold() == sender for identity in _IDENTITY.findall(text)):
        return None
    return (
        "SENDER_REFUSED",
        f"ses refused the connector's sender: its identity is not verified in the connector's region ({code}, "
        f"HTTP {http_status}); not retried: verify it in SES or fix the connector's sender, then re-run the instance",
        True,
    )


class SesConnector:
    """Sends email through one AWS account's SES in one region."""

    provider = "ses"
    max_batch = 1

    def __init__(
        self,
        *,
        access_key_id: str,
        secret_access_key: str,
        region: str,
        sender: str,
        retry: RetryPolicy,
        configuration_set: str = "",
        base_url: str = "",
        allow_private: bool = False,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        session: AioSession | None = None,
    ) -> None:
        quiet_sdk_loggers()
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._region = region
        self._sender = ascii_domain(sender)
        self._configuration_set = configuration_set
        self._endpoint_url = base_url or None
        self._retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._logs = AttemptLogs("ses", log)
        self._session = session
        self._allow_private = allow_private
        self._http: aiohttp.ClientSession | None = None
        self._client_context: Any = None
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        return await send_each(messages, self._send_one)

    async def close(self) -> None:
        async with self._client_lock:
            context, self._client_context, self._client = self._client_context, None, None
            http, self._http = self._http, None
        if context is not None:
            await context.__aexit__(None, None, None)
        if http is not None:
            await http.close()

    async def _get_client(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                session = self._session or get_session()
                config = AioConfig(
                    # One attempt per call: retrying is ours to decide (see the module docstring).
                    retries={"mode": "standard", "total_max_attempts": 1},
                    connect_timeout=self._retry.connect_timeout_seconds,
                    read_timeout=self._retry.read_timeout_seconds,
                )
                context = session.create_client(
                    "sesv2",
                    region_name=self._region,
                    endpoint_url=self._endpoint_url,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    config=config,
                )
                client = await context.__aenter__()
                self._http = customer_session(self._allow_private, limit=32)
                transport = AiohttpTransport(self._http, self._retry)
                client.meta.events.register("before-send.sesv2.SendEmail", _exchange_through(transport))
                self._client, self._client_context = client, context
            return self._client

    async def _send_one(self, message: OutboundMessage) -> SendOutcome:
        if not (message.text_body or message.html_body):
            return SendOutcome(
                message.message_id, SendStatus.FAILED, error_code="INVALID_MESSAGE", error_message="no body", attempts=0
            )
        if not ascii_domain(message.to).isascii():
            # SES has no SMTPUTF8: "the local part of a destination email address may only contain 7-bit ASCII".
            return SendOutcome(
                message.message_id,
                SendStatus.FAILED,
                error_code="INVALID_ADDRESS",
                error_message="ses takes only ASCII before the @ of an address, and this recipient's is not",
                attempts=0,
            )
        params = send_email_params(message, self._sender, self._configuration_set)
        timer = AttemptTimer(self.provider)  # each SendEmail call, not the client's creation on first use
        return timer.ended(await self._attempts(message, params, timer))

    async def _attempts(self, message: OutboundMessage, params: dict[str, Any], timer: AttemptTimer) -> SendOutcome:
        attempt = 0
        while True:
            attempt += 1
            try:
                client = await self._get_client()
                timer.start()
                reply = await client.send_email(**params)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code = str(error.get("Code", ""))
                code = code if _ERROR_CODE.fullmatch(code) else "Unknown"
                http_status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                said = str(error.get("Message", ""))  # may quote the addresses: read, never repeated
                quota_used_up = code in DAILY_QUOTA_CODES or http_status == 429
                if quota_used_up and DAILY_QUOTA_TEXT in said.lower():
                    return _failed(
                        message,
                        "QUOTA_EXCEEDED",
                        f"ses's daily sending quota is used up ({code}: Daily message quota exceeded); "
                        "not retried: re-run the instance once the 24-hour quota has room",
                        attempt,
                        account_refused=True,
                    )
                refused = refusal(code, http_status) or unverified_sender(code, http_status, said, self._sender)
                if refused is not None:
                    error_code, text, of_account = refused
                    return _failed(message, error_code, text, attempt, account_refused=of_account)
                if code in THROTTLING_CODES or http_status == 429:
                    kind, what = "RATE_LIMITED", f"rate limited by ses ({code})"
                elif http_status == 504:
                    # A gateway in front of SES gave up waiting for it, after passing the request on.
                    self._logs.not_resent("HTTP 504")
                    return _unknown(message, "HTTP 504", attempt)
                elif http_status >= 500:
                    kind, what = "SERVER_ERROR", f"ses answered {code} (HTTP {http_status})"
                else:
                    # The error Message can quote the addresses (moto: "Email address not verified <from>").
                    return _failed(
                        message,
                        f"SES_{code}",
                        f"ses refused the message ({code}, HTTP {http_status})",
                        attempt,
                    )
            except BlockedAddress:
                return _failed(message, "BLOCKED_ADDRESS", "ses URL reaches a non-public address", attempt)
            except UntrustedCertificate:
                return _failed(message, "CONNECTION_FAILED", "ses TLS certificate not trusted", attempt)
            except NotSent:
                kind, what = "CONNECTION_FAILED", "could not connect to ses"
            except InvalidRequest as exc:
                return _failed(message, "INVALID_REQUEST", f"ses {exc.part} is not valid", attempt)
            except MaybeSent as exc:
                self._logs.not_resent(exc.cause)
                return _unknown(message, exc.cause, attempt)
            except BotoCoreError as exc:
                # Parameter validation, missing region and the like: raised before anything is sent.
                # str(exc) can quote parameter values (the address), so only the type is reported.
                return _failed(message, "INVALID_REQUEST", f"ses request not sent ({type(exc).__name__})", attempt)
            else:
                provider_id = safe_provider_id(reply.get("MessageId"), message.to)
                return SendOutcome(
                    message.message_id, SendStatus.SENT, provider_message_id=provider_id, attempts=attempt
                )
            if attempt > self._retry.max_retries:
                return _failed(message, kind, f"{what} after {attempt} attempts", attempt)
            timer.retried()
            delay = self._retry.delay(attempt, self._rng)
            if kind == "RATE_LIMITED":  # a rate a second: a retry within the same second meets it again
                delay = max(delay, THROTTLED_WAIT_SECONDS)
            self._logs.retrying(attempt, kind, delay)
            await self._sleep(delay)


class _ReadBody:
    """What botocore reads a reply's body from (`raw.read()`): the bytes already read."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self) -> bytes:
        return self._body


def _exchange_through(transport: AiohttpTransport) -> Any:
    """botocore's `before-send` handler: the signed request sent through `transport`, its reply
    handed back for botocore to parse. The transport's exceptions reach `_send_one` as they are."""

    async def exchange(request: Any, **_: Any) -> AioAWSResponse:
        body = request.body
        if isinstance(body, str):
            body = body.encode()
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        headers["Accept-Encoding"] = "identity"
        reply = await transport.fetch(HttpRequest(request.method, request.url, headers, body or None))
        if not reply.body_complete:
            raise MaybeSent("reply broke off")
        lowered = {k.lower(): v for k, v in reply.headers.items()}
        return AioAWSResponse(request.url, reply.status, lowered, _ReadBody(reply_fields(reply.body)))

    return exchange


def reply_fields(body: bytes) -> bytes:
    """The reply cut down to the top-level text fields botocore's parser reads (`_REPLY_FIELDS`).

    Anything else, or a body that is not a JSON object, becomes `{}`: botocore then names the error by
    the x-amzn-ErrorType header or the status, and a SendEmail without a MessageId is sent without an ID.
    """
    try:
        document = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:  # deeper than 1,024 levels too: botocore's json would recurse
        return b"{}"
    if not isinstance(document, dict):
        return b"{}"
    kept = {
        name: value
        for name in _REPLY_FIELDS
        if isinstance(value := document.get(name), str) and len(value) <= _MAX_FIELD_CHARS
    }
    return orjson.dumps(kept)


def _failed(
    message: OutboundMessage, code: str, text: str, attempts: int, *, account_refused: bool = False
) -> SendOutcome:
    return SendOutcome(
        message.message_id,
        SendStatus.FAILED,
        error_code=code,
        error_message=text,
        attempts=attempts,
        account_refused=account_refused,
    )


def _unknown(message: OutboundMessage, reason: str, attempts: int) -> SendOutcome:
    return SendOutcome(
        message.message_id,
        SendStatus.OUTCOME_UNKNOWN,
        error_code="OUTCOME_UNKNOWN",
        error_message=f"the request may have reached ses ({reason}); not resent",
        attempts=attempts,
    )
