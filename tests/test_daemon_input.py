"""The desk daemon as a real process meeting bad input: a roster it cannot read at start
or on SIGHUP, and an IAM it cannot reach when asked to reconcile.

No token is involved, so these run without pcscd: PCSCLITE_CSOCK_NAME points the daemon's
libpcsclite at a socket nobody serves (the daemon reports pcscd down and keeps serving
its control socket), and they never meet the machine's one pcscd and its readers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from desk_harness import NotifyListener, make_workdir, run_cli, wait_for, write_config
from local_iam_server import LocalIamServer
from provisioner.adapters.control_socket import ControlClient

pytestmark = [pytest.mark.iam_server, pytest.mark.slow]

ROSTER = "serial,user\n40000001,carol\n40000002,dave\n"


class DeskProcess:
    """``provisioner daemon`` with its stderr kept, systemd's notify socket bound here."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env | {"PCSCLITE_CSOCK_NAME": str(workdir / "no-pcscd")}
        self.log: list[str] = []
        self.notify = NotifyListener(workdir / "notify.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "provisioner", "daemon"],
            env=self.env | {"NOTIFY_SOCKET": str(self.notify.path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def wait_ready(self) -> None:
        wait_for(lambda: self.notify.seen("READY", "1") or self.proc.poll() is not None)
        assert self.proc.poll() is None, "\n".join(self.log)

    def exited(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._drain.join(5)
        return code

    def ask(self, request: dict[str, object]) -> dict[str, object]:
        with ControlClient(self.workdir / "run" / "control.sock") as client:
            return client.call(request)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.notify.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(iam: LocalIamServer, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NOTIFY_"))}
    return env | iam.aws_env() | {"PROVISIONER_CONFIG": str(config)}


@pytest.fixture
def desks(workdir: Path) -> Iterator[list[DeskProcess]]:
    started: list[DeskProcess] = []
    yield started
    for desk in started:
        desk.close()


def test_a_bad_roster_at_start_is_exit_2_naming_its_line_and_nothing_is_started(
    local_iam: LocalIamServer, workdir: Path, desks: list[DeskProcess]
) -> None:
    config = write_config(workdir, roster="serial,user\n40000001,carol\n²,dave\n")
    desk = DeskProcess(workdir, _env(local_iam, config))
    desks.append(desk)
    assert desk.exited() == 2, "\n".join(desk.log)
    assert desk.log == [
        f"provisioner: {workdir / 'roster.csv'}:3: '²' is not a token serial number"
        " (1 to 4294967295, digits 0-9 only)"
    ]
    # refused before anything was set up: no socket, no state
    assert not (workdir / "run" / "control.sock").exists()
    assert not (workdir / "state").exists()
    assert not desk.notify.seen("READY")


def test_a_bad_roster_on_sighup_is_refused_logged_with_its_line_and_the_old_one_kept(
    local_iam: LocalIamServer, workdir: Path, desks: list[DeskProcess]
) -> None:
    config = write_config(workdir, roster=ROSTER)
    desk = DeskProcess(workdir, _env(local_iam, config))
    desks.append(desk)
    desk.wait_ready()
    roster = workdir / "roster.csv"
    for bad, where in (
        ("serial,user\n40000001,carol\n40000002,dave\n²,erin\n", ":4: '²'"),
        ("serial,user\n40000001,carol\n40000002," + "x" * 200_000 + "\n", ":3: "),
    ):
        roster.write_text(bad)
        desk.proc.send_signal(signal.SIGHUP)
        line = wait_for(
            lambda: [x for x in desk.log if "roster not reloaded" in x],  # noqa: B023
            what="the refusal in the log",
        )[-1]
        assert f"{roster}{where}" in line and "keeping the old one" in line
        assert desk.proc.poll() is None, "\n".join(desk.log)
        daemon = desk.ask({"op": "status"})["daemon"]
        assert isinstance(daemon, dict) and daemon["roster"] == 2
        desk.log.clear()
    assert not [x for x in desk.log if "Traceback" in x]
    # a good roster is taken again afterwards
    roster.write_text(ROSTER + "40000003,erin\n")
    desk.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "roster reloaded" in "\n".join(desk.log), what="the reload")
    daemon = desk.ask({"op": "status"})["daemon"]
    assert isinstance(daemon, dict) and daemon["roster"] == 3


def _unreachable_endpoint() -> str:
    """A local port nothing listens on: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_reconcile_with_iam_unreachable_names_the_step_and_the_cause(
    local_iam: LocalIamServer, workdir: Path, desks: list[DeskProcess]
) -> None:
    endpoint = _unreachable_endpoint()
    config = write_config(workdir, extra=f'[iam]\nendpoint_url = "{endpoint}"\nmax_attempts = 1\n')
    desk = DeskProcess(workdir, _env(local_iam, config))
    desks.append(desk)
    desk.wait_ready()
    through_daemon = desk.cli("reconcile")
    desk.close()
    directly = desk.cli("reconcile")
    for run in (through_daemon, directly):
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 4, run.stderr
        assert len(lines) == 1, run.stderr
        assert "internal error" not in lines[0]
        assert lines[0].startswith("provisioner: reconcile failed at step 'sweep orphaned devices'")
        assert "cannot reach IAM to ListVirtualMFADevices" in lines[0] and endpoint in lines[0]
        assert "check the network path to IAM" in lines[0]
