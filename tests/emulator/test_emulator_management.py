"""Device info of the emulated key, read by the unmodified yubikit Management code."""

from __future__ import annotations

import pytest
from yubikit.core import PID, TRANSPORT, YUBIKEY, ApplicationNotAvailableError, Version
from yubikit.management import CAPABILITY, FORM_FACTOR, ManagementSession
from yubikit.oath import OathSession
from yubikit.support import get_name, read_info

from emulated_yubikey import (
    Capability,
    EmulatedConnection,
    EmulatedYubiKey,
    FormFactor,
    default_capabilities,
)

YK5_543 = (
    CAPABILITY.OTP
    | CAPABILITY.U2F
    | CAPABILITY.OPENPGP
    | CAPABILITY.PIV
    | CAPABILITY.OATH
    | CAPABILITY.FIDO2
    | CAPABILITY.HSMAUTH
)


def device_info(key: EmulatedYubiKey):  # type: ignore[no-untyped-def]
    return ManagementSession(EmulatedConnection(key)).read_device_info()


def test_default_key_reads_as_a_yubikey_5_nfc() -> None:
    key = EmulatedYubiKey(serial=12345678)
    mgmt = ManagementSession(EmulatedConnection(key))
    assert mgmt.version == Version(5, 4, 3)
    info = mgmt.read_device_info()
    assert info.serial == 12345678
    assert info.version == Version(5, 4, 3)
    assert info.form_factor == FORM_FACTOR.USB_A_KEYCHAIN
    assert info.supported_capabilities == {TRANSPORT.USB: YK5_543, TRANSPORT.NFC: YK5_543}
    assert info.config.enabled_capabilities == {TRANSPORT.USB: YK5_543, TRANSPORT.NFC: YK5_543}
    assert not info.is_locked and not info.is_fips
    assert get_name(info, YUBIKEY.YK4) == "YubiKey 5 NFC"


def test_ykman_read_info_over_usb_pid() -> None:
    key = EmulatedYubiKey(serial=7654321, firmware=(5, 7, 1), form_factor=FormFactor.USB_C_NANO)
    info = read_info(EmulatedConnection(key), PID.YK4_OTP_FIDO_CCID)
    assert (info.serial, info.version) == (7654321, Version(5, 7, 1))
    assert info.form_factor == FORM_FACTOR.USB_C_NANO
    assert TRANSPORT.NFC not in info.supported_capabilities  # a Nano has no NFC
    assert TRANSPORT.NFC not in info.config.enabled_capabilities
    assert get_name(info, YUBIKEY.YK4) == "YubiKey 5C Nano"


def test_hidden_serial_is_none() -> None:
    assert device_info(EmulatedYubiKey(serial=None)).serial is None


def test_firmware_before_hsmauth() -> None:
    info = device_info(EmulatedYubiKey(firmware=(5, 2, 7), nfc=False))
    assert info.supported_capabilities == {TRANSPORT.USB: YK5_543 & ~CAPABILITY.HSMAUTH}
    assert default_capabilities((5, 2, 7)) == Capability(int(YK5_543 & ~CAPABILITY.HSMAUTH))


def test_key_without_oath() -> None:
    key = EmulatedYubiKey(capabilities=Capability.U2F | Capability.FIDO2 | Capability.PIV)
    info = device_info(key)
    assert info.supported_capabilities[TRANSPORT.USB] == (
        CAPABILITY.U2F | CAPABILITY.FIDO2 | CAPABILITY.PIV
    )
    assert CAPABILITY.OATH not in info.config.enabled_capabilities[TRANSPORT.USB]
    with pytest.raises(ApplicationNotAvailableError):
        OathSession(EmulatedConnection(key))
    assert key.history[-1].sw == 0x6A82


def test_oath_supported_but_disabled() -> None:
    key = EmulatedYubiKey(enabled_capabilities=default_capabilities((5, 4, 3)) & ~Capability.OATH)
    info = device_info(key)
    assert CAPABILITY.OATH in info.supported_capabilities[TRANSPORT.USB]
    assert CAPABILITY.OATH not in info.config.enabled_capabilities[TRANSPORT.USB]
    with pytest.raises(ApplicationNotAvailableError):
        OathSession(EmulatedConnection(key))
