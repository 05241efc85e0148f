"""Shared pieces of the "beyond the reference" tests: receipts beside a suite, customers' replies,
a content API peer and a forward proxy.

The receipts service runs with the suite's secret key and Redis, so it reads the
suite's connectors, verifies the dispatcher's unsubscribe tokens and derives the
same blind-index keys, as in a deployment.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import yarl
from aiohttp import web
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from sandbox.signing import twilio_signature, whatsapp_signature
from sandbox.workspace import TWILIO_FROM, TWILIO_TOKEN, WHATSAPP_APP_SECRET
from tests.integration.test_receipts_harness import RunningReceipts, running_receipts


@asynccontextmanager
async def receipts_for(redis, redis_url: str, secret_key: str, telemetry=None) -> AsyncIterator[Any]:
    """The receipts service (gRPC and webhooks on port 0) sharing a suite's Redis and secret key."""
    async with running_receipts(redis, redis_url, telemetry, secret_key=secret_key) as receipts:
        yield receipts


async def post(receipts: RunningReceipts, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with receipts.http.post(
        yarl.URL(receipts.local_url + path, encoded=True), data=body, headers=headers
    ) as reply:
        return reply.status, await reply.text()


async def reply_by_sms(
    receipts: RunningReceipts,
    workspace_id: str,
    number: str,
    text: str,
    connector_id: str = "twilio",
    sid: str = "",
    opt_out_type: str = "",
) -> tuple[int, str]:
    """A customer's SMS as Twilio's incoming-message webhook posts it (signed with the account's
    token); `sid` to post one again; `opt_out_type` as Advanced Opt-Out tags a keyword it knows."""
    path = f"/webhooks/twilio/{workspace_id}/{connector_id}"
    sid = sid or "SM" + uuid.uuid4().hex
    params = [
        ("ToCountry", "US"),
        ("SmsMessageSid", sid),
        ("NumMedia", "0"),
        ("SmsSid", sid),
        ("SmsStatus", "received"),
        ("Body", text),
        ("To", TWILIO_FROM),
        ("NumSegments", "1"),
        ("MessageSid", sid),
        ("AccountSid", "AC" + "5a" * 16),
        ("From", number),
        ("ApiVersion", "2010-04-01"),
        *([("OptOutType", opt_out_type)] if opt_out_type else []),
    ]
    headers = {
        "X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, receipts.settings.public_webhook_url + path, params),
        "Content-Type": "application/x-www-form-urlencoded",
    }
    return await post(receipts, path, urlencode(params).encode(), headers)


def whatsapp_messages(
    number: str, text: str, kind: str = "text", message_id: str = "", sent_at: int = 1700000000
) -> dict[str, Any]:
    digits = number.lstrip("+")
    message: dict[str, Any] = {
        "from": digits,
        "id": message_id or "wamid." + uuid.uuid4().hex,
        "timestamp": str(sent_at),
    }
    if kind == "button":
        message.update(type="button", button={"text": text, "payload": text})
    else:
        message.update(type="text", text={"body": text})
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "15550001234", "phone_number_id": "109876543210"},
                            "contacts": [{"profile": {"name": "x"}, "wa_id": digits}],
                            "messages": [message],
                        },
                    }
                ],
            }
        ],
    }


async def reply_by_whatsapp(
    receipts: RunningReceipts,
    workspace_id: str,
    number: str,
    text: str,
    kind: str = "text",
    message_id: str = "",
    sent_at: int = 1700000000,
) -> tuple[int, str]:
    body = json.dumps(whatsapp_messages(number, text, kind, message_id, sent_at)).encode()
    headers = {
        "X-Hub-Signature-256": whatsapp_signature(WHATSAPP_APP_SECRET, body),
        "Content-Type": "application/json",
    }
    return await post(receipts, f"/webhooks/whatsapp/{workspace_id}/whatsapp", body, headers)


def unsubscribe_path(list_unsubscribe: str) -> str:
    """`/unsubscribe/<token>` out of a `List-Unsubscribe: <https://.../unsubscribe/<token>>` value."""
    match = re.fullmatch(r"<(https?://[^>]+)>", list_unsubscribe)
    assert match, list_unsubscribe
    return "/unsubscribe/" + urlsplit(match.group(1)).path.rsplit("/unsubscribe/", 1)[1]


# --- a content API peer ----------------------------------------------------------------------


@dataclass
class ContentApiPeer:
    """A brand's content API: `GET /loyalty/{id}` and `POST /offers:batchGet`; records what it was asked."""

    loyalty: dict[str, dict[str, Any]] = field(default_factory=dict)
    offers: dict[str, dict[str, Any]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    fail_ids: set[str] = field(default_factory=set)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def loyalty(request: web.Request) -> web.Response:
            anonymous_id = request.match_info["anonymous_id"]
            self.asked.append(f"loyalty:{anonymous_id}")
            if anonymous_id in self.fail_ids:
                return web.json_response({"error": "boom"}, status=500)
            record = self.loyalty.get(anonymous_id)
            if record is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response({"member": record})

        async def offers(request: web.Request) -> web.Response:
            body = await request.json()
            self.asked.extend(f"offers:{i}" for i in body["ids"])
            return web.json_response({"items": [{"id": i, **self.offers[i]} for i in body["ids"] if i in self.offers]})

        app = web.Application()
        app.router.add_get("/loyalty/{anonymous_id}", loyalty)
        app.router.add_post("/offers:batchGet", offers)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# --- a forward proxy -------------------------------------------------------------------------


@dataclass
class ForwardProxy:
    """An HTTP forward proxy: absolute-form requests (http targets) and CONNECT tunnels (https targets).

    One request per client connection (it answers `Connection: close`), which is all a test needs;
    `seen` lists "METHOD target" for every request that came through.
    """

    seen: list[str] = field(default_factory=list)
    port: int = 0
    server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ", 2)
            self.seen.append(f"{method} {target}")
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                return
            parts = urlsplit(target)
            headers = [h for h in header_lines if h and not h.lower().startswith(("connection:", "proxy-"))]
            length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
            body = await reader.readexactly(length) if length else b""
            up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            up_writer.write(
                f"{method} {path} {version}\r\n".encode()
                + "\r\n".join([*headers, "Connection: close"]).encode()
                + b"\r\n\r\n"
                + body
            )
            await up_writer.drain()
            response = await up_reader.read()
            up_writer.close()
            status_and_headers, _, payload = response.partition(b"\r\n\r\n")
            lines = [h for h in status_and_headers.split(b"\r\n") if not h.lower().startswith(b"connection:")]
            writer.write(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + payload)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def email_content(**overrides: str) -> pb.Content:
    values = dict(
        subject="Hello {{ first_name }}",
        html_body="<p>Dear {{ first_name }} {{ last_name }}, you are {{ recipient.tier }}</p>",
        text_body="Dear {{ first_name }}, you are {{ recipient.tier }}",
    )
    values.update(overrides)
    return pb.Content(**values)


def people(n: int, start: int = 1, tier: str = "gold") -> list[pb.Recipient]:
    return [pb.Recipient(anonymous_id=f"cust-{i:06d}", attributes={"tier": tier}) for i in range(start, start + n)]


def ids_fetched(sandbox) -> list[str]:
    """Patches a sample PII API so it records every ID it looked up; returns the (live) list."""
    asked: list[str] = []
    original = sandbox._find

    def find(anonymous_id: str):
        asked.append(anonymous_id)
        return original(anonymous_id)

    sandbox._find = find
    return asked
