"""Work moved before the plug: a queued user is checked in IAM while their request waits
(and again before the check goes stale), and for the next few requests their virtual
MFA device is created ahead, so that a plugged token waits only for the token's own work
and EnableMFADevice.

A device made ahead is journaled like any enrollment's (a record in progress, owned by
this daemon): a crash leaves a record that recovery settles by deleting the device. Its
seed is in memory only, in the prepared leg, and wiped with it. It is deleted, and its
record closed as "not used", when its request is cancelled or served elsewhere, falls
out of the next few, outlives ``ahead_ttl`` or the desk stops. Work ahead is for
enrollments in the desk's own account; a desk with [[accounts]] checks nothing ahead.
In a fleet, a device is made ahead only for a request queued for this desk (`queue
--desk`): one queued for any desk is checked, not given a device by every desk.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from provisioner.core.enrollment import Leg
from provisioner.core.errors import ProvisionerError
from provisioner.core.messages import Outcome
from provisioner.core.store import DeskStore, QueueEntry, RequestKind, RequestState
from provisioner.desk import Desk

log = logging.getLogger("provisioner.service")  # the journal's name for the service

#: Seconds between looks at the queue when nothing wakes the thread sooner (requests of
#: other desks' operators arrive through the store, unannounced).
POLL_SECONDS = 2.0
#: Seconds a request whose preparation failed waits before it is tried again.
RETRY_SECONDS = 60.0
#: Seconds without an IAM request after which one is made to keep the connection warm.
KEEP_WARM_SECONDS = 30.0


@dataclass
class Ready:
    """A queued request's work done ahead: its user checked, perhaps its device made."""

    entry: QueueEntry
    leg: Leg
    #: The record of the device made ahead (None: checks only).
    enrollment_id: int | None
    checked_at: float
    made_at: float | None

    @property
    def has_device(self) -> bool:
        return self.leg.device_arn is not None

    def summary(self, now: float) -> dict[str, object]:
        return {
            "queue": self.entry.id,
            "user": self.entry.user,
            "device": self.leg.device_arn,
            "checked_s_ago": round(now - self.checked_at, 1),
        }


class WorkAhead:
    """The queue's next requests, prepared by a thread of their own."""

    def __init__(
        self,
        desk: Desk,
        store: DeskStore,
        active: set[int],
        lock: threading.Lock,
        *,
        clock: Callable[[], float] = time.monotonic,
        unique: Callable[[], str] = lambda: secrets.token_hex(3),
        keep_warm: Callable[[], None] | None = None,
    ) -> None:
        """``active``/``lock``: the service's set of enrollments in progress (a reconcile
        leaves them alone) and its lock. ``unique``: a suffix that makes the name of a
        device made for a token not known yet unique. ``keep_warm``: one cheap IAM
        request, made when the desk has not talked to IAM for a while."""
        daemon = desk.config.daemon
        self._desk = desk
        self._store = store
        self._active = active
        self._lock = lock
        self._clock = clock
        self._unique = unique
        self._keep_warm = keep_warm
        self._checks = 0 if desk.config.accounts else daemon.checks_ahead
        self._devices = min(self._checks, daemon.devices_ahead)
        self._ttl = daemon.ahead_ttl
        self._refresh = daemon.ahead_refresh
        self._name = desk.config.desk
        self._fleet = bool(desk.config.store.url)
        self._ready: dict[int, Ready] = {}
        self._failed: dict[int, float] = {}
        self._last_trouble = ""
        self._last_call = clock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ahead", daemon=True)

    @property
    def enabled(self) -> bool:
        return self._checks > 0

    # --- the service's side -------------------------------------------------------------

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def wake(self) -> None:
        """The queue changed here (a request queued or cancelled): look now."""
        self._wake.set()

    def take(self, entry_id: int) -> Ready | None:
        """The work done ahead for this request, now the plugged token's to finish (None:
        nothing was, or it is being done right now: the token does it all)."""
        with self._lock:
            return self._ready.pop(entry_id, None)

    def status(self) -> list[dict[str, object]]:
        now = self._clock()
        with self._lock:
            return [r.summary(now) for r in self._ready.values()]

    def stop(self, timeout: float) -> None:
        """No more work ahead; every device made ahead is deleted."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            ready, self._ready = list(self._ready.values()), {}
        for each in ready:
            self._drop(each, "the desk is stopping")

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                trouble = ""
            except ProvisionerError as e:
                trouble = e.one_line()
            except Exception as e:  # noqa: BLE001 - the thread must go on; said in the log
                log.exception("work ahead failed")
                trouble = type(e).__name__
            if trouble and trouble != self._last_trouble:
                log.warning("work ahead paused (tried again in %.0f s): %s", POLL_SECONDS, trouble)
            self._last_trouble = trouble
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def tick(self) -> None:
        """One look at the queue: drop what is no longer wanted, refresh what is stale,
        prepare what is next."""
        now = self._clock()
        wanted = [e for e in self._store.waiting(limit=4 * self._checks + 16) if self._serves(e)]
        taken_here = {e.id for e in wanted if e.state is RequestState.TAKEN}
        waiting = [e for e in wanted if e.state is RequestState.WAITING][: self._checks]
        # the next few that may have a device made here: in a fleet, a request for any
        # desk gets none (every desk would make one for it): checks only
        mine = [e for e in waiting if not self._fleet or e.desk == self._name]
        devices = {e.id for e in mine[: self._devices]}
        with self._lock:
            ready = dict(self._ready)
        for entry_id, each in ready.items():
            if entry_id in taken_here:
                continue  # a token of this desk is being served for it: take() is next
            why = self._unwanted(each, any(e.id == entry_id for e in waiting), devices, now)
            if why is not None:
                self._forget(entry_id, each)
                self._drop(each, why)
            elif now - each.checked_at >= self._refresh:
                self._check_again(each, now)
        for entry in waiting:
            if self._stop.is_set():
                return
            with self._lock:
                have = self._ready.get(entry.id)
            device = entry.id in devices
            if have is not None and (have.has_device or not device):
                continue
            if now - self._failed.get(entry.id, -RETRY_SECONDS) < RETRY_SECONDS:
                continue
            self._prepare(entry, device, now)  # a checks-only one is made again, with it
        if self._keep_warm is not None and self._clock() - self._last_call >= KEEP_WARM_SECONDS:
            self._keep_warm()
            self._last_call = self._clock()

    def _serves(self, entry: QueueEntry) -> bool:
        """Enrollment requests this desk may serve (none taken by another desk)."""
        if entry.kind is not RequestKind.ENROLL or entry.accounts:
            return False
        if entry.desk not in (None, self._name):
            return False
        return entry.state is RequestState.WAITING or entry.taken_by == self._name

    def _unwanted(self, each: Ready, waits: bool, devices: set[int], now: float) -> str | None:
        if not waits:
            return "its request is no longer waiting (served, cancelled or withdrawn)"
        if each.has_device and each.entry.id not in devices:
            return f"its request is no longer among the next {self._devices}"
        if each.made_at is not None and now - each.made_at >= self._ttl:
            return f"unused for {self._ttl:.0f} s (ahead_ttl): made again"
        return None

    def _forget(self, entry_id: int, each: Ready) -> None:
        with self._lock:
            if self._ready.get(entry_id) is each:
                del self._ready[entry_id]

    def _prepare(self, entry: QueueEntry, device: bool, now: float) -> None:
        leg = Leg(entry.user)
        record = None
        try:
            self._desk.enrollment().prepare(leg)
            if device:  # journaled from before the call, as any enrollment's device
                record = self._store.start_enrollment(
                    entry.user, entry.serial, "", f"queue:{entry.id}"
                )
                with self._lock:
                    self._active.add(record)
                self._desk.enrollment(journal=self._store.journal(record)).make_device(
                    leg, entry.serial, f"q{entry.id}-{self._unique()}"
                )
        except ProvisionerError as e:
            self._failed[entry.id] = now
            log.info("request #%d (%s) not prepared ahead: %s", entry.id, entry.user, e.one_line())
            if record is not None:
                self._close(record, Outcome.NOT_USED, f"device not made ahead: {e.one_line()}")
            return
        finally:
            self._last_call = self._clock()
        made = Ready(entry, leg, record, now, now if device else None)
        with self._lock:
            self._ready[entry.id] = made
        if device:
            log.info(
                "request #%d: %s checked and device %s made ahead of the plug",
                entry.id,
                entry.user,
                leg.device_arn,
            )

    def _check_again(self, each: Ready, now: float) -> None:
        try:
            each.leg.facts = self._desk.enrollment().look_up(each.leg.user)
        except ProvisionerError as e:
            self._forget(each.entry.id, each)
            self._failed[each.entry.id] = now
            self._drop(each, f"its user's check failed: {e.one_line()}")
            return
        finally:
            self._last_call = self._clock()
        each.checked_at = now

    def _drop(self, each: Ready, why: str) -> None:
        """Undo what was made ahead (the device deleted, its seed wiped) and close its
        record, saying why."""
        record = each.enrollment_id
        each.leg.wipe()
        if record is None:
            return
        left = self._desk.enrollment(journal=self._store.journal(record)).rollback_device(each.leg)
        arn = each.leg.device_arn
        if left:
            reason = f"device {arn} made ahead NOT deleted ({'; '.join(left)}): {why}"
            self._close(record, Outcome.FAILED_NOT_ROLLED_BACK, reason)
            log.error("request #%d: %s", each.entry.id, reason)
            return
        self._close(record, Outcome.NOT_USED, f"device {arn} made ahead deleted unused: {why}")
        log.info("request #%d: device %s made ahead deleted: %s", each.entry.id, arn, why)

    def _close(self, record: int, outcome: Outcome, reason: str) -> None:
        try:
            self._store.finish_enrollment(record, outcome=outcome, actor="desk", reason=reason)
        finally:
            with self._lock:
                self._active.discard(record)
