"""`make demo`: the whole suite sending a real campaign end to end, on sample peers.

Starts the sample PII API (OAuth 2.0, a few broken records and one transient
500) and the sandbox providers (SendGrid, Twilio, WhatsApp Cloud, posting signed
receipts), runs the resolver, dispatcher and receipts services as real
processes, configures a workspace through gRPC as a brand would, sends a
personalised campaign over Email, SMS and WhatsApp with a live progress bar,
waits for the receipts, prints the campaign's stats per channel, a sample of
what the providers received, and a PII audit of Redis, logs and traces. Ends by
printing grpcurl commands for the running suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from aiohttp.web import AppRunner
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dpb_grpc
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as cpb_grpc
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from libs.arguments import number, redis_address
from libs.derived_keys import new_secret_key
from libs.masking import mask_contact
from libs.store import create_redis
from sandbox.pii_api import Faults, OAuthClient, PiiApiSandbox, generate_customers, start_pii_api
from sandbox.processes import ServiceProcess, sigterm_as_interrupt, start_in_process, start_service
from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure

C = common_pb2.Channel
WORKSPACE = "demo"
MAX_RECIPIENTS = 100_000  # per channel; the made-up customers are generated in memory first
CHANNELS = [
    ("Email", C.CHANNEL_EMAIL, "sendgrid", "sendgrid"),
    ("SMS", C.CHANNEL_SMS, "twilio", "twilio"),
    ("WhatsApp", C.CHANNEL_WHATSAPP, "whatsapp", "whatsapp"),
]
CONTENT = {
    C.CHANNEL_EMAIL: dpb.Content(
        subject="{{ first_name }}, your {{ recipient.tier }} spring offer",
        text_body="Hello {{ first_name }} {{ last_name }}, 20% off for {{ recipient.tier }} members.",
        html_body="<p>Hello <b>{{ first_name }}</b>, 20% off for {{ recipient.tier }} members.</p>",
    ),
    C.CHANNEL_SMS: dpb.Content(
        sms_body="Hi {{ first_name }}, 20% off for {{ recipient.tier }} members. Reply STOP to opt out"
    ),
    C.CHANNEL_WHATSAPP: dpb.Content(
        whatsapp_template=dpb.WhatsAppTemplate(name="spring_offer", language="en", params=["{{ first_name }}", "20%"])
    ),
}
STAT_COLUMNS = ("attempted", "resolve_failed", "sent", "delivered", "bounced", "failed", "opened", "clicked")


def say(text: str = "") -> None:
    print(text, flush=True)  # noqa: T201 - the demo talks to a person


def port_or_free(preferred: int) -> int:
    """The service's usual port when it is free, so the printed grpcurl commands are the usual ones.

    Probed as the servers bind (address reuse): a port the kernel lent an earlier outgoing
    connection, still in TIME_WAIT, is free to them."""
    for candidate in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


class Progress:
    """A one-line progress bar on a terminal, a line per step elsewhere."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self._tty = sys.stdout.isatty()
        self._last = -1

    def advance(self, count: int) -> None:
        if not count:
            return
        self.done += count
        percent = int(100 * self.done / self.total) if self.total else 100
        if self._tty:
            bar = "#" * (percent // 4)
            sys.stdout.write(f"\r  {self.label:<9} [{bar:<25}] {self.done:>6}/{self.total}")
            sys.stdout.flush()
        elif percent // 25 != self._last // 25 or self.done == self.total:
            say(f"  {self.label:<9} {self.done:>6}/{self.total}")
        self._last = percent

    def finish(self, seconds: float) -> None:
        if self._tty:
            sys.stdout.write(f"  {seconds:.1f}s\n")
        else:
            say(f"  {self.label:<9} done in {seconds:.1f}s")


async def send_campaign(
    stub, channel: int, connector: str, label: str, ids: list[str], instance: str
) -> dpb.DispatchSummary:
    progress = Progress(label, len(ids))

    async def requests() -> AsyncIterator[dpb.DispatchStreamRequest]:
        yield dpb.DispatchStreamRequest(
            header=dpb.DispatchStreamRequest.Header(
                workspace_id=WORKSPACE,
                campaign_id="spring",
                campaign_instance_id=instance,
                channel=channel,
                connector_id=connector,
                content=CONTENT[channel],
            )
        )
        tiers = ("gold", "silver", "bronze")
        for start in range(0, len(ids), 250):
            chunk = [
                dpb.Recipient(anonymous_id=a, attributes={"tier": tiers[i % 3]})
                for i, a in enumerate(ids[start : start + 250])
            ]
            yield dpb.DispatchStreamRequest(recipients=dpb.DispatchStreamRequest.Recipients(recipients=chunk))

    started = time.monotonic()
    summary = dpb.DispatchSummary()
    async for reply in stub.DispatchStream(requests()):
        progress.advance(len(reply.results))
        if reply.HasField("summary"):
            summary = reply.summary
    progress.finish(time.monotonic() - started)
    return summary


async def wait_for_receipts(providers: ProviderSandbox, receipts_stub, instance: str, timeout: float = 20.0) -> None:
    """Receipts are posted asynchronously, like a provider's; wait until they are in and counted."""
    await providers.drain_receipts()
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        totals = []
        for _, channel, _, _ in CHANNELS:
            stats = await receipts_stub.GetCampaignStats(
                cpb.GetCampaignStatsRequest(
                    workspace_id=WORKSPACE, campaign_id="spring", campaign_instance_id=f"{instance}-{channel}"
                )
            )
            totals.append(stats.SerializeToString())
        if totals == previous:
            return
        previous = totals
        await asyncio.sleep(0.3)


def print_stats(rows: list[tuple[str, cpb.GetCampaignStatsResponse]]) -> None:
    say("\nCampaign 'spring', per channel (from GetCampaignStats):")
    say("  " + f"{'channel':<9}" + "".join(f"{c:>15}" for c in STAT_COLUMNS))
    for label, stats in rows:
        say("  " + f"{label:<9}" + "".join(f"{getattr(stats, c):>15}" for c in STAT_COLUMNS))
    reasons: dict[str, int] = {}
    for _, stats in rows:
        for reason, count in stats.resolve_failed_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + count
    if reasons:
        say("  resolve failures by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))


def print_outbox_sample(providers: ProviderSandbox) -> None:
    say("\nWhat the providers received (a sample; addresses masked here, never stored by tokensend):")
    for provider in ("sendgrid", "twilio", "whatsapp"):
        for message in providers.outbox_for(provider)[:2]:
            if message.template:
                body = f"template {dict(message.template).get('name', '')} {message.template}"
            elif message.subject:
                body = f"subject {message.subject!r}"
            else:
                body = repr(message.text)
            say(f"  {provider:<9} to {mask_contact(message.to):<22} {body[:90]}")


_TOKENS = re.compile(r"[A-Za-z0-9.+@_-]{3,}")


def tokens(text: str) -> set[str]:
    """Candidate values in a text; contacts and names are whole tokens, so a set lookup finds them."""
    found = set(_TOKENS.findall(text))
    return found | {t.strip(".-_") for t in found} | {t.lstrip("+") for t in found}


async def redis_texts(client: aioredis.Redis) -> tuple[int, list[str]]:
    """Every tokensend key and value, read with pipelines (one round trip per 500 keys)."""
    keys = [key async for key in client.scan_iter(match="ts:*", count=2000)]
    texts = [k.decode("utf-8", "replace") for k in keys]
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        async with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.type(key)
            kinds = await pipe.execute()
        async with client.pipeline(transaction=False) as pipe:
            for key, kind in zip(chunk, kinds, strict=True):
                if kind == b"string":
                    pipe.get(key)
                elif kind == b"hash":
                    pipe.hgetall(key)
                elif kind == b"zset":
                    pipe.zrange(key, 0, -1)
                elif kind == b"stream":
                    pipe.xrange(key)
                else:
                    pipe.exists(key)
            texts += [str(value) for value in await pipe.execute()]
    return len(keys), texts


async def redis_answers(url: str) -> bool:
    client = create_redis(url)
    try:
        return bool(await asyncio.wait_for(client.ping(), 3))
    except Exception:  # any failure means: no usable Redis here
        return False
    finally:
        await client.aclose()


async def audit(redis_url: str, contacts: set[str], services: list[ServiceProcess], span_files: list[Path]) -> bool:
    client = create_redis(redis_url)
    key_count, stored = await redis_texts(client)
    await client.aclose()
    lines = [line for path in {s.log_path for s in services} for line in path.read_text().splitlines()]
    spans = [line for path in span_files if path.exists() for line in path.read_text().splitlines()]
    found = set()
    for text in stored + lines + spans:
        found |= tokens(text) & contacts
    say(
        f"\nPII audit: {len(found)} of {len(contacts)} fetched contacts and names found in {key_count} Redis keys, "
        f"{len(lines)} log lines and {len(spans)} exported spans."
    )
    return not found


def print_grpcurl(resolver: str, dispatcher: str, receipts: str) -> None:
    ws = f'"workspace_id":"{WORKSPACE}"'
    calls = [
        (dispatcher, "list", ""),
        (resolver, "describe tokensend.resolver.v1.ResolverService", ""),
        (receipts, "tokensend.receipts.v1.ReceiptsService/GetCampaignStats", f'{{{ws},"campaign_id":"spring"}}'),
        (dispatcher, "tokensend.dispatcher.v1.DispatcherService/ListConnectors", f"{{{ws}}}"),
        (dispatcher, "tokensend.dispatcher.v1.DispatcherService/GetConnector", f'{{{ws},"connector_id":"sendgrid"}}'),
        (
            resolver,
            "tokensend.resolver.v1.ResolverService/ResolveContacts",
            f'{{{ws},"channel":"CHANNEL_SMS","anonymous_ids":["cust-000001","cust-000004"]}}',
        ),
        (receipts, "tokensend.receipts.v1.ReceiptsService/StreamDeliveryEvents", f"{{{ws}}}"),
    ]
    say("\nTry the running suite with grpcurl:")
    for address, method, data in calls:
        payload = f" -d '{data}'" if data else ""
        say(f"  .venv/bin/grpcurl -plaintext{payload} {address} {method}")
    say("or with tokensend's own command line:")
    say(f"  .venv/bin/tokensend stats spring --workspace {WORKSPACE} --addr {receipts}")
    say(f"  .venv/bin/tokensend events --workspace {WORKSPACE} --addr {receipts} --status delivered --limit 5")


async def fresh_workspace(redis_url: str) -> None:
    """The demo's workspace starts empty (an earlier run sealed its configs under another key)."""
    client = create_redis(redis_url)
    keys = [key async for key in client.scan_iter(match=f"ts:{{{WORKSPACE}}}:*", count=2000)]
    for start in range(0, len(keys), 1000):
        await client.unlink(*keys[start : start + 1000])
    await client.aclose()


async def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    in_process = not await redis_answers(args.redis_url)
    if in_process:
        say(f"no Redis answers at {args.redis_url}: the three services run in this process on the embedded store")
        args.redis_url = "memory://demo"
    await fresh_workspace(args.redis_url)
    work = Path(tempfile.mkdtemp(prefix="tokensend-demo-"))
    customers = generate_customers(args.recipients + 100)
    faults = Faults(missing_ids={"cust-000004"}, invalid_contacts={"cust-000007"}, fail_status=500, fail_count=1)
    pii = PiiApiSandbox(customers, oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET), faults=faults)
    pii_runner, pii_port = await start_pii_api(pii)
    http_port = port_or_free(8080)
    providers = ProviderSandbox(receipts_url=f"http://127.0.0.1:{http_port}", receipt_delay_seconds=0.2)
    providers_runner, providers_port = await start_providers(providers)
    say(
        f"sample PII API: {len(customers)} customers on 127.0.0.1:{pii_port}; "
        f"sandbox providers on 127.0.0.1:{providers_port}"
    )

    common = {
        "redis_url": args.redis_url,
        "secret_key": new_secret_key(),
        "allow_private_networks": "true",  # the sample peers listen on loopback
        "public_webhook_url": f"http://127.0.0.1:{http_port}",
        "pii_retry_base_ms": "100",
    }
    services: list[ServiceProcess] = []
    span_files = [work / f"{n}.spans.jsonl" for n in ("resolver", "dispatcher", "receipts")]

    def settings(name: str, **extra: str) -> dict[str, str]:
        return {**common, "trace_export_file": str(work / f"{name}.spans.jsonl"), **extra}

    try:
        if in_process:
            ports = {
                "resolver": port_or_free(50051),
                "dispatcher": port_or_free(50052),
                "receipts": port_or_free(50053),
            }
            services.extend(await start_in_process(common, ports, http_port, work))
            resolver, receipts, dispatcher = services
        else:
            resolver = await start_service("resolver", port_or_free(50051), settings("resolver"), work)
            services.append(resolver)
            receipts = await start_service(
                "receipts", port_or_free(50053), settings("receipts"), work, http_port=http_port
            )
            services.append(receipts)
            dispatcher = await start_service(
                "dispatcher", port_or_free(50052), settings("dispatcher", resolver_addr=resolver.address), work
            )
            services.append(dispatcher)
        say(
            f"services: resolver {resolver.address}, dispatcher {dispatcher.address}, "
            f"receipts {receipts.address} + webhooks :{http_port} (logs and traces in {work})"
        )

        workspace = SandboxWorkspace(
            WORKSPACE,
            f"http://127.0.0.1:{pii_port}",
            f"http://127.0.0.1:{providers_port}",
            providers.sendgrid_public_key,
        )
        for account in workspace.provider_accounts():
            providers.add_account(account)
        async with (
            grpc.aio.insecure_channel(resolver.address) as r_channel,
            grpc.aio.insecure_channel(dispatcher.address) as d_channel,
            grpc.aio.insecure_channel(receipts.address) as c_channel,
        ):
            resolver_stub = rpb_grpc.ResolverServiceStub(r_channel)
            dispatcher_stub = dpb_grpc.DispatcherServiceStub(d_channel)
            receipts_stub = cpb_grpc.ReceiptsServiceStub(c_channel)
            await configure(workspace, resolver_stub, dispatcher_stub)
            say(
                "configured through gRPC: OAuth (client credentials), "
                "PII APIs (Email bulk, SMS single, WhatsApp bulk), 4 connectors"
            )

            ids = [f"cust-{n:06d}" for n in range(1, args.recipients + 1)] + ["", "cust-999999"]
            instance = f"spring-{int(time.time())}"
            say(f"\nsending campaign 'spring' to {len(ids)} recipients per channel:")
            for label, channel, connector, _ in CHANNELS:
                await send_campaign(dispatcher_stub, channel, connector, label, ids, f"{instance}-{channel}")

            waited = time.monotonic()
            await wait_for_receipts(providers, receipts_stub, instance)
            say(f"receipts posted back and counted in {time.monotonic() - waited:.1f}s")
            rows = []
            for label, channel, _, _ in CHANNELS:
                stats = await receipts_stub.GetCampaignStats(
                    cpb.GetCampaignStatsRequest(
                        workspace_id=WORKSPACE, campaign_id="spring", campaign_instance_id=f"{instance}-{channel}"
                    )
                )
                rows.append((label, stats))
            print_stats(rows)
        print_outbox_sample(providers)
        posted = sum(providers.stats.receipts_posted.values())
        events = sum(providers.stats.receipt_events.values())
        say(f"\nreceipts posted back by the providers, signed: {posted} requests, {events} events")

        fetched = {c.email for c in customers.values()} | {c.phone for c in customers.values()}
        fetched |= {c.phone.lstrip("+") for c in customers.values()}
        fetched |= {c.last_name for c in customers.values()}  # first names are too common to tell apart
        clean = await audit(args.redis_url, fetched, services, span_files)
        say(f"\ndone in {time.monotonic() - started:.1f}s.")
        keep_running = args.keep_running or (args.keep_running is None and sys.stdin.isatty())
        print_grpcurl(resolver.address, dispatcher.address, receipts.address)
        if not keep_running:
            why = "--no-keep-running" if args.keep_running is False else "this is not a terminal"
            say(f"\n(The suite stops now: {why}. `--keep-running` keeps it up for these commands.)")
        else:
            say("\nThe suite keeps running; press Ctrl-C (or send SIGTERM) to stop it.")
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            try:
                await stop.wait()
            except asyncio.CancelledError:  # Ctrl-C
                pass
        return 0 if clean else 1
    finally:
        await stop_suite(services, providers, providers_runner, pii_runner)


async def stop_suite(
    services: list[ServiceProcess], providers: ProviderSandbox, providers_runner: AppRunner, pii_runner: AppRunner
) -> None:
    """Stops what the demo started. The providers post no more receipts first: stopped part way (Ctrl-C,
    SIGTERM), the receipts still pending would be posted to a receipts service on its way down, each tried
    four times and logged as given up. The provider endpoints keep answering the sends still in flight."""
    providers.receipts.enabled = False
    await providers.close()
    for service in reversed(services):
        await service.stop()
    await providers_runner.cleanup()
    await pii_runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokensend demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-url",
        type=redis_address,
        default=os.environ.get("TOKENSEND_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the Redis the services use (default: $TOKENSEND_REDIS_URL or redis://127.0.0.1:6379/0); when none "
        "answers there, the services run in the demo's process on the embedded store",
    )
    parser.add_argument(
        "--recipients",
        type=number(int, 1, high=MAX_RECIPIENTS),
        default=3000,
        help=f"recipients per channel, 1..{MAX_RECIPIENTS} (default 3000)",
    )
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument(
        "--keep-running",
        dest="keep_running",
        action="store_true",
        default=None,
        help="keep the suite up at the end (default on a terminal)",
    )
    keep.add_argument("--no-keep-running", dest="keep_running", action="store_false", help="stop the suite at the end")
    args = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
