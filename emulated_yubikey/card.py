"""`EmulatedYubiKey`: the whole emulated card, the "physical key" of the tests and demo.

It parses APDUs (short, extended, command chaining), routes SELECT to its applets
(OATH, Management) and injects faults (a pull at the k-th command, a forced status
word). Its state persists across insertions, as a real key's flash does; what a real
key forgets on power loss (selected applet, unlocked OATH session, pending chained
responses) is forgotten on `insert()`, `power_on()` and `reset()`.

Transports (connection.py in-process, vpcd.py through the real pcscd) only call
`insert()`, `remove()`, `power_*()` and `transmit()`. All public methods are
thread-safe: the vpcd thread and a test may use the key at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

from . import management, oath
from .apdu import SW, ApduFormatError, Command, Response, parse_command, status
from .errors import CardRemovedError
from .management import Capability, DeviceIdentity, FormFactor, ManagementApplet
from .oath import CredentialInfo, OathApplet

logger = logging.getLogger(__name__)

#: ATR of a real YubiKey 5 over USB (CCID). ykman derives USB transport from byte 1.
DEFAULT_ATR = bytes.fromhex("3bfd1300008131fe158073c021c057597562694b657940")
DEFAULT_SERIAL = 12345678
DEFAULT_FIRMWARE = (5, 4, 3)

INS_SELECT = 0xA4
P1_SELECT_BY_AID = 0x04
CLA_CHAINING = 0x10
HISTORY_LENGTH = 1000
# Only keychain keys have NFC ("YubiKey 5 NFC", "YubiKey 5C NFC"). Tell the key itself:
# yubikit's read_info() means to drop NFC for Nanos but discards the result.
NFC_FORM_FACTORS = frozenset({FormFactor.USB_A_KEYCHAIN, FormFactor.USB_C_KEYCHAIN})


class _Applet(Protocol):
    def select(self) -> Response: ...

    def deselect(self) -> None: ...

    def process(self, cmd: Command) -> Response: ...


@dataclass(frozen=True)
class KeySettings:
    """How the emulated key is built. Frozen: the key's identity does not change."""

    serial: int | None = DEFAULT_SERIAL  # None: serial hidden by configuration
    firmware: tuple[int, int, int] = DEFAULT_FIRMWARE
    form_factor: FormFactor = FormFactor.USB_A_KEYCHAIN
    capabilities: Capability | None = None  # USB-supported; None: a YubiKey 5's
    enabled_capabilities: Capability | None = None  # None: all supported ones
    nfc: bool | None = None  # NFC capabilities; None: keychains have NFC, Nanos do not
    oath_password: str | None = field(default=None, repr=False)
    used_slots: int = 0  # dummy OATH credentials stored at manufacture
    touch: bool = True  # does the simulated user touch when a credential asks
    atr: bytes = DEFAULT_ATR
    pull_at_command: int | None = None  # vanish instead of answering the k-th APDU

    def __post_init__(self) -> None:
        if self.serial is not None and not 0 < self.serial < 2**32:
            raise ValueError("serial must fit in 4 bytes and not be 0")
        if len(self.firmware) != 3 or not all(0 <= n < 256 for n in self.firmware):
            raise ValueError("firmware must be three numbers 0-255")
        if self.used_slots < 0:
            raise ValueError("used_slots must not be negative")
        if self.pull_at_command is not None and self.pull_at_command < 1:
            raise ValueError("pull_at_command counts from 1")

    @property
    def has_nfc(self) -> bool:
        if self.nfc is None:
            return self.form_factor in NFC_FORM_FACTORS
        return self.nfc

    @property
    def supported(self) -> Capability:
        if self.capabilities is None:
            return management.default_capabilities(self.firmware)
        return self.capabilities

    @property
    def enabled(self) -> Capability:
        if self.enabled_capabilities is None:
            return self.supported
        return self.enabled_capabilities & self.supported


@dataclass
class _FailRule:
    ins: int
    sw: int
    p1: int | None
    remaining: int
    data: bytes = b""

    def matches(self, ins: int, p1: int) -> bool:
        return self.ins == ins and (self.p1 is None or self.p1 == p1)


@dataclass(frozen=True)
class ApduRecord:
    """Header of one APDU the key received, for tests (no data: it may be secret)."""

    cla: int
    ins: int
    p1: int
    p2: int
    length: int
    sw: int | None  # None: the key vanished instead of answering


class EmulatedYubiKey:
    """A YubiKey 5 with the OATH and Management applets, faithful enough for yubikit.

    Keyword arguments are the fields of `KeySettings`. The key starts inserted and
    powered; `transmit()` takes a command APDU and returns data + SW.
    """

    def __init__(
        self,
        *,
        serial: int | None = DEFAULT_SERIAL,
        firmware: tuple[int, int, int] = DEFAULT_FIRMWARE,
        form_factor: FormFactor = FormFactor.USB_A_KEYCHAIN,
        capabilities: Capability | None = None,
        enabled_capabilities: Capability | None = None,
        nfc: bool | None = None,
        oath_password: str | None = None,
        used_slots: int = 0,
        touch: bool = True,
        atr: bytes = DEFAULT_ATR,
        pull_at_command: int | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.settings = KeySettings(
            serial=serial,
            firmware=firmware,
            form_factor=form_factor,
            capabilities=capabilities,
            enabled_capabilities=enabled_capabilities,
            nfc=nfc,
            oath_password=oath_password,
            used_slots=used_slots,
            touch=touch,
            atr=atr,
            pull_at_command=pull_at_command,
        )
        s = self.settings
        self._lock = threading.RLock()
        self._touch = s.touch
        self._oath = OathApplet(s.firmware, user_touches=lambda: self._touch, random=random)
        if s.used_slots > self._oath.capacity:
            raise ValueError(f"used_slots exceeds the OATH capacity ({self._oath.capacity})")
        for i in range(s.used_slots):
            self._oath.install_credential(f"Emulator:slot-{i + 1:02d}", random(20))
        self._oath.set_password(s.oath_password)
        self._management = ManagementApplet(
            DeviceIdentity(s.serial, s.firmware, s.form_factor, s.supported, s.enabled, s.has_nfc)
        )
        self._applets: dict[bytes, _Applet] = {management.AID: self._management}
        if Capability.OATH in s.enabled:
            self._applets[oath.AID] = self._oath
        self._fail_rules: list[_FailRule] = []
        self._pull_at = s.pull_at_command
        self._stall: tuple[int, float] | None = None
        self._history: deque[ApduRecord] = deque(maxlen=HISTORY_LENGTH)
        # Physical and volatile state
        self._present = False
        self._powered = False
        self._insertions = 0
        self._commands = 0
        self._selected: _Applet | None = None
        self._chain: tuple[int, int, int, bytes] | None = None  # ins, p1, p2, data so far
        self.insert()

    @classmethod
    def from_settings(
        cls, settings: KeySettings, *, random: Callable[[int], bytes] = os.urandom
    ) -> EmulatedYubiKey:
        kwargs = {f.name: getattr(settings, f.name) for f in fields(settings)}
        return cls(**kwargs, random=random)

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"EmulatedYubiKey(serial={s.serial}, firmware={'.'.join(map(str, s.firmware))}, "
            f"present={self._present}, oath={self._oath!r})"
        )

    # --- physical life ----------------------------------------------------------------

    @property
    def atr(self) -> bytes:
        return self.settings.atr

    @property
    def present(self) -> bool:
        """True while the key is in a reader (not pulled)."""
        return self._present

    @property
    def insertions(self) -> int:
        """How many times the key was inserted; connections use it to notice a pull."""
        return self._insertions

    def insert(self) -> bytes:
        """Plug the key in: it powers up with fresh volatile state. Returns the ATR."""
        with self._lock:
            self._present = True
            self._insertions += 1
            return self._power_up()

    def remove(self) -> None:
        """Pull the key out. Its stored credentials and password stay."""
        with self._lock:
            self._present = False
            self._power_down()

    def power_on(self) -> bytes:
        with self._lock:
            self._require_present()
            return self._power_up()

    def power_off(self) -> None:
        with self._lock:
            self._power_down()

    def reset(self) -> bytes:
        """Warm reset: volatile state lost, as after a power cycle."""
        return self.power_on()

    def _power_up(self) -> bytes:
        self._power_down()
        self._powered = True
        return self.atr

    def _power_down(self) -> None:
        self._powered = False
        self._commands = 0
        self._chain = None
        for applet in self._applets.values():
            applet.deselect()
        self._selected = None

    def _require_present(self) -> None:
        if not self._present:
            raise CardRemovedError("the emulated YubiKey is not in the reader")

    # --- knobs and introspection ------------------------------------------------------

    @property
    def user_touches(self) -> bool:
        """Whether the simulated user touches the key when a credential asks for it."""
        return self._touch

    @user_touches.setter
    def user_touches(self, value: bool) -> None:
        self._touch = value

    @property
    def touch_requests(self) -> int:
        """How many CALCULATEs waited for a touch (touched or not)."""
        return self._oath.touch_requests

    @property
    def serial(self) -> int | None:
        return self.settings.serial

    @property
    def firmware(self) -> tuple[int, int, int]:
        return self.settings.firmware

    @property
    def oath_capacity(self) -> int:
        return self._oath.capacity

    @property
    def oath_device_id(self) -> str:
        """The device id yubikit reports for the OATH applet (changes on reset)."""
        return self._oath.device_id

    @property
    def oath_has_password(self) -> bool:
        return self._oath.has_password

    def credentials(self) -> list[CredentialInfo]:
        """Stored OATH credentials in LIST order, without their secrets."""
        with self._lock:
            return self._oath.credentials()

    def secrets_for_leak_checks(self) -> list[bytes]:
        """Every OATH secret this key ever stored, deleted ones included.

        For tests that prove no seed leaked into logs, files or output: they search for
        these bytes in every form. Never shown in a repr or a log.
        """
        with self._lock:
            return list(self._oath.secrets_seen)

    @property
    def commands_since_power_on(self) -> int:
        return self._commands

    @property
    def history(self) -> tuple[ApduRecord, ...]:
        """Headers of the last APDUs received (no data, no secrets)."""
        with self._lock:
            return tuple(self._history)

    def schedule_pull(self, at_command: int) -> None:
        """Vanish instead of answering the `at_command`-th APDU since power-on.

        One-shot. Counting restarts at every power-on, so after a re-insertion the
        fault is gone unless scheduled again.
        """
        with self._lock:
            if at_command <= self._commands:
                raise ValueError(
                    f"command {at_command} already passed ({self._commands} since power-on)"
                )
            self._pull_at = at_command

    def schedule_stall(self, at_command: int, seconds: float) -> None:
        """Take `seconds` before processing the `at_command`-th APDU since power-on.

        One-shot. The command is then processed as usual (the way a slow or
        touch-waiting key answers late): a host killed meanwhile never sees the answer,
        though the key did the work. Introspection stays available during the stall.
        """
        with self._lock:
            if at_command <= self._commands:
                raise ValueError(
                    f"command {at_command} already passed ({self._commands} since power-on)"
                )
            self._stall = (at_command, seconds)

    def fail_command(
        self,
        ins: int,
        sw: int,
        *,
        times: int = 1,
        p1: int | None = None,
        data: bytes = b"",
    ) -> None:
        """Answer `data` + `sw` to the next `times` APDUs with this INS (and P1).

        The command is not executed. Use p1=0x04 to target SELECT rather than
        CALCULATE_ALL (both INS A4). With `data` and SW 9000 this is a malformed answer
        (bad TLVs) rather than a refusal.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._fail_rules.append(_FailRule(ins, sw, p1, times, data))

    # --- APDU processing --------------------------------------------------------------

    def transmit(self, apdu: bytes) -> bytes:
        """Process one command APDU; returns response data + the 2-byte status word.

        Raises CardRemovedError when the key is not in a reader, or when a scheduled
        pull fires (the key is then removed).
        """
        with self._lock:
            stall = self._stall
            if stall is not None and stall[0] == self._commands + 1:
                self._stall = None
            else:
                stall = None
        if stall is not None:
            logger.debug("emulated YubiKey stalls %.1f s before command %d", stall[1], stall[0])
            time.sleep(stall[1])
        with self._lock:
            self._require_present()
            if not self._powered:
                self._power_up()  # the reader powers the card for the exchange
            self._commands += 1
            header = (apdu + b"\0\0\0\0")[:4]
            if self._pull_at is not None and self._commands >= self._pull_at:
                self._pull_at = None
                self._record(header, len(apdu), None)
                logger.debug("emulated YubiKey pulled at command %d", self._commands)
                self.remove()
                raise CardRemovedError("the emulated YubiKey was pulled (fault injection)")
            response = self._forced_failure(header) or self._process(apdu)
            self._record(header, len(apdu), response.sw)
            logger.debug(
                "APDU ins=%02x p1=%02x len=%d -> sw=%04x len=%d",
                header[1],
                header[2],
                len(apdu),
                response.sw,
                len(response.data),
            )
            return response.to_bytes()

    def _record(self, header: bytes, length: int, sw: int | None) -> None:
        answered = None if sw is None else int(sw)
        self._history.append(
            ApduRecord(header[0], header[1], header[2], header[3], length, answered)
        )

    def _forced_failure(self, header: bytes) -> Response | None:
        for rule in self._fail_rules:
            if rule.matches(header[1], header[2]):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._fail_rules.remove(rule)
                return Response(rule.data, rule.sw)
        return None

    def _process(self, apdu: bytes) -> Response:
        try:
            cmd = parse_command(apdu)
        except ApduFormatError:
            return status(SW.WRONG_LENGTH)
        if cmd.cla & ~CLA_CHAINING != 0:
            self._chain = None
            return status(SW.CLA_NOT_SUPPORTED)
        whole = self._assemble_chain(cmd)
        if whole is None:
            return status(SW.OK)  # a non-final part of a command chain
        if whole.ins == INS_SELECT and whole.p1 == P1_SELECT_BY_AID:
            return self._select(whole.data)
        if self._selected is None:
            return status(SW.INS_NOT_SUPPORTED)
        return self._selected.process(whole)

    def _assemble_chain(self, cmd: Command) -> Command | None:
        """Join command chaining (CLA bit 0x10) parts; None while the chain goes on."""
        key = (cmd.ins, cmd.p1, cmd.p2)
        prior = b""
        if self._chain is not None and self._chain[:3] == key:
            prior = self._chain[3]
        self._chain = None
        if cmd.chained:
            self._chain = (*key, prior + cmd.data)
            return None
        if prior:
            return replace(cmd, data=prior + cmd.data)
        return cmd

    def _select(self, aid: bytes) -> Response:
        applet = self._applets.get(aid)
        if applet is None:
            # Unknown or disabled application; the current selection stays.
            return status(SW.FILE_NOT_FOUND)
        if self._selected is not None and self._selected is not applet:
            self._selected.deselect()
        self._selected = applet
        return applet.select()
