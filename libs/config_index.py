"""Which configs a workspace has, by kind: what the List RPCs page through.

Each save adds the config's name to `ts:{<workspace>}:config-index:<kind>` (a sorted set read in
name order, so pages are exact and stable) and the save's time to `...:config-updated:<kind>`
(a hash, name → Unix ms), in the same script as the write; a deletion removes both. Names and
times only: never a config's contents.

Configs saved before the index existed are indexed by `backfill`, once per Redis and kind (the
marker `ts:config-index-backfilled:<kind>`), from the keys that hold them; their save time is not
known (0). Lists and deletes wait for it (`IndexBackfill`), so none misses such a config.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import redis.asyncio as aioredis

from libs.errors import Aborted, InvalidArgument, require
from libs.logs import LogThrottle
from libs.store import PREFIX, check_id, workspace_key
from libs.tasks import stop_task

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

# The Lua that stamps a save: `KEYS[n]` the updated hash, `ARGV[m]` the name. Redis's clock, as the pins use.
STAMP_UPDATED = """
local clock = redis.call('TIME')
redis.call('HSET', {key}, {name}, clock[1] * 1000 + math.floor(clock[2] / 1000))
"""


def index_key(workspace_id: str, kind: str) -> str:
    return workspace_key(workspace_id, "config-index", kind)


def updated_key(workspace_id: str, kind: str) -> str:
    return workspace_key(workspace_id, "config-updated", kind)


def is_id(value: str) -> bool:
    """Whether `value` is an ID as `check_id` takes it (OAuth config and connector IDs)."""
    try:
        check_id(value, "")
    except InvalidArgument:
        return False
    return True


def check_page_size(page_size: int) -> int:
    require(page_size <= MAX_PAGE_SIZE, "page_size", f"at most {MAX_PAGE_SIZE}")
    return page_size or DEFAULT_PAGE_SIZE


def stale_version(what: str, expected: int, current: int) -> Aborted:
    """The refusal of a conditional save or delete whose config moved on since the caller read it."""
    now = f"is at version {current}" if current else "does not exist (deleted, or never saved)"
    return Aborted(
        f"expected_version: {what} {now}, not version {expected}: another change came first; "
        "read it again, apply your edit to it and send that version"
    )


# What a page_token that no list gave is told: it names the field and the token to send instead.
FOREIGN_PAGE_TOKEN = "is not ours: send the previous reply's next_page_token, or none for the first page"


def _token_of(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _name_of(token: str, valid: Callable[[str], bool]) -> str:
    """The last name of the previous page; InvalidArgument when the token is not one of ours."""
    try:
        name = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, UnicodeError):
        name = ""
    require(bool(name) and valid(name), "page_token", FOREIGN_PAGE_TOKEN)
    return name


async def page(
    redis: aioredis.Redis,
    workspace_id: str,
    kind: str,
    page_size: int,
    page_token: str,
    valid: Callable[[str], bool],
) -> tuple[list[str], dict[str, int], str]:
    """One page of names after `page_token`, their update times (0 when not recorded) and the next token."""
    start = f"({_name_of(page_token, valid)}" if page_token else "-"
    raw = await redis.zrange(index_key(workspace_id, kind), start, "+", bylex=True, offset=0, num=page_size + 1)
    names = [n.decode() if isinstance(n, bytes) else n for n in raw]
    more = len(names) > page_size
    names = names[:page_size]
    updated: dict[str, int] = {}
    if names:
        stamps = await redis.hmget(updated_key(workspace_id, kind), names)
        updated = {name: int(stamp) if stamp else 0 for name, stamp in zip(names, stamps, strict=True)}
    return names, updated, _token_of(names[-1]) if more else ""


async def all_names(redis: aioredis.Redis, workspace_id: str, kind: str) -> list[str]:
    """Every indexed name of a kind (kinds a workspace holds few of, or checks that must see each)."""
    raw = await redis.zrange(index_key(workspace_id, kind), 0, -1)
    return [n.decode() if isinstance(n, bytes) else n for n in raw]


# --- configs saved before the index existed -------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a kind's configs are kept: `ts:{<workspace>}:<part>:<name><suffix>`, a key that exists
    while the config does (`workspace_key`, so a name's ':' and '%' are escaped in it)."""

    kind: str
    part: str
    valid: Callable[[str], bool]  # the names a save takes; any other key is not a config's
    suffix: str = ""

    @property
    def match(self) -> str:
        return f"{PREFIX}:{{*}}:{self.part}:*{self.suffix}"

    def parse(self, key: str) -> tuple[str, str] | None:
        """The workspace and config name a key holds, or None when it is not one of this layout's."""
        found = re.match(rf"{PREFIX}:\{{([^}}]+)\}}:{re.escape(self.part)}:([^:]+){re.escape(self.suffix)}\Z", key)
        if found is None:
            return None
        workspace_id, name = found.group(1), unquote(found.group(2))  # every '%' in a part is one we escaped
        return (workspace_id, name) if is_id(workspace_id) and self.valid(name) else None


# How an operator names each sealed config kind, by the key part that holds it (`workspace_key`).
_SEALED_KINDS = {
    "connector": "connector {!r}",
    "oauth": "OAuth config {!r}",
    "pii": "PII API config for channel family {}",
    "content": "content API config {!r}",
}


def describe_config_key(key: str) -> str:
    """The config a sealed record's key holds, as the operator names it ("connector 'sg' in workspace
    'demo'"), so that an error can say which one to save again; "" for a key that is not a config's."""
    found = re.match(rf"{PREFIX}:\{{([^}}]+)\}}:([a-z]+):([^:]+)\Z", key)
    if found is None or found.group(2) not in _SEALED_KINDS:
        return ""
    workspace_id, name = found.group(1), unquote(found.group(3))  # every '%' in a part is one we escaped
    if not (is_id(workspace_id) and is_id(name)):
        return ""
    return f"{_SEALED_KINDS[found.group(2)].format(name)} in workspace {workspace_id!r}"


class UnreadableLog:
    """What a list says of a sealed config that does not open (`libs.crypto.SealedDataInvalid`, whose text is
    one of its fixed phrases), listing it as unreadable: named by its Redis key, never by anything sealed in
    it, and a line per config a minute however often it is listed (one per store)."""

    def __init__(self) -> None:
        self._throttle = LogThrottle(60.0)

    def __call__(self, key: str, exc: Exception) -> None:
        held = self._throttle.due(key)
        if held is None:
            return
        log.error(
            "%s does not open with TOKENSEND_SECRET_KEY (%s): listed as unreadable; it was sealed under a key "
            "not configured: set that key too, or save the config again with its secrets, or delete it "
            "(listed %d more times since the last line)",
            key,
            exc,
            held,
        )


SCAN_COUNT = 1000  # keys Redis looks at per SCAN call: each call is short, and a page is all we hold


def backfilled_key(kind: str) -> str:
    return f"{PREFIX}:config-index-backfilled:{kind}"


# Index the name only while its config is still saved: a deletion since the scan saw the key leaves no entry.
# KEYS: the config's key, the index. ARGV: the name. Returns 1 when the name was not indexed yet.
_INDEX_IF_SAVED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[1])
"""


async def backfill(redis: aioredis.Redis, layout: Layout) -> int:
    """Indexes every config of the layout's kind that Redis holds, unless the kind's marker says it was
    done; then sets the marker. How many names were missing from the index.

    SCAN with MATCH (each master of a cluster), never KEYS; idempotent, so that several processes may
    run it at once, and run again after a stop midway. Logs counts, never a name."""
    marker = backfilled_key(layout.kind)
    if await redis.exists(marker):
        return 0
    index_if_saved = redis.register_script(_INDEX_IF_SAVED)
    started = time.monotonic()
    found = added = 0
    async for raw in redis.scan_iter(match=layout.match, count=SCAN_COUNT):
        key = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        parsed = layout.parse(key)
        if parsed is None:
            continue
        workspace_id, name = parsed
        found += 1
        added += int(await index_if_saved(keys=[key, index_key(workspace_id, layout.kind)], args=[name]))
    await redis.set(marker, int(time.time() * 1000))
    log.info(
        "config index: %d %s config(s) found by their keys, %d of them not indexed before (%.1f s)",
        found,
        layout.kind,
        added,
        time.monotonic() - started,
    )
    return added


class IndexBackfill:
    """Runs `backfill` for some layouts in the background from service start; the lists, and the deletes
    that check which configs name another, wait for it. A run that failed (Redis unreachable) is logged
    and started again by the next wait."""

    def __init__(self, redis: aioredis.Redis, layouts: Sequence[Layout]) -> None:
        self._redis = redis
        self._layouts = list(layouts)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or (self._task.done() and (self._task.cancelled() or self._task.exception())):
            self._task = asyncio.create_task(self._run(), name="config index backfill")
            self._task.add_done_callback(_log_failure)

    async def _run(self) -> None:
        for layout in self._layouts:
            await backfill(self._redis, layout)

    async def wait(self) -> None:
        self.start()
        assert self._task is not None
        await asyncio.shield(self._task)  # a caller's deadline does not stop the run the others wait for

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task, "config index backfill")


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("config index: indexing the configs saved before it failed (%s)", type(task.exception()).__name__)
