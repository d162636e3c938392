"""The work on a token: enroll, replace, resync, and the credentials left to clean."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from functools import partial

from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.accounts import RecordedAccounts, replace_everywhere
from provisioner.core.errors import (
    AccountsIncomplete,
    AlreadyEnrolled,
    ExitStatus,
    ProvisionerError,
    ReplaceIncomplete,
    StoreError,
    failure_reason,
)
from provisioner.core.lifecycle import Revoked, audit_revoked, resync_everywhere
from provisioner.core.lifecycle import replace as replace_token
from provisioner.core.messages import (
    EventKind,
    Outcome,
    TokenState,
    already_enrolled,
    failed_outcome,
    failure_outcome,
)
from provisioner.core.model import Step
from provisioner.core.store import QueueEntry, RequestKind, RequestState
from provisioner.daemon.ahead import key_of
from provisioner.daemon.claim import Claims
from provisioner.daemon.events import Event
from provisioner.daemon.status import LiveStatus

log = logging.getLogger("provisioner.service")  # the journal's name for it, kept across moves


@contextlib.contextmanager
def no_token_here(serial: int) -> Iterator[YubiKeyToken | None]:
    """The daemon never opens a second token from inside a worker: a credential left on
    a token is removed by the token's own worker (see Operations._forget_on_token)."""
    yield None


class _Progress:
    """The enrollment's progress, into the store and out to the watchers."""

    def __init__(self, service: LiveStatus, enrollment_id: int | None, base: Event) -> None:
        self._service = service
        self._id = enrollment_id
        self._base = base

    def step(self, step: Step, detail: str) -> None:
        if step is not Step.ROLLBACK and self._id is not None:
            try:
                self._service.store.record_step(self._id, step.value)
            except StoreError:
                pass  # the step reached is for the operator; the journal is what counts
        self._service.note_step(self._base["reader"], step.value)
        self._service.events.publish(
            {**self._base, "event": EventKind.STEP, "step": step.value, "detail": detail}
        )

    def notice(self, text: str) -> None:
        self._service.events.publish({**self._base, "event": EventKind.NOTICE, "detail": text})


class Operations(Claims):
    """DeskService's operations: each runs the core and turns its end into an outcome."""

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
            accounts = self.desk.config.select_accounts(entry.accounts or None)
            if accounts:
                done = resync_everywhere(
                    self.desk.lifecycles(user, accounts, _Progress(self, None, base)), token
                )
                for _, one, step in done:
                    self.store.audit_resync(entry.requested_by, user, serial, (one, step))
                self._conclude(
                    reader,
                    base,
                    {
                        "ok": True,
                        "outcome": Outcome.RESYNCED,
                        "device_arn": done[0][1],
                        "summary": "\n".join(
                            f"resynced {user} in {name}: {one} with the codes of time steps "
                            f"{step} and {step + 1} from token {serial}"
                            for name, one, step in done
                        ),
                        "exit": ExitStatus.OK,
                    },
                    TokenState.ENROLLED,
                    entry,
                )
                return
            device, first_step = self.desk.lifecycle(_Progress(self, None, base)).resync(
                user, token
            )
        except ProvisionerError as e:
            outcome = failed_outcome(Outcome.RESYNC_FAILED, e)
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
                "exit": ExitStatus.OK,
            }
            self.store.audit_resync(entry.requested_by, user, serial, (device, first_step))
        state = TokenState.ENROLLED if outcome["ok"] else TokenState.FAILED
        self._conclude(reader, base, outcome, state, entry)

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

    def _release_roster(self, source: str, serial: int | None, state: TokenState) -> None:
        """A token the fleet's roster gave this desk and that did not end enrolled: any
        desk may take it again."""
        if source == "roster" and serial is not None and state is not TokenState.ENROLLED:
            if self.roster is None and self.desk.config.store.url:
                self._lasting(partial(self.store.release_rostered, serial))

    def _revoked_here(self, done: Revoked, actor: str, account: str) -> None:
        """An old token's device revoked in ``account`` by a replacement: in the trail,
        and its credential taken off the old token when the desk sees it."""
        audit_revoked(self.store, actor, done, account=account, replaced=True)
        self._forget_on_token(done, actor)

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

    def _enroll(
        self,
        reader: str,
        token: YubiKeyToken,
        user: str,
        entry: QueueEntry | None,
        source: str,
        actor: str,
        accounts: str = "",
    ) -> None:
        replacing = entry is not None and entry.kind is RequestKind.REPLACE
        if self.desk.config.accounts:
            self._enroll_accounts(reader, token, user, entry, source, actor, accounts)
            return
        serial = token.info.serial
        # the user checked, perhaps the device made, before this plug (its record with it)
        ready = None if replacing else self.ahead.take(key_of(entry, serial, user))
        if ready is not None and ready.enrollment_id is not None:
            enrollment_id = ready.enrollment_id
            self.store.attach_token(enrollment_id, serial, reader)
        else:
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
        # facts of what was done ride with the next write; every branch below flushes
        journal = self.store.journal(enrollment_id, defer_after=True)
        try:
            enrollment = self.desk.enrollment(progress, journal)
            if replacing:
                assert entry is not None
                done = replace_token(
                    self.desk.lifecycle(progress),
                    enrollment,
                    user,
                    token,
                    entry.old_serial,
                    no_token_here,
                    self._removed_when_seen,
                )
                self._forget_on_token(done.revoked, actor)
                result = done.enrolled
            elif ready is not None:
                result = enrollment.run_leg(token, ready.leg)
            else:
                result = enrollment.run(token, user)
        except ReplaceIncomplete as e:
            self._lasting(journal.flush)  # facts kept while the store was away
            self._lasting(
                partial(
                    self.store.finish_enrollment,
                    enrollment_id,
                    outcome=Outcome.ENROLLED,
                    actor=actor,
                    device_arn=e.enrolled.device_arn,
                    reason=e.one_line(),
                )
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
            self._lasting(journal.flush)  # facts kept while the store was away
            self._lasting(
                partial(
                    self.store.finish_enrollment,
                    enrollment_id,
                    outcome=Outcome.ALREADY_ENROLLED,
                    actor=actor,
                    reason=e.message,
                )
            )
            outcome = already_enrolled(e)
            state = TokenState.ENROLLED
        except ProvisionerError as e:
            self._lasting(journal.flush)  # facts kept while the store was away
            label = failure_outcome(e)
            self._lasting(
                partial(
                    self.store.finish_enrollment,
                    enrollment_id,
                    outcome=label,
                    actor=actor,
                    reason=e.one_line(),
                )
            )
            outcome = failed_outcome(label, e)
            state = TokenState.FAILED
        else:
            self._lasting(journal.flush)
            self._lasting(
                partial(
                    self.store.finish_enrollment,
                    enrollment_id,
                    outcome=Outcome.ENROLLED,
                    actor=actor,
                    device_arn=result.device_arn,
                )
            )
            outcome = {
                "ok": True,
                "outcome": Outcome.REPLACED if replacing else Outcome.ENROLLED,
                "device_arn": result.device_arn,
                "seconds": result.seconds,
                "exit": ExitStatus.OK,
            }
            state = TokenState.ENROLLED
        self._schedule_cleanup(enrollment_id, serial)
        self._release_roster(source, serial, state)
        with self._lock:
            self._active.discard(enrollment_id)
        self._conclude(reader, base, outcome, state, entry, enrollment_id)

    def _enroll_accounts(
        self,
        reader: str,
        token: YubiKeyToken,
        user: str,
        entry: QueueEntry | None,
        source: str,
        actor: str,
        names: str,
    ) -> None:
        """One plug, every account asked for (all the desk serves by default), all or
        nothing; a record per account, one batch."""
        serial = token.info.serial
        base: Event = {"reader": reader, "serial": serial, "user": user}
        base["queue"] = entry.id if entry else None
        try:
            accounts = self.desk.config.select_accounts(names or None)
            records = RecordedAccounts(
                self.store, self.desk.account_plans(user, accounts), token.info, source
            )
        except ProvisionerError as e:  # an account the configuration no longer has
            self._set(reader, state=TokenState.FAILED, user=user)
            self._conclude(
                reader, base, failed_outcome(Outcome.FAILED, e), TokenState.FAILED, entry
            )
            return
        base["enrollment"] = records.first
        if entry is not None:
            self.store.link_entry(entry.id, records.first)
        with self._lock:
            self._active.update(records.ids.values())
        self._set(reader, state=TokenState.ENROLLING, user=user, step=Step.CHECK.value)
        self.events.publish({**base, "event": EventKind.ENROLLING})
        outcome: Event
        progress = _Progress(self, records.first, base)
        replacing = entry is not None and entry.kind is RequestKind.REPLACE
        try:
            enrollment = self.desk.accounts_enrollment(user, accounts, progress, records.journal)
            if entry is not None and replacing:
                result, _ = replace_everywhere(
                    enrollment,
                    self.desk.lifecycles(user, accounts, progress),
                    user,
                    token,
                    entry.old_serial,
                    no_token_here,
                    self._removed_when_seen,
                    on_revoked=lambda account, done: self._revoked_here(done, actor, account),
                )
            else:
                result = enrollment.run(token, user)
        except AccountsIncomplete as e:  # a replacement: the new token is enrolled
            self._lasting(partial(records.finish, e.enrolled or e, actor))
            outcome = failed_outcome("enrolled, old token NOT revoked", e)
            state = TokenState.ENROLLED if e.enrolled else TokenState.FAILED
        except AlreadyEnrolled as e:
            self._lasting(partial(records.finish, e, actor))
            outcome = already_enrolled(e)
            state = TokenState.ENROLLED
        except ProvisionerError as e:
            self._lasting(partial(records.finish, e, actor))
            label = failure_outcome(e)
            outcome = failed_outcome(label, e)
            state = TokenState.FAILED
        else:
            self._lasting(partial(records.finish, result, actor))
            outcome = {
                "ok": True,
                "outcome": Outcome.REPLACED if replacing else Outcome.ENROLLED,
                "device_arn": result.enrolled[0][1].device_arn if result.enrolled else None,
                "accounts": [
                    {"account": name, "device_arn": done.device_arn}
                    for name, done in result.enrolled
                ]
                + [{"account": name, "device_arn": None} for name in result.already],
                "seconds": result.seconds,
                "exit": ExitStatus.OK,
            }
            state = TokenState.ENROLLED
        for eid in records.ids.values():
            self._schedule_cleanup(eid, serial)
        self._release_roster(source, serial, state)
        with self._lock:
            self._active.difference_update(records.ids.values())
        self._conclude(reader, base, outcome, state, entry, records.first)

    def _conclude(
        self,
        reader: str,
        base: Event,
        outcome: Event,
        state: TokenState,
        entry: QueueEntry | None,
        enrollment_id: int | None = None,
    ) -> None:
        """The end of a token's work: the request closed, the token's state, the outcome
        kept for the live view and told to whoever follows it."""
        if entry is not None:
            self.store.finish_entry(
                entry.id, RequestState.DONE if outcome["ok"] else RequestState.FAILED, enrollment_id
            )
        self._set(reader, state=state)
        with self._lock:
            self._recent.appendleft({**base, "at": time.time(), **outcome})
        self.events.publish({**base, "event": EventKind.OUTCOME, "final": True, **outcome})

    # --- requests from the control socket ---------------------------------------------
