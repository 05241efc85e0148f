"""Logging setup shared by the services."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from libs.telemetry import install_log_scrubbing


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    install_log_scrubbing()
    # aiohttp's access log quotes URLs; botocore logs whole request bodies (recipients) at DEBUG;
    # pyreqwest can pass on reqwest's and hyper's debug logs, which quote URLs.
    for name in (
        "aiohttp.access",
        "botocore",
        "aiobotocore",
        "boto3",
        "urllib3",
        "pyreqwest",
        "reqwest",
        "hyper",
        "hyper_util",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


class LogThrottle:
    """Keeps a line that a peer or a stored record can repeat at will (every receipt of a connector that
    does not open, every list call meeting one) to one per key every `seconds`: `due(key)` is None while
    held back, else how many were held back since the last one, for the line to say."""

    def __init__(self, seconds: float, *, keys: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._keys = keys
        self._clock = clock
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # key -> (logged at, held since)

    def due(self, key: Hashable = None) -> int | None:
        now = self._clock()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self._seconds:
            self._last[key] = (entry[0], entry[1] + 1)
            return None
        held = entry[1] if entry is not None else 0
        self._last.pop(key, None)
        self._last[key] = (now, 0)
        while len(self._last) > self._keys:  # the oldest key forgotten: at worst logged again
            self._last.popitem(last=False)
        return held

    def log(self, key: Hashable, logger: logging.Logger, level: int, message: str, *args: object) -> None:
        """Logs `message` (%-style, with `args`) unless held back for `key`, saying how many were held since."""
        held = self.due(key)
        if held is not None:
            since = f" ({held} more since the last line)" if held else ""
            logger.log(level, message + "%s", *args, since, stacklevel=2)
