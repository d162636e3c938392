"""Emulated keys in the real PC/SC stack: pcscd + vpcd, seen by pyscard, yubikit, ykman.

Needs root and no other pcscd on the machine (the stack waits up to a minute for
another session's pcscd to exit). ykman runs as the unmodified CLI in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from smartcard.Exceptions import CardConnectionException, NoCardException
from smartcard.System import readers
from ykman.pcsc import list_devices
from yubikit.core.smartcard import SmartCardConnection
from yubikit.management import ManagementSession
from yubikit.oath import HASH_ALGORITHM, OATH_TYPE, CredentialData, OathSession

from emulated_yubikey import (
    DEFAULT_ATR,
    EmulatedYubiKey,
    PcscStack,
    PcscStackError,
    VpcdCard,
)
from emulated_yubikey.vpcd import REINSERT_GAP

pytestmark = [pytest.mark.pcsc, pytest.mark.slow]

READER_0 = "Yubico YubiKey OTP+FIDO+CCID 00 00"
READER_1 = "Yubico YubiKey OTP+FIDO+CCID 00 01"
YKMAN = str(Path(sys.executable).parent / "ykman")
SEED = b"pcsc-test-seed-01234567"
PASSWORD = "pcsc-test-password"  # noqa: S105  # a test value


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A private HOME so ykman's settings (remembered OATH keys) stay out of the user's."""
    return tmp_path


def ykman(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Not check=True: CalledProcessError would print the command line (secrets).
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(  # noqa: S603
        [YKMAN, *args], capture_output=True, text=True, timeout=60, env=env
    )


def yubikit_connection(reader: str) -> SmartCardConnection:
    """What the product does: ykman's PC/SC device for that reader, then a connection."""
    devices: list[Any] = list_devices()  # type: ignore[no-untyped-call]
    [device] = [d for d in devices if d.reader.name == reader]
    conn: SmartCardConnection = device.open_connection(SmartCardConnection)
    return conn


@pytest.fixture
def oath_seed_b32() -> Iterator[str]:
    yield pyotp.random_base32()


def test_reader_names_and_atr(stack: PcscStack) -> None:
    # the session's stack has three banks of two readers (enough for three desks)
    assert stack.reader_names[:2] == (READER_0, READER_1)
    assert stack.reader_names[2:] == (
        "Yubico YubiKey OTP+FIDO+CCID B 00 00",
        "Yubico YubiKey OTP+FIDO+CCID B 00 01",
        "Yubico YubiKey OTP+FIDO+CCID C 00 00",
        "Yubico YubiKey OTP+FIDO+CCID C 00 01",
    )
    assert sorted(str(r) for r in readers()) == sorted(stack.reader_names)
    for slot in (0, len(stack.reader_names) - 1):  # the first bank's driver and a copy
        stack.insert(EmulatedYubiKey(serial=10000001 + slot), slot)
        [reader] = [r for r in readers() if str(r) == stack.reader_names[slot]]
        conn = reader.createConnection()
        conn.connect()
        try:
            assert bytes(conn.getATR()) == DEFAULT_ATR
            data, sw1, sw2 = conn.transmit(list(bytes.fromhex("00a4040008a000000527471117")))
            assert (bytes(data), sw1, sw2) == (b"5.4.3", 0x90, 0x00)
        finally:
            conn.disconnect()
            conn.release()


def test_ykman_lists_two_keys(stack: PcscStack, home: Path) -> None:
    stack.insert(EmulatedYubiKey(serial=11111111), 0)
    stack.insert(EmulatedYubiKey(serial=22222222, firmware=(5, 7, 1)), 1)
    serials = ykman(home, "list", "--serials")
    assert serials.returncode == 0, serials.stderr
    assert sorted(serials.stdout.split()) == ["11111111", "22222222"]
    listed = ykman(home, "list")
    assert sorted(listed.stdout.splitlines()) == [
        "YubiKey 5 NFC (5.4.3) [OTP+FIDO+CCID] Serial: 11111111",
        "YubiKey 5 NFC (5.7.1) [OTP+FIDO+CCID] Serial: 22222222",
    ]
    info = ykman(home, "--reader", READER_1, "info")
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert "Serial number: 22222222" in lines
    assert "Firmware version: 5.7.1" in lines
    assert "Form factor: Keychain (USB-A)" in lines


def test_ykman_oath_add_then_code(stack: PcscStack, home: Path, oath_seed_b32: str) -> None:
    key = EmulatedYubiKey(serial=33333333)
    stack.insert(key)
    add = ykman(
        home,
        "--reader",
        READER_0,
        "oath",
        "accounts",
        "add",
        "-o",
        "TOTP",
        "Issuer:acct",
        oath_seed_b32,
    )
    assert add.returncode == 0, add.stderr
    assert [(c.id, c.oath_type.name, c.digits) for c in key.credentials()] == [
        ("Issuer:acct", "TOTP", 6)
    ]
    before = int(time.time())
    code = ykman(home, "--reader", READER_0, "oath", "accounts", "code")
    after = int(time.time())
    assert code.returncode == 0, code.stderr
    name, value = code.stdout.split()
    assert name == "Issuer:acct"
    expected = {pyotp.TOTP(oath_seed_b32).at(before), pyotp.TOTP(oath_seed_b32).at(after)}
    assert value in expected


def test_ykman_with_password_and_touch(stack: PcscStack, home: Path) -> None:
    key = EmulatedYubiKey(serial=33334444, oath_password=PASSWORD)
    stack.insert(key)
    session = OathSession(yubikit_connection(READER_0))
    session.validate(session.derive_key(PASSWORD))
    session.put_credential(
        CredentialData("touchy", OATH_TYPE.TOTP, HASH_ALGORITHM.SHA1, SEED, issuer="Iss"),
        touch_required=True,
    )
    session.protocol.close()

    listed = ykman(home, "--reader", READER_0, "oath", "accounts", "list", "-p", PASSWORD)
    assert (listed.returncode, listed.stdout) == (0, "Iss:touchy\n")
    wrong = ykman(home, "--reader", READER_0, "oath", "accounts", "list", "-p", "wrong")
    assert wrong.returncode != 0
    assert "Authentication to the YubiKey failed. Wrong password?" in wrong.stderr

    key.user_touches = False
    timed_out = ykman(home, "--reader", READER_0, "oath", "accounts", "code", "-p", PASSWORD)
    assert timed_out.returncode != 0
    assert "Touch account timed out!" in timed_out.stderr
    key.user_touches = True
    touched = ykman(home, "--reader", READER_0, "oath", "accounts", "code", "-p", PASSWORD)
    assert touched.returncode == 0, touched.stderr
    assert touched.stdout.split()[0] == "Iss:touchy"
    assert key.touch_requests == 2


def test_two_keys_in_both_readers_at_once(stack: PcscStack) -> None:
    keys = [EmulatedYubiKey(serial=44440000), EmulatedYubiKey(serial=44441111)]
    for slot, key in enumerate(keys):
        stack.insert(key, slot)
    conns = [yubikit_connection(READER_0), yubikit_connection(READER_1)]
    try:
        infos = [ManagementSession(c).read_device_info() for c in conns]
        assert [i.serial for i in infos] == [44440000, 44441111]
        sessions = [OathSession(c) for c in conns]
        for n, session in enumerate(sessions):
            session.put_credential(
                CredentialData(f"user{n}", OATH_TYPE.TOTP, HASH_ALGORITHM.SHA1, SEED)
            )
        assert [s.device_id for s in sessions] == [k.oath_device_id for k in keys]
        assert [[c.id for c in k.credentials()] for k in keys] == [["user0"], ["user1"]]
    finally:
        for c in conns:
            c.close()


def test_remove_is_seen_within_a_second(stack: PcscStack) -> None:
    stack.insert(EmulatedYubiKey(serial=55550000))
    [reader] = [r for r in readers() if str(r) == READER_0]
    conn = reader.createConnection()
    conn.connect()
    conn.disconnect()
    start = time.monotonic()
    stack.remove(0)
    gone_after = None
    while time.monotonic() - start < 2:
        probe = reader.createConnection()
        try:
            probe.connect()
            probe.disconnect()
        except NoCardException:
            gone_after = time.monotonic() - start
            break
        except CardConnectionException:
            pass  # "card is unpowered": pcscd has not polled the reader yet
        finally:
            probe.release()
        time.sleep(0.01)
    assert gone_after is not None and gone_after < 1.0
    assert stack.wait_for_card(0, present=False, timeout=1.0)


def test_vpcd_card_context_manager(stack: PcscStack) -> None:
    key = EmulatedYubiKey(serial=55551111)
    with VpcdCard(key, port=35964) as card:
        assert card.inserted
        assert stack.wait_for_card(1, present=True, timeout=2)
    assert not card.inserted and not key.present
    assert stack.wait_for_card(1, present=False, timeout=2)
    time.sleep(REINSERT_GAP)  # the stack did not see this card leave


def test_pull_mid_flow_over_pcsc(stack: PcscStack) -> None:
    key = EmulatedYubiKey(serial=66660000)
    stack.insert(key)
    conn = yubikit_connection(READER_0)
    session = OathSession(conn)
    session.put_credential(CredentialData("kept", OATH_TYPE.TOTP, HASH_ALGORITHM.SHA1, SEED))
    key.schedule_pull(at_command=key.commands_since_power_on + 1)
    with pytest.raises(CardConnectionException):
        session.list_credentials()
    with pytest.raises(CardConnectionException):
        session.list_credentials()
    try:
        conn.close()
    except CardConnectionException:
        pass  # disconnecting from a vanished card may fail too
    assert not key.present
    assert stack.wait_for_card(0, present=False, timeout=2)

    stack.insert(key)  # the same physical key comes back with its credentials
    again = OathSession(yubikit_connection(READER_0))
    assert [c.id for c in again.list_credentials()] == [b"kept"]
    again.protocol.close()


def test_latency_per_apdu(stack: PcscStack, record_property: Callable[[str, object], None]) -> None:
    key = EmulatedYubiKey(serial=77770000)
    stack.insert(key)
    conn = yubikit_connection(READER_0)
    try:
        session = OathSession(conn)
        cred = session.put_credential(
            CredentialData("fast", OATH_TYPE.TOTP, HASH_ALGORITHM.SHA1, SEED)
        )
        n = 100
        start = time.perf_counter()
        for i in range(n):
            session.calculate_code(cred, 1_700_000_000 + 30 * i)
        per_apdu = (time.perf_counter() - start) / n
    finally:
        conn.close()
    record_property("calculate_latency_ms", round(per_apdu * 1000, 3))
    # Without TCP_QUICKACK this is ~44 ms (Nagle + delayed ACK against vpcd's two writes).
    assert per_apdu < 0.005, f"{per_apdu * 1000:.2f} ms per CALCULATE"


def test_emulator_cli_serves_a_key(stack: PcscStack, home: Path) -> None:
    proc = subprocess.Popen(  # noqa: S603
        [
            sys.executable,
            "-m",
            "emulated_yubikey",
            "--port",
            "35964",
            "--serial",
            "88880000",
            "--firmware",
            "5.7.0",
            "--used-slots",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert stack.wait_for_card(1, present=True, timeout=10)
        info = ykman(home, "--reader", READER_1, "info")
        assert "Serial number: 88880000" in info.stdout.splitlines()
        assert "Firmware version: 5.7.0" in info.stdout.splitlines()
        accounts = ykman(home, "--reader", READER_1, "oath", "accounts", "list")
        assert accounts.stdout.splitlines() == ["Emulator:slot-01", "Emulator:slot-02"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    assert stack.wait_for_card(1, present=False, timeout=2)
    time.sleep(REINSERT_GAP)  # the stack did not see this card leave


def test_second_stack_is_refused_with_the_fix(stack: PcscStack) -> None:
    with pytest.raises(PcscStackError) as e:
        PcscStack().start()
    assert f"pid {stack.pid}" in str(e.value)
    assert "systemctl stop pcscd.socket pcscd.service" in str(e.value)
