"""The one rule for an anonymous ID, applied alike by the dispatcher and the resolver.

1-256 visible characters: none is whitespace (what `str.isspace()` finds) or a control
character (C0, DEL, C1). An ID that breaks it never reaches a PII API.
"""

from __future__ import annotations

import re

INVALID_ID_MESSAGE = "Invalid/empty customer identifier in the workspace."  # the reference product's text
RULE = "must be 1-256 visible characters"

_ANONYMOUS_ID = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]{1,256}")


def valid_anonymous_id(value: str) -> bool:
    return _ANONYMOUS_ID.fullmatch(value) is not None
