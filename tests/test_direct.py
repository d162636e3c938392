"""Work done in the command (one-shot, --direct or no daemon) and the desk's state: what
recovery, the orphan sweep and a second daemon may and may not do to it, and the audit
trail it leaves. Real processes (the daemon, `provisioner reconcile`, `provisioner
history`), real SQLite, the strict local IAM server; the one-shot enrollment runs in this
process with an emulated token (no pcscd), so that it can be parked at EnableMFADevice."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desk_harness import Daemon, arn, wait_for, write_config
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from local_iam_server import LocalIamServer
from provisioner.adapters.sqlite_store import Store
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.cli import direct
from provisioner.cli.main import main
from provisioner.config import Config, load
from provisioner.core.audit import FIELDS
from provisioner.core.errors import EnrollmentFailed, ProvisionerError
from provisioner.core.model import EnrollmentResult
from provisioner.desk import Desk

pytestmark = [pytest.mark.iam_server, pytest.mark.slow]

SERIAL = 26_000_001
ARN = arn("alice", SERIAL)
#: Long enough for `provisioner reconcile` or a daemon's start-up to run while the
#: enrollment waits; short enough for the codes it sent to still be accepted after it.
PARKED_SECONDS = 12.0


@pytest.fixture
def no_pcscd(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons started here find no pcscd: they must not touch the machine's readers."""
    monkeypatch.setenv("PCSCLITE_CSOCK_NAME", str(workdir / "no-pcscd.comm"))


class Bench:
    def __init__(self, iam: LocalIamServer, admin: Any, workdir: Path) -> None:
        self.iam = iam
        self.admin = admin
        self.workdir = workdir
        self.config_path = write_config(workdir)
        self.config: Config = load(self.config_path)
        self.key = EmulatedYubiKey(serial=SERIAL)

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    def desk(self) -> Desk:
        return Desk.from_config(self.config)

    @contextlib.contextmanager
    def token(self) -> Iterator[YubiKeyToken]:
        with YubiKeyToken(lambda: EmulatedConnection(self.key), "reader 0") as token:
            yield token

    @contextlib.contextmanager
    def find_token(self, serial: int) -> Iterator[YubiKeyToken | None]:
        if serial != SERIAL:
            yield None
            return
        with self.token() as token:
            yield token

    def daemon(self) -> Daemon:
        return Daemon(None, self.iam, self.admin, self.workdir, self.config_path)  # type: ignore[arg-type]

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.iam.aws_env())
        env["PROVISIONER_CONFIG"] = str(self.config_path)
        return subprocess.run(
            [sys.executable, "-m", "provisioner", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            **kw,
        )

    def devices_of(self, user: str) -> list[str]:
        return [d["SerialNumber"] for d in self.admin.list_mfa_devices(UserName=user)["MFADevices"]]

    def enroll_parked(self) -> tuple[threading.Thread, dict[str, Any]]:
        """`provisioner enroll --direct` for alice, as it runs in its own process, held
        at EnableMFADevice by the IAM server."""
        self.iam.inject_fault("EnableMFADevice", kind="delay", delay=PARKED_SECONDS)
        outcome: dict[str, Any] = {}
        desk = self.desk()

        def enroll() -> None:
            try:
                with direct.desk_state(self.config) as state, self.token() as token:
                    outcome["result"] = direct.enroll(state, desk, token, "alice")
            except ProvisionerError as e:
                outcome["error"] = e.one_line()

        thread = threading.Thread(target=enroll, name="enroll --direct")
        thread.start()
        wait_for(
            lambda: self.iam.call_counts().get("EnableMFADevice"),
            what="the enrollment to reach EnableMFADevice",
        )
        return thread, outcome


@pytest.fixture
def bench(local_iam: LocalIamServer, admin_iam: Any, workdir: Path) -> Bench:
    return Bench(local_iam, admin_iam, workdir)


def _enrolled(outcome: dict[str, Any]) -> EnrollmentResult:
    assert "error" not in outcome, outcome["error"]
    result = outcome["result"]
    assert isinstance(result, EnrollmentResult)
    return result


# --- issue 10.2: the sweep and recovery leave a running enrollment alone -----------------


def test_a_direct_enrollment_parked_at_enable_survives_reconcile(bench: Bench) -> None:
    Store(bench.state / "provisioner.db").close()  # the desk's daemon ran here once
    thread, outcome = bench.enroll_parked()
    run = bench.cli("reconcile")
    assert thread.is_alive(), "reconcile must have run while EnableMFADevice was parked"
    thread.join(PARKED_SECONDS * 5)
    assert run.returncode == 0, run.stderr
    assert _enrolled(outcome).device_arn == ARN
    assert bench.devices_of("alice") == [ARN]
    assert f"in progress in process {os.getpid()}; left alone" in run.stdout
    assert "deleted" not in run.stdout


def test_a_daemon_starting_while_a_direct_enrollment_is_parked_leaves_it_alone(
    bench: Bench, no_pcscd: None
) -> None:
    Store(bench.state / "provisioner.db").close()
    thread, outcome = bench.enroll_parked()
    daemon = bench.daemon()
    daemon.start()
    try:
        recovered = wait_for(
            lambda: [line for line in daemon.log if "provisioner.daemon: recovery" in line],
            what="the daemon's start-up recovery",
        )
        assert thread.is_alive(), "the daemon's recovery must have run while it was parked"
        thread.join(PARKED_SECONDS * 5)
        assert _enrolled(outcome).device_arn == ARN
        assert bench.devices_of("alice") == [ARN]
        assert "left alone" in recovered[0]
    finally:
        assert daemon.stop() == 0


# --- issue 10.1: one daemon per state -------------------------------------------------


def test_a_second_daemon_on_the_same_state_is_refused_and_the_first_keeps_serving(
    bench: Bench, no_pcscd: None
) -> None:
    first = bench.daemon()
    first.start()
    try:
        assert first.proc is not None
        second = subprocess.Popen(
            [sys.executable, "-m", "provisioner", "daemon"],
            env=first.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, err = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            pytest.fail("the second daemon did not refuse to start")
        lines = err.strip().splitlines()
        assert second.returncode == 2, err
        assert len(lines) == 1, err
        assert lines[0].startswith("provisioner: ")
        assert f"pid {first.proc.pid}" in lines[0] and str(bench.state) in lines[0]
        assert first.ask({"op": "status"})["ok"]
        assert first.socket_path.is_socket()
    finally:
        assert first.stop() == 0


# --- issue 10.10: state files are private from the first start -------------------------


def test_a_daemons_first_start_leaves_nothing_readable_by_others(
    bench: Bench, no_pcscd: None
) -> None:
    old = os.umask(0o022)  # a daemon started by hand, not under the unit's UMask=
    try:
        daemon = bench.daemon()
        daemon.start()
    finally:
        os.umask(old)
    try:
        daemon.ask({"op": "enroll", "user": "alice", "wait": False})  # a user in the WAL
        wait_for(lambda: (bench.state / "provisioner.db-wal").exists(), what="the WAL")
        assert bench.state.stat().st_mode & 0o777 == 0o750
        exposed = {
            str(p.relative_to(bench.state)): oct(p.stat().st_mode & 0o777)
            for p in bench.state.rglob("*")
            if p.stat().st_mode & 0o007
        }
        assert exposed == {}
    finally:
        assert daemon.stop() == 0


# --- issue 14: the one-shot command asks IAM while the token is opened --------------------


def test_a_user_checked_while_the_token_opened_leaves_create_and_enable(bench: Bench) -> None:
    desk = bench.desk()
    checked = direct.CheckedMeanwhile(desk, "alice")
    checked.leg.awaiting()  # type: ignore[misc]  # (the command opens the token meanwhile)
    before = bench.iam.call_counts()
    with direct.desk_state(bench.config) as state, bench.token() as token:
        result = direct.enroll(state, desk, token, "alice", checked=checked)
    after = bench.iam.call_counts()
    spent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert spent == {"CreateVirtualMFADevice": 1, "EnableMFADevice": 1}
    assert bench.devices_of("alice") == [result.device_arn]


def test_a_check_that_failed_meanwhile_is_made_again_and_named_at_the_check(bench: Bench) -> None:
    desk = bench.desk()
    checked = direct.CheckedMeanwhile(desk, "nobody")  # no such user
    with direct.desk_state(bench.config) as state, bench.token() as token:
        with pytest.raises(EnrollmentFailed) as failed:
            direct.enroll(state, desk, token, "nobody", checked=checked)
    assert failed.value.step == "check" and "nobody does not exist" in str(failed.value)
    assert bench.iam.unassigned_devices() == []


# --- issue 10.18: the trail is complete, and readable without the daemon ----------------


def test_direct_work_on_a_desk_whose_daemon_never_ran_is_in_its_trail(bench: Bench) -> None:
    assert not bench.state.exists()
    desk = bench.desk()
    with direct.desk_state(bench.config) as state:
        with bench.token() as token:
            direct.enroll(state, desk, token, "alice")
        with bench.token() as token:
            direct.resync(state, desk, token, "alice")
        direct.revoke(state, desk, "alice", None, bench.find_token)
    run = bench.cli("history", "--format", "json")
    assert run.returncode == 0, run.stderr
    records = json.loads(run.stdout)
    assert [(r["event"], r["user"], r["serial"], r["outcome"]) for r in records] == [
        ("enrollment", "alice", SERIAL, "enrolled"),
        ("resync", "alice", SERIAL, "resynced"),
        ("revoked", "alice", SERIAL, "revoked"),
    ]
    assert {r["actor"] for r in records} == {"root"}
    assert records[0]["device_arn"] == ARN
    assert bench.state.stat().st_mode & 0o777 == 0o750


def test_history_without_a_daemon_answers_as_the_daemon_does(bench: Bench, no_pcscd: None) -> None:
    desk = bench.desk()
    with direct.desk_state(bench.config) as state:
        with bench.token() as token:
            direct.enroll(state, desk, token, "alice")
        state.store.audit("root", "revoked", user="bob", serial=7, outcome="revoked")
    # Filters that leave out the daemon's own start and stop, which the second half adds.
    asks = [
        ("--user", "alice", "--format", "csv"),
        ("--user", "alice", "--format", "json"),
        ("--serial", "7"),
        ("--user", "alice", "--since", "1h", "--limit", "1", "--format", "csv"),
        ("--user", "carol"),
    ]
    without = [bench.cli("history", *ask) for ask in asks]
    daemon = bench.daemon()
    daemon.start()
    try:
        through = [bench.cli("history", *ask) for ask in asks]
    finally:
        assert daemon.stop() == 0
    for run in without + through:
        assert (run.returncode, run.stderr) == (0, "")
    assert [r.stdout for r in without] == [r.stdout for r in through]
    csv_lines = without[0].stdout.splitlines()
    assert csv_lines[0].startswith("at,actor,event,user,serial")
    assert [line.split(",")[1:4] for line in csv_lines[1:]] == [["root", "enrollment", "alice"]]
    assert [r["device_arn"] for r in json.loads(without[1].stdout)] == [ARN]
    assert "bob" in without[2].stdout and "alice" not in without[2].stdout
    assert len(without[3].stdout.splitlines()) == 2  # the header and one record
    assert without[4].stdout.splitlines()[0].split() == list(FIELDS)


def test_history_of_a_desk_with_no_trail_yet_is_empty_and_says_why(bench: Bench) -> None:
    run = bench.cli("history", "--format", "json")
    assert run.returncode == 0
    assert json.loads(run.stdout) == []
    assert run.stderr.strip() == f"provisioner: no audit trail at {bench.state}/provisioner.db yet"
    assert not bench.state.exists()  # reading never creates it


def _as_nobody(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """`provisioner ARGV` as nobody: forked from this process (whose Python nobody may
    not be able to start), then without root, through the CLI's own main()."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.close(out_r)
            os.close(err_r)
            sys.stdout = os.fdopen(out_w, "w")
            sys.stderr = os.fdopen(err_w, "w")
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.environ.update(env)
            code = main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
        stdout, stderr = out.read(), err.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stdout, stderr


def test_history_from_a_user_who_cannot_read_the_trail_is_one_line_and_exit_6(
    bench: Bench,
) -> None:
    with direct.desk_state(bench.config) as state:
        state.store.audit("root", "revoked", user="alice", outcome="revoked")
    code, out, err = _as_nobody(["history"], {"PROVISIONER_CONFIG": str(bench.config_path)})
    lines = err.strip().splitlines()
    assert code == 6, err
    assert len(lines) == 1 and out == ""
    assert lines[0].startswith(
        f"provisioner: cannot read the desk's audit trail at {bench.state}/provisioner.db: "
        "Permission denied"
    )


def test_a_member_of_the_trails_group_reads_it_without_the_daemon(bench: Bench) -> None:
    """Read-only (mode=ro) by someone who may not write the state directory: SQLite can
    make no -wal or -shm there, and the trail is read all the same, changing nothing."""
    with direct.desk_state(bench.config) as state:
        state.store.audit("root", "revoked", user="alice", outcome="revoked")
    for path in (bench.state, bench.state / "provisioner.db"):
        os.chown(path, -1, 65534)  # nobody's group: 0750 and 0640 let it read, not write
    before = sorted(p.name for p in bench.state.iterdir())
    code, out, err = _as_nobody(
        ["history", "--format", "json"], {"PROVISIONER_CONFIG": str(bench.config_path)}
    )
    assert (code, err) == (0, "")
    assert [(r["event"], r["user"]) for r in json.loads(out)] == [("revoked", "alice")]
    assert sorted(p.name for p in bench.state.iterdir()) == before
