"""The daemon's control socket: one JSON object per line, both ways.

A request is ``{"op": "enroll", "user": "alice"}``; the daemon answers with one or more
lines, the last of which has ``"final": true``. Who may ask is decided by the peer's
credentials (SO_PEERCRED), not by file modes: root, the daemon's own user, and members of
the operators' group (``may_use_desk``); anyone else gets one clear refusal line and is
disconnected. Malformed input (not JSON, not an object, a line over the size limit, a
request its op does not take: the daemon's requests.py) gets an error line and the connection
stays usable; the daemon never dies of a client.

The socket never costs the desk more than it can give: at most ``max_clients`` are served
at once (one more hears "too many clients" and is closed), a client that sends no request
line for ``idle_timeout`` seconds is closed (one following an enrollment or watching is
being sent events, so it is not idle), and when accept() fails (EMFILE, ENFILE) the loop
logs it, backs off and keeps going. Only a stale socket at the path is replaced: a live
one (another daemon's) or anything that is not a socket is refused, and on the way out
the path is removed only if it is still the socket this server bound.
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
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner.core.errors import (
    ConfigError,
    DaemonUnresponsive,
    ExitStatus,
    InvalidInput,
    ProvisionerError,
)
from provisioner.core.messages import error_answer, refusal

log = logging.getLogger("provisioner.control")  # the journal's name for it, kept across moves

MAX_LINE = 64 * 1024
Message = dict[str, Any]
#: The defaults of daemon.max_clients and daemon.client_idle_timeout.
MAX_CLIENTS = 64
IDLE_TIMEOUT = 30.0
#: accept() failing this long makes the socket count as dead (see ControlServer.trouble).
DEAF_AFTER = 30.0
#: How long the CLI waits for a daemon to accept its connection.
CONNECT_TIMEOUT = 10.0
#: A flood (failing accept(), clients over the cap) is logged at most this often.
_LOG_EVERY = 10.0
_MAX_BACKOFF = 1.0
#: accept() errors about one connection, not the socket: go on to the next at once.
_ONE_CONNECTION = {errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EPERM}


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


def may_use_desk(
    uid: int,
    gid: int,
    groups: Collection[int],
    *,
    service_uid: int,
    operators_gid: int | None,
) -> bool:
    """The control socket's rule: root, the service's own user, and members of the
    operators' group (primary or supplementary); without that group, only the first two."""
    if uid in (0, service_uid):
        return True
    return operators_gid is not None and (gid == operators_gid or operators_gid in groups)


class Authorizer:
    """Root, the daemon's own user, and the operators' group may use the desk."""

    def __init__(self, operators_group: str, *, service_uid: int | None = None) -> None:
        self.group_name = operators_group
        #: The daemon's own user: this process's, unless a test says otherwise.
        self.service_uid = os.getuid() if service_uid is None else service_uid
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
        if may_use_desk(
            peer.uid,
            peer.gid,
            peer.groups,
            service_uid=self.service_uid,
            operators_gid=self.group_id,
        ):
            return None
        return (
            f"not authorized: {peer.name} (uid {peer.uid}) is not root and not in the "
            f"operators' group {self.group_name}"
        )


Handler = Callable[[Message, Peer], Iterable[Message]]
#: Checks a request off the wire (raises InvalidInput) before the handler sees it; the daemon
#: owns the table of ops, so the socket knows only JSON lines.
Validator = Callable[[dict[str, Any]], Message]


class ControlServer:
    """Accepts connections on a Unix socket; one thread per client, ``max_clients`` at most."""

    def __init__(
        self,
        path: Path,
        authorizer: Authorizer,
        handler: Handler,
        validate: Validator,
        *,
        max_clients: int = MAX_CLIENTS,
        idle_timeout: float = IDLE_TIMEOUT,
        deaf_after: float = DEAF_AFTER,
    ) -> None:
        self.path = path
        self._authorizer = authorizer
        self._handler = handler
        self._validate = validate
        self._max_clients = max_clients
        self._idle_timeout = idle_timeout
        self._deaf_after = deaf_after
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients = 0
        # accept() failing since (monotonic), how often, and why; None: it works.
        self._failing_since: float | None = None
        self._failures = 0
        self._failure = ""
        self._log_failure = _Every(_LOG_EVERY)
        self._log_full = _Every(_LOG_EVERY)
        self._sock, self._bound = _listen(path)
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)

    @property
    def clients(self) -> int:
        """Clients being served now."""
        return self._clients

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        # Removed while still listening, so that nobody takes it for stale meanwhile; and
        # only if it is still the socket this server bound (not one that replaced it).
        if self._owns_path():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread.ident is not None:
            self._thread.join(5)

    def trouble(self) -> str | None:
        """Why nobody can use the desk through this socket now, or None when it serves."""
        if not self._thread.is_alive():
            return "the control socket's accept thread is not running"
        if not self._owns_path():
            return f"the control socket {self.path} is gone or replaced: nobody reaches this daemon"
        since = self._failing_since
        if since is not None and time.monotonic() - since >= self._deaf_after:
            return f"the control socket cannot accept connections ({self._failure})"
        return None

    @property
    def alive(self) -> bool:
        return self.trouble() is None

    def _owns_path(self) -> bool:
        try:
            st = self.path.lstat()
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._bound

    def _accept(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                backoff = self._accept_failed(e, backoff)
                self._stop.wait(backoff)
                continue
            if self._failing_since is not None:
                log.warning(
                    "control socket accepting again after %d failed accept(s) in %.1f s",
                    self._failures,
                    time.monotonic() - self._failing_since,
                )
                self._failing_since = None
            backoff = 0.0
            try:
                self._admit(conn)
            except Exception:  # noqa: BLE001 - the accept loop must outlive any one client
                log.exception("control connection failed")
                conn.close()

    def _accept_failed(self, error: OSError, backoff: float) -> float:
        """Log (rarely) and say how long to wait before the next accept()."""
        if error.errno in _ONE_CONNECTION:
            return 0.0
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            self._failures = 0
        self._failures += 1
        self._failure = error.strerror or str(error)
        if self._log_failure():
            # EMFILE/ENFILE: descriptors free up as clients leave or time out.
            log.error(
                "control socket cannot accept connections: %s (%d time(s) in %.1f s); "
                "backing off and retrying",
                self._failure,
                self._failures,
                time.monotonic() - self._failing_since,
            )
        return min(max(2 * backoff, 0.01), _MAX_BACKOFF)

    def _admit(self, conn: socket.socket) -> None:
        """Refused peers and clients over the cap hear one line here and are closed, with
        no thread of their own; the others get a thread."""
        try:
            peer = peer_of(conn)
        except OSError as e:
            log.debug("control client gone before it was identified: %s", e)
            conn.close()
            return
        refusal = self._authorizer.refusal(peer)
        if refusal is not None:
            log.warning("refused a control connection: %s", refusal)
            _say_and_close(conn, {"ok": False, "final": True, "error": refusal, "refused": True})
            return
        with self._lock:
            room = self._clients < self._max_clients
            if room:
                self._clients += 1
        if room:
            try:
                threading.Thread(
                    target=self._serve, args=(conn, peer), name="control-client", daemon=True
                ).start()
                return
            except RuntimeError:  # no thread to be had: as good as full
                self._leave()
        if self._log_full():
            log.warning(
                "control socket: %d clients already (daemon.max_clients): refusing more",
                self._max_clients,
            )
        _say_and_close(
            conn,
            {
                "ok": False,
                "final": True,
                "exit": 1,
                "error": f"the desk daemon has too many clients ({self._max_clients}) at "
                "once: try again shortly",
            },
        )

    def _leave(self) -> None:
        with self._lock:
            self._clients -= 1

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        with conn:
            try:
                for request in _lines(conn, self._idle_timeout, self._validate):
                    # While answering, a client that reads nothing for this long is gone.
                    conn.settimeout(self._idle_timeout)
                    if isinstance(request, str):  # a framing, parsing or checking error
                        _send(conn, refusal(request, ExitStatus.USAGE))
                        continue
                    for answer in self._answers(request, peer):
                        _send(conn, answer)
            except _Idle:
                log.debug("closing an idle control client (%s)", peer.name)
                _say(
                    conn,
                    {
                        "ok": False,
                        "final": True,
                        "exit": 1,
                        "error": f"idle for {self._idle_timeout:g} s without a request: closed",
                    },
                )
            except TimeoutError:
                log.info("dropped a control client (%s) that read nothing", peer.name)
            except (BrokenPipeError, ConnectionResetError):
                log.debug("control client went away")
            except Exception:  # noqa: BLE001 - never let one client take the daemon down
                log.exception("control connection failed")
            finally:
                self._leave()

    def _answers(self, request: Message, peer: Peer) -> Iterator[Message]:
        try:
            yield from self._handler(request, peer)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise
        except ProvisionerError as e:
            # The operator's words (what, which step, why, what to do), not a class name.
            log.warning("control request %r failed: %s", request.get("op"), e.one_line())
            yield error_answer(e)
        except Exception as e:  # noqa: BLE001
            log.exception("control request %r failed", request.get("op"))
            yield refusal(f"internal error: {type(e).__name__}")


class _Idle(Exception):
    """The client sent no complete request line in time."""


class _Every:
    """True at most once every ``seconds``: a flood is logged, not copied to the journal."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._last: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._seconds:
            return False
        self._last = now
        return True


def _listen(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """A socket listening at ``path``, and the (device, inode) it has there.

    Only a stale socket (nobody listening: connect refused) is replaced; a live one, or
    anything that is not a socket, is a ConfigError (the daemon exits 2).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(path))
            bound = path.stat()
            # Anyone may connect and be told whether they may use the desk (SO_PEERCRED).
            path.chmod(0o666)
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        raise ConfigError(
            f"cannot listen on the control socket {path}: {e.strerror or e}",
            hint="check daemon.socket and its directory",
        ) from e
    return sock, (bound.st_dev, bound.st_ino)


_NOT_SOCKETS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a named pipe"),
)


def _clear_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        what = next((name for test, name in _NOT_SOCKETS if test(mode)), "a device")
        raise ConfigError(
            f"the control socket's path {path} is {what}, not a socket",
            hint="only a stale socket is replaced there: set daemon.socket to a free path",
        )
    peer = _live_peer(path)
    if peer is not None:
        raise ConfigError(
            f"the control socket {path} is served by another live process ({peer})",
            hint="another provisioner daemon uses this daemon.socket: stop it, or give each "
            "daemon its own socket",
        )
    path.unlink(missing_ok=True)


def _live_peer(path: Path) -> str | None:
    """Who serves the socket at ``path``, or None when it is stale."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except BlockingIOError:
            return "its queue of connections is full"
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return f"pid {pid}, uid {uid}"


def _say(conn: socket.socket, message: Message) -> None:
    """One line if it fits in the socket's buffer now; never blocks, never raises."""
    with contextlib.suppress(OSError):
        conn.send(_encode(message), socket.MSG_DONTWAIT)


def _say_and_close(conn: socket.socket, message: Message) -> None:
    with conn:
        _say(conn, message)


def _encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _send(conn: socket.socket, message: Message) -> None:
    conn.sendall(_encode(message))


def _lines(
    conn: socket.socket, idle_timeout: float, validate: Validator
) -> Iterator[Message | str]:
    """Requests from the client: a valid request, or a str saying what was wrong with a
    line. Each line must be complete within ``idle_timeout`` of connecting or of the last
    answer, else _Idle: a client trickling bytes is as idle as a silent one."""
    buffer = b""
    deadline = time.monotonic() + idle_timeout

    def recv() -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Idle
        conn.settimeout(remaining)
        try:
            return conn.recv(65536)
        except TimeoutError:
            raise _Idle from None

    while True:
        chunk = recv()
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield _parse(line, validate)
            deadline = time.monotonic() + idle_timeout
        if len(buffer) > MAX_LINE:
            yield f"request line longer than {MAX_LINE} bytes"
            deadline = time.monotonic() + idle_timeout
            # Skip to the end of this oversized line.
            while b"\n" not in buffer:
                chunk = recv()
                if not chunk:
                    return
                buffer = chunk[-MAX_LINE:] if b"\n" not in chunk else chunk
            buffer = buffer.split(b"\n", 1)[1]


def _parse(line: bytes, validate: Validator) -> Message | str:
    if len(line) > MAX_LINE:
        return f"request line longer than {MAX_LINE} bytes"
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "request is not a JSON line"
    if not isinstance(value, dict):
        return "request must be a JSON object"
    try:
        return validate(value)
    except InvalidInput as e:
        return e.one_line()


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
