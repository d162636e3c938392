"""systemd's notify protocol over a real datagram socket, with the environment passed in."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.adapters.systemd_notify import Notifier


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A socket listening where $NOTIFY_SOCKET would point, as systemd's does."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield str(path), sock


def test_each_message_is_one_datagram(systemd: tuple[str, socket.socket]) -> None:
    path, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready("serving 2 readers")
    notifier.status("enrolling alice")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    assert [sock.recv(4096) for _ in range(4)] == [
        b"READY=1\nSTATUS=serving 2 readers",
        b"STATUS=enrolling alice",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=stopping",
    ]


def test_without_notify_socket_it_is_off() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("serving")  # a no-op: run by hand, nobody listens
    assert notifier.watchdog_interval is None


def test_watchdog_pings_at_half_the_timeout() -> None:
    # WATCHDOG_USEC=3000000: systemd kills after 3 s without a ping; ping every 1.5 s.
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5
    mine = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 1.5


@pytest.mark.parametrize(
    "environ",
    [
        {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"},  # meant for another process
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
    ],
)
def test_no_watchdog_unless_it_is_meant_for_this_process(environ: dict[str, str]) -> None:
    assert Notifier(environ).watchdog_interval is None
