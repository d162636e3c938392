"""The live status: the tokens present, the queue, the recent outcomes, for
`provisioner status` and `watch`; and the health the metrics and the watchdog read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from provisioner.core.errors import ProvisionerError
from provisioner.core.messages import (
    TokenState,
)
from provisioner.daemon.events import Event
from provisioner.daemon.state import ServiceState

#: How many finished enrollments the status keeps for `provisioner watch`.
RECENT_OUTCOMES = 10
#: A watching client hears from the daemon at least this often (it notices a dead daemon,
#: and the daemon notices a client that went away).
HEARTBEAT_SECONDS = 2.0
#: How many queue entries `status`, `queue` and `watch` carry (with the total count).
QUEUE_SHOWN = 50


@dataclass
class PresentToken:
    """A token in a reader, as the status shows it."""

    reader: str
    serial: int | None = None
    state: TokenState = TokenState.IDENTIFYING
    user: str | None = None
    step: str | None = None
    #: Why it is in that state, in a sentence (who holds it, why it was left alone).
    detail: str | None = None
    since: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reader": self.reader,
            "serial": self.serial,
            "state": self.state,
            "user": self.user,
            "step": self.step,
            "detail": self.detail,
        }


class LiveStatus(ServiceState):
    """DeskService's status: what each token is doing, counted and shown."""

    def status(self) -> Event:
        with self._lock:
            tokens = [t.as_dict() for t in self._present.values()]
            readers = [{"name": n, "card_present": p} for n, p in sorted(self._readers.items())]
            recent = list(self._recent)
        return {
            "daemon": {
                "desk": self.desk.config.desk,
                "since": self.started,
                "pcsc": "up" if self.pcsc_up else "down",
                "iam": self.desk.iam.endpoint_url,
                "roster": len(self.roster) if self.roster else self._fleet_roster(),
                **(
                    {"accounts": [a.name for a in self.desk.config.accounts]}
                    if self.desk.config.accounts
                    else {}
                ),
            },
            "readers": readers,
            "tokens": tokens,
            **self._queue_view(),
            "in_progress": [
                t for t in tokens if t["state"] in (TokenState.ENROLLING, TokenState.RESYNCING)
            ],
            "recent": recent,
            "ahead": self.ahead.status(),
        }

    def _fleet_roster(self) -> int:
        """The fleet's roster's size (0 for a desk of its own, or a store away)."""
        if not self.desk.config.store.url:
            return 0
        try:
            return self.store.roster_size()
        except ProvisionerError:
            return 0

    def _queue_view(self) -> Event:
        """The first requests of the queue and how many there are: an answer that stays
        small however long the queue (the CLI says "and N more")."""
        return {
            "queue": [vars(e) for e in self.store.waiting(limit=QUEUE_SHOWN)],
            "queue_total": self.store.queue_length(),
        }

    def counts(self) -> dict[str, int]:
        """Tokens present, requests waiting, enrollments running (for the metrics)."""
        with self._lock:
            present, running = len(self._present), len(self._active)
        return {"tokens": present, "queued": self.store.queue_length(), "running": running}

    def _set(self, reader: str, **changes: Any) -> None:
        with self._lock:
            token = self._present.get(reader)
            if token is not None:
                self._present[reader] = replace(token, **changes)
        self._update_status()

    def note_step(self, reader: str, step: str) -> None:
        self._set(reader, step=step)

    def _update_status(self) -> None:
        with self._lock:
            busy = [
                t
                for t in self._present.values()
                if t.state in (TokenState.ENROLLING, TokenState.RESYNCING)
            ]
            present = len(self._present)
        if busy:
            text = "; ".join(f"{t.state} {t.user} on token {t.serial} ({t.step})" for t in busy)
        else:
            try:
                waiting = f"{self.store.queue_length()} request(s) queued"
            except ProvisionerError as e:  # the fleet's database away: said, work goes on
                waiting = f"the store is unreachable ({e.one_line()})"
            text = f"idle: {present} token(s) present, {waiting}"
        if not self.pcsc_up:
            text += " (pcscd not reachable)"
        self._notifier.status(text)
