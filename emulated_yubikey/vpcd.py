"""`VpcdCard`: put an EmulatedYubiKey into a vsmartcard vpcd reader of the real pcscd.

Why: with the reader named like a YubiKey's and the YubiKey ATR, the unmodified
`ykman` CLI, pyscard and yubikit's PC/SC path all see a YubiKey. Connecting to vpcd's
TCP port is inserting the card; closing the socket is pulling it.

Wire protocol (vpcd is the TCP server, we are the client): every message is a 2-byte
big-endian length then the payload. A 1-byte payload is control (0 power off,
1 power on, 2 reset, 4 "send your ATR"); a longer one is a command APDU, answered
with the response APDU.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from types import TracebackType

from .card import EmulatedYubiKey
from .errors import CardRemovedError, VpcdError

logger = logging.getLogger(__name__)

VPCD_HOST = "127.0.0.1"
VPCD_PORT = 35963  # reader "... 00 00"; 35964 is "... 00 01"

#: pcscd polls a vpcd reader for its card every 400 ms. A card pulled and put back
#: within one poll is never seen leaving; if a client noticed the pull meanwhile, the
#: reader then stays "empty" for good. So a re-insertion waits this long after a removal.
REINSERT_GAP = 0.5

CTRL_POWER_OFF = 0
CTRL_POWER_ON = 1
CTRL_RESET = 2
CTRL_ATR = 4


class _ReaderClosed(Exception):
    """pcscd (vpcd) closed the socket, or we did."""


class VpcdCard:
    """One emulated key in one vpcd reader slot, served by a daemon thread.

    Use as a context manager (insert on enter, remove on exit) or call insert() and
    remove(). Re-insertion after remove() (or after a pull fault) is allowed.
    """

    def __init__(
        self,
        key: EmulatedYubiKey,
        port: int = VPCD_PORT,
        host: str = VPCD_HOST,
        connect_timeout: float = 2.0,
    ) -> None:
        self.key = key
        self.port = port
        self.host = host
        self._connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._removed_at: float | None = None

    def __repr__(self) -> str:
        return f"VpcdCard(serial={self.key.serial}, port={self.port}, inserted={self.inserted})"

    @property
    def inserted(self) -> bool:
        """True while the card is in the reader (socket open and served)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def removed_at(self) -> float | None:
        """time.monotonic() of the last removal or pull, None if never removed."""
        return self._removed_at

    def insert(self, *, not_before: float | None = None) -> None:
        """Connect to vpcd: pcscd sees a card arrive within ~0.4 s.

        Waits until REINSERT_GAP after this card's last removal, and until `not_before`
        (a time.monotonic() value, e.g. from another card that left the same reader).
        """
        with self._lock:
            if self.inserted:
                return
            earliest = max(
                not_before or 0.0,
                (self._removed_at + REINSERT_GAP) if self._removed_at is not None else 0.0,
            )
            delay = earliest - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                sock = socket.create_connection(
                    (self.host, self.port), timeout=self._connect_timeout
                )
            except OSError as e:
                raise VpcdError(
                    f"no vpcd reader listens on {self.host}:{self.port} ({e.strerror or e}); "
                    "start pcscd with the vpcd driver first (PcscStack does)"
                ) from e
            sock.settimeout(None)
            # vpcd writes length and APDU separately: without these, Nagle plus delayed
            # ACK cost ~44 ms per APDU (TCP_QUICKACK must be re-armed before each recv).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._stopping = False
            self.key.insert()
            self._thread = threading.Thread(
                target=self._serve, args=(sock,), name=f"vpcd-card-{self.port}", daemon=True
            )
            self._thread.start()
            logger.info("emulated YubiKey %s inserted in vpcd port %d", self.key.serial, self.port)

    def remove(self, timeout: float = 5.0) -> None:
        """Close the socket: pcscd sees the card leave. The key keeps its state."""
        with self._lock:
            thread, sock = self._thread, self._sock
            self._stopping = True
            if sock is not None:
                _shutdown(sock)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
            self._thread = None
            self._sock = None
            if sock is not None:  # this card was in the reader: the key leaves it
                self._removed_at = time.monotonic()
                self.key.remove()

    def __enter__(self) -> VpcdCard:
        self.insert()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    # --- serving ----------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        reason = "removed"
        try:
            while True:
                msg = _recv_message(sock)
                if len(msg) == 1:
                    self._control(sock, msg[0])
                    continue
                try:
                    response = self.key.transmit(msg)
                except CardRemovedError:
                    reason = "pulled (fault injection)"
                    break
                _send_message(sock, response)
        except (_ReaderClosed, OSError):
            if not self._stopping:
                reason = "reader closed the connection (pcscd stopped?)"
        except CardRemovedError:
            reason = "key removed while in the reader"
        finally:
            _shutdown(sock)
            self._removed_at = time.monotonic()
            if not self._stopping:
                self.key.remove()
            logger.info(
                "emulated YubiKey %s left vpcd port %d: %s", self.key.serial, self.port, reason
            )

    def _control(self, sock: socket.socket, code: int) -> None:
        if code == CTRL_POWER_OFF:
            self.key.power_off()
        elif code == CTRL_POWER_ON:
            self.key.power_on()
        elif code == CTRL_RESET:
            self.key.reset()
        elif code == CTRL_ATR:
            _send_message(sock, self.key.atr)
        else:
            logger.warning("unknown vpcd control code %d ignored", code)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _ReaderClosed
        buf += chunk
    return buf


def _recv_message(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">H", _recv_exact(sock, 2))
    return _recv_exact(sock, length)


def _send_message(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">H", len(payload)) + payload)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer
    sock.close()
