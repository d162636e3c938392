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

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from provisioner.adapters.reader_watch import ReaderEvent, ReaderEventKind
from provisioner.adapters.systemd_notify import Notifier
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.errors import (
    AlreadyEnrolled,
    EnrollmentFailed,
    ExitStatus,
    InvalidInput,
    ProvisionerError,
    ReplaceIncomplete,
    TokenBusy,
    TokenError,
    failure_reason,
)
from provisioner.core.lifecycle import Revoked
from provisioner.core.lifecycle import replace as replace_token
from provisioner.core.messages import (
    EventKind,
    Outcome,
    TokenState,
    error_answer,
    failed_outcome,
    refusal,
)
from provisioner.core.model import Step, TagKey
from provisioner.core.recovery import Recovery
from provisioner.core.roster import Roster
from provisioner.core.store import DeskStore, QueueEntry, RequestKind
from provisioner.desk import Desk

log = logging.getLogger("provisioner.service")  # the journal's name for it, kept across moves

Event = dict[str, Any]
#: How many finished enrollments the status keeps for `provisioner watch`.
RECENT_OUTCOMES = 10
#: A watching client hears from the daemon at least this often (it notices a dead daemon,
#: and the daemon notices a client that went away).
HEARTBEAT_SECONDS = 2.0
#: How many queue entries `status`, `queue` and `watch` carry (with the total count).
QUEUE_SHOWN = 50
TokenOpener = Callable[[str], AbstractContextManager[YubiKeyToken]]
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Pauses between tries at a token another program holds: growing, bounded."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 10.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield min(delay, self.cap)
            delay *= self.factor


def retry_while_busy(
    attempt: Callable[[], T],
    *,
    backoff: Backoff,
    pause: Callable[[float], bool],
    on_busy: Callable[[TokenBusy, float], None],
) -> T | None:
    """``attempt()`` until it stops raising TokenBusy. After each refusal ``on_busy`` is
    told, then ``pause(delay)`` waits; it returns False when trying again is no use (the
    token was pulled, the daemon is stopping), and then so does this (None)."""
    for delay in backoff.delays():
        try:
            return attempt()
        except TokenBusy as e:
            on_busy(e, delay)
            if not pause(delay):
                return None
    raise AssertionError("unreachable")  # pragma: no cover - the delays never end


@dataclass
class PresentToken:
    """A token in a reader, as the status shows it."""

    reader: str
    serial: int | None = None
    # identifying, held, enrolling, resyncing, enrolled, idle, unsupported, failed
    state: str = "identifying"
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


@dataclass(frozen=True)
class _Claim:
    """Whom a token serves: a user (by a request, or by the roster), or nobody and why."""

    user: str | None
    entry: QueueEntry | None = None
    source: str = ""
    actor: str = ""
    why_not: str | None = None

    @classmethod
    def of(cls, entry: QueueEntry) -> _Claim:
        return cls(entry.user, entry, f"queue:{entry.id}", entry.requested_by)


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


@contextlib.contextmanager
def _no_token_here(serial: int) -> Iterator[YubiKeyToken | None]:
    """The daemon never opens a second token from inside a worker: a credential left on
    a token is removed by the token's own worker (see DeskService._forget_on_token)."""
    yield None


class _Progress:
    """The enrollment's progress, into the store and out to the watchers."""

    def __init__(self, service: DeskService, enrollment_id: int | None, base: Event) -> None:
        self._service = service
        self._id = enrollment_id
        self._base = base

    def step(self, step: Step, detail: str) -> None:
        if step is not Step.ROLLBACK and self._id is not None:
            self._service.store.record_step(self._id, step.value)
        self._service.note_step(self._base["reader"], step.value)
        self._service.events.publish(
            {**self._base, "event": EventKind.STEP, "step": step.value, "detail": detail}
        )

    def notice(self, text: str) -> None:
        self._service.events.publish({**self._base, "event": EventKind.NOTICE, "detail": text})


class DeskService:
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
        backoff: Backoff = Backoff(),
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
        self.pcsc_up = False
        self.started = time.time()

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

    def _start_worker(self, reader: str) -> None:
        if self._stopping.is_set():
            return
        with self._lock:
            busy = self._workers.get(reader)
            if busy is not None and busy.is_alive():
                return
            self._present[reader] = PresentToken(reader)
            worker = threading.Thread(
                target=self._serve_token, args=(reader,), name=f"token {reader}", daemon=True
            )
            self._workers[reader] = worker
        worker.start()

    # --- one token ----------------------------------------------------------------------

    def _serve_token(self, reader: str) -> None:
        try:
            with contextlib.ExitStack() as opened:
                token = retry_while_busy(
                    lambda: opened.enter_context(self._open_token(reader)),
                    backoff=self._backoff,
                    pause=lambda seconds: self._still_in(reader, seconds),
                    on_busy=lambda e, delay: self._held(reader),
                )
                if token is not None:
                    self._serve(reader, token)
        except ProvisionerError as e:
            log.warning("token in %s: %s", reader, e.one_line())
            self._set(reader, state=TokenState.FAILED, detail=e.one_line())
            self.events.publish(
                {"event": EventKind.TOKEN_ERROR, "reader": reader, "detail": e.one_line()}
            )
        except Exception:  # noqa: BLE001 - one token's bug must not stop the desk
            log.exception("serving the token in %s failed", reader)
            self._set(reader, state=TokenState.FAILED)
        finally:
            self._update_status()

    def _held(self, reader: str) -> None:
        """Another program has the card: said (naming the likely holder, as `doctor`
        does) when first seen and whenever the suspects change."""
        suspects = self._card_holders()
        # The unit's ProtectProc=invisible hides other users' programs from the daemon.
        who = (
            f" ({', '.join(suspects)} running)"
            if suspects
            else " (provisioner doctor, run as the operator, names it)"
        )
        detail = (
            f"held by another program{who}; tried again until it lets go or the token is pulled out"
        )
        with self._lock:
            before = self._present.get(reader) or PresentToken(reader)
            self._present[reader] = replace(before, state=TokenState.HELD, detail=detail)
        if before.detail == detail:
            return
        if before.state != "held":
            log.warning("the card in %s is %s", reader, detail)
            self.store.audit("desk", "held token", reason=f"{reader}: {detail}")
        self.events.publish({"event": EventKind.TOKEN_HELD, "reader": reader, "detail": detail})
        self._update_status()

    def _still_in(self, reader: str, seconds: float) -> bool:
        """Wait ``seconds`` (less if the card is pulled or the daemon stops); True when
        the card is still in its reader and the daemon running: worth trying again."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._stopping.is_set() or not self._readers.get(reader, False),
                timeout=seconds,
            )
            if self._stopping.is_set() or not self._readers.get(reader, False):
                # Deregistered under the lock: a card put back from now on gets a worker.
                if self._workers.get(reader) is threading.current_thread():
                    del self._workers[reader]
                return False
            # Pulled and put back while we waited: it is in again, still to be served.
            self._present.setdefault(reader, PresentToken(reader, state=TokenState.HELD))
            return True

    def _serve(self, reader: str, token: YubiKeyToken) -> None:
        info = token.info
        self._set(reader, serial=info.serial, state=TokenState.IDENTIFYING, detail=None)
        self.events.publish(
            {
                "event": EventKind.TOKEN,
                "reader": reader,
                "serial": info.serial,
                "firmware": info.firmware_text,
            }
        )
        if not info.has_oath:
            detail = (
                f"token {info.label} cannot hold a TOTP credential "
                "(its OATH application is absent or disabled)"
            )
            self._set(reader, state=TokenState.UNSUPPORTED)
            self.store.audit("desk", "unsupported token", serial=info.serial, reason=detail)
            self.events.publish(
                {
                    "event": EventKind.UNSUPPORTED,
                    "reader": reader,
                    "serial": info.serial,
                    "detail": detail,
                }
            )
            return
        if info.serial is not None:
            self._clean_token(reader, token, info.serial)
        claim = self._claim(token)
        if claim.user is None:
            why = claim.why_not or "plugged in with nobody queued or rostered: left untouched"
            detail = f"token {info.label} {why}"
            log.info("%s", detail)
            self._set(reader, state=TokenState.IDLE, detail=claim.why_not)
            self.store.audit("desk", "ignored token", serial=info.serial, reason=detail)
            self.events.publish(
                {
                    "event": EventKind.IGNORED,
                    "reader": reader,
                    "serial": info.serial,
                    "detail": detail,
                }
            )
            return
        if claim.entry is not None and claim.entry.kind == "resync":
            self._resync(reader, token, claim.entry)
        else:
            self._enroll(reader, token, claim.user, claim.entry, claim.source, claim.actor)

    def _resync(self, reader: str, token: YubiKeyToken, entry: QueueEntry) -> None:
        """Two codes from the user's credential on the token, then ResyncMFADevice."""
        user, serial = entry.user, token.info.serial
        base: Event = {
            "reader": reader,
            "serial": serial,
            "user": user,
            "queue": entry.id,
            "kind": "resync",
        }
        self._set(reader, state=TokenState.RESYNCING, user=user, step=Step.COMPUTE_CODES.value)
        self.events.publish({**base, "event": EventKind.ENROLLING})
        outcome: Event
        try:
            device, first_step = self.desk.lifecycle(_Progress(self, None, base)).resync(
                user, token
            )
        except ProvisionerError as e:
            outcome = failed_outcome("resync failed", e)
            self.store.audit_resync(entry.requested_by, user, serial, e)
        else:
            summary = (
                f"resynced {user}: {device} with the codes of time steps {first_step} and "
                f"{first_step + 1} from token {serial}"
            )
            outcome = {
                "ok": True,
                "outcome": Outcome.RESYNCED,
                "device_arn": device,
                "summary": summary,
                "exit": 0,
            }
            self.store.audit_resync(entry.requested_by, user, serial, (device, first_step))
        self._conclude(reader, base, outcome, "enrolled" if outcome["ok"] else "failed", entry)

    def _removed_when_seen(self, serial: str, credential: str) -> str:
        return (
            f"{credential} is removed from token {serial} by this desk as soon as the token "
            "is plugged in here (now, if it is)"
        )

    def _forget_on_token(self, revoked: Revoked, actor: str) -> None:
        """A revoked device's credential is taken off its token when the desk sees it:
        now if it is plugged in and idle, else whenever it is plugged in."""
        if revoked.token_serial is None or revoked.credential_removed:
            return
        self.store.add_token_cleanup(
            revoked.token_serial,
            revoked.credential_id,
            None,
            f"{revoked.user}'s device {revoked.device_arn} was revoked by {actor}",
        )
        with self._lock:
            idle = [
                t.reader
                for t in self._present.values()
                if t.serial == revoked.token_serial
                and t.state in (TokenState.IDLE, TokenState.ENROLLED, TokenState.FAILED)
            ]
        for reader in idle:
            self._start_worker(reader)

    def _revoke(self, request: Event, peer_name: str) -> Event:
        from provisioner.core import validation

        user, serial = request.get("user"), request.get("serial")
        if not isinstance(user, str) or (serial is not None and not isinstance(serial, int)):
            return refusal("revoke needs a user name", ExitStatus.USAGE)
        try:
            validation.user_name(user)
            done = self.desk.lifecycle().revoke(
                user, serial, _no_token_here, self._removed_when_seen
            )
        except ProvisionerError as e:
            return error_answer(e)
        self.store.audit(
            peer_name,
            "revoked",
            user=user,
            serial=done.token_serial,
            device_arn=done.device_arn,
            outcome=Outcome.REVOKED,
            reason="; ".join(done.actions),
        )
        self._forget_on_token(done, peer_name)
        event: Event = {
            "event": EventKind.REVOKED,
            "user": user,
            "serial": done.token_serial,
            "detail": f"{done.device_arn} revoked by {peer_name}",
        }
        self.events.publish(event)
        return {
            "ok": True,
            "final": True,
            "user": user,
            "serial": done.token_serial,
            "device_arn": done.device_arn,
            "actions": list(done.actions),
        }

    def _clean_token(self, reader: str, token: YubiKeyToken, serial: int) -> None:
        """Remove credentials whose devices are gone (left when the token was away)."""
        for cleanup in self.store.token_cleanups(serial):
            try:
                removed = token.delete_credential(cleanup.credential_id)
            except ProvisionerError as e:
                log.warning("could not clean token %s: %s", serial, e.one_line())
                return
            self.store.finish_token_cleanup(
                cleanup.id, "desk", "removed" if removed else "already gone"
            )
            self.events.publish(
                {
                    "event": EventKind.CLEANED,
                    "reader": reader,
                    "serial": serial,
                    "detail": f"removed stale credential {cleanup.credential_id} "
                    f"from token {serial}",
                }
            )

    def _schedule_cleanup(self, enrollment_id: int, serial: int | None) -> None:
        """A credential the rollback could not remove (the token was pulled) is removed the
        next time the token is seen."""
        record = self.store.enrollment(enrollment_id)
        if (
            record is not None
            and serial is not None
            and not record.enrolled
            and record.credential_state.may_exist
            and record.credential_id
        ):
            self.store.add_token_cleanup(
                serial, record.credential_id, enrollment_id, "the enrollment was rolled back"
            )

    def _claim(self, token: YubiKeyToken) -> _Claim:
        """A request for this very token, else the roster's user (through that user's
        request for any token, if one waits: it is served, not left for the next token),
        else the oldest request for any token that this token may serve."""
        serial = token.info.serial
        entry = self.store.take_next(serial, users=())
        if entry is not None:
            return _Claim.of(entry)
        rostered = self.roster.user_for(serial) if self.roster else None
        if rostered is not None:
            entry = self.store.take_next(None, users=(rostered,))
            return (
                _Claim.of(entry)
                if entry is not None
                else _Claim(rostered, None, "roster", "roster")
            )
        users, why_not = self._who_may_take(token)
        entry = self.store.take_next(None, users=users)
        return _Claim.of(entry) if entry is not None else _Claim(None, why_not=why_not)

    def _who_may_take(self, token: YubiKeyToken) -> tuple[frozenset[str] | None, str | None]:
        """Whose requests for any token this token may serve: anyone's when it holds none
        of this desk's credentials (named as token.issuer and token.account_name name
        them); only its owner's enrollment when they are all one user's; nobody's when
        they are several users' or name none. With the reason."""
        info = token.info
        if info.serial is not None:
            ask = f"queue a request for it with --serial {info.serial}"
        else:
            ask = "its serial is hidden: enroll it with provisioner enroll --direct"
        try:
            credential_ids = token.oath_state().credential_ids
        except TokenError:
            # Unreadable (locked, pulled): the enrollment's check fails on it before
            # anything is written, and says why to the request's operator.
            return None, None
        settings = self.desk.config.enrollment_settings()
        owners = settings.credential_owners(credential_ids, info.serial)
        if not owners:
            return None, None
        users = set(owners.values())
        holds = ", ".join(f"{user or 'an unnamed user'} ({cid})" for cid, user in owners.items())
        why_not = (
            f"holds this desk's credential of {holds}: left alone by requests for any token; {ask}"
        )
        if len(users) == 1 and None not in users:
            return frozenset(u for u in users if u is not None), why_not
        return frozenset(), why_not

    def _enroll(
        self,
        reader: str,
        token: YubiKeyToken,
        user: str,
        entry: QueueEntry | None,
        source: str,
        actor: str,
    ) -> None:
        serial = token.info.serial
        enrollment_id = self.store.start_enrollment(user, serial, reader, source)
        if entry is not None:
            self.store.link_entry(entry.id, enrollment_id)
        with self._lock:
            self._active.add(enrollment_id)
        base: Event = {
            "reader": reader,
            "serial": serial,
            "user": user,
            "enrollment": enrollment_id,
            "queue": entry.id if entry else None,
        }
        self._set(reader, state=TokenState.ENROLLING, user=user, step=Step.CHECK.value)
        self.events.publish({**base, "event": EventKind.ENROLLING})
        outcome: Event
        progress = _Progress(self, enrollment_id, base)
        replacing = entry is not None and entry.kind == "replace"
        try:
            enrollment = self.desk.enrollment(progress, self.store.journal(enrollment_id))
            if replacing:
                assert entry is not None
                done = replace_token(
                    self.desk.lifecycle(progress),
                    enrollment,
                    user,
                    token,
                    entry.old_serial,
                    _no_token_here,
                    self._removed_when_seen,
                )
                self._forget_on_token(done.revoked, actor)
                result = done.enrolled
            else:
                result = enrollment.run(token, user)
        except ReplaceIncomplete as e:
            self.store.finish_enrollment(
                enrollment_id,
                outcome=Outcome.ENROLLED,
                actor=actor,
                device_arn=e.enrolled.device_arn,
                reason=e.one_line(),
            )
            outcome = failed_outcome(
                "enrolled, old token NOT revoked",
                e,
                reason=failure_reason(e.__cause__)
                if isinstance(e.__cause__, ProvisionerError)
                else "ReplaceIncomplete",
                device_arn=e.enrolled.device_arn,
            )
            state = TokenState.ENROLLED
        except AlreadyEnrolled as e:
            self.store.finish_enrollment(
                enrollment_id, outcome=Outcome.ALREADY_ENROLLED, actor=actor, reason=e.message
            )
            outcome = {
                "ok": True,
                "outcome": Outcome.ALREADY_ENROLLED,
                "detail": e.message,
                "exit": 0,
            }
            state = TokenState.ENROLLED
        except ProvisionerError as e:
            label = (
                "failed, NOT rolled back"
                if isinstance(e, EnrollmentFailed) and e.leftovers
                else "failed"
            )
            self.store.finish_enrollment(
                enrollment_id, outcome=label, actor=actor, reason=e.one_line()
            )
            outcome = failed_outcome(label, e)
            state = TokenState.FAILED
        else:
            self.store.finish_enrollment(
                enrollment_id, outcome=Outcome.ENROLLED, actor=actor, device_arn=result.device_arn
            )
            outcome = {
                "ok": True,
                "outcome": Outcome.REPLACED if replacing else "enrolled",
                "device_arn": result.device_arn,
                "seconds": result.seconds,
                "exit": 0,
            }
            state = TokenState.ENROLLED
        self._schedule_cleanup(enrollment_id, serial)
        with self._lock:
            self._active.discard(enrollment_id)
        self._conclude(reader, base, outcome, state, entry, enrollment_id)

    def _conclude(
        self,
        reader: str,
        base: Event,
        outcome: Event,
        state: str,
        entry: QueueEntry | None,
        enrollment_id: int | None = None,
    ) -> None:
        """The end of a token's work: the request closed, the token's state, the outcome
        kept for the live view and told to whoever follows it."""
        if entry is not None:
            self.store.finish_entry(entry.id, "done" if outcome["ok"] else "failed", enrollment_id)
        self._set(reader, state=state)
        with self._lock:
            self._recent.appendleft({**base, "at": time.time(), **outcome})
        self.events.publish({**base, "event": EventKind.OUTCOME, "final": True, **outcome})

    # --- requests from the control socket ---------------------------------------------

    def handle(self, request: Event, peer_name: str) -> Iterator[Event]:
        op = request.get("op")
        if op == "enroll":
            yield from self._queue_and_follow(request, peer_name)
        elif op == "status":
            yield {"ok": True, "final": True, **self.status()}
        elif op == "queue":
            yield {"ok": True, "final": True, **self._queue_view()}
        elif op == "cancel":
            yield self._cancel(request, peer_name)
        elif op == "history":
            yield self._history(request)
        elif op == "reconcile":
            yield self._reconcile(request)
        elif op == "watch":
            yield from self._watch()
        elif op == "revoke":
            yield self._revoke(request, peer_name)
        else:
            yield refusal(f"unknown op {op!r}")

    def _queue_and_follow(self, request: Event, peer_name: str) -> Iterator[Event]:
        from provisioner.core import validation

        user, serial = request.get("user"), request.get("serial")
        kind, old_serial = request.get("kind", "enroll"), request.get("old_serial")
        if (
            not isinstance(user, str)
            or (serial is not None and not isinstance(serial, int))
            or kind not in tuple(RequestKind)
            or (old_serial is not None and not isinstance(old_serial, int))
        ):
            yield refusal(
                "enroll needs a user name (and an optional integer serial)", ExitStatus.USAGE
            )
            return
        try:
            validation.user_name(user)
            if kind == "resync" and serial is None:
                serial = self._the_users_token(user)
        except ProvisionerError as e:
            yield error_answer(e)
            return
        if self._stopping.is_set():
            yield refusal("the daemon is stopping", ExitStatus.FAILED)
            return
        follow = bool(request.get("wait", True))
        try:
            entry = self.store.enqueue(
                user,
                peer_name,
                serial,
                kind=kind,
                old_serial=old_serial,
                followed=follow,
                limit=self.desk.config.daemon.max_queue,
            )
        except ProvisionerError as e:
            log.warning("refused a request for %s from %s: %s", user, peer_name, e.message)
            yield error_answer(e)
            return
        # No "queue" key: this is news for watchers, not for the follower of this entry.
        self.events.publish({"event": EventKind.REQUEST_QUEUED, "id": entry.id, "user": user})
        with self.events.subscribe(lambda e: e.get("queue") == entry.id) as inbox:
            position = self.store.queue_length(up_to=entry.id)
            # Tokens already plugged in are offered at once (in the usual order: the new
            # request is not necessarily the one served), followed or not.
            self._offer_idle_tokens(entry.serial)
            which = f"token {serial}" if serial is not None else "a token"
            what = {"enroll": "", "resync": " for a resync", "replace": " for a new token"}[kind]
            yield {
                "ok": True,
                "event": EventKind.QUEUED,
                "id": entry.id,
                "user": user,
                "position": position,
                "final": not follow,
                "detail": f"{user} is queued{what} (#{entry.id}, position {position}): "
                f"plug in {which}",
            }
            if not follow:
                return
            finished = False
            try:
                while True:
                    try:
                        event = inbox.get(timeout=2.0)
                    except queue.Empty:
                        if self._stopping.is_set():
                            yield self._stopped(entry)
                            finished = True
                            return
                        yield {
                            "event": EventKind.WAITING
                        }  # also tells us the client is still there
                        continue
                    yield event
                    if event.get("final"):
                        finished = True
                        return
            finally:
                if not finished:
                    # The operator gave up (Ctrl-C): a request nobody waits for is cancelled.
                    self.store.cancel(entry.id, peer_name)

    def _watch(self) -> Iterator[Event]:
        """The desk's status now, then again after every event, until the client leaves.

        Each update carries the event that caused it and the whole status, so a watcher
        never has to rebuild the desk's state from events it may have missed.
        """
        with self.events.subscribe(lambda e: True) as inbox:
            yield {"ok": True, "event": EventKind.UPDATE, "cause": None, **self.status()}
            while not self._stopping.is_set():
                try:
                    cause = inbox.get(timeout=HEARTBEAT_SECONDS)
                except queue.Empty:
                    yield {"event": EventKind.HEARTBEAT}
                    continue
                yield {"ok": True, "event": EventKind.UPDATE, "cause": cause, **self.status()}
        yield refusal("the daemon is stopping", ExitStatus.FAILED)

    def _the_users_token(self, user: str) -> int:
        """The serial of the one token provisioner enrolled for ``user``."""
        devices = self.desk.lifecycle().devices_of(user)
        serials = sorted({str(d.tag(TagKey.TOKEN_SERIAL)) for d in devices})
        serial = devices[0].token_serial if len(serials) == 1 else None
        if serial is None:
            what = "no token" if not serials else f"tokens {', '.join(serials)}"
            raise InvalidInput(
                f"{user} has {what} enrolled by provisioner",
                hint="say which token with --serial" if serials else "enroll one first",
            )
        return serial

    def _stopped(self, entry: QueueEntry) -> Event:
        """The daemon stops while a client follows a request: a request still waiting
        goes with its client (a restart would withdraw it anyway), and it is said."""
        withdrawn = self.store.withdraw(entry.id)
        detail = (
            f"the daemon is stopping: request #{entry.id} for {entry.user} is withdrawn; "
            "run the command again once the daemon is back"
            if withdrawn is not None
            else "the daemon is stopping"
        )
        return {
            "ok": False,
            "final": True,
            "outcome": Outcome.DAEMON_STOPPING,
            "detail": detail,
            "exit": 1,
        }

    def _offer_idle_tokens(self, serial: int | None = None) -> None:
        """Serve tokens already plugged in: idle ones, and for a request naming a token,
        that token even after earlier work on it (a resync of the token just enrolled)."""
        with self._lock:
            idle = [
                t.reader
                for t in self._present.values()
                if t.state == TokenState.IDLE
                or (
                    serial is not None
                    and t.serial == serial
                    and t.state in (TokenState.ENROLLED, TokenState.FAILED)
                )
            ]
        for reader in idle:
            self._start_worker(reader)

    def _cancel(self, request: Event, peer_name: str) -> Event:
        entry_id = request.get("id")
        if not isinstance(entry_id, int):
            return refusal("cancel needs a queue id")
        entry = self.store.cancel(entry_id, peer_name)
        if entry is None:
            return refusal(f"no waiting request #{entry_id} (see provisioner queue)")
        self.events.publish(
            {
                "queue": entry_id,
                "event": EventKind.OUTCOME,
                "final": True,
                "ok": False,
                "outcome": Outcome.CANCELLED,
                "exit": 1,
                "detail": f"request #{entry_id} for {entry.user} was cancelled by {peer_name}",
            }
        )
        return {"ok": True, "final": True, "cancelled": vars(entry)}

    def _reconcile(self, request: Event) -> Event:
        if self._recovery is None:
            return refusal("reconcile is not available")
        with self._lock:
            busy = frozenset(self._active)
        actions = self._recovery().run(
            dry_run=bool(request.get("dry_run")),
            delete_orphans=not request.get("keep_orphans"),
            all_desks=bool(request.get("all_desks")),
            busy=busy,
        )
        return {"ok": True, "final": True, "actions": [a.text for a in actions]}

    def _history(self, request: Event) -> Event:
        limit = request.get("limit", 100)
        user = request.get("user")
        serial = request.get("serial")
        since = request.get("since")
        if not (isinstance(limit, int) and 0 < limit <= 100_000):
            return refusal("limit must be 1..100000")
        if (
            (user is not None and not isinstance(user, str))
            or (serial is not None and not isinstance(serial, int))
            or (since is not None and not isinstance(since, (int, float)))
        ):
            return refusal("bad history filter")
        records = self.store.history(limit=limit, user=user, serial=serial, since=since)
        return {"ok": True, "final": True, "history": [r.as_dict() for r in records]}

    # --- state ------------------------------------------------------------------------

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
                "roster": len(self.roster) if self.roster else 0,
            },
            "readers": readers,
            "tokens": tokens,
            **self._queue_view(),
            "in_progress": [
                t for t in tokens if t["state"] in (TokenState.ENROLLING, TokenState.RESYNCING)
            ],
            "recent": recent,
        }

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
        waiting = self.store.queue_length()
        if busy:
            text = "; ".join(f"{t.state} {t.user} on token {t.serial} ({t.step})" for t in busy)
        else:
            text = f"idle: {present} token(s) present, {waiting} request(s) queued"
        if not self.pcsc_up:
            text += " (pcscd not reachable)"
        self._notifier.status(text)

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

    def healthy(self) -> bool:
        return not self._stopping.is_set()
