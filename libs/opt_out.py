"""Inbound opt-out keywords: what a customer texts (SMS or WhatsApp) to stop or restart messages.

A message matches when, after trimming spaces and punctuation around it, it is
exactly one keyword; case, accents, and spaces or punctuation between its letters
do not matter (`Arrêt.` matches ARRET, `opt-out` and `Opt out` OPTOUT, `Stop all`
STOPALL). A keyword is one to four words, so WhatsApp's "Stop promotions" quick-reply
button works as one.
Workspaces may set their own lists; the defaults follow the carriers' and
Twilio's standard keywords in several languages. `ALWAYS_STOP` stops for every workspace:
a workspace's STOP list adds to it, and no START keyword may be one of its words.

Redis layout:
- `ts:{ws}:optout:keywords` hash, fields `stop` and `start`: JSON lists of what the workspace set
  (absent: the defaults); `ALWAYS_STOP` is added when read, so lists saved without it stop on it too.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import redis.asyncio as aioredis

from libs.errors import InvalidArgument, require
from libs.header_rules import CONTROL
from libs.store import workspace_key

# CTIA's handbook and the FCC's 2024 consent-revocation rule require these to revoke consent to
# texts whatever the sender configured; STOPALL is Twilio's. Canada's carriers (CWTA's short-code
# guidelines, under CASL) require the French ARRET beside STOP; France's rules name STOP itself. The
# sender's country is not known when a list is saved, so no workspace can remove any of them.
ALWAYS_STOP = (
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
    "ARRET",
)
# The others no law or carrier requires of every sender: a workspace's own list replaces them.
DEFAULT_STOP = (
    *ALWAYS_STOP,
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


def _with_always_stop(stop: Iterable[str]) -> tuple[str, ...]:
    """`ALWAYS_STOP` followed by the other words of `stop`, each spelling of a word once."""
    words: dict[str, str] = {}
    for word in (*ALWAYS_STOP, *stop):
        words.setdefault(spelled_together(word), word)
    return tuple(words.values())


_ALWAYS_STOP_FORMS = frozenset(map(spelled_together, ALWAYS_STOP))


@dataclass(frozen=True)
class Keywords:
    """The keywords in force; `stop` always holds `ALWAYS_STOP`, and `start` never (a list saved
    before it was always on may hold one), however the lists were given."""

    stop: tuple[str, ...] = DEFAULT_STOP
    start: tuple[str, ...] = DEFAULT_START

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _with_always_stop(self.stop))
        object.__setattr__(self, "start", tuple(w for w in self.start if spelled_together(w) not in _ALWAYS_STOP_FORMS))

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


def clean_keywords(values: Iterable[str], field: str, kind: str = STOP) -> tuple[str, ...]:
    """Normalised, deduplicated keywords of `kind`; INVALID_ARGUMENT naming the field for a bad one,
    such as a START keyword that is one of `ALWAYS_STOP`, however spelled apart."""
    cleaned: list[str] = []
    for i, value in enumerate(values):
        # Trimmed away, a control character would save another keyword than the one given, silently.
        require(not CONTROL.search(value), f"{field}[{i}]", "must not contain control characters")
        word = normalize(value)
        require(
            len(word) <= MAX_KEYWORD_LENGTH and bool(_KEYWORD.match(word)),
            f"{field}[{i}]",
            f"must be one to four words of letters or digits, at most {MAX_KEYWORD_LENGTH} characters",
        )
        require(
            kind != START or spelled_together(word) not in _ALWAYS_STOP_FORMS,
            f"{field}[{i}]",
            f"{word} always stops ({', '.join(ALWAYS_STOP)} opt out in every workspace), so it cannot start",
        )
        if word not in cleaned:
            cleaned.append(word)
    # The always-on words do not count, so the list a read returns can be saved back as it is.
    own = [word for word in cleaned if spelled_together(word) not in _ALWAYS_STOP_FORMS]
    require(len(own) <= MAX_KEYWORDS, field, f"at most {MAX_KEYWORDS} keywords besides {', '.join(ALWAYS_STOP)}")
    return tuple(cleaned)


def check_apart(stop_values: Sequence[str], start_values: Sequence[str], field: str = "keywords") -> None:
    """INVALID_ARGUMENT naming the entry (`keywords.start_keywords[i]`, or the STOP entry when the START list is the
    defaults) of a word that would both stop and start, however its letters are spaced; each list is the
    defaults when empty. The values are as the request gives them, each already checked by `clean_keywords`."""
    stop_at: dict[str, int] = {}
    for i, value in enumerate(stop_values):
        stop_at.setdefault(spelled_together(normalize(value)), i)
    if not start_values:
        for form, i in stop_at.items():
            default = next((word for word in DEFAULT_START if spelled_together(word) == form), None)
            if default is not None:
                raise InvalidArgument(
                    f"{field}.stop_keywords[{i}]",
                    f"{default} is a default START keyword, so it cannot stop: leave it out, or give start_keywords "
                    "without it",
                )
        return
    default_stop = {spelled_together(word): word for word in DEFAULT_STOP}
    for i, value in enumerate(start_values):
        word = normalize(value)
        form = spelled_together(word)
        if stop_values and form in stop_at:
            raise InvalidArgument(
                f"{field}.start_keywords[{i}]",
                f"{word} is {field}.stop_keywords[{stop_at[form]}] too: a word cannot both stop and start",
            )
        if not stop_values and form in default_stop:
            raise InvalidArgument(
                f"{field}.start_keywords[{i}]",
                f"{default_stop[form]} is a default STOP keyword, so it cannot start: leave it out, or give "
                "stop_keywords without it",
            )


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
        """Empty lists mean the defaults; a STOP list adds to `ALWAYS_STOP` and replaces the other
        defaults. A word may not be both a STOP and a START keyword, however its letters are spaced
        (a START of `OPT OUT` would never act: the STOP OPTOUT matches first)."""
        keywords = Keywords(stop or DEFAULT_STOP, start or DEFAULT_START)
        stopping = {spelled_together(word) for word in keywords.stop}
        overlap = sorted(word for word in start or DEFAULT_START if spelled_together(word) in stopping)
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
