"""What every part of the desk service shares: DeskService.__init__ sets it, the parts
(status, claim, operations, workers, handlers) build on one another in that order."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from provisioner.adapters.systemd_notify import Notifier
    from provisioner.core.recovery import Recovery
    from provisioner.core.roster import Roster
    from provisioner.core.store import DeskStore
    from provisioner.daemon.events import Event, Events
    from provisioner.daemon.status import PresentToken
    from provisioner.daemon.workers import Backoff, TokenOpener
    from provisioner.desk import Desk


class ServiceState:
    desk: Desk
    store: DeskStore
    events: Events
    roster: Roster | None
    pcsc_up: bool
    started: float
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

    def _start_worker(self, reader: str) -> None:
        """Serve the token in ``reader`` on a worker of its own (TokenWorkers does): the
        operations below the workers ask for one when a token needs cleaning."""
        raise NotImplementedError
