"""One enrollment, as the steps an operator would name.

    check -> create device -> program token -> compute codes -> enable -> confirm

Every side effect is recorded as it happens, and any failure undoes them in reverse:
the credential leaves the token, the virtual device leaves IAM, an enabled device is
deactivated first. What cannot be undone is named in the error, never silently left.
The seed lives in memory from "create device" until this function returns.

Kept whole although long: read top to bottom, it is the enrollment, with each step's
undo beside it.
"""

from __future__ import annotations

import calendar
import re
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from provisioner.core import validation
from provisioner.core.clock import Clock
from provisioner.core.errors import (
    AlreadyEnrolled,
    AlreadyExists,
    ChangeInProgress,
    CodeMismatch,
    ConcurrentChange,
    DeviceLimitReached,
    DirectoryError,
    EnrollmentFailed,
    InUse,
    NotFound,
    ProvisionerError,
    TokenCredentialExists,
    TokenFull,
    TokenNoOath,
    TokenRemoved,
)
from provisioner.core.model import (
    CodePair,
    CredentialSpec,
    DeviceSpec,
    EnrollmentResult,
    Step,
    StepTiming,
    TagKey,
    VirtualDevice,
)
from provisioner.core.ports import (
    Fact,
    IamDirectory,
    Journal,
    NullJournal,
    NullProgress,
    Progress,
    TokenSession,
    render_template,
)
from provisioner.core.secret import Seed
from provisioner.core.totp import code_at, codes_equal, plan_window

TOOL_TAG = "provisioner"
#: When the desk created the device (IAM reports no creation time for a virtual device):
#: the orphan sweep leaves young devices to the enrollment that may still be using them.
CREATED_TAG = TagKey.CREATED
_CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def created_tag(epoch: float) -> str:
    return time.strftime(_CREATED_FORMAT, time.gmtime(epoch))


def created_at(device: VirtualDevice) -> float | None:
    """When the desk created ``device``, from its tag; None if it does not say."""
    value = device.tag(CREATED_TAG)
    if value is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(value, _CREATED_FORMAT)))
    except ValueError:
        return None


@dataclass(frozen=True)
class EnrollmentSettings:
    """What the configuration decides about every enrollment at this desk."""

    desk: str = "desk"
    issuer: str = "AWS"
    account_name: str = "{user}@{account}"
    touch: bool = False
    device_name: str = "{user}.yubikey.{serial}"
    device_path: str = "/provisioner/"
    extra_tags: tuple[tuple[str, str], ...] = ()
    #: Seconds of the current time step that must be left to submit in it.
    margin: float = 5.0
    enable_attempts: int = 3
    confirm_attempts: int = 6
    retry_delay: float = 0.25
    #: How long to wait for a pulled token to come back so its credential can be removed.
    reinsert_timeout: float = 60.0

    def names(
        self, user: str, account: str, serial: int | None, created: float | None = None
    ) -> tuple[CredentialSpec, DeviceSpec]:
        """The credential and device for this user and token, from the templates; the
        device tagged with ``created`` (epoch seconds), when given."""
        values = {
            "user": user,
            "account": account,
            "serial": str(serial) if serial is not None else "noserial",
            "desk": self.desk,
        }
        credential = CredentialSpec(
            issuer=render_template(self.issuer, values),
            account=render_template(self.account_name, values),
            touch=self.touch,
        )
        tags = (
            (TagKey.TOOL, TOOL_TAG),
            (TagKey.USER, user),
            (TagKey.TOKEN_SERIAL, values["serial"]),
            (TagKey.DESK, self.desk),
            *(((CREATED_TAG, created_tag(created)),) if created is not None else ()),
            *self.extra_tags,
        )
        device = DeviceSpec(
            name=validation.device_name(render_template(self.device_name, values)),
            path=validation.device_path(self.device_path),
            tags=validation.tags(tags),
        )
        return credential, device

    def credential_owners(
        self, credential_ids: Iterable[str], serial: int | None
    ) -> dict[str, str | None]:
        """The credentials among ``credential_ids`` (on token ``serial``) named as this
        desk names its own, each with the user it names (None when the templates name
        none): what makes a token not blank for this desk."""
        pattern = self._credential_pattern(serial)
        found: dict[str, str | None] = {}
        for credential_id in credential_ids:
            match = pattern.fullmatch(credential_id)
            if match is not None:
                found[credential_id] = match.groupdict().get("user")
        return found

    def _credential_pattern(self, serial: int | None) -> re.Pattern[str]:
        """The issuer and account templates as a pattern: {user} captured as an IAM user
        name, {account} as twelve digits, {serial} and {desk} as this token's and desk's."""
        known = {"serial": str(serial) if serial is not None else "noserial", "desk": self.desk}
        user_seen = False

        def pattern(template: str) -> str:
            nonlocal user_seen
            parts = []
            for literal, name, spec, conversion in string.Formatter().parse(template):
                parts.append(re.escape(literal))
                if name is None:
                    continue
                if spec or conversion:
                    parts.append(".*?")
                elif name == "user":
                    parts.append("(?P=user)" if user_seen else r"(?P<user>[\w+=,.@-]{1,64})")
                    user_seen = True
                elif name == "account":
                    parts.append("[0-9]{12}")
                else:
                    parts.append(re.escape(known[name]) if name in known else ".*?")
            return "".join(parts)

        issuer = pattern(self.issuer)
        account = pattern(self.account_name)
        return re.compile(f"{issuer}:{account}" if self.issuer else account, re.ASCII)


@dataclass
class _Undo:
    """What this attempt has done so far, so that a failure can undo exactly that."""

    device_arn: str | None = None
    credential_id: str | None = None
    maybe_enabled: bool = False
    timings: list[StepTiming] = field(default_factory=list)


class Enrollment:
    """Enrolls tokens for users against one IAM account."""

    def __init__(
        self,
        iam: IamDirectory,
        clock: Clock,
        settings: EnrollmentSettings,
        progress: Progress | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._iam = iam
        self._clock = clock
        self._settings = settings
        self._progress = progress or NullProgress()
        self._journal = journal or NullJournal()

    def run(self, token: TokenSession, user: str) -> EnrollmentResult:
        validation.user_name(user)
        started = self._clock.monotonic()
        undo = _Undo()
        seed: Seed | None = None
        current = Step.CHECK
        try:
            with self._timed(undo, Step.CHECK):
                credential, device, expected_arn = self._check(token, user)

            current = Step.CREATE_DEVICE
            with self._timed(undo, current):
                self._journal.record(Fact.DEVICE_REQUESTED, device_arn=expected_arn)
                try:
                    arn, seed = self._create(device, expected_arn)
                except DirectoryError as e:
                    if e.ambiguous:  # the device may exist though the answer was lost
                        undo.device_arn = expected_arn
                    raise
                undo.device_arn = arn
                self._journal.record(Fact.DEVICE_CREATED, device_arn=arn)
            self._progress.step(current, f"virtual MFA device {arn}")

            current = Step.PROGRAM_TOKEN
            with self._timed(undo, current):
                # Recorded before the write: a pulled card may or may not have stored it.
                undo.credential_id = credential.credential_id
                self._journal.record(
                    Fact.CREDENTIAL_REQUESTED, credential_id=credential.credential_id
                )
                token.put_credential(credential, seed)
                self._journal.record(Fact.CREDENTIAL_WRITTEN)
            self._progress.step(
                current,
                f"TOTP credential {credential.credential_id} written "
                f"(touch {'required' if credential.touch else 'not required'})",
            )

            current = Step.ENABLE
            first_step = self._enable(token, user, arn, credential, seed, undo)

            current = Step.CONFIRM
            with self._timed(undo, current):
                self._confirm(user, arn)
                self._journal.record(Fact.CONFIRMED)
            self._progress.step(current, f"{user} lists the device")
        except ProvisionerError as e:
            if isinstance(e, AlreadyEnrolled):
                raise
            leftovers = self._rollback(token, user, undo)
            raise EnrollmentFailed(
                step=current.value,
                user=user,
                token=token.info.label,
                cause=e,
                leftovers=leftovers,
            ) from e
        except BaseException:
            # A bug or an interrupt: still undo, then let it propagate as it is.
            self._rollback(token, user, undo)
            raise
        finally:
            if seed is not None:
                seed.wipe()
        return EnrollmentResult(
            user=user,
            token_serial=token.info.serial,
            device_arn=arn,
            credential_id=credential.credential_id,
            first_step=first_step,
            seconds=self._clock.monotonic() - started,
            timings=tuple(undo.timings),
        )

    def complete(
        self, token: TokenSession, user: str, arn: str, credential_id: str
    ) -> EnrollmentResult:
        """Finish an enrollment a crash interrupted: the device exists, unassigned, and the
        credential is on the token, the only copy of its seed. No rollback here: if this
        fails, the recovery that called it removes both."""
        started = self._clock.monotonic()
        undo = _Undo()
        issuer, _, account = credential_id.rpartition(":")
        credential = CredentialSpec(issuer=issuer, account=account)
        first_step = self._enable(token, user, arn, credential, None, undo)
        self._confirm(user, arn)
        self._journal.record(Fact.CONFIRMED)
        return EnrollmentResult(
            user=user,
            token_serial=token.info.serial,
            device_arn=arn,
            credential_id=credential_id,
            first_step=first_step,
            seconds=self._clock.monotonic() - started,
            timings=tuple(undo.timings),
        )

    # --- the steps ------------------------------------------------------------------

    def _check(self, token: TokenSession, user: str) -> tuple[CredentialSpec, DeviceSpec, str]:
        """Refuse before creating anything when the enrollment cannot succeed."""
        info = token.info
        if not info.has_oath:
            raise TokenNoOath(f"token {info.label} has no OATH application enabled")
        oath = token.oath_state()
        account = self._iam.user_account(user)
        devices = self._iam.list_mfa_devices(user)
        credential, device = self._settings.names(
            user, account, info.serial, created=self._clock.now()
        )
        arn = self._iam.device_id(account, device.path, device.name)
        on_token = credential.credential_id in oath.credential_ids
        if arn in devices and on_token:
            raise AlreadyEnrolled(f"{user} is already enrolled with token {info.label} ({arn})")
        if on_token:
            raise TokenCredentialExists(
                f"token {info.label} already holds a credential {credential.credential_id}"
            )
        if arn in devices:
            raise AlreadyExists(
                f"{user} already has device {arn} but token {info.label} does not hold "
                "its credential",
                hint="revoke that device, then enroll again",
            )
        if len(devices) >= self._iam.device_limit:
            raise DeviceLimitReached(
                f"{user} already has {len(devices)} MFA devices, the most IAM allows"
            )
        if oath.free_slots == 0:
            raise TokenFull(
                f"token {info.label} has no free OATH slot "
                f"({len(oath.credential_ids)} of {oath.capacity} used)"
            )
        self._progress.step(
            Step.CHECK,
            f"token {info.label} (firmware {info.firmware_text}, "
            f"{oath.free_slots} free OATH slots); {user} has {len(devices)} MFA devices",
        )
        return credential, device, arn

    def _create(self, device: DeviceSpec, arn: str) -> tuple[str, Seed]:
        try:
            return self._iam.create_virtual_mfa_device(device)
        except AlreadyExists:
            pass
        # A device of that name exists but is not the user's: left by an earlier attempt
        # (its seed died with that attempt), or our own retried call took effect. Either
        # way it is useless; IAM refuses to delete it if some user has it enabled.
        try:
            self._iam.delete_virtual_mfa_device(arn)
        except InUse as e:
            raise AlreadyExists(
                f"the device name {device.name} is taken by a device another user has enabled",
                hint="set iam.device_name to a template that includes {user} and {serial}",
            ) from e
        self._progress.notice(f"deleted unusable unassigned device {arn} left from earlier")
        return self._iam.create_virtual_mfa_device(device)

    def _enable(
        self,
        token: TokenSession,
        user: str,
        arn: str,
        credential: CredentialSpec,
        seed: Seed | None,
        undo: _Undo,
    ) -> int:
        """Compute fresh codes and enable; retried only where AWS says "try again"."""
        attempts = max(1, self._settings.enable_attempts)
        for attempt in range(1, attempts + 1):
            with self._timed(undo, Step.COMPUTE_CODES):
                codes = self._codes(token, credential, seed)
            self._progress.step(
                Step.COMPUTE_CODES,
                f"codes for time steps {codes.first_step} and {codes.first_step + 1} "
                f"computed on the token ({codes.seconds_left:.0f} s left to submit)",
            )
            try:
                with self._timed(undo, Step.ENABLE):
                    undo.maybe_enabled = True
                    self._journal.record(Fact.ENABLE_REQUESTED)
                    self._iam.enable_mfa_device(user, arn, codes.first, codes.second)
                    self._journal.record(Fact.ENABLED)
            except (ChangeInProgress, ConcurrentChange) as e:
                undo.maybe_enabled = False
                if attempt == attempts:
                    raise
                self._progress.notice(f"IAM says {e.code}; trying again with fresh codes")
                self._clock.sleep(self._settings.retry_delay * attempt)
                continue
            except DirectoryError as e:
                # A lost answer, or a retry that found its own first try done: look.
                if not (e.ambiguous or isinstance(e, AlreadyExists)):
                    undo.maybe_enabled = False
                    raise
                if arn not in self._iam.list_mfa_devices(user):
                    undo.maybe_enabled = False
                    if e.ambiguous and attempt < attempts:
                        continue
                    raise
                self._journal.record(Fact.ENABLED)
            self._progress.step(Step.ENABLE, f"device enabled for {user}")
            return codes.first_step
        raise AssertionError("unreachable")  # pragma: no cover

    def _codes(
        self, token: TokenSession, credential: CredentialSpec, seed: Seed | None
    ) -> CodePair:
        return codes_on_token(
            token, credential, seed, self._clock, self._settings.margin, self._progress
        )

    def _confirm(self, user: str, arn: str) -> None:
        """IAM is eventually consistent: give a fresh device a moment to show up."""
        for attempt in range(self._settings.confirm_attempts):
            if arn in self._iam.list_mfa_devices(user):
                return
            self._clock.sleep(self._settings.retry_delay * (2**attempt))
        raise NotFound(f"{user} does not list {arn} after it was enabled")

    # --- undo -----------------------------------------------------------------------

    def _rollback(self, token: TokenSession, user: str, undo: _Undo) -> tuple[str, ...]:
        """Undo in reverse order; return what could not be undone, in the operator's words."""
        left: list[str] = []
        arn = undo.device_arn
        if arn is not None:
            try:
                self._remove_device(user, arn, undo.maybe_enabled)
                self._progress.step(Step.ROLLBACK, f"deleted virtual MFA device {arn}")
            except ProvisionerError as e:
                left.append(f"virtual MFA device {arn} ({e.message})")
        if undo.credential_id is not None:
            try:
                if self._delete_credential(token, undo.credential_id):
                    self._progress.step(
                        Step.ROLLBACK,
                        f"deleted credential {undo.credential_id} from token {token.info.label}",
                    )
            except ProvisionerError as e:
                left.append(
                    f"credential {undo.credential_id} on token {token.info.label} ({e.message})"
                )
        return tuple(left)

    def _remove_device(self, user: str, arn: str, maybe_enabled: bool) -> None:
        if maybe_enabled:
            self._deactivate(user, arn)
        try:
            self._iam.delete_virtual_mfa_device(arn)
        except InUse:
            # Assigned after all (an answer we never saw): deactivate, then delete.
            self._deactivate(user, arn)
            self._iam.delete_virtual_mfa_device(arn)
        except NotFound:
            pass
        self._journal.record(Fact.DEVICE_DELETED, device_arn=arn)

    def _deactivate(self, user: str, arn: str) -> None:
        try:
            self._iam.deactivate_mfa_device(user, arn)
        except NotFound:
            return  # not assigned to the user: nothing to deactivate
        self._journal.record(Fact.DEVICE_DEACTIVATED, device_arn=arn)

    def _delete_credential(self, token: TokenSession, credential_id: str) -> bool:
        try:
            deleted = token.delete_credential(credential_id)
        except TokenRemoved:
            self._progress.notice(
                f"token {token.info.label} was removed: put it back within "
                f"{self._settings.reinsert_timeout:.0f} s so its credential can be removed"
            )
            token.reopen(self._settings.reinsert_timeout)
            deleted = token.delete_credential(credential_id)
        self._journal.record(Fact.CREDENTIAL_DELETED, credential_id=credential_id)
        return deleted

    # --- timing ---------------------------------------------------------------------

    def _timed(self, undo: _Undo, step: Step) -> _Timer:
        return _Timer(self._clock, undo.timings, step)


def codes_on_token(
    token: TokenSession,
    credential: CredentialSpec,
    seed: Seed | None,
    clock: Clock,
    margin: float,
    progress: Progress,
) -> CodePair:
    """Two consecutive codes computed on the token at once, for steps N-1 and N of AWS's
    clock (or N and N+1 after waiting out the end of a step); checked against the seed
    when the desk still holds it."""
    plan = plan_window(clock.now(), margin=margin, uncertainty=clock.uncertainty())
    if plan.wait > 0:
        progress.notice(f"{plan.wait:.1f} s until a time step has surely begun: waiting for it")
        clock.sleep(plan.wait)
    if credential.touch:
        progress.notice("touch the token now (twice: one touch per code)")
    t1, t2 = plan.timestamps
    first = token.calculate(credential.credential_id, t1)
    second = token.calculate(credential.credential_id, t2)
    if seed is not None and not (
        codes_equal(first, code_at(seed, t1)) and codes_equal(second, code_at(seed, t2))
    ):
        raise CodeMismatch(f"the codes computed on token {token.info.label} do not match the seed")
    return CodePair(first, second, plan.first_step, plan.seconds_left)


class _Timer:
    def __init__(self, clock: Clock, sink: list[StepTiming], step: Step) -> None:
        self._clock = clock
        self._sink = sink
        self._step = step
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = self._clock.monotonic()

    def __exit__(self, *exc: object) -> None:
        self._sink.append(StepTiming(self._step, self._clock.monotonic() - self._start))
