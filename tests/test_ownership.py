"""Who holds the desk's state and who owns an enrollment: real processes, real locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provisioner.adapters.ownership import DaemonLock, Owner, alive, prepare_directory
from provisioner.core.errors import StateInUse, exit_status

HOLD_OWNER = (
    "import sys; from pathlib import Path; from provisioner.adapters.ownership import Owner; "
    "o = Owner.claim(Path(sys.argv[1])); print(o.token, flush=True); sys.stdin.read()"
)
HOLD_LOCK = (
    "import sys; from pathlib import Path; from provisioner.adapters.ownership import DaemonLock; "
    "lock = DaemonLock.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"
)


@contextmanager
def holder(code: str, state: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A process running ``code`` on ``state``, and the first line it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def test_an_owner_is_alive_while_its_process_runs_and_dead_once_it_is_killed(
    tmp_path: Path,
) -> None:
    with holder(HOLD_OWNER, tmp_path) as (proc, token):
        assert token
        assert alive(tmp_path, token)
        proc.send_signal(signal.SIGKILL)  # no clean-up at all: the kernel drops the lock
        proc.wait(10)
        assert not alive(tmp_path, token)


def test_an_owner_that_ends_cleanly_is_dead_and_leaves_no_file(tmp_path: Path) -> None:
    with Owner.claim(tmp_path) as owner:
        assert owner.pid == os.getpid()
        assert alive(tmp_path, owner.token)
    assert not alive(tmp_path, owner.token)
    assert list((tmp_path / "owners").iterdir()) == []


def test_a_live_pid_does_not_make_a_dead_owner_alive(tmp_path: Path) -> None:
    """What a record names is its owner's lock, not its pid: this test's own pid is alive,
    and a reused pid would be too, but the owner that wrote the record is gone."""
    with holder(HOLD_OWNER, tmp_path) as (proc, token):
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert not alive(tmp_path, token)
    with Owner.claim(tmp_path) as mine:
        assert alive(tmp_path, mine.token)  # this process's own: alive


def test_a_token_that_is_not_one_is_never_a_path(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    assert not alive(tmp_path, "../secret")
    assert not alive(tmp_path, "")


def test_a_second_daemon_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with holder(HOLD_LOCK, tmp_path) as (proc, line):
        assert line == "held"
        with pytest.raises(StateInUse) as info:
            DaemonLock.acquire(tmp_path)
        message = info.value.one_line()
        assert f"pid {proc.pid}" in message and str(tmp_path) in message
        assert "\n" not in message
        assert exit_status(info.value) == 2
    DaemonLock.acquire(tmp_path).release()  # the holder is gone: free again


def test_a_new_state_directory_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        prepare_directory(tmp_path / "state", service_user=None)
    finally:
        os.umask(old)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o750


def test_root_gives_a_new_state_directory_and_its_files_to_the_service_user(
    tmp_path: Path,
) -> None:
    """As the suite runs (root, as CI does): what root creates, the daemon can use."""
    import pwd

    from provisioner.adapters.sqlite_store import Store

    nobody = pwd.getpwnam("nobody")
    state = tmp_path / "state"
    prepare_directory(state, service_user="nobody")
    store = Store(state / "provisioner.db")
    try:
        store.audit("root", "revoked", user="alice")
        with Owner.claim(state) as owner:
            files = [*state.iterdir(), *(state / "owners").iterdir()]
            assert {p.name for p in files} >= {
                "provisioner.db",
                "provisioner.db-wal",
                "provisioner.db-shm",
                "owners",
                owner.token,
            }
            for path in [state, *files]:
                st = path.stat()
                assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    finally:
        store.close()
