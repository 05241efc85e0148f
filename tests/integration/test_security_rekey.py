"""Key rotation for secrets at rest: several keys, then `python -m libs.rekey` re-seals under the first.

The procedure of docs/operations.md, step by step: a workspace configured under the old key;
services restarted with `new,old` keep working; the command re-seals every PII API config,
OAuth config and connector (idempotent: a second run has nothing to do); services with only the
new key then work and the old key alone opens nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2_grpc as resolver_grpc

from libs.connector_store import ConnectorStore
from libs.crypto import SealedDataInvalid, SecretBox
from libs.settings import ReceiptsSettings
from services.receipts.server import dedupe_keys
from services.resolver.server import ResolverDeps, build_server
from tests.conftest import RunningResolver, new_secret_key, resolver_settings
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
C = common_pb2.Channel
SEALED_PER_WORKSPACE = 1 + 3 + 4  # the OAuth config, three PII API configs, four connectors


def raw(key: str) -> bytes:
    return base64.urlsafe_b64decode(key + "==")


async def run_rekey(redis_url: str, secret_key: str | None, *args: str) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env["TOKENSEND_REDIS_URL"] = redis_url
    if secret_key is not None:
        env["TOKENSEND_SECRET_KEY"] = secret_key
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "libs.rekey", *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    report = json.loads(out) if out.strip() else {}
    return proc.returncode, report, err.decode()


@pytest.fixture
async def start_resolver_with_key(redis_url):
    running = []

    async def start(secret_key: str) -> RunningResolver:
        settings = resolver_settings(redis_url, secret_key)
        deps = ResolverDeps.from_settings(settings)
        service, port = await build_server(settings, deps)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((service, channel))
        return RunningResolver(resolver_grpc.ResolverServiceStub(channel), channel, port, settings, deps)

    yield start
    for service, channel in running:
        await channel.close()
        await service.stop(0.5)


async def test_rotation_rekey_then_the_old_key_is_not_needed(
    start_suite, start_dispatcher, start_resolver_with_key, redis, redis_url, secret_key
):
    old, new = secret_key, new_secret_key()
    suite = await start_suite()  # everything sealed under the old key
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(2), instance="before")).summary.sent == 2

    # Step 1: services with "new,old" read what the old key sealed (and seal new saves under the new key).
    both = f"{new},{old}"
    resolver = await start_resolver_with_key(both)
    dispatcher = await start_dispatcher(resolver, secret_key=both)
    suite.dispatcher = dispatcher
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(2), instance="during")).summary.sent == 2

    # Step 2: re-seal. A dry run counts and writes nothing; the run re-seals everything; a second has nothing to do.
    code, dry, _ = await run_rekey(redis_url, both, "--dry-run")
    assert code == 0 and dry["dry_run"] and dry["resealed"] == SEALED_PER_WORKSPACE
    code, first, _ = await run_rekey(redis_url, both)
    assert code == 0 and first["resealed"] == SEALED_PER_WORKSPACE and first["unreadable"] == 0
    code, second, _ = await run_rekey(redis_url, both)
    assert code == 0 and second["resealed"] == 0 and second["current"] == SEALED_PER_WORKSPACE

    # Step 3: the old key goes; services with the new key alone work, the old key alone opens nothing.
    resolver = await start_resolver_with_key(new)
    suite.dispatcher = await start_dispatcher(resolver, secret_key=new)
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(2), instance="after")).summary.sent == 2
    with pytest.raises(SealedDataInvalid):
        await ConnectorStore(redis, SecretBox([raw(old)])).find(suite.workspace_id, "gateway")
    dump = b"".join([await redis.get(k) or b"" async for k in redis.scan_iter(match="ts:*:connector:*")])
    assert b"sandbox-gateway-secret" not in dump  # re-sealed, never written in clear


async def test_rekey_reports_what_no_key_opens_and_needs_a_key(redis, redis_url):
    stranger = SecretBox([raw(new_secret_key())])
    key = "ts:{brand}:connector:orphan"
    await redis.set(key, stranger.seal(b"secret", key.encode()))
    await redis.hset("ts:{brand}:stats:x:all", mapping={"sent": 3})  # not sealed: not touched
    await redis.set("ts:{brand}:rate:x", b"\x01short")
    code, report, err = await run_rekey(redis_url, new_secret_key())
    assert code == 1 and report["unreadable"] == 1 and report["resealed"] == 0
    assert "orphan" in err and "secret" not in err  # the key is named, the value never shown
    code, _, err = await run_rekey(redis_url, None)
    assert code == 2 and "TOKENSEND_SECRET_KEY" in err


async def test_rekey_without_redis_says_so_and_is_not_taken_for_unreadable_values(redis_url):
    """Exit status 1 means sealed values no key opens (keep the old keys); Redis down is another matter."""
    down = "redis://:hunter2@127.0.0.1:1/0"  # a password in the URL is never shown
    code, report, err = await run_rekey(down, new_secret_key())
    assert code == 3 and report == {}
    assert "TOKENSEND_REDIS_URL" in err and "run it again" in err
    assert "Traceback" not in err and "hunter2" not in err


def test_derived_keys_write_under_the_first_key_and_read_under_every_one():
    """Receipt dedupe markers are written under the first key's dedupe key and looked up under each, so a
    rotation keeps the dedupe window (tests/integration/test_receipts_dedupe_rotation.py)."""
    old, new = new_secret_key(), new_secret_key()

    def derived(secret: str) -> list[bytes]:
        return dedupe_keys(ReceiptsSettings(secret_key=secret))

    assert derived(f"{new},{old}") == derived(new) + derived(old) and derived(new) != derived(old)
    assert SecretBox.from_settings(ReceiptsSettings(secret_key=f"{new},{old}")).is_current(
        SecretBox([raw(new)]).seal(b"x", b"ad")
    )


async def key_ids(secret_key: str) -> list[str]:
    code, report, err = await run_rekey("redis://127.0.0.1:1/0", secret_key, "--key-ids")  # needs no Redis
    assert code == 0, err
    return report["keys"]


async def test_keys_in_the_wrong_order_are_plain_in_the_report(redis, redis_url):
    """`old,new` re-seals nothing and opens everything: the report must show that all is still under the
    old key (by its ID), so that nobody reads `"resealed": 0` as "the old key can go"."""
    old, new = new_secret_key(), new_secret_key()
    [old_id], [new_id] = await key_ids(old), await key_ids(new)
    assert old_id != new_id and await key_ids(f"{new},{old}") == [new_id, old_id]
    box = SecretBox([raw(old)])
    for name in ("ts:{brand}:connector:a", "ts:{brand}:connector:b", "ts:{brand}:oauth:c"):
        await redis.set(name, box.seal(b"s3cret-value", name.encode()))

    code, wrong, err = await run_rekey(redis_url, f"{old},{new}")
    assert code == 0 and wrong["resealed"] == 0 and wrong["unreadable"] == 0  # what misled before
    assert wrong["sealing_key"] == old_id and wrong["keys"] == [old_id, new_id]
    assert wrong["sealed_under"] == {old_id: 3}
    assert old_id in err and "s3cret" not in err

    code, dry, _ = await run_rekey(redis_url, f"{new},{old}", "--dry-run")
    assert code == 0 and dry["resealed"] == 3 and dry["sealed_under"] == {old_id: 3}  # as it stands
    code, right, _ = await run_rekey(redis_url, f"{new},{old}")
    assert code == 0 and right["resealed"] == 3 and right["sealing_key"] == new_id
    assert right["sealed_under"] == {new_id: 3}
    code, again, _ = await run_rekey(redis_url, f"{new},{old}")
    assert code == 0 and again["resealed"] == 0 and again["sealed_under"] == {new_id: 3}

    # A value under a key not configured is counted apart, never under a configured key's ID.
    stranger = "ts:{brand}:connector:orphan"
    await redis.set(stranger, SecretBox([raw(new_secret_key())]).seal(b"x", stranger.encode()))
    code, report, _ = await run_rekey(redis_url, new)
    assert code == 1 and report["sealed_under"] == {new_id: 3, "unknown": 1}
    # A value under a configured key that does not open (copied to another record) is counted under that key.
    await redis.set("ts:{brand}:connector:copy", box.seal(b"s3cret-value", b"ts:{brand}:connector:a"))
    code, report, err = await run_rekey(redis_url, f"{new},{old}")
    assert code == 1 and report["unreadable"] == 2 and report["resealed"] == 0
    assert report["sealed_under"] == {new_id: 3, old_id: 1, "unknown": 1}
    assert f"connector:copy does not open with key {old_id}" in err and "s3cret" not in err


def test_key_ids_are_short_stable_and_neither_the_key_nor_its_hash():
    import hashlib

    from libs.crypto import key_id_of

    key = raw(new_secret_key())
    name = key_id_of(key)
    assert name == key_id_of(key) != key_id_of(raw(new_secret_key()))
    assert len(name) == 8 and int(name, 16) >= 0
    for digest in (hashlib.sha256(key), hashlib.sha256(b"tokensend-key-id" + key), hashlib.sha1(key), hashlib.md5(key)):
        assert name not in digest.hexdigest()
    assert name not in key.hex() and name not in base64.urlsafe_b64encode(key).decode()


async def test_verify_opens_what_is_already_under_the_first_key(redis, redis_url):
    """Without `--verify` a value is `current` by the key ID in its header alone: one corrupted, or sealed
    for another record, reads as fine. `--verify` opens it and counts it `unreadable` (exit status 1)."""
    new = new_secret_key()
    [new_id] = await key_ids(new)
    box = SecretBox([raw(new)])
    good, corrupted, copied = "ts:{brand}:connector:good", "ts:{brand}:connector:bad", "ts:{brand}:oauth:copy"
    await redis.set(good, box.seal(b"s3cret-value", good.encode()))
    sealed = bytearray(box.seal(b"s3cret-value", corrupted.encode()))
    sealed[-1] ^= 0x01  # one bit of the tag flipped: the header still names the sealing key
    await redis.set(corrupted, bytes(sealed))
    await redis.set(copied, box.seal(b"s3cret-value", good.encode()))  # another record's associated data

    code, plain, _ = await run_rekey(redis_url, new)
    assert code == 0 and plain["current"] == 3 and plain["unreadable"] == 0 and not plain["verify"]

    for args in (("--verify",), ("--verify", "--dry-run")):
        code, verified, err = await run_rekey(redis_url, new, *args)
        assert code == 1 and verified["verify"] and verified["dry_run"] == ("--dry-run" in args)
        assert verified["sealed"] == 3 and verified["current"] == 1 and verified["unreadable"] == 2
        assert verified["resealed"] == 0 and verified["sealed_under"] == {new_id: 3}
        assert f"connector:bad does not open with key {new_id}" in err
        assert f"oauth:copy does not open with key {new_id}" in err
        assert "good" not in err and "s3cret" not in err  # only what fails is named; values never
    assert await redis.get(corrupted) == bytes(sealed)  # nothing written


async def test_verify_passes_on_a_clean_store_and_counts_what_it_opened(redis, redis_url):
    old, new = new_secret_key(), new_secret_key()
    [new_id] = await key_ids(new)
    current, former = SecretBox([raw(new)]), SecretBox([raw(old)])
    await redis.set("ts:{brand}:connector:a", current.seal(b"x", b"ts:{brand}:connector:a"))
    await redis.set("ts:{brand}:pii:sms:v2", current.seal(b"x", b"ts:{brand}:pii:sms"))  # bound to its base key
    await redis.hset("ts:{brand}:oauth:h", mapping={"f": current.seal(b"x", b"ts:{brand}:oauth:h:f")})
    await redis.set("ts:{brand}:connector:b", former.seal(b"x", b"ts:{brand}:connector:b"))

    code, report, err = await run_rekey(redis_url, f"{new},{old}", "--verify")
    assert code == 0, err
    assert report["verify"] and report["sealed"] == 4 and report["current"] == 3 and report["resealed"] == 1
    assert report["unreadable"] == 0 and report["sealed_under"] == {new_id: 4}
    code, again, err = await run_rekey(redis_url, new, "--verify")
    assert code == 0 and again["current"] == 4 and again["unreadable"] == 0, err
