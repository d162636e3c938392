"""What every part of the desk service shares: DeskService.__init__ sets it, the parts
(status, claim, operations, workers, handlers) build on one another in that order."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from provisioner.adapters.systemd_notify import Notifier
    from provisioner.core.recovery import Recovery
    from provisioner.core.roster import Roster
    from provisioner.core.store import DeskStore
    from provisioner.daemon.ahead import WorkAhead
    from provisioner.daemon.events import Event, Events
    from provisioner.daemon.status import PresentToken
    from provisioner.daemon.workers import Backoff, TokenOpener
    from provisioner.desk import Desk


log = logging.getLogger("provisioner.service")


class ServiceState:
    desk: Desk
    store: DeskStore
    events: Events
    roster: Roster | None
    pcsc_up: bool
    started: float
    #: The queue's next requests, prepared before their plug.
    ahead: WorkAhead
    _open_token: TokenOpener
    _is_yubikey_reader: Callable[[str], bool]
    _notifier: Notifier
    _recovery: Callable[[], Recovery] | None
    #: 'name (pid N)' of running programs known to hold cards (doctor's suspects).
    _card_holders: Callable[[], list[str]]
    _backoff: Backoff
    _active: set[int]
    _usb_reported: set[tuple[int, int]]
    _lock: threading.Lock
    #: Notified on every card change and on stop: wakes the tries at a held token.
    _changed: threading.Condition
    _present: dict[str, PresentToken]
    _readers: dict[str, bool]
    _workers: dict[str, threading.Thread]
    _stopping: threading.Event
    _recent: deque[Event]
    #: Writes the store refused (its database away): tried again at every heartbeat,
    #: in order, until it takes them; nothing of an enrollment's end is lost.
    _unwritten: deque[Callable[[], None]]

    def _lasting(self, write: Callable[[], None]) -> None:
        """``write`` to the store now, or, if it refuses (StoreError), as soon as it
        takes writes again (``retry_unwritten``)."""
        from provisioner.core.errors import StoreError

        with self._lock:
            waiting = bool(self._unwritten)
            if waiting:  # keep the order: after those still waiting
                self._unwritten.append(write)
                return
        try:
            write()
        except StoreError as e:
            log.warning(
                "the store refused a write, kept to write when it is back: %s", e.one_line()
            )
            with self._lock:
                self._unwritten.append(write)

    def retry_unwritten(self) -> int:
        """Write what the store refused before, in order; how many are still waiting."""
        from provisioner.core.errors import StoreError

        while True:
            with self._lock:
                if not self._unwritten:
                    return 0
                write = self._unwritten[0]
            try:
                write()
            except StoreError:
                with self._lock:
                    return len(self._unwritten)
            with self._lock:
                self._unwritten.popleft()

    def _start_worker(self, reader: str) -> None:
        """Serve the token in ``reader`` on a worker of its own (TokenWorkers does): the
        operations below the workers ask for one when a token needs cleaning."""
        raise NotImplementedError
