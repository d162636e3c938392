"""The emulated OATH applet driven by the unmodified yubikit OathSession, in-process."""

from __future__ import annotations

import base64
import hashlib

import pyotp
import pytest
from yubikit.core import TRANSPORT, Tlv
from yubikit.core.smartcard import ApduError
from yubikit.oath import HASH_ALGORITHM, OATH_TYPE, CredentialData, OathSession

from emulated_yubikey import (
    EmulatedConnection,
    EmulatedYubiKey,
    HashAlgorithm,
    OathType,
)

# RFC 6238 appendix B: seeds per algorithm, times and the 8-digit codes.
RFC_SEEDS = {
    HASH_ALGORITHM.SHA1: b"12345678901234567890",
    HASH_ALGORITHM.SHA256: b"12345678901234567890123456789012",
    HASH_ALGORITHM.SHA512: b"1234567890" * 6 + b"1234",
}
RFC_VECTORS = [
    (59, {"SHA1": "94287082", "SHA256": "46119246", "SHA512": "90693936"}),
    (1111111109, {"SHA1": "07081804", "SHA256": "68084774", "SHA512": "25091201"}),
    (1111111111, {"SHA1": "14050471", "SHA256": "67062674", "SHA512": "99943326"}),
    (1234567890, {"SHA1": "89005924", "SHA256": "91819424", "SHA512": "93441116"}),
    (2000000000, {"SHA1": "69279037", "SHA256": "90698825", "SHA512": "38618901"}),
    (20000000000, {"SHA1": "65353130", "SHA256": "77737706", "SHA512": "47863826"}),
]
PYOTP_DIGEST = {
    HASH_ALGORITHM.SHA1: hashlib.sha1,
    HASH_ALGORITHM.SHA256: hashlib.sha256,
    HASH_ALGORITHM.SHA512: hashlib.sha512,
}
SECRET = b"provisioner-test-seed-20"
PASSWORD = "desk-password"  # noqa: S105  # a test value


def b32(secret: bytes) -> str:
    return base64.b32encode(secret).decode()


class _AnyLengthTOTP(pyotp.TOTP):
    """pyotp >= 2.10 refuses seeds under 112 bits; the YubiKey takes them (zero-padded)."""

    min_secret_length_bits = 0


def totp(
    secret: bytes,
    *,
    digits: int = 6,
    period: int = 30,
    algorithm: HASH_ALGORITHM = HASH_ALGORITHM.SHA1,
) -> pyotp.TOTP:
    return _AnyLengthTOTP(
        b32(secret), digits=digits, interval=period, digest=PYOTP_DIGEST[algorithm]
    )


def cred_data(
    name: str = "alice",
    *,
    issuer: str | None = "AWS",
    secret: bytes = SECRET,
    algorithm: HASH_ALGORITHM = HASH_ALGORITHM.SHA1,
    digits: int = 6,
    period: int = 30,
    oath_type: OATH_TYPE = OATH_TYPE.TOTP,
    counter: int = 0,
) -> CredentialData:
    return CredentialData(
        name, oath_type, algorithm, secret, digits, period, counter=counter, issuer=issuer
    )


@pytest.mark.parametrize("algorithm", list(RFC_SEEDS))
@pytest.mark.parametrize(("timestamp", "codes"), RFC_VECTORS)
def test_rfc6238_vectors(
    session: OathSession, algorithm: HASH_ALGORITHM, timestamp: int, codes: dict[str, str]
) -> None:
    secret = RFC_SEEDS[algorithm]
    cred = session.put_credential(cred_data(secret=secret, algorithm=algorithm, digits=8))
    code = session.calculate_code(cred, timestamp)
    assert code.value == codes[algorithm.name]
    assert code.value == totp(secret, digits=8, algorithm=algorithm).at(timestamp)
    assert (code.valid_from, code.valid_to) == (timestamp // 30 * 30, timestamp // 30 * 30 + 30)


@pytest.mark.parametrize("timestamp", [1, 59, 1_700_000_000, 1_700_000_029, 1_700_000_030])
def test_totp_sha1_six_digits_matches_pyotp(session: OathSession, timestamp: int) -> None:
    cred = session.put_credential(cred_data())
    assert session.calculate_code(cred, timestamp).value == totp(SECRET).at(timestamp)


def test_two_consecutive_steps_computed_at_once(session: OathSession) -> None:
    cred = session.put_credential(cred_data())
    t = 1_700_000_010
    first = session.calculate_code(cred, t)
    second = session.calculate_code(cred, t + 30)
    assert (first.value, second.value) == (totp(SECRET).at(t), totp(SECRET).at(t + 30))
    assert first.value != second.value
    assert second.valid_from == first.valid_to


@pytest.mark.parametrize("algorithm", [HASH_ALGORITHM.SHA256, HASH_ALGORITHM.SHA512])
def test_period_60_eight_digits(session: OathSession, algorithm: HASH_ALGORITHM) -> None:
    cred = session.put_credential(cred_data(algorithm=algorithm, digits=8, period=60))
    assert cred.id == b"60/AWS:alice"
    t = 1_700_000_045
    expected = totp(SECRET, digits=8, period=60, algorithm=algorithm).at(t)
    assert session.calculate_code(cred, t).value == expected
    # calculate_all answers with a 30 s challenge; yubikit then recalculates non-30 s ones.
    assert session.calculate_all(t)[cred].value == expected  # type: ignore[union-attr]


def test_seven_digits(session: OathSession) -> None:
    cred = session.put_credential(cred_data(digits=7))
    assert session.calculate_code(cred, 1234567890).value == totp(SECRET, digits=7).at(1234567890)


def test_secret_longer_than_block_is_hashed_shorter_is_padded(session: OathSession) -> None:
    long_secret = bytes(range(100))  # > 64-byte SHA1 block: yubikit hashes it first
    short_secret = b"0123456789"  # < 14 bytes: zero-padded
    long_cred = session.put_credential(cred_data("long", secret=long_secret))
    short_cred = session.put_credential(cred_data("short", secret=short_secret))
    t = 1111111111
    assert session.calculate_code(long_cred, t).value == totp(long_secret).at(t)
    assert session.calculate_code(short_cred, t).value == totp(short_secret).at(t)


def test_hotp_uses_and_advances_the_counter(key: EmulatedYubiKey, session: OathSession) -> None:
    cred = session.put_credential(cred_data(oath_type=OATH_TYPE.HOTP, counter=5))
    hotp = pyotp.HOTP(b32(SECRET))
    assert session.calculate_code(cred).value == hotp.at(5)
    assert session.calculate_code(cred).value == hotp.at(6)
    [info] = key.credentials()
    assert (info.oath_type, info.counter, info.period) == (OathType.HOTP, 7, 0)
    assert session.calculate_all(1_700_000_000)[cred] is None


def test_list_credentials(key: EmulatedYubiKey, session: OathSession) -> None:
    session.put_credential(cred_data("alice"))
    session.put_credential(cred_data("bob", issuer=None, period=60, digits=8))
    session.put_credential(
        cred_data("carol", oath_type=OATH_TYPE.HOTP, algorithm=HASH_ALGORITHM.SHA256)
    )
    listed = [(c.id, c.issuer, c.name, c.oath_type, c.period) for c in session.list_credentials()]
    assert listed == [
        (b"AWS:alice", "AWS", "alice", OATH_TYPE.TOTP, 30),
        (b"60/bob", None, "bob", OATH_TYPE.TOTP, 60),
        (b"AWS:carol", "AWS", "carol", OATH_TYPE.HOTP, 0),
    ]
    assert [(c.id, c.algorithm, c.digits, c.period, c.touch) for c in key.credentials()] == [
        ("AWS:alice", HashAlgorithm.SHA1, 6, 30, False),
        ("60/bob", HashAlgorithm.SHA1, 8, 60, False),
        ("AWS:carol", HashAlgorithm.SHA256, 6, 0, False),
    ]


def test_put_same_id_overwrites(key: EmulatedYubiKey, session: OathSession) -> None:
    session.put_credential(cred_data(secret=b"first-secret-0000000"))
    cred = session.put_credential(cred_data(secret=SECRET))
    assert len(session.list_credentials()) == 1
    assert session.calculate_code(cred, 59).value == totp(SECRET).at(59)


def test_delete(session: OathSession) -> None:
    cred = session.put_credential(cred_data("alice"))
    session.put_credential(cred_data("bob"))
    session.delete_credential(cred.id)
    assert [c.id for c in session.list_credentials()] == [b"AWS:bob"]
    with pytest.raises(ApduError) as e:
        session.delete_credential(cred.id)
    assert e.value.sw == 0x6984


def test_rename(session: OathSession) -> None:
    cred = session.put_credential(cred_data("alice", period=60))
    new_id = session.rename_credential(cred.id, "alice2", "Other")
    assert new_id == b"60/Other:alice2"
    assert [c.id for c in session.list_credentials()] == [b"60/Other:alice2"]


def test_password_set_validate_and_unset(key: EmulatedYubiKey, conn: EmulatedConnection) -> None:
    session = OathSession(conn)
    cred = session.put_credential(cred_data())
    session.set_key(session.derive_key("correct horse"))
    assert session.has_key
    session.list_credentials()  # the session that set the key stays usable
    assert key.oath_has_password

    locked = OathSession(conn)
    assert locked.locked and locked.has_key
    with pytest.raises(ApduError) as e:
        locked.list_credentials()
    assert e.value.sw == 0x6982
    with pytest.raises(ApduError) as e:
        locked.validate(locked.derive_key("wrong"))
    assert e.value.sw == 0x6A80
    assert locked.locked
    locked.validate(locked.derive_key("correct horse"))
    assert not locked.locked
    assert locked.calculate_code(cred, 59).value == totp(SECRET).at(59)

    locked.unset_key()
    again = OathSession(conn)
    assert not again.locked and not again.has_key
    assert not key.oath_has_password


def test_password_knob() -> None:
    key = EmulatedYubiKey(oath_password=PASSWORD)
    session = OathSession(EmulatedConnection(key))
    assert session.locked
    session.validate(session.derive_key(PASSWORD))
    assert session.list_credentials() == []


def test_reset_changes_device_id_and_clears_everything() -> None:
    key = EmulatedYubiKey(oath_password=PASSWORD, used_slots=3)
    session = OathSession(EmulatedConnection(key))
    old_id = session.device_id
    assert old_id == key.oath_device_id
    session.reset()  # allowed while locked
    assert session.device_id != old_id
    assert session.device_id == key.oath_device_id
    assert not session.locked and not session.has_key
    assert session.list_credentials() == []
    fresh = OathSession(EmulatedConnection(key))
    assert (fresh.device_id, fresh.locked) == (session.device_id, False)


@pytest.mark.parametrize(("firmware", "capacity"), [((5, 4, 3), 32), ((5, 7, 0), 64)])
def test_full_applet_answers_6a84(firmware: tuple[int, int, int], capacity: int) -> None:
    key = EmulatedYubiKey(firmware=firmware, used_slots=capacity - 1)
    session = OathSession(EmulatedConnection(key))
    session.put_credential(cred_data("last"))
    assert len(session.list_credentials()) == capacity == key.oath_capacity
    with pytest.raises(ApduError) as e:
        session.put_credential(cred_data("one-too-many"))
    assert e.value.sw == 0x6A84
    session.put_credential(cred_data("last"))  # overwriting needs no new slot


def test_used_slots_beyond_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        EmulatedYubiKey(used_slots=33)


def test_touch_credential(key: EmulatedYubiKey, session: OathSession) -> None:
    touch_cred = session.put_credential(cred_data("touchy"), touch_required=True)
    plain = session.put_credential(cred_data("plain"))
    t = 1_700_000_000
    entries = session.calculate_all(t)
    by_id = {c.id: (c.touch_required, code) for c, code in entries.items()}
    assert by_id[b"AWS:touchy"] == (True, None)
    assert by_id[b"AWS:plain"][0] is False
    assert by_id[b"AWS:plain"][1].value == totp(SECRET).at(t)  # type: ignore[union-attr]
    assert key.touch_requests == 0

    assert session.calculate_code(touch_cred, t).value == totp(SECRET).at(t)
    assert key.touch_requests == 1
    key.user_touches = False
    with pytest.raises(ApduError) as e:
        session.calculate_code(touch_cred, t)
    assert e.value.sw == 0x6982  # what ykman reports as "Touch account timed out!"
    assert key.touch_requests == 2
    assert session.calculate_code(plain, t).value == totp(SECRET).at(t)
    assert [c.touch for c in key.credentials()] == [True, False]


def _many_credentials(key: EmulatedYubiKey, session: OathSession, n: int) -> list[bytes]:
    names = [f"user-{i:02d}-" + "x" * 40 for i in range(n)]
    for name in names:
        session.put_credential(cred_data(name))
    return [f"AWS:{name}".encode() for name in names]


def test_many_credentials_use_send_remaining_over_usb() -> None:
    key = EmulatedYubiKey(firmware=(5, 7, 0))
    session = OathSession(EmulatedConnection(key))
    ids = _many_credentials(key, session, 60)
    start = len(key.history)
    assert [c.id for c in session.list_credentials()] == ids
    listing = key.history[start:]
    # LIST goes header-only (no Le): answered 256 bytes at a time with 61xx + A5.
    assert listing[0].ins == 0xA1 and listing[0].sw == 0x6100
    assert [r.ins for r in listing[1:]] == [0xA5] * (len(listing) - 1)
    assert listing[-1].sw == 0x9000 and len(listing) > 5

    t = 1_700_000_000
    codes = session.calculate_all(t)
    assert sorted(c.id for c in codes) == sorted(ids)
    assert {code.value for code in codes.values()} == {totp(SECRET).at(t)}  # type: ignore[union-attr]


def test_nfc_short_apdus_chain_commands_and_responses() -> None:
    key = EmulatedYubiKey(firmware=(5, 7, 0))
    session = OathSession(EmulatedConnection(key, TRANSPORT.NFC))
    ids = _many_credentials(key, session, 30)
    start = len(key.history)
    codes = session.calculate_all(1_700_000_000)
    assert sorted(c.id for c in codes) == sorted(ids)
    calc_all = key.history[start:]
    assert (calc_all[0].ins, calc_all[0].p1, calc_all[0].sw >> 8) == (0xA4, 0x00, 0x61)  # type: ignore[operator]
    assert {r.ins for r in calc_all[1:]} == {0xA5}

    # The largest valid PUT (64-byte id, 128-byte SHA512 block) still fits one short
    # APDU (Lc 199, 4 + 1 + 199 bytes); an oversize id does not and is chained.
    long_secret = bytes(range(128))
    start = len(key.history)
    cred = session.put_credential(
        cred_data("n" * 59, issuer="Bank", secret=long_secret, algorithm=HASH_ALGORITHM.SHA512)
    )
    assert [(r.cla, r.length, r.sw) for r in key.history[start:]] == [(0x00, 204, 0x9000)]
    expected = totp(long_secret, algorithm=HASH_ALGORITHM.SHA512).at(1234567890)
    assert session.calculate_code(cred, 1234567890).value == expected

    start = len(key.history)
    with pytest.raises(ApduError) as e:
        session.put_credential(cred_data("n" * 250))
    assert e.value.sw == 0x6A80  # ids are at most 64 bytes
    assert [(r.cla, r.ins, r.sw) for r in key.history[start:]] == [
        (0x10, 0x01, 0x9000),
        (0x00, 0x01, 0x6A80),
    ]


def test_usb_sends_extended_apdus(key: EmulatedYubiKey, session: OathSession) -> None:
    long_secret = bytes(range(128))
    start = len(key.history)
    cred = session.put_credential(
        cred_data("n" * 59, issuer="Bank", secret=long_secret, algorithm=HASH_ALGORITHM.SHA512)
    )
    # 00 01 00 00 | 00 00 C7 | 199 data bytes
    assert [(r.cla, r.length, r.sw) for r in key.history[start:]] == [(0x00, 4 + 3 + 199, 0x9000)]
    expected = totp(long_secret, algorithm=HASH_ALGORITHM.SHA512).at(59)
    assert session.calculate_code(cred, 59).value == expected

    start = len(key.history)
    with pytest.raises(ApduError) as e:
        session.put_credential(cred_data("n" * 250))
    assert e.value.sw == 0x6A80
    [put] = key.history[start:]
    # header, 00 Lc_hi Lc_lo, 71 81 FE "AWS:nnn..." (254), 73 1A 21 06 + 24-byte seed
    assert (put.cla, put.length) == (0x00, 4 + 3 + 3 + 254 + 2 + 2 + len(SECRET))


@pytest.mark.parametrize(("p2", "code_tag"), [(0x01, 0x76), (0x00, 0x75)])
def test_calculate_all_answers_in_the_layout_yubikit_parses(
    conn: EmulatedConnection, session: OathSession, p2: int, code_tag: int
) -> None:
    """Per credential a name TLV, then: a code (0x76 truncated / 0x75 full: digits byte,
    then the value) for TOTP, 0x7C + digits for touch, 0x77 + digits for HOTP."""
    session.put_credential(cred_data("plain", digits=8))
    session.put_credential(cred_data("touchy", digits=7), touch_required=True)
    session.put_credential(cred_data("counter", oath_type=OATH_TYPE.HOTP))
    t = 1_700_000_000
    challenge = (t // 30).to_bytes(8, "big")
    apdu = bytes([0x00, 0xA4, 0x00, p2, 10, 0x74, 8]) + challenge + b"\x00"
    data, sw = conn.send_and_receive(apdu)
    assert sw == 0x9000
    entries = [(tlv.tag, tlv.value) for tlv in Tlv.parse_list(data)]
    assert [tag for tag, _ in entries] == [0x71, code_tag, 0x71, 0x7C, 0x71, 0x77]
    assert [value for tag, value in entries if tag == 0x71] == [
        b"AWS:plain",
        b"AWS:touchy",
        b"AWS:counter",
    ]
    code = entries[1][1]
    assert code[0] == 8
    digest = code[1:]
    if code_tag == 0x75:  # the whole HMAC: the host truncates
        assert len(digest) == 20
        offset = digest[-1] & 0x0F
        digest = digest[offset : offset + 4]
    assert len(digest) == 4
    value = int.from_bytes(digest, "big") & 0x7FFFFFFF
    assert f"{value % 10**8:08d}" == totp(SECRET, digits=8).at(t)
    assert entries[3][1] == bytes([7])
    assert entries[5][1] == bytes([6])
