"""The Management applet of an emulated YubiKey: who the key is.

`ykman list`, `ykman info` and yubikit's `ManagementSession.read_device_info()` learn
the serial, firmware, form factor and enabled applications from this applet over
CCID. Pure (no I/O, no yubikit).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag, unique

from .apdu import SW, Command, Response, ResponsePager, status, tlv

AID = bytes.fromhex("a000000527471117")

INS_READ_CONFIG = 0x1D
INS_GET_RESPONSE = 0xC0

TAG_USB_SUPPORTED = 0x01
TAG_SERIAL = 0x02
TAG_USB_ENABLED = 0x03
TAG_FORM_FACTOR = 0x04
TAG_VERSION = 0x05
TAG_AUTO_EJECT_TIMEOUT = 0x06
TAG_CHALRESP_TIMEOUT = 0x07
TAG_DEVICE_FLAGS = 0x08
TAG_CONFIG_LOCK = 0x0A
TAG_NFC_SUPPORTED = 0x0D
TAG_NFC_ENABLED = 0x0E

HSMAUTH_MIN_FIRMWARE = (5, 4, 3)


@unique
class Capability(IntFlag):
    """YubiKey application bits, as in the device info TLVs."""

    OTP = 0x01
    U2F = 0x02
    OPENPGP = 0x08
    PIV = 0x10
    OATH = 0x20
    HSMAUTH = 0x100
    FIDO2 = 0x200


@unique
class FormFactor(IntEnum):
    UNKNOWN = 0x00
    USB_A_KEYCHAIN = 0x01
    USB_A_NANO = 0x02
    USB_C_KEYCHAIN = 0x03
    USB_C_NANO = 0x04
    USB_C_LIGHTNING = 0x05
    USB_A_BIO = 0x06
    USB_C_BIO = 0x07


def default_capabilities(firmware: tuple[int, int, int]) -> Capability:
    """What a YubiKey 5 of that firmware supports over USB."""
    caps = (
        Capability.OTP
        | Capability.U2F
        | Capability.OPENPGP
        | Capability.PIV
        | Capability.OATH
        | Capability.FIDO2
    )
    if firmware >= HSMAUTH_MIN_FIRMWARE:
        caps |= Capability.HSMAUTH
    return caps


@dataclass(frozen=True)
class DeviceIdentity:
    """The facts the Management applet reports."""

    serial: int | None
    firmware: tuple[int, int, int]
    form_factor: FormFactor
    supported: Capability
    enabled: Capability
    nfc: bool


class ManagementApplet:
    """SELECT answers the firmware as ASCII; READ_CONFIG answers the device info."""

    send_remaining_ins = INS_GET_RESPONSE

    def __init__(self, identity: DeviceIdentity) -> None:
        self.identity = identity
        self._pager = ResponsePager(INS_GET_RESPONSE)

    def select(self) -> Response:
        self._pager.clear()
        return Response(".".join(str(n) for n in self.identity.firmware).encode())

    def deselect(self) -> None:
        self._pager.clear()

    def process(self, cmd: Command) -> Response:
        if cmd.ins == INS_GET_RESPONSE:
            return self._pager.send_remaining(cmd.ne)
        self._pager.clear()
        if cmd.ins != INS_READ_CONFIG:
            return status(SW.INS_NOT_SUPPORTED)
        if cmd.p2 != 0:
            return status(SW.WRONG_P1P2)
        # Everything fits in page 0; later pages are empty, as on keys before 5.6.
        body = self._device_info() if cmd.p1 == 0 else b""
        return self._pager.page(bytes([len(body)]) + body, cmd.ne)

    def _device_info(self) -> bytes:
        ident = self.identity
        data = tlv(TAG_USB_SUPPORTED, int(ident.supported).to_bytes(2, "big"))
        if ident.serial is not None:
            data += tlv(TAG_SERIAL, ident.serial.to_bytes(4, "big"))
        data += tlv(TAG_USB_ENABLED, int(ident.enabled).to_bytes(2, "big"))
        data += tlv(TAG_FORM_FACTOR, bytes([ident.form_factor]))
        data += tlv(TAG_VERSION, bytes(ident.firmware))
        data += tlv(TAG_AUTO_EJECT_TIMEOUT, b"\0\0")
        data += tlv(TAG_CHALRESP_TIMEOUT, b"\x0f")
        data += tlv(TAG_DEVICE_FLAGS, b"\0")
        data += tlv(TAG_CONFIG_LOCK, b"\0")
        if ident.nfc:
            data += tlv(TAG_NFC_SUPPORTED, int(ident.supported).to_bytes(2, "big"))
            data += tlv(TAG_NFC_ENABLED, int(ident.enabled).to_bytes(2, "big"))
        return data
