"""Who holds the desk's state, and who owns each enrollment recorded in it.

One daemon per state: the daemon holds an exclusive lock on ``daemon.lock`` in the state
directory while it runs (the file names its pid), so a second one refuses to start.

Every process that records an enrollment (the daemon, a one-shot ``provisioner enroll``,
a recovery taking a record over) owns it: it holds an exclusive lock on a file of its
own, ``owners/<token>``, for as long as it runs, and the record names the token.
Recovery settles a record only when that lock is free. The kernel drops a lock when its
process ends, however it ends, so neither a reused pid nor a reboot can make a dead owner
look alive or a live one dead; and nothing here reads /proc, which the daemon's sandbox
hides (ProtectProc=invisible).

Files made here are 0640, directories 0750. As root, a new state directory goes to the
service's user and a new file to the owner of its directory, so that the daemon can use
what a one-shot command run by root created.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import secrets
import time
from pathlib import Path
from types import TracebackType

from provisioner.core.errors import ConfigError, StateInUse

#: The system user the unit runs as (install creates it; state belongs to it).
SERVICE_USER = "provisioner"
LOCK_FILE = "daemon.lock"
OWNERS = "owners"
DIRECTORY_MODE = 0o750
FILE_MODE = 0o640
_TOKEN = re.compile(r"[0-9a-f]{32}")
_PID = re.compile(r"[0-9]{1,10}")


def prepare_directory(path: Path, service_user: str | None = SERVICE_USER) -> None:
    """The state directory, made if it is missing (0750); as root, given to
    ``service_user`` when that user exists."""
    if not _make_directory(path) or os.geteuid() != 0 or not service_user:
        return
    try:
        user = pwd.getpwnam(service_user)
    except KeyError:
        return  # not installed (a desk tried by hand): root keeps it
    os.chown(path, user.pw_uid, user.pw_gid)


def private_file(path: Path) -> None:
    """Create ``path`` (empty) unless it exists: 0640 whatever the umask, and as root
    owned as its directory is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return
    try:
        _make_private(fd, path.parent)
    finally:
        os.close(fd)


def _make_directory(path: Path) -> bool:
    """Make ``path`` (0750); False if it was there already."""
    try:
        path.mkdir(mode=DIRECTORY_MODE, parents=True)
    except FileExistsError:
        return False
    path.chmod(DIRECTORY_MODE)  # the umask may have taken more than "other"
    return True


def _make_private(fd: int, directory: Path) -> None:
    os.fchmod(fd, FILE_MODE)
    if os.geteuid() == 0:
        st = directory.stat()
        os.fchown(fd, st.st_uid, st.st_gid)


class DaemonLock:
    """The running daemon's hold on its state directory."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> DaemonLock:
        """Hold the state, or raise StateInUse naming the daemon that does."""
        path = state_dir / LOCK_FILE
        try:
            prepare_directory(state_dir)
            private_file(path)
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(
                f"cannot use the desk's state in {state_dir}: {e.strerror}",
                hint="check daemon.state_directory and who runs the daemon",
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StateInUse(
                f"another desk daemon{holder} holds the desk's state in {state_dir}",
                hint="stop that one first (systemctl stop provisioner), or give this one "
                "its own daemon.state_directory",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _holder(fd: int) -> str:
    """ " (pid N)" from the lock file; the holder writes it just after locking."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if _PID.fullmatch(text):
            return f" (pid {text})"
        time.sleep(0.05)
    return ""


class Owner:
    """This process, as the owner of the enrollments it records."""

    def __init__(self, token: str, path: Path, fd: int) -> None:
        self.token = token
        self.pid = os.getpid()
        self.path = path
        self._fd = fd

    def __repr__(self) -> str:
        return f"Owner(pid={self.pid}, token={self.token!r})"

    @classmethod
    def claim(cls, state_dir: Path) -> Owner:
        directory = state_dir / OWNERS
        if _make_directory(directory) and os.geteuid() == 0:
            st = state_dir.stat()
            os.chown(directory, st.st_uid, st.st_gid)
        token = secrets.token_hex(16)
        path = directory / token
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
        )
        try:
            # Nobody looks at the file before a record names it: the lock is free.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _make_private(fd, directory)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(token, path, fd)

    def release(self) -> None:
        """Ended: whatever this process recorded and did not finish is for recovery."""
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Owner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def alive(state_dir: Path, token: str) -> bool:
    """Whether the owner named ``token`` still runs (holds its lock). An owner whose file
    cannot be opened counts as running: what might be running is never settled."""
    if not _TOKEN.fullmatch(token):
        return False
    path = state_dir / OWNERS / token
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    # Free: its owner was killed (an owner that ends removes its file). Never held again.
    with contextlib.suppress(OSError):
        path.unlink()
    return False
