"""One benchmark run: sandbox peers, fresh services per measurement, the bare baseline beside them.

Order of a full run (each suite measurement on freshly started resolver and dispatcher
processes, so each peak-memory figure belongs to one campaign size):

1. SMS: for each size, the suite through DispatchStream, then the baseline;
2. Email through SendGrid: the same;
3. resolver overhead: ResolveContacts against the same request made straight to the PII API, and
   the same call to the bare resolver (`bench.bare_resolver`) for reference;
4. tracing: the smallest SMS campaign with tracing exported to a file, and without, twice over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import peers, report, workload
from bench.profiles import parse_collapsed, render, summarize_stacks
from bench.stats import Summary, summarize
from services.dispatcher.servicer import BATCHED_SEND_BATCHES_IN_FLIGHT, BATCHES_IN_FLIGHT

TRACING_ROUNDS = 2  # of off, on, on, off: each side sends the tracing size this many times
SECTIONS = ("sms", "email", "baseline", "resolver", "tracing", "profile")
EMAIL_BY_NAME = "greeting by name"
VARIANT_CONTENTS = {EMAIL_BY_NAME: workload.EMAIL_BY_NAME_CONTENT}  # other variants send the family's content
DEFAULT_SECTIONS = ("sms", "email", "baseline", "resolver", "tracing")
FULL_SIZES = (20_000, 200_000)
OVERHEAD_WARMUP = 20  # ResolveContacts calls before the measured ones
QUICK_SIZES = (2_000, 20_000)


@dataclass
class RunOptions:
    sizes: tuple[int, ...] = FULL_SIZES
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    redis_url: str = "redis://127.0.0.1:6379/10"
    results_dir: Path = Path(__file__).resolve().parent / "results"
    sms_connector: str = "gateway"
    batch_size: int = 500
    window: int = 3  # stream parts unanswered: as many as the dispatcher works on at once, for Email
    overhead_calls: int = 1000
    tracing_size: int = 0  # 0: the smallest of `sizes`
    service_env: dict[str, str] = field(default_factory=dict)  # extra TOKENSEND_* for both services
    dispatcher_cpus: str = "auto"  # `--dispatcher-cpus`: the dispatcher bound to one CPU, as deployed
    quick: bool = False
    progress: bool = True


def say(options: RunOptions, text: str) -> None:
    if options.progress:
        print(text, file=sys.stderr, flush=True)  # noqa: T201 - progress of a CLI, the table goes to stdout


def overhead_ms(server: Summary, direct: Summary) -> dict[str, float]:
    """A server's p50 and p99 minus the direct call's, in ms: how the overhead target is read."""
    return {q: round((getattr(server, q) - getattr(direct, q)) * 1000, 3) for q in ("p50", "p99")}


def pooled_row(
    family: str,
    connector: str,
    system: str,
    variant: str,
    parts: list[dict[str, Any]],
    cpu_seconds: Callable[[dict[str, Any]], dict[str, float]],
) -> dict[str, Any]:
    """One row from one or more runs of the same thing: recipients, seconds and each process's CPU
    (`cpu_seconds` of a run) add up, batch latencies pool. The caller adds what was sent and the
    peak memory, which each kind of run reports its own way."""
    size = sum(p["recipients"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    statuses: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    for part in parts:
        statuses.update(part["statuses"])
        cpu.update(cpu_seconds(part))
    return {
        "family": family,
        "connector": connector,
        "system": system,
        "variant": variant,
        "recipients": size,
        "parts": len(parts),
        "seconds": round(seconds, 3),
        "throughput": round(size / seconds, 1) if seconds > 0 else 0.0,
        "batch_ms": summarize([t for p in parts for t in p["batch_times"]]).to_json(),
        "statuses": dict(statuses),
        # CPU time per message of each process: robust to other load on the machine, unlike msg/s.
        "cpu_us_per_message": {name: round(value * 1e6 / size, 1) for name, value in cpu.items()},
    }


def suite_entry(family: str, connector: str, variant: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A suite row from one or more campaigns (`Bench.suite_part`)."""
    row = pooled_row(family, connector, "suite", variant, parts, lambda part: part["cpu_seconds"])
    row["sent"] = sum(p["sent"] for p in parts)
    row["peak_rss_kb"] = {
        name: max(p["peak_rss_kb"][name] or 0 for p in parts) or None for name in ("resolver", "dispatcher")
    }
    return row


def baseline_entry(family: str, connector: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A baseline row from one or more runs of `bench.baseline` (each a report as it prints it)."""
    row = pooled_row(
        family,
        connector,
        "baseline",
        "",
        parts,
        lambda part: {"baseline": part["cpu_seconds"], **part["peers_cpu_seconds"]},
    )
    row["sent"] = sum(n for status, n in row["statuses"].items() if status.startswith("2"))
    row["peak_rss_kb"] = {"baseline": max(p["peak_rss_kb"] for p in parts)}
    return row


class Bench:
    def __init__(self, options: RunOptions) -> None:
        self.options = options
        now = datetime.now(UTC)
        self.stamp = now.strftime("%Y%m%dT%H%M%SZ")
        self.started_at = now.isoformat(timespec="seconds")
        self.log_dir = options.results_dir / f"{self.stamp}-logs"
        self.workspace = f"bench-{self.stamp.lower()}-{uuid.uuid4().hex[:4]}"
        self.service_options = peers.ServiceOptions(
            redis_url=options.redis_url,
            extra_env={"TOKENSEND_BATCH_SIZE": str(options.batch_size), **options.service_env},
            dispatcher_cpus=peers.dispatcher_cpus(options.dispatcher_cpus, 1),
        )
        self.pii: peers.Peer | None = None
        self.providers: peers.Peer | None = None
        self._configured = False

    @property
    def pii_url(self) -> str:
        assert self.pii is not None
        return f"http://127.0.0.1:{self.pii.port}"

    @property
    def providers_url(self) -> str:
        assert self.providers is not None
        return f"http://127.0.0.1:{self.providers.port}"

    @property
    def customers(self) -> int:
        return max(*self.options.sizes, self.tracing_size, 1000)

    @property
    def tracing_size(self) -> int:
        return self.options.tracing_size or min(self.options.sizes)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        await workload.require_redis(self.options.redis_url)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {
            "schema": 1,
            "started_at": self.started_at,
            "machine": peers.machine_facts(),
            "options": {
                "quick": self.options.quick,
                "sizes": list(self.options.sizes),
                "sections": list(self.options.sections),
                "sms_connector": self.options.sms_connector,
                "batch_size": self.options.batch_size,
                "window": self.options.window,
                "service_env": self.options.service_env,
                "dispatcher_cpus": list(self.service_options.dispatcher_cpus),
            },
            "logs": str(self.log_dir),
            "dispatch": [],
        }
        say(self.options, f"bench: logs in {self.log_dir}; starting the sample PII API ({self.customers:,} customers)")
        try:
            self.pii = await peers.start_pii_api(self.log_dir, self.customers)
            self.providers = await peers.start_providers(self.log_dir)
            sections = self.options.sections
            for family in ("sms", "email"):
                if family not in sections and "baseline" not in sections:
                    continue
                for size in self.options.sizes:
                    baseline = "baseline" in sections and (family == "sms" or family in sections)
                    if family in sections and baseline:
                        # Half the baseline before the suite and half after: the machine's speed drifts
                        # (by ±20 % within a minute on a bad hour), and bracketing keeps a steady drift
                        # from reading as a change in the ratio.
                        before = await self.baseline_part(family, size // 2)
                        results["dispatch"].append(await self.suite(family, size))
                        after = await self.baseline_part(family, size - size // 2)
                        results["dispatch"].append(self.baseline_entry(family, [before, after]))
                    elif family in sections:
                        results["dispatch"].append(await self.suite(family, size))
                    elif baseline:
                        results["dispatch"].append(
                            self.baseline_entry(family, [await self.baseline_part(family, size)])
                        )
            if "email" in sections:
                # Addressed by name, every Email's content differs: SendGrid's substitutions keep them batched.
                size = min(self.options.sizes)
                results["dispatch"].append(await self.suite("email", size, variant=EMAIL_BY_NAME))
            if "resolver" in sections:
                results["resolver_overhead"] = await self.resolver_overhead()
            if "tracing" in sections:
                results["tracing"] = await self.tracing()
            if "profile" in sections:
                results["profiles"] = await self.profile()
        except asyncio.CancelledError:
            # Ctrl-C or SIGTERM (asyncio.run cancels this task): the measurement under way is cut off,
            # those completed are reported, as a load test reports the calls that completed.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            results["interrupted"] = True
        finally:
            for peer in (self.providers, self.pii):
                if peer is not None:
                    await peer.stop()
            await self.forget_workspace()
        results["targets"] = [t.to_json() for t in report.compute_targets(results)]
        results["duration_seconds"] = round(time.monotonic() - started, 1)
        return results

    async def forget_workspace(self) -> None:
        """Deletes what the run left in Redis: only keys of its own workspaces."""
        try:
            await workload.forget_workspaces(
                self.options.redis_url, [self.workspace, workload.overhead_workspace(self.workspace)]
            )
        except Exception as exc:  # cleanup must not hide the results
            say(self.options, f"bench: could not clean up Redis ({type(exc).__name__})")

    async def services(self, trace_file: str = "") -> peers.Services:
        """Fresh resolver and dispatcher processes; the first ones save the workspace's configuration."""
        services = await peers.start_services(replace(self.service_options, trace_file=trace_file), self.log_dir)
        if not self._configured:
            await workload.configure(
                f"127.0.0.1:{services.resolver.port}",
                f"127.0.0.1:{services.dispatcher.port}",
                self.workspace,
                self.pii_url,
                self.providers_url,
            )
            self._configured = True
        return services

    def connector(self, family: str) -> str:
        return self.options.sms_connector if family == "sms" else "sendgrid"

    async def stream(self, services: peers.Services, family: str, recipients: int, instance: str, variant: str = ""):
        return await workload.dispatch_stream(
            f"127.0.0.1:{services.dispatcher.port}",
            self.workspace,
            family,
            self.connector(family),
            recipients,
            instance,
            part_size=self.options.batch_size,
            window=self.options.window,
            content=VARIANT_CONTENTS.get(variant),
        )

    # -- measurements ------------------------------------------------------------------------------

    async def suite(self, family: str, size: int, trace_file: str = "", variant: str = "") -> dict[str, Any]:
        """One campaign of `size` through fresh services: its row."""
        part = await self.suite_part(family, size, trace_file, variant)
        return suite_entry(family, self.connector(family), variant, [part])

    async def suite_part(self, family: str, size: int, trace_file: str = "", variant: str = "") -> dict[str, Any]:
        """One campaign of `size` through fresh services, measured after a warm-up batch: its raw figures."""
        label = f"{family} suite{' (' + variant + ')' if variant else ''} x {size:,}"
        say(self.options, f"bench: {label}")
        services = await self.services(trace_file)
        try:
            # One batch first, so connections, tokens and connector clients exist before the clock starts.
            await self.stream(services, family, self.options.batch_size, f"warmup-{uuid.uuid4().hex[:8]}", variant)
            watched = [*services.all, self.pii, self.providers]
            cpu_before = [p.cpu() for p in watched]
            redis_before = await workload.redis_cpu_seconds(self.options.redis_url)
            client_before = time.process_time()  # this process streams the campaign: the engine's share
            result = await self.stream(services, family, size, f"{family}-{size}-{uuid.uuid4().hex[:8]}", variant)
            cpu = peers.cpu_since(watched, cpu_before)
            cpu["client"] = time.process_time() - client_before
            cpu.update(await workload.redis_cpu_since(self.options.redis_url, redis_before))
        finally:
            await services.stop()
        part = {
            "recipients": size,
            "seconds": result.seconds,
            "batch_times": result.batch_times,
            "sent": result.sent,
            "statuses": dict(result.statuses),
            "peak_rss_kb": {"resolver": services.resolver.peak_rss_kb, "dispatcher": services.dispatcher.peak_rss_kb},
            "cpu_seconds": cpu,
        }
        cpu_us = {name: round(seconds * 1e6 / size, 1) for name, seconds in cpu.items()}
        p50 = summarize(result.batch_times).to_json()["p50"]
        say(self.options, f"bench:   {size / result.seconds:,.0f} msg/s, batch p50 {p50} ms, CPU us/msg {cpu_us}")
        return part

    async def baseline_part(self, family: str, size: int) -> dict[str, Any]:
        """One run of `python -m bench.baseline` over `size` recipients: its report, with the peers' CPU
        over its measured loop (after its warm-up batch, as the suite's is read after its own)."""
        say(self.options, f"bench: {family} baseline x {size:,}")
        log = (self.log_dir / "baseline.log").open("ab")
        watched = [f"{p.name}={p.pid}" for p in (self.pii, self.providers)]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.baseline",
                "--pii-api",
                self.pii_url,
                "--providers",
                self.providers_url,
                "--family",
                family,
                "--sms-provider",
                self.options.sms_connector,
                "--recipients",
                str(size),
                "--batch",
                str(self.options.batch_size),
                "--batches",  # as many at once as the dispatcher works on for the family
                str(BATCHED_SEND_BATCHES_IN_FLIGHT if family == "email" else BATCHES_IN_FLIGHT),
                *(arg for process in watched for arg in ("--watch", process)),
                cwd=peers.ROOT,
                env=peers.clean_env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
            out, _ = await process.communicate()
        finally:
            log.close()
        if process.returncode != 0:
            raise RuntimeError(f"the baseline failed; see {self.log_dir / 'baseline.log'}")
        data = json.loads(out)
        say(self.options, f"bench:   {data['recipients'] / data['seconds']:,.0f} msg/s")
        return data

    def baseline_entry(self, family: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The baseline's row from its runs: their recipients over their time, CPU summed per process."""
        return baseline_entry(family, self.connector(family), parts)

    async def resolver_overhead(self) -> list[dict[str, Any]]:
        say(self.options, "bench: resolver overhead")
        services = await self.services()
        entries = []
        try:
            bare = await peers.start_bare_resolver(self.log_dir, self.pii_url)
        except BaseException:
            await services.stop()
            raise
        try:
            for ids in (1, 100):
                calls = self.options.overhead_calls
                cpu_before = services.resolver.cpu(), bare.cpu()
                result = await workload.resolver_overhead(
                    f"127.0.0.1:{services.resolver.port}",
                    workload.overhead_workspace(self.workspace),
                    self.pii_url,
                    self.customers,
                    ids,
                    calls,
                    warmup=OVERHEAD_WARMUP,
                    bare_target=f"127.0.0.1:{bare.port}",
                )
                # Each server idles while the others' calls run: its CPU is its calls' own.
                resolver_cpu, bare_cpu = (
                    (peer.cpu() - before) / (calls + OVERHEAD_WARMUP)
                    for peer, before in zip((services.resolver, bare), cpu_before, strict=True)
                )
                resolver, direct, bare_ms = summarize(result.resolver), summarize(result.direct), summarize(result.bare)
                paired = summarize([r - d for r, d in zip(result.resolver, result.direct, strict=True)])
                entries.append(
                    {
                        "ids_per_call": ids,
                        "calls": calls,
                        "resolver_ms": resolver.to_json(),
                        "direct_ms": direct.to_json(),
                        # The target's reading: the resolver's percentile minus the direct call's.
                        "overhead_ms": overhead_ms(resolver, direct),
                        "paired_difference_ms": paired.to_json(),
                        # The same reading for a server doing only the unavoidable work (no target).
                        "bare_resolver_ms": bare_ms.to_json(),
                        "bare_overhead_ms": overhead_ms(bare_ms, direct),
                        "cpu_us_per_call": {
                            "resolver": round(resolver_cpu * 1e6, 1),
                            "bare_resolver": round(bare_cpu * 1e6, 1),
                        },
                    }
                )
        finally:
            await bare.stop()
            await services.stop()
        for entry in entries:
            entry["peak_rss_kb"] = {"resolver": services.resolver.peak_rss_kb}
        return entries

    async def tracing(self) -> dict[str, Any]:
        size = self.tracing_size
        spans = self.log_dir / "spans.jsonl"
        with contextlib.suppress(FileNotFoundError):
            spans.unlink()
        off_label, on_label = "tracing off (no exporter)", "tracing on (to a file)"
        # Off, on, on, off, twice, each run a half of the size: a machine whose speed drifts during the
        # eight runs, steadily or with a bend, slows or speeds both sides alike. One round of four read
        # 0.87-1.02 within an hour whose CPU budgets (off / on) were 0.98-1.04: the hour's swings.
        first, second = size // 2, size - size // 2
        off_parts: list[dict[str, Any]] = []
        on_parts: list[dict[str, Any]] = []
        for _ in range(TRACING_ROUNDS):
            off_parts.append(await self.suite_part("sms", first, variant=off_label))
            on_parts.append(await self.suite_part("sms", first, str(spans), on_label))
            on_parts.append(await self.suite_part("sms", second, str(spans), on_label))
            off_parts.append(await self.suite_part("sms", second, variant=off_label))
        connector = self.connector("sms")
        off, on = suite_entry("sms", connector, off_label, off_parts), suite_entry("sms", connector, on_label, on_parts)
        exported = sum(1 for _ in spans.open()) if spans.exists() else 0
        return {
            "recipients": off["recipients"],
            "off": off,
            "on": on,
            "spans_exported": exported,
            "ratio": round(on["throughput"] / off["throughput"], 4) if off["throughput"] else None,
        }

    async def profile(self) -> dict[str, Any]:
        """py-spy on the dispatcher and resolver during an SMS and an Email campaign (perturbs timing)."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            say(self.options, "bench: py-spy is not installed; skipping the profile section")
            return {}
        profiles: dict[str, Any] = {}
        size = min(self.options.sizes)
        for family in ("sms", "email"):
            services = await self.services()
            try:
                await self.stream(services, family, self.options.batch_size, f"warmup-{uuid.uuid4().hex[:8]}")
                recorders = []
                for peer in (services.dispatcher, services.resolver):
                    out = self.log_dir / f"profile-{family}-{peer.name}.txt"
                    recorders.append(
                        (
                            peer.name,
                            out,
                            await asyncio.create_subprocess_exec(
                                py_spy,
                                "record",
                                "-r",
                                "200",
                                "-f",
                                "raw",
                                "-o",
                                str(out),
                                "-p",
                                str(peer.pid),
                                stdout=asyncio.subprocess.DEVNULL,
                                stderr=asyncio.subprocess.DEVNULL,
                            ),
                        )
                    )
                await asyncio.sleep(1)  # py-spy attaches
                result = await self.stream(services, family, size, f"profile-{uuid.uuid4().hex[:8]}")
                for _, _, recorder in recorders:
                    recorder.send_signal(signal.SIGINT)
                for name, out, recorder in recorders:
                    await recorder.wait()
                    if out.exists():
                        summary = summarize_stacks(parse_collapsed(out.open(errors="replace")))
                        text = render(summary, f"{family} {name} ({result.throughput:,.0f} msg/s under py-spy)")
                        (out.with_suffix(".summary.txt")).write_text(text + "\n")
                        profiles[f"{family}/{name}"] = {
                            "samples": summary.samples,
                            "by_component": dict(summary.by_area),
                            "self": dict(summary.self_time[:15]),
                        }
                        say(self.options, text)
            finally:
                await services.stop()
        return profiles


async def run_benchmark(options: RunOptions) -> dict[str, Any]:
    return await Bench(options).run()
