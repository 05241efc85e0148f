"""Commands packed by hiredis are byte for byte what redis-py would send."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from libs.errors import InvalidArgument
from libs.store import check_id, create_redis, hiredis_packing

COMMANDS = [
    ("SET", "ts:{ws}:a", "value", "EX", 60),
    ("EVALSHA", "0" * 40, 2, "k1", "k2", "x", b"\x00\xffbytes", -5, 2**40),
    ("HSET", "ts:{ws}:h", "name", "Zoë ✓ 日本"),
    ("ZADD", "ts:{ws}:z", 1.5, "m1"),  # a float: redis-py packs it
    ("CONFIG GET", "maxmemory"),  # a two-word command name: redis-py splits it
    (b"PING",),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_packing_matches_redis_py(args) -> None:
    plain = aioredis.Connection()
    packed = hiredis_packing(aioredis.Connection)()
    assert b"".join(packed.pack_command(*args)) == b"".join(plain.pack_command(*args))


@pytest.mark.parametrize("bad", [None, True, {"a": 1}])
def test_values_redis_py_refuses_are_still_refused(bad) -> None:
    with pytest.raises(DataError):
        hiredis_packing(aioredis.Connection)().pack_command("SET", "k", bad)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:6379/9", aioredis.Connection),
        ("rediss://127.0.0.1:6380/9", aioredis.SSLConnection),
        ("unix:///tmp/redis.sock", aioredis.UnixDomainSocketConnection),
    ],
)
def test_every_url_scheme_keeps_its_transport(url, base) -> None:
    client = create_redis(url)
    cls = client.connection_pool.connection_class
    assert issubclass(cls, base) and cls is hiredis_packing(base)


@pytest.mark.parametrize("value", ["ws\n", "ws\r\n", "\nws", "ws x"])
def test_an_id_with_a_line_break_or_a_space_is_refused(value) -> None:
    """`$` would match before a final line break: an ID ending in one would reach keys and logs."""
    with pytest.raises(InvalidArgument) as refused:
        check_id(value, "workspace_id")
    assert refused.value.field == "workspace_id"


@pytest.mark.parametrize("value", ["_spring", ".spring", ":spring", "-spring"])
def test_an_id_starting_with_a_sign_is_refused_saying_how_an_id_starts(value) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_id(value, "campaign_id")
    assert refused.value.field == "campaign_id"
    assert "starting with a letter or digit" in str(refused.value)
