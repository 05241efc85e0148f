"""Secrets read back masked, and saved (or tested) again: what the mask stands for, and where it may go."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from libs.errors import require

MASK = "********"


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
        where = f"{field}['{name}']"
        kept = stored.get(name.lower() if any_case else name)
        require(kept is not None, where, "is masked (********) but no saved value stands behind it: enter it")
        require(not moved, where, f"is masked, and {moved}: enter it")
        secrets[name] = kept
