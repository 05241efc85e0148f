"""Where the time goes: summaries of py-spy's collapsed stacks (`py-spy record -f raw`).

`python -m bench --profile` records the dispatcher and resolver with py-spy when it is
installed (it is not a dependency of the benchmark) and writes these summaries beside the
results. `python -m bench.profiles FILE` summarises a recording made by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from libs.arguments import number

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Innermost frames that mean "waiting": the event loop's select, and threads parked in native code
# (gRPC's completion-queue poller, the span exporter's worker between exports).
IDLE = ("select (selectors.py", "Thread.run (threading.py", "wait (threading.py", "_worker (")


@dataclass(frozen=True)
class ProfileSummary:
    samples: int
    self_time: list[tuple[str, int]]  # function → samples where it was the innermost frame
    inclusive: list[tuple[str, int]]  # function → samples where it was anywhere on the stack
    by_area: list[tuple[str, int]]  # coarse areas (grpc, aiohttp, redis, jinja2, ...) by innermost frame


def frame_name(frame: str) -> str:
    """`func (path/to/module.py:12)` → `func (module.py)`: short, stable across line edits."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    parts = path.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{match.group('func')} ({short})"


# (needle in "function (path)", area); first match wins. py-spy keeps two path components, so
# OpenTelemetry shows up as trace/, metrics/, context/ ... and its instrumentations by name.
AREAS = (
    ("aiohttp_client/", "tracing + metrics"),
    ("grpc/_aio_server", "tracing + metrics"),
    ("grpc/_aio_client", "tracing + metrics"),
    ("_traced_", "tracing + metrics"),
    ("(trace/", "tracing + metrics"),
    ("(metrics/", "tracing + metrics"),
    ("(context/", "tracing + metrics"),
    ("(propagate/", "tracing + metrics"),
    ("(util/__init__", "tracing + metrics"),
    ("(attributes/", "tracing + metrics"),
    ("(libs/telemetry", "tracing + metrics"),
    ("(libs/scrub", "scrubbing (logs, spans)"),
    ("(redis", "Redis client"),
    ("(asyncio/connection.py", "Redis client"),  # redis/asyncio/..., shortened by py-spy
    ("(asyncio/client.py", "Redis client"),
    ("(asyncio/retry.py", "Redis client"),
    ("(_parsers/", "Redis client"),
    ("(aiohttp/", "aiohttp"),
    ("(yarl/", "aiohttp"),
    ("(multidict/", "aiohttp"),
    ("(aiosignal/", "aiohttp"),
    ("(grpc", "gRPC"),
    ("(jinja2/", "rendering (jinja2)"),
    ("<template>", "rendering (jinja2)"),
    ("rendering.py", "rendering (jinja2)"),
    ("(jmespath/", "JSON paths (jmespath)"),
    ("(protobuf/", "protobuf"),
    ("_pb2", "protobuf"),
    ("(phonenumbers/", "contact validation"),
    ("(email_validator/", "contact validation"),
    ("contacts.py", "contact validation"),
    ("(services/", "tokensend code"),
    ("(libs/", "tokensend code"),
    ("(sandbox/", "sandbox"),
    ("(bench/", "bench"),
)


def area_of(frames: tuple[str, ...]) -> str:
    """The component doing the work: the innermost frame that belongs to one (the standard
    library's frames count for whoever called them); `asyncio` when only the loop is on the stack."""
    for frame in reversed(frames):
        for needle, area in AREAS:
            if needle in frame:
                return area
    return "asyncio / other"


def parse_collapsed(lines: Iterable[str]) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = tuple(f for f in stack.split(";") if f)
        stacks[frames] += int(count)
    return stacks


def summarize_stacks(stacks: Counter[tuple[str, ...]], top: int = 25, skip_idle: bool = True) -> ProfileSummary:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for frames, count in stacks.items():
        # py-spy puts "process ..." and "thread ..." first: keep Python frames only.
        frames = tuple(f for f in frames if "(" in f and not f.startswith(("process ", "thread ")))
        if not frames:
            continue
        if skip_idle and any(i in frame_name(frames[-1]) for i in IDLE):
            continue
        total += count
        leaf = frame_name(frames[-1])
        self_time[leaf] += count
        areas[area_of(frames)] += count
        for name in {frame_name(f) for f in frames}:
            inclusive[name] += count
    return ProfileSummary(total, self_time.most_common(top), inclusive.most_common(top + 15), areas.most_common())


def render(summary: ProfileSummary, title: str = "") -> str:
    out = []
    if title:
        out.append(title)
    out.append(f"{summary.samples} busy samples")
    out.append("by component (innermost frame that belongs to one):")
    out.extend(f"  {100 * n / max(summary.samples, 1):5.1f}%  {name}" for name, n in summary.by_area)
    out.append("self time:")
    out.extend(f"  {100 * n / max(summary.samples, 1):5.1f}%  {name}" for name, n in summary.self_time)
    out.append("inclusive (frames on every stack left out):")
    out.extend(
        f"  {100 * n / max(summary.samples, 1):5.1f}%  {name}"
        for name, n in summary.inclusive
        if n < 0.95 * summary.samples
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiles", description="Summarise py-spy raw output.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=number(int, 1), default=25)
    args = parser.parse_args(argv)
    for path in args.files:
        try:
            with open(path, encoding="utf-8", errors="replace") as lines:
                stacks = parse_collapsed(lines)
        except OSError as exc:
            raise SystemExit(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        if not stacks:  # another file: an empty summary would read as a process that never ran
            raise SystemExit(f"{path}: no stacks in it (`py-spy record -f raw` writes one a line: frames;... COUNT)")
        print(render(summarize_stacks(stacks, args.top), path))  # noqa: T201 - a CLI
    return 0


if __name__ == "__main__":
    sys.exit(main())
