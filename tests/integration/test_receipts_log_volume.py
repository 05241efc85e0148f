"""Lines a peer can repeat at will are kept to one a minute per kind: anyone can post a receipt to the
webhooks, and whoever holds an email's unsubscribe link can post it again and again."""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import logging
import time
import uuid

import pytest
from pydantic import SecretStr

from libs.unsubscribe import UnsubscribeTokens, link_key
from tests.integration.beyond import post, receipts_for
from tests.integration.test_receipts_harness import WS, Pii, running_receipts, sendgrid_event

pytestmark = pytest.mark.integration


async def test_forged_receipts_are_logged_a_line_per_reason_not_one_each(redis, redis_url, caplog) -> None:
    pii = Pii.new()
    async with running_receipts(redis, redis_url) as receipts:
        body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii)])
        forged = body.replace(b"delivered", b"bounce")
        with caplog.at_level(logging.INFO, logger="services.receipts.intake"):
            for _ in range(25):
                assert (await receipts.post("sendgrid", forged, headers)).status == 403
            for _ in range(25):
                assert (await receipts.post("sendgrid", body, {"Content-Type": "application/json"})).status == 401
    lines = [r.getMessage() for r in caplog.records if "receipt refused" in r.getMessage()]
    assert lines == ["sendgrid receipt refused: SignatureInvalid", "sendgrid receipt refused: SignatureMissing"]


async def test_a_one_click_link_posted_again_and_again_is_logged_once(redis, redis_url, secret_key, caplog) -> None:
    """Whoever holds an email's link can post it at will: a line when it suppresses someone, and a line a
    minute for links whose message is no longer known, not one per post."""
    known, unknown = uuid.uuid4().hex, uuid.uuid4().hex
    await redis.set(link_key(WS, known), "linked-0", ex=600)
    tokens = UnsubscribeTokens(SecretStr(secret_key))
    expires_at = int(time.time()) + 600
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        with caplog.at_level(logging.INFO, logger="services.receipts.opt_outs"):
            for _ in range(10):
                assert (await post(receipts, f"/unsubscribe/{tokens.sign(WS, known, expires_at)}", b"", {}))[0] == 200
                assert (await post(receipts, f"/unsubscribe/{tokens.sign(WS, unknown, expires_at)}", b"", {}))[0] == 410
    lines = [r.getMessage() for r in caplog.records if r.name == "services.receipts.opt_outs"]
    assert lines == [
        f"one-click unsubscribe in workspace {WS} (email): 1 new",
        f"unsubscribe link for workspace {WS} names a message no longer known",
    ]
