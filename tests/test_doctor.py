"""`provisioner doctor` as an operator runs it: a process, against the real pcscd, the
local IAM server with IAM authorization enforced, and files installed under a root.
Each check is made to fail on its own; the others stay as they were."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from desk_harness import make_workdir
from emulated_yubikey import EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer
from provisioner import doctor
from provisioner.adapters.yubikey import Pcsc, ReaderState
from provisioner.config import Config, DaemonConfig
from provisioner.core.errors import ProvisionerError, UsbUnavailable
from provisioner.install import install

PROGRAM = "/opt/provisioner/bin/provisioner"
POLICY = json.loads((Path(__file__).parent.parent / "docs" / "iam-policy.json").read_text())


def policy_for(account: str, without: str | None = None) -> dict[str, Any]:
    text = json.dumps(POLICY).replace("ACCOUNT_ID", account)
    policy: dict[str, Any] = json.loads(text)
    if without is not None:
        for statement in policy["Statement"]:
            actions = statement["Action"]
            actions = [actions] if isinstance(actions, str) else actions
            statement["Action"] = [a for a in actions if a != without] or ["iam:GetUser"]
    return policy


@dataclass
class DoctorRun:
    code: int
    stdout: str
    stderr: str
    lines: dict[str, str] = field(default_factory=dict)

    def status(self, check: str) -> str:
        return self.lines[check].split()[0]


@dataclass
class Desk:
    """A desk's machine, as doctor sees it: a root with the unit and rule installed, a
    state directory, a config, AWS credentials of a principal holding the policy."""

    root: Path
    config: Path
    env: dict[str, str]

    def doctor(self, *args: str, **env: str) -> DoctorRun:
        done = subprocess.run(
            [sys.executable, "-m", "provisioner", "doctor", "--root", str(self.root), *args],
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        run = DoctorRun(done.returncode, done.stdout, done.stderr)
        for line in [] if "--json" in args else done.stdout.splitlines():
            status, rest = line.split(maxsplit=1)
            assert status in ("OK", "FAIL", "SKIP"), line
            run.lines[rest.split(":", 1)[0]] = line
        return run


@pytest.fixture
def desk(local_iam: LocalIamServer) -> Iterator[Desk]:
    workdir = make_workdir()
    root = workdir / "root"
    program = root / PROGRAM.lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    install(root, executable=PROGRAM, reload=False)
    config = workdir / "provisioner.toml"
    config.write_text(f'[daemon]\nstate_directory = "{workdir / "state"}"\n')
    principal = local_iam.create_principal("desk", policy_for("123456789012"))
    local_iam.set_auth_enforced(True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= local_iam.aws_env()
    env |= principal.credentials_env() | {"PROVISIONER_CONFIG": str(config)}
    yield Desk(root, config, env)
    local_iam.set_auth_enforced(False)
    shutil.rmtree(workdir, ignore_errors=True)


pytestmark = [pytest.mark.iam_server, pytest.mark.slow]


# --- the whole desk, through the real pcscd ------------------------------------------


@pytest.fixture
def plugged(pcsc_stack: PcscStack) -> Iterator[PcscStack]:
    pcsc_stack.insert(EmulatedYubiKey(serial=5150001), 0)
    yield pcsc_stack
    pcsc_stack.remove(0, wait=True)


@pytest.mark.pcsc
def test_a_healthy_desk_passes_every_check(desk: Desk, plugged: PcscStack) -> None:
    run = desk.doctor()
    assert run.code == 0, run.stdout + run.stderr
    assert set(run.lines) == {
        "pcscd", "readers", "cards", "libusb", "udev rule", "systemd unit",
        "state directory", "AWS credentials", "IAM permissions", "clock",
    }  # fmt: skip
    assert all(line.startswith("OK") for line in run.lines.values()), run.stdout
    assert "arn:aws:iam::123456789012:user/desk" in run.lines["AWS credentials"]
    as_json = json.loads(desk.doctor("--json").stdout)
    assert {f["status"] for f in as_json} == {"OK"}


@pytest.mark.pcsc
def test_a_card_held_by_another_program_fails_the_cards_check(
    desk: Desk, plugged: PcscStack
) -> None:
    with Pcsc() as pcsc, pcsc.connect(plugged.reader_names[0]):  # exclusive, like scdaemon
        run = desk.doctor()
    assert run.code == 1
    assert run.status("cards") == "FAIL"
    assert plugged.reader_names[0] in run.lines["cards"]
    assert "gpgconf --kill scdaemon" in run.lines["cards"]
    assert [c for c, line in run.lines.items() if line.startswith("FAIL")] == ["cards"]


@pytest.mark.pcsc
def test_pcscd_not_running_fails_and_skips_what_needs_it(desk: Desk, tmp_path: Path) -> None:
    run = desk.doctor(PCSCLITE_CSOCK_NAME=str(tmp_path / "nothing-here"))
    assert run.code == 1
    assert run.status("pcscd") == "FAIL" and "pcscd is not running" in run.lines["pcscd"]
    assert "systemctl enable --now pcscd.socket" in run.lines["pcscd"]
    assert run.status("readers") == "SKIP" and run.status("cards") == "SKIP"
    assert run.status("AWS credentials") == "OK"


def _hang_up_on_everyone(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.close()


@pytest.mark.pcsc
def test_pcscd_refusing_this_user_is_told_apart_from_pcscd_missing(
    desk: Desk, tmp_path: Path
) -> None:
    # pcscd with polkit accepts the connection, then hangs up on a user it refuses.
    path = tmp_path / "pcscd.comm"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        threading.Thread(target=_hang_up_on_everyone, args=(listener,), daemon=True).start()
        run = desk.doctor(PCSCLITE_CSOCK_NAME=str(path))
    assert run.status("pcscd") == "FAIL"
    assert "refuses this user" in run.lines["pcscd"] and "polkit" in run.lines["pcscd"]


# --- the installation and the state directory ----------------------------------------


def test_a_missing_udev_rule_fails_with_the_fix(desk: Desk) -> None:
    (desk.root / "etc/udev/rules.d/70-provisioner.rules").unlink()
    run = desk.doctor()
    assert run.code == 1
    assert run.status("udev rule") == "FAIL"
    assert "is missing; fix: provisioner install" in run.lines["udev rule"]
    assert run.status("systemd unit") == "OK"


def test_an_outdated_udev_rule_fails(desk: Desk) -> None:
    rule = desk.root / "etc/udev/rules.d/70-provisioner.rules"
    rule.write_text(rule.read_text().replace('MODE="0660"', 'MODE="0666"'))
    run = desk.doctor()
    assert run.status("udev rule") == "FAIL" and "differs" in run.lines["udev rule"]


def test_a_unit_running_a_program_that_is_gone_fails(desk: Desk) -> None:
    unit = desk.root / "etc/systemd/system/provisioner.service"
    unit.write_text(unit.read_text().replace(PROGRAM, "/opt/gone/bin/provisioner"))
    run = desk.doctor()
    assert run.status("systemd unit") == "FAIL"
    assert "/opt/gone/bin/provisioner, which does not exist" in run.lines["systemd unit"]
    unit.unlink()
    assert "is missing" in desk.doctor().lines["systemd unit"]


def test_a_state_directory_that_cannot_be_written_fails(desk: Desk, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    desk.config.write_text(f'[daemon]\nstate_directory = "{blocker / "state"}"\n')
    run = desk.doctor()
    assert run.code == 1
    assert run.status("state directory") == "FAIL"
    assert f"cannot write in {blocker / 'state'}" in run.lines["state directory"]
    assert "StateDirectory=" in run.lines["state directory"]


# --- AWS ------------------------------------------------------------------------------


def test_no_aws_credentials_fails_and_skips_the_aws_checks(desk: Desk, tmp_path: Path) -> None:
    env = {
        k: v for k, v in desk.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    env |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    run = Desk(desk.root, desk.config, env).doctor()
    assert run.code == 1
    assert run.status("AWS credentials") == "FAIL"
    assert run.status("IAM permissions") == "SKIP" and run.status("clock") == "SKIP"


def test_credentials_aws_does_not_know_fail(desk: Desk) -> None:
    run = desk.doctor(AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert run.code == 1
    assert run.status("AWS credentials") == "FAIL"


@pytest.mark.parametrize("action", ["iam:EnableMFADevice", "iam:ListVirtualMFADevices"])
def test_a_missing_permission_is_named(desk: Desk, local_iam: LocalIamServer, action: str) -> None:
    local_iam.set_auth_enforced(False)
    other = local_iam.create_principal("desk2", policy_for("123456789012", without=action))
    local_iam.set_auth_enforced(True)
    run = desk.doctor(**other.credentials_env())
    assert run.code == 1
    assert run.status("IAM permissions") == "FAIL"
    assert f"may not: {action};" in run.lines["IAM permissions"]
    assert "docs/iam-policy.json" in run.lines["IAM permissions"]


def test_a_desk_without_the_permission_to_check_its_permissions_is_told(
    desk: Desk, local_iam: LocalIamServer
) -> None:
    local_iam.set_auth_enforced(False)
    other = local_iam.create_principal(
        "desk3", policy_for("123456789012", without="iam:SimulatePrincipalPolicy")
    )
    local_iam.set_auth_enforced(True)
    run = desk.doctor(**other.credentials_env())
    assert run.status("IAM permissions") == "FAIL"
    assert "iam:SimulatePrincipalPolicy" in run.lines["IAM permissions"]


@pytest.mark.parametrize(("offset", "fails"), [(2.0, False), (-45.0, True), (400.0, True)])
def test_the_clock_is_compared_with_aws(
    desk: Desk, local_iam: LocalIamServer, offset: float, fails: bool
) -> None:
    local_iam.set_clock_offset(offset)
    run = desk.doctor()
    line = run.lines["clock"]
    assert run.status("clock") == ("FAIL" if fails else "OK"), line
    assert ("behind" if offset > 0 else "ahead of") in line
    assert ("AWS refuses requests" in line) == (offset >= 300)


# --- checks that the real system cannot be made to fail here ---------------------------


class NoReaders:
    def readers(self) -> list[ReaderState]:
        return []


def test_no_reader_at_all_fails_with_how_to_get_one() -> None:
    finding = doctor.check_readers(NoReaders())  # type: ignore[arg-type]
    assert finding.status is doctor.Status.FAIL
    assert "ykman config usb --enable CCID" in finding.fix


def test_libusb_missing_fails_with_the_package_to_install() -> None:
    def no_libusb() -> object:
        raise UsbUnavailable("libusb is not available to pyusb: install libusb-1.0-0")

    finding = doctor.check_libusb(no_libusb)
    assert finding.status is doctor.Status.FAIL
    assert "apt-get install libusb-1.0-0" in finding.line()


def test_the_process_scan_names_card_holders(tmp_path: Path) -> None:
    for pid, comm in (("12", "scdaemon"), ("40", "bash"), ("self", "x")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "comm").write_text(comm + "\n")
    assert doctor._running(("scdaemon",), proc=tmp_path) == ["scdaemon (pid 12)"]


def test_a_failing_check_never_stops_the_others(tmp_path: Path) -> None:
    def broken_iam() -> Any:
        raise ProvisionerError("no region")

    def no_pcscd() -> Pcsc:
        raise ProvisionerError("cannot reach pcscd")

    findings = doctor.run(
        Config(daemon=DaemonConfig(state_directory=str(tmp_path))),
        iam=broken_iam,
        open_pcsc=no_pcscd,
        list_usb=lambda: [],
        root=Path("/nonexistent-root"),
    )
    names = [f.check for f in findings]
    assert names[:3] == ["pcscd", "readers", "cards"] and "AWS credentials" in names


def test_a_state_directory_yet_to_be_made_is_not_made_by_doctor(tmp_path: Path) -> None:
    config = Config(daemon=DaemonConfig(state_directory=str(tmp_path / "later" / "state")))
    finding = doctor.check_state_directory(config)
    assert finding.status is doctor.Status.OK
    assert "does not exist yet" in finding.detail
    assert list(tmp_path.iterdir()) == []
