"""AWS's clock as the desk sees it.

TOTP codes are judged by AWS's clock, not ours. Every IAM answer carries a ``Date`` header
(1 s resolution); each one bounds the offset between AWS and the local clock:

    Date <= aws_time_at_answer < Date + 1,  sent <= local_time_at_answer <= received

so ``offset = aws - local`` lies in ``[Date - received, Date + 1 - sent]``. Intersecting
the bounds of successive answers narrows the estimate; an empty intersection means one
of the clocks jumped, and we start again from the newest answer. Until an answer is seen
the local clock is used as it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Time as the enrollment needs it: AWS's best-estimate time, and a way to wait."""

    def now(self) -> float: ...

    def uncertainty(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def monotonic(self) -> float: ...


@dataclass(frozen=True)
class Offset:
    low: float
    high: float

    @property
    def estimate(self) -> float:
        return (self.low + self.high) / 2

    @property
    def uncertainty(self) -> float:
        return (self.high - self.low) / 2


class AwsClock:
    """The local clock corrected by what IAM's Date headers say.

    Thread-safe: the daemon's workers share one IAM client and so one clock.
    """

    def __init__(
        self,
        local: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        on_skew: Callable[[float], None] | None = None,
        skew_warning: float = 3.0,
    ) -> None:
        self._local = local
        self._sleep = sleep
        self._monotonic = monotonic
        self._on_skew = on_skew
        self._skew_warning = skew_warning
        self._offset: Offset | None = None
        self._warned = False
        self._lock = threading.Lock()

    def local_time(self) -> float:
        return self._local()

    def observe(self, server_date: float, sent: float, received: float) -> None:
        """Take in one answer: its Date header (epoch seconds) and our send/receive times."""
        fresh = Offset(server_date - received, server_date + 1.0 - sent)
        with self._lock:
            old = self._offset
            if old is None:
                merged = fresh
            else:
                low, high = max(old.low, fresh.low), min(old.high, fresh.high)
                merged = Offset(low, high) if low <= high else fresh
            self._offset = merged
            warn = abs(merged.estimate) > self._skew_warning and not self._warned
            if warn:
                self._warned = True
        if warn and self._on_skew is not None:
            self._on_skew(merged.estimate)

    @property
    def offset(self) -> Offset | None:
        with self._lock:
            return self._offset

    def now(self) -> float:
        off = self.offset
        return self._local() + (off.estimate if off else 0.0)

    def uncertainty(self) -> float:
        off = self.offset
        # Unseen: assume the local clock is right to within a second (NTP'd hosts are).
        return off.uncertainty if off else 1.0

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._sleep(seconds)

    def monotonic(self) -> float:
        return self._monotonic()
