"""The benchmark's one table, its targets, and its JSON results (for comparing commits)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEPARATOR: tuple[str, ...] = ()  # a row that draws a line

# The targets: (key, label, operator, threshold).
SMS_RATIO = 0.8
EMAIL_OVER_SMS_BASELINE = 10.0
RESOLVER_P99_MS = 5.0
TRACING_RATIO = 0.9
MEMORY_GROWTH = 1.2


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    op: str  # ">=" or "<="
    threshold: float
    unit: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def verdict(self) -> str:
        if self.met is None:
            return "not measured"
        if self.met:
            return "met"
        gap = abs(self.value - self.threshold)
        return f"MISSED by {gap:.{_places(gap)}f}{self.unit}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": None if self.value is None else round(self.value, 4),
            "op": self.op,
            "threshold": self.threshold,
            "met": self.met,
            "verdict": self.verdict(),
        }


def fmt_int(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def fmt_mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:,.0f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A plain-text table; `SEPARATOR` rows draw a rule. Numbers align right."""
    right = right or [False] + [True] * (len(headers) - 1)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line(headers), rule]
    for row in rows:
        out.append(rule if not row else line(row))
    return "\n".join(out)


HEADERS = ("measurement", "recipients", "msg/s", "p50 ms", "p99 ms", "peak RSS MB", "CPU us/msg", "target", "result")
RIGHT = (False, True, True, True, True, True, True, False, False)
_SHORT = {"resolver": "res", "dispatcher": "disp", "baseline": "", "pii_api": "pii", "providers": "prov"}


def _rss(entry: dict[str, Any]) -> str:
    rss = entry.get("peak_rss_kb") or {}
    if not rss:
        return "-"
    return " / ".join(f"{_SHORT.get(k, k)} {fmt_mb(v)}".strip() for k, v in rss.items())


def _cpu(entry: dict[str, Any]) -> str:
    cpu = entry.get("cpu_us_per_message") or {}
    shown = [(k, v) for k, v in cpu.items() if k in ("resolver", "dispatcher", "baseline")]
    parts = [f"{_SHORT.get(k, k)} {v:,.0f}".strip() for k, v in shown]
    if len(cpu) > len(shown):  # the peers (and Redis) were measured too: what the machine spends per message
        parts.append(f"all {sum(cpu.values()):,.0f}")
    return " / ".join(parts) or "-"


def _cpu_per_call(entry: dict[str, Any], server: str = "resolver") -> str:
    cpu = (entry.get("cpu_us_per_call") or {}).get(server)
    return f"{'res' if server == 'resolver' else 'bare'} {cpu:,.0f} per call" if cpu is not None else "-"


def dispatch_label(entry: dict[str, Any]) -> str:
    family = "SMS" if entry["family"] == "sms" else "Email"
    via = entry.get("connector", "")
    system = entry["system"]
    extra = f", {entry['variant']}" if entry.get("variant") else ""
    return f"{family} via {via}: {system}{extra}"


def _dispatch_row(entry: dict[str, Any], note: str) -> tuple[str, ...]:
    batch = entry.get("batch_ms", {})
    return (
        dispatch_label(entry),
        fmt_int(entry["recipients"]),
        fmt_int(entry.get("throughput")),
        fmt_ms(batch.get("p50")),
        fmt_ms(batch.get("p99")),
        _rss(entry),
        _cpu(entry),
        "",
        note,
    )


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for entry in results.get("dispatch", []):
        short = entry.get("sent", entry["recipients"]) != entry["recipients"]
        rows.append(_dispatch_row(entry, f"sent {entry.get('sent')}" if short else ""))
    overhead = results.get("resolver_overhead", [])
    if overhead and rows:
        rows.append(SEPARATOR)
    for entry in overhead:
        what = "1 ID" if entry["ids_per_call"] == 1 else f"{entry['ids_per_call']} IDs"
        for key, label in (
            ("resolver_ms", "ResolveContacts"),
            ("direct_ms", "PII API direct"),
            ("overhead_ms", "overhead"),
            ("bare_resolver_ms", "bare gRPC server"),
            ("bare_overhead_ms", "bare server's overhead"),
        ):
            if key not in entry:
                continue  # runs before the bare server was measured
            cpu = {"resolver_ms": "resolver", "bare_resolver_ms": "bare_resolver"}.get(key)
            rows.append(
                (
                    f"resolver, {what}: {label}",
                    fmt_int(entry["calls"]),
                    "",
                    fmt_ms(entry[key].get("p50")),
                    fmt_ms(entry[key].get("p99")),
                    _rss(entry) if key == "resolver_ms" else "",
                    _cpu_per_call(entry, cpu) if cpu else "",
                    "",
                    "",
                )
            )
    tracing = results.get("tracing")
    if tracing:
        if rows:
            rows.append(SEPARATOR)
        for key in ("off", "on"):
            note = f"{tracing.get('spans_exported', 0):,} spans" if key == "on" else ""
            rows.append(_dispatch_row(tracing[key], note))
    targets = results.get("targets", [])
    if targets and rows:
        rows.append(SEPARATOR)
    for target in targets:
        rows.append(
            (
                target["name"],
                "",
                "",
                "",
                "",
                "",
                "",
                f"{target['op']} {target['threshold']:g}",
                f"{_value(target['value'], target['threshold'])}: {target['verdict']}",
            )
        )
    for size, ratio in budget_ratios(results):
        rows.append((f"SMS CPU budgets, baseline / suite @ {size:,}", "", "", "", "", "", "", "", _value(ratio)))
    tracing_budget = tracing_budget_ratio(results)
    if tracing_budget is not None:
        rows.append(("Tracing CPU budget, off / on", "", "", "", "", "", "", "", _value(tracing_budget)))
    for size, ratio in bare_email_ratios(results):
        rows.append((f"Email baseline / SMS baseline @ {size:,}", "", "", "", "", "", "", "", _value(ratio)))
    for entry in overhead:
        bare_p99 = (entry.get("bare_overhead_ms") or {}).get("p99")
        if entry["ids_per_call"] > 1 and bare_p99 is not None:
            label = f"bare server's overhead p99, {entry['ids_per_call']} IDs (ms)"
            rows.append((label, "", "", "", "", "", "", "", _value(bare_p99)))
    return rows


def bare_email_ratios(results: dict[str, Any]) -> list[tuple[int, float]]:
    """Per size, the bare baseline's Email rate over its SMS rate: what the Email target's ratio
    reads for a loop doing nothing but the unavoidable HTTP work on this machine (no target)."""
    rates = {
        (entry["family"], entry["recipients"]): entry["throughput"]
        for entry in results.get("dispatch", [])
        if entry["system"] == "baseline" and not entry.get("variant") and entry.get("throughput")
    }
    return [
        (size, rate / rates[("sms", size)])
        for (family, size), rate in sorted(rates.items(), key=lambda item: item[0][1])
        if family == "email" and ("sms", size) in rates
    ]


def _in_providers_units(entry: dict[str, Any]) -> float | None:
    """A row's whole-machine CPU per message over its sandbox providers': the machine's speed drops out."""
    cpu = entry.get("cpu_us_per_message") or {}
    return sum(cpu.values()) / cpu["providers"] if cpu.get("providers") else None


def tracing_budget_ratio(results: dict[str, Any]) -> float | None:
    """Tracing off's whole-machine CPU per SMS over tracing on's, each in its runs' providers' CPU per
    SMS: what on / off would be had the machine's speed not moved between the runs (no target)."""
    tracing = results.get("tracing") or {}
    off, on = (_in_providers_units(tracing[k]) if k in tracing else None for k in ("off", "on"))
    return off / on if off and on else None


def budget_ratios(results: dict[str, Any]) -> list[tuple[int, float]]:
    """Per size, the bare baseline's whole-machine CPU per SMS over the suite's, each counted in its own
    run's sandbox providers' CPU per SMS (the same work whatever code runs, so the machine's speed at
    each run drops out): about what suite / baseline would be on a machine whose speed did not move
    between the two (no target; rows measured without the peers are left out)."""
    totals: dict[tuple[str, int], float] = {}
    for entry in results.get("dispatch", []):
        units = _in_providers_units(entry)
        if entry["family"] == "sms" and not entry.get("variant") and units:
            totals[(entry["system"], entry["recipients"])] = units
    return [
        (size, totals[("baseline", size)] / suite)
        for (system, size), suite in sorted(totals.items(), key=lambda item: item[0][1])
        if system == "suite" and suite > 0 and ("baseline", size) in totals
    ]


def _places(gap: float) -> int:
    """Two decimals, or four when two would round a miss to nothing ("MISSED by 0.00")."""
    return 2 if gap >= 0.005 else 4


def _value(value: float | None, threshold: float | None = None) -> str:
    if value is None:
        return "-"
    places = 2 if threshold is None else _places(abs(value - threshold))
    return f"{value:.{places}f}"


def render(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    title = (
        f"tokensend bench {results.get('started_at', '')}: {machine.get('cores', '?')} cores, "
        f"Python {machine.get('python', '?')}, commit {machine.get('commit', '?')}, "
        f"{results.get('duration_seconds', 0):.0f} s"
    )
    cpus = results.get("options", {}).get("dispatcher_cpus")
    if cpus:
        title += f", dispatcher on CPU {', '.join(cpus)}"
    elif cpus is not None:
        title += ", dispatcher on any CPU"
    if results.get("interrupted"):
        title += "; interrupted: the measurements completed before it"
    notes = (
        "msg/s: recipients / wall time of the whole stream (suite) or loop (baseline). "
        "p50/p99: per batch of 500 for sends (time from the batch being available to its results), "
        "per call for the resolver rows. Peak RSS: VmHWM of each process. "
        "CPU us/msg: CPU time of each process during the stream over recipients (robust to other load); "
        "all: the services or the baseline, plus the sample peers, Redis and, for the suite, the benchmark's "
        "own gRPC client (msg/s cannot exceed cores / all); for ResolveContacts, the resolver's CPU time per call. "
        "Bare gRPC server: python -m bench.bare_resolver, called beside the resolver with the same requests: "
        "Python's gRPC server and HTTP client doing only the PII API request, its parse and the reply "
        "(no validation, limits, retries, spans); its overhead p99 is what the resolver target reads for "
        "that on this machine at that hour (no target). "
        "CPU budgets: the baseline's all over the suite's, each divided by its run's providers' CPU per SMS: "
        "about what suite / baseline would be if the machine's speed did not move between the runs (no target); "
        "the tracing one likewise for on / off. "
        "Email baseline / SMS baseline: the bare loop's own rates, what the Email target's ratio reads with "
        "nothing but the unavoidable HTTP work (no target)."
    )
    return "\n".join([title, render_table(HEADERS, table_rows(results), RIGHT), notes])


def compute_targets(results: dict[str, Any]) -> list[Target]:
    targets: list[Target] = []
    dispatch = results.get("dispatch", [])

    def find(family: str, system: str, recipients: int) -> dict[str, Any] | None:
        for entry in dispatch:
            key = (entry["family"], entry["system"], entry["recipients"])
            if key == (family, system, recipients) and not entry.get("variant"):
                return entry
        return None

    sizes = sorted({e["recipients"] for e in dispatch})
    for size in sizes:
        suite, base = find("sms", "suite", size), find("sms", "baseline", size)
        if suite and base:
            targets.append(
                Target(
                    f"SMS suite / baseline @ {size:,}", _div(suite["throughput"], base["throughput"]), ">=", SMS_RATIO
                )
            )
    for size in sizes:
        email, base = find("email", "suite", size), find("sms", "baseline", size)
        if email and base:
            targets.append(
                Target(
                    f"Email suite / SMS baseline @ {size:,}",
                    _div(email["throughput"], base["throughput"]),
                    ">=",
                    EMAIL_OVER_SMS_BASELINE,
                )
            )
    for entry in results.get("resolver_overhead", []):
        if entry["ids_per_call"] > 1:
            targets.append(
                Target(
                    f"resolver overhead p99, {entry['ids_per_call']} IDs (ms)",
                    entry["overhead_ms"].get("p99"),
                    "<=",
                    RESOLVER_P99_MS,
                    " ms",
                )
            )
    tracing = results.get("tracing")
    if tracing:
        targets.append(
            Target(
                "tracing on / off", _div(tracing["on"]["throughput"], tracing["off"]["throughput"]), ">=", TRACING_RATIO
            )
        )
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        for family in ("sms", "email"):
            low, high = find(family, "suite", small), find(family, "suite", large)
            if not (low and high):
                continue
            for service in ("resolver", "dispatcher"):
                a, b = low["peak_rss_kb"].get(service), high["peak_rss_kb"].get(service)
                targets.append(
                    Target(
                        f"{'SMS' if family == 'sms' else 'Email'} {service} peak RSS {large:,} / {small:,}",
                        _div(b, a),
                        "<=",
                        MEMORY_GROWTH,
                    )
                )
    return targets


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def write_results(results: dict[str, Any], directory: Path, stamp: str) -> Path:
    """`<directory>/<stamp>.json` and a copy as `latest.json` (not for an interrupted run, which would
    stand for the last full one in `compare DIR`); returns the first."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=False, default=_json_default) + "\n"
    path = directory / f"{stamp}.json"
    path.write_text(text)
    if not results.get("interrupted"):
        (directory / "latest.json").write_text(text)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class NotResultsFile(ValueError):
    """A file given as results that is not one this version of bench wrote: the CLIs print its message
    (which names the file) and exit 2, as for any argument they cannot use."""


def results_file(path: Path) -> Path:
    return path / "latest.json" if path.is_dir() else path


def load(path: Path) -> dict[str, Any]:
    """A results file, or a results directory's latest.json; NotResultsFile naming the path otherwise."""
    file = results_file(path)
    try:
        results = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise NotResultsFile(f"{file}: not a benchmark results file ({type(exc).__name__})") from None
    if not isinstance(results, dict) or (results.get("schema") != 1 and not is_load_report(results)):
        raise NotResultsFile(f"{file}: not a benchmark results file (no schema 1)")
    if is_load_report(results) and results.get("schema", 1) != 1:  # reports before schema 1 had none
        raise NotResultsFile(f"{file}: schema {results['schema']!r}: not a results file this version of bench wrote")
    return results


# What reading a file edited by hand, or another tool's, can raise once it has passed `load`.
MALFORMED = (KeyError, TypeError, AttributeError, ValueError, IndexError)


def malformed(file: Path, exc: Exception) -> str:
    """The message for a results file whose keys or values are not what bench writes."""
    problem = f"has no {exc.args[0]!r}" if isinstance(exc, KeyError) else f"a value bench would not write ({exc})"
    return f"{file}: {problem}: not a results file this version of bench wrote"


def is_load_report(results: dict[str, Any]) -> bool:
    """A `python -m bench load --json` report (those written before it said its kind too)."""
    return results.get("kind") == "load" or ("load_schedule" in results and "latency_ms" in results)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report [FILE]`: the table of an earlier run (default bench/results/latest.json)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("file", nargs="?", default=str(Path(__file__).resolve().parent / "results" / "latest.json"))
    args = parser.parse_args(argv)
    try:
        results = load(Path(args.file))
        if is_load_report(results):
            from bench.load import render as render_load

            text = render_load(results)
        else:
            results["targets"] = [t.to_json() for t in compute_targets(results)]  # judged by today's rules
            text = render(results)
    except NotResultsFile as exc:
        print(exc, file=sys.stderr)  # noqa: T201 - a CLI
        return 2
    except MALFORMED as exc:
        print(malformed(results_file(Path(args.file)), exc), file=sys.stderr)  # noqa: T201 - a CLI
        return 2
    try:
        print(text)  # noqa: T201 - a CLI
    except BrokenPipeError:  # `| head`: stop quietly, as if the output was read
        from cli.exits import discard_stdout

        discard_stdout()
    return 0


if __name__ == "__main__":
    from bench.cli import guarded_output

    raise SystemExit(guarded_output(main, "bench.report"))
