"""Ctrl-C during `tokensend dispatch`: the call is cancelled from a thread of its own and the interrupt
is raised once it has ended, never inside gRPC's code (where it could leave a lock of the call held and
the command hung closing its channel)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from cli.commands.dispatch import interrupt_cancels


class Call:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.cancelled_on: list[threading.Thread] = []

    def cancel(self) -> None:
        self.cancelled_on.append(threading.current_thread())
        self.cancelled.set()


def interrupt_soon() -> None:
    threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()


def test_ctrl_c_cancels_the_call_from_another_thread_and_raises_nothing_meanwhile() -> None:
    before = signal.getsignal(signal.SIGINT)
    call = Call()
    with interrupt_cancels(call) as interrupted:
        interrupt_soon()
        assert call.cancelled.wait(5)  # no KeyboardInterrupt in the middle of what the main thread does
    assert interrupted.is_set()
    assert call.cancelled_on[0] is not threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_a_second_ctrl_c_is_raised_at_once() -> None:
    call = Call()
    with pytest.raises(KeyboardInterrupt), interrupt_cancels(call) as interrupted:
        interrupt_soon()
        assert call.cancelled.wait(5)
        interrupt_soon()
        threading.Event().wait(5)
    assert interrupted.is_set()


def test_off_the_main_thread_nothing_changes() -> None:
    seen: list[object] = []

    def run() -> None:
        with interrupt_cancels(Call()) as interrupted:
            seen.append(signal.getsignal(signal.SIGINT))
            seen.append(interrupted.is_set())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(5)
    assert seen == [signal.getsignal(signal.SIGINT), False]
