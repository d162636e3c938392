"""VpcdCard's wire protocol against a stand-in vpcd server (no pcscd needed)."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulated_yubikey import (
    DEFAULT_ATR,
    EmulatedYubiKey,
    PcscStack,
    PcscStackError,
    VpcdCard,
    VpcdError,
)


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A listening socket playing vpcd's side."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(5)
    yield srv
    srv.close()


def send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">H", len(payload)) + payload)


def recv(sock: socket.socket) -> bytes:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "emulator closed the connection"
            buf += chunk
        return buf

    (length,) = struct.unpack(">H", exact(2))
    return exact(length)


def test_vpcd_protocol(server: socket.socket) -> None:
    key = EmulatedYubiKey(serial=5555)
    card = VpcdCard(key, port=server.getsockname()[1])
    card.insert()
    peer, _ = server.accept()
    with peer:
        peer.settimeout(5)
        send(peer, b"\x04")  # "send your ATR"
        assert recv(peer) == DEFAULT_ATR
        send(peer, b"\x01")  # power on: no answer expected
        send(peer, bytes.fromhex("00a4040008a000000527471117"))
        assert recv(peer) == b"5.4.3\x90\x00"
        send(peer, bytes.fromhex("00a4040007a0000005272101"))
        assert recv(peer)[-2:] == b"\x90\x00"
        send(peer, b"\x00")  # power off forgets the selection
        send(peer, bytes.fromhex("00a1000000"))
        assert recv(peer) == b"\x6d\x00"
        assert card.inserted and key.present
    # vpcd (pcscd) closing the socket is the card leaving the reader
    deadline = time.monotonic() + 2
    while card.inserted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not card.inserted
    assert not key.present
    assert card.removed_at is not None


def test_pull_fault_closes_the_socket(server: socket.socket) -> None:
    key = EmulatedYubiKey(pull_at_command=2)
    with VpcdCard(key, port=server.getsockname()[1]) as card:
        peer, _ = server.accept()
        with peer:
            peer.settimeout(5)
            send(peer, bytes.fromhex("00a4040008a000000527471117"))
            assert recv(peer) == b"5.4.3\x90\x00"
            send(peer, bytes.fromhex("00a1000000"))
            assert peer.recv(2) == b""  # the card vanished instead of answering
        card._thread.join(2)  # type: ignore[union-attr]
        assert not card.inserted and not key.present


def test_remove_and_reinsert_waits_for_pcscd_to_notice(server: socket.socket) -> None:
    key = EmulatedYubiKey()
    card = VpcdCard(key, port=server.getsockname()[1])
    card.insert()
    server.accept()[0].close()
    card.remove()
    assert not card.inserted and not key.present
    start = time.monotonic()
    card.insert()
    assert time.monotonic() - start >= 0.4  # pcscd polls every 400 ms
    assert card.inserted and key.present
    card.remove()


def test_no_vpcd_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(VpcdError, match="start pcscd"):
        VpcdCard(EmulatedYubiKey(), port=port).insert()


def test_preflight_missing_pcscd() -> None:
    with pytest.raises(PcscStackError, match="install the Debian package `pcscd`"):
        PcscStack(pcscd="/nonexistent/pcscd").start()


def test_preflight_missing_vpcd_driver() -> None:
    with pytest.raises(PcscStackError, match="`vsmartcard-vpcd`"):
        PcscStack(driver=Path("/nonexistent/libifdvpcd.so")).start()


def test_preflight_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PcscStackError, match="needs root"):
        PcscStack().start()
