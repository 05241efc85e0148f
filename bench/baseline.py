"""The bare baseline: plain asyncio + aiohttp doing only the HTTP work a send cannot avoid.

Per batch: one bulk PII API lookup (in requests of the suite's PII API config size, 500 IDs, all at
once as the resolver makes them), then one provider POST per message (SMS through the custom
gateway or Twilio) or one SendGrid request for the whole batch (Email). The same batch size as the
dispatcher, as many batches in flight as it works on (`--batches`: two for SMS, three for Email;
one at a time left the Email loop waiting on each reply: 24,000-26,000 Emails a second against
37,000 with two; SMS the same within the noise), and 64 provider requests in flight, its own best
(at 128, measured, it sends fewer). No gRPC, no Redis, no tracing, no validation or templating
beyond putting the first name in. Runs as its own process:

    python -m bench.baseline --pii-api URL --providers URL --family sms --recipients 20000

and prints one JSON object (messages, seconds, batch times, statuses, its own peak memory, and
the CPU of the processes named with `--watch NAME=PID` over the measured loop). As the suite
does, it sends one batch before the clock starts (`--warmup`), so its connections, token and
the peers' first requests are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import sys
import time
import uuid
from collections import Counter
from urllib.parse import urlencode

import aiohttp

from bench.peers import cpu_seconds, read_status_kb
from libs.arguments import number
from sandbox.workspace import (
    GATEWAY_KEY,
    GATEWAY_SECRET,
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    SENDGRID_KEY,
    TWILIO_FROM,
    TWILIO_SID,
    TWILIO_TOKEN,
)


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def anonymous_id(number: int) -> str:
    return f"cust-{number:06d}"


async def pii_api_token(http: aiohttp.ClientSession, pii_api_url: str) -> str:
    """An access token from the sample PII API (OAuth 2.0 client credentials)."""
    async with http.post(
        f"{pii_api_url}/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": basic_authorization(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET)},
    ) as reply:
        reply.raise_for_status()
        return (await reply.json())["access_token"]


async def run(args: argparse.Namespace) -> dict:
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    statuses: Counter[str] = Counter()
    batch_times: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as http:
        pii_headers = {"Authorization": f"Bearer {await pii_api_token(http, args.pii_api)}"}
        sends = asyncio.Semaphore(args.concurrency)
        gateway_url = f"{args.providers}/sms/json"
        twilio_url = f"{args.providers}/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
        twilio_headers = {"Authorization": basic_authorization(TWILIO_SID, TWILIO_TOKEN)}
        sendgrid_url = f"{args.providers}/v3/mail/send"
        sendgrid_headers = {"Authorization": f"Bearer {SENDGRID_KEY}"}

        async def send_sms(customer: dict) -> None:
            message_id = uuid.uuid4().hex
            text = f"Hi {customer['profile']['first_name']}, your gold offer is inside. Reply STOP to opt out"
            async with sends:
                if args.sms_provider == "twilio":
                    form = {"To": customer["phone"], "From": TWILIO_FROM, "Body": text}
                    request = http.post(twilio_url, data=form, headers=twilio_headers)
                else:
                    form = {
                        "api_key": GATEWAY_KEY,
                        "api_secret": GATEWAY_SECRET,
                        "from": "BRAND",
                        "to": customer["phone"],
                        "text": text,
                        "client-ref": message_id,
                    }
                    request = http.post(
                        gateway_url,
                        data=urlencode(form),
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                    )
                async with request as reply:
                    await reply.read()
                    statuses[str(reply.status)] += 1

        async def send_email(customers: list[dict]) -> None:
            payload = {
                "personalizations": [
                    {"to": [{"email": c["email"]}], "custom_args": {"message_id": uuid.uuid4().hex}} for c in customers
                ],
                "from": {"email": "news@brand.example"},
                "subject": "Spring sale: 20% off for gold members",
                "content": [
                    {"type": "text/plain", "value": "Hello gold member, our spring sale starts today."},
                    {"type": "text/html", "value": "<p>Hello gold member,</p><p>Our spring sale starts today.</p>"},
                ],
            }
            async with http.post(sendgrid_url, json=payload, headers=sendgrid_headers) as reply:
                await reply.read()
                statuses[str(reply.status)] += len(customers)

        async def fetch(ids: list[str]) -> list[dict]:
            async with http.post(
                f"{args.pii_api}/v1/customers:batchGet", json={"ids": ids}, headers=pii_headers
            ) as reply:
                return (await reply.json())["data"]["results"]

        async def send_batch(first: int, last: int) -> None:
            ids = [anonymous_id(n) for n in range(first, last + 1)]
            # In requests of the PII API config's size, all at once, as the resolver makes them.
            parts = await asyncio.gather(
                *(fetch(ids[i : i + args.pii_batch]) for i in range(0, len(ids), args.pii_batch))
            )
            customers = [c for part in parts for c in part]
            if args.family == "email":
                await send_email(customers)
            else:
                await asyncio.gather(*(send_sms(c) for c in customers))

        for _ in range(args.warmup):
            await send_batch(1, min(args.batch, args.recipients))
        statuses.clear()
        peers_before = {name: cpu_seconds(pid) or 0.0 for name, pid in args.watch}
        started = time.monotonic()
        cpu_started = time.process_time()
        in_flight = asyncio.Semaphore(args.batches)

        async def timed_batch(first: int) -> None:
            async with in_flight:
                t0 = time.monotonic()
                await send_batch(first, min(first + args.batch - 1, args.recipients))
                batch_times.append(time.monotonic() - t0)

        await asyncio.gather(*(timed_batch(first) for first in range(1, args.recipients + 1, args.batch)))
        seconds = time.monotonic() - started
        own_cpu = time.process_time() - cpu_started
        peers_cpu = {name: (cpu_seconds(pid) or 0.0) - peers_before[name] for name, pid in args.watch}
    return {
        "recipients": args.recipients,
        "seconds": seconds,
        "cpu_seconds": own_cpu,
        "peers_cpu_seconds": peers_cpu,
        "batch_times": batch_times,
        "statuses": dict(statuses),
        # VmHWM, as for the services: getrusage's maxrss also counts the peak of the process it was spawned from.
        "peak_rss_kb": read_status_kb(os.getpid(), "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def watched_process(text: str) -> tuple[str, int]:
    name, _, pid = text.partition("=")
    if not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PID, got {text!r}")
    return name, int(pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--pii-api", required=True, help="base URL of the sample PII API")
    parser.add_argument("--providers", required=True, help="base URL of the sandbox providers")
    parser.add_argument("--family", choices=("sms", "email"), default="sms")
    parser.add_argument("--sms-provider", choices=("gateway", "twilio"), default="gateway")
    parser.add_argument("--recipients", type=number(int, 1), default=20_000)
    parser.add_argument("--batch", type=number(int, 1), default=500)
    parser.add_argument(
        "--concurrency", type=number(int, 1), default=64, help="provider requests in flight (default 64)"
    )
    parser.add_argument(
        "--pii-batch",
        type=number(int, 1),
        default=500,
        help="IDs per PII API request (default 500, the suite's config)",
    )
    parser.add_argument("--batches", type=number(int, 1), default=2, help="batches in flight (default 2)")
    parser.add_argument(
        "--warmup", type=number(int, 0), default=1, help="batches sent before the clock starts (default 1)"
    )
    parser.add_argument(
        "--watch",
        type=watched_process,
        action="append",
        default=[],
        metavar="NAME=PID",
        help="a process whose CPU over the measured loop is reported (the sample peers); repeatable",
    )
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))  # noqa: T201 - the parent reads it
    return 0


if __name__ == "__main__":
    sys.exit(main())
