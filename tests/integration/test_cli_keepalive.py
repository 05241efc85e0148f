"""The CLI's channels kept alive by HTTP/2 pings: a `dispatch` whose dispatcher's host vanished without closing
the connection fails UNAVAILABLE in seconds, rather than waiting for the kernel to give up on the connection.

The CLI is synchronous; it runs in a worker thread while the servers serve on the test's loop.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from cli.exits import FAILED
from sandbox.pii_api import generate_customers
from tests.conftest import bounded_teardown
from tests.integration.test_cli_dispatch import (
    EMAIL,
    dispatch_argv,
    id_lines,
    lines_written,
    open_pipe,
    results_in,
    run_cli,
)
from tests.integration.test_resolver_keepalive import BlackholingProxy, pinging_every_second

pytestmark = pytest.mark.integration


async def test_a_dispatch_whose_dispatcher_vanished_mid_stream_fails_in_seconds_with_its_results_kept(
    start_suite, tmp_path, capsys, monkeypatch
) -> None:
    """The dispatcher's host lost mid-campaign (a partition, a blackholing load balancer): the connection
    stays open and carries nothing, and the stream has no deadline. The CLI's unanswered ping closes it, so
    the command ends as any stream cut short does (exit 1, UNAVAILABLE, the results received written),
    within seconds instead of hanging."""
    pinging_every_second(monkeypatch)
    suite = await start_suite()
    suite.pii_api.sandbox.customers.update(generate_customers(1000))
    proxy = BlackholingProxy(suite.dispatcher.port)
    await proxy.start()
    content = tmp_path / "email.yaml"
    content.write_text(EMAIL)
    fifo = tmp_path / "audience.csv"
    os.mkfifo(fifo)
    out = tmp_path / "results.jsonl"
    argv = [*dispatch_argv(suite, fifo, content, "lost-1", "--out", str(out)), "--addr", f"127.0.0.1:{proxy.port}"]
    cli = asyncio.create_task(run_cli(*argv))
    pipe = await open_pipe(fifo, cli)
    try:
        pipe.write("anonymous_id\n" + id_lines(1, 1000))
        pipe.flush()
        assert await lines_written(out, 1000)
        await asyncio.sleep(2.5)  # waiting for the next part, nothing sent either way but pings and answers

        proxy.cut()
        cut_at = time.monotonic()
        done, _ = await asyncio.wait({cli}, timeout=10)
        elapsed = time.monotonic() - cut_at
    finally:
        pipe.close()
        await bounded_teardown(proxy.stop(), "proxy stop")  # closes the sockets: a command still waiting ends
        await bounded_teardown(asyncio.wait({cli}), "the command")
    assert cli in done, "the command waited on the lost connection"
    assert elapsed < 6, elapsed
    assert cli.result() == FAILED
    err = capsys.readouterr().err
    # Not "answered": the connection the CLI finds there afterwards (the proxy's next) says nothing of the lost one.
    assert f"tokensend: lost the connection to the dispatcher at 127.0.0.1:{proxy.port}: it stopped answering" in err
    assert "(UNAVAILABLE: " in err
    assert f"1000 recipient(s) got a result (written to {out})" in err
    assert len(results_in(out)) == 1000
