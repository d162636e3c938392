"""The desk's events: published by the workers, streamed to every client that follows."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("provisioner.service")  # the journal's name for it, kept across moves

Event = dict[str, Any]


class Events:
    """Fan-out of events to the clients that watch them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[tuple[Callable[[Event], bool], queue.Queue[Event]]] = []
        self._listeners: list[Callable[[Event], None]] = []

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event, in the publishing thread: it must be quick."""
        with self._lock:
            self._listeners.append(listener)

    @contextlib.contextmanager
    def subscribe(self, wants: Callable[[Event], bool]) -> Iterator[queue.Queue[Event]]:
        inbox: queue.Queue[Event] = queue.Queue()
        entry = (wants, inbox)
        with self._lock:
            self._subscribers.append(entry)
        try:
            yield inbox
        finally:
            with self._lock:
                self._subscribers.remove(entry)

    def publish(self, event: Event) -> None:
        with self._lock:
            targets = [inbox for wants, inbox in self._subscribers if wants(event)]
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a metrics bug must not stop an enrollment
                log.exception("event listener failed")
        for inbox in targets:
            inbox.put(event)
