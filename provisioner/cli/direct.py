"""Work done in the command itself (`--direct`, or no daemon running), recorded in the
desk's state as the daemon records its own.

An enrollment (a replacement's too) gets its record, owned by this process, before
anything exists in IAM: recovery and the orphan sweep, in a daemon or in `provisioner
reconcile`, leave it alone while this process runs. Every enroll, resync, revoke and
replace ends in the audit trail, which is created (private, and as root given to the
service's user) when the daemon never ran. `provisioner history` reads the trail here,
read-only, when no daemon answers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner.adapters.ownership import SERVICE_USER, Owner, prepare_directory, private_file
from provisioner.config import AccountConfig, Config
from provisioner.core import validation
from provisioner.core.accounts import AccountsResult, RecordedAccounts, replace_everywhere
from provisioner.core.audit import ChainWalk
from provisioner.core.enrollment import Leg
from provisioner.core.errors import (
    AccountsIncomplete,
    AlreadyEnrolled,
    ConfigError,
    InvalidInput,
    NotPermitted,
    ProvisionerError,
    ReplaceIncomplete,
    StoreError,
)
from provisioner.core.lifecycle import (
    Lifecycle,
    Replaced,
    Revoked,
    audit_revoke_failed,
    audit_revoked,
    resync_everywhere,
    revoke_everywhere,
)
from provisioner.core.lifecycle import replace as replace_token
from provisioner.core.messages import Outcome, failure_outcome
from provisioner.core.model import EnrollmentResult
from provisioner.core.ports import Progress, TokenFinder, TokenSession
from provisioner.core.store import DeskBeat, DeskStore, TokenRecord
from provisioner.desk import Desk, desk_store, state_file

#: The most records one history answer holds (the daemon's limit too).
MAX_HISTORY = 100_000


@dataclass
class DeskState:
    """The desk's state, opened by a command that works here."""

    store: DeskStore
    owner: Owner
    #: Who is doing it, as the trail names them.
    actor: str


def actor() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


@contextlib.contextmanager
def desk_state(config: Config, *, service_user: str | None = SERVICE_USER) -> Iterator[DeskState]:
    """The desk's state for writing, created if the daemon never ran; NotPermitted if
    this user may not write it (nothing is done then)."""
    state_dir = config.daemon.state_path()
    path = state_file(config)
    try:
        prepare_directory(state_dir, service_user)
        private_file(path)
        if not os.access(path, os.R_OK | os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        owner = Owner.claim(state_dir)
    except PermissionError as e:
        raise _not_permitted("write", path, e) from e
    except OSError as e:
        raise ConfigError(
            f"cannot use the desk's state in {state_dir}: {e.strerror}",
            hint="check daemon.state_directory",
        ) from e
    try:
        store = desk_store(config, owner=owner)
    except StoreError as e:
        owner.release()
        raise ConfigError(f"cannot open the desk's state at {path}: {e}") from e
    try:
        yield DeskState(store, owner, actor())
    finally:
        store.close()
        owner.release()


def _not_permitted(verb: str, path: Path, error: OSError | StoreError) -> NotPermitted:
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    if verb == "read":
        hint = "run it as root or as the desk's service user; operators read it through the daemon"
    else:
        hint = "run it as root or as the desk's service user, or let the desk daemon do it"
    return NotPermitted(f"cannot {verb} the desk's audit trail at {path}: {cause}", hint=hint)


# --- enrollments ----------------------------------------------------------------------------


class CheckedMeanwhile:
    """The user's check in IAM, made on a thread of its own while the token is opened."""

    def __init__(self, desk: Desk, user: str) -> None:
        self._thread = threading.Thread(
            target=self._check, args=(desk,), name="check-user", daemon=True
        )
        #: The leg to enroll; the enrollment's check waits for this thread.
        self.leg = Leg(user, awaiting=self._thread.join)
        self._thread.start()

    def _check(self, desk: Desk) -> None:
        try:
            desk.enrollment().prepare(self.leg)
        except ProvisionerError:
            self.leg.facts = None  # the enrollment's own check asks again, and says why


def enroll(
    state: DeskState,
    desk: Desk,
    token: TokenSession,
    user: str,
    progress: Progress | None = None,
    *,
    checked: CheckedMeanwhile | None = None,
) -> EnrollmentResult:
    """Enroll ``token`` for ``user``, recorded from before the device is created (the user
    already checked in IAM when ``checked`` was, the enrollment's check then the token's
    alone)."""
    enrollment_id = _start(state, token, user)
    # facts of what was done ride with the next write (one fsync less a step), all of
    # them written before the record is closed
    journal = state.store.journal(enrollment_id, defer_after=True)
    try:
        enrollment = desk.enrollment(progress, journal)
        if checked is not None:
            result = enrollment.run_leg(token, checked.leg)  # the check waits for it
        else:
            result = enrollment.run(token, user)
    except ProvisionerError as e:
        journal.flush()
        _failed(state, enrollment_id, e)
        raise
    journal.flush()
    state.store.finish_enrollment(
        enrollment_id, outcome=Outcome.ENROLLED, actor=state.actor, device_arn=result.device_arn
    )
    return result


def enroll_accounts(
    state: DeskState,
    desk: Desk,
    token: TokenSession,
    user: str,
    accounts: Sequence[AccountConfig],
    progress: Progress | None = None,
) -> AccountsResult:
    """Enroll ``token`` for ``user`` in every one of ``accounts``, all or nothing, with a
    record per account (one batch) from before any device is created."""
    validation.user_name(user)  # before a record names it
    records = RecordedAccounts(
        state.store, desk.account_plans(user, accounts), token.info, "direct"
    )
    try:
        result = desk.accounts_enrollment(user, accounts, progress, records.journal).run(
            token, user
        )
    except ProvisionerError as e:
        records.finish(e, state.actor)
        raise
    records.finish(result, state.actor)
    return result


def replace_accounts(
    state: DeskState,
    desk: Desk,
    token: TokenSession,
    user: str,
    old_serial: int | None,
    find_token: TokenFinder,
    accounts: Sequence[AccountConfig],
    progress: Progress | None = None,
) -> tuple[AccountsResult, list[tuple[str, Revoked]]]:
    """Enroll ``token`` in every one of ``accounts`` (all or nothing), then revoke the old
    token wherever it is enrolled; each in the trail."""
    validation.user_name(user)
    records = RecordedAccounts(
        state.store, desk.account_plans(user, accounts), token.info, "direct"
    )

    def audited(account: str, done: Revoked) -> None:
        audit_revoked(state.store, state.actor, done, account=account, replaced=True)

    enrollment = desk.accounts_enrollment(user, accounts, progress, records.journal)
    try:
        enrolled, revoked = replace_everywhere(
            enrollment,
            desk.lifecycles(user, accounts, progress),
            user,
            token,
            old_serial,
            find_token,
            on_revoked=audited,
        )
    except AccountsIncomplete as e:
        # the new token is enrolled everywhere; the old one is not revoked everywhere
        records.finish(e.enrolled or e, state.actor)
        raise
    except ProvisionerError as e:
        records.finish(e, state.actor)
        raise
    records.finish(enrolled, state.actor)
    return enrolled, revoked


def replace(
    state: DeskState,
    desk: Desk,
    token: TokenSession,
    user: str,
    old_serial: int | None,
    find_token: TokenFinder,
    progress: Progress | None = None,
) -> Replaced:
    """Enroll ``token`` for ``user``, then revoke the old one (lifecycle.replace)."""
    enrollment_id = _start(state, token, user)
    enrollment = desk.enrollment(progress, state.store.journal(enrollment_id))
    try:
        done = replace_token(desk.lifecycle(), enrollment, user, token, old_serial, find_token)
    except ReplaceIncomplete as e:
        state.store.finish_enrollment(
            enrollment_id,
            outcome=Outcome.ENROLLED,
            actor=state.actor,
            device_arn=e.enrolled.device_arn,
            reason=e.one_line(),
        )
        raise
    except ProvisionerError as e:
        _failed(state, enrollment_id, e)
        raise
    state.store.finish_enrollment(
        enrollment_id,
        outcome=Outcome.ENROLLED,
        actor=state.actor,
        device_arn=done.enrolled.device_arn,
    )
    state.store.audit(
        state.actor,
        "replaced",
        user=user,
        serial=done.enrolled.token_serial,
        device_arn=done.enrolled.device_arn,
        outcome=Outcome.REPLACED,
        reason=f"token {done.revoked.token_serial} ({done.revoked.device_arn}) revoked",
    )
    return done


def _start(state: DeskState, token: TokenSession, user: str) -> int:
    validation.user_name(user)  # before a record names it
    return state.store.start_enrollment(user, token.info.serial, token.info.reader, "direct")


def _failed(state: DeskState, enrollment_id: int, error: ProvisionerError) -> None:
    if isinstance(error, AlreadyEnrolled):
        outcome, reason = Outcome.ALREADY_ENROLLED, error.message
    else:
        outcome, reason = failure_outcome(error), error.one_line()
    state.store.finish_enrollment(enrollment_id, outcome=outcome, actor=state.actor, reason=reason)


# --- resync and revoke ----------------------------------------------------------------------


def resync_accounts(
    state: DeskState,
    desk: Desk,
    token: TokenSession,
    user: str,
    accounts: Sequence[AccountConfig],
    progress: Progress | None = None,
) -> list[tuple[str, str, int]]:
    """ResyncMFADevice in every one of ``accounts`` that has the user's device of
    ``token``: (account, device, first time step) each."""
    try:
        done = resync_everywhere(desk.lifecycles(user, accounts, progress), token)
    except ProvisionerError as e:
        state.store.audit_resync(state.actor, user, token.info.serial, e)
        raise
    for _account, device, first_step in done:
        state.store.audit_resync(state.actor, user, token.info.serial, (device, first_step))
    return done


def resync(
    state: DeskState,
    desk: Desk,
    token: TokenSession,
    user: str,
    progress: Progress | None = None,
) -> tuple[str, int]:
    """ResyncMFADevice with codes from ``token``: the device and the first time step."""
    try:
        done = desk.lifecycle(progress).resync(user, token)
    except ProvisionerError as e:
        state.store.audit_resync(state.actor, user, token.info.serial, e)
        raise
    state.store.audit_resync(state.actor, user, token.info.serial, done)
    return done


def revoke_accounts(
    state: DeskState,
    desk: Desk,
    user: str,
    serial: int | None,
    find_token: TokenFinder,
    accounts: Sequence[AccountConfig],
) -> list[tuple[str, Revoked]]:
    """Revoke in every one of ``accounts`` that has the user's device; each revocation in
    the trail as it is done, a failure too."""

    def audited(account: str, done: Revoked) -> None:
        audit_revoked(state.store, state.actor, done, account=account)

    try:
        return revoke_everywhere(
            desk.lifecycles(user, accounts), serial, find_token, on_done=audited
        )
    except ProvisionerError as e:
        audit_revoke_failed(state.store, state.actor, user, serial, e)
        raise


def revoke(
    state: DeskState, desk: Desk, user: str, serial: int | None, find_token: TokenFinder
) -> Revoked:
    try:
        done = desk.lifecycle().revoke(user, serial, find_token)
    except ProvisionerError as e:
        audit_revoke_failed(state.store, state.actor, user, serial, e)
        raise
    audit_revoked(state.store, state.actor, done)
    return done


# --- the trail, read here -------------------------------------------------------------------


def _store_to_read(config: Config) -> bool:
    """Whether there is a store to read: the fleet's database always; this desk's SQLite
    file once the desk has made it (NotPermitted when this user may not read it)."""
    if config.store.url:
        return True
    path = state_file(config)
    try:
        with path.open("rb"):
            return True
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _not_permitted("read", path, e) from e


def history(
    config: Config,
    *,
    limit: int,
    user: str | None = None,
    serial: int | None = None,
    since: float | None = None,
    account: str | None = None,
    desk: str | None = None,
) -> list[dict[str, Any]] | None:
    """The audit trail as the daemon answers it, read-only; None if there is none yet."""
    if not 0 < limit <= MAX_HISTORY:
        raise InvalidInput(f"limit must be 1..{MAX_HISTORY}")
    if not _store_to_read(config):
        return None
    path = state_file(config)
    try:
        store = desk_store(config, read_only=True)
        try:
            records = store.history(
                limit=limit, user=user, serial=serial, since=since, account=account, desk=desk
            )
        finally:
            store.close()
    except StoreError as e:
        if config.store.url:  # the fleet's database: its own one line says what is wrong
            raise
        raise _not_permitted("read", path, e) from e
    return [r.as_dict() for r in records]


def verify_trail(config: Config) -> ChainWalk | None:
    """Every desk's hash chain walked, read-only; None if there is no trail yet."""
    if not _store_to_read(config):
        return None
    walk = ChainWalk()
    store = desk_store(config, read_only=True)
    try:
        after = 0
        while page := store.audit_trail(after=after):
            for record in page:
                walk.see(record.as_dict())
            after = page[-1].id
    finally:
        store.close()
    return walk


def fleet(config: Config) -> list[DeskBeat]:
    """Every desk's last heartbeat, read from the store (the fleet's, or this desk's)."""
    if not _store_to_read(config):
        return []
    store = desk_store(config, read_only=True)
    try:
        return store.desks()
    finally:
        store.close()


def lost(state: DeskState, desk: Desk, serial: int) -> list[tuple[str, Revoked]]:
    """A token reported lost: every device it holds revoked, in every account the desk
    serves, its credentials removed if it is ever plugged in at any desk again."""
    accounts: Sequence[AccountConfig | None] = desk.config.accounts or (None,)
    done: list[tuple[str, Revoked]] = []
    for account in accounts:
        name = account.name if account is not None else ""
        lifecycle = Lifecycle(
            desk.directory(account), desk.clock, desk.config.enrollment_settings(account)
        )
        for device in lifecycle.devices_of_token(serial):
            assert device.user is not None
            revoked = lifecycle.revoke(
                device.user, serial, lambda s: contextlib.nullcontext(None), _wiped_when_seen
            )
            audit_revoked(state.store, state.actor, revoked, account=name or None)
            state.store.add_token_cleanup(
                serial, revoked.credential_id, None, f"token {serial} reported lost"
            )
            done.append((name, revoked))
    state.store.mark_lost(
        serial, state.actor, f"{len(done)} devices revoked" if done else "no device held"
    )
    return done


def _wiped_when_seen(serial: str, credential: str) -> str:
    return f"{credential} is removed from token {serial} if it is plugged in at any desk"


def inventory(
    config: Config, *, user: str | None = None, serial: int | None = None
) -> list[TokenRecord]:
    """The token inventory, read from the store."""
    if not _store_to_read(config):
        return []
    store = desk_store(config, read_only=True)
    try:
        return store.inventory(user=user, serial=serial)
    finally:
        store.close()
