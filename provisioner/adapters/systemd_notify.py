"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

A few lines of socket code instead of a dependency: one datagram per message to
$NOTIFY_SOCKET (a path, or an abstract name starting with @). Without $NOTIFY_SOCKET
(run by hand, in tests that do not listen) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger("provisioner.notify")  # the journal's name for it, kept across moves


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half the watchdog timeout), or None.
        self.watchdog_interval: float | None = int(usec) / 2e6 if wanted else None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        if self._sock is None or self._address is None:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with self._lock:
            try:
                self._sock.sendto(message, self._address)
            except OSError as e:  # systemd gone or socket full: never fatal
                log.debug("notify failed: %s", e)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def status(self, text: str) -> None:
        self.send(status=text)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def stopping(self, status: str = "stopping") -> None:
        self.send(stopping=1, status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
