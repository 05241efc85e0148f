"""`python -m bench load`: N concurrent gRPC clients calling `Dispatch` at a fixed rate (or one that
steps or rises, bench.schedule) for a fixed time (or a number of calls), reported the way ghz reports
(count, rate, latency percentiles and histogram, status codes; per step or second for a schedule that
moves; each call as CSV). As in ghz, the latency figures time the OK calls only, unless `count_errors`
(`--count-errors`): a call that fails fast would otherwise pull them down. Ctrl-C or SIGTERM stops
the run and still reports the calls that completed.

Calls are scheduled open-loop at the schedule's rate across all clients; a call starts when its
tick comes and a client is free, and its latency is measured from then, as ghz does. Ticks that
found every client busy are counted as late, and how long after its tick each call started is
reported beside the latencies, which leave that wait out. Without `--target` it starts its own
suite (sample PII API, sandbox providers, resolver and dispatcher processes) and stops it afterwards.

Each call sends to the next `recipients_per_call` customers, cust-000001 to the last of `customers`
(the sample PII API's range), wrapping back to the first after the last: every customer in turn.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import math
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dpb_grpc

from bench import peers, workload
from bench.schedule import Schedule
from bench.stats import histogram, percentile, quantiles, summarize
from cli.rpc import connection_problem

CONNECT_SECONDS = 10.0  # for each channel to the dispatcher to become ready
FAILED_STATUSES = ("RESOLVE_FAILED", "SEND_FAILED")  # a recipient's errors; CAPPED and the like are policy


@dataclass
class LoadOptions:
    target: str = ""
    concurrency: int = 10
    rate: float = 50.0  # calls per second across all clients; 0 = as fast as the clients go
    duration: float = 10.0  # -z; not used when `total` is given
    total: int = 0  # -n: calls to make in all, however long they take (0: as many as `duration` holds)
    max_duration: float = 0.0  # -x: with `total`, the most the run lasts (0: no limit)
    skip_first: int = 0  # --skip-first: calls to complete before any is counted (warm-up)
    count_errors: bool = False  # --count-errors: the latency figures time the failed calls too (ghz's)
    recipients_per_call: int = 10
    family: str = "sms"
    connector: str = ""
    workspace: str = ""
    customers: int = 20_000
    timeout: float = 30.0
    connections: int = 1  # gRPC channels shared round-robin by the clients
    dispatchers: int = 1  # processes on one port when the suite is started here (SO_REUSEPORT)
    dispatcher_cpus: str = "auto"  # `--dispatcher-cpus`: each dispatcher process bound to a CPU of its own
    event_loop: str = "uvloop"
    redis_url: str = "redis://127.0.0.1:6379/10"
    log_dir: Path = Path(__file__).resolve().parent / "results" / "load-logs"
    json_path: str = ""
    schedule: Schedule | None = None  # --load-schedule step or line; None: `rate` throughout
    output_format: str = "text"  # -O/--format: text, json or csv (one row per call)
    output_path: str = ""  # -o/--output: where that goes (default stdout)
    token: str | None = None  # sent as 'authorization: Bearer TOKEN' (with --target)
    credentials: grpc.ChannelCredentials | None = None  # TLS (with --target); None: plaintext

    @property
    def plan(self) -> Schedule:
        return self.schedule or Schedule(start=self.rate)

    @property
    def connector_id(self) -> str:
        return self.connector or ("sendgrid" if self.family == "email" else "gateway")


# Every recipient status a reply can hold, in the proto's order: the CSV's columns.
DISPATCH_STATUSES = tuple(
    name.removeprefix("DISPATCH_STATUS_") for name in dpb.DispatchStatus.keys() if not name.endswith("UNSPECIFIED")
)


class Call(NamedTuple):
    """One completed call (warm-up calls aside), a CSV row."""

    start: float  # seconds from the run's start
    seconds: float  # its latency
    code: str  # the gRPC status code's name
    error: str = ""  # the error's details, as in `LoadResult.errors`
    statuses: Counter[str] | None = None  # its recipients' dispatch statuses
    delay: float | None = None  # seconds from its tick to its start (a fixed rate)


@dataclass
class LoadResult:
    start_delays: list[float] = field(default_factory=list)  # seconds from each call's tick to its start
    codes: Counter[str] = field(default_factory=Counter)
    dispatch_statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "CODE: details"
    calls: list[Call] = field(default_factory=list)  # in the order they completed
    late: int = 0
    not_started: int = 0
    seconds: float = 0.0
    skipped: int = 0  # warm-up calls completed, counted nowhere else
    warmup_seconds: float = 0.0  # from the start to the last warm-up call's end
    end_reason: str = "normal"  # as ghz: normal, timeout (-x before -n calls), cancel (interrupted)

    @property
    def count(self) -> int:
        return sum(self.codes.values())

    def latencies(self, count_errors: bool = False) -> list[float]:
        """Seconds, the OK calls' (every completed call's with `count_errors`), as ghz times them."""
        return [c.seconds for c in self.calls if count_errors or c.code == "OK"]

    def to_json(self, options: LoadOptions) -> dict[str, Any]:
        latencies = self.latencies(options.count_errors)
        summary = summarize(latencies)
        errors = self.count - self.codes.get("OK", 0)
        recipients = sum(self.dispatch_statuses.values())
        failed = sum(self.dispatch_statuses.get(s, 0) for s in FAILED_STATUSES)
        measured = self.seconds - self.warmup_seconds  # the rates are over the calls counted, in their time
        plan = options.plan
        data = {
            # `python -m bench compare` reads load reports beside each other by these two.
            "schema": 1,
            "kind": "load",
            "target": options.target,
            "concurrency": options.concurrency,
            "rate": options.rate if plan.kind == "const" else None,
            "load_schedule": plan.to_json(),
            "duration": None if options.total else options.duration,
            "total": options.total or None,
            "max_duration": options.max_duration or None,
            "skip_first": options.skip_first,
            "recipients_per_call": options.recipients_per_call,
            # What else moves the figures, so that two runs' reports say whether they compare.
            "family": options.family,
            "connector": options.connector_id,
            "customers": options.customers,
            "connections": options.connections,
            "timeout": options.timeout,
            "end_reason": self.end_reason,
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "warmup_seconds": round(self.warmup_seconds, 3),
            "rps": round(self.count / measured, 2) if measured > 0 else 0.0,
            "messages_per_second": round(self.dispatch_statuses.get("SENT", 0) / measured, 1) if measured > 0 else 0,
            "error_rate": round(errors / self.count, 4) if self.count else 0.0,
            # An answered call can carry failed recipients: a call error rate alone would read 0 %.
            "recipient_error_rate": round(failed / recipients, 4) if recipients else 0.0,
            # The calls the latency figures (and each step's) time: "ok", or "all" with --count-errors.
            "latency_over": "all" if options.count_errors else "ok",
            "latency_ms": summary.to_json(),
            # No call timed, no percentile: null, as in latency_ms (NaN is not JSON).
            "quantiles_ms": {k: None if math.isnan(v) else round(v * 1000, 3) for k, v in quantiles(latencies).items()},
            "histogram": [
                {"upper_ms": round(upper * 1000, 3), "count": count} for upper, count in histogram(latencies)
            ],
            "start_delay_ms": summarize(self.start_delays).to_json(),
            "status_codes": dict(self.codes),
            "dispatch_statuses": dict(self.dispatch_statuses),
            "errors": dict(self.errors),
            "late_ticks": self.late,
            "not_started": self.not_started,
        }
        if plan.kind != "const":
            data["rate_steps"] = rate_steps(self.calls, plan, self.scheduled_until(options), options.count_errors)
        return data

    def scheduled_until(self, options: LoadOptions) -> float:
        """Seconds from the start to where the schedule ended, not to when the calls in flight then came
        back: a -z run's duration; for -n, when the call after the last would have been due (so that the
        last step's calls are over the time the rate set for them), cut at -x; if interrupted, then."""
        if options.total:
            end = next(itertools.islice(options.plan.tick_times(), options.total, None), math.inf)
            end = min(end, options.max_duration or math.inf)
        else:
            end = options.duration or math.inf
        return min(end, self.seconds) if self.end_reason == "cancel" or end == math.inf else end


def rate_steps(calls: list[Call], plan: Schedule, until: float, count_errors: bool = False) -> list[dict[str, Any]]:
    """Each step (or second, for line) of the run: the rate set, the calls due in it (by their tick, so a
    call the machine started a moment late stays in its step), their rate, error rate, latencies (the OK
    calls', or all with `count_errors`) and start delays, to show where latency or errors began to climb."""
    windows = plan.windows(until)
    if not windows:
        return []
    members: list[list[Call]] = [[] for _ in windows]
    width = windows[0][1] - windows[0][0]
    for c in calls:
        due = c.start - c.delay if c.delay is not None else c.start
        members[min(max(0, int(due // width)), len(members) - 1)].append(c)
    out = []
    for (begin, end, rate), started in zip(windows, members, strict=True):
        latencies = [c.seconds for c in started if count_errors or c.code == "OK"]
        delays = [c.delay for c in started if c.delay is not None]
        errors = sum(c.code != "OK" for c in started)
        out.append(
            {
                "from_s": round(begin, 3),
                "to_s": round(end, 3),
                "scheduled_rps": round(rate, 2),
                "rps": round(len(started) / (end - begin), 2),
                "count": len(started),
                "error_rate": round(errors / len(started), 4) if started else 0.0,
                "p50_ms": _rounded_ms(percentile(latencies, 50)),
                "p99_ms": _rounded_ms(percentile(latencies, 99)),
                "start_delay_p99_ms": _rounded_ms(percentile(delays, 99)),
            }
        )
    return out


def _rounded_ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


CSV_HEADER = ("start_s", "duration_ms", "status", "error", *DISPATCH_STATUSES)


def calls_csv(calls: list[Call]) -> str:
    """One row per call, ordered by start: seconds from the run's start, latency, gRPC status code, the
    error's details (the dispatcher's own, never a recipient's contact) and how many of its recipients
    came back with each dispatch status."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for c in sorted(calls, key=lambda c: c.start):
        counted = c.statuses or {}
        writer.writerow(
            [
                f"{c.start:.6f}",
                f"{c.seconds * 1000:.3f}",
                c.code,
                c.error,
                *(counted.get(s, 0) for s in DISPATCH_STATUSES),
            ]
        )
    return out.getvalue()


END_REASONS = {
    "timeout": "timeout (-x/--max-duration before -n/--total calls)",
    "cancel": "cancel (interrupted: the calls that completed)",
}


def render(data: dict[str, Any]) -> str:
    lat = data["latency_ms"]
    out = ["Summary:"]
    if data.get("end_reason", "normal") != "normal":
        out.append(f"  End reason:\t{END_REASONS[data['end_reason']]}")
    out.append(f"  Schedule:\t{_schedule_text(data)}")
    out += [
        f"  Count:\t{data['count']}",
        f"  Total:\t{data['seconds']:.2f} s",
        f"  Latency over:\t{_latency_over(data)}",
        f"  Slowest:\t{_ms(lat['maximum'])}",
        f"  Fastest:\t{_ms(lat['minimum'])}",
        f"  Average:\t{_ms(lat['mean'])}",
        f"  Requests/sec:\t{data['rps']:.2f}",
        f"  Messages/sec:\t{data['messages_per_second']:.1f} (recipients SENT)",
        f"  Error rate:\t{100 * data['error_rate']:.2f} % of calls, "
        f"{100 * data['recipient_error_rate']:.2f} % of recipients ({' or '.join(FAILED_STATUSES)})",
    ]
    if data.get("skipped"):
        out.append(
            f"  Warm-up:\t{data['skipped']} calls left out (first to complete, {data['warmup_seconds']:.2f} s; "
            "the rates are over the time after them)"
        )
    out += ["", "Response time histogram:"]
    untimed = _untimed(data)
    bins = data["histogram"]
    peak = max((b["count"] for b in bins), default=1) or 1
    for bucket in bins:
        bar = "∎" * round(40 * bucket["count"] / peak)
        out.append(f"  {bucket['upper_ms']:10.3f} [{bucket['count']}]\t|{bar}")
    if untimed:
        out.append(f"  none: {untimed}")
    out += ["", "Latency distribution:"]
    if untimed:  # no percentile rather than a row of dashes
        out.append(f"  none: {untimed}")
    else:
        out += [f"  {k[1:]} % in {_ms(v)}" for k, v in data["quantiles_ms"].items()]
    out += ["", "Status code distribution:"]
    out += [f"  [{code}]\t{n} responses" for code, n in sorted(data["status_codes"].items())]
    if data["dispatch_statuses"]:
        out += ["", "Recipient status distribution:"]
        out += [f"  [{s}]\t{n}" for s, n in sorted(data["dispatch_statuses"].items())]
    if data["errors"]:
        out += ["", "Error distribution:"]
        out += [f"  [{n}]\t{e}" for e, n in sorted(data["errors"].items(), key=lambda kv: -kv[1])]
    if data.get("cpu_ms_per_call"):
        cpu = data["cpu_ms_per_call"]
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
        ended = data.get("cpu_not_measured")
        left_out = f" ({', '.join(ended)} not measured: ended during the run)" if ended else ""
        out += ["", f"CPU ms per call (this machine's processes): {parts}; all {sum(cpu.values()):.2f}{left_out}"]
    delay = data["start_delay_ms"]
    if delay["count"]:  # a fixed rate: the wait of a call behind its tick is not in its latency
        out += [
            "",
            f"Start after the tick (left out of the latencies): p50 {_ms(delay['p50'])}, "
            f"p99 {_ms(delay['p99'])}, slowest {_ms(delay['maximum'])}",
        ]
    if data["late_ticks"] or data["not_started"]:
        out += ["", f"Late ticks (every client busy): {data['late_ticks']}; not started: {data['not_started']}"]
    if data.get("rate_steps"):
        per = "step" if data["load_schedule"]["kind"] == "step" else "second"
        out += ["", f"Rate by {per} (the calls due in it; calls/s scheduled and achieved):"]
        out.append("      from       to  scheduled   achieved   count    errors        p50        p99  start p99")
        for row in data["rate_steps"]:
            out.append(
                f"  {row['from_s']:6.2f} s {row['to_s']:6.2f} s {row['scheduled_rps']:10.2f} {row['rps']:10.2f} "
                f"{row['count']:7d} {100 * row['error_rate']:6.2f} % {_ms(row['p50_ms']):>10} "
                f"{_ms(row['p99_ms']):>10} {_ms(row['start_delay_p99_ms']):>10}"
            )
    return "\n".join(out)


def _latency_over(data: dict[str, Any]) -> str:
    """Which calls the latency figures time. A report from before `latency_over` timed every call."""
    timed = data["latency_ms"]["count"]
    if untimed := _untimed(data):
        return f"none: {untimed}"
    if data.get("latency_over", "all") == "all":
        return f"all {timed} calls, failed ones included (--count-errors)"
    failed = data["count"] - data["status_codes"].get("OK", 0)
    left_out = f"; {failed} failed left out (--count-errors times them too)" if failed else ""
    return f"the {timed} OK calls{left_out}"


def _untimed(data: dict[str, Any]) -> str:
    """Why no call was timed, or "" if some were."""
    if data["latency_ms"]["count"]:
        return ""
    if not data["count"]:
        return "no call completed"
    return "no call was OK (--count-errors times the failed ones)"


def _schedule_text(data: dict[str, Any]) -> str:
    return Schedule.from_json(data.get("load_schedule") or {"kind": "const", "rate": data["rate"]}).describe()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def customer_numbers(call: int, per: int, customers: int) -> list[int]:
    """The customer numbers (1..`customers`, the sample PII API's range) that call number `call` sends to.

    The calls take the customers in turn, `per` at a time, and wrap from the last back to the first, so
    every customer is sent to before any is sent to again: call 0 has 1..per, call 1 per+1..2*per, and so
    on. A call with more recipients than there are customers repeats some (the CLI refuses that).
    """
    customers = max(1, customers)
    start = call * per
    return [(start + k) % customers + 1 for k in range(per)]


async def run_load(options: LoadOptions, stop: asyncio.Event | None = None) -> LoadResult:
    """The run `options` describe; `stop` set ends it early, reporting the calls completed by then."""
    return await drive_load(options, await connect(options), stop)


async def connect(options: LoadOptions) -> list[grpc.aio.Channel]:
    """The channels to the dispatcher, ready; SystemExit saying so if it cannot be reached."""
    channel_options = [*workload.GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.secure_channel(options.target, options.credentials, options=channel_options)
        if options.credentials is not None
        else grpc.aio.insecure_channel(options.target, options=channel_options)
        for _ in range(max(1, options.connections))
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_SECONDS)
    except TimeoutError:
        why = await why_unreachable(channels[0], options)
        for channel in channels:
            await channel.close()
        raise SystemExit(
            why
            or f"cannot reach a dispatcher at {options.target} in {CONNECT_SECONDS:g} s; is it running? "
            "(--target; --tls and --tls-ca-file if it serves TLS)"
        ) from None
    return channels


async def why_unreachable(channel: grpc.aio.Channel, options: LoadOptions) -> str:
    """What the last attempt to connect met when it was not simply nothing listening, in the CLI's words (a
    plaintext port given --tls, a server that is not gRPC, a certificate not trusted), from one health check
    that does not wait for the channel; else ""."""
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CONNECT_SECONDS)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return connection_problem("dispatcher", options.target, error.details() or "", "--target") or ""
    return ""


async def drive_load(
    options: LoadOptions, channels: list[grpc.aio.Channel], stop: asyncio.Event | None = None
) -> LoadResult:
    """The calls through `channels` (closed at the end)."""
    metadata = (("authorization", f"Bearer {options.token}"),) if options.token else None
    stubs = [dpb_grpc.DispatcherServiceStub(ch) for ch in channels]
    result = LoadResult()
    run_id = uuid.uuid4().hex[:8]
    numbers = itertools.count()
    family = options.family
    connector = options.connector_id

    def request(n: int) -> dpb.DispatchRequest:
        return dpb.DispatchRequest(
            workspace_id=options.workspace,
            campaign_id="load",
            campaign_instance_id=f"load-{run_id}-{n}",  # a new instance per call: never DUPLICATE
            channel=workload.CHANNELS[family],
            connector_id=connector,
            content=workload.CONTENTS[family],
            recipients=[
                dpb.Recipient(anonymous_id=workload.anonymous_id(i), attributes={"tier": "gold"})
                for i in customer_numbers(n, options.recipients_per_call, options.customers)
            ],
        )

    completed = itertools.count(1)

    def record(delay: float | None) -> bool:
        """A completed call's start delay; False for a warm-up call (ghz's --skipFirst: the first to complete)."""
        if next(completed) <= options.skip_first:
            result.skipped += 1
            result.warmup_seconds = time.monotonic() - begun
            return False
        if delay is not None:
            result.start_delays.append(delay)
        return True

    async def call(stub: dpb_grpc.DispatcherServiceStub, tick: float | None = None) -> None:
        message = request(next(numbers))
        delay = None if tick is None else time.monotonic() - tick
        since_start = time.monotonic() - begun
        started = time.perf_counter()
        try:
            reply = await stub.Dispatch(message, timeout=options.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            latency = time.perf_counter() - started
            if record(delay):
                code, details = exc.code().name, (exc.details() or "")[:120]
                result.codes[code] += 1
                result.errors[f"{code}: {details}"] += 1
                result.calls.append(Call(since_start, latency, code, details, delay=delay))
            return
        latency = time.perf_counter() - started
        if record(delay):
            statuses = Counter(
                dpb.DispatchStatus.Name(r.status).removeprefix("DISPATCH_STATUS_") for r in reply.results
            )
            result.codes["OK"] += 1
            result.dispatch_statuses.update(statuses)
            result.calls.append(Call(since_start, latency, "OK", statuses=statuses, delay=delay))

    # -z: the run lasts `duration`. -n: it ends when its calls are done, or at -x if that comes first.
    total = options.total
    plan = options.plan
    allowed = options.max_duration if total else options.duration
    begun = time.monotonic()
    deadline = begun + allowed if allowed else math.inf
    ended: float | None = None  # when the last call came back, before the clients are stopped

    async def fixed_rate() -> None:
        nonlocal begun, deadline, ended
        ticks: asyncio.Queue[float] = asyncio.Queue()
        busy = [0]

        async def schedule() -> None:
            for i, offset in enumerate(itertools.islice(plan.tick_times(), total or None)):
                at = begun + offset
                if at >= deadline:
                    return
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif time.monotonic() >= deadline:
                    # Behind at the end (a rate faster than this loop can tick): the ticks left would
                    # start after the deadline; counted as not started rather than queued one by one.
                    left = math.ceil(plan.calls_by(deadline - begun)) - i
                    if total:
                        left = min(left, total - i)
                    result.late += left
                    result.not_started += left
                    return
                else:
                    await asyncio.sleep(0)  # behind: the clients take the ticks queued so far
                if ticks.qsize() > 0 or busy[0] >= options.concurrency:
                    result.late += 1
                ticks.put_nowait(at)

        async def client(index: int) -> None:
            stub = stubs[index % len(stubs)]
            while True:
                tick = await ticks.get()
                if time.monotonic() >= deadline:
                    result.not_started += 1
                    continue
                busy[0] += 1
                try:
                    await call(stub, tick)
                finally:
                    busy[0] -= 1

        clients = [asyncio.create_task(client(i)) for i in range(options.concurrency)]
        try:
            # The clock starts once every client waits for a tick (one turn of the loop runs each up to it):
            # tens of thousands take a while to start, which would read as start delays, late ticks and calls
            # not started, as if the dispatcher had fallen behind.
            await asyncio.sleep(0)
            begun = time.monotonic()
            deadline = begun + allowed if allowed else math.inf
            await schedule()
            # A -z run lasts its duration: the last tick comes an interval before its end. Then the
            # ticks queued are taken (after the deadline, as not started) and calls in flight finish.
            while (not total and time.monotonic() < deadline) or (
                (ticks.qsize() or busy[0]) and time.monotonic() < deadline + options.timeout
            ):
                await asyncio.sleep(0.01)
            result.not_started += ticks.qsize()
            ended = time.monotonic()
        finally:  # interrupted too: no client is left waiting for a tick
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

    async def closed_loop(index: int, claimed: itertools.count[int]) -> None:
        stub = stubs[index % len(stubs)]
        while time.monotonic() < deadline and (not total or next(claimed) < total):
            await call(stub)

    async def drive() -> None:
        if plan.start > 0:
            await fixed_rate()
        else:
            claimed = itertools.count()
            await asyncio.gather(*(closed_loop(i, claimed) for i in range(options.concurrency)))

    running = asyncio.create_task(drive())
    stopping = asyncio.create_task(stop.wait()) if stop is not None else None
    tasks = [t for t in (running, stopping) if t is not None]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if not running.done():  # stopped: the calls in flight are cut off, those completed reported
            result.end_reason = "cancel"
        else:
            running.result()  # its error, if any
        result.seconds = (ended or time.monotonic()) - begun
        if result.end_reason == "normal" and total and result.count + result.skipped < total:
            result.end_reason = "timeout"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return result


def no_success(data: dict[str, Any]) -> str | None:
    """What a run's report says when no call in it succeeded, in a line, or None: the run then exits 1 (the
    dispatcher down, refusing every call, or nothing measured at all), where one with some calls failed exits 0
    as ghz does, its error rate in the report."""
    count, codes = data.get("count", 0), data.get("status_codes", {})
    if codes.get("OK", 0):
        return None
    if count:
        failed = ", ".join(f"{code} {n}" for code, n in sorted(codes.items(), key=lambda item: -item[1]))
        return f"no call succeeded: all {count} failed ({failed}); the report names their errors"
    if data.get("skipped"):
        return f"no call was measured: the {data['skipped']} that completed were warm-up calls (--skip-first)"
    return "no call completed: the run ended before any came back (-z, -n and -x set its length)"


def write_report(data: dict[str, Any], result: LoadResult, options: LoadOptions) -> None:
    """The report in -O/--format to -o/--output or stdout, and --json's file. The summary is printed
    whatever the format: on stderr when stdout carries the JSON or CSV, so that it can be piped. The files
    come first: a reader of stdout that stops early (`| head`) loses none of them."""
    summary = render(data)
    piped = options.output_format != "text" and not options.output_path
    if options.output_format == "csv":
        report = calls_csv(result.calls)
    elif options.output_format == "json":
        report = json.dumps(data, indent=2) + "\n"
    else:
        report = summary + "\n"
    unwritten = []  # a file that cannot be written (a full disk) loses neither the other outputs nor the summary
    for flag, path, text in (
        ("--json", options.json_path, json.dumps(data, indent=2) + "\n"),
        ("-o", options.output_path, report),
    ):
        if path:
            try:
                Path(path).write_text(text)
            except OSError as exc:
                unwritten.append(f"{flag} {path}: {exc.strerror or type(exc).__name__}")
    print(summary, file=sys.stderr if piped else sys.stdout)  # noqa: T201 - the CLI's output
    if piped:
        sys.stdout.write(report)
    if unwritten:
        sys.stdout.flush()
        raise SystemExit(f"bench load: cannot write {'; '.join(unwritten)}")


async def main_async(options: LoadOptions) -> dict[str, Any]:
    started_here: list[peers.Peer] = []
    services = None
    try:
        if not options.target:
            await workload.require_redis(options.redis_url)
            options.log_dir.mkdir(parents=True, exist_ok=True)
            print(f"starting a suite for the load test (logs in {options.log_dir}) ...", file=sys.stderr)  # noqa: T201
            pii = await peers.start_pii_api(options.log_dir, options.customers)
            started_here.append(pii)
            providers = await peers.start_providers(options.log_dir)
            started_here.append(providers)
            services = await peers.start_services(
                peers.ServiceOptions(
                    redis_url=options.redis_url,
                    extra_env={"TOKENSEND_EVENT_LOOP": options.event_loop},
                    dispatcher_cpus=peers.dispatcher_cpus(options.dispatcher_cpus, options.dispatchers),
                ),
                options.log_dir,
                dispatchers=options.dispatchers,
            )
            options.workspace = options.workspace or f"load-{uuid.uuid4().hex[:8]}"
            await workload.configure(
                f"127.0.0.1:{services.resolver.port}",
                f"127.0.0.1:{services.dispatcher.port}",
                options.workspace,
                f"http://127.0.0.1:{pii.port}",
                f"http://127.0.0.1:{providers.port}",
            )
            options.target = f"127.0.0.1:{services.dispatcher.port}"
        if not options.workspace:
            raise SystemExit("--workspace is required with --target (the workspace whose connector to send through)")
        # With the suite started here, each process's CPU time per call: steadier than calls per second
        # when the machine is shared, and it says where a call's cost goes.
        watched = [*services.all, *started_here] if services is not None else []
        cpu_before = [p.cpu() for p in watched]
        redis_before = await workload.redis_cpu_seconds(options.redis_url) if watched else None
        client_before = time.process_time()
        stop = asyncio.Event()
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        # The run in a task of its own, so that an interrupt of this one stops it rather than losing it.
        running = asyncio.ensure_future(drive_load(options, await connect(options), stop))
        try:
            result = await asyncio.shield(running)
        except asyncio.CancelledError:
            # Ctrl-C or SIGTERM: asyncio.run cancels this task. As ghz, the run stops and the calls that
            # completed are reported; a second Ctrl-C ends everything at once.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            stop.set()
            result = await running
        data = result.to_json(options)
        data["started_at"] = started_at
        data["machine"] = peers.machine_facts()
        if services is not None:
            cpu = peers.cpu_since(watched, cpu_before)
            cpu["client"] = time.process_time() - client_before
            cpu.update(await workload.redis_cpu_since(options.redis_url, redis_before))
            if calls := result.count + result.skipped:  # the CPU time covers the warm-up calls too
                data["cpu_ms_per_call"] = {name: round(seconds * 1000 / calls, 3) for name, seconds in cpu.items()}
            if ended := [p.name for p in watched if p.name not in cpu]:
                data["cpu_not_measured"] = ended  # ended during the run: "all" leaves them out
            services.sample()
            data["peak_rss_kb"] = {p.name: p.peak_rss_kb for p in services.all}
            data["suite"] = {
                "dispatchers": options.dispatchers,
                "dispatcher_cpus": options.dispatcher_cpus,
                "event_loop": options.event_loop,
            }
        write_report(data, result, options)
        return data
    finally:
        if services is not None:
            await services.stop()
            await workload.forget_workspaces(
                options.redis_url, [options.workspace, workload.overhead_workspace(options.workspace)]
            )
        for peer in reversed(started_here):
            await peer.stop()
