"""The daemon's signal pipe: signals arrive as numbers, and a handler never blocks."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from provisioner.adapters.signals import SignalPipe


@pytest.fixture
def pipe() -> Iterator[SignalPipe]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGHUP)}
    pipe = SignalPipe((signal.SIGUSR2, signal.SIGHUP))
    yield pipe
    pipe.close()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_wakes_the_wait_and_is_named(pipe: SignalPipe) -> None:
    os.kill(os.getpid(), signal.SIGUSR2)
    assert pipe.wait(5.0) == {signal.SIGUSR2}
    assert pipe.wait(0.05) == set()  # read once, then gone


def test_signals_received_before_the_wait_are_not_lost(pipe: SignalPipe) -> None:
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGHUP)
    assert pipe.wait(5.0) == {signal.SIGHUP, signal.SIGUSR2}


def test_a_storm_of_signals_while_waiting_never_hangs_the_main_thread(pipe: SignalPipe) -> None:
    done = threading.Event()

    def storm() -> None:
        for _ in range(2000):
            os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGUSR2)
        done.set()

    threading.Thread(target=storm, daemon=True).start()
    seen: set[int] = set()
    while signal.SIGUSR2 not in seen:
        seen |= pipe.wait(0.001)
    assert done.wait(5.0) and signal.SIGHUP in seen
