"""Sample PII API: stands in for a brand's own customer API in the demo, tests and benchmarks.

It serves made-up customers' contacts by anonymous ID in three shapes (single by path, single
by query parameter, bulk by POST), optionally behind OAuth 2.0 client credentials and/or a static
API key, optionally with every contact field AES-256-GCM encrypted. Faults (latency, error
statuses, rate limits, malformed bodies, replies trickled in pieces, dropped connections, missing
or null records, bad contacts, PII or the request's credentials echoed in error bodies) can be injected per
request count so consumers can be tested against a badly behaved API.

Endpoints
---------
``GET  /v1/customers/{anonymous_id}``   -> ``{"customer": CUSTOMER}`` or 404
``GET  /v1/lookup?customer_id=ID``      -> same as above
``POST /v1/customers:batchGet``         ``{"ids": [...]}`` (or ``customer_ids``) ->
                                        ``{"data": {"results": [CUSTOMER, ...]},
                                        "meta": {"requested": n, "found": m}}``
``POST /oauth/token``                   OAuth 2.0 client credentials grant (RFC 6749 §4.4)

where ``CUSTOMER`` is ``{"id", "email", "phone", "profile": {"first_name", "last_name"}}``.
Unknown IDs are 404 in single mode and simply omitted in bulk mode. IDs in the ``null_records`` fault
are answered as APIs that say "no such customer" in JSON do: ``{"customer": null}`` with a 200 in single
mode, a ``null`` in the results' place of the record in bulk mode.

Admin endpoints (unauthenticated; this is a sandbox): ``GET|POST|DELETE /_admin/faults``,
``GET /_admin/stats``, ``POST /_admin/stats/reset``, ``POST /_admin/tokens/revoke``.

Run it with ``python -m sandbox.pii_api --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import logging
import os
import random
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from libs import arguments
from sandbox.faults import CountedFaults
from sandbox.processes import LOG_LEVELS, command_name, serve

log = logging.getLogger(__name__)

MAX_BATCH_IDS = 1000
# A trickled reply: its body in this many pieces, each after a pause, as over a slow network.
TRICKLE_PIECES = 8
TRICKLE_PAUSE_SECONDS = 0.01
AES_KEY_BYTES = 32
NONCE_BYTES = 12

INVALID_EMAIL = "not-an-email"
INVALID_PHONE = "12ab"

_ENCRYPTED_FIELDS = ("email", "phone", "first_name", "last_name")

_FIRST_NAMES = (
    "Alice",
    "Amara",
    "Ben",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farah",
    "George",
    "Hana",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
    "Marco",
    "Nadia",
    "Oscar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
)
_LAST_NAMES = (
    "Adams",
    "Brown",
    "Chen",
    "Dubois",
    "Evans",
    "Fischer",
    "Garcia",
    "Hughes",
    "Ito",
    "Jones",
    "Khan",
    "Lopez",
    "Martin",
    "Nowak",
    "Okafor",
    "Patel",
    "Rossi",
    "Schmidt",
    "Taylor",
    "Ueda",
    "Varga",
    "Walsh",
    "Young",
    "Zhang",
)
_EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
# Area codes whose 555-01xx numbers are reserved for fiction yet pass phonenumbers validation.
_US_AREA_CODES = ("201", "202", "212", "312", "415", "617")


def _uk_mobile(rng: random.Random) -> str:
    return f"+447400{rng.randrange(1_000_000):06d}"


def _us_fictional(rng: random.Random) -> str:
    return f"+1{rng.choice(_US_AREA_CODES)}55501{rng.randrange(100):02d}"


def _fr_mobile(rng: random.Random) -> str:
    return f"+3361{rng.randrange(10_000_000):07d}"


def _de_mobile(rng: random.Random) -> str:
    return f"+49151{rng.randrange(100_000_000):08d}"


def _au_fictional(rng: random.Random) -> str:
    # 0491 570 xxx is the Australian range reserved for drama.
    return f"+61491570{rng.randrange(1000):03d}"


# UK and US dominate so the demo looks like a typical brand's audience.
_PHONE_MAKERS = (_uk_mobile, _uk_mobile, _us_fictional, _us_fictional, _fr_mobile, _de_mobile, _au_fictional)


@dataclass(frozen=True)
class Customer:
    """A made-up customer; every value is fictional."""

    anonymous_id: str
    email: str
    phone: str  # E.164
    first_name: str
    last_name: str


def generate_customers(count: int, seed: int = 7) -> dict[str, Customer]:
    """Make ``count`` deterministic customers keyed by anonymous ID (``cust-000001`` onwards)."""
    if count < 0:
        raise ValueError("count must not be negative")
    rng = random.Random(seed)
    customers: dict[str, Customer] = {}
    for number in range(1, count + 1):
        first_name = rng.choice(_FIRST_NAMES)
        last_name = rng.choice(_LAST_NAMES)
        anonymous_id = f"cust-{number:06d}"
        customers[anonymous_id] = Customer(
            anonymous_id=anonymous_id,
            email=f"{first_name.lower()}.{last_name.lower()}.{number}@{rng.choice(_EMAIL_DOMAINS)}",
            phone=rng.choice(_PHONE_MAKERS)(rng),
            first_name=first_name,
            last_name=last_name,
        )
    return customers


def encrypt_value(key: bytes, plaintext: str) -> str:
    """AES-256-GCM encrypt: standard base64 of ``nonce(12) || ciphertext || tag(16)``, no AAD."""
    if len(key) != AES_KEY_BYTES:
        raise ValueError("encryption key must be 32 bytes")
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), None)
    return base64.b64encode(nonce + sealed).decode("ascii")


@dataclass(frozen=True)
class OAuthClient:
    """The one client allowed to use the client credentials grant."""

    client_id: str
    client_secret: str
    token_ttl_seconds: int = 3600


_ID_SETS = ("missing_ids", "null_records", "invalid_contacts", "empty_contacts")


@dataclass
class Faults(CountedFaults):
    """Injected misbehaviour. Counts go down by one each time the fault fires; -1 means always."""

    latency_ms: int = 0
    fail_status: int | None = None
    fail_count: int = 0
    rate_limit_count: int = 0
    retry_after_seconds: int = 1
    malformed_count: int = 0
    missing_ids: set[str] = field(default_factory=set)
    null_records: set[str] = field(default_factory=set)
    invalid_contacts: set[str] = field(default_factory=set)
    empty_contacts: set[str] = field(default_factory=set)
    echo_pii_in_errors: bool = False
    echo_credentials_in_errors: bool = False
    token_fail_status: int | None = None
    drop_connection_count: int = 0
    trickle_count: int = 0

    @classmethod
    def from_json(cls, body: Any) -> Faults:
        """Build from an admin request body; raises ValueError naming the first bad field."""
        if not isinstance(body, dict):
            raise ValueError("faults must be a JSON object")
        kinds = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in body.items():
            if name not in kinds:
                raise ValueError(f"unknown fault {name!r}")
            if name in _ID_SETS:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of strings")
                values[name] = set(value)
            elif name in ("echo_pii_in_errors", "echo_credentials_in_errors"):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be a boolean")
                values[name] = value
            elif name in ("fail_status", "token_fail_status"):
                if value is not None and not (isinstance(value, int) and 100 <= value <= 599):
                    raise ValueError(f"{name} must be an HTTP status or null")
                values[name] = value
            else:
                if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                    raise ValueError(f"{name} must be an integer >= -1")
                values[name] = value
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        for name in _ID_SETS:
            body[name] = sorted(body[name])
        return body


@dataclass
class Stats:
    """What consumers asked for, so tests and benchmarks can check batching and retries."""

    requests: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    ids_requested: int = 0
    token_requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    dropped_connections: int = 0

    def reset(self) -> None:
        # In place, so tests holding ``sandbox.stats`` see the reset.
        self.requests = self.ids_requested = self.token_requests = self.dropped_connections = 0
        self.by_path.clear()
        self.statuses.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_path": dict(self.by_path),
            "ids_requested": self.ids_requested,
            "token_requests": self.token_requests,
            "statuses": dict(self.statuses),
            "dropped_connections": self.dropped_connections,
        }


def _error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    quoted: Mapping[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if quoted:
        body["customer"] = dict(quoted)  # the record the request failed on, as some APIs quote it
    return web.json_response(body, status=status, headers=headers)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _quoting_credentials(response: web.Response, request: web.Request) -> web.Response:
    """An error reply that quotes the request's credentials back, as a gateway quoting the request it
    refused does: its query string, API key and bearer token (``echo_credentials_in_errors``)."""
    try:
        body = json.loads(response.body) if isinstance(response.body, bytes) else {}
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    body["request"] = {
        "query": request.query_string,
        "x_api_key": request.headers.get("X-Api-Key", ""),
        "authorization": request.headers.get("Authorization", ""),
    }
    framing = ("content-length", "content-type")
    headers = {k: v for k, v in response.headers.items() if k.lower() not in framing}
    return web.json_response(body, status=response.status, headers=headers)


class PiiApiSandbox:
    """State and behaviour of one sample PII API; ``faults`` and ``stats`` are meant to be poked by tests."""

    def __init__(
        self,
        customers: Mapping[str, Customer],
        *,
        oauth: OAuthClient | None = None,
        api_key: str | None = None,
        encryption_key: bytes | None = None,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if encryption_key is not None and len(encryption_key) != AES_KEY_BYTES:
            raise ValueError("encryption key must be 32 bytes")
        self.customers = dict(customers)
        self.oauth = oauth
        self.api_key = api_key
        self.encryption_key = encryption_key
        self.faults = faults or Faults()
        self.stats = Stats()
        self.clock = clock
        self._tokens: dict[str, float] = {}  # access token -> expiry on self.clock

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/customers/{anonymous_id}", self._get_customer)
        app.router.add_get("/v1/lookup", self._lookup)
        app.router.add_post("/v1/customers:batchGet", self._batch_get)
        app.router.add_post("/oauth/token", self._issue_token)
        app.router.add_get("/_admin/faults", self._get_faults)
        app.router.add_post("/_admin/faults", self._set_faults)
        app.router.add_delete("/_admin/faults", self._clear_faults)
        app.router.add_get("/_admin/stats", self._get_stats)
        app.router.add_post("/_admin/stats/reset", self._reset_stats)
        app.router.add_post("/_admin/tokens/revoke", self._revoke_tokens)
        return app

    def revoke_tokens(self) -> None:
        self._tokens.clear()

    # -- cross-cutting: stats, latency, dropped connections, auth ---------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path.startswith("/_admin/"):
            return await handler(request)
        resource = request.match_info.route.resource
        self.stats.requests += 1
        self.stats.by_path[resource.canonical if resource is not None else "<unmatched>"] += 1
        if request.path.startswith("/v1/"):
            if self.faults.latency_ms > 0:
                await asyncio.sleep(self.faults.latency_ms / 1000)
            if self.faults.take("drop_connection_count"):
                return self._drop_connection(request)
        try:
            response = await self._authorised(request, handler)
        except web.HTTPException as exc:
            self.stats.statuses[str(exc.status)] += 1
            raise
        self.stats.statuses[str(response.status)] += 1
        if isinstance(response, web.Response) and response.status >= 400 and self.faults.echo_credentials_in_errors:
            response = _quoting_credentials(response, request)
        if isinstance(response, web.Response) and self.faults.take("trickle_count"):
            return await self._trickle(request, response)
        return response

    async def _trickle(self, request: web.Request, response: web.Response) -> web.StreamResponse:
        body = response.body if isinstance(response.body, bytes) else b""
        log.debug("injecting a reply in %d pieces", TRICKLE_PIECES)
        framing = ("content-length", "transfer-encoding")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in framing}
        stream = web.StreamResponse(status=response.status, headers=headers)
        stream.content_length = len(body)
        await stream.prepare(request)
        step = max(1, -(-len(body) // TRICKLE_PIECES))
        for start in range(0, len(body), step):
            await asyncio.sleep(TRICKLE_PAUSE_SECONDS)
            await stream.write(body[start : start + step])
        await stream.write_eof()
        return stream

    def _drop_connection(self, request: web.Request) -> web.StreamResponse:
        log.debug("injecting dropped connection on %s", request.path)
        self.stats.dropped_connections += 1
        if request.transport is not None:
            request.transport.abort()
        # Never sent: aiohttp swallows the ConnectionError from writing to the aborted transport.
        return web.Response(status=204)

    async def _authorised(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            if self.api_key is not None and not hmac.compare_digest(
                request.headers.get("X-Api-Key", "").encode(), self.api_key.encode()
            ):
                return _error(401, "unauthorized", "missing or invalid API key")
            if self.oauth is not None and not self._bearer_is_valid(request):
                return _error(
                    401,
                    "unauthorized",
                    "missing, invalid or expired access token",
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
        return await handler(request)

    def _bearer_is_valid(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        expiry = self._tokens.get(token.strip())
        return expiry is not None and self.clock() < expiry

    # -- customer endpoints -----------------------------------------------------------------------

    async def _get_customer(self, request: web.Request) -> web.StreamResponse:
        return await self._respond_single(request.match_info["anonymous_id"])

    async def _lookup(self, request: web.Request) -> web.StreamResponse:
        anonymous_id = request.query.get("customer_id", "")
        if not anonymous_id:
            return _error(400, "invalid_argument", "customer_id query parameter is required")
        return await self._respond_single(anonymous_id)

    async def _batch_get(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "invalid_argument", "body is not valid JSON")
        ids = body.get("ids", body.get("customer_ids")) if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return _error(400, "invalid_argument", 'body must be {"ids": [string, ...]}')
        if len(ids) > MAX_BATCH_IDS:
            return _error(400, "invalid_argument", f"at most {MAX_BATCH_IDS} ids per request")
        self.stats.ids_requested += len(ids)
        unique = list(dict.fromkeys(ids))
        found = [c for c in (self._find(i) for i in unique) if c is not None]
        fault = self._fault_response(found)
        if fault is not None:
            return fault
        nulls = self.faults.null_records
        results = [None if c.anonymous_id in nulls else self._render(c) for c in found]
        body = {
            "data": {"results": results},
            "meta": {"requested": len(ids), "found": len(found) - results.count(None)},
        }
        return self._maybe_malformed(body, 200)

    async def _respond_single(self, anonymous_id: str) -> web.StreamResponse:
        self.stats.ids_requested += 1
        customer = self._find(anonymous_id)
        fault = self._fault_response([customer] if customer is not None else [])
        if fault is not None:
            return fault
        if customer is None:
            return self._maybe_malformed({"error": {"code": "not_found", "message": "customer not found"}}, 404)
        if anonymous_id in self.faults.null_records:
            return self._maybe_malformed({"customer": None}, 200)
        return self._maybe_malformed({"customer": self._render(customer)}, 200)

    def _find(self, anonymous_id: str) -> Customer | None:
        if anonymous_id in self.faults.missing_ids:
            return None
        return self.customers.get(anonymous_id)

    def _render(self, customer: Customer) -> dict[str, Any]:
        email, phone = customer.email, customer.phone
        if customer.anonymous_id in self.faults.invalid_contacts:
            email, phone = INVALID_EMAIL, INVALID_PHONE
        if customer.anonymous_id in self.faults.empty_contacts:
            email, phone = "", ""
        values = {"email": email, "phone": phone, "first_name": customer.first_name, "last_name": customer.last_name}
        if self.encryption_key is not None:
            values = {name: encrypt_value(self.encryption_key, values[name]) for name in _ENCRYPTED_FIELDS}
        return {
            "id": customer.anonymous_id,
            "email": values["email"],
            "phone": values["phone"],
            "profile": {"first_name": values["first_name"], "last_name": values["last_name"]},
        }

    # -- injected faults --------------------------------------------------------------------------

    def _fault_response(self, customers: list[Customer]) -> web.Response | None:
        """An error response when a rate-limit or failure fault fires for this request, else None."""
        faults = self.faults
        if faults.take("rate_limit_count"):
            log.debug("injecting 429, retry after %ss", faults.retry_after_seconds)
            return _error(
                429,
                "rate_limited",
                self._fault_message("too many requests", customers),
                headers={"Retry-After": str(faults.retry_after_seconds)},
                quoted=self._fault_record(customers),
            )
        if faults.fail_status is not None and faults.take("fail_count"):
            log.debug("injecting status %s", faults.fail_status)
            return _error(
                faults.fail_status,
                "injected_failure",
                self._fault_message("injected failure", customers),
                quoted=self._fault_record(customers),
            )
        return None

    def _fault_record(self, customers: list[Customer]) -> dict[str, str] | None:
        # An error body quoting the whole record, names included, which no pattern finds.
        if not (self.faults.echo_pii_in_errors and customers):
            return None
        who = customers[0]
        return {"email": who.email, "phone": who.phone, "first_name": who.first_name, "last_name": who.last_name}

    def _fault_message(self, message: str, customers: list[Customer]) -> str:
        # Leaking contacts into an error body on purpose checks that consumers never log or return it.
        if self.faults.echo_pii_in_errors and customers:
            # As given, and percent-encoded as APIs quote the request they failed on.
            who = customers[0]
            lookup = urllib.parse.urlencode({"email": who.email, "phone": who.phone})
            return f"{message} while loading {who.email} / {who.phone} (GET /contacts?{lookup})"
        return message

    def _maybe_malformed(self, body: dict[str, Any], status: int) -> web.Response:
        if not self.faults.take("malformed_count"):
            return web.json_response(body, status=status)
        log.debug("injecting malformed JSON body")
        text = json.dumps(body)
        # Half of a serialised object never ends with its closing brace, so it never parses.
        return web.Response(text=text[: len(text) // 2], status=200, content_type="application/json")

    # -- OAuth 2.0 client credentials -------------------------------------------------------------

    async def _issue_token(self, request: web.Request) -> web.StreamResponse:
        self.stats.token_requests += 1
        no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.oauth is None:
            return _error(404, "not_found", "this PII API is not configured for OAuth")
        if self.faults.token_fail_status is not None:
            log.debug("injecting token endpoint status %s", self.faults.token_fail_status)
            return web.json_response({"error": "server_error"}, status=self.faults.token_fail_status, headers=no_store)
        form = await request.post()
        grant_type = form.get("grant_type")
        if not grant_type:
            return web.json_response({"error": "invalid_request"}, status=400, headers=no_store)
        if grant_type != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400, headers=no_store)
        candidates = _client_credentials(request.headers.get("Authorization", ""), form)
        if not any(self._is_client(client_id, client_secret) for client_id, client_secret in candidates):
            return web.json_response(
                {"error": "invalid_client"},
                status=401,
                headers={**no_store, "WWW-Authenticate": 'Basic realm="pii-api"'},
            )
        token = secrets.token_urlsafe(32)
        self._tokens[token] = self.clock() + self.oauth.token_ttl_seconds
        log.debug("issued access token valid for %ss", self.oauth.token_ttl_seconds)
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.oauth.token_ttl_seconds,
        }
        scope = form.get("scope")
        if isinstance(scope, str) and scope:
            body["scope"] = scope
        return web.json_response(body, headers=no_store)

    def _is_client(self, client_id: str, client_secret: str) -> bool:
        assert self.oauth is not None
        id_ok = hmac.compare_digest(client_id.encode(), self.oauth.client_id.encode())
        secret_ok = hmac.compare_digest(client_secret.encode(), self.oauth.client_secret.encode())
        return id_ok and secret_ok

    # -- admin ------------------------------------------------------------------------------------

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.faults.to_json())

    async def _set_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            self.faults = Faults.from_json(await request.json())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "invalid_argument", "body is not valid JSON")
        except ValueError as exc:
            return _error(400, "invalid_argument", str(exc))
        log.info("faults set: %s", sorted(k for k, v in self.faults.to_json().items() if v not in (0, None, False, [])))
        return web.json_response(self.faults.to_json())

    async def _clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.faults = Faults()
        log.info("faults cleared")
        return web.json_response(self.faults.to_json())

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats.to_json())

    async def _reset_stats(self, request: web.Request) -> web.StreamResponse:
        self.stats.reset()
        return web.json_response(self.stats.to_json())

    async def _revoke_tokens(self, request: web.Request) -> web.StreamResponse:
        revoked = len(self._tokens)
        self.revoke_tokens()
        log.info("revoked %s access tokens", revoked)
        return web.json_response({"revoked": revoked})


def _client_credentials(authorization: str, form: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Candidate (client ID, secret) pairs from HTTP Basic or the ``client_id``/``client_secret`` form fields.

    RFC 6749 §2.3.1 says Basic parts are form-encoded first, but many clients skip that, so both
    the raw and the decoded pair are accepted.
    """
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() == "basic" and encoded:
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return []
        client_id, _, client_secret = decoded.partition(":")
        unquoted = (urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(client_secret))
        return [(client_id, client_secret), unquoted]
    client_id, client_secret = form.get("client_id"), form.get("client_secret")
    if isinstance(client_id, str) and isinstance(client_secret, str):
        return [(client_id, client_secret)]
    return []


async def start_pii_api(sandbox: PiiApiSandbox, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve ``sandbox`` on ``host:port`` (0 picks a free port); returns the runner to clean up and the bound port."""
    runner = web.AppRunner(sandbox.build_app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    log.info("sample PII API listening on %s:%s", host, bound_port)
    return runner, bound_port


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=command_name("python -m sandbox.pii_api"), description="Run the sample PII API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=arguments.port, default=8090)
    parser.add_argument(
        "--customers", type=arguments.number(int, 0), default=1000, help="how many made-up customers to serve"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed for the made-up customers")
    parser.add_argument("--oauth-client-id", help="require OAuth 2.0 client credentials with this client ID")
    parser.add_argument("--oauth-client-secret", help="client secret for --oauth-client-id")
    parser.add_argument(
        "--token-ttl", type=arguments.number(int, 1), default=3600, help="access token lifetime in seconds"
    )
    parser.add_argument("--encryption-key", help="base64 32-byte AES-256-GCM key; encrypts every contact field")
    parser.add_argument("--api-key", help="require this value in the X-Api-Key header")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    args = parser.parse_args(argv)
    if (args.oauth_client_id is None) != (args.oauth_client_secret is None):
        parser.error("--oauth-client-id and --oauth-client-secret go together")
    if args.encryption_key is not None:
        try:
            args.encryption_key = base64.b64decode(args.encryption_key, validate=True)
        except binascii.Error:
            parser.error("--encryption-key is not valid base64")
        if len(args.encryption_key) != AES_KEY_BYTES:
            parser.error("--encryption-key must decode to 32 bytes")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    oauth = None
    if args.oauth_client_id is not None:
        oauth = OAuthClient(args.oauth_client_id, args.oauth_client_secret, args.token_ttl)
    sandbox = PiiApiSandbox(
        generate_customers(args.customers, args.seed),
        oauth=oauth,
        api_key=args.api_key,
        encryption_key=args.encryption_key,
    )
    log.info(
        "serving %s customers (oauth=%s, api_key=%s, encryption=%s)",
        len(sandbox.customers),
        oauth is not None,
        args.api_key is not None,
        args.encryption_key is not None,
    )
    serve(sandbox.build_app(), args.host, args.port)


if __name__ == "__main__":
    main()
