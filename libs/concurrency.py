"""How many outbound calls a process makes at once: so many in all, and at most a share of them for any
one workspace. The resolver bounds its PII API calls with it, the dispatcher its provider sends.

A brand whose API or provider hangs until its timeout would otherwise take every place, and every
other brand's calls would wait behind it. Capped per workspace, it holds its share and the others
still go out. The workspace is the unit, not the API: in the resolver a brand's PII APIs, content
APIs and Test screen calls (to any URL) all count against one share, in the dispatcher all its
connectors' sends, so no brand holds more by having several of them hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from opentelemetry.metrics import CallbackOptions, Observation


class _Share:
    """A workspace's places, while any of its calls holds or waits for one."""

    __slots__ = ("held", "queue", "waiting")

    def __init__(self) -> None:
        self.held = 0  # places its calls hold, those waiting for one of the process's included
        self.queue: deque[asyncio.Future[None]] | None = None  # calls waiting for one of its places, in turn
        self.waiting = 0  # calls waiting for a place, either kind


class ConcurrentCalls:
    """Places for calls: `total` in the process, at most `per_workspace` held by one workspace's
    calls. A call takes its workspace's place first, then one of the process's, so the calls a hung
    API has beyond its share wait on their own workspace and never queue before other brands'.

    The workspace's places are counted, not an `asyncio.Semaphore` each: a call that need not wait
    (most) costs two comparisons more than the process's semaphore alone, where a semaphore made and
    taken per workspace cost 3.7 µs a call."""

    def __init__(
        self, total: int, per_workspace: int, calls: str = "concurrent calls", process: str = "the process's"
    ) -> None:
        """`calls` and `process` name the places in a wait's "before one of ... was free": "concurrent
        PII API calls" and "the resolver's" there."""
        self.total = total
        self.per_workspace = per_workspace
        self._calls = calls
        self._process_name = process
        self._process = asyncio.Semaphore(total)
        # Only workspaces with a call holding or waiting for a place have a share: one that stops
        # calling (a config deleted, a Test screen's one-off URL) leaves nothing behind.
        self._shares: dict[str, _Share] = {}

    async def enter(self, workspace_id: str, within: float | None) -> str | None:
        """Takes a place for one of `workspace_id`'s calls (the caller `leave`s it), waiting at most
        `within` seconds (None: as long as it takes). None once taken; when the time runs out first,
        which places were all held, for the call's error."""
        share = self._shares.get(workspace_id)
        if share is None:
            share = self._shares[workspace_id] = _Share()
        if share.held < self.per_workspace and not share.queue and not self._process.locked():
            share.held += 1
            await self._process.acquire()  # free: taken at once
            return None
        return await self._wait(workspace_id, share, within)

    def leave(self, workspace_id: str) -> None:
        """Gives back the place a call of `workspace_id` took."""
        self._process.release()
        share = self._shares[workspace_id]
        if share.held == 1 and not share.waiting:  # the workspace's only call: forgotten at once
            del self._shares[workspace_id]
        else:
            self._give_back(workspace_id, share)

    def waiting(self) -> dict[str, int]:
        """Calls waiting for a place, by workspace; workspaces with none left out."""
        # Read in the metric reader's thread while the event loop's changes them: from a copy (made at once).
        return {ws: share.waiting for ws, share in self._shares.copy().items() if share.waiting}

    def observe_waiting(self, _options: CallbackOptions) -> list[Observation]:
        """`waiting` as a gauge's observations, by `tokensend.workspace_id` (one 0 when none wait): the
        resolver's `tokensend.pii_api.waiting` and the dispatcher's `tokensend.sends.waiting` alike."""
        waiting = self.waiting()
        return [Observation(n, {"tokensend.workspace_id": ws}) for ws, n in waiting.items()] or [Observation(0)]

    async def _wait(self, workspace_id: str, share: _Share, within: float | None) -> str | None:
        loop = asyncio.get_running_loop()
        held = taken = False
        share.waiting += 1
        try:
            # One deadline for both waits: time spent on the workspace's places is the caller's too.
            async with asyncio.timeout_at(None if within is None else loop.time() + within):
                if share.held < self.per_workspace and not share.queue:
                    share.held += 1
                    held = True
                else:
                    place: asyncio.Future[None] = loop.create_future()
                    if share.queue is None:
                        share.queue = deque()
                    share.queue.append(place)
                    try:
                        await place
                    except BaseException:
                        if place.done() and not place.cancelled():
                            held = True  # handed a place just as the wait ended: passed on below
                        else:
                            place.cancel()
                            with contextlib.suppress(ValueError):  # unless a call leaving dropped it
                                share.queue.remove(place)
                        raise
                    held = True
                await self._process.acquire()
                taken = True
        except TimeoutError:
            if held:
                return f"before one of {self._process_name} {self.total} {self._calls} was free"
            return f"before one of its workspace's {self.per_workspace} {self._calls} was free"
        finally:
            share.waiting -= 1
            if held and not taken:
                self._give_back(workspace_id, share)
            elif not share.held and not share.waiting:
                self._forget(workspace_id, share)
        return None

    def _give_back(self, workspace_id: str, share: _Share) -> None:
        queue = share.queue
        while queue:
            place = queue.popleft()
            if not place.done():  # not given up by its call
                place.set_result(None)  # the place goes to the next call in turn: still the workspace's
                return
        share.held -= 1
        if not share.held and not share.waiting:
            self._forget(workspace_id, share)

    def _forget(self, workspace_id: str, share: _Share) -> None:
        if self._shares.get(workspace_id) is share:
            del self._shares[workspace_id]
