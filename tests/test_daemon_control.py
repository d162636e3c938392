"""The daemon process and its control socket, without pcscd (libpcsclite is pointed at a
socket that does not exist, so the daemon never touches the machine's readers): a second
daemon on the same socket, a socket setting that names a file or a directory, and the
watchdog withheld while the control socket cannot accept connections."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desk_harness import Daemon, NotifyListener, make_workdir, wait_for
from local_iam_server import LocalIamServer

pytestmark = [pytest.mark.iam_server, pytest.mark.slow]


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = make_workdir()
    # The daemons started here must never open the machine's pcscd (other tests use it).
    monkeypatch.setenv("PCSCLITE_CSOCK_NAME", str(path / "no-pcscd-here"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(workdir: Path, name: str, socket_path: Path) -> Path:
    config = workdir / f"{name}.toml"
    config.write_text(
        f'desk = "test-desk"\n[daemon]\nstate_directory = "{workdir / name}"\n'
        f'socket = "{socket_path}"\noperators_group = "root"\nshutdown_timeout = 5\n'
    )
    return config


def _daemon(
    workdir: Path, local_iam: LocalIamServer, admin_iam: Any, name: str, sock: Path
) -> Daemon:
    return Daemon(None, local_iam, admin_iam, workdir, _config(workdir, name, sock))  # type: ignore[arg-type]


def _run_daemon(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PROVISIONER_CONFIG=str(config))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "provisioner", "daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_second_daemon_on_the_same_socket_is_refused_and_the_first_keeps_it(
    workdir: Path, local_iam: LocalIamServer, admin_iam: Any
) -> None:
    sock = workdir / "run" / "control.sock"
    first = _daemon(workdir, local_iam, admin_iam, "first", sock)
    first.start()
    assert first.proc is not None
    try:
        # Another configuration, another state directory, the same socket.
        second = subprocess.Popen(
            [sys.executable, "-m", "provisioner", "daemon"],
            env=first.env() | {"PROVISIONER_CONFIG": str(_config(workdir, "second", sock))},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            raise AssertionError("the second daemon took the socket and kept running") from None
        assert second.returncode == 2, err
        [line] = err.splitlines()
        assert f"pid {first.proc.pid}" in line and str(sock) in line
        assert first.ask({"op": "status"})["ok"] is True
    finally:
        assert first.stop() == 0
    assert not sock.exists()  # its own socket: removed on the way out


@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_socket_setting_that_names_something_else_is_exit_2(workdir: Path, what: str) -> None:
    target = workdir / "precious"
    if what == "file":
        target.write_text("the operator's notes\n")
    else:
        target.mkdir()
        (target / "inside").write_text("x")
    try:
        done = _run_daemon(_config(workdir, "state", target))
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon replaced the file with its socket") from None
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert (
        line.startswith("provisioner: ")
        and f"a {'regular file' if what == 'file' else what}" in line
    )
    assert "Traceback" not in done.stderr
    if what == "file":
        assert target.read_text() == "the operator's notes\n"
    else:
        assert (target / "inside").read_text() == "x"


def test_the_watchdog_is_not_fed_while_the_control_socket_cannot_accept(
    workdir: Path, local_iam: LocalIamServer, admin_iam: Any
) -> None:
    d = _daemon(workdir, local_iam, admin_iam, "state", workdir / "run" / "control.sock")
    d.start()  # WATCHDOG_USEC=1 s: a ping every 0.5 s
    assert d.proc is not None and d.notify is not None
    notify = d.notify
    pid = d.proc.pid
    try:
        after = _deaf_then_back(d, notify, pid)
        wait_for(
            lambda: any(m.get("WATCHDOG") == "1" for m in notify.messages[after:]),
            what="the watchdog fed again",
        )
        assert d.ask({"op": "status"})["ok"] is True
        assert any("cannot accept" in line and "Too many open files" in line for line in d.log)
        assert not any("Traceback" in line for line in d.log)
    finally:
        if d.proc.poll() is None:  # never leave a daemon behind, even when failing
            assert d.stop() == 0


def _deaf_then_back(d: Daemon, notify: NotifyListener, pid: int) -> int:
    """Starve the daemon of descriptors until it says its socket cannot accept; check that
    no ping follows; give them back. The index of the message that said it."""
    held: list[socket.socket] = []
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        wait_for(lambda: notify.seen("WATCHDOG", "1"), what="the watchdog fed")
        # Leave the daemon two spare descriptors: a few clients exhaust them (EMFILE).
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 2, before[1]))
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket_path))
            held.append(s)

        def deaf() -> list[int]:
            return [
                i
                for i, m in enumerate(list(notify.messages))
                if "cannot accept" in m.get("STATUS", "")
            ]

        [index, *_] = wait_for(deaf, what="STATUS saying the control socket cannot accept")
        time.sleep(2.0)  # four pings' worth: none may come while it stays deaf
        assert not [m for m in notify.messages[index:] if m.get("WATCHDOG") == "1"]
        return index
    finally:
        for s in held:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
