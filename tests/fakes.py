"""In-memory stand-ins for the enrollment's ports, for tests of the pure core.

The token has no fake of its own: tests drive the real adapter over the emulated YubiKey
(``emulated_yubikey.EmulatedConnection``), and ``code_exchanges`` reads its APDU history
to count how the codes were computed.

The IAM fake enforces the rules the engine relies on (TOTP check at its own clock,
consecutive steps, 8 devices, device in use); the end-to-end tests run the real boto3
against the strict local IAM server instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from emulated_yubikey import ApduRecord
from provisioner.core.errors import (
    AlreadyExists,
    CodesRejected,
    DeviceLimitReached,
    DirectoryError,
    InUse,
    NotFound,
    UserNotFound,
)
from provisioner.core.model import DeviceSpec, VirtualDevice
from provisioner.core.secret import Seed
from provisioner.core.totp import code_at, time_step

ACCOUNT = "123456789012"

_INS_CALCULATE = 0xA2
_INS_CALCULATE_ALL = 0xA4  # with P1=00; P1=04 is SELECT


def code_exchanges(records: Iterable[ApduRecord]) -> list[str]:
    """How codes were computed in these APDUs (slice ``key.history``), in order: "all"
    for a CALCULATE ALL, "one" for a CALCULATE of one credential."""
    out = []
    for record in records:
        if record.ins == _INS_CALCULATE_ALL and record.p1 == 0:
            out.append("all")
        elif record.ins == _INS_CALCULATE:
            out.append("one")
    return out


class FakeClock:
    """AWS time that moves only when told to (or when someone sleeps)."""

    def __init__(self, now: float = 1_800_000_010.0, uncertainty: float = 0.5) -> None:
        self.time = now
        self._uncertainty = uncertainty
        self.slept: list[float] = []

    def now(self) -> float:
        return self.time

    def uncertainty(self) -> float:
        return self._uncertainty

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.time += seconds

    def monotonic(self) -> float:
        return self.time


@dataclass
class Device:
    arn: str
    seed: bytes = field(repr=False)
    tags: tuple[tuple[str, str], ...]
    user: str | None = None


class FakeIam:
    device_limit = 8

    def __init__(
        self, clock: FakeClock, users: tuple[str, ...] = ("alice",), account: str = ACCOUNT
    ) -> None:
        self.clock = clock
        #: Each account's devices get seeds of their own.
        self.account = account
        self.users: dict[str, list[str]] = {u: [] for u in users}
        self.devices: dict[str, Device] = {}
        self.calls: list[str] = []
        #: action -> a function called before the action; raise from it to inject a fault
        self.faults: dict[str, Callable[[], None]] = {}
        self.enabled_steps: list[int] = []
        self.resynced: list[str] = []

    def _enter(self, action: str) -> None:
        self.calls.append(action)
        fault = self.faults.get(action)
        if fault is not None:
            fault()

    def fail(self, action: str, error: DirectoryError, times: int = 1) -> None:
        left = [times]

        def fault() -> None:
            if left[0] > 0:
                left[0] -= 1
                raise error

        self.faults[action] = fault

    def user_account(self, user: str) -> str:
        self._enter("user_account")
        if user not in self.users:
            raise UserNotFound(f"IAM user {user} does not exist")
        return self.account

    def device_id(self, account: str, path: str, name: str) -> str:
        return f"arn:aws:iam::{account}:mfa{path}{name}"

    def device_account(self, device_id: str) -> str:
        return device_id.split(":")[4]

    def under_path(self, device_id: str, path: str) -> bool:
        return f":mfa{path}" in device_id

    def list_mfa_devices(self, user: str) -> list[str]:
        self._enter("list_mfa_devices")
        if user not in self.users:
            raise UserNotFound(f"IAM user {user} does not exist")
        return list(self.users[user])

    def create_virtual_mfa_device(self, spec: DeviceSpec) -> tuple[str, Seed]:
        self._enter("create_virtual_mfa_device")
        arn = f"arn:aws:iam::{self.account}:mfa{spec.path}{spec.name}"
        if arn in self.devices:
            raise AlreadyExists(f"{arn} exists")
        shift = int(self.account) - int(ACCOUNT)
        seed = bytes((b + shift) % 256 for b in range(1, 41))
        self.devices[arn] = Device(arn, seed, spec.tags)
        return arn, Seed(seed)

    def enable_mfa_device(self, user: str, serial: str, code1: str, code2: str) -> None:
        self._enter("enable_mfa_device")
        if user not in self.users:
            raise NotFound("no user")
        device = self.devices.get(serial)
        if device is None:
            raise NotFound("no device")
        if device.user is not None:
            raise AlreadyExists("device in use")
        if len(self.users[user]) >= 8:
            raise DeviceLimitReached("8 devices")
        now = time_step(self.clock.now())
        seed = Seed(device.seed)
        # The strict local IAM server's window: pairs ending at N or N-1, never N+1.
        for second in (now - 1, now):
            if code_at(seed, (second - 1) * 30) == code1 and code_at(seed, second * 30) == code2:
                device.user = user
                self.users[user].append(serial)
                self.enabled_steps.append(second - 1 - now)
                return
        raise CodesRejected("codes refused")

    def resync_mfa_device(self, user: str, serial: str, code1: str, code2: str) -> None:
        self._enter("resync_mfa_device")
        device = self.devices.get(serial)
        if device is None or device.user != user:
            raise NotFound("not assigned to that user")
        now = time_step(self.clock.now())
        seed = Seed(device.seed)
        for second in (now - 1, now):
            if code_at(seed, (second - 1) * 30) == code1 and code_at(seed, second * 30) == code2:
                self.resynced.append(serial)
                return
        raise CodesRejected("codes refused")

    def deactivate_mfa_device(self, user: str, serial: str) -> None:
        self._enter("deactivate_mfa_device")
        device = self.devices.get(serial)
        if device is None or device.user != user:
            raise NotFound("not assigned")
        device.user = None
        self.users[user].remove(serial)

    def delete_virtual_mfa_device(self, serial: str) -> None:
        self._enter("delete_virtual_mfa_device")
        device = self.devices.get(serial)
        if device is None:
            raise NotFound("no device")
        if device.user is not None:
            raise InUse("assigned")
        del self.devices[serial]

    def tag_device(self, device_id: str, tags: Sequence[tuple[str, str]]) -> None:
        self._enter("tag_device")
        device = self.devices.get(device_id)
        if device is None:
            raise NotFound("no device")
        device.tags = tuple({**dict(device.tags), **dict(tags)}.items())

    def list_virtual_mfa_devices(self, *, assigned: bool | None = None) -> list[VirtualDevice]:
        self._enter("list_virtual_mfa_devices")
        return [
            VirtualDevice(d.arn, d.user, d.tags)
            for d in self.devices.values()
            if assigned is None or (d.user is not None) == assigned
        ]

    def unassigned(self) -> list[str]:
        return [d.arn for d in self.devices.values() if d.user is None]
