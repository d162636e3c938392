"""Work moved before the plug: a queued user is checked in IAM while their request waits
(and again before the check goes stale), and for the next few requests their virtual
MFA device is created ahead, so that a plugged token waits only for the token's own work
and EnableMFADevice. A roster's tokens not yet enrolled come after the requests, in the
roster's order (their serials are known: their devices have their usual names).

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
from provisioner.core.roster import Roster
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


@dataclass(frozen=True)
class Want:
    """Work a token may come for: a waiting request, or a rostered token's user."""

    #: ``queue:N`` or ``roster:SERIAL:USER``: what the plug takes it by (``key_of``).
    key: str
    user: str
    serial: int | None
    #: The record's source, as the plug would write it.
    source: str
    entry: QueueEntry | None = None

    @classmethod
    def of(cls, entry: QueueEntry) -> Want:
        key = key_of(entry, entry.serial, entry.user)
        return cls(key, entry.user, entry.serial, key, entry)

    @classmethod
    def rostered(cls, serial: int, user: str) -> Want:
        return cls(key_of(None, serial, user), user, serial, "roster")

    @property
    def label(self) -> str:
        return f"request #{self.entry.id}" if self.entry else f"rostered token {self.serial}"


def key_of(entry: QueueEntry | None, serial: int | None, user: str) -> str:
    """What a plugged token's work ahead is found by: its request, or its roster entry
    (with its user: a roster reloaded with another user for the serial finds nothing)."""
    return f"queue:{entry.id}" if entry is not None else f"roster:{serial}:{user}"


@dataclass
class Ready:
    """Work done ahead: the user checked, perhaps the device made."""

    want: Want
    leg: Leg
    #: The record of the device made ahead (None: checks only).
    enrollment_id: int | None
    checked_at: float
    made_at: float | None

    @property
    def has_device(self) -> bool:
        return self.leg.device_arn is not None

    def summary(self, now: float) -> dict[str, object]:
        entry = self.want.entry
        return {
            "queue": entry.id if entry is not None else None,
            "serial": self.want.serial,
            "user": self.want.user,
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
        roster: Callable[[], Roster | None] = lambda: None,
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
        self._roster = roster
        self._checks = 0 if desk.config.accounts else daemon.checks_ahead
        self._devices = min(self._checks, daemon.devices_ahead)
        self._ttl = daemon.ahead_ttl
        self._refresh = daemon.ahead_refresh
        self._name = desk.config.desk
        self._fleet = bool(desk.config.store.url)
        self._ready: dict[str, Ready] = {}
        self._failed: dict[str, float] = {}
        #: Rostered serials a check found enrolled already: no work ahead for them.
        self._enrolled: set[int] = set()
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

    def take(self, key: str) -> Ready | None:
        """The work done ahead for this request or rostered token (``key_of``), now the
        plugged token's to finish (None: nothing was, or it is being done right now: the
        token does it all)."""
        with self._lock:
            return self._ready.pop(key, None)

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
        """One look at the queue (and the roster): drop what is no longer wanted, refresh
        what is stale, prepare what is next."""
        now = self._clock()
        wanted = [e for e in self._store.waiting(limit=4 * self._checks + 16) if self._serves(e)]
        taken_here = {key_of(e, e.serial, e.user) for e in wanted if e.state is RequestState.TAKEN}
        waiting = [Want.of(e) for e in wanted if e.state is RequestState.WAITING]
        wants = (waiting + self._rostered(taken_here))[: self._checks]
        # the next few that may have a device made here: in a fleet, a request for any
        # desk gets none (every desk would make one for it): checks only
        mine = [w for w in wants if not self._fleet or w.entry is None or w.entry.desk]
        devices = {w.key for w in mine[: self._devices]}
        keys = {w.key for w in wants}
        with self._lock:
            ready = dict(self._ready)
        for key, each in ready.items():
            if key in taken_here:
                continue  # a token of this desk is being served for it: take() is next
            why = self._unwanted(each, key in keys, devices, now)
            if why is not None:
                if self._forget(key, each):
                    self._drop(each, why)
            elif now - each.checked_at >= self._refresh:
                self._check_again(each, now)
        for want in wants:
            if self._stop.is_set():
                return
            with self._lock:
                have = self._ready.get(want.key)
            device = want.key in devices
            if have is not None and (have.has_device or not device):
                continue
            if now - self._failed.get(want.key, -RETRY_SECONDS) < RETRY_SECONDS:
                continue
            self._prepare(want, device, now)  # a checks-only one is made again, with it
        if self._keep_warm is not None and self._clock() - self._last_call >= KEEP_WARM_SECONDS:
            self._keep_warm()
            self._last_call = self._clock()

    def _rostered(self, taken_here: set[str]) -> list[Want]:
        """The roster's tokens not known to be enrolled, in the roster's order (a batch
        desk's tokens come in any order: the first ones are as good a guess as any)."""
        roster = self._roster()
        if roster is None:
            return []
        return [
            Want.rostered(serial, user)
            for serial, user in roster.users_by_serial.items()
            if serial not in self._enrolled and not roster.accounts_for(serial)
        ][: self._checks]

    def _serves(self, entry: QueueEntry) -> bool:
        """Enrollment requests this desk may serve (none taken by another desk)."""
        if entry.kind is not RequestKind.ENROLL or entry.accounts:
            return False
        if entry.desk not in (None, self._name):
            return False
        return entry.state is RequestState.WAITING or entry.taken_by == self._name

    def _unwanted(self, each: Ready, waits: bool, devices: set[str], now: float) -> str | None:
        if not waits:
            if each.want.entry is None:
                return "its token is no longer on the roster, or is enrolled"
            return "its request is no longer waiting (served, cancelled or withdrawn)"
        if each.has_device and each.want.key not in devices:
            return f"it is no longer among the next {self._devices}"
        if each.made_at is not None and now - each.made_at >= self._ttl:
            return f"unused for {self._ttl:.0f} s (ahead_ttl): made again"
        return None

    def _forget(self, key: str, each: Ready) -> bool:
        """Take ``each`` back from the plugs; False if a plug took it meanwhile (then it
        is that plug's to use or undo, never this thread's)."""
        with self._lock:
            if self._ready.get(key) is not each:
                return False
            del self._ready[key]
            return True

    def _prepare(self, want: Want, device: bool, now: float) -> None:
        leg = Leg(want.user)
        record = None
        try:
            enrollment = self._desk.enrollment()
            enrollment.prepare(leg)
            if self._enrolled_already(want, leg):
                return
            if device:  # journaled from before the call, as any enrollment's device
                record = self._store.start_enrollment(want.user, want.serial, "", want.source)
                with self._lock:
                    self._active.add(record)
                unknown = f"q{want.entry.id}-{self._unique()}" if want.entry else ""
                self._desk.enrollment(journal=self._store.journal(record)).make_device(
                    leg, want.serial, unknown
                )
        except ProvisionerError as e:
            self._failed[want.key] = now
            log.info("%s (%s) not prepared ahead: %s", want.label, want.user, e.one_line())
            if record is not None:
                self._close(record, Outcome.NOT_USED, f"device not made ahead: {e.one_line()}")
            return
        finally:
            self._last_call = self._clock()
        made = Ready(want, leg, record, now, now if device else None)
        with self._lock:
            self._ready[want.key] = made
        if device:
            log.info(
                "%s: %s checked and device %s made ahead of the plug",
                want.label,
                want.user,
                leg.device_arn,
            )

    def _enrolled_already(self, want: Want, leg: Leg) -> bool:
        """A rostered token whose user has its device: enrolled, nothing to do ahead."""
        if want.entry is not None or want.serial is None or leg.facts is None:
            return False
        _, spec = self._desk.config.enrollment_settings().names(
            want.user, leg.facts.account, want.serial
        )
        arn = self._desk.iam.device_id(leg.facts.account, spec.path, spec.name)
        if arn in leg.facts.devices:
            self._enrolled.add(want.serial)
            return True
        return False

    def _check_again(self, each: Ready, now: float) -> None:
        try:
            each.leg.facts = self._desk.enrollment().look_up(each.leg.user)
        except ProvisionerError as e:
            self._failed[each.want.key] = now
            if self._forget(each.want.key, each):
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
            log.error("%s: %s", each.want.label, reason)
            return
        self._close(record, Outcome.NOT_USED, f"device {arn} made ahead deleted unused: {why}")
        log.info("%s: device %s made ahead deleted: %s", each.want.label, arn, why)

    def _close(self, record: int, outcome: Outcome, reason: str) -> None:
        try:
            self._store.finish_enrollment(record, outcome=outcome, actor="desk", reason=reason)
        finally:
            with self._lock:
                self._active.discard(record)
