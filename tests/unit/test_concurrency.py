"""libs/concurrency.py: a workspace's calls hold at most its share of the process's places,
a wait ends at the caller's deadline saying which places were held, and nothing is kept of a
workspace with no call holding or waiting for a place."""

from __future__ import annotations

import asyncio

import pytest

from libs.concurrency import ConcurrentCalls, _Share


async def holding(calls: ConcurrentCalls, workspace_id: str, n: int) -> None:
    for _ in range(n):
        assert await calls.enter(workspace_id, None) is None


async def test_a_workspace_holds_at_most_its_share_and_another_still_gets_a_place() -> None:
    calls = ConcurrentCalls(total=4, per_workspace=2)
    await holding(calls, "hung", 2)
    assert await calls.enter("hung", 0.05) == "before one of its workspace's 2 concurrent calls was free"
    assert await calls.enter("other", 0.05) is None  # at once: two of the process's four are free
    assert await calls.enter("other", 0.05) is None


async def test_calls_of_one_workspace_waiting_beyond_its_share_do_not_queue_before_another_workspaces() -> None:
    calls = ConcurrentCalls(total=3, per_workspace=2)
    await holding(calls, "hung", 2)
    beyond = [asyncio.ensure_future(calls.enter("hung", None)) for _ in range(5)]
    await asyncio.sleep(0)
    assert calls.waiting() == {"hung": 5}
    assert await calls.enter("other", 0.05) is None
    for waiter in beyond:
        waiter.cancel()
    await asyncio.gather(*beyond, return_exceptions=True)
    assert calls.waiting() == {}


async def test_a_wait_for_the_processs_places_names_them() -> None:
    calls = ConcurrentCalls(total=2, per_workspace=1)
    await holding(calls, "a", 1)
    await holding(calls, "b", 1)
    assert await calls.enter("c", 0.05) == "before one of the process's 2 concurrent calls was free"
    assert calls.waiting() == {}  # its workspace's place, taken while it waited, is given back
    calls.leave("a")
    assert await calls.enter("c", 0.05) is None


async def test_a_wait_names_the_places_as_its_service_calls_them() -> None:
    calls = ConcurrentCalls(total=2, per_workspace=1, calls="concurrent PII API calls", process="the resolver's")
    await holding(calls, "a", 1)
    assert await calls.enter("a", 0.01) == "before one of its workspace's 1 concurrent PII API calls was free"
    await holding(calls, "b", 1)
    assert await calls.enter("c", 0.01) == "before one of the resolver's 2 concurrent PII API calls was free"


async def test_a_place_given_back_goes_to_the_workspaces_next_waiting_call() -> None:
    calls = ConcurrentCalls(total=4, per_workspace=1)
    await holding(calls, "a", 1)
    waiting = asyncio.ensure_future(calls.enter("a", 1.0))
    await asyncio.sleep(0)
    assert calls.waiting() == {"a": 1}
    calls.leave("a")
    assert await waiting is None
    assert calls.waiting() == {}


@pytest.mark.parametrize("within", [None, 0.05])
async def test_nothing_is_kept_of_a_workspace_once_its_calls_are_done(within: float | None) -> None:
    """Held, timed out or cancelled: a workspace that stops calling (a deleted config, a Test screen's
    one-off URL) leaves no share behind, however many workspaces called."""
    calls = ConcurrentCalls(total=2, per_workspace=1)
    for n in range(1000):
        assert await calls.enter(f"ws-{n}", within) is None
        calls.leave(f"ws-{n}")
    await holding(calls, "a", 1)
    assert await calls.enter("a", 0.01) is not None  # out of time
    cancelled = asyncio.ensure_future(calls.enter("a", within))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    calls.leave("a")
    assert calls._shares == {}
    await holding(calls, "b", 1)  # every place given back: the process's two are free
    await holding(calls, "c", 1)


async def test_a_call_cancelled_while_waiting_for_the_processs_place_gives_back_its_workspaces() -> None:
    calls = ConcurrentCalls(total=1, per_workspace=1)
    await holding(calls, "a", 1)
    cancelled = asyncio.ensure_future(calls.enter("b", None))
    await asyncio.sleep(0)
    assert calls.waiting() == {"b": 1}
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    calls.leave("a")
    assert await calls.enter("b", 0.05) is None  # b's one place was not kept by the cancelled call


async def test_one_deadline_covers_the_wait_for_the_workspaces_place_and_the_processs() -> None:
    calls = ConcurrentCalls(total=2, per_workspace=1)
    await holding(calls, "a", 1)
    await holding(calls, "b", 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    second = asyncio.ensure_future(calls.enter("b", 0.3))
    await asyncio.sleep(0.15)
    calls.leave("b")  # b's place goes to its second call, the process's to another workspace first
    await holding(calls, "c", 1)
    assert await second == "before one of the process's 2 concurrent calls was free"
    assert loop.time() - started < 0.4  # 0.3 s in all, not 0.3 s more once b's place came
    assert calls.waiting() == {}
    calls.leave("a")
    assert await calls.enter("b", 0.01) is None  # the workspace's place it had is given back


async def test_a_place_handed_to_a_call_cancelled_before_it_ran_goes_to_the_next() -> None:
    calls = ConcurrentCalls(total=4, per_workspace=1)
    await holding(calls, "a", 1)
    first = asyncio.ensure_future(calls.enter("a", None))
    second = asyncio.ensure_future(calls.enter("a", 1.0))
    await asyncio.sleep(0)
    calls.leave("a")  # handed to `first`, which is then cancelled before it runs
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert await second is None
    calls.leave("a")
    assert calls._shares == {}


async def test_a_workspace_whose_last_holder_leaves_while_its_waiting_call_is_being_cancelled_is_forgotten() -> None:
    calls = ConcurrentCalls(total=4, per_workspace=1)
    await holding(calls, "a", 1)
    waiting = asyncio.ensure_future(calls.enter("a", None))
    await asyncio.sleep(0)
    waiting.cancel()
    calls.leave("a")  # before the cancelled call has run: nothing to hand it
    await asyncio.gather(waiting, return_exceptions=True)
    assert calls._shares == {}


def test_the_waiting_gauge_reads_the_workspaces_while_the_event_loop_changes_them() -> None:
    """The metric reader calls `waiting` from its own thread, between any two steps of the event loop's."""
    calls = ConcurrentCalls(total=4, per_workspace=1)

    class ReadMidway:
        held = 1

        @property
        def waiting(self) -> int:
            calls._shares["another"] = _Share()  # the event loop's thread, a call entering meanwhile
            return 1

    calls._shares["slow"] = ReadMidway()  # type: ignore[assignment]
    assert calls.waiting() == {"slow": 1}
