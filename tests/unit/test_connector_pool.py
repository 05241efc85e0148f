"""The connector pool is shared by every workspace: evicting a client never closes it under a send."""

from __future__ import annotations

import asyncio

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import NotFound
from services.dispatcher import connector_pool
from services.dispatcher.connector_pool import ConnectorPool
from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus


class ClosingClient:
    """A client that, like SES's or SMTP's, cannot send once closed."""

    provider = "ses"
    max_batch = 1

    def __init__(self, built: list[ClosingClient]) -> None:
        self.closed = False
        self.release = asyncio.Event()
        self.release.set()
        built.append(self)

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        await self.release.wait()
        assert not self.closed, "sent through a closed client"
        return [SendOutcome(m.message_id, SendStatus.SENT) for m in messages]

    async def close(self) -> None:
        self.closed = True


class Store:
    async def load_for_call(self, workspace_id: str, connector_id: str) -> tuple[pb.Connector, str]:
        return pb.Connector(workspace_id=workspace_id, connector_id=connector_id), f"{workspace_id}/{connector_id}"


@pytest.fixture
def built(monkeypatch) -> list[ClosingClient]:
    made: list[ClosingClient] = []
    monkeypatch.setattr(connector_pool, "MAX_CLIENTS", 2)
    monkeypatch.setattr(connector_pool, "build_connector", lambda *_, **__: ClosingClient(made))
    return made


def message() -> OutboundMessage:
    return OutboundMessage(message_id="m1", anonymous_id="a1", campaign_id="c", campaign_instance_id="i", to="")


async def make_pool() -> ConnectorPool:
    return ConnectorPool(Store(), None, connector_pool.DispatcherSettings(dev_mode=True))  # type: ignore[arg-type]


async def test_a_client_evicted_mid_send_is_closed_only_once_the_send_is_done(built) -> None:
    pool = await make_pool()
    _, sending = await pool.get("acme", "ses")
    built[0].release.clear()
    under_way = asyncio.create_task(sending.send([message()]))
    await asyncio.sleep(0)
    for n in range(3):  # another brand's connectors push it out of the pool
        await pool.get("globex", f"c{n}")
    assert not built[0].closed
    built[0].release.set()
    assert (await under_way)[0].status is SendStatus.SENT
    assert built[0].closed  # idle now: closed


async def test_a_call_holding_an_evicted_client_sends_through_a_new_one_closed_when_idle(built) -> None:
    pool = await make_pool()
    _, held = await pool.get("acme", "ses")
    for n in range(3):
        await pool.get("globex", f"c{n}")
    assert built[0].closed  # evicted while idle
    assert (await held.send([message()]))[0].status is SendStatus.SENT
    assert built[-1].closed and len(built) == 5  # built anew for the send, closed after it
    await pool.close()
    assert all(client.closed for client in built)


class DeletingStore(Store):
    """A store whose connectors can be deleted, as another process would."""

    def __init__(self) -> None:
        self.deleted: set[tuple[str, str]] = set()

    async def load_for_call(self, workspace_id: str, connector_id: str) -> tuple[pb.Connector, str]:
        if (workspace_id, connector_id) in self.deleted:
            raise NotFound(f"no connector {connector_id!r}")
        return await super().load_for_call(workspace_id, connector_id)


async def test_a_deleted_connectors_client_is_closed_once_idle_and_the_others_stay(built) -> None:
    pool = await make_pool()
    _, deleted = await pool.get("acme", "ses")
    _, kept = await pool.get("acme", "smtp")
    built[0].release.clear()
    under_way = asyncio.create_task(deleted.send([message()]))
    await asyncio.sleep(0)
    await pool.forget("acme", "ses")
    assert not built[0].closed  # not under a send
    built[0].release.set()
    assert (await under_way)[0].status is SendStatus.SENT
    assert built[0].closed and not built[1].closed
    _, again = await pool.get("acme", "ses")
    assert again is not deleted  # a connector saved again gets a client of its own


async def test_a_connector_deleted_elsewhere_is_forgotten_when_next_asked_for(built) -> None:
    store = DeletingStore()
    pool = ConnectorPool(store, None, connector_pool.DispatcherSettings(dev_mode=True))  # type: ignore[arg-type]
    await pool.get("acme", "ses")
    store.deleted.add(("acme", "ses"))
    with pytest.raises(NotFound):
        await pool.get("acme", "ses")
    assert built[0].closed
