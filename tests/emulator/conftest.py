"""Fixtures for the emulated YubiKey tests.

In-process fixtures are cheap and per test. The PC/SC stack (the real pcscd with the
vpcd readers) is one per session, as only one pcscd can run per machine; `stack`
empties both readers after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from yubikit.oath import OathSession

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey, PcscStack


@pytest.fixture
def key() -> EmulatedYubiKey:
    return EmulatedYubiKey(serial=12345678)


@pytest.fixture
def conn(key: EmulatedYubiKey) -> EmulatedConnection:
    return EmulatedConnection(key)


@pytest.fixture
def session(conn: EmulatedConnection) -> OathSession:
    return OathSession(conn)


@pytest.fixture
def stack(pcsc_stack: PcscStack) -> Iterator[PcscStack]:
    yield pcsc_stack
    for slot in range(len(pcsc_stack.reader_names)):
        pcsc_stack.remove(slot, wait=True)
