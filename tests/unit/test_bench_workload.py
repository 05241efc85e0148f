"""The benchmark's resolver-overhead requests: what the dispatcher would send."""

from __future__ import annotations

import random

from tokensend.common.v1 import common_pb2 as C

from bench import workload


def test_a_batch_asks_for_distinct_customers_as_the_dispatcher_does() -> None:
    # 100 of 5,000 drawn with replacement repeat an ID in most calls; the dispatcher never does.
    rng = random.Random(7)
    for _ in range(200):
        request = workload.overhead_request(rng, "brand-overhead", 100, 5000)
        assert len(set(request.anonymous_ids)) == 100
        assert request.channel == C.CHANNEL_EMAIL
        assert all(workload.anonymous_id(1) <= i <= workload.anonymous_id(5000) for i in request.anonymous_ids)


def test_one_id_goes_through_the_sms_config() -> None:
    request = workload.overhead_request(random.Random(1), "brand-overhead", 1, 10)
    assert request.channel == C.CHANNEL_SMS
    assert len(request.anonymous_ids) == 1
