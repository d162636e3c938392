"""Small values the enrollment steps pass around, in the operator's words."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, unique

from provisioner.core import validation
from provisioner.core.errors import InvalidInput

#: AWS virtual MFA devices are SHA1, 6 digits, 30 s. Nothing else is accepted by IAM.
TOTP_PERIOD = 30
TOTP_DIGITS = 6


@unique
class Step(StrEnum):
    """The steps of one enrollment, in order."""

    CHECK = "check"
    CREATE_DEVICE = "create device"
    PROGRAM_TOKEN = "program token"  # noqa: S105 - a step name
    COMPUTE_CODES = "compute codes"
    ENABLE = "enable"
    CONFIRM = "confirm"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class TokenInfo:
    """What a token tells about itself before anything is written."""

    reader: str
    serial: int | None
    firmware: tuple[int, int, int]
    form_factor: str
    has_oath: bool

    @property
    def label(self) -> str:
        """How the operator names the token: its serial, printed on the key."""
        return str(self.serial) if self.serial is not None else f"(no serial) in {self.reader}"

    @property
    def oath_capacity(self) -> int:
        """OATH slots: 32 below firmware 5.7, 64 from 5.7."""
        return 64 if self.firmware >= (5, 7, 0) else 32

    @property
    def firmware_text(self) -> str:
        return ".".join(str(p) for p in self.firmware)


@dataclass(frozen=True)
class OathState:
    """The OATH applet as the enrollment sees it (after unlocking)."""

    credential_ids: tuple[str, ...]
    capacity: int
    password_protected: bool

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - len(self.credential_ids))


@dataclass(frozen=True)
class CredentialSpec:
    """The TOTP credential written into the token: SHA1, 6 digits, 30 s, as AWS needs."""

    issuer: str
    account: str
    touch: bool = False

    @property
    def credential_id(self) -> str:
        """The id on the card: ``issuer:account`` (no period prefix at 30 s)."""
        return f"{self.issuer}:{self.account}" if self.issuer else self.account


@dataclass(frozen=True)
class DeviceSpec:
    """The virtual MFA device to create in IAM."""

    name: str
    path: str
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CodePair:
    """Two consecutive codes computed on the token, and the time steps they belong to."""

    first: str = field(repr=False)
    second: str = field(repr=False)
    first_step: int
    # How long the pair stays valid for submission, seen from the moment it was planned.
    seconds_left: float


@dataclass(frozen=True)
class StepTiming:
    step: Step
    seconds: float


@dataclass(frozen=True)
class EnrollmentResult:
    """A finished enrollment: what the operator sees and the audit trail records."""

    user: str
    token_serial: int | None
    device_arn: str
    credential_id: str
    first_step: int
    seconds: float
    timings: tuple[StepTiming, ...]


class TagKey(StrEnum):
    """The tags the desk puts on every virtual MFA device it creates."""

    TOOL = "provisioner:tool"
    USER = "provisioner:user"
    TOKEN_SERIAL = "provisioner:token-serial"  # noqa: S105 - a tag key
    DESK = "provisioner:desk"
    #: When the desk created it (IAM reports no creation time for a virtual device).
    CREATED = "provisioner:created"


@dataclass(frozen=True)
class VirtualDevice:
    """A virtual MFA device as IAM lists it."""

    serial_number: str
    user: str | None
    tags: tuple[tuple[str, str], ...] = ()

    def tag(self, key: str) -> str | None:
        return dict(self.tags).get(key)

    @property
    def token_serial(self) -> int | None:
        """The serial of the token it was enrolled on, from the tool's tag; None when the
        tag is missing or not a serial (tags are anyone's to edit in IAM)."""
        text = self.tag(TagKey.TOKEN_SERIAL)
        try:
            return validation.token_serial(text) if text is not None else None
        except InvalidInput:
            return None
