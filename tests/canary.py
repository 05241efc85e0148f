"""Canary PII for leak tests: unique contacts and names, and scanners for every sink."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from urllib.parse import quote

from sandbox.pii_api import Customer


def canary_customers(count: int, prefix: str = "canary") -> dict[str, Customer]:
    """Customers whose every value is unique to this run, so any hit anywhere is a leak."""
    people = {}
    for n in range(count):
        tag = uuid.uuid4().hex[:10]
        digits = f"{int(tag, 16) % 10**6:06d}"
        anonymous_id = f"{prefix}-{n}"
        people[anonymous_id] = Customer(
            anonymous_id=anonymous_id,
            email=f"canary.{tag}@canary-{tag}.example",
            phone=f"+447400{digits}",
            first_name=f"Firstcanary{tag}",
            last_name=f"Lastcanary{tag}",
        )
    return people


def needles(people: dict[str, Customer]) -> set[str]:
    """Every form a canary could take in a sink: as given, lower-case, without '+', national digits,
    percent-encoded (as a URL, a query string or a form body carries it)."""
    found = set()
    for p in people.values():
        for value in (p.email, p.phone, p.phone.lstrip("+"), p.phone[3:], p.first_name, p.last_name):
            found.add(value)
            found.add(value.lower())
            found.add(quote(value, safe=""))
    return found


def holds_number(number: bytes, dump: bytes) -> bool:
    """`number` standing alone in `dump`, not inside a longer word or number: a store shared by
    the tests holds millisecond timestamps and hex digests, which contain any four digits now and
    then (a substring test once failed on one)."""
    return re.search(rb"(?<![0-9A-Za-z])" + re.escape(number) + rb"(?![0-9A-Za-z])", dump) is not None


def hits(canaries: set[str], haystacks: Iterable[str | bytes]) -> list[str]:
    """The canaries found in any of `haystacks`, in any case: a provider or a PII API may quote a value
    upper-cased ("FIRSTCANARY..."), and the scrubbing removes fetched values in any case."""
    texts = [(h.decode("utf-8", "replace") if isinstance(h, bytes) else h).casefold() for h in haystacks]
    return sorted(n for n in canaries if any(n.casefold() in t for t in texts))


async def redis_dump(redis) -> list[bytes]:
    """Every key and every value of every type in the database."""
    chunks = []
    async for key in redis.scan_iter(count=1000):
        chunks.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            chunks.append(await redis.get(key))
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                chunks += [k, v]
        elif kind == "list":
            chunks += await redis.lrange(key, 0, -1)
        elif kind == "set":
            chunks += list(await redis.smembers(key))
        elif kind == "zset":
            chunks += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                for k, v in fields.items():
                    chunks += [k, v]
    return [c for c in chunks if c]


def secret_needles(*secrets: str) -> set[str]:
    """Every form a saved secret could take in a sink: as given and percent-encoded (as a URL or a form
    body carries it)."""
    return {form for secret in secrets for form in (secret, quote(secret, safe=""), quote(secret))}
