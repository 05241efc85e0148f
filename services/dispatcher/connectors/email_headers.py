"""Extra email headers a message carries (List-Unsubscribe, List-Unsubscribe-Post ...).

Headers that define the envelope, the addresses or the MIME structure are ours
to write: a campaign header named `Bcc` or `Content-Type` is dropped rather
than sent (SendGrid would refuse the whole request of 1,000 for one of them).
So is a header whose name or value holds CR, LF or another control character
(header injection).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

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
    return _CONTROL_CHAR.search(text) is not None


@functools.lru_cache(maxsize=1024)
def _allowed_name(name: str) -> bool:
    """Decided once per name: every message of a campaign carries the same few."""
    return name.lower() not in RESERVED and not _injects(name) and ":" not in name


def extra_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if _allowed_name(name) and not _injects(value)}
