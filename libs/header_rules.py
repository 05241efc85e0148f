"""What an HTTP header a brand configures may hold: the rules the resolver's PII API configs and the
dispatcher's custom HTTP connectors share."""

from __future__ import annotations

import re

# RFC 9110's token, at most 128 characters.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")
# What the HTTP clients refuse to write into a header (or a URL): saved, such a value would fail every call.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A name that is no header name is often a whole line pasted in ("Authorization: Bearer ..."): the map is
# named, never the name, which may hold the secret.
BAD_HEADER_NAME = (
    "holds a name that is not a header name (1-128 letters, digits or !#$%&'*+.^_`|~-): put the value apart"
)
# Headers the HTTP client writes from the request itself (its host, its body, its connection): configured,
# they would cut every body short, break every request, or send it to another virtual host.
CLIENT_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "proxy-authorization",
        "proxy-connection",
    }
)
