"""The desk service: who gets the token that was just plugged in, and the work that follows.

Reader events come in (a card inserted or removed); each inserted YubiKey gets a worker
thread of its own, so tokens on a hub are enrolled in parallel, each card used by one
worker only. The worker identifies the token and finds its user: a request queued for
this serial, else the roster's entry, else the oldest request queued for any token that
this token may serve (one blank of this desk's credentials, or holding only the
requester's own). A token nobody asked for is reported and left untouched (and offered
to each new request). A token another program holds is tried again, with a growing pause,
while it stays plugged in. Progress goes to the store (the step reached, the audit trail)
and to the clients watching (an operator's `provisioner enroll`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from provisioner.adapters.reader_watch import ReaderEvent, ReaderEventKind
from provisioner.adapters.systemd_notify import Notifier
from provisioner.core.messages import (
    EventKind,
)
from provisioner.core.recovery import Recovery
from provisioner.core.roster import Roster
from provisioner.core.store import DeskStore
from provisioner.daemon.ahead import WorkAhead
from provisioner.daemon.events import Event, Events
from provisioner.daemon.handlers import ControlHandlers
from provisioner.daemon.status import HEARTBEAT_SECONDS, RECENT_OUTCOMES, PresentToken
from provisioner.daemon.workers import Backoff, TokenOpener, retry_while_busy
from provisioner.desk import Desk

__all__ = [
    "HEARTBEAT_SECONDS",
    "Backoff",
    "DeskService",
    "Event",
    "Events",
    "PresentToken",
    "TokenOpener",
    "retry_while_busy",
]

log = logging.getLogger("provisioner.service")  # the journal's name for it, kept across moves


class DeskService(ControlHandlers):
    """The desk: reader events in, token workers, the control API, the live status."""

    def __init__(
        self,
        desk: Desk,
        store: DeskStore,
        *,
        open_token: TokenOpener,
        is_yubikey_reader: Callable[[str], bool],
        roster: Roster | None = None,
        notifier: Notifier | None = None,
        recovery: Callable[[], Recovery] | None = None,
        card_holders: Callable[[], list[str]] = list,
        backoff: Backoff = Backoff(),  # noqa: B008 - a frozen dataclass
    ) -> None:
        self.desk = desk
        self.store = store
        self.events = Events()
        self.roster = roster
        self._open_token = open_token
        self._is_yubikey_reader = is_yubikey_reader
        self._notifier = notifier or Notifier({})
        self._recovery = recovery
        #: 'name (pid N)' of running programs known to hold cards (doctor's suspects).
        self._card_holders = card_holders
        self._backoff = backoff
        self._active: set[int] = set()
        self._usb_reported: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        #: Notified on every card change and on stop: wakes the tries at a held token.
        self._changed = threading.Condition(self._lock)
        self._present: dict[str, PresentToken] = {}
        self._readers: dict[str, bool] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        self._recent: deque[Event] = deque(maxlen=RECENT_OUTCOMES)
        self._unwritten = deque()
        self.pcsc_up = False
        self.started = time.time()
        self.ahead = WorkAhead(
            desk,
            store,
            self._active,
            self._lock,
            keep_warm=getattr(desk.iam, "keep_warm", None),
            roster=lambda: self.roster,
        )
        # a request queued or cancelled here: the work ahead looks at the queue at once
        self.events.listen(
            lambda e: (
                self.ahead.wake()
                if e.get("event") in (EventKind.REQUEST_QUEUED, EventKind.OUTCOME)
                else None
            )
        )

    # --- reader events ----------------------------------------------------------------

    def on_reader_event(self, event: ReaderEvent) -> None:
        kind, reader = event.kind, event.reader
        if kind in (ReaderEventKind.PCSC_UP, ReaderEventKind.PCSC_DOWN):
            self.pcsc_up = kind is ReaderEventKind.PCSC_UP
            if not self.pcsc_up:
                log.warning("pcscd is not reachable; waiting for it")
            self.events.publish({"event": kind.value})
            self._update_status()
            return
        with self._lock:
            if kind is ReaderEventKind.READER_ADDED:
                self._readers[reader] = False
            elif kind is ReaderEventKind.READER_REMOVED:
                self._readers.pop(reader, None)
            elif kind is ReaderEventKind.CARD_INSERTED:
                self._readers[reader] = True
            elif kind is ReaderEventKind.CARD_REMOVED:
                self._readers[reader] = False
                self._present.pop(reader, None)
            self._changed.notify_all()
        if kind is ReaderEventKind.CARD_INSERTED and self._is_yubikey_reader(reader):
            self._start_worker(reader)
        if kind is ReaderEventKind.CARD_REMOVED:
            self.events.publish({"event": EventKind.TOKEN_REMOVED, "reader": reader})
        else:
            self.events.publish({"event": kind.value, "reader": reader})
        self._update_status()

    def on_usb_tokens(self, unsupported: dict[tuple[int, int], str]) -> None:
        """USB keys that can never reach PC/SC (no CCID interface): said, not ignored.

        ``unsupported`` maps (bus, address) to a sentence about each such key now plugged
        in; each is reported once per plugging.
        """
        with self._lock:
            fresh = {k: v for k, v in unsupported.items() if k not in self._usb_reported}
            self._usb_reported = set(unsupported)
        for (bus, address), detail in fresh.items():
            log.warning("%s", detail)
            self.store.audit("desk", "unsupported token", reason=detail)
            self.events.publish(
                {"event": EventKind.UNSUPPORTED, "usb": f"{bus}-{address}", "detail": detail}
            )

    def reload_roster(self, roster: Roster | None) -> None:
        self.roster = roster
        self.store.audit("desk", "roster loaded", reason=f"{len(roster) if roster else 0} entries")

    # --- stopping ---------------------------------------------------------------------

    def stop(self, timeout: float) -> None:
        """No new work; let enrollments in progress finish or roll back, within ``timeout``."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        alive = [w.name for w in workers if w.is_alive()]
        if alive:
            log.error("stopping with work unfinished: %s", ", ".join(alive))
        # what was made ahead for requests no token will serve now is deleted
        self.ahead.stop(max(1.0, deadline - time.monotonic()))

    def healthy(self) -> bool:
        return not self._stopping.is_set()
