"""Inbound opt-out keywords: what a customer texts (SMS or WhatsApp) to stop or restart messages.

A message matches when, after trimming spaces and punctuation around it, it is
exactly one keyword; case, accents, and spaces or punctuation between its letters
do not matter (`Arrêt.` matches ARRET, `opt-out` and `Opt out` OPTOUT, `Stop all`
STOPALL). A keyword is one to four words, so WhatsApp's "Stop promotions" quick-reply
button works as one.
Workspaces may set their own lists; the defaults follow the carriers' and
Twilio's standard keywords in several languages.

Redis layout:
- `ts:{ws}:optout:keywords` hash, fields `stop` and `start`: JSON lists (absent: the defaults).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import redis.asyncio as aioredis

from libs.errors import require
from libs.store import workspace_key

DEFAULT_STOP = (
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
    "ARRET",  # French
    "ALTO",  # Spanish
    "BAJA",  # Spanish
    "PARAR",  # Portuguese, Spanish
    "CANCELAR",  # Portuguese, Spanish
    "ABMELDEN",  # German
    "STOPP",  # German, Norwegian, Swedish
    "BASTA",  # Italian
    "STOP PROMOTIONS",  # WhatsApp's marketing opt-out button
)
DEFAULT_START = (
    "START",
    "UNSTOP",
    "YES",
    "SUBSCRIBE",
    "RESUME",
    "COMMENCER",  # French
    "ALTA",  # Spanish
    "INICIAR",  # Portuguese, Spanish
    "ANMELDEN",  # German
    "AVVIA",  # Italian
)
MAX_KEYWORDS = 50
MAX_KEYWORD_LENGTH = 32
STOP, START = "stop", "start"

_KEYWORD = re.compile(r"^\w+(?: \w+){0,3}\Z")
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")
_BETWEEN = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """Upper case, accents removed, punctuation and spaces around the text trimmed, inner spaces single."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_EDGES.sub("", plain).upper().split())


def spelled_together(word: str) -> str:
    """A normalised keyword without what separates its letters: customers write `OPT OUT`, `opt-out`
    and `Stop all` for OPTOUT and STOPALL (the FCC counts "opt out" as a revocation)."""
    return _BETWEEN.sub("", word)


@dataclass(frozen=True)
class Keywords:
    stop: tuple[str, ...] = DEFAULT_STOP
    start: tuple[str, ...] = DEFAULT_START

    @cached_property
    def _stop_forms(self) -> frozenset[str]:
        return frozenset(map(spelled_together, self.stop))

    @cached_property
    def _start_forms(self) -> frozenset[str]:
        return frozenset(map(spelled_together, self.start))

    def classify(self, body: str) -> str | None:
        """STOP, START or None for an inbound message body."""
        text = body.strip()  # before the length check: "STOP" padded with spaces is still STOP
        if not text or len(text) > 4 * MAX_KEYWORD_LENGTH:
            return None
        word = spelled_together(normalize(text))
        if word in self._stop_forms:
            return STOP
        if word in self._start_forms:
            return START
        return None


def clean_keywords(values: Iterable[str], field: str) -> tuple[str, ...]:
    """Normalised, deduplicated keywords; INVALID_ARGUMENT naming the field for a bad one."""
    cleaned: list[str] = []
    for i, value in enumerate(values):
        word = normalize(value)
        require(
            len(word) <= MAX_KEYWORD_LENGTH and bool(_KEYWORD.match(word)),
            f"{field}[{i}]",
            f"must be one to four words of letters or digits, at most {MAX_KEYWORD_LENGTH} characters",
        )
        if word not in cleaned:
            cleaned.append(word)
    require(len(cleaned) <= MAX_KEYWORDS, field, f"at most {MAX_KEYWORDS} keywords")
    return tuple(cleaned)


class KeywordStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    @staticmethod
    def key(workspace_id: str) -> str:
        return workspace_key(workspace_id, "optout", "keywords")

    async def load(self, workspace_id: str) -> Keywords:
        stored = await self._redis.hgetall(self.key(workspace_id))
        stop = tuple(json.loads(stored[b"stop"])) if b"stop" in stored else DEFAULT_STOP
        start = tuple(json.loads(stored[b"start"])) if b"start" in stored else DEFAULT_START
        return Keywords(stop, start)

    async def save(self, workspace_id: str, stop: tuple[str, ...], start: tuple[str, ...]) -> Keywords:
        """Empty lists mean the defaults; a word may not be both a STOP and a START keyword, however
        its letters are spaced (a START of `OPT OUT` would never act: the STOP OPTOUT matches first)."""
        keywords = Keywords(stop or DEFAULT_STOP, start or DEFAULT_START)
        stopping = {spelled_together(word) for word in keywords.stop}
        overlap = sorted(word for word in keywords.start if spelled_together(word) in stopping)
        require(not overlap, "keywords", f"{', '.join(overlap)} cannot both stop and start")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(workspace_id))
            mapping = {}
            if stop:
                mapping["stop"] = json.dumps(list(stop))
            if start:
                mapping["start"] = json.dumps(list(start))
            if mapping:
                pipe.hset(self.key(workspace_id), mapping=mapping)
            await pipe.execute()
        return keywords
