"""A service told the Redis is a cluster when it is not stops at once (exit 2) and leaves nothing open:
no "Unclosed client session" or unclosed-client warning on the way out."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from libs.store import StoreMisconfigured, check_cluster_mode

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def misconfigured_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(
        TOKENSEND_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/0",  # a cluster has only database 0
        TOKENSEND_REDIS_CLUSTER="true",
        TOKENSEND_DEV_MODE="true",
        TOKENSEND_GRPC_PORT="0",
        TOKENSEND_HTTP_PORT="0",
    )
    return env


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "services.resolver"],
        ["-m", "services.dispatcher"],
        ["-m", "services.receipts"],
        ["-m", "cli.main", "serve", "all", "--resolver-port", "0", "--dispatcher-port", "0", "--receipts-port", "0"],
    ],
    ids=["resolver", "dispatcher", "receipts", "serve-all"],
)
async def test_a_single_redis_named_a_cluster_exits_2_leaving_nothing_open(redis_url, command):
    env = misconfigured_env(redis_url)
    if command[1] == "cli.main":
        del env["TOKENSEND_GRPC_PORT"]  # serve all takes a port per service instead
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "dev", *command,  # dev mode: ResourceWarnings are shown
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    said = stderr.decode()
    assert process.returncode == 2, said
    assert "TOKENSEND_REDIS_CLUSTER is set, but the Redis at TOKENSEND_REDIS_URL is not in cluster mode" in said
    for warning in ("Unclosed", "ResourceWarning", "was never awaited", "Task was destroyed"):
        assert warning not in said, said


async def test_the_start_check_leaves_a_node_that_does_not_answer_to_the_wait_for_the_cluster(redis_url):
    """Only a node that answers it is not in cluster mode stops the start; one that is down may be a
    cluster still starting, waited for as before."""
    await check_cluster_mode("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(StoreMisconfigured, match="TOKENSEND_REDIS_CLUSTER is set"):
        await check_cluster_mode(redis_url)
