"""Secrets read back masked, and saved (or tested) again: what the mask stands for, and where it may go."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping, MutableMapping
from urllib.parse import quote, quote_plus, unquote

from libs.errors import require

MASK = "********"


# The entry names an error may quote: those of headers and query parameters as APIs name them.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,64}\Z")


def restore_masked(
    secrets: MutableMapping[str, str],
    saved: Mapping[str, str],
    field: str,
    moved: str = "",
    any_case: bool = False,
) -> None:
    """Puts the saved value back for each entry of `secrets` given as MASK. A mask with no saved value
    behind it is refused rather than sent as eight stars; with `moved` (why the requests now go to
    another host than the saved ones did), every mask is refused: a saved secret never goes elsewhere.
    `any_case`: names match in any letter case (HTTP header names)."""
    stored = {name.lower(): value for name, value in saved.items()} if any_case else saved
    for name, value in list(secrets.items()):
        if value != MASK:
            continue
        # A name that is not a plain one may be a secret pasted whole (`api_key=...`): the map is named then.
        where = f"{field}['{name}']" if _PLAIN_NAME.match(name) else field
        kept = stored.get(name.lower() if any_case else name)
        require(kept is not None, where, "is masked (********) but no saved value stands behind it: enter it")
        require(not moved, where, f"is masked, and {moved}: enter it")
        secrets[name] = kept


# Query parameters whose value says how to send, never who may: shown on read. Any other fixed value
# is taken for a credential, whatever its name: a gateway's `k` or `u` is as much a key as `api_key`,
# so names are trusted only to say a value is not a secret, never that it is one.
PLAIN_QUERY_PARAMETERS = frozenset(
    {"channel", "encoding", "fields", "format", "from", "lang", "language", "locale", "sender", "type", "version"}
)
# Secrets this long are masked wherever a config repeats them (a URL's path, a body); a shorter one ("1")
# would mask half the text. In a Test reply a shorter one is masked where it stands whole (`masked_reply`).
MIN_MASKED_REPEAT = 8
# What may come just before a short secret that stands whole: no letter or digit, or the end of an escape
# (`%3D`, `\u0026`, `\n`), which stands for the character it encodes, not for a letter of the secret's run.
_WHOLE_FROM = r"(?:(?<![^\W_])|(?<=%[0-9A-Fa-f]{2})|(?<=\\u[0-9A-Fa-f]{4})|(?<=\\[bfnrt]))"
_WHOLE_UNTIL = r"(?![^\W_])"


def shown_query_value(name: str, value: str, template: re.Pattern[str]) -> bool:
    """Whether a query value is shown on read: a template (it holds one of `template`'s placeholders),
    empty, or the value of a plain parameter. Every other value is masked."""
    return not value or bool(template.search(value)) or name.lower() in PLAIN_QUERY_PARAMETERS


def _query_pairs(url: str) -> tuple[str, list[str] | None, str]:
    """(what comes before the query, its `&`-separated pairs or None without one, `#` and after)."""
    head, question, rest = url.partition("?")
    if not question:
        return url, None, ""
    query, hash_mark, fragment = rest.partition("#")
    return head, query.split("&"), hash_mark + fragment


def _masked_pair(pair: str, template: re.Pattern[str]) -> str:
    name, equals, value = pair.partition("=")
    if not equals:  # a bare `?<key>`: the pair is the value
        return pair if shown_query_value(pair, pair, template) else MASK
    return pair if shown_query_value(name, value, template) else f"{name}={MASK}"


def _masked_userinfo(head: str) -> str:
    """`https://user:pass@host/...` as `https://********@host/...`: userinfo is always a secret."""
    scheme, slashes, rest = head.partition("://")
    if not slashes:
        return head
    authority_end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority = rest[:authority_end]
    if "@" not in authority:
        return head
    return f"{scheme}://{MASK}@{authority.rpartition('@')[2]}{rest[authority_end:]}"


def masked_url(url: str, template: re.Pattern[str]) -> str:
    """`url` as read back: its userinfo and each query value that `shown_query_value` does not show
    replaced by MASK (`?api_key=********&from=Brand&to=@to`)."""
    head, pairs, tail = _query_pairs(url)
    head = _masked_userinfo(head)
    if pairs is None:
        return head
    return f"{head}?{'&'.join(_masked_pair(pair, template) for pair in pairs)}{tail}"


def secret_query_values(url: str, template: re.Pattern[str]) -> list[str]:
    """The values of `url`'s query that `masked_url` masks, and its userinfo."""
    head, pairs, _ = _query_pairs(url)
    secrets = []
    userinfo = _masked_userinfo(head)
    if userinfo != head:
        secrets.append(head.partition("://")[2].rpartition("@")[0])
    for pair in pairs or ():
        name, equals, value = pair.partition("=")
        if _masked_pair(pair, template) != pair:
            secrets.append(value if equals else pair)
    return secrets


def masked_repeats(text: str, secrets: Iterable[str]) -> str:
    """`text` with each secret of at least MIN_MASKED_REPEAT characters written in it replaced by MASK."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_MASKED_REPEAT:
            text = text.replace(secret, MASK)
    return text


def masked_reply(text: str, secrets: Iterable[str]) -> str:
    """`text`, what an API answered a Test call, with each secret it quotes back masked: one of at least
    MIN_MASKED_REPEAT characters wherever it is written, as `masked_repeats`; a shorter one where it
    stands whole, not inside a longer run of letters and digits (`"x_api_key": "k1"`, `?key=k1&`,
    `Bearer k1`), so that masking it leaves the rest of the reply readable. A short secret with no letter
    or digit cannot be told from the reply's punctuation: it is left."""
    secrets = set(secrets)
    text = masked_repeats(text, secrets)  # the long ones, longest first: all longer than any short one
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) < MIN_MASKED_REPEAT and any(c.isalnum() for c in secret):
            whole = (_WHOLE_FROM if secret[0].isalnum() else "") + re.escape(secret)
            whole += _WHOLE_UNTIL if secret[-1].isalnum() else ""
            text = re.sub(whole, MASK, text)
    return text


# A header value made of an auth scheme and its credentials (`Bearer <token>`, `Basic <base64>`, RFC 9110).
_SCHEME_AND_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*[ \t]+(\S.*)\Z", re.DOTALL)


def header_secrets(values: Iterable[str]) -> list[str]:
    """Header values as secrets, with what of each an API may quote on its own: the credentials after an
    auth scheme (an API refusing `Bearer <token>` names the token), and Basic's `user:password` and password."""
    secrets = []
    for value in values:
        secrets.append(value)
        found = _SCHEME_AND_CREDENTIALS.match(value)
        if found is None:
            continue
        credentials = found.group(1).strip()
        secrets.append(credentials)
        if value[:6].lower() == "basic ":
            try:
                pair = base64.b64decode(credentials, validate=True).decode()
            except (binascii.Error, ValueError):  # not Basic's encoding: the credentials as written only
                continue
            secrets += [pair, pair.partition(":")[2]]
    return [secret for secret in secrets if secret]


def quoted_forms(secrets: Iterable[str]) -> list[str]:
    """Each secret as written and as a reply may quote it: percent-encoded (a request URL quoted back),
    percent-decoded, and escaped inside a JSON string."""
    forms = []
    for secret in secrets:
        forms += [secret, quote(secret, safe=""), quote(secret), quote_plus(secret, safe=""), unquote(secret)]
        forms.append(json.dumps(secret, ensure_ascii=False)[1:-1])
        forms.append(json.dumps(secret)[1:-1])
    return forms


def restore_masked_url(new: str, saved: str, shown: str, field: str, moved: str = "") -> str:
    """`new` with the query values it gives as MASK put back from `saved` (read back as `shown`): each
    by its parameter's name (the n-th `key=********` takes the saved URL's n-th `key`), a bare
    `?********` by its place among the bare pairs. A URL read back and sent unchanged is the saved one.
    Refused, naming `field`, when a mask has no saved value behind it, or the requests now go elsewhere
    (`moved`, as `restore_masked`)."""
    if MASK not in new:
        return new
    require(not moved, field, f"holds a masked value (********), and {moved}: enter it")
    if new == shown:
        return saved
    head, pairs, tail = _query_pairs(new)
    saved_pairs = _query_pairs(saved)[1] or []
    if pairs is not None:
        by_name: dict[str | None, list[str]] = {}
        for pair in saved_pairs:
            name, equals, _ = pair.partition("=")
            by_name.setdefault(name if equals else None, []).append(pair)
        taken: dict[str | None, int] = {}
        restored = []
        for pair in pairs:
            name, equals, value = pair.partition("=")
            key = name if equals else None
            place = taken.get(key, 0)
            taken[key] = place + 1
            if (value if equals else pair) == MASK:
                kept = by_name.get(key, [])
                pair = kept[place] if place < len(kept) else pair
            restored.append(pair)
        new = f"{head}?{'&'.join(restored)}{tail}"
    require(MASK not in new, field, "holds a masked value (********) the saved URL does not: enter it")
    return new
