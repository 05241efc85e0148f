"""Opt-outs from receipts on a 3-master Redis Cluster: a batch's suppressions, of several families and
topics, written in one script call and its recipients' links read in one pipeline, all in the workspace's slot.

The tests imported below run here once more, unchanged, against the session's cluster (as in test_cluster.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.integration.test_receipts_sendgrid_opted_out_drops import (  # noqa: F401 - collected again, on the cluster
    test_a_group_resubscribe_lifts_a_group_drops_suppression_in_the_order_they_were_made,
    test_opted_out_drops_suppress_and_a_redelivery_counts_no_one_twice,
)
from tests.integration.test_suppressions_many import (  # noqa: F401 - collected again, on the cluster
    test_many_at_once_end_as_one_by_one_and_count_the_same,
)
from tests.integration.test_unsubscribe import (  # noqa: F401 - collected again, on the cluster
    test_a_group_resubscribe_lifts_that_groups_unsubscribe_in_the_order_they_were_made,
    test_once_the_map_has_expired_the_link_still_names_the_recipient,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cluster_mode")]


@pytest.fixture
def redis_url(redis_cluster) -> str:
    return redis_cluster.url


@pytest.fixture
async def redis(redis_url) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_url)
    await client.flushdb(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()
