"""Many opt-outs and opt-ins in one script call do what as many `suppress` and `lift` calls would."""

from __future__ import annotations

import random

import pytest

from libs import suppressions
from libs.suppressions import (
    COMPLAINT,
    INBOUND_STOP,
    MANUAL,
    PROVIDER_UNSUBSCRIBE,
    OptIn,
    OptOut,
    SuppressionStore,
)

pytestmark = pytest.mark.integration

IDS = ("a", "b", "c", "d")
TOPICS = ("", "sendgrid-group-7", "sendgrid-group-8")
TIMES = (None, 1_000, 2_000, 3_000)


def opt_outs(rng: random.Random) -> list[OptOut]:
    return [
        OptOut(
            rng.choice(("email", "sms")),
            rng.choice(TOPICS),
            rng.choice(IDS),
            rng.choice((PROVIDER_UNSUBSCRIBE, COMPLAINT, INBOUND_STOP, MANUAL)),
            rng.choice(TIMES),
            rng.random() < 0.7,
        )
        for _ in range(rng.randint(1, 12))
    ]


def opt_ins(rng: random.Random) -> list[OptIn]:
    return [
        OptIn(
            rng.choice(("email", "sms")),
            rng.choice(TOPICS),
            rng.choice(IDS),
            tuple(rng.sample((PROVIDER_UNSUBSCRIBE, INBOUND_STOP, COMPLAINT), rng.randint(1, 2))),
            rng.choice(TIMES),
            rng.random() < 0.7,
        )
        for _ in range(rng.randint(1, 8))
    ]


def held(value: bytes) -> list[tuple[int, int | str]]:
    """A stored value's (reason, ms) pairs, a time made now shown as "now": one call's opt-outs share its
    now, separate calls' differ, so those are ordered by reason."""
    pairs = [(int(r), int(ms)) for r, _, ms in (p.partition(":") for p in value.decode().split(","))]
    return [
        (r, "now" if ms > 10**12 else ms) for ms, r in sorted((ms if ms < 10**12 else 10**13, r) for r, ms in pairs)
    ]


async def state(redis, workspace_id: str) -> dict[str, object]:
    """Every suppression and opt-in of the workspace."""
    found: dict[str, object] = {}
    async for key in redis.scan_iter(match=f"ts:{{{workspace_id}}}:*"):
        name = key.decode().split("}:", 1)[1]
        if name.startswith("supp:"):
            found[name] = {k.decode(): held(v) for k, v in (await redis.hgetall(key)).items()}
        else:
            found[name] = await redis.zrange(key, 0, -1, withscores=True)
    return found


@pytest.mark.parametrize("seed", range(40))
async def test_many_at_once_end_as_one_by_one_and_count_the_same(redis, seed, monkeypatch):
    rng = random.Random(seed)
    store = SuppressionStore(redis)
    one_by_one, at_once = f"seq-{seed}", f"many-{seed}"
    # Calls split mid-run too.
    monkeypatch.setattr(suppressions, "MANY_PER_CALL", rng.choice((2, 3, 5000)))
    for _ in range(6):
        if rng.random() < 0.6:
            batch = opt_outs(rng)
            expected = 0
            for o in batch:
                expected += (
                    await store.suppress(
                        one_by_one, o.family, o.topic, [o.anonymous_id], o.reason, o.at_ms, o.after_opt_ins
                    )
                ).changed
            assert (await store.suppress_many(at_once, batch)).changed == expected
        else:
            batch = opt_ins(rng)
            expected = 0
            for o in batch:
                done = await store.lift(
                    one_by_one, o.family, o.topic, [o.anonymous_id], o.reasons, o.sent_after_ms, o.keep_opt_in
                )
                expected += done.changed
            assert (await store.lift_many(at_once, batch)).changed == expected
        assert await state(redis, at_once) == await state(redis, one_by_one)


async def test_a_batch_of_opt_outs_is_one_round_trip(redis):
    store = SuppressionStore(redis)
    batch = [OptOut("email", TOPICS[n % 3], f"id-{n}", PROVIDER_UNSUBSCRIBE, 1_000 + n % 7, True) for n in range(3000)]
    await redis.config_resetstat()
    done = await store.suppress_many("ws-many", batch)
    stats = await redis.info("commandstats")
    calls = sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))
    assert (done.changed, calls) == (3000, 1)
    assert (await store.suppress_many("ws-many", [])).changed == 0
