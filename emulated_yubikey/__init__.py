"""An emulated YubiKey (OATH + Management applets) for tests and the demo.

In-process: `EmulatedConnection(EmulatedYubiKey(...))` is a yubikit SmartCardConnection.
Through the real PC/SC stack: `with PcscStack() as stack: stack.insert(key)` puts the
key into a vpcd reader named like a YubiKey's, where unmodified ykman finds it.
"""

from .apdu import SW
from .card import DEFAULT_ATR, ApduRecord, EmulatedYubiKey, KeySettings
from .connection import EmulatedConnection
from .errors import (
    CardRemovedError,
    ConnectionClosedError,
    EmulatorError,
    PcscStackError,
    VpcdError,
)
from .management import Capability, FormFactor, default_capabilities
from .oath import CredentialInfo, HashAlgorithm, OathType
from .pcsc_stack import DEFAULT_READER_NAME, PcscStack
from .vpcd import VpcdCard

__all__ = [
    "DEFAULT_ATR",
    "DEFAULT_READER_NAME",
    "SW",
    "ApduRecord",
    "Capability",
    "CardRemovedError",
    "ConnectionClosedError",
    "CredentialInfo",
    "EmulatedConnection",
    "EmulatedYubiKey",
    "EmulatorError",
    "FormFactor",
    "HashAlgorithm",
    "KeySettings",
    "OathType",
    "PcscStack",
    "PcscStackError",
    "VpcdCard",
    "VpcdError",
    "default_capabilities",
]
