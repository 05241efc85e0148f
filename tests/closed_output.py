"""Standard output a pipe whose reader has gone, as `tokensend dispatch ... | head -1` leaves it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def closed_stdout() -> Iterator[None]:
    """Set within the test, not as a fixture: output capturing puts its own stdout back once the
    fixtures are set up."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = open(write_end, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below; each line sent
    captured, sys.stdout = sys.stdout, broken
    try:
        yield
    finally:
        sys.stdout = captured
        with contextlib.suppress(OSError):
            broken.close()
