"""One exception tree for the whole tool.

Every error says what the operator needs: which step, which token, which user, what to do.
Adapters translate vendor exceptions (pyscard, yubikit, botocore) into these, keeping the
cause (``raise ... from e``); no vendor exception leaves an adapter. The CLI maps the
classes to exit statuses in one place (``exit_status``); ``ExitStatus`` is every status
the CLI returns and writes its own ``--help`` text.

No message may contain a seed: errors are built from names, serials and AWS error codes.

One module though past 400 lines: the tree, the exit statuses and the mapping between
them are read and changed together.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provisioner.core.accounts import AccountsResult
    from provisioner.core.model import EnrollmentResult


class ProvisionerError(Exception):
    """Root of everything this tool raises on purpose."""

    #: What the operator can do about it, one sentence, or None.
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def one_line(self) -> str:
        """The message and the hint on one line, for a terminal or a log."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(ProvisionerError):
    """The configuration file or the command line is wrong."""


class InvalidInput(ProvisionerError):
    """A value was refused before anything was sent (botocore checks no patterns)."""


class NotPermitted(ProvisionerError):
    """This user may not read or write the desk's state (its audit trail) from here."""


# --- the token -------------------------------------------------------------------------


class TokenError(ProvisionerError):
    """Something about the hardware token or the PC/SC stack."""


class PcscUnavailable(TokenError):
    hint = "start pcscd (systemctl start pcscd.socket) and check you may use it"


class TokenNotFound(TokenError):
    hint = "insert the YubiKey, or check the --reader/--serial you gave (provisioner tokens)"


class TokenBusy(TokenError):
    hint = "another program holds the card (gpg's scdaemon, OpenSC, another ykman): stop it"


class TokenRemoved(TokenError):
    hint = "keep the token plugged in until the enrollment ends"


class TokenNoOath(TokenError):
    hint = "this key cannot hold a TOTP credential (no OATH applet, or OATH disabled over USB)"


class TokenLocked(TokenError):
    hint = "give the OATH password in the file named by token.oath_password_file"


class TokenFull(TokenError):
    hint = "delete an unused OATH credential (ykman oath accounts delete) or use another key"


class TokenCredentialExists(TokenError):
    hint = (
        "the credential may be the only copy of another device's seed: "
        "revoke that device first, or change token.account_name"
    )


class TokenTouchTimeout(TokenError):
    hint = "touch the token's contact when it blinks (once for each code)"


class TokenCommandFailed(TokenError):
    """The token answered a status word we did not expect."""


class CodeMismatch(TokenError):
    """The codes computed on the token disagree with the seed: the credential is wrong."""

    hint = "the token did not store the seed faithfully; try again or replace the key"


# --- the directory (AWS IAM today) ------------------------------------------------------


class DirectoryError(ProvisionerError):
    """The directory refused or failed a call. The subclasses are neutral kinds, what the
    core branches on; the adapter picks the kind and keeps the directory's own error
    code for the operator's message and the metrics."""

    #: The directory's error code (AWS: "NoSuchEntity", ...) or a local name for
    #: transport failures.
    code: str = "IamError"
    #: True when the call may or may not have taken effect (timeout, dropped connection,
    #: garbage answer): the caller must look before it assumes either.
    ambiguous: bool = False

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        if code is not None:
            self.code = code


class NotFound(DirectoryError):
    code = "NoSuchEntity"


class UserNotFound(NotFound):
    hint = "check the user name; IAM user names are case-sensitive"


class DeviceLimitReached(DirectoryError):
    code = "LimitExceeded"
    hint = "the user already has 8 MFA devices: revoke one first"


class AlreadyExists(DirectoryError):
    code = "EntityAlreadyExists"


class CodesRejected(DirectoryError):
    code = "InvalidAuthenticationCode"
    hint = "check the desk's clock and the token; the codes were refused by AWS"


class ChangeInProgress(DirectoryError):
    code = "EntityTemporarilyUnmodifiable"


class Throttled(DirectoryError):
    code = "Throttling"
    hint = "AWS is throttling this account; retry in a minute"


class ServiceFailure(DirectoryError):
    code = "ServiceFailure"
    hint = "AWS IAM failed; retry shortly"


class AccessDenied(DirectoryError):
    """The desk's AWS principal may not do this; ``permission`` names what it lacks."""

    code = "AccessDenied"
    hint = "the desk's AWS principal lacks a permission: see docs/iam-policy.json"
    #: The missing permission ("iam:EnableMFADevice"), when known.
    permission: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        hint: str | None = None,
        permission: str | None = None,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        if permission is not None:
            self.permission = permission


class RoleNotAssumable(AccessDenied):
    """The role of an account the desk serves cannot be assumed (trust policy, external
    id, the desk's own sts:AssumeRole permission, a role that does not exist)."""

    hint = (
        "the role's trust policy must name the desk's AWS principal (and the external id "
        "the desk sends), and the desk's own policy must allow sts:AssumeRole on it: "
        "see docs/accounts.md"
    )
    permission = "sts:AssumeRole"


class InUse(DirectoryError):
    code = "DeleteConflict"


class DirectoryUnavailable(DirectoryError):
    """No usable answer: timeout, dropped connection, garbage. May have taken effect."""

    code = "Unavailable"
    ambiguous = True
    hint = "check the network path to IAM (AWS_ENDPOINT_URL_IAM, proxy) and retry"


class AwsCredentialsMissing(DirectoryError):
    code = "NoCredentials"
    hint = "configure AWS credentials (profile, environment or instance role)"


# --- the enrollment as a whole -----------------------------------------------------------


class EnrollmentFailed(ProvisionerError):
    """An enrollment stopped at ``step``; what it had done was undone, or is listed."""

    def __init__(
        self,
        *,
        step: str,
        user: str,
        token: str,
        cause: ProvisionerError,
        leftovers: tuple[str, ...] = (),
        account: str | None = None,
        accounts: tuple[str, ...] = (),
    ) -> None:
        self.step = step
        self.user = user
        self.token = token
        self.cause = cause
        self.leftovers = leftovers
        #: The account the step failed in, and every account the enrollment was in (an
        #: enrollment in several accounts is undone in all of them).
        self.account = account
        self.accounts = accounts
        everywhere = f" in every account ({', '.join(accounts)})" if len(accounts) > 1 else ""
        outcome = (
            "NOT fully rolled back, left behind: " + "; ".join(leftovers)
            if leftovers
            else f"rolled back{everywhere}, nothing left behind"
        )
        where = f" in account {account}" if account else ""
        super().__init__(
            f"enrollment of {user} on token {token} failed at step '{step}'{where}: "
            f"{cause.message}; {outcome}",
            hint=cause.hint,
        )


class ReconcileFailed(ProvisionerError):
    """Recovery (``provisioner reconcile``, a daemon's start) stopped at ``step``; ``done``
    is what it had done before (each also in the audit trail)."""

    def __init__(self, *, step: str, cause: ProvisionerError, done: tuple[str, ...] = ()) -> None:
        self.step = step
        self.cause = cause
        self.done = done
        before = "done before it: " + "; ".join(done) if done else "nothing done before it"
        super().__init__(
            f"reconcile failed at step '{step}': {cause.message}; {before}", hint=cause.hint
        )


class ConcurrentChange(DirectoryError):
    code = "ConcurrentModification"


class AlreadyEnrolled(ProvisionerError):
    """Nothing to do: the user already has this token as a working MFA device."""


class DaemonUnresponsive(ProvisionerError):
    """The desk daemon's socket is there but nothing answered in time (exit status 1, as
    for a daemon that is not running: the request may or may not have been taken)."""

    hint = "the daemon is overloaded or stuck: systemctl status provisioner; its journal says why"


class QueueFull(ProvisionerError):
    """The desk refuses a request: as many are waiting as daemon.max_queue allows."""

    hint = (
        "cancel requests nobody needs (provisioner queue, provisioner cancel N), "
        "or raise daemon.max_queue"
    )


# --- the errors of the desk's parts (the CLI, install, the state directory, USB) -------------


class ReplaceIncomplete(ProvisionerError):
    """The new token works; the old device could not be revoked."""

    def __init__(self, message: str, *, enrolled: EnrollmentResult, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.enrolled = enrolled


class AccountsIncomplete(ProvisionerError):
    """A revoke or resync done in some of the accounts and failed in one: ``done`` names
    the accounts it was done in (they are recorded as such), ``account`` where it failed."""

    def __init__(
        self,
        message: str,
        *,
        account: str,
        done: tuple[str, ...],
        hint: str | None = None,
        enrolled: AccountsResult | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.account = account
        self.done = done
        #: A replacement's new token, enrolled in every account before the old one's
        #: revocation failed.
        self.enrolled = enrolled


class InstallError(ProvisionerError):
    """A step of the installation failed."""


class StateInUse(ConfigError):
    """Another daemon holds the desk's state."""


class UsbUnavailable(TokenError):
    """pyusb has no backend: libusb is missing."""

    hint = "install libusb-1.0-0 (apt-get install libusb-1.0-0)"


class DaemonNotRunning(ProvisionerError):
    pass


class DaemonRefused(ProvisionerError):
    """The daemon said no: to this user (``refused``), or to this request."""

    def __init__(self, message: str, *, refused: bool, status: object = None) -> None:
        super().__init__(message)
        self.refused = refused
        #: The status the daemon answered with (refused: always EXIT_REFUSED).
        self.status = EXIT_REFUSED if refused else ExitStatus.of(status)

    @classmethod
    def answered(cls, answer: dict[str, Any]) -> DaemonRefused:
        """From the daemon's final answer saying no."""
        return cls(
            str(answer.get("error")), refused=bool(answer.get("refused")), status=answer.get("exit")
        )


class StoreError(ProvisionerError):
    """The desk's store cannot be read or written."""


class DemoUnavailable(ConfigError):
    """The demo's simulators are not installed (a plain install leaves them out)."""

    hint = "install them with: pip install 'provisioner[demo]'"


class PcscCallFailed(TokenError):
    """A PC/SC call failed with SCARD return code ``code``. The token adapter's own: it
    turns this into TokenBusy, TokenRemoved or PcscUnavailable by the code before the
    error leaves it."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- exit status ---------------------------------------------------------------------------


class ExitStatus(IntEnum):
    """What a command's exit status means; ``help_text()`` is the --help epilogue."""

    OK = 0, "enrolled (or already enrolled: nothing to do)"
    FAILED = 1, "failed, and everything it had done was undone"
    USAGE = 2, "bad command line, configuration or input"
    TOKEN = 3, "a token or PC/SC problem (nothing was changed in IAM)"
    IAM = 4, "an IAM problem (refused, unreachable, no credentials)"
    LEFTOVERS = 5, "failed AND something could not be undone: the message lists it"
    REFUSED = (
        6,
        (
            "refused: you are not root or in the desk daemon's operators' group, its queue is\n"
            "     full, or (with no daemon) you may not read or write the desk's audit trail"
        ),
    )
    INTERRUPTED = 130, "interrupted (Ctrl-C)"

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitStatus:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    @classmethod
    def of(cls, value: object) -> ExitStatus:
        """The status a number read back (from the daemon's answer) stands for; FAILED for
        anything that is not one."""
        return next((status for status in cls if status == value), cls.FAILED)

    @classmethod
    def help_text(cls) -> str:
        return "exit status:\n" + "".join(f"  {s.value}  {s.meaning}\n" for s in cls)


# The names the code uses; the values are ExitStatus's.
EXIT_OK = ExitStatus.OK
EXIT_FAILED = ExitStatus.FAILED
EXIT_USAGE = ExitStatus.USAGE
EXIT_TOKEN = ExitStatus.TOKEN
EXIT_IAM = ExitStatus.IAM
EXIT_LEFTOVERS = ExitStatus.LEFTOVERS
EXIT_REFUSED = ExitStatus.REFUSED
EXIT_INTERRUPTED = ExitStatus.INTERRUPTED


def failure_reason(error: ProvisionerError) -> str:
    """A short stable name for what stopped an enrollment (a metrics label): the AWS
    error code for IAM errors, the error's class name otherwise."""
    if isinstance(error, (EnrollmentFailed, ReconcileFailed)):
        return failure_reason(error.cause)
    if isinstance(error, DirectoryError):
        return error.code
    return type(error).__name__


def exit_status(error: ProvisionerError) -> ExitStatus:
    """The one mapping from errors to exit statuses (the CLI's, and the daemon's answers)."""
    if isinstance(error, DaemonRefused):
        return error.status
    if isinstance(error, EnrollmentFailed):
        if error.leftovers:
            return EXIT_LEFTOVERS
        return exit_status(error.cause) if error.step == "check" else EXIT_FAILED
    if isinstance(error, ReconcileFailed):
        return exit_status(error.cause)
    if isinstance(error, (ConfigError, InvalidInput)):
        return EXIT_USAGE
    if isinstance(error, (NotPermitted, QueueFull)):
        return EXIT_REFUSED
    if isinstance(error, TokenError):
        return EXIT_TOKEN
    if isinstance(error, DirectoryError):
        return EXIT_IAM
    return EXIT_FAILED
