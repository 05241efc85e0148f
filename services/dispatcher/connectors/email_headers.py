"""Extra email headers a message carries (List-Unsubscribe, List-Unsubscribe-Post ...).

Headers that define the envelope, the addresses or the MIME structure are ours
to write: a campaign header named `Bcc` or `Content-Type` is dropped rather
than sent (SendGrid would refuse the whole request of 1,000 for one of them).
So is a header whose name or value holds CR, LF or another control character
(header injection). Addresses go out with their domain in Punycode
(`ascii_domain`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping

from email_validator import EmailNotValidError, validate_email

RESERVED = frozenset(
    {
        "bcc",
        "cc",
        "content-transfer-encoding",
        "content-type",
        "date",
        "dkim-signature",
        "from",
        "message-id",
        "mime-version",
        "received",
        "reply-to",  # SendGrid refuses it as a header: a reply address is a field of its own there
        "return-path",
        "sender",
        "subject",
        "to",
        "x-sg-eid",
        "x-sg-id",
    }
)


_CONTROL = frozenset(chr(c) for c in (*range(0, 9), *range(10, 32), 127))  # tab is folding whitespace
# The same characters as one regex: a scan in C, since every message's List-Unsubscribe headers pass here.
_CONTROL_CHAR = re.compile("[" + "".join(re.escape(c) for c in sorted(_CONTROL)) + "]")


def _injects(text: str) -> bool:
    """CR, LF or another control character would end the header and start one of the sender's choosing."""
    # Every control character is unprintable: the usual header, all printable, skips the scan.
    return not text.isprintable() and _CONTROL_CHAR.search(text) is not None


@functools.lru_cache(maxsize=1024)
def _allowed_name(name: str) -> bool:
    """Decided once per name: every message of a campaign carries the same few."""
    return name.lower() not in RESERVED and not _injects(name) and ":" not in name


def ascii_domain(address: str) -> str:
    """`address` with its domain in Punycode (IDNA) when it is not ASCII: what any relay or API takes,
    where a domain in Unicode needs SMTPUTF8. A local part outside ASCII stays as it is."""
    if address.isascii():
        return address
    try:
        domain = validate_email(address, check_deliverability=False).ascii_domain
    except EmailNotValidError:  # its text quotes the address
        return address
    return f"{address.rpartition('@')[0]}@{domain}"


class CheckedHeaders(dict):
    """Headers already found to pass `extra_headers` (`checked_per_batch`): sent as they are."""

    __slots__ = ()


def extra_headers(headers: Mapping[str, str]) -> dict[str, str]:
    if type(headers) is CheckedHeaders:
        return headers
    return {name: value for name, value in headers.items() if _allowed_name(name) and not _injects(value)}


def checked_per_batch(headers_of: Callable[[str], dict[str, str]]) -> Callable[[str], dict[str, str]]:
    """`headers_of` (a batch's headers by message ID), its headers checked once for the batch rather
    than by the connector for each message (a scan of every value: 11,000 instructions an Email). Only
    for headers that differ from message to message by characters that cannot break a header (an
    unsubscribe link's base64url token): checked with a message ID of none, they stand for every one.
    Headers that do not all pass go unchecked, for `extra_headers` to sort out message by message."""
    sample = headers_of("")
    if extra_headers(sample) != sample:
        return headers_of
    return lambda message_id: CheckedHeaders(headers_of(message_id))
