"""`python -m bench instructions`: machine instructions per ResolveContacts, counted, not timed.

CPU time on a shared machine moves by a third within minutes; the instructions a process executes
for the same calls do not. The resolver and the bare resolver (and, with `--against`, another work
tree's resolver) each run under valgrind's callgrind with counting off. Every server gets the same
requests: warm-up calls, then counting on for `--calls` calls of each size and off again, its
count dumped per size. Each count covers the whole process, gRPC's threads included, but not the
sample PII API or Redis. A process under callgrind runs some fifty times slower: a few hundred
calls are plenty. Needs valgrind. With `--dispatcher`, the dispatcher's instructions per Email
instead (`bench/dispatcher_instructions.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from bench import peers, workload
from bench.ab import GRPC_OPTIONS, add_call_options, work_tree

WARMUP_CALLS = 20
CUSTOMERS = 5000
STOP_SECONDS = 10.0  # the counts are dumped by then; a process under callgrind may be slow to exit


@dataclass
class Counted:
    label: str  # "bare", "this (<commit>)", "other (<commit>)"
    peer: peers.Peer
    out_file: Path
    stub: rpb_grpc.ResolverServiceStub | None = None


def callgrind_prefix(out_file: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}"]


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def dumped_totals(out_file: Path) -> list[int]:
    """The instruction total of each dump of `out_file` (`<file>.1`, `<file>.2`...), in dump order."""
    totals = []
    dumps = sorted(out_file.parent.glob(f"{out_file.name}.*"), key=lambda p: int(p.suffix[1:]))
    for dump in dumps:
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                totals.append(int(line.split()[1]))
                break
    return totals


def report(sizes: tuple[int, ...], calls: int, counts: dict[str, list[int]]) -> list[str]:
    """One row per size and server: instructions per call, and each against the bare server's."""
    rows = [
        f"instructions per ResolveContacts, {calls:,} calls of each size to each server, counted by callgrind",
        "| IDs | server | instructions/call | vs bare |",
        "|-----|--------|-------------------|---------|",
    ]
    for i, ids in enumerate(sizes):
        bare = counts["bare"][i] / calls
        for label, totals in counts.items():
            per_call = totals[i] / calls
            rows.append(f"| {ids:>3} | {label} | {per_call:>17,.0f} | {per_call / bare:>7.2f} |")
        others = [label for label in counts if label.startswith("other")]
        this = [label for label in counts if label.startswith("this")]
        if others and this:
            change = (counts[this[0]][i] / counts[others[0]][i] - 1) * 100
            rows.append(f"| {ids:>3} | change, other to this | {change:>+16.1f} % | |")
    return rows


async def run(other: Path | None, calls: int, sizes: tuple[int, ...], redis_url: str, results_dir: Path) -> list[str]:
    from bench.peers import git_commit

    out_dir = results_dir / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-instructions"
    out_dir.mkdir(parents=True, exist_ok=True)
    await workload.require_redis(redis_url)
    pii = await peers.start_pii_api(out_dir, CUSTOMERS)
    pii_url = f"http://127.0.0.1:{pii.port}"
    options = peers.ServiceOptions(redis_url=redis_url, log_level="WARNING")
    workspace = f"bench-instructions-{uuid.uuid4().hex[:8]}"
    servers: list[Counted] = []
    channels: list[grpc.aio.Channel] = []
    try:
        out = out_dir / "bare.callgrind"
        bare = await peers.start_bare_resolver(out_dir, pii_url, prefix=callgrind_prefix(out))
        servers.append(Counted("bare", bare, out))
        trees = [("this", peers.ROOT)] + ([("other", other)] if other is not None else [])
        for side, root in trees:
            out = out_dir / f"resolver-{side}.callgrind"
            peer = await peers.start_service(
                f"resolver-{side}", "services.resolver", options, out_dir, root=root, prefix=callgrind_prefix(out)
            )
            servers.append(Counted(f"{side} ({git_commit(root)})", peer, out))
        for server in servers:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.peer.port}", options=GRPC_OPTIONS)
            channels.append(channel)
            server.stub = rpb_grpc.ResolverServiceStub(channel)
        await workload.configure_pii_apis(servers[1].stub, workspace, pii_url)
        overhead = workload.overhead_workspace(workspace)
        rng = random.Random(7)
        for ids in sizes:
            requests = [workload.overhead_request(rng, overhead, ids, CUSTOMERS) for _ in range(WARMUP_CALLS + calls)]
            for server in servers:
                for request in requests[:WARMUP_CALLS]:
                    reply = await server.stub.ResolveContacts(request, timeout=120)
                    if any(c.HasField("error") for c in reply.contacts):
                        raise RuntimeError(f"{server.label} could not resolve a sample customer")
                pid = str(server.peer.pid)
                callgrind_control("--zero", pid)
                callgrind_control("--instr=on", pid)
                for request in requests[WARMUP_CALLS:]:
                    await server.stub.ResolveContacts(request, timeout=120)
                callgrind_control("--instr=off", pid)
                callgrind_control("--dump", pid)
        counts = {server.label: dumped_totals(server.out_file) for server in servers}
        if any(len(totals) != len(sizes) for totals in counts.values()):
            raise RuntimeError(f"callgrind wrote {counts} dumps, expected one per size; see {out_dir}")
        return report(sizes, calls, counts)
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.peer.stop(STOP_SECONDS)
        await pii.stop()
        await workload.forget_workspaces(redis_url, [workspace, workload.overhead_workspace(workspace)])


def build_parser() -> argparse.ArgumentParser:
    from bench import dispatcher_instructions  # it imports this module

    parser = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--against",
        type=work_tree,
        help="also count the resolver (with --dispatcher: the dispatcher) of this work tree of another commit",
    )
    add_call_options(parser, 200, "counted calls of each size to each server (default 200)")
    parser.add_argument(
        "--dispatcher",
        action="store_true",
        help="count the dispatcher's instructions per Email instead (bench/dispatcher_instructions.py)",
    )
    dispatcher_instructions.add_options(parser)
    # Each count's flags belong to it: given to the other, they would be ignored, so they are refused.
    parser.set_defaults(calls=None, ids=None, emails=None, batch=None)
    return parser


RESOLVER_DEFAULTS = {"calls": 200, "ids": (1, 100)}


def main(argv: list[str]) -> int:
    from bench import dispatcher_instructions
    from bench.cli import results_folder

    parser = build_parser()
    args = parser.parse_args(argv)
    ignored = ("calls", "ids") if args.dispatcher else ("emails", "batch")
    given = [f"--{name}" for name in ignored if getattr(args, name) is not None]
    if given:
        counted = "the resolver's instructions (without --dispatcher)" if args.dispatcher else "--dispatcher"
        parser.error(f"{', '.join(given)}: for {counted}")
    for name, value in {**RESOLVER_DEFAULTS, **dispatcher_instructions.DEFAULTS}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    results_folder(parser, args.results_dir)
    if args.dispatcher:
        return dispatcher_instructions.main(args)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"bench instructions needs valgrind ({', '.join(missing)} not found)")
    for row in asyncio.run(run(args.against, args.calls, args.ids, args.redis_url, args.results_dir)):
        print(row)  # noqa: T201
    return 0
