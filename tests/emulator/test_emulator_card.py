"""The emulated card at the APDU level: routing, status words, faults, secrecy."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from yubikit.core import ApplicationNotAvailableError
from yubikit.core.smartcard import ApduError
from yubikit.management import ManagementSession
from yubikit.oath import HASH_ALGORITHM, OATH_TYPE, CredentialData, OathSession

from emulated_yubikey import (
    DEFAULT_ATR,
    CardRemovedError,
    ConnectionClosedError,
    EmulatedConnection,
    EmulatedYubiKey,
    KeySettings,
)

SELECT_OATH = bytes.fromhex("00a4040007a0000005272101")
SELECT_MGMT = bytes.fromhex("00a4040008a000000527471117")
SEED = b"card-test-seed-0123456789"
PASSWORD = "hunter2-very-secret"  # noqa: S105  # a test value, checked never to be shown


def counter_random() -> Callable[[int], bytes]:
    """Deterministic "randomness": 01 02 03 ... across calls."""
    state = [0]

    def random(n: int) -> bytes:
        out = bytes((state[0] + i + 1) & 0xFF for i in range(n))
        state[0] += n
        return out

    return random


def sw(response: bytes) -> int:
    return int.from_bytes(response[-2:], "big")


def put_apdu(name: bytes, secret: bytes = SEED, extra: bytes = b"") -> bytes:
    data = bytes([0x71, len(name)]) + name + bytes([0x73, len(secret) + 2, 0x21, 6]) + secret
    data += extra
    return bytes([0, 0x01, 0, 0, len(data)]) + data


def test_select_answers_exact_bytes() -> None:
    key = EmulatedYubiKey(random=counter_random())
    version, salt = "7903050403", "71080102030405060708"
    assert key.transmit(SELECT_OATH).hex() == version + salt + "9000"
    assert key.transmit(SELECT_MGMT) == b"5.4.3\x90\x00"


def test_select_with_password_adds_challenge_and_algorithm() -> None:
    key = EmulatedYubiKey(random=counter_random(), oath_password=PASSWORD)
    # salt 01..08, then the SELECT challenge 09..10
    version, salt = "7903050403", "71080102030405060708"
    challenge, algorithm = "7408090a0b0c0d0e0f10", "7b0101"
    assert key.transmit(SELECT_OATH).hex() == version + salt + challenge + algorithm + "9000"
    assert sw(key.transmit(bytes.fromhex("00a1000000"))) == 0x6982  # LIST while locked
    assert sw(key.transmit(bytes.fromhex("0004000000"))) == 0x6B00  # RESET needs DEAD


@pytest.mark.parametrize(
    ("apdu", "expected"),
    [
        ("00a4040005a000000527", 0x6A82),  # unknown AID
        ("00a1000000", 0x6D00),  # nothing selected
        ("80a1000000", 0x6E00),  # proprietary class
        ("00a4040003a000", 0x6700),  # Lc says 3, 2 bytes follow
    ],
)
def test_status_words_before_select(apdu: str, expected: int) -> None:
    assert sw(EmulatedYubiKey().transmit(bytes.fromhex(apdu))) == expected


@pytest.mark.parametrize(
    ("apdu", "expected"),
    [
        ("00a10000", 0x9000),  # LIST as a header-only (case 1) APDU
        ("00ee000000", 0x6D00),  # unknown INS
        ("00a5000000", 0x6D00),  # SEND_REMAINING with nothing pending
        ("000200000471026e6f", 0x6984),  # DELETE of a missing credential
        ("00a2000205710161740100", 0x6B00),  # CALCULATE with P2=02
        ("00a3000000", 0x6984),  # VALIDATE without a password set
    ],
)
def test_oath_status_words(apdu: str, expected: int) -> None:
    key = EmulatedYubiKey()
    key.transmit(SELECT_OATH)
    assert sw(key.transmit(bytes.fromhex(apdu))) == expected


def test_put_refuses_what_a_real_key_refuses() -> None:
    key = EmulatedYubiKey()
    key.transmit(SELECT_OATH)
    assert sw(key.transmit(put_apdu(b"ok"))) == 0x9000
    assert sw(key.transmit(put_apdu(b"x" * 65))) == 0x6A80  # id too long
    assert sw(key.transmit(put_apdu(b"long", secret=bytes(65)))) == 0x6A80  # > SHA1 block
    bad_digits = put_apdu(b"d").replace(bytes([0x21, 6]), bytes([0x21, 9]))
    assert sw(key.transmit(bad_digits)) == 0x6A80
    assert [c.id for c in key.credentials()] == ["ok"]


def test_put_with_touch_property_and_imf() -> None:
    key = EmulatedYubiKey()
    key.transmit(SELECT_OATH)
    hotp = put_apdu(b"h", extra=bytes.fromhex("78027a0400000009")).replace(
        bytes([0x21, 6]), bytes([0x11, 6])
    )
    assert sw(key.transmit(hotp)) == 0x9000
    [info] = key.credentials()
    assert (info.touch, info.counter, info.period) == (True, 9, 0)


def test_command_chaining_joins_parts() -> None:
    key = EmulatedYubiKey()
    key.transmit(SELECT_OATH)
    apdu = put_apdu(b"Chained:one")
    data = apdu[5:]
    first = bytes([0x10, 0x01, 0, 0, 10]) + data[:10]
    last = bytes([0x00, 0x01, 0, 0, len(data) - 10]) + data[10:]
    assert sw(key.transmit(first)) == 0x9000
    assert key.credentials() == []
    assert sw(key.transmit(last)) == 0x9000
    assert [c.id for c in key.credentials()] == ["Chained:one"]


def test_calculate_full_response_and_truncated() -> None:
    key = EmulatedYubiKey()
    key.transmit(SELECT_OATH)
    key.transmit(put_apdu(b"full"))
    body = bytes.fromhex("710466756c6c74080000000000000001")
    full = key.transmit(bytes([0, 0xA2, 0, 0, len(body)]) + body)
    trunc = key.transmit(bytes([0, 0xA2, 0, 1, len(body)]) + body)
    assert full[:3] == bytes([0x75, 21, 6]) and sw(full) == 0x9000 and len(full) == 25
    assert trunc[:3] == bytes([0x76, 5, 6]) and sw(trunc) == 0x9000 and len(trunc) == 9
    digest = full[3:23]
    offset = digest[-1] & 0x0F
    assert trunc[3:7] == bytes([digest[offset] & 0x7F]) + digest[offset + 1 : offset + 4]


def test_rename_needs_firmware_5_3_1() -> None:
    key = EmulatedYubiKey(firmware=(5, 2, 7))
    key.transmit(SELECT_OATH)
    key.transmit(put_apdu(b"a"))
    assert sw(key.transmit(bytes.fromhex("0005000006710161710162"))) == 0x6D00


def test_pull_at_command_fires_once_and_state_persists() -> None:
    key = EmulatedYubiKey(pull_at_command=3)
    conn = EmulatedConnection(key)
    session = OathSession(conn)  # APDU 1: SELECT
    cred = session.put_credential(  # APDU 2
        CredentialData("a", OATH_TYPE.TOTP, HASH_ALGORITHM.SHA1, SEED)
    )
    with pytest.raises(CardRemovedError):
        session.list_credentials()  # APDU 3: the key vanishes instead
    assert not key.present
    assert key.history[-1].sw is None
    with pytest.raises(CardRemovedError):
        session.list_credentials()
    key.insert()
    with pytest.raises(CardRemovedError):  # the old connection stays dead
        session.list_credentials()
    again = OathSession(EmulatedConnection(key))
    assert [c.id for c in again.list_credentials()] == [cred.id]
    assert again.list_credentials() and again.list_credentials()  # no second pull


def test_card_removed_error_is_a_connection_error() -> None:
    assert issubclass(CardRemovedError, ConnectionError)


def test_schedule_pull_mid_flow() -> None:
    key = EmulatedYubiKey()
    mgmt = ManagementSession(EmulatedConnection(key))
    key.schedule_pull(at_command=key.commands_since_power_on + 1)
    with pytest.raises(CardRemovedError):
        mgmt.read_device_info()
    with pytest.raises(CardRemovedError):
        EmulatedConnection(key)
    key.insert()
    EmulatedConnection(key).send_and_receive(SELECT_MGMT)
    with pytest.raises(ValueError, match="already passed"):
        key.schedule_pull(at_command=1)


def test_fail_command_answers_the_status_word(key: EmulatedYubiKey) -> None:
    session = OathSession(EmulatedConnection(key))
    cred = session.put_credential(CredentialData("a", OATH_TYPE.TOTP, HASH_ALGORITHM.SHA1, SEED))
    key.fail_command(0xA2, 0x6581, times=2)
    for _ in range(2):
        with pytest.raises(ApduError) as e:
            session.calculate_code(cred, 59)
        assert e.value.sw == 0x6581
    assert len(session.calculate_code(cred, 59).value) == 6


def test_fail_command_p1_tells_select_from_calculate_all(key: EmulatedYubiKey) -> None:
    key.fail_command(0xA4, 0x6F00, p1=0x00)
    session = OathSession(EmulatedConnection(key))  # SELECT (A4 04) unaffected
    with pytest.raises(ApduError) as e:
        session.calculate_all(59)
    assert e.value.sw == 0x6F00
    key.fail_command(0xA4, 0x6A82, p1=0x04)
    with pytest.raises(ApplicationNotAvailableError):
        OathSession(EmulatedConnection(key))
    assert OathSession(EmulatedConnection(key)).calculate_all(59) == {}


def test_reinsertion_forgets_selection_and_unlock() -> None:
    key = EmulatedYubiKey(oath_password=PASSWORD)
    session = OathSession(EmulatedConnection(key))
    session.validate(session.derive_key(PASSWORD))
    session.list_credentials()
    key.remove()
    key.insert()
    conn = EmulatedConnection(key)
    assert conn.send_and_receive(bytes.fromhex("00a1000000")) == (b"", 0x6D00)  # no applet
    assert OathSession(conn).locked


def test_closed_connection() -> None:
    conn = EmulatedConnection(EmulatedYubiKey())
    conn.close()
    with pytest.raises(ConnectionClosedError):
        conn.send_and_receive(SELECT_OATH)


def test_atr_and_settings() -> None:
    key = EmulatedYubiKey(serial=None, firmware=(5, 7, 0), touch=False)
    assert key.atr == DEFAULT_ATR
    assert key.atr[1] & 0xF0 == 0xF0  # what makes ykman pick USB transport
    assert key.settings == KeySettings(serial=None, firmware=(5, 7, 0), touch=False)
    assert EmulatedYubiKey.from_settings(key.settings).settings == key.settings
    assert key.user_touches is False
    for bad in ({"serial": 0}, {"firmware": (5, 4)}, {"used_slots": -1}, {"pull_at_command": 0}):
        with pytest.raises(ValueError):
            KeySettings(**bad)


def test_no_secret_in_repr_str_or_history() -> None:
    key = EmulatedYubiKey(oath_password=PASSWORD, used_slots=2)
    session = OathSession(EmulatedConnection(key))
    session.validate(session.derive_key(PASSWORD))
    session.put_credential(CredentialData("a", OATH_TYPE.TOTP, HASH_ALGORITHM.SHA1, SEED))
    shown = " ".join(
        [repr(key), str(key), repr(key.settings), repr(key.credentials()), repr(key.history)]
    )
    for secret in (PASSWORD, SEED.decode(), SEED.hex(), base64.b32encode(SEED).decode()):
        assert secret not in shown
    assert "hunter2" not in shown and "seed" not in shown


def test_a_stall_delays_one_command_then_it_is_processed() -> None:
    import time

    from emulated_yubikey import EmulatedYubiKey

    key = EmulatedYubiKey(serial=1)
    select_mgmt = bytes.fromhex("00a4040008a000000527471117")
    key.schedule_stall(2, 0.3)
    key.transmit(select_mgmt)
    started = time.monotonic()
    answer = key.transmit(select_mgmt)
    assert time.monotonic() - started >= 0.3
    assert answer[-2:] == b"\x90\x00"
    started = time.monotonic()
    key.transmit(select_mgmt)
    assert time.monotonic() - started < 0.2  # one-shot
