"""Extra email headers a campaign may set (List-Unsubscribe, Reply-To ...).

Headers that define the envelope, the addresses or the MIME structure are ours
to write: a campaign header named `Bcc` or `Content-Type` is dropped rather
than sent (SendGrid would refuse the whole request of 1,000 for one of them).
"""

from __future__ import annotations

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
        "return-path",
        "sender",
        "subject",
        "to",
        "x-sg-eid",
        "x-sg-id",
    }
)


def extra_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() not in RESERVED}
