"""The token adapter's PC/SC failures become the token errors the operator reads."""

from __future__ import annotations

import pytest
from smartcard import scard

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.errors import (
    PcscCallFailed,
    PcscUnavailable,
    TokenError,
    TokenRemoved,
    exit_status,
)


class _PcscFails(EmulatedConnection):
    """The emulated token behind a PC/SC stack whose next transmit fails with ``code``."""

    code: int | None = None

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        if self.code is not None:
            raise PcscCallFailed("talking to the card in Emulated reader", code=self.code)
        return super().send_and_receive(apdu)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (scard.SCARD_E_NO_SERVICE, PcscUnavailable),
        (scard.SCARD_E_SERVICE_STOPPED, PcscUnavailable),
        (scard.SCARD_W_REMOVED_CARD, TokenRemoved),
    ],
)
def test_a_failed_pcsc_call_leaves_the_adapter_as_the_error_its_code_means(
    code: int, error: type[TokenError]
) -> None:
    connection = _PcscFails(EmulatedYubiKey(serial=12345678))
    with YubiKeyToken(lambda: connection, "Emulated reader") as token:
        connection.code = code
        with pytest.raises(error) as info:
            token.oath_state()
    assert type(info.value) is error
    assert isinstance(info.value.__cause__, PcscCallFailed)
    assert exit_status(info.value) == 3  # a token or PC/SC problem
