"""StoreWatch (libs/server.py): health turns NOT_SERVING after two failed Redis pings in a row,
SERVING at the next answer, and a service shutting down is never turned back to SERVING."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from libs.server import GrpcService, StoreWatch

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class FakeStore:
    def __init__(self) -> None:
        self.up = True

    async def ping(self) -> bool:
        if not self.up:
            raise ConnectionError("refused")
        return True


class FakeHealth:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def set(self, name: str, status: int) -> None:
        self.calls.append(("set", name, status))

    async def enter_graceful_shutdown(self) -> None:
        self.calls.append(("graceful",))


class FakeServer:
    async def stop(self, grace: float) -> None:
        pass


async def test_two_failed_pings_in_a_row_turn_health_not_serving_and_an_answer_back() -> None:
    store, health = FakeStore(), FakeHealth()
    watch = StoreWatch(store, health, ["svc.A"], interval=1.0)
    store.up = False
    await watch.check()
    assert health.calls == []  # one failure is not an outage
    await watch.check()
    assert health.calls == [("set", "", NOT_SERVING), ("set", "svc.A", NOT_SERVING)]
    await watch.check()
    assert len(health.calls) == 2  # said once
    store.up = True
    await watch.check()
    assert health.calls[2:] == [("set", "", SERVING), ("set", "svc.A", SERVING)]


async def test_a_failure_between_answers_does_not_count_towards_an_outage() -> None:
    store, health = FakeStore(), FakeHealth()
    watch = StoreWatch(store, health, [], interval=1.0)
    for up in (False, True, False, True):
        store.up = up
        await watch.check()
    assert health.calls == []


async def test_a_ping_that_hangs_counts_as_a_failure() -> None:
    class Hanging(FakeStore):
        async def ping(self) -> bool:
            await asyncio.sleep(10)
            return True

    health = FakeHealth()
    watch = StoreWatch(Hanging(), health, [], interval=0.05)  # the ping's timeout is the interval when shorter
    await watch.check()
    await watch.check()
    assert health.calls == [("set", "", NOT_SERVING)]


async def test_stopping_cancels_the_watch_before_health_turns_not_serving() -> None:
    store, health = FakeStore(), FakeHealth()
    watch = StoreWatch(store, health, [], interval=0.01)
    store.up = False
    service = GrpcService(FakeServer(), 1, health, [], [], asyncio.create_task(watch.run()))
    while not health.calls:
        await asyncio.sleep(0.01)
    store.up = True  # the next ping would say SERVING
    await service.stop(0)
    await asyncio.sleep(0.05)
    assert health.calls[-1] == ("graceful",)
    assert service.store_watch is None
