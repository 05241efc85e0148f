"""`python -m bench compare OLD NEW...`: results of several runs side by side, with the change.

Each argument is a results file (`bench/results/<stamp>.json`) or a results directory (its
`latest.json`). Measurements are matched by what they measured (family, connector, system, variant
and size; IDs per call for the resolver), so runs of different sections compare where they overlap.
Load test reports (`python -m bench load --json FILE`) compare with each other the same way: rates,
error rates, latencies and, where the load test started the suite, each process's CPU per call and
peak memory; the settings that differ between them are listed first, since they move every figure.

On a machine whose speed moves from run to run, messages a second move with it. The sandbox
providers do the same work for the same requests whatever code is measured, so each process's CPU
per message divided by theirs (the `÷ providers` rows) compares code, not hours: that is how the
side-by-side runs in docs/performance-history.md were judged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.report import (
    MALFORMED,
    NotResultsFile,
    dispatch_label,
    fmt_int,
    fmt_mb,
    fmt_ms,
    is_load_report,
    load,
    malformed,
    render_table,
    results_file,
)

Row = tuple[str, ...]
# The processes whose code is measured (the peers' and the client's share hardly moves).
_NORMALISED = ("baseline", "resolver", "dispatcher", "redis")


def label(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    return f"{machine.get('commit', '?')} {results.get('started_at', '')[:16]}"


def _change(first: float | None, last: float | None) -> str:
    if first is None or last is None or first == 0:
        return ""
    return f"{100 * (last - first) / first:+.0f} %"


def _dispatch_entries(results: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    entries = list(results.get("dispatch", []))
    tracing = results.get("tracing") or {}
    entries += [tracing[k] for k in ("off", "on") if isinstance(tracing.get(k), dict)]
    # The connector too: SMS through the gateway and through Twilio make different provider requests.
    return {
        (e["family"], e.get("connector", ""), e["system"], e.get("variant", ""), e["recipients"]): e for e in entries
    }


def _per_message(entry: dict[str, Any] | None, name: str) -> float | None:
    if entry is None:
        return None
    cpu = entry.get("cpu_us_per_message") or {}
    return sum(cpu.values()) if name == "all" and cpu else cpu.get(name)


def _normalised(entry: dict[str, Any] | None, name: str) -> float | None:
    value, providers = _per_message(entry, name), _per_message(entry, "providers")
    return value / providers if value is not None and providers else None


def _row(title: str, metric: str, values: Sequence[float | None], fmt: Callable[[float | None], str]) -> Row:
    return (title, metric, *(fmt(v) for v in values), _change(values[0], values[-1]))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# The keys a benchmark run's entries hold that the comparison reads without a default.
_DISPATCH_KEYS = ("family", "system", "recipients", "batch_ms")
_ENTRY_KEYS = {
    "dispatch": _DISPATCH_KEYS,
    "resolver_overhead": ("ids_per_call", "overhead_ms"),
    "targets": ("name",),
}


def missing_key(results: dict[str, Any]) -> str:
    """What a benchmark run lacks that the comparison reads ("dispatch[1] has no 'batch_ms'"), or "": a file
    edited by hand, or another tool's, ends in a message naming it rather than a traceback."""
    entries: list[tuple[str, Any, tuple[str, ...]]] = []
    for name, keys in _ENTRY_KEYS.items():
        listed = results.get(name) or []
        if not isinstance(listed, list):
            return f"{name} is not a list"
        entries += [(f"{name}[{i}]", entry, keys) for i, entry in enumerate(listed)]
    tracing = results.get("tracing") or {}
    if isinstance(tracing, dict):
        entries += [
            (f"tracing.{k}", tracing[k], _DISPATCH_KEYS) for k in ("off", "on") if isinstance(tracing.get(k), dict)
        ]
    for where, entry, keys in entries:
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        missing = next((key for key in keys if key not in entry), None)
        if missing is not None:
            return f"{where} has no {missing!r}"
    return ""


def compare_rows(runs: Sequence[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    dispatch = [_dispatch_entries(r) for r in runs]
    keys = list(dict.fromkeys(k for d in dispatch for k in d))
    for key in keys:
        entries = [d.get(key) for d in dispatch]
        title = f"{dispatch_label(next(e for e in entries if e))} x {key[-1]:,}"
        rows.append(_row(title, "msg/s", [e and e.get("throughput") for e in entries], fmt_int))
        rows.append(_row("", "batch p50 ms", [e and e["batch_ms"].get("p50") for e in entries], fmt_ms))
        rows.append(_row("", "batch p99 ms", [e and e["batch_ms"].get("p99") for e in entries], fmt_ms))
        names = list(dict.fromkeys(n for e in entries if e for n in (e.get("cpu_us_per_message") or {})))
        for name in [*names, "all"] if names else []:
            rows.append(_row("", f"CPU us/msg {name}", [_per_message(e, name) for e in entries], fmt_int))
        if "providers" in names:
            for name in [n for n in names if n in _NORMALISED] + ["all"]:
                rows.append(_row("", f"{name} ÷ providers", [_normalised(e, name) for e in entries], _ratio))
        rows.append(())
    overhead = [{o["ids_per_call"]: o for o in r.get("resolver_overhead") or []} for r in runs]
    for ids in sorted({i for o in overhead for i in o}):
        entries = [o.get(ids) for o in overhead]
        title = f"resolver, {ids} ID{'s' if ids > 1 else ''} a call"
        for quantile in ("p50", "p99"):
            rows.append(
                _row(
                    title if quantile == "p50" else "",
                    f"overhead {quantile} ms",
                    [e and e["overhead_ms"].get(quantile) for e in entries],
                    fmt_ms,
                )
            )
        for server in ("resolver", "bare_resolver"):
            cpu = [e and (e.get("cpu_us_per_call") or {}).get(server) for e in entries]
            if server == "resolver" or any(cpu):
                rows.append(_row("", f"{server.replace('_', ' ')} CPU us/call", cpu, fmt_int))
    if overhead:
        rows.append(())
    targets = [{t["name"]: t for t in r.get("targets") or []} for r in runs]
    for name in list(dict.fromkeys(n for t in targets for n in t)):
        entries = [t.get(name) for t in targets]
        rows.append(_row(name, "target value", [e and e.get("value") for e in entries], _ratio))
    while rows and not rows[-1]:
        rows.pop()
    return rows


# A load report's settings: two reports whose settings differ measured different loads.
_LOAD_SETTINGS = (
    "target",
    "concurrency",
    "connections",
    "load_schedule",
    "duration",
    "total",
    "max_duration",
    "skip_first",
    "recipients_per_call",
    "family",
    "connector",
    "customers",
    "timeout",
    "latency_over",
    "suite",
)


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items() if v is not None)
    return "-" if value is None else str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _in(data: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def load_rows(runs: Sequence[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for key in _LOAD_SETTINGS:
        values = [_setting(r.get(key)) for r in runs]
        if len(set(values)) > 1:
            rows.append((key if rows else f"settings: {key}", "differs", *values, ""))
    if rows:
        rows.append(())
    rows.append(_row("calls", "count", [r.get("count") for r in runs], fmt_int))
    rows.append(_row("", "calls/s", [r.get("rps") for r in runs], _ratio))
    rows.append(_row("", "messages/s", [r.get("messages_per_second") for r in runs], fmt_int))
    rows.append(_row("", "error rate", [r.get("error_rate") for r in runs], _percent))
    rows.append(_row("", "recipient error rate", [r.get("recipient_error_rate") for r in runs], _percent))
    rows.append(())
    for metric, name in (("average", "mean"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("slowest", "maximum")):
        rows.append(
            _row(
                "latency" if metric == "average" else "",
                f"{metric} ms",
                [_in(r, "latency_ms", name) for r in runs],
                fmt_ms,
            )
        )
    rows.append(_row("", "start delay p99 ms", [_in(r, "start_delay_ms", "p99") for r in runs], fmt_ms))
    for field, title, metric, fmt in (
        ("cpu_ms_per_call", "CPU per call", "ms", fmt_ms),
        ("peak_rss_kb", "peak RSS", "MB", fmt_mb),
    ):
        names = list(dict.fromkeys(n for r in runs for n in (r.get(field) or {})))
        if names:
            rows.append(())
        for i, name in enumerate(names):
            values = [_in(r, field, name) for r in runs]
            rows.append(_row(title if i == 0 else "", f"{name} {metric}", values, fmt))
    return rows


def render(runs: Sequence[dict[str, Any]]) -> str:
    kinds = ["load report" if is_load_report(r) else "benchmark run" for r in runs]
    if len(set(kinds)) > 1:
        named = ", ".join(f"{label(r)}: {kind}" for r, kind in zip(runs, kinds, strict=True))
        raise SystemExit(f"cannot put a load report beside a benchmark run ({named})")
    rows = load_rows(runs) if kinds[0] == "load report" else compare_rows(runs)
    headers = ("measurement", "metric", *(label(r) for r in runs), "change")
    right = (False, False, *([True] * len(runs)), True)
    return render_table(headers, rows, right)


def main(paths: Sequence[str]) -> int:
    if len(paths) < 2:
        print("usage: python -m bench compare OLD NEW [NEWER...] (results files or directories)", file=sys.stderr)  # noqa: T201
        return 2
    runs = []
    for name in paths:
        path = Path(name)
        file = results_file(path)
        try:
            results = load(path)
        except NotResultsFile as exc:
            print(exc, file=sys.stderr)  # noqa: T201
            return 2
        problem = "" if is_load_report(results) else missing_key(results)
        if problem:
            print(f"{file}: {problem}: not a results file this version of bench wrote", file=sys.stderr)  # noqa: T201
            return 2
        try:  # read alone first, so that a value of another type is put down to its file
            load_rows([results]) if is_load_report(results) else compare_rows([results])
        except MALFORMED as exc:
            print(malformed(file, exc), file=sys.stderr)  # noqa: T201
            return 2
        runs.append(results)
    kinds = {is_load_report(r) for r in runs}
    if len(kinds) > 1:
        named = ", ".join(f"{label(r)}: {'load report' if is_load_report(r) else 'benchmark run'}" for r in runs)
        print(f"cannot put a load report beside a benchmark run ({named})", file=sys.stderr)  # noqa: T201
        return 2
    print(render(runs))  # noqa: T201 - the CLI's output
    print("change: the last run against the first. ÷ providers: CPU per message over the sandbox providers'")  # noqa: T201
    return 0
