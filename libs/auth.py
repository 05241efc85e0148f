"""Who may call the gRPC services, and for which workspaces.

Clients present a bearer token (`authorization: Bearer <token>` metadata). The
settings hold only each token's SHA-256 (`TOKENSEND_CLIENTS`), so a leaked
settings file gives no working token. Each client is bound to the workspaces
it may touch ("*" for all); the workspace of a call is read from its request
message by `workspaces_of`, which knows every request type of every service
(a test fails when an RPC is added without a rule, so none slips through).

`python -m libs.auth NAME [WORKSPACE ...]` makes a new random token and prints
it once with the JSON entry for `TOKENSEND_CLIENTS`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from libs.ids import ID_RULE, is_id

ALL_WORKSPACES = "*"
BEARER = "bearer "
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
# What `echo -n "$TOKEN" | sha256sum` prints with TOKEN unset: configured, `Bearer ` alone would match it.
_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


def bearer_token(authorization: str | None) -> str:
    """The token of an `authorization` metadata value ("Bearer <token>", any case), "" when it holds none."""
    if not authorization or authorization[: len(BEARER)].lower() != BEARER:
        return ""
    return authorization[len(BEARER) :].strip()


class ClientGrant(BaseModel):
    """One entry of `TOKENSEND_CLIENTS`: a client's name, its token's SHA-256 and its workspaces."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    token_sha256: str
    workspaces: list[str] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, value: object) -> object:
        # A field read past would be a setting ignored: `"disabled": true` left the client in. The field
        # is not named: its name may be a token pasted in the wrong place.
        if isinstance(value, dict) and set(value) - set(cls.model_fields):
            raise ValueError(
                "has a field other than name, token_sha256 and workspaces (to turn a client off, remove its entry)"
            )
        return value

    @field_validator("token_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _HEX64.match(value):
            raise ValueError("token_sha256 must be the 64 hex digits of the token's SHA-256")
        if value == _EMPTY_DIGEST:
            raise ValueError("token_sha256 is the SHA-256 of an empty token: digest the token itself")
        return value

    @field_validator("workspaces")
    @classmethod
    def _workspace_ids(cls, values: list[str]) -> list[str]:
        for value in values:
            if value != ALL_WORKSPACES and not is_workspace_id(value):
                raise ValueError("workspaces must be workspace IDs or '*'")
        return values

    def may_use(self, workspace_id: str) -> bool:
        return ALL_WORKSPACES in self.workspaces or workspace_id in self.workspaces

    @property
    def all_workspaces(self) -> bool:
        return ALL_WORKSPACES in self.workspaces


def is_workspace_id(value: str) -> bool:
    """Whether `value` has a workspace ID's shape (what `libs.store.check_id` accepts)."""
    return is_id(value)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()


class ClientRegistry:
    """Finds the client a bearer token belongs to, comparing digests in constant time."""

    def __init__(self, grants: Iterable[ClientGrant]) -> None:
        self._grants = [(bytes.fromhex(g.token_sha256), g) for g in grants]
        if len({digest for digest, _ in self._grants}) != len(self._grants):
            raise ValueError("two clients in TOKENSEND_CLIENTS share a token")

    @property
    def enabled(self) -> bool:
        return bool(self._grants)

    def authenticate(self, authorization: str | None) -> ClientGrant | None:
        """The client of an `authorization` metadata value, or None. Every grant is compared, so the
        time taken does not depend on which one (if any) matched."""
        token = bearer_token(authorization)
        if not token:
            return None
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, grant in self._grants:
            if hmac.compare_digest(presented, digest) and found is None:
                found = grant
        return found


# -- which workspace a request is about -----------------------------------------------------------
#
# Request type → the field paths that may hold its workspace (a oneof lists each branch). Streaming
# requests whose later messages carry no workspace (DispatchStream's recipients) are bound to the
# workspace of the message that opened the stream.
WORKSPACE_FIELDS: dict[str, tuple[str, ...]] = {
    # resolver
    "tokensend.resolver.v1.PutPiiApiConfigRequest": ("config.workspace_id",),
    "tokensend.resolver.v1.GetPiiApiConfigRequest": ("workspace_id",),
    "tokensend.resolver.v1.PutOAuthConfigRequest": ("config.workspace_id",),
    "tokensend.resolver.v1.GetOAuthConfigRequest": ("workspace_id",),
    "tokensend.resolver.v1.TestPiiApiConfigRequest": ("config.workspace_id", "saved.workspace_id"),
    "tokensend.resolver.v1.ResolveContactsRequest": ("workspace_id",),
    "tokensend.resolver.v1.PutContentApiConfigRequest": ("config.workspace_id",),
    "tokensend.resolver.v1.GetContentApiConfigRequest": ("workspace_id",),
    "tokensend.resolver.v1.TestContentApiConfigRequest": ("config.workspace_id", "saved.workspace_id"),
    "tokensend.resolver.v1.ListPiiApiConfigsRequest": ("workspace_id",),
    "tokensend.resolver.v1.ListOAuthConfigsRequest": ("workspace_id",),
    "tokensend.resolver.v1.ListContentApiConfigsRequest": ("workspace_id",),
    "tokensend.resolver.v1.DeletePiiApiConfigRequest": ("workspace_id",),
    "tokensend.resolver.v1.DeleteOAuthConfigRequest": ("workspace_id",),
    "tokensend.resolver.v1.DeleteContentApiConfigRequest": ("workspace_id",),
    # dispatcher
    "tokensend.dispatcher.v1.PutConnectorRequest": ("connector.workspace_id",),
    "tokensend.dispatcher.v1.GetConnectorRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.ListConnectorsRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.DeleteConnectorRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.DispatchRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.DispatchStreamRequest": ("header.workspace_id",),
    "tokensend.dispatcher.v1.SendTestRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.SuppressRecipientsRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.UnsuppressRecipientsRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.ListSuppressionsRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.PutOptOutKeywordsRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.GetOptOutKeywordsRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.PreviewMessageRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.ReconstructMessageRequest": ("workspace_id",),
    "tokensend.dispatcher.v1.ListReconstructionsRequest": ("workspace_id",),
    # receipts
    "tokensend.receipts.v1.IngestReceiptRequest": ("workspace_id",),
    "tokensend.receipts.v1.GetCampaignStatsRequest": ("workspace_id",),
    "tokensend.receipts.v1.StreamDeliveryEventsRequest": ("workspace_id",),
}


class NoWorkspaceRule(LookupError):
    """A request type `WORKSPACE_FIELDS` does not know: refused, never guessed."""


@dataclass(frozen=True)
class WorkspaceClaim:
    """The workspaces a request names, and the first path that could name one (for error messages)."""

    workspaces: frozenset[str]
    first_path: str
    other_paths: tuple[str, ...] = ()  # a oneof's other branches
    named: tuple[tuple[str, str], ...] = ()  # (path, value) of each path that names one

    def not_an_id(self) -> str | None:
        """The first path whose value cannot be a workspace ID (so no client is bound to it), or None."""
        return next((path for path, value in self.named if not is_workspace_id(value)), None)

    @property
    def missing(self) -> str:
        """What an error says when no path names a workspace."""
        return f"is required (or {' or '.join(self.other_paths)})" if self.other_paths else "is required"


def _read_path(message: Message, path: str) -> str:
    *parents, leaf = path.split(".")
    current = message
    for name in parents:
        if not current.HasField(name):
            return ""
        current = getattr(current, name)
    return getattr(current, leaf)


def workspaces_of(message: Message) -> WorkspaceClaim:
    """The workspace IDs `message` names (empty when none is set); NoWorkspaceRule for an unknown type."""
    paths = WORKSPACE_FIELDS.get(message.DESCRIPTOR.full_name)
    if paths is None:
        raise NoWorkspaceRule(message.DESCRIPTOR.full_name)
    named = tuple((path, value) for path, value in ((p, _read_path(message, p)) for p in paths) if value)
    return WorkspaceClaim(frozenset(value for _, value in named), paths[0], paths[1:], named)


def _with_token(details: grpc.aio.ClientCallDetails, pair: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()), pair)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _BearerUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self._pair), request)


class _BearerUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self._pair), request)


class _BearerStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._pair), request_iterator)


class _BearerStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, pair: tuple[str, str]) -> None:
        self._pair = pair

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._pair), request_iterator)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors for a `grpc.aio` channel that send `authorization: Bearer <token>` on every call
    (grpc.aio files an interceptor under one call type only, hence one per type)."""
    pair = ("authorization", f"Bearer {token}")
    return [_BearerUnaryUnary(pair), _BearerUnaryStream(pair), _BearerStreamUnary(pair), _BearerStreamStream(pair)]


def new_client(name: str, workspaces: Sequence[str]) -> tuple[str, ClientGrant]:
    """A fresh random token and its `TOKENSEND_CLIENTS` entry."""
    token = secrets.token_urlsafe(32)
    return token, ClientGrant(name=name, token_sha256=token_digest(token), workspaces=list(workspaces) or ["*"])


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m libs.auth NAME [WORKSPACE ...]   (no workspace: '*', every workspace)")  # noqa: T201
        return 0 if argv else 2
    try:
        token, grant = new_client(argv[0], argv[1:])
    except ValidationError as exc:
        # Said by what is wrong, never by the value given: a token pasted in the wrong place stays unprinted.
        wrong = sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]})
        print(  # noqa: T201
            f"libs.auth: invalid {' and '.join(wrong)}: NAME is 1-64 letters, digits, '_', '.', ':' or '-'; "
            f"each WORKSPACE a workspace ID ({ID_RULE}) or '*'",
            file=sys.stderr,
        )
        return 2
    # A CLI for operators: the token is shown once, here, and stored nowhere.
    print(f"token (give it to {grant.name}; it is not stored anywhere): {token}")  # noqa: T201
    print(f"TOKENSEND_CLIENTS entry: {json.dumps(grant.model_dump())}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
