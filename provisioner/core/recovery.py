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

An enrollment in several accounts (a batch of records, one per account) is settled all
or nothing: finished in every account (the user already has some devices enabled, the
token holds the other credentials), else undone in every account, enabled devices too.

Then the sweep, in every account the desk serves: unassigned virtual devices under the
desk's path carrying the tool's tag (left by whatever cause: a process killed before it
recorded its enrollment, another desk's crash) are listed and, unless told not to,
deleted. By default only this desk's; ``all_desks`` widens it. A device younger than
``min_age`` (by the creation time the desk tags it with; IAM keeps none) is kept: an
enrollment elsewhere may be about to enable it, unless an ended enrollment here says it
left that device behind (a failed rollback).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from provisioner.core.enrollment import TOOL_TAG, Enrollment, created_at
from provisioner.core.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    ProvisionerError,
    ReconcileFailed,
)
from provisioner.core.messages import Outcome
from provisioner.core.model import TagKey, VirtualDevice
from provisioner.core.ports import Fact, IamDirectory, TokenFinder
from provisioner.core.store import DeskStore, EnrollmentRecord

#: A desk whose heartbeat is younger than this is alive (three beats of ten seconds).


@dataclass(frozen=True)
class AccountDirectory:
    """An account recovery works in: its directory, the desk's device path there, and an
    enrollment in it writing to a record's journal (to finish what a crash cut short)."""

    directory: IamDirectory
    device_path: str
    enrollment: Callable[[int], Enrollment]


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
        accounts: Mapping[str, AccountDirectory] | None = None,
    ) -> None:
        """``iam``, ``enrollment`` and ``device_path`` are the desk's own account's (its
        records name account ''); ``accounts`` the named accounts the desk serves. The
        sweep covers the named accounts when there are any, else the desk's own."""
        own = AccountDirectory(iam, device_path, enrollment)
        self._accounts: dict[str, AccountDirectory] = {"": own, **(accounts or {})}
        self._swept = dict(accounts) if accounts else {"": own}
        self._store = store
        self._find_token = find_token
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
        desk: str | None = None,
    ) -> list[Action]:
        """Recover every unfinished enrollment, then sweep orphans. ``busy`` names the
        enrollments in progress right now (in a running daemon): never touched, nor is
        any whose owner runs. ``desk``: another desk of the fleet's records and orphans,
        a desk that is dead (refused while its heartbeat says it is alive)."""
        if desk is not None and desk != self._desk:
            self._dead(desk)
            self._desk = desk
        actions: list[Action] = []
        busy_arns: set[str] = set()
        step = "read the unfinished enrollments"
        try:
            for group in _batches(self._store.unfinished_enrollments(desk)):
                if not self._take(group, busy, dry_run):
                    for record in group:
                        if record.device_arn:
                            busy_arns.add(record.device_arn)
                        if record.id not in busy:
                            actions.append(_left_alone(record))
                    continue
                step = f"settle {_settling(group)}"
                try:
                    if len(group) == 1:
                        actions.extend(self._recover(group[0], dry_run))
                    else:
                        actions.extend(self._recover_batch(group, dry_run))
                except BaseException:
                    if not dry_run:  # unsettled: handed back for the next recovery to take
                        for record in group:
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

    def _dead(self, desk: str) -> None:
        """Refuse to settle the records of a desk that still beats: they are its own."""
        if self._now is None:
            return
        for beat in self._store.desks():
            if beat.name == desk and beat.state(self._now()) == "alive":
                raise InvalidInput(
                    f"desk {desk} is alive (its last heartbeat {beat.silent_for(self._now()):.0f} "
                    "s ago): it settles its own records",
                    hint=f"stop that desk first, or wait until provisioner fleet shows {desk} "
                    "silent",
                )

    def _take(self, group: list[EnrollmentRecord], busy: frozenset[int], dry_run: bool) -> bool:
        """Whether this recovery settles ``group`` (one enrollment's records): none of them
        is running, and (unless a dry run) every one was taken over here first, so that
        another recovery now leaves them alone."""
        for record in group:
            owner = record.owner
            if record.id in busy or (owner is not None and self._owner_alive(owner)):
                return False
        if dry_run:
            return True
        taken: list[EnrollmentRecord] = []
        for record in group:
            if not self._store.claim_enrollment(record.id, record.owner):
                for mine in taken:
                    self._store.release_enrollment(mine.id)
                return False
            taken.append(record)
        return True

    def _account(self, r: EnrollmentRecord) -> AccountDirectory:
        where = self._accounts.get(r.account)
        if where is None:
            raise ConfigError(
                f"{_label(r)} is in account {r.account}, which this desk no longer serves",
                hint="add the account back to [[accounts]] and reconcile again",
            )
        return where

    # --- one unfinished enrollment ------------------------------------------------------

    def _recover(self, r: EnrollmentRecord, dry_run: bool) -> list[Action]:
        eid, user, serial = r.id, r.user, r.serial
        arn, cred = r.device_arn, r.credential_id
        label = _label(r)
        where = self._account(r)
        device_may_exist = r.device_state.may_exist and arn
        credential_may_exist = r.credential_state.may_exist and cred
        if device_may_exist:
            try:
                if arn in where.directory.list_mfa_devices(user):
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
            finished = self._finish(where, eid, user, int(serial), str(arn), str(cred), label)
            if finished is not None:
                return [finished]
        if device_may_exist:
            actions.append(self._delete_device(where, eid, str(arn), label))
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
        self,
        where: AccountDirectory,
        eid: int,
        user: str,
        serial: int,
        arn: str,
        cred: str,
        label: str,
    ) -> Action | None:
        exists = any(
            d.serial_number == arn for d in where.directory.list_virtual_mfa_devices(assigned=False)
        )
        if not exists:
            return None
        with self._find_token(serial) as token:
            if token is None:
                return None
            try:
                if cred not in token.oath_state().credential_ids:
                    return None
                result = where.enrollment(eid).complete(token, user, arn, cred)
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

    def _delete_device(self, where: AccountDirectory, eid: int, arn: str, label: str) -> Action:
        try:
            where.directory.delete_virtual_mfa_device(arn)
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

    # --- an enrollment in several accounts -------------------------------------------

    def _recover_batch(self, group: list[EnrollmentRecord], dry_run: bool) -> list[Action]:
        """All or nothing: finished in every account, or undone in every account."""
        label = _batch_label(group)
        enabled = {r.id: self._enabled(r) for r in group}
        if all(enabled.values()):
            for r in group:
                if not dry_run:
                    self._store.record_fact(r.id, Fact.CONFIRMED)
                    self._store.finish_enrollment(
                        r.id,
                        outcome=Outcome.ENROLLED,
                        actor="reconcile",
                        device_arn=r.device_arn,
                        reason="found enabled in every account after a restart",
                    )
            return [Action(f"{label}: enabled in every account; recorded as done", group[0].id)]
        if dry_run:
            return [
                Action(
                    f"{label}: would finish it in every account if the token is present, "
                    "else undo it in every account",
                    group[0].id,
                )
            ]
        done: list[Action] = []
        finished: set[int] = {r.id for r in group if enabled[r.id]}
        if all(r.id in finished or _finishable(r) for r in group):
            for r in group:
                if r.id in finished:
                    continue
                action = self._finish(
                    self._account(r),
                    r.id,
                    r.user,
                    int(r.serial or 0),
                    str(r.device_arn),
                    str(r.credential_id),
                    _label(r),
                )
                if action is None:
                    break
                done.append(action)
                finished.add(r.id)
        if len(finished) == len(group):
            for r in group:
                if enabled[r.id]:
                    self._store.record_fact(r.id, Fact.CONFIRMED)
                    self._store.finish_enrollment(
                        r.id,
                        outcome=Outcome.ENROLLED,
                        actor="reconcile",
                        device_arn=r.device_arn,
                        reason="found enabled after a restart",
                    )
            return [*done, Action(f"{label}: finished in every account", group[0].id)]
        return [*done, *self._undo_batch(group, finished)]

    def _enabled(self, r: EnrollmentRecord) -> bool:
        if not (r.device_state.may_exist and r.device_arn):
            return False
        try:
            return r.device_arn in self._account(r).directory.list_mfa_devices(r.user)
        except NotFound:
            return False

    def _undo_batch(self, group: list[EnrollmentRecord], assigned: set[int]) -> list[Action]:
        """Undo every account's part: the assigned devices deactivated first."""
        actions: list[Action] = []
        for r in group:
            where, label = self._account(r), _label(r)
            mine: list[Action] = []
            arn, cred, serial = r.device_arn, r.credential_id, r.serial
            if arn and (r.id in assigned or r.device_state.may_exist):
                if r.id in assigned:
                    failed = self._deactivate(where, r, label)
                    if failed is not None:
                        mine.append(failed)
                if not mine:
                    mine.append(self._delete_device(where, r.id, arn, label))
            if cred and serial is not None and (r.id in assigned or r.credential_state.may_exist):
                mine.append(self._remove_credential(r.id, int(serial), cred, label))
            outcome = (
                Outcome.FAILED_NOT_ROLLED_BACK
                if any(a.failed for a in mine)
                else Outcome.ROLLED_BACK
            )
            self._store.finish_enrollment(
                r.id,
                outcome=outcome,
                actor="reconcile",
                reason="interrupted; undone in every account after a restart "
                "(not every account could be finished)",
            )
            actions.extend(mine or [Action(f"{label}: nothing had been created; closed", r.id)])
        return actions

    def _deactivate(
        self, where: AccountDirectory, r: EnrollmentRecord, label: str
    ) -> Action | None:
        try:
            where.directory.deactivate_mfa_device(r.user, str(r.device_arn))
        except NotFound:
            return None
        except ProvisionerError as e:
            return Action(
                f"{label}: could not deactivate {r.device_arn}: {e.one_line()}", r.id, failed=True
            )
        self._store.record_fact(r.id, Fact.DEVICE_DEACTIVATED)
        return None

    # --- orphans ------------------------------------------------------------------------

    def orphans(
        self, all_desks: bool = False, busy: frozenset[str] = frozenset()
    ) -> list[VirtualDevice]:
        """Unassigned devices of this desk (of every desk: ``all_desks``) in every account
        it serves."""
        return [d for _, d in self._orphans(all_desks, busy)]

    def _orphans(
        self, all_desks: bool, busy: frozenset[str], unreachable: list[Action] | None = None
    ) -> list[tuple[AccountDirectory, VirtualDevice]]:
        """The orphans of every account swept; with several accounts, one that cannot be
        listed (its role refused, say) is put in ``unreachable`` and the others swept."""
        found: list[tuple[AccountDirectory, VirtualDevice]] = []
        seen: set[str] = set()
        for name, where in self._swept.items():
            iam = where.directory
            try:
                listed = iam.list_virtual_mfa_devices(assigned=False)
            except ProvisionerError as e:
                if unreachable is None or len(self._swept) == 1:
                    raise
                unreachable.append(
                    Action(f"could not sweep account {name}: {e.one_line()}", failed=True)
                )
                continue
            for d in listed:
                if (
                    iam.under_path(d.serial_number, where.device_path)
                    and d.tag(TagKey.TOOL) == TOOL_TAG
                    and (all_desks or d.tag(TagKey.DESK) == self._desk)
                    and d.serial_number not in busy
                    and d.serial_number not in seen  # two names for one account
                ):
                    seen.add(d.serial_number)
                    found.append((where, d))
        return found

    def _sweep(
        self, dry_run: bool, delete: bool, all_desks: bool, busy: frozenset[str]
    ) -> list[Action]:
        actions: list[Action] = []
        left_behind = self._store.left_behind()
        for where, device in self._orphans(all_desks, busy, actions):
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
                where.directory.delete_virtual_mfa_device(device.serial_number)
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


def _finishable(r: EnrollmentRecord) -> bool:
    """The device may exist and the token may hold its credential: finish it with codes."""
    return bool(
        r.device_state.may_exist
        and r.device_arn
        and r.credential_state.may_exist
        and r.credential_id
        and r.serial is not None
    )


def _batches(records: list[EnrollmentRecord]) -> list[list[EnrollmentRecord]]:
    """The records grouped by the enrollment they belong to, in the order first seen."""
    groups: dict[int, list[EnrollmentRecord]] = {}
    for r in records:
        groups.setdefault(r.batch if r.batch is not None else -r.id, []).append(r)
    return list(groups.values())


def _batch_label(group: list[EnrollmentRecord]) -> str:
    first = group[0]
    accounts = ", ".join(r.account for r in group)
    return (
        f"enrollment #{first.batch} of {first.user} in accounts {accounts} on token {first.serial}"
    )


def _settling(group: list[EnrollmentRecord]) -> str:
    r = group[0]
    if len(group) > 1:
        return (
            f"enrollment #{r.batch} of {r.user} in accounts {', '.join(x.account for x in group)}"
        )
    return f"enrollment #{r.id} of {r.user}" + (f" in account {r.account}" if r.account else "")


def _label(r: EnrollmentRecord) -> str:
    account = f" in account {r.account}" if r.account else ""
    return f"enrollment #{r.id} of {r.user}{account} on token {r.serial}"


def _left_alone(record: EnrollmentRecord) -> Action:
    pid = record.owner_pid
    where = f"in process {pid}" if pid is not None else "in the desk daemon"
    return Action(
        f"{_label(record)}: in progress {where}; left alone",
        record.id,
        done=False,
    )
