"""The token adapter: PC/SC failures become the token errors the operator reads; every code
in one CALCULATE ALL."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pyotp
import pytest
from fakes import code_exchanges
from smartcard import scard

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.errors import (
    PcscCallFailed,
    PcscUnavailable,
    TokenCommandFailed,
    TokenError,
    TokenLocked,
    TokenRemoved,
    TokenTouchTimeout,
    exit_status,
)
from provisioner.core.model import CredentialSpec
from provisioner.core.secret import Seed


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


# --- calculate_many: every code in one CALCULATE ALL ------------------------------------

T = 1_800_000_010
SEEDS = {
    "AWS prod:alice@111111111111": bytes(range(1, 21)),
    "AWS dev:alice@222222222222": bytes(range(21, 41)),
    "AWS sandbox:alice@333333333333": bytes(range(41, 61)),
}


def _pyotp_code(seed: bytes, timestamp: int) -> str:
    return pyotp.TOTP(base64.b32encode(seed).decode()).at(timestamp)


def _write(token: YubiKeyToken, credential_id: str, seed: bytes, *, touch: bool = False) -> None:
    issuer, account = credential_id.split(":", 1)
    spec = CredentialSpec(issuer=issuer, account=account, touch=touch)
    assert spec.credential_id == credential_id
    token.put_credential(spec, Seed(seed))


@pytest.fixture
def key() -> EmulatedYubiKey:
    return EmulatedYubiKey(serial=12345678)


@pytest.fixture
def token(key: EmulatedYubiKey) -> Iterator[YubiKeyToken]:
    with YubiKeyToken(lambda: EmulatedConnection(key), "Emulated reader") as token:
        for credential_id, seed in SEEDS.items():
            _write(token, credential_id, seed)
        yield token


def test_calculate_many_computes_every_code_in_one_pass(
    key: EmulatedYubiKey, token: YubiKeyToken
) -> None:
    _write(token, "AWS:bob@111111111111", bytes(range(61, 81)))  # not asked for
    start = len(key.history)
    codes = token.calculate_many(list(SEEDS), T)
    assert codes == {i: _pyotp_code(seed, T) for i, seed in SEEDS.items()}
    assert list(codes) == list(SEEDS)  # in the order asked
    assert code_exchanges(key.history[start:]) == ["all"]
    # The same codes, one at a time.
    assert codes == {i: token.calculate(i, T) for i in SEEDS}


def test_calculate_many_asks_for_each_touch_credential_after_the_pass(
    key: EmulatedYubiKey, token: YubiKeyToken
) -> None:
    touchy = "AWS security:alice@444444444444"
    _write(token, touchy, bytes(range(81, 101)), touch=True)
    start = len(key.history)
    codes = token.calculate_many([*SEEDS, touchy], T)
    assert codes[touchy] == _pyotp_code(bytes(range(81, 101)), T)
    assert code_exchanges(key.history[start:]) == ["all", "one"]
    assert key.touch_requests == 1

    key.user_touches = False
    with pytest.raises(TokenTouchTimeout, match="was not touched in time"):
        token.calculate_many([touchy], T)


def test_calculate_many_knows_a_touch_credential_in_a_session_that_did_not_write_it(
    key: EmulatedYubiKey, token: YubiKeyToken
) -> None:
    """LIST does not say which credentials need a touch; CALCULATE ALL does, so a touch
    nobody gives is a touch timeout, not a locked applet, after a reopen too."""
    touchy = "AWS security:alice@444444444444"
    _write(token, touchy, bytes(range(81, 101)), touch=True)
    token.close()
    key.user_touches = False
    start = len(key.history)
    with (
        YubiKeyToken(lambda: EmulatedConnection(key), "Emulated reader") as fresh,
        pytest.raises(TokenTouchTimeout),
    ):
        fresh.calculate_many([*SEEDS, touchy], T)
    assert code_exchanges(key.history[start:]) == ["all", "one"]
    assert 0xA1 not in {r.ins for r in key.history[start:]}  # no LIST to find it again


def test_calculate_many_names_a_credential_the_token_does_not_hold(
    key: EmulatedYubiKey, token: YubiKeyToken
) -> None:
    start = len(key.history)
    with pytest.raises(TokenCommandFailed) as info:
        token.calculate_many([*SEEDS, "AWS qa:alice@555555555555"], T)
    assert info.value.one_line() == (
        f"token {token.label} holds no credential AWS qa:alice@555555555555"
    )
    assert "\n" not in info.value.one_line()
    assert code_exchanges(key.history[start:]) == ["all"]  # nothing computed one by one
    # calculate says the same of a missing credential.
    with pytest.raises(TokenCommandFailed) as single:
        token.calculate("AWS qa:alice@555555555555", T)
    assert single.value.message == info.value.message


def test_calculate_many_translates_removal_and_a_locked_applet(key: EmulatedYubiKey) -> None:
    connection = _PcscFails(key)
    with YubiKeyToken(lambda: connection, "Emulated reader") as token:
        _write(token, "AWS:alice@111111111111", bytes(range(1, 21)))
        connection.code = scard.SCARD_W_REMOVED_CARD
        with pytest.raises(TokenRemoved):
            token.calculate_many(["AWS:alice@111111111111"], T)
    key.fail_command(0xA4, 0x6982, p1=0x00)  # what a locked applet answers
    with (
        YubiKeyToken(lambda: EmulatedConnection(key), "Emulated reader") as token,
        pytest.raises(TokenLocked, match="locked"),
    ):
        token.calculate_many(["AWS:alice@111111111111"], T)


def test_calculate_many_unlocks_a_password_protected_applet_first() -> None:
    password = "desk-password"  # noqa: S105  # a test value
    key = EmulatedYubiKey(serial=12345678, oath_password=password)
    seed = bytes(range(1, 21))
    with (
        YubiKeyToken(lambda: EmulatedConnection(key), "Emulated reader") as token,
        pytest.raises(TokenLocked, match="none is configured"),
    ):
        token.calculate_many(["AWS:alice@111111111111"], T)
    with YubiKeyToken(
        lambda: EmulatedConnection(key), "Emulated reader", oath_password=password
    ) as token:
        _write(token, "AWS:alice@111111111111", seed)
        assert token.calculate_many(["AWS:alice@111111111111"], T) == {
            "AWS:alice@111111111111": _pyotp_code(seed, T)
        }


def test_calculate_many_refuses_time_zero_and_asks_nothing_for_no_credentials(
    key: EmulatedYubiKey, token: YubiKeyToken
) -> None:
    with pytest.raises(ValueError, match="positive"):
        token.calculate_many(list(SEEDS), 0)
    start = len(key.history)
    assert token.calculate_many([], T) == {}
    assert key.history[start:] == ()
