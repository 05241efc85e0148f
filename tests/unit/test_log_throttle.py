"""LogThrottle: a line a peer can repeat at will, kept to one per key per interval, saying how many it held."""

from __future__ import annotations

import logging

from libs.logs import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_per_interval_then_the_count_held_back() -> None:
    clock = Clock()
    throttle = LogThrottle(60.0, clock=clock)
    assert throttle.due("a") == 0  # the first is logged
    assert [throttle.due("a") for _ in range(3)] == [None, None, None]
    assert throttle.due("b") == 0  # another key is its own
    clock.now += 59.9
    assert throttle.due("a") is None
    clock.now += 0.1
    assert throttle.due("a") == 4  # logged again, saying the four held back
    assert throttle.due("a") is None
    clock.now += 60
    assert throttle.due("a") == 1


def test_keys_are_bounded_and_the_oldest_is_forgotten() -> None:
    clock = Clock()
    throttle = LogThrottle(60.0, keys=2, clock=clock)
    assert [throttle.due(k) for k in ("a", "b", "c")] == [0, 0, 0]
    assert throttle.due("b") is None and throttle.due("c") is None
    assert throttle.due("a") == 0  # forgotten: at worst logged again


def test_log_writes_the_line_when_due_saying_how_many_were_held_back(caplog) -> None:
    clock = Clock()
    throttle = LogThrottle(60.0, clock=clock)
    logger = logging.getLogger("tests.log_throttle")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(3):
            throttle.log("a", logger, logging.WARNING, "%s refused", "sendgrid")
        clock.now += 60
        throttle.log("a", logger, logging.WARNING, "%s refused", "sendgrid")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "sendgrid refused"),
        (logging.WARNING, "sendgrid refused (2 more since the last line)"),
    ]
