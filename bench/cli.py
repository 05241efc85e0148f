"""`python -m bench`: the benchmark table; `python -m bench load`: a ghz-style load test;
`python -m bench compare OLD NEW`: runs side by side; `python -m bench ab OTHER_TREE`: two resolvers
side by side, call by call."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.schedule import Schedule
from cli.flags import join_dash_values
from cli.rpc import grpc_address  # a port gRPC cannot dial is refused now, not after the 10 s wait for a channel
from libs.arguments import number, redis_address

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("sizes are integers separated by commas") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("at least one positive size")
    return sizes


def _sections(text: str) -> tuple[str, ...]:
    from bench.run import SECTIONS

    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections are some of {', '.join(SECTIONS)}")
    return chosen


_count = number(int, 1)
_batch = number(int, 1, high=10_000)  # TOKENSEND_BATCH_SIZE's range
_rate = number(float, 0)
_seconds = number(float, 0, above=True)
_deadline = number(float, 0, above=True, high=86400)  # as the CLI's --timeout: gRPC expires far larger ones at once
_positive_rate = number(float, 0, above=True)
_rate_change = number(float, -math.inf)  # either sign: a schedule steps up or down


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("use NAME=VALUE")
    name = name.upper()
    return (name if name.startswith("TOKENSEND_") else f"TOKENSEND_{name}"), value


def _dispatcher_cpus(text: str) -> str:
    if text in ("auto", "none"):
        return text
    if not all(part.strip().isdigit() for part in text.split(",")):
        raise argparse.ArgumentTypeError("auto, none, or CPU numbers separated by commas (one per dispatcher process)")
    # Found now, not when the dispatcher refuses its TOKENSEND_CPU_AFFINITY after the peers have started.
    allowed = os.sched_getaffinity(0)
    outside = sorted({int(part) for part in text.split(",")} - allowed)
    if outside:
        usable = ",".join(str(cpu) for cpu in sorted(allowed))
        raise argparse.ArgumentTypeError(f"names CPUs this process may not use: {outside} (it may use {usable})")
    return text


DISPATCHER_CPUS_HELP = (
    "the CPU each dispatcher process is bound to (TOKENSEND_CPU_AFFINITY): auto (default) one each from "
    "the last CPU down, none to leave them to the system, or a list such as 1,0"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmarks tokensend against a bare asyncio + aiohttp baseline on real Redis and the sandbox peers, "
            "prints one table and writes bench/results/<timestamp>.json (and latest.json). "
            "`python -m bench load --help` for the load test; `python -m bench compare OLD NEW` puts the JSON "
            "of several runs side by side."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (2,000 and 20,000) and fewer resolver calls")
    parser.add_argument(
        "--only", type=_sections, help="comma-separated sections: sms,email,baseline,resolver,tracing,profile"
    )
    parser.add_argument("--sizes", type=_sizes, help="campaign sizes (default 20000,200000)")
    parser.add_argument(
        "--redis-url", type=redis_address, default=os.environ.get("TOKENSEND_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument("--sms-connector", choices=("gateway", "twilio"), default="gateway")
    parser.add_argument("--batch-size", type=_batch, default=500, help="dispatcher batch size and stream part size")
    parser.add_argument(
        "--window", type=_count, default=3, help="stream parts in flight ahead of their results (default 3)"
    )
    parser.add_argument("--overhead-calls", type=_count, help="ResolveContacts calls per resolver measurement")
    parser.add_argument("--tracing-size", type=number(int, 0), default=0, help="campaign size of the tracing section")
    parser.add_argument("--profile", action="store_true", help="add the profile section (needs py-spy)")
    parser.add_argument("--dispatcher-cpus", type=_dispatcher_cpus, default="auto", help=DISPATCHER_CPUS_HELP)
    parser.add_argument(
        "--set",
        dest="settings",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra service setting, e.g. --set SEND_CONCURRENCY=128 or --set EVENT_LOOP=asyncio",
    )
    parser.add_argument("--results-dir", type=Path, help="where the JSON goes (default bench/results)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def build_load_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench load",
        description=(
            "N concurrent gRPC clients calling Dispatch at a fixed rate (or one that steps or rises, "
            "--load-schedule) for a fixed time (like ghz). Without --target it starts its own suite on loopback."
        ),
        epilog="exit status: 0 when some call succeeded (the failed ones are in the report, as in ghz); 1 when no "
        "call succeeded, the dispatcher could not be reached or a report could not be written; 2 for bad options; "
        "130 when interrupted",
    )
    parser.add_argument(
        # None, not "": argparse would run an empty default through the address check.
        "--target",
        type=grpc_address,
        default=None,
        help="dispatcher host:port (default: start a suite here)",
    )
    parser.add_argument("--workspace", default="", help="workspace to send from (required with --target)")
    parser.add_argument("-c", "--concurrency", type=_count, default=10, help="concurrent clients")
    parser.add_argument(
        "-r", "--rate", type=_rate, help="calls per second in total (default 50; 0 = unlimited; const schedule only)"
    )
    parser.add_argument("-z", "--duration", type=_seconds, help="seconds the run lasts (default 10; not with -n)")
    parser.add_argument(
        "-n", "--total", type=_count, help="calls to make, however long they take, instead of -z (warm-up included)"
    )
    parser.add_argument(
        "-x", "--max-duration", type=_seconds, help="with -n: seconds after which the run stops, calls made or not"
    )
    parser.add_argument(
        "--skip-first",
        type=number(int, 0),
        default=0,
        help="warm-up: the first calls to complete are left out of every figure (default 0)",
    )
    parser.add_argument(
        "--count-errors",
        action="store_true",
        help="time the failed (non-OK) calls too: the latency figures cover every call (default: the OK "
        "calls only, as ghz; a call that fails fast would pull them down)",
    )
    parser.add_argument("--recipients", type=_count, default=10, help="recipients per Dispatch call")
    parser.add_argument("--family", choices=("sms", "email"), default="sms")
    parser.add_argument("--connector", default="", help="connector ID (default gateway for SMS, sendgrid for Email)")
    parser.add_argument("--customers", type=_count, default=20_000, help="IDs cust-000001.. to cycle through")
    parser.add_argument("--timeout", type=_deadline, default=30.0, help="deadline of each call, seconds")
    parser.add_argument("--connections", type=_count, default=1, help="gRPC channels shared by the clients")
    parser.add_argument("--json", dest="json_path", default="", help="also write the report as JSON here")
    parser.add_argument(
        "-O",
        "--format",
        dest="output_format",
        choices=("text", "json", "csv"),
        default="text",
        help="the report printed: text (the summary, default), json, or csv (one row per call; the summary "
        "then goes to stderr unless -o is given)",
    )
    parser.add_argument(
        "-o", "--output", dest="output_path", default="", metavar="PATH", help="write the -O report here, not stdout"
    )
    schedule = parser.add_argument_group("a rate that moves (as ghz's --load-schedule)")
    schedule.add_argument(
        "--load-schedule",
        choices=("const", "step", "line"),
        default="const",
        help="const (-r throughout, default); step: --load-start, then --load-step more every "
        "--load-step-duration; line: --load-step more each second, continuously",
    )
    schedule.add_argument(
        "--load-start", type=_positive_rate, metavar="RATE", help="calls per second at the start (step, line)"
    )
    schedule.add_argument(
        "--load-step",
        type=_rate_change,
        metavar="RATE",
        help="calls per second added (negative: taken away) each step or second",
    )
    schedule.add_argument("--load-step-duration", type=_seconds, metavar="SECONDS", help="seconds of each step (step)")
    schedule.add_argument(
        "--load-end", type=_positive_rate, metavar="RATE", help="the rate held once reached (step, line)"
    )
    schedule.add_argument(
        "--load-max-duration",
        type=_seconds,
        metavar="SECONDS",
        help="seconds after which the rate is held where it is (step, line)",
    )
    target = parser.add_argument_group("a dispatcher of your own (with --target)")
    target.add_argument(
        "--token", default=None, help="bearer token the dispatcher grants (default: $TOKENSEND_TOKEN; never printed)"
    )
    target.add_argument(
        "--tls", action="store_true", help="use TLS (default: plaintext, unless a --tls-* file is given)"
    )
    target.add_argument(
        "--tls-ca-file", metavar="PEM", help="CA bundle trusted for its certificate (default: the system's)"
    )
    target.add_argument("--tls-cert-file", metavar="PEM", help="client certificate, for mTLS")
    target.add_argument("--tls-key-file", metavar="PEM", help="the client certificate's private key")
    own = parser.add_argument_group("the suite started here (not with --target)")
    own.add_argument("--dispatchers", type=_count, help="dispatcher processes on one port (default 1)")
    own.add_argument("--dispatcher-cpus", type=_dispatcher_cpus, help=DISPATCHER_CPUS_HELP)
    own.add_argument(
        "--event-loop", choices=("uvloop", "asyncio"), help="the services' event loop (TOKENSEND_EVENT_LOOP; uvloop)"
    )
    own.add_argument("--redis-url", type=redis_address, help="the Redis it uses (TOKENSEND_REDIS_URL or the default)")
    return parser


# The load test's options whose value may begin with "-": a number (--load-step is negative to step down; any
# other, refused by its own check, which names it), a token or a file name that begins so.
LOAD_DASH_VALUE_OPTIONS = frozenset(
    {
        *("-c", "--concurrency", "-r", "--rate", "-z", "--duration", "-n", "--total", "-x", "--max-duration"),
        *("--skip-first", "--recipients", "--customers", "--timeout", "--connections", "--dispatchers"),
        *("--load-start", "--load-step", "--load-step-duration", "--load-end", "--load-max-duration"),
        *("--token", "--json", "-o", "--output", "--tls-ca-file", "--tls-cert-file", "--tls-key-file"),
    }
)

# What a load test starts its own suite with when not told.
OWN_SUITE_DEFAULTS = {"dispatchers": 1, "dispatcher_cpus": "auto", "event_loop": "uvloop"}


def own_suite_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The own-suite flags given with --target would be ignored: refused instead; else defaulted."""
    given = [name for name in (*OWN_SUITE_DEFAULTS, "redis_url") if getattr(args, name) is not None]
    if args.target and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"{flags}: for the suite started here, not with --target")
    for name, value in OWN_SUITE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.redis_url is None:
        args.redis_url = os.environ.get("TOKENSEND_REDIS_URL", DEFAULT_REDIS_URL)


def run_length(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """-z, or -n capped by -x. ghz ignores -n beside -z; a flag that would be ignored is refused instead."""
    if args.total is not None and args.duration is not None:
        parser.error("-n/--total, -z/--duration: one or the other (-n with -x/--max-duration stops at whichever first)")
    if args.max_duration is not None and args.total is None:
        parser.error("-x/--max-duration: caps a -n/--total run (-z/--duration alone sets a run's time)")
    if args.total is not None and args.skip_first >= args.total:
        parser.error(f"--skip-first ({args.skip_first}) must be less than -n/--total ({args.total})")
    if args.total is None and args.duration is None:
        args.duration = 10.0


SCHEDULE_FLAGS = ("load_start", "load_step", "load_step_duration", "load_end", "load_max_duration")


def load_schedule(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Schedule | None:
    """The schedule the --load-* flags describe (None: const at -r). A flag that would be ignored is
    refused, as is a rate that would fall to 0 and stay there."""
    kind = args.load_schedule
    if kind == "const":
        given = [name for name in SCHEDULE_FLAGS if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            parser.error(f"{flags}: for --load-schedule step or line (const keeps -r/--rate throughout)")
        if args.rate is None:
            args.rate = 50.0
        return None
    if args.rate is not None:
        parser.error(f"-r/--rate: for --load-schedule const ({kind} sets the rate with --load-start and --load-step)")
    if args.load_start is None:
        parser.error(f"--load-start is required with --load-schedule {kind}")
    if not args.load_step:
        parser.error(f"--load-step must be non-zero with --load-schedule {kind}")
    if kind == "step" and args.load_step_duration is None:
        parser.error("--load-step-duration is required with --load-schedule step")
    if kind == "line" and args.load_step_duration is not None:
        parser.error("--load-step-duration: for --load-schedule step (line adds --load-step each second)")
    start, step, end = args.load_start, args.load_step, args.load_end
    if end is not None and step > 0 and end <= start:
        parser.error(f"--load-end ({end:g}) must be above --load-start ({start:g}) with a positive --load-step")
    if end is not None and step < 0 and end >= start:
        parser.error(f"--load-end ({end:g}) must be below --load-start ({start:g}) with a negative --load-step")
    schedule = Schedule(kind, start, step, args.load_step_duration or 0.0, end or 0.0, args.load_max_duration or 0.0)
    if step < 0 and end is None:
        if args.load_max_duration is None:
            parser.error("--load-step below 0 needs --load-end or --load-max-duration: the rate would fall to 0")
        if schedule.rate_at(args.load_max_duration) <= 0:
            parser.error(
                f"--load-max-duration ({args.load_max_duration:g}): the rate falls to 0 by then; "
                "give a shorter one or --load-end"
            )
    return schedule


def _output_file(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """Found now, not after the run, when the report is to be written: the file is opened for writing
    (a file already there is not emptied; one made here is removed again)."""
    file = Path(path)
    folder = file.resolve().parent
    if not folder.is_dir():
        parser.error(f"{flag}: cannot write in {folder}")
    try:
        if file.is_dir():
            parser.error(f"{flag}: {path} is a directory; name a file")
        existed = file.exists()
        with file.open("a"):
            pass
    except OSError as exc:
        parser.error(f"{flag}: cannot write {path}: {exc.strerror or type(exc).__name__}")
    if not existed:
        file.unlink(missing_ok=True)


def results_folder(parser: argparse.ArgumentParser, path: Path) -> None:
    """--results-dir made now, or refused, rather than failing once the run has started (or ended)."""
    if path.exists() and not path.is_dir():
        parser.error(f"--results-dir: {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        parser.error(f"--results-dir: cannot write in {path}: {exc.strerror or type(exc).__name__}")


def main(argv: list[str] | None = None) -> int:
    from sandbox.processes import sigterm_as_interrupt

    with sigterm_as_interrupt():
        return guarded_output(lambda: _main(list(sys.argv[1:] if argv is None else argv)), "bench")


def guarded_output(entry: Callable[[], int], prog: str) -> int:
    """`entry`, its output guarded as the tokensend command's is: a write that fails (a full disk) is one
    line naming it, exit 1, not a traceback (the report files are written first, and kept); one to a
    standard output closed before it began (`>&-`) is noted, exit 1, rather than dropped without a word."""
    from cli.exits import STDOUT_CLOSED, OutputFailed, guarded_stdout, stdout_lost

    with guarded_stdout():
        try:
            code = _run(entry, prog)
            if stdout_lost():
                print(f"{prog}: {STDOUT_CLOSED}: what it printed was lost", file=sys.stderr)  # noqa: T201
                return code or 1
            return code
        except OutputFailed as failed:
            print(f"{prog}: {failed.message}", file=sys.stderr)  # noqa: T201
            return 1


def _run(entry: Callable[[], int], prog: str) -> int:
    from bench.peers import PeerStartError

    try:
        return entry()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the processes it started are stopped", file=sys.stderr)  # noqa: T201
        return 130
    except PeerStartError as exc:  # a setting a service refused (--set), a port taken: its log says which
        print(f"{prog}: {exc}\nthe processes it started are stopped", file=sys.stderr)  # noqa: T201
        return 1
    except BrokenPipeError:  # `| head`: stop quietly, as if the output was read; the report files are written
        from cli.exits import discard_stdout

        discard_stdout()
        return 0


def _main(argv: list[str]) -> int:
    if argv[:1] == ["load"]:
        return load_main(argv[1:])
    if argv[:1] == ["compare"]:
        from bench.compare import main as compare_main

        return compare_main(argv[1:])
    if argv[:1] == ["ab"]:
        from bench.ab import main as ab_main

        return ab_main(argv[1:])
    if argv[:1] == ["instructions"]:
        from bench.instructions import main as instructions_main

        return instructions_main(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.results_dir is not None:
        results_folder(parser, args.results_dir)  # before the run, not after it

    from bench import report
    from bench.run import DEFAULT_SECTIONS, FULL_SIZES, QUICK_SIZES, RunOptions, run_benchmark

    options = RunOptions(
        sizes=args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES),
        sections=args.only or (DEFAULT_SECTIONS + (("profile",) if args.profile else ())),
        redis_url=args.redis_url,
        sms_connector=args.sms_connector,
        batch_size=args.batch_size,
        window=args.window,
        overhead_calls=args.overhead_calls or (100 if args.quick else 1000),
        tracing_size=args.tracing_size,
        service_env=dict(args.settings),
        dispatcher_cpus=args.dispatcher_cpus,
        quick=args.quick,
        progress=not args.quiet,
    )
    if args.results_dir is not None:
        options.results_dir = args.results_dir
    results = asyncio.run(run_benchmark(options))
    if results.get("interrupted") and not _measured(results):
        print(
            "bench: interrupted before a measurement completed; the processes it started are stopped", file=sys.stderr
        )  # noqa: T201
        return 130
    stamp = results["started_at"].replace("-", "").replace(":", "").replace("+0000", "Z")
    try:
        path = report.write_results(results, options.results_dir, stamp.replace("+00:00", "Z"))
    except OSError as exc:  # a full disk: the table is still printed, the run not lost to a traceback
        print(report.render(results))  # noqa: T201 - the CLI's output
        print(f"bench: cannot write the results in {options.results_dir}: {exc.strerror or exc}", file=sys.stderr)  # noqa: T201
        return 1
    print(report.render(results))  # noqa: T201 - the CLI's output
    print(f"results: {path}")  # noqa: T201
    if results.get("interrupted"):
        print(
            "bench: interrupted; the table holds the measurements completed, the processes it started are stopped",
            file=sys.stderr,
        )  # noqa: T201
        return 130
    return 0


def _measured(results: dict) -> bool:
    return any(results.get(key) for key in ("dispatch", "resolver_overhead", "tracing", "profiles"))


def load_main(argv: list[str]) -> int:
    parser = build_load_parser()
    args = parser.parse_args(join_dash_values(argv, LOAD_DASH_VALUE_OPTIONS))
    if args.target and not args.workspace:
        parser.error("--workspace is required with --target (the workspace whose connector to send through)")
    own_suite_options(parser, args)
    run_length(parser, args)
    schedule = load_schedule(parser, args)
    token, credentials = _connection(parser, args)
    if args.recipients > args.customers:
        parser.error(f"--recipients ({args.recipients}) must not exceed --customers ({args.customers})")
    if args.json_path:
        _output_file(parser, "--json", args.json_path)
    if args.output_path:
        _output_file(parser, "-o/--output", args.output_path)
    from bench.load import LoadOptions, main_async, no_success

    options = LoadOptions(
        target=args.target or "",
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration or 0.0,
        total=args.total or 0,
        max_duration=args.max_duration or 0.0,
        skip_first=args.skip_first,
        count_errors=args.count_errors,
        recipients_per_call=args.recipients,
        family=args.family,
        connector=args.connector,
        workspace=args.workspace,
        customers=args.customers,
        timeout=args.timeout,
        connections=args.connections,
        dispatchers=args.dispatchers,
        dispatcher_cpus=args.dispatcher_cpus,
        event_loop=args.event_loop,
        redis_url=args.redis_url,
        json_path=args.json_path,
        schedule=schedule,
        output_format=args.output_format,
        output_path=args.output_path,
        token=token,
        credentials=credentials,
    )
    data = asyncio.run(main_async(options))
    if data["end_reason"] == "cancel":
        stopped = "" if args.target else "; the processes it started are stopped"
        print(f"bench load: interrupted; the report covers the calls that completed{stopped}", file=sys.stderr)  # noqa: T201
        return 130
    failure = no_success(data)
    if failure is not None:  # exit 1, as for a dispatcher not reached: the run measured no working call
        print(f"bench load: {failure}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


def _connection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str | None, object]:
    """The token and TLS credentials to reach a dispatcher of one's own with, as the CLI reads them.
    The suite started here is plaintext and grants every call: they are refused without --target."""
    tls_flags = [f for f in ("tls", "tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(args, f)]
    if not args.target:
        if args.token is not None or tls_flags:
            flags = ", ".join(
                "--" + f.replace("_", "-") for f in (["token"] if args.token is not None else []) + tls_flags
            )
            parser.error(f"{flags}: for a dispatcher of your own (--target), not the suite started here")
        return None, None
    from cli.exits import UsageError
    from cli.rpc import ClientOptions

    try:
        client = ClientOptions.from_args(args)
    except UsageError as exc:
        parser.error(str(exc))
    return client.token, client.credentials
