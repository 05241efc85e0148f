"""Stopping a service's background tasks (Redis subscriptions, health watches, claim keepers) so that
a shutdown or a batch never waits on one for ever."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# A cancellation can be lost inside a library, and the task carry on as if none had come: on Python
# 3.11 `asyncio.wait_for` drops one that comes as what it waits for finishes. redis-py writes every
# command under it (libs/store.py now delivers those), aiosmtplib reads under it. Lost, a claim keeper
# never stopped and its batch hung; the config cache's listener never stopped and a dispatcher never
# exited on SIGTERM. The cancellation is repeated this often until the task ends.
RECANCEL_SECONDS = 0.25


async def stop_task(task: asyncio.Task, name: str, patience: float = 5.0) -> bool:
    """Cancels `task` and waits for it to end, cancelling it again while it runs on. True once it has
    ended; False (said in the log, by `name`) when it is still running after `patience` seconds, so that
    the caller goes on rather than hanging. The caller's own cancellation still stops the wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    tries = 0
    while not task.done():
        left = deadline - loop.time()
        task.cancel()
        tries += 1
        if left <= 0:
            # Out of patience (or given none), it still has one turn of the loop: a task that honours its
            # cancellation ends in it.
            await asyncio.sleep(0)
            if task.done():
                break
            times = "once" if tries == 1 else f"{tries} times"
            log.error("%s did not stop within %.1f s of being cancelled %s; left running", name, patience, times)
            return False
        await asyncio.wait((task,), timeout=min(RECANCEL_SECONDS, left))
    if tries > 1:
        log.warning("%s stopped only when cancelled %d times", name, tries)
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s ended on %s", name, type(task.exception()).__name__)
    return True


async def stop_tasks(tasks: list[asyncio.Task], name: str, patience: float = 5.0) -> None:
    """`stop_task` for each of `tasks`, cancelled all at once (a cancellation of the caller while it waits
    leaves none running) and given `patience` seconds in all, not each."""
    for task in tasks:
        task.cancel()
    loop = asyncio.get_running_loop()
    until = loop.time() + patience
    for task in tasks:
        await stop_task(task, name, patience=max(0.0, until - loop.time()))
