"""Signals for a main loop, through a pipe: the one safe way to wake a waiting thread.

A Python signal handler runs in the main thread between two bytecodes, possibly while
that thread holds a lock: a handler that sets a threading.Event can wait forever for the
lock of the very Event the main thread is waiting on (the daemon once hung so on
SIGTERM). Here the handlers do nothing; signal.set_wakeup_fd writes each signal's number
to a pipe, and the main loop selects on it. No lock is taken.
"""

from __future__ import annotations

import os
import select
import signal
from types import FrameType


class SignalPipe:
    """Signals as bytes on a pipe, read by the main loop (one per process: the main
    thread's, since set_wakeup_fd is)."""

    def __init__(self, signums: tuple[signal.Signals, ...]) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, _noted_on_the_pipe)

    def wait(self, timeout: float | None) -> set[int]:
        """The signals received since the last call, waiting up to ``timeout`` for one."""
        select.select([self._read], [], [], timeout)
        received: set[int] = set()
        while True:
            try:
                chunk = os.read(self._read, 512)
            except BlockingIOError:
                return received
            if not chunk:
                return received
            received.update(chunk)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


def _noted_on_the_pipe(_signum: int, _frame: FrameType | None) -> None:
    """Nothing to do: set_wakeup_fd has written the signal's number to the pipe."""


__all__ = ["SignalPipe"]
