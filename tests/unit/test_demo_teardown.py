"""The demo stopped part way (Ctrl-C, SIGTERM) posts no receipt to services on their way down."""

from __future__ import annotations

import asyncio

from sandbox.demo import stop_suite
from sandbox.providers import ProviderSandbox


class _Service:
    """Records what the sandbox providers were doing when it was told to stop."""

    def __init__(self, providers: ProviderSandbox, seen: list[tuple[bool, int]]) -> None:
        self._providers = providers
        self._seen = seen

    async def stop(self) -> None:
        self._seen.append((self._providers.receipts.enabled, self._providers.pending_receipts))


class _Runner:
    def __init__(self) -> None:
        self.cleaned = False

    async def cleanup(self) -> None:
        self.cleaned = True


async def test_receipts_stop_before_the_services_do() -> None:
    """The services used to stop first, the providers' pending receipts still posting to the receipts
    service gone meanwhile: each tried four times and logged "receipt given up after 4 attempts", dozens
    to hundreds of lines after a Ctrl-C mid-campaign."""
    providers = ProviderSandbox(receipts_url="http://127.0.0.1:9", receipt_delay_seconds=60)
    providers._courier.dispatch("sendgrid", [[object()]])  # a receipt waiting its turn to be posted
    assert providers.pending_receipts == 1
    seen: list[tuple[bool, int]] = []
    services = [_Service(providers, seen), _Service(providers, seen)]
    runners = _Runner(), _Runner()
    await stop_suite(services, providers, *runners)
    assert seen == [(False, 0), (False, 0)]
    assert all(runner.cleaned for runner in runners)
    await asyncio.sleep(0)
    assert providers.pending_receipts == 0
