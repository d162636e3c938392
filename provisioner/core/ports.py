"""The small interfaces the enrollment talks to.

The enrollment imports none of boto3, yubikit or pyusb: it sees a token session, an IAM
directory and a clock through these protocols, so it reads as the steps of an enrollment
and is tested without I/O. ``adapters/yubikey.py`` and ``adapters/aws/iam.py`` are the
real adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from enum import StrEnum, unique
from typing import Protocol

from provisioner.core.model import (
    CredentialSpec,
    DeviceSpec,
    OathState,
    Step,
    TokenInfo,
    VirtualDevice,
)
from provisioner.core.secret import Seed


class TokenSession(Protocol):
    """An open, exclusive session with one token's OATH applet."""

    @property
    def info(self) -> TokenInfo: ...

    def oath_state(self) -> OathState:
        """Select (and unlock) the OATH applet; raises TokenNoOath / TokenLocked."""
        ...

    def put_credential(self, spec: CredentialSpec, seed: Seed) -> None: ...

    def calculate(self, credential_id: str, timestamp: int) -> str:
        """The code of a TOTP credential for ``timestamp``, computed on the token."""
        ...

    def calculate_many(self, credential_ids: Sequence[str], timestamp: int) -> dict[str, str]:
        """The codes of several TOTP credentials for ``timestamp``, in one pass on the
        token (CALCULATE ALL; one more per credential that needs a touch): id -> code.
        The same errors as ``calculate``, a missing credential among them."""
        ...

    def delete_credential(self, credential_id: str) -> bool:
        """Delete if present; True when something was deleted."""
        ...

    def reopen(self, timeout: float) -> None:
        """After TokenRemoved: wait up to ``timeout`` s for the same token to come back."""
        ...


#: Opens the token with this serial if it is plugged in (None if not), for as long as the
#: context lasts: how recovery and revoke reach a token they did not start with.
TokenFinder = Callable[[int], AbstractContextManager["TokenSession | None"]]


class IamDirectory(Protocol):
    """What the enrollment needs of AWS IAM."""

    #: The most MFA devices the directory allows one user (IAM: 8).
    device_limit: int

    def user_account(self, user: str) -> str:
        """The account the user lives in; UserNotFound if there is no such user."""
        ...

    def device_id(self, account: str, path: str, name: str) -> str:
        """The id (IAM: the ARN) a device created as ``path`` + ``name`` gets: the journal
        records it before the create, in case the answer is lost."""
        ...

    def device_account(self, device_id: str) -> str:
        """The account a device belongs to."""
        ...

    def under_path(self, device_id: str, path: str) -> bool:
        """Whether the device was created under ``path`` (the desk's device path)."""
        ...

    def list_mfa_devices(self, user: str) -> list[str]:
        """Serial numbers (ARNs) of the user's MFA devices; UserNotFound if no such user."""
        ...

    def create_virtual_mfa_device(self, spec: DeviceSpec) -> tuple[str, Seed]: ...

    def enable_mfa_device(self, user: str, serial: str, code1: str, code2: str) -> None: ...

    def deactivate_mfa_device(self, user: str, serial: str) -> None: ...

    def resync_mfa_device(self, user: str, serial: str, code1: str, code2: str) -> None: ...

    def delete_virtual_mfa_device(self, serial: str) -> None: ...

    def tag_device(self, device_id: str, tags: Sequence[tuple[str, str]]) -> None:
        """Add or change tags of a virtual MFA device (TagMFADevice)."""
        ...

    def list_virtual_mfa_devices(self, *, assigned: bool | None = None) -> list[VirtualDevice]:
        """All virtual devices, or only the (un)assigned ones, with their tags."""
        ...


@unique
class Fact(StrEnum):
    """What the write-ahead journal records, before and after each side effect.

    "...requested" is written (and flushed) before the call: from then on the thing may
    exist even if the answer is lost or the process dies. The other facts are written
    after the call succeeded.
    """

    DEVICE_REQUESTED = "device requested"
    DEVICE_CREATED = "device created"
    CREDENTIAL_REQUESTED = "credential requested"
    CREDENTIAL_WRITTEN = "credential written"
    ENABLE_REQUESTED = "enable requested"
    ENABLED = "enabled"
    CONFIRMED = "confirmed"
    DEVICE_DEACTIVATED = "device deactivated"
    DEVICE_DELETED = "device deleted"
    CREDENTIAL_DELETED = "credential deleted"


class Journal(Protocol):
    """Where an enrollment writes what may exist, so that a crash loses nothing."""

    def record(
        self, fact: Fact, *, device_arn: str | None = None, credential_id: str | None = None
    ) -> None: ...


class NullJournal:
    def record(
        self, fact: Fact, *, device_arn: str | None = None, credential_id: str | None = None
    ) -> None:
        pass


class Progress(Protocol):
    """Where the enrollment reports as it goes (a terminal, the daemon's event stream)."""

    def step(self, step: Step, detail: str) -> None: ...

    def notice(self, text: str) -> None: ...


class NullProgress:
    def step(self, step: Step, detail: str) -> None:
        pass

    def notice(self, text: str) -> None:
        pass


def render_template(template: str, values: Mapping[str, str]) -> str:
    """``{user}``-style templates from the configuration, with a clear error on typos."""
    from provisioner.core.errors import ConfigError

    try:
        return template.format_map(dict(values))
    except (KeyError, ValueError, IndexError) as e:
        known = ", ".join("{" + k + "}" for k in sorted(values))
        raise ConfigError(f"bad template {template!r}: {e}; known fields: {known}") from None
