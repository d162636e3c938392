"""One enrollment, as the steps an operator would name.

    check -> create device -> program token -> compute codes -> enable -> confirm

Round trips to IAM on the way: one for the checks (the user and their devices looked up
side by side, while the token is read), one to create the device, one to enable it. A
successful EnableMFADevice is the confirmation; IAM is asked again only when its answer
was lost.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

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
    OathState,
    Step,
    StepTiming,
    TagKey,
    TokenInfo,
    VirtualDevice,
)
from provisioner.core.parallel import all_or_first_error, side_by_side
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
    retry_delay: float = 0.25
    #: How long to wait for a pulled token to come back so its credential can be removed.
    reinsert_timeout: float = 60.0

    def names(
        self,
        user: str,
        account: str,
        serial: int | None,
        created: float | None = None,
        *,
        unknown_serial: str = "noserial",
    ) -> tuple[CredentialSpec, DeviceSpec]:
        """The credential and device for this user and token, from the templates; the
        device tagged with ``created`` (epoch seconds), when given. ``unknown_serial``
        stands for a serial not known (a device made before its token is plugged in)."""
        values = {
            "user": user,
            "account": account,
            "serial": str(serial) if serial is not None else unknown_serial,
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


@dataclass(frozen=True)
class UserFacts:
    """What IAM says about a user before anything is created: the account they are in
    and the MFA devices they have."""

    account: str
    devices: tuple[str, ...]


@dataclass
class Leg:
    """One account's part of an enrollment: what is planned there, and what has been done
    so far, so that a failure can undo exactly that. The seed lives here from "create
    device" until the enrollment wipes it."""

    user: str
    credential: CredentialSpec | None = None
    device: DeviceSpec | None = None
    #: The id the device gets when created (recorded before the create).
    expected_arn: str = ""
    devices: int = 0
    # --- done so far
    device_arn: str | None = None
    credential_id: str | None = None
    maybe_enabled: bool = False
    #: The device was made before its token was known: its token-serial tag is set once
    #: it is enabled, to ``serial_tag`` (the plugged token's, as the check names it).
    tag_serial: bool = False
    serial_tag: str = ""
    #: What IAM said of the user when they were checked ahead of the plug (None: ask).
    facts: UserFacts | None = None
    #: Waits for ``facts`` from a check still running on another thread (the one-shot
    #: command asks IAM while it opens the token); part of the check step's time.
    awaiting: Callable[[], None] | None = field(default=None, repr=False)
    seed: Seed | None = field(default=None, repr=False)
    first_step: int = 0
    timings: list[StepTiming] = field(default_factory=list)

    def wipe(self) -> None:
        if self.seed is not None:
            self.seed.wipe()


class Enrollment:
    """Enrolls tokens for users against one directory (one IAM account). The steps are
    public so that an enrollment in several accounts (core/accounts.py) runs the same
    steps side by side."""

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

    @property
    def settings(self) -> EnrollmentSettings:
        return self._settings

    @property
    def progress(self) -> Progress:
        return self._progress

    def run(self, token: TokenSession, user: str) -> EnrollmentResult:
        validation.user_name(user)
        return self.run_leg(token, Leg(user))

    def run_leg(self, token: TokenSession, leg: Leg) -> EnrollmentResult:
        """Enroll ``token`` for ``leg.user``, from where the leg stands: nothing done yet,
        or prepared before the plug (``prepare``: the user checked, the device perhaps
        made), when the token waits only for what remains."""
        user = validation.user_name(leg.user)
        started = self._clock.monotonic()
        current = Step.CHECK
        try:
            with self.timed(leg, Step.CHECK):
                if leg.awaiting is not None:
                    leg.awaiting()
                if leg.facts is not None:  # IAM asked before the plug: the token only
                    oath, facts = check_token(token), leg.facts
                else:
                    oath, facts = self._check_both(token, user)
                self.plan(token.info, oath, leg, facts)
                check_slots(token.info, oath, 1)
            self.report_check(token.info, oath, leg)

            if leg.device_arn is None:
                current = Step.CREATE_DEVICE
                self.create(leg)

            current = Step.PROGRAM_TOKEN
            self.program(token, leg)

            current = Step.ENABLE
            self.enable(token, leg)

            current = Step.CONFIRM
            self.confirm(leg)
        except ProvisionerError as e:
            if isinstance(e, AlreadyEnrolled):
                self.rollback_device(leg)  # one made ahead, now of no use
                raise
            leftovers = self.rollback(token, leg)
            raise EnrollmentFailed(
                step=current.value,
                user=user,
                token=token.info.label,
                cause=e,
                leftovers=leftovers,
            ) from e
        except BaseException:
            # A bug or an interrupt: still undo, then let it propagate as it is.
            self.rollback(token, leg)
            raise
        finally:
            leg.wipe()
        return self.result(token, leg, self._clock.monotonic() - started)

    def prepare(self, leg: Leg) -> None:
        """Before the plug: check the user in IAM (``leg.facts``), refusing what would
        fail whatever token comes. ``run_leg`` then skips that round trip."""
        validation.user_name(leg.user)
        leg.facts = self.look_up(leg.user)
        self._room_for_one(leg.user, leg.facts.devices)

    def make_device(self, leg: Leg, serial: int | None, unknown_serial: str) -> None:
        """Before the plug, after ``prepare``: create the user's virtual device, named
        with ``serial`` or, not known yet, ``unknown_serial`` (unique: two desks never
        make one name). The seed stays in ``leg``, in memory; ``run_leg`` goes on from
        here when the token comes, ``rollback_device`` undoes it when it does not."""
        assert leg.facts is not None, "prepare() first"
        _, spec = self._settings.names(
            leg.user,
            leg.facts.account,
            serial,
            created=self._clock.now(),
            unknown_serial=unknown_serial,
        )
        leg.device = spec
        leg.expected_arn = self._iam.device_id(leg.facts.account, spec.path, spec.name)
        leg.tag_serial = serial is None
        try:
            self.create(leg)
        except ProvisionerError:
            self.rollback_device(leg)
            leg.wipe()
            raise

    def result(self, token: TokenSession, leg: Leg, seconds: float) -> EnrollmentResult:
        assert leg.device_arn is not None and leg.credential is not None
        return EnrollmentResult(
            user=leg.user,
            token_serial=token.info.serial,
            device_arn=leg.device_arn,
            credential_id=leg.credential.credential_id,
            first_step=leg.first_step,
            seconds=seconds,
            timings=tuple(leg.timings),
        )

    def complete(
        self, token: TokenSession, user: str, arn: str, credential_id: str
    ) -> EnrollmentResult:
        """Finish an enrollment a crash interrupted: the device exists, unassigned, and the
        credential is on the token, the only copy of its seed. No rollback here: if this
        fails, the recovery that called it removes both."""
        started = self._clock.monotonic()
        issuer, _, account = credential_id.rpartition(":")
        leg = Leg(user, credential=CredentialSpec(issuer=issuer, account=account))
        leg.device_arn = arn
        self.enable(token, leg)
        self._journal.record(Fact.CONFIRMED)
        return self.result(token, leg, self._clock.monotonic() - started)

    # --- the steps ------------------------------------------------------------------

    def _check_both(self, token: TokenSession, user: str) -> tuple[OathState, UserFacts]:
        """The token read here while IAM looks the user up: one round trip."""
        checks: list[Callable[[], object]] = [
            partial(check_token, token),
            partial(self.look_up, user),
        ]
        oath, facts = all_or_first_error(side_by_side(checks))
        assert isinstance(oath, OathState) and isinstance(facts, UserFacts)
        return oath, facts

    def look_up(self, user: str) -> UserFacts:
        """The user's account (GetUser: they exist) and devices (ListMFADevices), asked
        side by side."""
        calls: list[Callable[[], object]] = [
            partial(self._iam.user_account, user),
            partial(self._iam.list_mfa_devices, user),
        ]
        account, devices = all_or_first_error(side_by_side(calls))
        assert isinstance(account, str) and isinstance(devices, list)
        return UserFacts(account, tuple(devices))

    def plan(
        self, info: TokenInfo, oath: OathState, leg: Leg, facts: UserFacts | None = None
    ) -> None:
        """Name the device and credential, and refuse before anything is created when the
        enrollment cannot succeed in this directory (``facts``: the user looked up
        already, else here)."""
        user = leg.user
        facts = facts or self.look_up(user)
        account, devices = facts.account, facts.devices
        credential, device = self._settings.names(
            user, account, info.serial, created=self._clock.now()
        )
        # the device this token would have: the one made ahead is another name for it
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
        self._room_for_one(user, devices)
        leg.credential = credential
        leg.serial_tag = dict(device.tags)[TagKey.TOKEN_SERIAL]
        if leg.device_arn is None:  # else made ahead, under the name it has
            leg.device, leg.expected_arn = device, arn
        leg.devices = len(devices)

    def _room_for_one(self, user: str, devices: tuple[str, ...]) -> None:
        """The user may have one more MFA device (the limit is the directory's)."""
        if len(devices) >= self._iam.device_limit:
            raise DeviceLimitReached(
                f"{user} already has {len(devices)} MFA devices, the most IAM allows"
            )

    def report_check(self, info: TokenInfo, oath: OathState, leg: Leg) -> None:
        self._progress.step(
            Step.CHECK,
            f"token {info.label} (firmware {info.firmware_text}, "
            f"{oath.free_slots} free OATH slots); {leg.user} has {leg.devices} MFA devices",
        )

    def create(self, leg: Leg) -> None:
        """Create the virtual device; its seed is kept in ``leg`` for the credential."""
        assert leg.device is not None
        with self.timed(leg, Step.CREATE_DEVICE):
            self._journal.record(Fact.DEVICE_REQUESTED, device_arn=leg.expected_arn)
            try:
                arn, leg.seed = self._create(leg.device, leg.expected_arn)
            except DirectoryError as e:
                if e.ambiguous:  # the device may exist though the answer was lost
                    leg.device_arn = leg.expected_arn
                raise
            leg.device_arn = arn
            self._journal.record(Fact.DEVICE_CREATED, device_arn=arn)
        self._progress.step(Step.CREATE_DEVICE, f"virtual MFA device {arn}")

    def program(self, token: TokenSession, leg: Leg) -> None:
        """Write the credential into the token."""
        credential, seed = leg.credential, leg.seed
        assert credential is not None and seed is not None
        with self.timed(leg, Step.PROGRAM_TOKEN):
            # Recorded before the write: a pulled card may or may not have stored it.
            leg.credential_id = credential.credential_id
            self._journal.record(Fact.CREDENTIAL_REQUESTED, credential_id=credential.credential_id)
            token.put_credential(credential, seed)
            self._journal.record(Fact.CREDENTIAL_WRITTEN)
        self._progress.step(
            Step.PROGRAM_TOKEN,
            f"TOTP credential {credential.credential_id} written "
            f"(touch {'required' if credential.touch else 'not required'})",
        )

    def confirm(self, leg: Leg) -> None:
        """The device is the user's: IAM said so, answering EnableMFADevice (or, where
        that answer was lost, listing the user's devices). No call of its own: asking
        again would cost a round trip and tell nothing new."""
        assert leg.device_arn is not None
        with self.timed(leg, Step.CONFIRM):
            if leg.tag_serial:  # made ahead: now its token is known, and the device is used
                self._iam.tag_device(leg.device_arn, ((TagKey.TOKEN_SERIAL, leg.serial_tag),))
            self._journal.record(Fact.CONFIRMED)
        self._progress.step(Step.CONFIRM, f"IAM has {leg.device_arn} enabled for {leg.user}")

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

    def enable(self, token: TokenSession, leg: Leg, codes: CodePair | None = None) -> None:
        """Compute fresh codes (or use ``codes``, computed for several accounts in one
        pass) and enable; retried only where AWS says "try again"."""
        user, arn, credential = leg.user, leg.device_arn, leg.credential
        assert arn is not None and credential is not None
        attempts = max(1, self._settings.enable_attempts)
        for attempt in range(1, attempts + 1):
            if codes is None or attempt > 1:  # else computed for every account in one pass
                with self.timed(leg, Step.COMPUTE_CODES):
                    codes = self._codes(token, credential, leg.seed)
                self._progress.step(
                    Step.COMPUTE_CODES,
                    f"codes for time steps {codes.first_step} and {codes.first_step + 1} "
                    f"computed on the token ({codes.seconds_left:.0f} s left to submit)",
                )
            try:
                with self.timed(leg, Step.ENABLE):
                    leg.maybe_enabled = True
                    self._journal.record(Fact.ENABLE_REQUESTED)
                    self._iam.enable_mfa_device(user, arn, codes.first, codes.second)
                    self._journal.record(Fact.ENABLED)
            except (ChangeInProgress, ConcurrentChange) as e:
                leg.maybe_enabled = False
                if attempt == attempts:
                    raise
                self._progress.notice(f"IAM says {e.code}; trying again with fresh codes")
                self._clock.sleep(self._settings.retry_delay * attempt)
                continue
            except DirectoryError as e:
                # A lost answer, or a retry that found its own first try done: look.
                if not (e.ambiguous or isinstance(e, AlreadyExists)):
                    leg.maybe_enabled = False
                    raise
                if arn not in self._iam.list_mfa_devices(user):
                    leg.maybe_enabled = False
                    if e.ambiguous and attempt < attempts:
                        continue
                    raise
                self._journal.record(Fact.ENABLED)
            self._progress.step(Step.ENABLE, f"device enabled for {user}")
            leg.first_step = codes.first_step
            return
        raise AssertionError("unreachable")  # pragma: no cover

    def _codes(
        self, token: TokenSession, credential: CredentialSpec, seed: Seed | None
    ) -> CodePair:
        return codes_on_token(
            token, credential, seed, self._clock, self._settings.margin, self._progress
        )

    # --- undo -----------------------------------------------------------------------

    def rollback(self, token: TokenSession, leg: Leg) -> tuple[str, ...]:
        """Undo in reverse order; return what could not be undone, in the operator's words."""
        return self.rollback_device(leg) + self.rollback_credential(token, leg)

    def rollback_device(self, leg: Leg) -> tuple[str, ...]:
        arn = leg.device_arn
        if arn is None:
            return ()
        try:
            self._remove_device(leg.user, arn, leg.maybe_enabled)
        except ProvisionerError as e:
            return (f"virtual MFA device {arn} ({e.message})",)
        self._progress.step(Step.ROLLBACK, f"deleted virtual MFA device {arn}")
        return ()

    def rollback_credential(self, token: TokenSession, leg: Leg) -> tuple[str, ...]:
        if leg.credential_id is None:
            return ()
        try:
            if self._delete_credential(token, leg.credential_id):
                self._progress.step(
                    Step.ROLLBACK,
                    f"deleted credential {leg.credential_id} from token {token.info.label}",
                )
        except ProvisionerError as e:
            return (f"credential {leg.credential_id} on token {token.info.label} ({e.message})",)
        return ()

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

    def timed(self, leg: Leg, step: Step) -> _Timer:
        return _Timer(self._clock, leg.timings, step)


def check_token(token: TokenSession) -> OathState:
    """The token's own check: an OATH applet, opened (and unlocked)."""
    info = token.info
    if not info.has_oath:
        raise TokenNoOath(f"token {info.label} has no OATH application enabled")
    return token.oath_state()


def check_slots(info: TokenInfo, oath: OathState, needed: int) -> None:
    """Refuse when the token has fewer free OATH slots than the credentials to write."""
    if oath.free_slots >= needed:
        return
    if needed == 1:
        raise TokenFull(
            f"token {info.label} has no free OATH slot "
            f"({len(oath.credential_ids)} of {oath.capacity} used)"
        )
    raise TokenFull(
        f"token {info.label} has {oath.free_slots} free OATH slots, {needed} are needed "
        f"({len(oath.credential_ids)} of {oath.capacity} used)"
    )


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
