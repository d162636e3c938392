"""The daemon's control socket: one JSON object per line, both ways.

A request is ``{"op": "enroll", "user": "alice"}``; the daemon answers with one or more
lines, the last of which has ``"final": true``. Who may ask is decided by the peer's
credentials (SO_PEERCRED), not by file modes: root, the daemon's own user, and members of
the operators' group; anyone else gets one clear refusal line and is disconnected.
Malformed input (not JSON, not an object, a line over the size limit) gets an error line
and the connection stays usable; the daemon never dies of a client.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ProvisionerError, exit_status

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
Message = dict[str, Any]


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a control connection, as the kernel says."""

    pid: int
    uid: int
    gid: int
    #: Primary and supplementary groups at connect time (SO_PEERGROUPS): no race with the
    #: PID, and no need to read /proc (which the unit hides with ProtectProc=invisible).
    groups: frozenset[int] = frozenset()

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


def peer_of(conn: socket.socket) -> Peer:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid, frozenset({gid, *_peer_groups(conn)}))


def _peer_groups(conn: socket.socket) -> tuple[int, ...]:
    size = 4 * 64
    while size <= 4 * 65536:
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                size *= 4
                continue
            log.warning("cannot read the peer's groups (SO_PEERGROUPS): %s", e)
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw)
    return ()


class Authorizer:
    """Root, the daemon's own user, and the operators' group may use the desk."""

    def __init__(self, operators_group: str) -> None:
        self.group_name = operators_group
        try:
            self.group_id: int | None = grp.getgrnam(operators_group).gr_gid
        except KeyError:
            self.group_id = None
            log.warning(
                "operators' group %s does not exist: only root and the service's user may "
                "use the desk (provisioner install creates it)",
                operators_group,
            )

    def refusal(self, peer: Peer) -> str | None:
        """None when allowed, else the sentence the client is told."""
        if peer.uid in (0, os.getuid()):
            return None
        if self.group_id is not None and self.group_id in peer.groups:
            return None
        return (
            f"not authorized: {peer.name} (uid {peer.uid}) is not root and not in the "
            f"operators' group {self.group_name}"
        )


Handler = Callable[[Message, Peer], Iterable[Message]]


class ControlServer:
    """Accepts connections on a Unix socket; one thread per client."""

    def __init__(self, path: Path, authorizer: Authorizer, handler: Handler) -> None:
        self.path = path
        self._authorizer = authorizer
        self._handler = handler
        self._stop = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        # Anyone may connect and be told whether they may use the desk (SO_PEERCRED).
        path.chmod(0o666)
        self._sock.listen(socket.SOMAXCONN)
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self.clients = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="control-client", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        self.clients += 1
        try:
            with conn:
                peer = peer_of(conn)
                refusal = self._authorizer.refusal(peer)
                if refusal is not None:
                    log.warning("refused a control connection: %s", refusal)
                    _send(conn, {"ok": False, "final": True, "error": refusal, "refused": True})
                    return
                for request in _lines(conn):
                    if isinstance(request, str):  # a framing or parsing error
                        _send(conn, {"ok": False, "final": True, "error": request})
                        continue
                    for answer in self._answers(request, peer):
                        _send(conn, answer)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("control client went away")
        except Exception:  # noqa: BLE001 - never let one client take the daemon down
            log.exception("control connection failed")
        finally:
            self.clients -= 1

    def _answers(self, request: Message, peer: Peer) -> Iterator[Message]:
        try:
            yield from self._handler(request, peer)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except ProvisionerError as e:
            # The operator's words (what, which step, why, what to do), not a class name.
            log.warning("control request %r failed: %s", request.get("op"), e.one_line())
            yield {"ok": False, "final": True, "error": e.one_line(), "exit": exit_status(e)}
        except Exception as e:  # noqa: BLE001
            log.exception("control request %r failed", request.get("op"))
            yield {"ok": False, "final": True, "error": f"internal error: {type(e).__name__}"}


def _send(conn: socket.socket, message: Message) -> None:
    conn.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def _lines(conn: socket.socket) -> Iterator[Message | str]:
    """Requests from the client: a dict, or a str saying what was wrong with a line."""
    buffer = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield _parse(line)
        if len(buffer) > MAX_LINE:
            yield f"request line longer than {MAX_LINE} bytes"
            # Skip to the end of this oversized line.
            while b"\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer = chunk[-MAX_LINE:] if b"\n" not in chunk else chunk
            buffer = buffer.split(b"\n", 1)[1]


def _parse(line: bytes) -> Message | str:
    if len(line) > MAX_LINE:
        return f"request line longer than {MAX_LINE} bytes"
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "request is not a JSON line"
    if not isinstance(value, dict):
        return "request must be a JSON object"
    if not isinstance(value.get("op"), str):
        return 'request needs an "op" string'
    return value


class ControlClient:
    """The CLI's side: send one request, read answers until the final one."""

    def __init__(self, path: Path, timeout: float | None = 5.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Blocking connect: with a timeout set, a full backlog fails at once (EAGAIN).
        self._sock.connect(str(path))
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rb")

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
        while True:
            line = self._file.readline()
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
    except OSError:
        return False
    return True


def daemon_reachable(path: Path) -> bool:
    """True when a daemon answers on ``path``."""
    return socket_answers(path)
