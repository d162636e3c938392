"""Errors of the emulated YubiKey and its PC/SC plumbing, under one root.

Messages say what happened and what to do; they never carry secrets or APDU data.
"""

from __future__ import annotations


class EmulatorError(Exception):
    """Root of every error raised by emulated_yubikey."""


class CardRemovedError(EmulatorError, ConnectionError):
    """The emulated key left the reader (pulled, or a pull fault fired).

    A connection that saw this stays dead, like a PC/SC handle after removal: open a
    new one once the key is back (`EmulatedYubiKey.insert()` / `VpcdCard.insert()`).
    """


class ConnectionClosedError(EmulatorError, ConnectionError):
    """The in-process connection was used after close()."""


class VpcdError(EmulatorError, ConnectionError):
    """The emulated key could not be put into a vpcd reader (is pcscd running?)."""


class PcscStackError(EmulatorError, RuntimeError):
    """The private pcscd could not be started, or failed; the message says why."""
