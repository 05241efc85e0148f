"""A DispatchStream's batch tasks that the call no longer waits for end quietly."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from services.dispatcher.servicer import dismiss, parts_until


async def failed_task() -> asyncio.Task:
    async def fail() -> None:
        raise ConnectionError("the store went away")

    task = asyncio.create_task(fail())
    await asyncio.sleep(0)
    assert task.done()
    return task


def never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    return [r.getMessage() for r in caplog.records if "exception was never retrieved" in r.getMessage()]


async def test_a_failed_task_dismissed_is_not_logged_when_collected(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    task = await failed_task()
    dismiss(task)
    del task
    assert never_retrieved(caplog) == []


async def test_a_failed_task_left_alone_would_be(caplog) -> None:
    """What `dismiss` prevents: asyncio logs the error, traceback and all, outside any scrubbing scope."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    task = await failed_task()
    del task
    assert len(never_retrieved(caplog)) == 1


async def test_a_running_task_dismissed_is_cancelled() -> None:
    task = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    dismiss(task)
    with pytest.raises(asyncio.CancelledError):
        await task
    dismiss(task)  # a cancelled one is left as it is
    assert task.cancelled()


class SlowClient:
    """A caller's parts: the next one comes only when `end` is set, and then the stream ends."""

    def __init__(self) -> None:
        self.end = asyncio.Event()

    def __aiter__(self) -> SlowClient:
        return self

    async def __anext__(self) -> str:
        await self.end.wait()
        raise StopAsyncIteration


async def test_the_read_in_flight_when_a_stream_is_cancelled_ends_quietly(caplog) -> None:
    """A caller gone mid-stream cancels the handler while it waits for the next part: the read it had begun
    must not end later on its own with an error that asyncio logs."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    client = SlowClient()

    async def handler() -> None:
        async for _ in parts_until(client, asyncio.Event()):
            pass

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    client.end.set()  # what the caller's iterator does once the call is torn down
    await asyncio.sleep(0.05)
    assert never_retrieved(caplog) == []
