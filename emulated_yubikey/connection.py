"""`EmulatedConnection`: a yubikit SmartCardConnection to an in-process emulated key.

This is what yubikit lacks (see STYLE.md): a fake at the lowest level, so that the
real OathSession / ManagementSession code runs in every test without pcscd.
"""

from __future__ import annotations

from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection

from .card import EmulatedYubiKey
from .errors import CardRemovedError, ConnectionClosedError


class EmulatedConnection(SmartCardConnection):
    """Connection to an inserted EmulatedYubiKey.

    transport=USB makes yubikit use extended APDUs (firmware >= 4); NFC makes it use
    short APDUs with command chaining, as over a contactless reader.

    Once the key is pulled (for real or by a fault), this connection raises
    CardRemovedError on every call, even after the key is re-inserted: open a new one.
    """

    def __init__(self, key: EmulatedYubiKey, transport: TRANSPORT = TRANSPORT.USB) -> None:
        if not key.present:
            raise CardRemovedError("no emulated YubiKey in the reader")
        self._key = key
        self._transport = transport
        self._insertion = key.insertions
        self._closed = False
        self._removed = False

    @property
    def transport(self) -> TRANSPORT:
        return self._transport

    @property
    def key(self) -> EmulatedYubiKey:
        return self._key

    def close(self) -> None:
        self._closed = True

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        if self._closed:
            raise ConnectionClosedError("connection to the emulated YubiKey is closed")
        if self._removed or not self._key.present or self._key.insertions != self._insertion:
            self._removed = True
            raise CardRemovedError("the emulated YubiKey was removed from the reader")
        try:
            response = self._key.transmit(bytes(apdu))
        except CardRemovedError:
            self._removed = True
            raise
        return response[:-2], int.from_bytes(response[-2:], "big")
