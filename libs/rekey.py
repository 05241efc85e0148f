"""`python -m libs.rekey`: re-seals every secret at rest under the first `TOKENSEND_SECRET_KEY`.

Key rotation (docs/operations.md): add the new key after the old one
(`TOKENSEND_SECRET_KEY=old,new`) and roll the services, so that every process opens
what the new key seals; then put it first (`new,old`) and roll again, run this
command, and drop the old key once a `--verify` run reports `"unreadable": 0` and every
sealed value under the new key: `"sealed_under": {"<new key's ID>": N}`. Keys are named by
their public ID (libs.crypto.key_id_of; `--key-ids` prints those of TOKENSEND_SECRET_KEY
and touches no Redis). With the keys the wrong way round (`old,new`) nothing is
re-sealed and nothing is unreadable, but `sealing_key` and `sealed_under` name the old
key's ID: the old key is still the one everything needs.

It scans `ts:*` (every node of a cluster), and for each string value and hash
field that is sealed (libs.crypto's format) but not under the first key, opens
it with the configured keys and writes it back sealed under the first key, only
if the value is still the one it read (a compare-and-set script, so a config
saved meanwhile is never overwritten). A value already under the first key counts as
`current` by the key ID in its header, unopened; with `--verify` it is opened too, and
one that opens with none of the candidates (corrupted, or copied from another record)
counts as `unreadable` instead (`--verify` writes nothing more, and goes with
`--dry-run`). A sealed value's associated data is the
name of its key or a prefix of it at a ':' (PII API config versions are bound to
their config's base key); those are the candidates tried. Running it again does
nothing: it is idempotent. Values are never printed; the report holds counts, and
`sealed_under` counts the sealed values as they stand after the run by the ID of the
key they are sealed under (`"unknown"`: a key not configured; a value a service
rewrote meanwhile is left out).

Exit status: 0 done; 1 some sealed values open with none of the keys, with `--verify`
those under the first key included (keep the old keys until that is understood); 2 bad
settings; 3 Redis unavailable or failing midway (what was re-sealed stays re-sealed: run
it again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from pydantic import ValidationError
from redis.exceptions import RedisError

from libs.crypto import SealedDataInvalid, SecretBox
from libs.settings import CommonSettings
from libs.store import PREFIX, create_redis

log = logging.getLogger("libs.rekey")

_SWAP_STRING = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""
_SWAP_FIELD = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


UNKNOWN_KEY = "unknown"  # in `sealed_under`: sealed under a key that is not configured


@dataclass
class RekeyReport:
    sealing_key: str = ""  # public ID of the first key, the one values are re-sealed under
    keys: list[str] = field(default_factory=list)  # public IDs of every configured key, in order
    keys_scanned: int = 0
    sealed: int = 0
    current: int = 0  # already under the first key (and, with --verify, opens)
    resealed: int = 0
    unreadable: int = 0  # sealed-looking, but no key (or no candidate record) opens it; with --verify, those
    # under the first key too
    changed_meanwhile: int = 0  # rewritten by a service while we worked: run again
    sealed_under: dict[str, int] = field(default_factory=dict)  # key ID -> sealed values under it, after the run

    def count_under(self, key_id: str | None) -> None:
        key_id = key_id or UNKNOWN_KEY
        self.sealed_under[key_id] = self.sealed_under.get(key_id, 0) + 1


def associated_data_candidates(key: str, field: str | None = None) -> Iterator[bytes]:
    """The key name, `key:field` for a hash field, then each prefix of the key at a ':'."""
    if field is not None:
        yield f"{key}:{field}".encode()
    yield key.encode()
    end = len(key)
    while (end := key.rfind(":", 0, end)) > len(PREFIX):
        yield key[:end].encode()


def _reseal(box: SecretBox, sealed: bytes, key: str, field: str | None = None) -> bytes | None:
    for candidate in associated_data_candidates(key, field):
        try:
            return box.reseal(sealed, candidate)
        except SealedDataInvalid:
            continue
    return None


def _opens(box: SecretBox, sealed: bytes, key: str, field: str | None = None) -> bool:
    for candidate in associated_data_candidates(key, field):
        try:
            box.open(sealed, candidate)  # the plaintext is dropped at once: only whether it opens matters
        except SealedDataInvalid:
            continue
        return True
    return False


def _count_unreadable(report: RekeyReport, box: SecretBox, sealed: bytes, key: str) -> None:
    report.unreadable += 1
    report.count_under(under := box.sealed_under(sealed))
    if under is None:
        log.warning("a sealed value in %s is sealed under a key that is not configured", key)
    else:
        log.warning("a sealed value in %s does not open with key %s (its key): altered?", key, under)


async def rekey(
    redis, box: SecretBox, *, match: str = f"{PREFIX}:*", dry_run: bool = False, verify: bool = False
) -> RekeyReport:
    report = RekeyReport(sealing_key=box.key_ids[0], keys=list(box.key_ids))
    swap_string = redis.register_script(_SWAP_STRING)
    swap_field = redis.register_script(_SWAP_FIELD)
    batch: list[bytes] = []

    async def work(keys: list[bytes]) -> None:
        # Pipelines without a transaction: keys of many workspaces, so many slots in a cluster.
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            kinds = await pipe.execute()
        readable = [(k, t) for k, t in zip(keys, kinds, strict=True) if t in (b"string", b"hash")]
        async with redis.pipeline(transaction=False) as pipe:
            for key, kind in readable:
                if kind == b"string":
                    pipe.get(key)
                else:
                    pipe.hgetall(key)
            contents = await pipe.execute()
        for (raw_key, kind), content in zip(readable, contents, strict=True):
            key = raw_key.decode("utf-8", errors="surrogateescape")
            if kind == b"string":
                values = {None: content}
            else:
                values = {f.decode("utf-8", "surrogateescape"): v for f, v in (content or {}).items()}
            for hash_field, value in values.items():
                if value is None or not box.looks_sealed(value):
                    continue
                report.sealed += 1
                if box.is_current(value):
                    # Without --verify the key ID in its header is taken at its word; the value is not opened.
                    if verify and not _opens(box, value, key, hash_field):
                        _count_unreadable(report, box, value, key)
                        continue
                    report.current += 1
                    report.count_under(report.sealing_key)
                    continue
                fresh = _reseal(box, value, key, hash_field)
                if fresh is None:
                    _count_unreadable(report, box, value, key)
                    continue
                if dry_run:
                    report.resealed += 1
                    report.count_under(box.sealed_under(value))
                    continue
                if hash_field is None:
                    swapped = await swap_string(keys=[raw_key], args=[value, fresh])
                else:
                    field_name = hash_field.encode("utf-8", "surrogateescape")
                    swapped = await swap_field(keys=[raw_key], args=[field_name, value, fresh])
                if swapped:
                    report.resealed += 1
                    report.count_under(report.sealing_key)
                else:
                    report.changed_meanwhile += 1

    async for raw_key in redis.scan_iter(match=match, count=500):
        report.keys_scanned += 1
        batch.append(raw_key)
        if len(batch) >= 500:
            await work(batch)
            batch = []
    if batch:
        await work(batch)
    _log_keys(report)
    return report


def _log_keys(report: RekeyReport) -> None:
    """One line naming, by ID, the key everything is sealed under: `old,new` given the wrong way round
    re-seals nothing and finds nothing unreadable, and only the IDs tell it from a finished rotation."""
    counts = ", ".join(f"{key_id}: {n}" for key_id, n in sorted(report.sealed_under.items(), key=lambda kv: -kv[1]))
    log.info(
        "sealing key (the first of TOKENSEND_SECRET_KEY): %s; sealed values by key: %s",
        report.sealing_key,
        counts or "none",
    )
    others = [k for k in report.keys if k != report.sealing_key]
    if others and set(report.sealed_under) <= {report.sealing_key}:
        log.info(
            "no sealed value needs the other keys (%s) any more; drop them only if %s is the NEW key's ID "
            "(`TOKENSEND_SECRET_KEY=<new> python -m libs.rekey --key-ids`): if it is the old key's, the keys "
            "are the wrong way round",
            ", ".join(others),
            report.sealing_key,
        )


async def _run(settings: CommonSettings, match: str, dry_run: bool, verify: bool) -> RekeyReport:
    box = SecretBox(settings.secret_keys())
    redis = create_redis(settings.redis_url, cluster=settings.redis_cluster)
    try:
        return await rekey(redis, box, match=match, dry_run=dry_run, verify=verify)
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libs.rekey", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="count what would be re-sealed, write nothing")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also open every value already under the first key; those that do not open count as unreadable",
    )
    parser.add_argument("--match", default=f"{PREFIX}:*", help="key pattern to scan (default: every tokensend key)")
    parser.add_argument(
        "--key-ids",
        action="store_true",
        help="print the public ID of each key of TOKENSEND_SECRET_KEY, in order (the sealing key first); no Redis",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rekey: %(message)s")
    try:
        settings = CommonSettings()
    except ValidationError as exc:
        names = ", ".join("TOKENSEND_" + str(e["loc"][0]).upper() for e in exc.errors() if e["loc"])
        print(f"rekey: invalid settings: {names}", file=sys.stderr)  # noqa: T201 - a CLI
        return 2
    if not settings.secret_keys():
        print("rekey: TOKENSEND_SECRET_KEY is not set (new key first, then the old ones)", file=sys.stderr)  # noqa: T201
        return 2
    if args.key_ids:
        print(json.dumps({"keys": SecretBox(settings.secret_keys()).key_ids}))  # noqa: T201 - the command's output
        return 0
    try:
        report = asyncio.run(_run(settings, args.match, args.dry_run, args.verify))
    except (RedisError, OSError) as exc:
        # Not exit status 1, which says sealed values no key opens; the URL is not echoed (it may hold a password).
        print(  # noqa: T201
            f"rekey: Redis at TOKENSEND_REDIS_URL failed ({type(exc).__name__}); what was re-sealed stays "
            "re-sealed: run it again once Redis answers",
            file=sys.stderr,
        )
        return 3
    print(json.dumps({"dry_run": args.dry_run, "verify": args.verify, **asdict(report)}))  # noqa: T201 - the command's output
    return 1 if report.unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
