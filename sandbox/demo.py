"""`make demo`: the resolver resolving a campaign's audience through the sample PII API.

Starts the sample PII API (OAuth 2.0, with a few broken records and one
transient 500) and the resolver as a real process, configures the API through
gRPC, resolves a batch for Email (bulk, OAuth) and SMS (single lookups), prints
the outcome with contacts masked, then audits Redis and the resolver's log for
the contacts it fetched.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as pb_grpc

from libs.masking import mask_contact, mask_name
from sandbox.pii_api import Faults, OAuthClient, PiiApiSandbox, generate_customers, start_pii_api

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the demo talks to a person


async def start_resolver(port: int, redis_url: str, log_path: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(
        TOKENSEND_GRPC_PORT=str(port),
        TOKENSEND_REDIS_URL=redis_url,
        TOKENSEND_SECRET_KEY=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        TOKENSEND_ALLOW_PRIVATE_NETWORKS="true",  # the sample PII API is on loopback
        TOKENSEND_PII_RETRY_BASE_MS="100",
    )
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.resolver", cwd=ROOT, env=env, stdout=log, stderr=log
        )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            if proc.returncode is not None:
                raise SystemExit(f"the resolver exited at startup; see {log_path}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    raise SystemExit("the resolver did not become healthy")


def print_table(title: str, reply: pb.ResolveContactsResponse, limit: int) -> None:
    say(f"\n{title} (config v{reply.config_version}); first {limit} of {len(reply.contacts)}:")
    say(f"  {'anonymous ID':<14} {'contact (masked)':<22} {'first name':<12} outcome")
    for contact in reply.contacts[:limit]:
        if contact.HasField("error"):
            outcome = f"{pb.ResolveErrorCode.Name(contact.error.code).removeprefix('RESOLVE_ERROR_CODE_')}: "
            outcome += contact.error.message
            say(f"  {contact.anonymous_id or '(empty)':<14} {'-':<22} {'-':<12} {outcome}")
        else:
            name = mask_name(contact.attributes.get("first_name", ""))
            say(f"  {contact.anonymous_id:<14} {mask_contact(contact.contact):<22} {name:<12} resolved")
    counts = Counter(
        pb.ResolveErrorCode.Name(c.error.code).removeprefix("RESOLVE_ERROR_CODE_")
        if c.HasField("error")
        else "resolved"
        for c in reply.contacts
    )
    say("  totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


async def audit(redis_url: str, contacts: set[str], log_path: Path) -> None:
    client = aioredis.Redis.from_url(redis_url)
    keys = hits = 0
    needles = [c.encode() for c in contacts]
    async for key in client.scan_iter(match="ts:*", count=1000):
        keys += 1
        blob = key
        if (await client.type(key)) == b"string":
            blob += await client.get(key) or b""
        else:
            blob += str(await client.hgetall(key)).encode() if (await client.type(key)) == b"hash" else b""
        hits += sum(1 for n in needles if n in blob)
    await client.aclose()
    log_lines = log_path.read_text().splitlines()
    log_hits = sum(1 for line in log_lines for c in contacts if c in line)
    say(
        f"\nPII audit: {hits + log_hits} of {len(contacts)} fetched contacts found "
        f"in {keys} Redis keys and {len(log_lines)} resolver log lines."
    )
    if hits or log_hits:
        raise SystemExit("PII found where it must never be")


async def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    customers = generate_customers(args.customers)
    faults = Faults(
        missing_ids={"cust-000004"},
        invalid_contacts={"cust-000007"},
        fail_status=500,
        fail_count=1,
    )
    sandbox = PiiApiSandbox(customers, oauth=OAuthClient("demo-app", "demo-secret"), faults=faults)
    runner, api_port = await start_pii_api(sandbox)
    api = f"http://127.0.0.1:{api_port}"
    say(f"sample PII API with {len(customers)} customers on {api} (OAuth 2.0 client credentials)")

    port = args.port or free_port()
    log_path = Path(tempfile.mkdtemp(prefix="tokensend-demo-")) / "resolver.log"
    proc = await start_resolver(port, args.redis_url, log_path)
    say(f"resolver serving on 127.0.0.1:{port} (log: {log_path})")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ResolverServiceStub(channel)
            oauth = await stub.PutOAuthConfig(
                pb.PutOAuthConfigRequest(
                    config=pb.OAuthConfig(
                        workspace_id=WORKSPACE,
                        oauth_config_id="crm",
                        token_url=f"{api}/oauth/token",
                        client_id="demo-app",
                        client_secret="demo-secret",
                    )
                )
            )
            say(
                f"OAuth config 'crm': {pb.TokenStatus.Name(oauth.config.status)}, secret read back as "
                f"{oauth.config.client_secret!r}"
            )
            email = await stub.PutPiiApiConfig(
                pb.PutPiiApiConfigRequest(
                    config=pb.PiiApiConfig(
                        workspace_id=WORKSPACE,
                        channel=common_pb2.CHANNEL_EMAIL,
                        mode=pb.MODE_BULK,
                        method=pb.HTTP_METHOD_POST,
                        url=f"{api}/v1/customers:batchGet",
                        body='{"ids": "@anonymous_ids"}',
                        oauth_config_id="crm",
                        batch_size=100,
                        results_path="data.results",
                        id_path="id",
                        contact_path="email",
                        attribute_paths={"first_name": "profile.first_name"},
                    )
                )
            )
            sms = await stub.PutPiiApiConfig(
                pb.PutPiiApiConfigRequest(
                    config=pb.PiiApiConfig(
                        workspace_id=WORKSPACE,
                        channel=common_pb2.CHANNEL_SMS,
                        mode=pb.MODE_SINGLE,
                        method=pb.HTTP_METHOD_GET,
                        url=f"{api}/v1/customers/@anonymous_id",
                        oauth_config_id="crm",
                        contact_path="customer.phone",
                        attribute_paths={"first_name": "customer.profile.first_name"},
                    )
                )
            )
            say(f"PII API configs saved: Email bulk v{email.version}, SMS single v{sms.version}")

            ids = [f"cust-{n:06d}" for n in range(1, args.batch + 1)] + ["", "cust-999999"]
            email_reply = await stub.ResolveContacts(
                pb.ResolveContactsRequest(
                    workspace_id=WORKSPACE,
                    channel=common_pb2.CHANNEL_EMAIL,
                    anonymous_ids=ids,
                    campaign_id="welcome",
                    campaign_instance_id=f"welcome-{int(time.time())}",
                )
            )
            print_table("Email, bulk lookups", email_reply, 10)
            sms_reply = await stub.ResolveContacts(
                pb.ResolveContactsRequest(
                    workspace_id=WORKSPACE, channel=common_pb2.CHANNEL_SMS, anonymous_ids=ids[:50] + ids[-2:]
                )
            )
            print_table("SMS, single lookups", sms_reply, 10)
            say(
                f"\nPII API calls: {sandbox.stats.requests} ({dict(sandbox.stats.statuses)}), "
                f"token requests: {sandbox.stats.token_requests}"
            )
            fetched = {c.contact for r in (email_reply, sms_reply) for c in r.contacts if c.contact}
            fetched |= {c.attributes["first_name"] for r in (email_reply, sms_reply) for c in r.contacts if c.contact}
        await audit(args.redis_url, fetched, log_path)
        say(f"\ndone in {time.monotonic() - started:.1f}s. Try it yourself with grpcurl:")
        say("  TOKENSEND_DEV_MODE=true .venv/bin/python -m services.resolver &")
        say("  .venv/bin/grpcurl -plaintext localhost:50051 list")
        say("  .venv/bin/grpcurl -plaintext localhost:50051 describe tokensend.resolver.v1.ResolverService")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("TOKENSEND_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--port", type=int, default=0, help="resolver gRPC port (default: a free one)")
    parser.add_argument("--customers", type=int, default=2000, help="customers in the sample PII API")
    parser.add_argument("--batch", type=int, default=500, help="anonymous IDs to resolve")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
