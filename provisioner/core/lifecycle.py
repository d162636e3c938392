"""Day two: revoke a user's token, resync one that drifted.

Both find the user's device through the tags the enrollment put on it (the tool, the
token's serial), so they act only on devices this tool enrolled, and only on the token
the operator means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from provisioner.core.clock import Clock
from provisioner.core.enrollment import TOOL_TAG, Enrollment, EnrollmentSettings, codes_on_token
from provisioner.core.errors import (
    AccountsIncomplete,
    InvalidInput,
    NotFound,
    ProvisionerError,
    ReplaceIncomplete,
    TokenError,
)
from provisioner.core.messages import Outcome
from provisioner.core.model import EnrollmentResult, TagKey, VirtualDevice
from provisioner.core.ports import IamDirectory, NullProgress, Progress, TokenFinder, TokenSession
from provisioner.core.store import DeskStore

#: What becomes of a credential on a token that is not plugged in: (serial, credential id)
#: -> a line for the operator.
AbsentNote = Callable[[str, str], str]


def left_on_token(serial: str, credential: str) -> str:
    return (
        f"{credential} stays on token {serial} (not plugged in): it is useless now; "
        "delete it with ykman oath accounts delete, or revoke with the token plugged in"
    )


@dataclass(frozen=True)
class Revoked:
    user: str
    device_arn: str
    token_serial: int | None
    credential_id: str
    credential_removed: bool
    #: What happened, one line each, in the operator's words.
    actions: tuple[str, ...]


class Lifecycle:
    def __init__(
        self,
        iam: IamDirectory,
        clock: Clock,
        settings: EnrollmentSettings,
        progress: Progress | None = None,
    ) -> None:
        self._iam = iam
        self._clock = clock
        self._settings = settings
        self._progress = progress or NullProgress()

    def devices_of(self, user: str, token_serial: int | None = None) -> list[VirtualDevice]:
        """The user's MFA devices this tool enrolled; for one token if a serial is given."""
        self._iam.user_account(user)  # UserNotFound, said as such
        assigned = set(self._iam.list_mfa_devices(user))
        return [
            d
            for d in self._iam.list_virtual_mfa_devices(assigned=True)
            if d.serial_number in assigned
            and d.tag(TagKey.TOOL) == TOOL_TAG
            and (token_serial is None or d.token_serial == token_serial)
        ]

    def devices_of_token(self, token_serial: int) -> list[VirtualDevice]:
        """Every user's device this tool enrolled on the token with this serial."""
        return [
            d
            for d in self._iam.list_virtual_mfa_devices(assigned=True)
            if d.tag(TagKey.TOOL) == TOOL_TAG and d.token_serial == token_serial and d.user
        ]

    def _the_device(self, user: str, token_serial: int | None) -> VirtualDevice:
        found = self.devices_of(user, token_serial)
        which = f" for token {token_serial}" if token_serial is not None else ""
        if not found:
            raise NotFound(
                f"{user} has no MFA device enrolled by provisioner{which}",
                hint=f"provisioner history --user {user} shows what was done",
            )
        if len(found) > 1:
            tokens = ", ".join(str(d.tag(TagKey.TOKEN_SERIAL)) for d in found)
            raise InvalidInput(
                f"{user} has {len(found)} MFA devices enrolled by provisioner (tokens {tokens})",
                hint="say which with --serial",
            )
        return found[0]

    def _credential_id(self, user: str, device: VirtualDevice) -> str:
        account = self._iam.device_account(device.serial_number)
        credential, _ = self._settings.names(user, account, device.token_serial)
        return credential.credential_id

    def revoke(
        self,
        user: str,
        token_serial: int | None,
        find_token: TokenFinder,
        absent: AbsentNote = left_on_token,
    ) -> Revoked:
        """Deactivate the device, delete it, and remove its credential if the token is here.

        ``find_token(serial)`` gives the token with that serial if it is plugged in;
        ``absent`` says what becomes of the credential when it is not.
        """
        device = self._the_device(user, token_serial)
        arn = device.serial_number
        serial_tag = device.tag(TagKey.TOKEN_SERIAL)
        actions = []
        self._iam.deactivate_mfa_device(user, arn)
        actions.append(f"deactivated {arn} for {user}")
        self._iam.delete_virtual_mfa_device(arn)
        actions.append(f"deleted {arn}")
        credential = self._credential_id(user, device)
        removed = False
        present = False
        if device.token_serial is not None:
            with find_token(device.token_serial) as token:
                if token is not None:
                    present = True
                    try:
                        removed = token.delete_credential(credential)
                    except TokenError as e:
                        actions.append(
                            f"could not remove {credential} from token {serial_tag}: {e.one_line()}"
                        )
                    else:
                        actions.append(
                            f"removed {credential} from token {serial_tag}"
                            if removed
                            else f"token {serial_tag} held no {credential}"
                        )
        if not present:
            actions.append(absent(serial_tag or "?", credential))
        for line in actions:
            self._progress.notice(line)
        return Revoked(
            user=user,
            device_arn=arn,
            token_serial=device.token_serial,
            credential_id=credential,
            credential_removed=removed,
            actions=tuple(actions),
        )

    def resync(self, user: str, token: TokenSession) -> tuple[str, int]:
        """Two consecutive codes from the credential on the token, then ResyncMFADevice.
        Returns the device and the first of the two time steps."""
        device = self._the_device(user, token.info.serial)
        account = self._iam.device_account(device.serial_number)
        credential, _ = self._settings.names(user, account, token.info.serial)
        token.oath_state()  # unlocks the applet if it has a password
        codes = codes_on_token(
            token, credential, None, self._clock, self._settings.margin, self._progress
        )
        self._iam.resync_mfa_device(user, device.serial_number, codes.first, codes.second)
        return device.serial_number, codes.first_step


def audit_revoked(
    store: DeskStore,
    actor: str,
    done: Revoked,
    *,
    account: str | None = None,
    replaced: bool = False,
) -> None:
    """A revocation in the audit trail (in ``account``, by a replacement if said)."""
    store.audit(
        actor,
        "revoked",
        user=done.user,
        serial=done.token_serial,
        device_arn=done.device_arn,
        outcome=Outcome.REVOKED,
        reason=("replaced; " if replaced else "") + "; ".join(done.actions),
        account=account,
    )


def audit_revoke_failed(
    store: DeskStore, actor: str, user: str, serial: int | None, error: ProvisionerError
) -> None:
    """A revocation that failed (in the account it names, if any) in the audit trail."""
    store.audit(
        actor,
        "revoke",
        user=user,
        serial=serial,
        outcome=Outcome.FAILED,
        reason=error.one_line(),
        account=getattr(error, "account", None),
    )


@dataclass(frozen=True)
class Replaced:
    enrolled: EnrollmentResult
    revoked: Revoked


def replace(
    lifecycle: Lifecycle,
    enrollment: Enrollment,
    user: str,
    new_token: TokenSession,
    old_serial: int | None,
    find_token: TokenFinder,
    absent: AbsentNote = left_on_token,
) -> Replaced:
    """Enroll the new token first, then revoke the old one: the user is never without MFA.

    If the enrollment fails nothing changed (it rolls itself back). If the revocation
    fails the user has both, and the error says so and what to run.
    """
    new_serial = new_token.info.serial
    others = [
        d
        for d in lifecycle.devices_of(user)
        if d.token_serial != new_serial and (old_serial is None or d.token_serial == old_serial)
    ]
    if not others:
        raise NotFound(
            f"{user} has no other token enrolled by provisioner to replace",
            hint="enroll the new token with provisioner enroll",
        )
    if len(others) > 1:
        tokens = ", ".join(str(d.tag(TagKey.TOKEN_SERIAL)) for d in others)
        raise InvalidInput(
            f"{user} has several tokens ({tokens})", hint="say which with --old-serial"
        )
    old = others[0].tag(TagKey.TOKEN_SERIAL)
    enrolled = enrollment.run(new_token, user)
    try:
        revoked = lifecycle.revoke(user, others[0].token_serial, find_token, absent)
    except ProvisionerError as e:
        raise ReplaceIncomplete(
            f"{user} now has the new token {new_serial} ({enrolled.device_arn}) AND still the "
            f"old device {others[0].serial_number}: revoking it failed: {e.message}",
            enrolled=enrolled,
            hint=f"provisioner revoke --user {user} --serial {old}",
        ) from e
    return Replaced(enrolled, revoked)


# --- in every account the desk serves ---------------------------------------------------


@dataclass(frozen=True)
class InAccount:
    """An account's lifecycle (its directory, its settings) and the person's user there."""

    name: str
    user: str
    lifecycle: Lifecycle


def revoke_everywhere(
    accounts: Sequence[InAccount],
    token_serial: int | None,
    find_token: TokenFinder,
    absent: AbsentNote = left_on_token,
    on_done: Callable[[str, Revoked], None] = lambda account, revoked: None,
) -> list[tuple[str, Revoked]]:
    """Revoke the person's device (of ``token_serial``) in every account that has one;
    accounts without one are passed over. A failure in one account does not stop the
    others (a revocation is wanted everywhere): AccountsIncomplete names it and what was
    done. ``on_done`` hears of each revocation as it is done (the audit trail)."""
    done: list[tuple[str, Revoked]] = []
    failed: list[tuple[str, ProvisionerError]] = []
    for account in accounts:
        try:
            revoked = account.lifecycle.revoke(account.user, token_serial, find_token, absent)
        except NotFound:
            continue
        except ProvisionerError as e:
            failed.append((account.name, e))
        else:
            on_done(account.name, revoked)
            done.append((account.name, revoked))
    _raise_incomplete("revoke", failed, [name for name, _ in done])
    if not done:
        which = f" for token {token_serial}" if token_serial is not None else ""
        names = ", ".join(a.name for a in accounts)
        user = accounts[0].user if accounts else "the user"
        raise NotFound(
            f"{user} has no MFA device enrolled by provisioner{which} in any of {names}",
            hint=f"provisioner history --user {user} shows what was done",
        )
    return done


def resync_everywhere(
    accounts: Sequence[InAccount], token: TokenSession
) -> list[tuple[str, str, int]]:
    """Resync the person's device of ``token`` in every account that has one: (account,
    device, first time step) each."""
    done: list[tuple[str, str, int]] = []
    failed: list[tuple[str, ProvisionerError]] = []
    for account in accounts:
        try:
            device, first_step = account.lifecycle.resync(account.user, token)
        except NotFound:
            continue
        except ProvisionerError as e:
            failed.append((account.name, e))
        else:
            done.append((account.name, device, first_step))
    _raise_incomplete("resync", failed, [name for name, _, _ in done])
    if not done:
        names = ", ".join(a.name for a in accounts)
        user = accounts[0].user if accounts else "the user"
        raise NotFound(
            f"{user} has no MFA device enrolled by provisioner for token {token.info.label} "
            f"in any of {names}"
        )
    return done


def _raise_incomplete(
    verb: str, failed: list[tuple[str, ProvisionerError]], done: list[str]
) -> None:
    if not failed:
        return
    name, error = failed[0]
    others = "".join(f"; and in account {n}: {e.message}" for n, e in failed[1:])
    did = f"; done in {', '.join(done)}" if done else "; done in no account"
    raise AccountsIncomplete(
        f"{verb} failed in account {name}: {error.message}{others}{did}",
        account=name,
        done=tuple(done),
        hint=error.hint,
    )
