"""The desk's heartbeat in the store: its name, version, readers, tokens and work in
progress, every few seconds, so that `provisioner fleet` on any desk shows every desk
alive (and what it does) or silent since when.

A beat the store cannot take (the fleet's database restarting) is logged once and tried
again at the next; the desk keeps serving meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from provisioner import __version__
from provisioner.core.errors import ProvisionerError
from provisioner.core.store import DeskStore

log = logging.getLogger("provisioner.service")

#: Seconds between beats; a desk silent for three of them is shown as silent.
BEAT_SECONDS = 10.0


def summary(status: Mapping[str, Any]) -> dict[str, Any]:
    """What a beat says, from the daemon's own status answer."""
    recent = status.get("recent") or []
    last = recent[0] if recent else None
    return {
        "readers": [r["name"] for r in status.get("readers") or []],
        "tokens": len(status.get("tokens") or []),
        "working": [
            {"reader": t.get("reader"), "user": t.get("user"), "step": t.get("step")}
            for t in status.get("in_progress") or []
        ],
        "queue": status.get("queue_total", 0),
        "last_outcome": (
            {"user": last.get("user"), "outcome": last.get("outcome"), "at": last.get("at")}
            if last
            else None
        ),
    }


class Heartbeat:
    def __init__(
        self,
        store: DeskStore,
        status: Callable[[], Mapping[str, Any]],
        *,
        period: float = BEAT_SECONDS,
        clock: Callable[[], float] = time.time,
        before: Callable[[], int] = lambda: 0,
    ) -> None:
        """``before`` runs ahead of each beat: the daemon writes what the store refused
        while it was away (and says how many writes still wait)."""
        self._before = before
        self._store = store
        self._status = status
        self._period = period
        self._started = clock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def soon(self) -> None:
        """Beat now rather than at the next period: the desk's readers changed, and the
        fleet should not wait 10 s to see it. Several calls before the beat make one."""
        self._wake.set()

    def stop(self) -> None:
        """The last beat says the desk stopped."""
        self._stop.set()
        self._wake.set()
        self._thread.join(self._period + 5)
        self.beat(stopped=True)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._period)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.beat()

    def beat(self, *, stopped: bool = False) -> None:
        try:
            waiting = self._before()
            status = json.dumps(
                {**summary(self._status()), "unwritten": waiting}, default=str, sort_keys=True
            )
            self._store.heartbeat(__version__, os.getpid(), self._started, status, stopped=stopped)
        except ProvisionerError as e:
            if not self._failing:
                log.warning(
                    "heartbeat not written (the next is tried in %.0f s): %s",
                    self._period,
                    e.one_line(),
                )
            self._failing = True
            return
        if self._failing:
            log.warning("heartbeats written again")
        self._failing = False
