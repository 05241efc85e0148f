"""SNS signing certificate fetches: made-up certificate URLs on an SNS host must not hold the webhook intake."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from services.receipts.errors import SignatureInvalid, UpstreamUnavailable
from services.receipts.sns import MAX_FETCHES_IN_FLIGHT, SnsCertificates
from tests.integration.test_receipts_harness import (
    Pii,
    SnsPeer,
    put_messages,
    receipts_settings,
    running_receipts,
    sendgrid_event,
    ses_message,
    shared_sns_signer,
    sns_notification,
)

pytestmark = pytest.mark.integration

WAIT = 20  # seconds: only reached when a request is queued behind a held fetch (the defect)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def certificates(redis_url: str, **overrides: Any) -> AsyncIterator[tuple[SnsCertificates, SnsPeer, Clock]]:
    with tempfile.TemporaryDirectory() as directory:
        peer = SnsPeer(shared_sns_signer(), directory)
        await peer.start()
        settings = receipts_settings(redis_url, peer, sns_fetch_timeout_seconds=60, **overrides)
        clock = Clock()
        try:
            async with aiohttp.ClientSession() as http:
                yield SnsCertificates(settings, http, clock=clock), peer, clock
        finally:
            for gate in peer.held.values():  # a failed test must not leave the peer's handlers waiting
                gate.set()
            await peer.stop()


def cert_path(name: str) -> str:
    return f"/SimpleNotificationService-{name}.pem"


async def arrived(peer: SnsPeer, path: str, count: int = 1) -> None:
    """Until the peer has seen `count` requests for `path` (it holds them)."""
    async with asyncio.timeout(WAIT):
        while peer.count(path) < count:
            await asyncio.sleep(0.01)


async def test_a_stalled_certificate_fetch_does_not_hold_another_urls_fetch(redis_url):
    async with certificates(redis_url) as (certs, peer, _):
        peer.held[cert_path("slow")] = gate = asyncio.Event()
        slow = asyncio.create_task(certs.public_key(peer.base + cert_path("slow")))
        await arrived(peer, cert_path("slow"))
        key = await asyncio.wait_for(certs.public_key(peer.base + cert_path("other")), WAIT)
        assert key.public_numbers() == peer.signer.cert.public_key().public_numbers()
        assert not slow.done()
        gate.set()
        assert (await slow).public_numbers() == key.public_numbers()


async def test_concurrent_requests_for_one_url_share_one_fetch(redis_url):
    async with certificates(redis_url) as (certs, peer, _):
        peer.held[cert_path("shared")] = gate = asyncio.Event()
        waiting = [asyncio.create_task(certs.public_key(peer.base + cert_path("shared"))) for _ in range(8)]
        await arrived(peer, cert_path("shared"))
        await asyncio.sleep(0)
        assert not any(task.done() for task in waiting)  # none refused: they wait for the fetch in flight
        gate.set()
        keys = await asyncio.gather(*waiting)
        assert len({k.public_numbers() for k in keys}) == 1
        assert peer.count(cert_path("shared")) == 1


async def test_a_requester_going_away_does_not_cancel_the_fetch_others_wait_for(redis_url):
    async with certificates(redis_url) as (certs, peer, _):
        peer.held[cert_path("shared")] = gate = asyncio.Event()
        first = asyncio.create_task(certs.public_key(peer.base + cert_path("shared")))
        second = asyncio.create_task(certs.public_key(peer.base + cert_path("shared")))
        await arrived(peer, cert_path("shared"))
        first.cancel()
        gate.set()
        assert await asyncio.wait_for(second, WAIT)
        await asyncio.gather(first, return_exceptions=True)
        assert first.cancelled()
        assert peer.count(cert_path("shared")) == 1


async def test_fetches_past_the_limit_are_refused_at_once_not_queued(redis_url):
    async with certificates(redis_url) as (certs, peer, _):
        gate = asyncio.Event()
        names = [f"made-up-{i}" for i in range(MAX_FETCHES_IN_FLIGHT + 5)]
        for name in names:
            peer.held[cert_path(name)] = gate
        tasks = [asyncio.create_task(certs.public_key(peer.base + cert_path(name))) for name in names]
        fetching, refused = tasks[:MAX_FETCHES_IN_FLIGHT], tasks[MAX_FETCHES_IN_FLIGHT:]
        for task in refused:  # while every fetch in flight is still held
            with pytest.raises(UpstreamUnavailable):
                await asyncio.wait_for(task, WAIT)
        assert not any(task.done() for task in fetching)
        gate.set()
        await asyncio.gather(*fetching)
        assert len(peer.requests) == MAX_FETCHES_IN_FLIGHT  # the refused URLs were never fetched
        # The slots are free again: a refused URL is fetched when SNS sends again.
        assert await certs.public_key(peer.base + cert_path(names[-1]))


async def test_a_url_whose_fetch_failed_is_refused_for_a_while_without_fetching_again(redis_url):
    async with certificates(redis_url) as (certs, peer, clock):
        missing = cert_path("missing")
        peer.statuses[missing] = 404
        for _ in range(3):
            with pytest.raises(UpstreamUnavailable):
                await certs.public_key(peer.base + missing)
        assert peer.count(missing) == 1
        clock.now += 60
        del peer.statuses[missing]
        assert await certs.public_key(peer.base + missing)
        assert peer.count(missing) == 2


async def test_a_refused_certificate_stays_refused_with_the_same_error(redis_url):
    async with certificates(redis_url) as (certs, peer, _):
        bad = cert_path("not-a-certificate")
        peer.statuses[bad] = 200  # an empty body: not a PEM certificate
        for _ in range(2):
            with pytest.raises(SignatureInvalid, match="not a PEM certificate"):
                await certs.public_key(peer.base + bad)
        assert peer.count(bad) == 1


async def test_remembered_failures_are_bounded(redis_url):
    async with certificates(redis_url) as (certs, peer, _):
        for i in range(certs.failures_kept + 3):
            peer.statuses[cert_path(f"gone-{i}")] = 404
            with pytest.raises(UpstreamUnavailable):
                await certs.public_key(peer.base + cert_path(f"gone-{i}"))
        assert certs.failures_remembered() == certs.failures_kept


# --- through the webhook ------------------------------------------------------------------------


async def test_made_up_certificate_urls_get_503_at_once_and_other_receipts_go_through(redis, redis_url):
    async with running_receipts(redis, redis_url, sns_fetch_timeout_seconds=60) as receipts:
        gate = asyncio.Event()
        pii = Pii.new()
        [record] = await put_messages(redis, "ses", 1)
        envelope = sns_notification(ses_message("Delivery", pii, message_id=record.message_id), pii)
        posts = []
        for i in range(MAX_FETCHES_IN_FLIGHT + 6):
            path = cert_path(f"attack-{i}")
            receipts.sns.held[path] = gate
            signed = receipts.sns.sign(envelope, cert_url=receipts.sns.base + path)
            posts.append(asyncio.create_task(receipts.post("ses", json.dumps(signed).encode())))
        await arrived(receipts.sns, "/SimpleNotificationService-attack-", MAX_FETCHES_IN_FLIGHT)
        done, _ = await asyncio.wait(posts, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        assert done, "every made-up certificate URL queued behind the held fetches"
        [sg_record] = await put_messages(redis, "sendgrid", 1)
        reply = await asyncio.wait_for(
            receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=sg_record.message_id)]), WAIT
        )
        assert reply.status == 200
        gate.set()
        replies = await asyncio.gather(*posts)
        assert sorted(r.status for r in replies) == [200] * MAX_FETCHES_IN_FLIGHT + [503] * 6
        assert receipts.sns.count("/SimpleNotificationService-attack-") == MAX_FETCHES_IN_FLIGHT


@pytest.mark.parametrize("cert_url", [["https://sns.us-east-1.amazonaws.com/x.pem"], {"url": "x.pem"}, 7])
async def test_a_signing_cert_url_that_is_not_a_string_is_malformed_not_missing(receipts_fixture, cert_url):
    pii = Pii.new()
    envelope = sns_notification(ses_message("Delivery", pii, message_id="m"), pii)
    signed: dict[str, Any] = receipts_fixture.sns.sign(envelope)
    signed["SigningCertURL"] = cert_url
    reply = await receipts_fixture.post("ses", json.dumps(signed).encode())
    assert reply.status == 400
    assert "SigningCertURL" in json.dumps(reply.body)
    assert "missing" not in json.dumps(reply.body)
    assert receipts_fixture.sns.requests == []


@pytest.fixture
async def receipts_fixture(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


async def test_a_fetch_after_the_http_session_closed_is_unavailable_not_an_internal_error(redis_url):
    async with certificates(redis_url) as (certs, peer, _):
        await certs._http.close()  # shutting down
        with pytest.raises(UpstreamUnavailable):
            await certs.public_key(peer.base + cert_path("late"))
        assert peer.requests == []
