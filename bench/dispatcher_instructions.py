"""`python -m bench instructions --dispatcher`: machine instructions per Email the dispatcher executes,
counted, not timed.

The sample PII API, the sandbox providers and the resolver run normally; the dispatcher (and, with
`--against`, another work tree's dispatcher beside it) runs under valgrind's callgrind with counting
off. Each dispatcher gets the same campaign: warm-up batches through `DispatchStream` (connections,
OAuth token, connector client, first templates), then counting on for `--emails` Emails streamed in
batches of `--batch` through SendGrid, and off again. The count covers the whole dispatcher process,
pyreqwest's and gRPC's threads included, but not the peers, the resolver or Redis. Needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import peers, workload
from bench.instructions import STOP_SECONDS, callgrind_control, callgrind_prefix, dumped_totals

WARMUP_BATCHES = 4  # as many as the stream keeps in flight and one more: every batch slot is used once
CONNECTOR = "sendgrid"


@dataclass
class CountedDispatcher:
    label: str  # "this (<commit>)", "other (<commit>)"
    peer: peers.Peer
    out_file: Path


def report(emails: int, batch: int, counts: dict[str, int], sent: dict[str, int]) -> list[str]:
    """One row per dispatcher: instructions per Email; with two, the change from the other to this."""
    rows = [
        f"instructions per Email in the dispatcher, {emails:,} Emails via {CONNECTOR} in batches of {batch}, "
        "counted by callgrind",
        "| dispatcher | Emails sent | instructions/Email |",
        "|------------|-------------|--------------------|",
    ]
    for label, total in counts.items():
        rows.append(f"| {label} | {sent[label]:,} | {total / emails:>18,.0f} |")
    this = [label for label in counts if label.startswith("this")]
    other = [label for label in counts if label.startswith("other")]
    if this and other:
        change = (counts[this[0]] / counts[other[0]] - 1) * 100
        rows.append(f"| change, other to this | | {change:>+16.1f} % |")
    return rows


async def run(other: Path | None, emails: int, batch: int, redis_url: str, results_dir: Path) -> list[str]:
    from bench.peers import git_commit

    out_dir = results_dir / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-dispatcher-instructions"
    out_dir.mkdir(parents=True, exist_ok=True)
    await workload.require_redis(redis_url)
    customers = max(emails, batch * WARMUP_BATCHES) + 1
    workspace = f"bench-instructions-{uuid.uuid4().hex[:8]}"
    options = peers.ServiceOptions(
        redis_url=redis_url, log_level="WARNING", extra_env={"TOKENSEND_BATCH_SIZE": str(batch)}
    )
    started: list[peers.Peer] = []
    dispatchers: list[CountedDispatcher] = []
    try:
        pii = await peers.start_pii_api(out_dir, customers)
        started.append(pii)
        providers = await peers.start_providers(out_dir)
        started.append(providers)
        resolver = await peers.start_service("resolver", "services.resolver", options, out_dir)
        started.append(resolver)
        trees = [("this", peers.ROOT)] + ([("other", other)] if other is not None else [])
        for side, root in trees:
            out = out_dir / f"dispatcher-{side}.callgrind"
            peer = await peers.start_service(
                f"dispatcher-{side}",
                "services.dispatcher",
                options,
                out_dir,
                root=root,
                prefix=callgrind_prefix(out),
                TOKENSEND_RESOLVER_ADDR=f"127.0.0.1:{resolver.port}",
            )
            started.append(peer)
            dispatchers.append(CountedDispatcher(f"{side} ({git_commit(root)})", peer, out))
        # The connectors are stored in Redis, encrypted with the key every dispatcher shares.
        await workload.configure(
            f"127.0.0.1:{resolver.port}",
            f"127.0.0.1:{dispatchers[0].peer.port}",
            workspace,
            f"http://127.0.0.1:{pii.port}",
            f"http://127.0.0.1:{providers.port}",
        )
        counts: dict[str, int] = {}
        sent: dict[str, int] = {}
        for dispatcher in dispatchers:
            target = f"127.0.0.1:{dispatcher.peer.port}"

            async def stream(recipients: int, target: str = target) -> workload.StreamResult:
                return await workload.dispatch_stream(
                    target, workspace, "email", CONNECTOR, recipients, uuid.uuid4().hex[:12], part_size=batch, window=3
                )

            warmup = await stream(batch * WARMUP_BATCHES)
            if warmup.sent != batch * WARMUP_BATCHES:
                raise RuntimeError(f"{dispatcher.label} sent {dict(warmup.statuses)} in its warm-up; see {out_dir}")
            pid = str(dispatcher.peer.pid)
            callgrind_control("--zero", pid)
            callgrind_control("--instr=on", pid)
            result = await stream(emails)
            callgrind_control("--instr=off", pid)
            callgrind_control("--dump", pid)
            sent[dispatcher.label] = result.sent
            totals = dumped_totals(dispatcher.out_file)
            if len(totals) != 1:
                raise RuntimeError(f"callgrind wrote {len(totals)} dumps of {dispatcher.label}, expected one")
            counts[dispatcher.label] = totals[0]
        return report(emails, batch, counts, sent)
    finally:
        for peer in reversed(started):
            await peer.stop(STOP_SECONDS if peer.name.startswith("dispatcher") else 15.0)
        await workload.forget_workspaces(redis_url, [workspace, workload.overhead_workspace(workspace)])


def add_options(parser: argparse.ArgumentParser) -> None:
    from bench.cli import _batch, _count

    parser.add_argument(
        "--emails", type=_count, help=f"counted Emails (with --dispatcher; default {DEFAULTS['emails']})"
    )
    parser.add_argument(
        "--batch", type=_batch, help=f"Emails per batch (with --dispatcher; default {DEFAULTS['batch']})"
    )


DEFAULTS = {"emails": 3000, "batch": 500}


def main(args: argparse.Namespace) -> int:
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"bench instructions needs valgrind ({', '.join(missing)} not found)")
    rows = asyncio.run(run(args.against, args.emails, args.batch, args.redis_url, args.results_dir))
    for row in rows:
        print(row)  # noqa: T201
    return 0
