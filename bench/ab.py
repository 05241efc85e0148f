"""`python -m bench ab OTHER_TREE`: this tree's resolver and another tree's, side by side.

Both resolvers run at once, on the same Redis, sample PII API and workspace. Each ResolveContacts
goes to one of them and then, with the same IDs, to the other, the order swapped from call to
call, so a machine whose speed drifts (by ±20 % within minutes on a shared one) slows both alike.
Each resolver's CPU is read from /proc around its own calls. OTHER_TREE is a work tree of another
commit (`git worktree add /tmp/old <commit>`, its stubs generated), run with this interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from bench import peers, workload
from bench.stats import percentile
from libs.arguments import redis_address

SIDES = ("other", "this")
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclass
class SideResult:
    cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def cpu_us_per_call(self) -> float:
        return self.cpu_seconds / len(self.latencies) * 1e6 if self.latencies else 0.0


def report(ids_per_call: int, results: dict[str, SideResult], commits: dict[str, str]) -> list[str]:
    """Rows of the table for one call size: each side, then the change from the other tree to this one."""
    rows = []
    for side in SIDES:
        r = results[side]
        p50, p99 = percentile(r.latencies, 50) * 1000, percentile(r.latencies, 99) * 1000
        cpu = r.cpu_us_per_call()
        rows.append(f"| {ids_per_call:>3} | {side} ({commits[side]}) | {cpu:>9,.0f} | {p50:>6.2f} | {p99:>6.2f} |")
    before, after = results["other"], results["this"]
    change = (after.cpu_us_per_call() / before.cpu_us_per_call() - 1) * 100 if before.cpu_us_per_call() else 0.0
    p50_change = (percentile(after.latencies, 50) - percentile(before.latencies, 50)) * 1000
    rows.append(f"| {ids_per_call:>3} | change | {change:>+8.1f} % | {p50_change:>+6.2f} | |")
    return rows


async def run(other: Path, calls: int, sizes: tuple[int, ...], redis_url: str, results_dir: Path) -> list[str]:
    from bench.peers import git_commit

    log_dir = results_dir / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-ab-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    await workload.require_redis(redis_url)
    options = peers.ServiceOptions(redis_url=redis_url)
    customers = 5000
    pii = await peers.start_pii_api(log_dir, customers)
    resolvers: dict[str, peers.Peer] = {}
    workspace = f"bench-ab-{uuid.uuid4().hex[:8]}"
    channels: list[grpc.aio.Channel] = []
    try:
        for side, root in (("other", other), ("this", peers.ROOT)):
            resolvers[side] = await peers.start_service(
                f"resolver-{side}", "services.resolver", options, log_dir, root=root
            )
        stubs = {}
        for side, peer in resolvers.items():
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{peer.port}", options=GRPC_OPTIONS)
            channels.append(channel)
            stubs[side] = rpb_grpc.ResolverServiceStub(channel)
        await workload.configure_pii_apis(stubs["this"], workspace, f"http://127.0.0.1:{pii.port}")
        overhead = workload.overhead_workspace(workspace)
        rng = random.Random(7)
        commits = {"other": git_commit(other), "this": git_commit()}
        rows = [
            f"resolver side by side: this tree ({commits['this']}) and {other} ({commits['other']}), "
            f"{calls:,} calls of each size to each, alternated",
            "| IDs | tree | CPU us/call | p50 ms | p99 ms |",
            "|-----|------|-------------|--------|--------|",
        ]
        for ids in sizes:
            results = {side: SideResult() for side in SIDES}
            order = list(SIDES)
            for i in range(calls + 20):  # the first 20 warm both up and are not counted
                request = workload.overhead_request(rng, overhead, ids, customers)
                order.reverse()
                for side in order:
                    before, started = resolvers[side].cpu(), time.perf_counter()
                    await stubs[side].ResolveContacts(request, timeout=30)
                    if i >= 20:
                        results[side].latencies.append(time.perf_counter() - started)
                        results[side].cpu_seconds += resolvers[side].cpu() - before
            rows.extend(report(ids, results, commits))
        return rows
    finally:
        for channel in channels:
            await channel.close()
        for peer in (*resolvers.values(), pii):
            await peer.stop()
        await workload.forget_workspaces(redis_url, [workspace, workload.overhead_workspace(workspace)])


def work_tree(text: str) -> Path:
    path = Path(text).resolve()
    if not (path / "services" / "resolver").is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a tokensend work tree (no services/resolver)")
    if not (path / "libs" / "stubs" / "tokensend").is_dir():
        raise argparse.ArgumentTypeError(f"{text} has no generated stubs: run `make stubs` there")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=work_tree, help="a work tree of the commit to compare with")
    add_call_options(parser, 1500, "calls of each size to each resolver")
    return parser


def ids_per_call(text: str) -> tuple[int, ...]:
    """--ids: call sizes ResolveContacts takes, found now rather than as a refused call mid-run."""
    from bench.cli import _sizes
    from services.resolver.servicer import MAX_IDS_PER_CALL

    sizes = _sizes(text)
    if max(sizes) > MAX_IDS_PER_CALL:
        raise argparse.ArgumentTypeError(f"at most {MAX_IDS_PER_CALL:,} IDs a call (ResolveContacts' limit)")
    return sizes


def add_call_options(parser: argparse.ArgumentParser, calls: int, calls_help: str) -> None:
    """The options every side-by-side resolver command takes: how many calls, of what sizes, where."""
    from bench.cli import DEFAULT_REDIS_URL, _count

    parser.add_argument("--calls", type=_count, default=calls, help=calls_help)
    parser.add_argument("--ids", type=ids_per_call, default=(1, 100), help="IDs per call, comma-separated")
    parser.add_argument(
        "--redis-url", type=redis_address, default=os.environ.get("TOKENSEND_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument("--results-dir", type=Path, default=peers.ROOT / "bench" / "results")


def main(argv: list[str]) -> int:
    from bench.cli import results_folder

    parser = build_parser()
    args = parser.parse_args(argv)
    results_folder(parser, args.results_dir)
    for row in asyncio.run(run(args.other, args.calls, args.ids, args.redis_url, args.results_dir)):
        print(row)  # noqa: T201
    return 0
