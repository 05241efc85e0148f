"""A provider that cannot be reached is tried as one message would be, whatever the messages waiting on it.

A connector is shared by every batch sent through its saved connector. When its provider cannot be
reached at all (connections refused, a host that never answers the connect), each message retrying on
its own costs the provider's whole retry budget per message: a blackholed host, 40 s and more each,
for every message of every batch. `ConnectCircuit` makes those retries the connector's instead. The
SMTP connector passes its sessions through it, the HTTP connectors their requests.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from services.dispatcher.connectors.http_retry import RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Outage:
    code: str  # the failure's code (CONNECTION_FAILED, SMTP_421 ...), which every waiting message fails with
    text: str
    until: float  # monotonic


class GivenUp(Exception):
    """The provider is given up on (`ConnectCircuit`): no attempt was made."""

    def __init__(self, outage: Outage) -> None:
        super().__init__(outage.code)
        self.outage = outage


class ConnectCircuit:
    """What a connector's batches know of reaching its provider, shared by all of them.

    While the provider answers, attempts go side by side. After a failure to reach it (and, unless
    `answering`, before the connector's first attempt), attempts go one at a time, each
    after the backoff the failures in a row have earned: the provider gets the retries of one message,
    not of every message of every batch. Once `max_retries` + 1 attempts in a row failed, the provider is
    given up on for `hold_seconds`: the messages that would try it meanwhile fail at once with the same
    code, unsent. The next try after that starts a new round of retries. `name` says whose attempts the
    log lines count.

    `answering`: whether the connector's first attempts go side by side. An SMTP session opens in a
    moment and is then kept, so the first goes alone; an HTTP request is a whole exchange, and queueing
    every request behind a healthy provider's first reply would cost each new connector that reply's time.
    """

    def __init__(self, retry: RetryPolicy, rng: random.Random, name: str, *, answering: bool = False) -> None:
        self._retry = retry
        self._rng = rng
        self._name = name
        # As long as one more retry may take: its backoff and its connect timeout. A failure older than that
        # ended a round of retries nobody continued.
        self.hold_seconds = retry.connect_timeout_seconds + retry.cap_seconds
        self._gate = asyncio.Lock()
        self.answering = answering  # the last attempt reached the provider
        self._failures = 0  # attempts failed in a row
        self._last_failure = 0.0
        self._retry_at: float | None = None  # when the next attempt may start, after a failure
        self._outage: Outage | None = None

    def outage(self) -> Outage | None:
        """The outage standing, if any; one that has run its time is forgotten with its failures."""
        outage = self._outage
        if outage is not None and time.monotonic() >= outage.until:
            self._outage = None
            self._failures = 0
            self._retry_at = None
            return None
        return outage

    def backoff(self) -> float | None:
        """Seconds the next attempt waits for the backoff the last failure earned, or None when it need not."""
        retry_at, self._retry_at = self._retry_at, None
        if self._failures and time.monotonic() - self._last_failure > self.hold_seconds:
            self._failures = 0
            return None
        return None if retry_at is None else max(0.0, retry_at - time.monotonic())

    async def attempt(self, sleep: Callable[[float], Awaitable[None]], attempt: Callable[[bool], Awaitable[T]]) -> T:
        """`attempt(side_by_side)` through the circuit: side by side while the provider answers, else alone
        under a lock, once the backoff the failures in a row earned has passed. Raises GivenUp, without
        trying, while the provider is given up on. `attempt` reports its end (`opened`, `failed`)."""
        if not self.answering:
            async with self._gate:
                if not self.answering:
                    outage = self.outage()
                    if outage is not None:
                        raise GivenUp(outage)
                    delay = self.backoff()
                    if delay is not None:
                        await sleep(delay)
                    return await attempt(False)
        return await attempt(True)

    def opened(self) -> None:
        self.answering = True
        self._failures = 0
        self._retry_at = None

    def failed(self, code: str, text: str, *, side_by_side: bool = False) -> Outage | None:
        """Counts a failed attempt; the outage it declares when it spent the retries.

        `side_by_side`: the attempt went out beside others while the provider answered. They fail
        together when it goes away, a hundred at once: the first of them counts, the rest only close the
        gate, and the tries after it count one by one.
        """
        self.answering = False
        standing = self.outage()
        if standing is not None:  # an attempt made side by side with the one that spent them
            return standing
        if side_by_side and self._failures:
            return None
        now = time.monotonic()
        self._failures += 1
        self._last_failure = now
        failures = self._failures
        if failures > self._retry.max_retries:
            self._outage = Outage(code, f"{text} after {failures} attempts", now + self.hold_seconds)
            self._retry_at = None
            log.warning(
                "%s not reached in %d attempts (%s); its messages fail unsent for %.0fs",
                self._name,
                failures,
                code,
                self.hold_seconds,
            )
            return self._outage
        delay = self._retry.delay(failures, self._rng)
        self._retry_at = now + delay
        log.info("%s connection attempt %d failed (%s); next one in %.2fs", self._name, failures, code, delay)
        return None
