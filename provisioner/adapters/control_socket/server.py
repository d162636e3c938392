"""The daemon's side: accept, authorize, serve each client on its own thread."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from provisioner.adapters.control_socket.peers import Authorizer, Peer, peer_of
from provisioner.adapters.control_socket.wire import (
    Idle,
    Message,
    Validator,
    lines,
    say,
    say_and_close,
    send,
)
from provisioner.core.errors import (
    ConfigError,
    ExitStatus,
    ProvisionerError,
)
from provisioner.core.messages import error_answer, refusal

log = logging.getLogger("provisioner.control")  # the journal's name for it, kept across moves

#: The defaults of daemon.max_clients and daemon.client_idle_timeout.
MAX_CLIENTS = 64
IDLE_TIMEOUT = 30.0
#: accept() failing this long makes the socket count as dead (see ControlServer.trouble).
DEAF_AFTER = 30.0
#: A flood (failing accept(), clients over the cap) is logged at most this often.
_LOG_EVERY = 10.0
_MAX_BACKOFF = 1.0
#: accept() errors about one connection, not the socket: go on to the next at once.
_ONE_CONNECTION = {errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EPERM}

#: Answers one request from one peer: the answers in order, the last one final.
Handler = Callable[[Message, Peer], Iterable[Message]]


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
        denied = self._authorizer.refusal(peer)
        if denied is not None:
            log.warning("refused a control connection: %s", denied)
            say_and_close(conn, refusal(denied, refused=True))
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
        say_and_close(
            conn,
            refusal(
                f"the desk daemon has too many clients ({self._max_clients}) at "
                "once: try again shortly",
                ExitStatus.FAILED,
            ),
        )

    def _leave(self) -> None:
        with self._lock:
            self._clients -= 1

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        with conn:
            try:
                for request in lines(conn, self._idle_timeout, self._validate):
                    # While answering, a client that reads nothing for this long is gone.
                    conn.settimeout(self._idle_timeout)
                    if isinstance(request, str):  # a framing, parsing or checking error
                        send(conn, refusal(request, ExitStatus.USAGE))
                        continue
                    for answer in self._answers(request, peer):
                        send(conn, answer)
            except Idle:
                log.debug("closing an idle control client (%s)", peer.name)
                say(
                    conn,
                    refusal(
                        f"idle for {self._idle_timeout:g} s without a request: closed",
                        ExitStatus.FAILED,
                    ),
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
