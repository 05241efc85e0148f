"""The shape of the IDs the services take from callers (workspaces, campaigns, configs, connectors):
short, printable, safe inside Redis keys and metric labels."""

from __future__ import annotations

import re

MAX_ID_LENGTH = 128
_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{MAX_ID_LENGTH - 1}}}\Z")
# How an error words the shape, naming the field before it.
ID_RULE = (
    f"must be 1-{MAX_ID_LENGTH} characters of letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
)


def is_id(value: str) -> bool:
    return _ID.match(value) is not None
