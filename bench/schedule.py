"""The load schedules of `python -m bench load` (ghz's `--load-schedule`): the rate at each moment of a
run and when each of its calls is due, as pure functions of the seconds since the start, so that they
can be checked without a clock.

`const` holds one rate. `step` starts at `start` calls a second and adds `step` (negative: takes away)
every `step_seconds`; `line` adds `step` a second continuously. Either stops changing at `end` (held
once reached) or at `max_seconds` (the rate then held), whichever comes first. Call n (from 0) is due
when the calls the rate adds up to since the start reach n: at 0, 1/rate, 2/rate, ... for `const`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

KINDS = ("const", "step", "line")


@dataclass(frozen=True)
class Schedule:
    kind: str = "const"
    start: float = 50.0  # calls per second at the start (the rate throughout for const)
    step: float = 0.0  # added every `step_seconds` (step) or each second (line)
    step_seconds: float = 0.0
    end: float = 0.0  # the rate held once reached (0: none)
    max_seconds: float = 0.0  # when the rate stops changing (0: never)

    def rate_at(self, elapsed: float) -> float:
        """Calls per second `elapsed` seconds after the start."""
        if self.kind == "step":
            return self._step_rate(math.floor(elapsed / self.step_seconds))
        if self.kind == "line":
            return self._clamped(self.start + self.step * min(elapsed, self.max_seconds or math.inf))
        return self.start

    def segments(self) -> Iterator[tuple[float, float, float, float]]:
        """(start, rate there, change of the rate a second, seconds) of the spans the rate is constant or
        changes at a constant pace, in order; the last lasts for ever."""
        if self.kind == "step":
            last = math.inf
            if self.end:  # the first step at the end or past it: its rate is the end
                last = math.ceil((self.end - self.start) / self.step)
            if self.max_seconds:
                last = min(last, math.floor(self.max_seconds / self.step_seconds))
            for k in itertools.count():
                if k >= last:
                    yield k * self.step_seconds, self._step_rate(k), 0.0, math.inf
                    return
                yield k * self.step_seconds, self._step_rate(k), 0.0, self.step_seconds
        if self.kind == "line":
            ramp = (self.end - self.start) / self.step if self.end else math.inf
            ramp = min(ramp, self.max_seconds or math.inf)
            yield 0.0, self.start, self.step, ramp
            if ramp < math.inf:
                yield ramp, self.rate_at(ramp), 0.0, math.inf
            return
        yield 0.0, self.start, 0.0, math.inf

    def calls_by(self, elapsed: float) -> float:
        """The calls the rate adds up to from the start to `elapsed` seconds (ticks before it: its ceiling)."""
        calls = 0.0
        for begin, rate, slope, seconds in self.segments():
            if elapsed <= begin:
                break
            x = min(seconds, elapsed - begin)
            calls += rate * x + slope * x * x / 2
        return calls

    def tick_times(self) -> Iterator[float]:
        """When each call is due, in seconds after the start, for as long as the rate is above 0."""
        due = 0  # the next call's number
        calls = 0.0  # the calls the rate added up to by the segment's start
        for begin, rate, slope, seconds in self.segments():
            while True:
                owed = max(0.0, due - calls)
                # x where rate*x + slope*x²/2 = owed, in the form that is stable for either sign of slope
                root = rate * rate + 2 * slope * owed
                if root < 0 or rate + math.sqrt(root) <= 0:
                    break  # the rate falls to 0 before the call is due
                x = owed / rate if slope == 0 else 2 * owed / (rate + math.sqrt(root))
                if x >= seconds:
                    break
                yield begin + x
                due += 1
            if seconds == math.inf:
                return
            calls += rate * seconds + slope * seconds * seconds / 2

    def windows(self, until: float) -> list[tuple[float, float, float]]:
        """(from, to, the rate set on average) of each step (step) or second (line) up to `until`
        seconds, the last cut there; none for const."""
        if self.kind == "const":
            return []
        width = self.step_seconds if self.kind == "step" else 1.0
        out = []
        for k in itertools.count():
            begin, end = k * width, min((k + 1) * width, until)
            if begin >= until - 1e-9:  # not a sliver of a window where the run ended on a boundary
                return out
            if self.kind == "step":
                rate = self._step_rate(k)
            else:
                rate = (self.calls_by(end) - self.calls_by(begin)) / (end - begin)
            out.append((begin, end, rate))
        return out

    def describe(self) -> str:
        if self.kind == "const":
            return f"const, {self.start:g} calls/s" if self.start else "const, as fast as the clients go (-r 0)"
        every = f"every {self.step_seconds:g} s" if self.kind == "step" else "a second"
        out = f"{self.kind}, from {self.start:g} calls/s, {self.step:+g} {every}"
        if self.end:
            out += f", held at {self.end:g}"
        if self.max_seconds:
            out += f", held from {self.max_seconds:g} s" + (" if not reached" if self.end else "")
        return out

    def to_json(self) -> dict[str, Any]:
        if self.kind == "const":
            return {"kind": "const", "rate": self.start}
        return {
            "kind": self.kind,
            "start": self.start,
            "step": self.step,
            "step_duration": self.step_seconds if self.kind == "step" else None,
            "end": self.end or None,
            "max_duration": self.max_seconds or None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schedule:
        if data["kind"] == "const":
            return cls(start=data["rate"])
        return cls(
            data["kind"],
            data["start"],
            data["step"],
            data["step_duration"] or 0.0,
            data["end"] or 0.0,
            data["max_duration"] or 0.0,
        )

    def _step_rate(self, k: int) -> float:
        if self.max_seconds:
            k = min(k, math.floor(self.max_seconds / self.step_seconds))
        return self._clamped(self.start + self.step * k)

    def _clamped(self, rate: float) -> float:
        if self.end:
            rate = min(rate, self.end) if self.step > 0 else max(rate, self.end)
        return max(rate, 0.0)
