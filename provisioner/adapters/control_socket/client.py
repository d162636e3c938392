"""The CLI's side: connect, send one request, read the answers to the final one."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from provisioner.adapters.control_socket.wire import Message
from provisioner.core.errors import (
    DaemonUnresponsive,
)

log = logging.getLogger("provisioner.control")  # the journal's name for it, kept across moves

#: How long the CLI waits for a daemon to accept its connection.
CONNECT_TIMEOUT = 10.0


class ControlClient:
    """The CLI's side: send one request, read answers until the final one."""

    def __init__(
        self,
        path: Path,
        timeout: float | None = 5.0,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._connect(connect_timeout)
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rb")

    def _connect(self, limit: float) -> None:
        # A daemon that is not accepting (busy, EMFILE) fills its backlog; a blocking
        # connect would then wait for ever, a non-blocking one says EAGAIN at once.
        self._sock.setblocking(False)
        deadline = time.monotonic() + limit
        while True:
            try:
                self._sock.connect(str(self.path))
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise self._unresponsive(limit, "accepted no connection") from None
                time.sleep(0.02)

    def _unresponsive(
        self, seconds: float | None, what: str = "sent no answer"
    ) -> DaemonUnresponsive:
        return DaemonUnresponsive(
            f"the desk daemon did not answer on {self.path}: it {what} in {seconds:g} s"
        )

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, message: Message, *, timeout: float | None = 5.0) -> Iterator[Message]:
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except BrokenPipeError:
            pass  # refused before we spoke: the daemon's one line is still there to read
        except TimeoutError:
            raise self._unresponsive(timeout, "took no request") from None
        while True:
            try:
                line = self._file.readline()
            except TimeoutError:
                raise self._unresponsive(timeout) from None
            if not line:
                raise ConnectionError("the daemon closed the connection")
            answer: Message = json.loads(line)
            yield answer
            if answer.get("final"):
                return

    def call(self, message: Message, *, timeout: float | None = 5.0) -> Message:
        answers = list(self.request(message, timeout=timeout))
        return answers[-1]


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """True when something accepts a connection on the Unix socket ``path`` (a stale
    socket file accepts none)."""
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
    except BlockingIOError:
        return True  # its backlog is full: something listens there, too busy to accept
    except OSError:
        return False
    return True


def daemon_reachable(path: Path) -> bool:
    """True when a daemon answers on ``path``."""
    return socket_answers(path)
