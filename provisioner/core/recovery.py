"""Recovery after a crash, and `provisioner reconcile`: every token and device accounted for.

The journal says, for every enrollment that did not finish, what may exist. A record
whose owner (the process doing it: the daemon, a one-shot `provisioner enroll`) still
runs is not a leftover: it is left alone, and so is its device. Any other is taken over
(so that two recoveries never settle the one record) and settled:

- enabled in IAM (the user lists the device): it worked; recorded as done.
- a device created but not enabled: if the token holding its credential is present, the
  enrollment is finished with codes from that credential (the token holds the only copy
  of the seed); otherwise, or if finishing fails, the device is deleted.
- a credential that may be on the token while its device is gone: removed now if the
  token is present, else the next time the token is seen.

Then the sweep: unassigned virtual devices under the desk's path carrying the tool's tag
(left by whatever cause: a process killed before it recorded its enrollment, another
desk's crash) are listed and, unless told not to, deleted. By default only this desk's;
``all_desks`` widens it. A device younger than ``min_age`` (by the creation time the desk
tags it with; IAM keeps none) is kept: an enrollment elsewhere may be about to enable it,
unless an ended enrollment here says it left that device behind (a failed rollback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from provisioner.core.enrollment import TOOL_TAG, Enrollment, created_at
from provisioner.core.errors import NotFound, ProvisionerError, ReconcileFailed
from provisioner.core.messages import Outcome
from provisioner.core.model import TagKey, VirtualDevice
from provisioner.core.ports import Fact, IamDirectory, TokenFinder
from provisioner.core.store import DeskStore, EnrollmentRecord


@dataclass(frozen=True)
class Action:
    """One thing recovery did (or, in a dry run, would do), in the operator's words."""

    text: str
    enrollment_id: int | None = None
    #: False for what was left alone on purpose: said, not audited.
    done: bool = True
    #: True when something could not be undone (the operator must act, or reconcile again).
    failed: bool = False


class Recovery:
    def __init__(
        self,
        iam: IamDirectory,
        store: DeskStore,
        enrollment: Callable[[int], Enrollment],
        find_token: TokenFinder,
        *,
        device_path: str,
        desk: str,
        owner_alive: Callable[[str], bool] = lambda owner: False,
        now: Callable[[], float] | None = None,
        min_age: float = 0.0,
    ) -> None:
        self._iam = iam
        self._store = store
        self._enrollment = enrollment
        self._find_token = find_token
        self._path = device_path
        self._desk = desk
        self._owner_alive = owner_alive
        self._now = now
        self._min_age = min_age

    def run(
        self,
        *,
        dry_run: bool = False,
        delete_orphans: bool = True,
        all_desks: bool = False,
        busy: frozenset[int] = frozenset(),
    ) -> list[Action]:
        """Recover every unfinished enrollment, then sweep orphans. ``busy`` names the
        enrollments in progress right now (in a running daemon): never touched, nor is
        any whose owner runs."""
        actions: list[Action] = []
        busy_arns: set[str] = set()
        step = "read the unfinished enrollments"
        try:
            for record in self._store.unfinished_enrollments():
                owner = record.owner
                running = record.id in busy or (owner is not None and self._owner_alive(owner))
                if not running and not dry_run:
                    # Taken over before anything is done: another recovery now leaves it alone.
                    running = not self._store.claim_enrollment(record.id, owner)
                if running:
                    if record.device_arn:
                        busy_arns.add(record.device_arn)
                    if record.id not in busy:
                        actions.append(_left_alone(record))
                    continue
                step = f"settle enrollment #{record.id} of {record.user}"
                try:
                    actions.extend(self._recover(record, dry_run))
                except BaseException:
                    if not dry_run:  # unsettled: handed back for the next recovery to take
                        self._store.release_enrollment(record.id)
                    raise
            step = "sweep orphaned devices"
            actions.extend(self._sweep(dry_run, delete_orphans, all_desks, frozenset(busy_arns)))
        except ProvisionerError as e:
            # Which step and why, as an enrollment's failure says; what was done stays done.
            done = tuple(a.text for a in actions if a.done)
            raise ReconcileFailed(step=step, cause=e, done=done) from e
        finally:
            if not dry_run:
                for action in actions:
                    if action.done:
                        self._store.audit("reconcile", "recovered", reason=action.text)
        return actions

    # --- one unfinished enrollment ------------------------------------------------------

    def _recover(self, r: EnrollmentRecord, dry_run: bool) -> list[Action]:
        eid, user, serial = r.id, r.user, r.serial
        arn, cred = r.device_arn, r.credential_id
        label = f"enrollment #{eid} of {user} on token {serial}"
        device_may_exist = r.device_state.may_exist and arn
        credential_may_exist = r.credential_state.may_exist and cred
        if device_may_exist:
            try:
                if arn in self._iam.list_mfa_devices(user):
                    if not dry_run:
                        self._store.record_fact(eid, Fact.CONFIRMED)
                        self._store.finish_enrollment(
                            eid,
                            outcome=Outcome.ENROLLED,
                            actor="reconcile",
                            device_arn=arn,
                            reason="found enabled after a restart",
                        )
                    return [Action(f"{label}: {arn} is enabled; recorded as done", eid)]
            except NotFound:
                pass  # the user is gone: undo below
        if dry_run:
            return [
                Action(
                    f"{label}: would finish it if the token is present, else remove "
                    f"{arn or 'nothing in IAM'} and {cred or 'no credential'}",
                    eid,
                )
            ]
        actions: list[Action] = []
        if device_may_exist and credential_may_exist and serial is not None:
            finished = self._finish(eid, user, int(serial), str(arn), str(cred), label)
            if finished is not None:
                return [finished]
        if device_may_exist:
            actions.append(self._delete_device(eid, str(arn), label))
        if credential_may_exist and serial is not None:
            actions.append(self._remove_credential(eid, int(serial), str(cred), label))
        outcome = (
            Outcome.FAILED_NOT_ROLLED_BACK
            if any(a.failed for a in actions)
            else Outcome.ROLLED_BACK
        )
        self._store.finish_enrollment(
            eid, outcome=outcome, actor="reconcile", reason="interrupted; recovered after a restart"
        )
        return actions or [Action(f"{label}: nothing had been created; closed", eid)]

    def _finish(
        self, eid: int, user: str, serial: int, arn: str, cred: str, label: str
    ) -> Action | None:
        exists = any(
            d.serial_number == arn for d in self._iam.list_virtual_mfa_devices(assigned=False)
        )
        if not exists:
            return None
        with self._find_token(serial) as token:
            if token is None:
                return None
            try:
                if cred not in token.oath_state().credential_ids:
                    return None
                result = self._enrollment(eid).complete(token, user, arn, cred)
            except ProvisionerError as e:
                self._store.audit(
                    "reconcile",
                    "finish failed",
                    user=user,
                    serial=serial,
                    device_arn=arn,
                    reason=e.one_line(),
                )
                return None
        self._store.finish_enrollment(
            eid,
            outcome=Outcome.ENROLLED,
            actor="reconcile",
            device_arn=result.device_arn,
            reason="finished after a restart with the token's credential",
        )
        return Action(f"{label}: finished with the credential on the token; {arn} enabled", eid)

    def _delete_device(self, eid: int, arn: str, label: str) -> Action:
        try:
            self._iam.delete_virtual_mfa_device(arn)
        except NotFound:
            self._store.record_fact(eid, Fact.DEVICE_DELETED)
            return Action(f"{label}: {arn} was never created", eid)
        except ProvisionerError as e:
            return Action(f"{label}: could not delete {arn}: {e.one_line()}", eid, failed=True)
        self._store.record_fact(eid, Fact.DEVICE_DELETED)
        return Action(f"{label}: deleted unassigned device {arn}", eid)

    def _remove_credential(self, eid: int, serial: int, cred: str, label: str) -> Action:
        with self._find_token(serial) as token:
            if token is not None:
                try:
                    token.delete_credential(cred)
                except ProvisionerError:
                    pass
                else:
                    self._store.record_fact(eid, Fact.CREDENTIAL_DELETED)
                    return Action(f"{label}: removed {cred} from token {serial}", eid)
        self._store.add_token_cleanup(serial, cred, eid, "its device was removed")
        return Action(
            f"{label}: {cred} will be removed from token {serial} when it is next plugged in", eid
        )

    # --- orphans ------------------------------------------------------------------------

    def orphans(
        self, all_desks: bool = False, busy: frozenset[str] = frozenset()
    ) -> list[VirtualDevice]:
        return [
            d
            for d in self._iam.list_virtual_mfa_devices(assigned=False)
            if self._iam.under_path(d.serial_number, self._path)
            and d.tag(TagKey.TOOL) == TOOL_TAG
            and (all_desks or d.tag(TagKey.DESK) == self._desk)
            and d.serial_number not in busy
        ]

    def _sweep(
        self, dry_run: bool, delete: bool, all_desks: bool, busy: frozenset[str]
    ) -> list[Action]:
        actions = []
        left_behind = self._store.left_behind()
        for device in self.orphans(all_desks, busy):
            who = (
                f"{device.tag('provisioner:user')} on token "
                f"{device.tag('provisioner:token-serial')}, desk {device.tag('provisioner:desk')}"
            )
            age = self._age(device)
            known = device.serial_number in left_behind
            if age is not None and age < self._min_age and not known:
                actions.append(
                    Action(
                        f"orphaned device {device.serial_number} ({who}): kept, created "
                        f"{age:.0f} s ago (younger than {self._min_age:.0f} s: it may still be "
                        "enrolling)",
                        done=False,
                    )
                )
                continue
            if dry_run or not delete:
                verb = "would delete" if dry_run and delete else "kept"
                actions.append(Action(f"orphaned device {device.serial_number} ({who}): {verb}"))
                continue
            try:
                self._iam.delete_virtual_mfa_device(device.serial_number)
            except NotFound:
                continue
            except ProvisionerError as e:
                actions.append(
                    Action(
                        f"could not delete orphaned device {device.serial_number}: {e.one_line()}",
                        failed=True,
                    )
                )
                continue
            actions.append(Action(f"deleted orphaned device {device.serial_number} ({who})"))
        return actions

    def _age(self, device: VirtualDevice) -> float | None:
        """Seconds since the device was created, if it says when (devices made before
        the desk tagged them with it do not: they count as old)."""
        created = created_at(device)
        if created is None or self._now is None:
            return None
        return max(0.0, self._now() - created)


def _left_alone(record: EnrollmentRecord) -> Action:
    pid = record.owner_pid
    where = f"in process {pid}" if pid is not None else "in the desk daemon"
    return Action(
        f"enrollment #{record.id} of {record.user} on token {record.serial}: "
        f"in progress {where}; left alone",
        record.id,
        done=False,
    )
