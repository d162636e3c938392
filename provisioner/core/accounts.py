"""One plug, several accounts: the enrollment's steps run side by side, all or nothing.

    check every account (and the token once) -> create every device (in parallel)
    -> write every credential -> every code in one pass on the token
    -> enable every device (in parallel) -> confirm (in parallel)

Each account has its own directory (an assumed role's session), its own settings (its
issuer, `AWS {name}` by default, so the credentials differ) and its own journal (a record
in the store), and runs the same steps as a one-account enrollment (core/enrollment.py).
Nothing is created until every account has passed its checks and the token has a free
slot for each credential. If any account fails at any step, every account is undone: its
device deactivated and deleted, its credential removed; what cannot be undone is named
with its account.

The token is one channel: its calls are made one at a time (a lock), while the
directories' round trips overlap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from provisioner.core import validation
from provisioner.core.clock import Clock
from provisioner.core.enrollment import Enrollment, Leg, UserFacts, check_slots, check_token
from provisioner.core.errors import (
    AccountsIncomplete,
    AlreadyEnrolled,
    CodeMismatch,
    EnrollmentFailed,
    InvalidInput,
    NotFound,
    ProvisionerError,
)
from provisioner.core.lifecycle import (
    AbsentNote,
    InAccount,
    Revoked,
    left_on_token,
    revoke_everywhere,
)
from provisioner.core.messages import Outcome
from provisioner.core.model import (
    CodePair,
    CredentialSpec,
    EnrollmentResult,
    OathState,
    Step,
    TokenInfo,
)
from provisioner.core.parallel import side_by_side
from provisioner.core.ports import Journal, NullProgress, Progress, TokenFinder, TokenSession
from provisioner.core.secret import Seed
from provisioner.core.store import DeskStore, EnrollmentJournal, RecordOwner
from provisioner.core.totp import code_at, codes_equal, plan_window


@dataclass(frozen=True)
class Account:
    """One account of an enrollment: its short name, the user there, and the enrollment
    (directory, settings, journal, progress) that acts in it."""

    name: str
    user: str
    enrollment: Enrollment


@dataclass(frozen=True)
class AccountsResult:
    """Every account's enrollment; ``already`` names those the user was already enrolled
    in with this token (left as they were)."""

    user: str
    token_serial: int | None
    enrolled: tuple[tuple[str, EnrollmentResult], ...]
    already: tuple[str, ...]
    seconds: float


class AccountProgress:
    """An account's progress: every line names the account."""

    def __init__(self, progress: Progress, account: str) -> None:
        self._progress = progress
        self._prefix = f"{account}: "

    def step(self, step: Step, detail: str) -> None:
        self._progress.step(step, self._prefix + detail)

    def notice(self, text: str) -> None:
        self._progress.notice(self._prefix + text)


class AccountsEnrollment:
    """Enrolls one token for one person in several accounts at once, all or nothing."""

    def __init__(
        self,
        accounts: Sequence[Account],
        clock: Clock,
        progress: Progress | None = None,
        *,
        margin: float = 5.0,
    ) -> None:
        if not accounts:
            raise InvalidInput("no account to enroll in")
        names = [a.name for a in accounts]
        if len(set(names)) != len(names):
            raise InvalidInput(f"an account is named twice: {', '.join(names)}")
        self._accounts = tuple(accounts)
        self._clock = clock
        self._progress = progress or NullProgress()
        self._margin = margin

    def run(self, token: TokenSession, person: str) -> AccountsResult:
        validation.user_name(person)
        started = self._clock.monotonic()
        serial = _OneAtATime(token)
        legs = {a.name: Leg(a.user) for a in self._accounts}
        active: list[Account] = []
        current, where = Step.CHECK, None
        try:
            oath, facts = self._look(serial)
            active, already = self._check(serial.info, oath, legs, facts)
            if not active:
                raise AlreadyEnrolled(
                    f"{person} is already enrolled with token {serial.info.label} in "
                    f"{_names(already)}"
                )
            check_slots(serial.info, oath, len(active))
            self._no_clash(active, legs, oath)
            self._progress.step(
                Step.CHECK,
                f"token {serial.info.label} (firmware {serial.info.firmware_text}, "
                f"{oath.free_slots} free OATH slots); {person} may be enrolled in "
                f"{_names([a.name for a in active])}",
            )

            current = Step.CREATE_DEVICE
            self._each(active, lambda a: a.enrollment.create(legs[a.name]))

            current = Step.PROGRAM_TOKEN
            for account in active:
                where = account.name
                account.enrollment.program(serial, legs[account.name])
            where = None

            current = Step.COMPUTE_CODES
            codes = self._codes(serial, active, legs)

            current = Step.ENABLE
            self._each(
                active,
                lambda a: a.enrollment.enable(serial, legs[a.name], codes[a.name]),
            )

            current = Step.CONFIRM
            self._each(active, lambda a: a.enrollment.confirm(legs[a.name]))
        except ProvisionerError as e:
            if isinstance(e, AlreadyEnrolled):
                raise
            leftovers = self._rollback(serial, active, legs)
            if isinstance(e, _Failed):
                where, e = e.account, e.cause
            raise EnrollmentFailed(
                step=current.value,
                user=person,
                token=serial.info.label,
                cause=e,
                leftovers=leftovers,
                account=where,
                accounts=tuple(a.name for a in active),
            ) from e
        except BaseException:
            self._rollback(serial, active, legs)
            raise
        finally:
            for leg in legs.values():
                leg.wipe()
        seconds = self._clock.monotonic() - started
        return AccountsResult(
            user=person,
            token_serial=token.info.serial,
            enrolled=tuple(
                (a.name, a.enrollment.result(token, legs[a.name], seconds)) for a in active
            ),
            already=tuple(already),
            seconds=seconds,
        )

    # --- the steps ------------------------------------------------------------------

    def _look(self, token: TokenSession) -> tuple[OathState, list[UserFacts | ProvisionerError]]:
        """The token read here while every account looks its user up: one round trip
        for all. A token that cannot be read is said first; an account's refusal is
        kept for ``_check``, which names the account."""
        calls: list[Callable[[], object]] = [partial(check_token, token)]
        calls += [partial(a.enrollment.look_up, a.user) for a in self._accounts]
        outcomes = side_by_side(calls)
        oath, facts = outcomes[0], outcomes[1:]
        if isinstance(oath, ProvisionerError):
            raise oath
        assert isinstance(oath, OathState)
        return oath, [f for f in facts if isinstance(f, (UserFacts, ProvisionerError))]

    def _check(
        self,
        info: TokenInfo,
        oath: OathState,
        legs: dict[str, Leg],
        facts: list[UserFacts | ProvisionerError],
    ) -> tuple[list[Account], list[str]]:
        """Every account's checks, from what each said of its user; the first refusal (in
        the order the accounts are configured) names its account. Accounts the user is
        already enrolled in with this token are left out."""
        outcomes = [
            _plan(a, info, oath, legs[a.name], f)
            for a, f in zip(self._accounts, facts, strict=True)
        ]
        active: list[Account] = []
        already: list[str] = []
        for account, outcome in zip(self._accounts, outcomes, strict=True):
            if isinstance(outcome, AlreadyEnrolled):
                already.append(account.name)
                account.enrollment.progress.notice(f"{outcome.message}; left as it is")
            elif isinstance(outcome, ProvisionerError):
                raise _Failed(account.name, outcome)
            else:
                active.append(account)
                leg = legs[account.name]
                account.enrollment.progress.step(
                    Step.CHECK, f"{leg.user} has {leg.devices} MFA devices"
                )
        return active, already

    @staticmethod
    def _no_clash(active: list[Account], legs: dict[str, Leg], oath: OathState) -> None:
        """Two accounts must not write the same credential id (the second would overwrite
        the first's seed)."""
        seen: dict[str, str] = {}
        for account in active:
            credential = legs[account.name].credential
            assert credential is not None
            other = seen.get(credential.credential_id)
            if other is not None:
                raise InvalidInput(
                    f"accounts {other} and {account.name} would both write credential "
                    f"{credential.credential_id}",
                    hint="give each account its own issuer (the default is 'AWS {name}')",
                )
            seen[credential.credential_id] = account.name

    def _each(self, active: list[Account], step: Callable[[Account], None]) -> None:
        """Run ``step`` in every account at once; raise the first failure (in account
        order) once all have returned, naming its account."""
        outcomes = side_by_side([partial(step, a) for a in active])
        for account, outcome in zip(active, outcomes, strict=True):
            if isinstance(outcome, ProvisionerError):
                raise _Failed(account.name, outcome)

    def _codes(
        self, token: TokenSession, active: list[Account], legs: dict[str, Leg]
    ) -> dict[str, CodePair]:
        """Two codes per credential, every credential in one pass on the token (CALCULATE
        ALL), checked against each seed."""
        margin = max([self._margin, *(a.enrollment.settings.margin for a in active)])
        plan = plan_window(self._clock.now(), margin=margin, uncertainty=self._clock.uncertainty())
        if plan.wait > 0:
            self._progress.notice(
                f"{plan.wait:.1f} s until a time step has surely begun: waiting for it"
            )
            self._clock.sleep(plan.wait)
        credentials = {a.name: _credential(legs[a.name]) for a in active}
        if any(c.touch for c in credentials.values()):
            self._progress.notice("touch the token now (twice per credential: one per code)")
        ids = [c.credential_id for c in credentials.values()]
        t1, t2 = plan.timestamps
        first = token.calculate_many(ids, t1)
        second = token.calculate_many(ids, t2)
        codes: dict[str, CodePair] = {}
        for account in active:
            cid = credentials[account.name].credential_id
            seed = legs[account.name].seed
            if seed is not None and not _matches(seed, (first[cid], second[cid]), (t1, t2)):
                raise _Failed(
                    account.name,
                    CodeMismatch(
                        f"the codes computed on token {token.info.label} do not match the seed"
                    ),
                )
            codes[account.name] = CodePair(
                first[cid], second[cid], plan.first_step, plan.seconds_left
            )
        self._progress.step(
            Step.COMPUTE_CODES,
            f"{2 * len(ids)} codes for time steps {plan.first_step} and {plan.first_step + 1} "
            f"computed on the token in one pass ({plan.seconds_left:.0f} s left to submit)",
        )
        return codes

    # --- undo -----------------------------------------------------------------------

    def _rollback(
        self, token: TokenSession, active: list[Account], legs: dict[str, Leg]
    ) -> tuple[str, ...]:
        """Every account's device at once, then every credential (one token)."""
        left: list[str] = []
        devices = side_by_side(
            [partial(a.enrollment.rollback_device, legs[a.name]) for a in active]
        )
        for account, outcome in zip(active, devices, strict=True):
            if isinstance(outcome, ProvisionerError):  # pragma: no cover - caught inside
                left.append(f"{account.name}: {outcome.message}")
            else:
                left.extend(f"{account.name}: {text}" for text in outcome)
        for account in active:
            left.extend(
                f"{account.name}: {text}"
                for text in account.enrollment.rollback_credential(token, legs[account.name])
            )
        return tuple(left)


class _Failed(ProvisionerError):
    """A step failed in one account: carried to run(), which names the account."""

    def __init__(self, account: str, cause: ProvisionerError) -> None:
        self.account = account
        self.cause = cause
        super().__init__(cause.message, hint=cause.hint)


def _plan(
    account: Account,
    info: TokenInfo,
    oath: OathState,
    leg: Leg,
    facts: UserFacts | ProvisionerError,
) -> ProvisionerError | None:
    """An account's checks, its refusal returned (None: it may be enrolled in)."""
    if isinstance(facts, ProvisionerError):
        return facts
    try:
        account.enrollment.plan(info, oath, leg, facts)
    except ProvisionerError as e:
        return e
    return None


def _credential(leg: Leg) -> CredentialSpec:
    assert leg.credential is not None
    return leg.credential


def _matches(seed: Seed, codes: tuple[str, str], timestamps: tuple[int, int]) -> bool:
    return all(codes_equal(c, code_at(seed, t)) for c, t in zip(codes, timestamps, strict=True))


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


class _OneAtATime:
    """The token, its calls made one at a time: the accounts' threads share it."""

    def __init__(self, token: TokenSession) -> None:
        self._token = token
        self._lock = threading.Lock()

    @property
    def info(self) -> TokenInfo:
        return self._token.info

    def oath_state(self) -> OathState:
        with self._lock:
            return self._token.oath_state()

    def put_credential(self, spec: CredentialSpec, seed: Seed) -> None:
        with self._lock:
            self._token.put_credential(spec, seed)

    def calculate(self, credential_id: str, timestamp: int) -> str:
        with self._lock:
            return self._token.calculate(credential_id, timestamp)

    def calculate_many(self, credential_ids: Sequence[str], timestamp: int) -> dict[str, str]:
        with self._lock:
            return self._token.calculate_many(credential_ids, timestamp)

    def delete_credential(self, credential_id: str) -> bool:
        with self._lock:
            return self._token.delete_credential(credential_id)

    def reopen(self, timeout: float) -> None:
        with self._lock:
            self._token.reopen(timeout)


# --- recorded in the store ----------------------------------------------------------------


@dataclass(frozen=True)
class AccountPlan:
    """An account an enrollment is to be recorded and run in: its name and its user."""

    name: str
    user: str


class RecordedAccounts:
    """An enrollment in several accounts with one record per account in the store, each
    the journal of its account's side effects, all of one batch (recovery settles them
    together). What both the daemon and the one-shot command run."""

    def __init__(
        self,
        store: DeskStore,
        plans: Sequence[AccountPlan],
        token: TokenInfo,
        source: str,
        *,
        owner: RecordOwner | None = None,
    ) -> None:
        self._store = store
        self._plans = tuple(plans)
        ids = store.start_enrollments(
            [(p.name, p.user) for p in plans], token.serial, token.reader, source, owner=owner
        )
        self.ids: dict[str, int] = dict(zip((p.name for p in plans), ids, strict=True))
        self._journals: dict[str, EnrollmentJournal] = {}
        self._finished: set[str] = set()

    @property
    def first(self) -> int:
        """The batch's id: the first record's."""
        return next(iter(self.ids.values()))

    def journal(self, account: str) -> Journal:
        journal = self._journals.get(account)
        if journal is None:
            # facts of what was done ride with the next write; finish() flushes them
            journal = self._journals[account] = self._store.journal(
                self.ids[account], defer_after=True
            )
        return journal

    def finish(self, outcome: AccountsResult | ProvisionerError, actor: str) -> None:
        """Every account's record closed with the outcome of the whole (after the facts
        its journal kept while the store was away). Called again after the store refused
        part of it, it closes only the records not yet closed (no second audit record)."""
        for journal in self._journals.values():
            journal.flush()
        for name, (label, device_arn, reason) in self._ends(outcome).items():
            if name in self._finished:
                continue
            self._store.finish_enrollment(
                self.ids[name], outcome=label, actor=actor, device_arn=device_arn, reason=reason
            )
            self._finished.add(name)

    def _ends(
        self, outcome: AccountsResult | ProvisionerError
    ) -> dict[str, tuple[Outcome, str | None, str | None]]:
        """Each account's record's end: (outcome, device, reason)."""
        if isinstance(outcome, AccountsResult):
            ends: dict[str, tuple[Outcome, str | None, str | None]] = {
                name: (Outcome.ENROLLED, result.device_arn, None)
                for name, result in outcome.enrolled
            }
            for name in outcome.already:
                ends[name] = (
                    Outcome.ALREADY_ENROLLED,
                    None,
                    "already enrolled with this token; left as it was",
                )
            return ends
        if isinstance(outcome, AlreadyEnrolled):
            return {name: (Outcome.ALREADY_ENROLLED, None, outcome.message) for name in self.ids}
        left = outcome.leftovers if isinstance(outcome, EnrollmentFailed) else ()
        return {
            name: (
                Outcome.FAILED_NOT_ROLLED_BACK
                if any(text.startswith(f"{name}: ") for text in left)
                else Outcome.FAILED,
                None,
                outcome.one_line(),
            )
            for name in self.ids
        }


# --- a new token for an old one, in every account -----------------------------------------


def replace_everywhere(
    enrollment: AccountsEnrollment,
    accounts: Sequence[InAccount],
    person: str,
    new_token: TokenSession,
    old_serial: int | None,
    find_token: TokenFinder,
    absent: AbsentNote | None = None,
    on_revoked: Callable[[str, Revoked], None] = lambda account, revoked: None,
) -> tuple[AccountsResult, list[tuple[str, Revoked]]]:
    """Enroll the new token in every account first (all or nothing), then revoke the old
    one wherever it is enrolled: the person is never without MFA in any account."""
    new_serial = new_token.info.serial
    old: set[int | None] = set()
    for account in accounts:
        try:
            devices = account.lifecycle.devices_of(account.user)
        except NotFound:
            continue
        old |= {
            d.token_serial
            for d in devices
            if d.token_serial != new_serial and (old_serial is None or d.token_serial == old_serial)
        }
    names = ", ".join(a.name for a in accounts)
    if not old:
        raise NotFound(
            f"{person} has no other token enrolled by provisioner to replace in any of {names}",
            hint="enroll the new token with provisioner enroll",
        )
    if len(old) > 1:
        tokens = ", ".join(str(s) for s in sorted(old, key=str))
        raise InvalidInput(
            f"{person} has several tokens ({tokens})", hint="say which with --old-serial"
        )
    (serial,) = old
    enrolled = enrollment.run(new_token, person)
    try:
        revoked = revoke_everywhere(
            accounts, serial, find_token, absent or left_on_token, on_done=on_revoked
        )
    except ProvisionerError as e:
        raise AccountsIncomplete(
            f"{person} now has the new token {new_serial} in "
            f"{', '.join(n for n, _ in enrolled.enrolled) or 'no account'} AND still the old "
            f"token {serial}: revoking it failed: {e.message}",
            account=getattr(e, "account", ""),
            done=getattr(e, "done", ()),
            hint=f"provisioner revoke --user {person} --serial {serial}",
            enrolled=enrolled,
        ) from e
    return enrolled, revoked
