"""provisioner.install into a scratch root: files, users, idempotence, the operator's config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from provisioner import install as installer
from provisioner.core.errors import ConfigError
from provisioner.install import install, reload_system, render_unit, uninstall

REPO = Path(__file__).resolve().parent.parent
COMMAND = "/opt/provisioner/bin/provisioner"
UNIT = Path("etc/systemd/system/provisioner.service")
RULE = Path("etc/udev/rules.d/70-provisioner.rules")
SYSUSERS = Path("usr/lib/sysusers.d/provisioner.conf")
CONFIG = Path("etc/provisioner/provisioner.toml")


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def exec_start(unit_text: str) -> list[str]:
    return [line for line in unit_text.splitlines() if line.startswith("ExecStart=")]


def test_install_puts_every_file_in_place(tmp_path: Path) -> None:
    lines = install(tmp_path, COMMAND)
    unit = (tmp_path / UNIT).read_text()
    assert exec_start(unit) == [
        f"ExecStart={COMMAND} daemon --config /etc/provisioner/provisioner.toml"
    ]
    # Everything else in the unit is the shipped one.
    shipped = (REPO / "systemd/provisioner.service").read_text()
    assert unit.replace(COMMAND, "/usr/local/bin/provisioner") == shipped
    assert (tmp_path / RULE).read_text() == (REPO / "udev/70-provisioner.rules").read_text()
    assert (tmp_path / SYSUSERS).read_text() == (REPO / "systemd/provisioner.sysusers").read_text()
    assert (tmp_path / CONFIG).read_text() == (REPO / "provisioner.toml.example").read_text()
    for relative in (UNIT, RULE, SYSUSERS, CONFIG):
        assert (tmp_path / relative).stat().st_mode & 0o777 == 0o644, relative
    assert f"wrote /{UNIT} (ExecStart={COMMAND})" in lines
    assert f"wrote /{RULE}" in lines
    assert any("not reloading" in line for line in lines)  # a scratch root: no reload


def test_install_creates_the_user_and_groups_with_sysusers(tmp_path: Path) -> None:
    assert shutil.which("systemd-sysusers"), "systemd-sysusers is part of Debian's systemd"
    lines = install(tmp_path, COMMAND)
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    assert set(groups) >= {"provisioner", "provisioner-operators"}
    user = passwd["provisioner"]
    assert user[3] == groups["provisioner"][2]  # primary group provisioner
    assert user[5] == "/var/lib/provisioner"
    assert user[6].endswith("nologin")
    assert any(line.startswith("created user 'provisioner'") for line in lines), lines


def test_a_second_install_changes_nothing(tmp_path: Path) -> None:
    install(tmp_path, COMMAND)
    before = snapshot(tmp_path)
    lines = install(tmp_path, COMMAND)
    assert snapshot(tmp_path) == before
    assert all(
        line.startswith(("unchanged ", "kept ", "user provisioner and groups", "not reloading"))
        for line in lines
    ), lines


def test_an_operators_configuration_is_never_overwritten(tmp_path: Path) -> None:
    config = tmp_path / CONFIG
    config.parent.mkdir(parents=True)
    config.write_text('desk = "front-desk-1"\n')
    config.chmod(0o600)
    lines = install(tmp_path, COMMAND)
    assert config.read_text() == 'desk = "front-desk-1"\n'
    assert config.stat().st_mode & 0o777 == 0o600
    assert any(line.startswith(f"kept /{CONFIG}") for line in lines)


def test_a_new_command_path_updates_the_unit_only(tmp_path: Path) -> None:
    install(tmp_path, COMMAND)
    lines = install(tmp_path, "/usr/local/bin/provisioner")
    assert exec_start((tmp_path / UNIT).read_text())[0].startswith(
        "ExecStart=/usr/local/bin/provisioner daemon"
    )
    assert lines[0].startswith(f"updated /{UNIT}")
    assert lines[1] == f"unchanged /{RULE}"


def test_paths_are_quoted_for_systemd() -> None:
    unit = render_unit("/opt/my tools/100%/provisioner")
    assert exec_start(unit) == [
        'ExecStart="/opt/my tools/100%%/provisioner" daemon --config /etc/provisioner/provisioner.toml'
    ]


@pytest.mark.parametrize("command", ["provisioner", "bin/provisioner"])
def test_the_command_must_be_absolute(tmp_path: Path, command: str) -> None:
    with pytest.raises(ConfigError, match="absolute"):
        install(tmp_path, command)
    assert not (tmp_path / UNIT).exists()


@pytest.mark.parametrize(
    "command", ["/root/.local/bin/provisioner", "/home/ann/venv/bin/provisioner"]
)
def test_a_command_in_a_home_directory_is_refused(tmp_path: Path, command: str) -> None:
    with pytest.raises(ConfigError, match="ProtectHome") as caught:
        install(tmp_path, command)
    assert caught.value.hint and "outside home directories" in caught.value.hint
    assert not (tmp_path / UNIT).exists()


def test_without_a_command_it_finds_its_own(tmp_path: Path) -> None:
    install(tmp_path)
    [line] = exec_start((tmp_path / UNIT).read_text())
    command = line.removeprefix("ExecStart=").split()[0]
    assert Path(command).name == "provisioner" and Path(command).is_absolute()
    assert os.access(command, os.X_OK)


def test_without_sysusers_an_image_is_told_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    lines = install(tmp_path / "root", COMMAND)
    assert any(line.startswith("skipped creating the users") for line in lines), lines
    assert not (tmp_path / "root/etc/passwd").exists()


def test_uninstall_removes_unit_and_rule_and_keeps_the_rest(tmp_path: Path) -> None:
    install(tmp_path, COMMAND)
    lines = uninstall(tmp_path)
    assert not (tmp_path / UNIT).exists() and not (tmp_path / RULE).exists()
    assert (tmp_path / CONFIG).exists() and (tmp_path / SYSUSERS).exists()
    assert (tmp_path / "etc/passwd").exists()
    assert lines[:2] == [f"removed /{UNIT}", f"removed /{RULE}"]
    assert uninstall(tmp_path)[:2] == [f"already absent /{UNIT}", f"already absent /{RULE}"]


# --- reloading systemd and udev on this machine, with stand-ins for the commands ------------


@pytest.fixture
def fake_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """systemctl and udevadm that log their arguments; the log is returned."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("systemctl", "udevadm"):
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\necho "{name} $*" >> {log}\n'
            f'if [ -e {tmp_path}/fail-{name} ]; then echo "{name}: it broke" >&2; exit 1; fi\n'
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(installer, "SYSTEMD_RUNNING", tmp_path / "run/systemd/system")
    monkeypatch.setattr(installer, "UDEV_CONTROL", tmp_path / "run/udev/control")
    return log


def test_reload_skips_what_is_not_running(fake_commands: Path) -> None:
    lines = reload_system()
    assert lines == [
        "skipped systemctl daemon-reload: systemd not running",
        "skipped udevadm control --reload: udevd not running",
    ]
    assert not fake_commands.exists()  # nothing was run


def test_reload_runs_both_when_they_run(fake_commands: Path, tmp_path: Path) -> None:
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    (tmp_path / "run/udev").mkdir(parents=True)
    (tmp_path / "run/udev/control").touch()
    lines = reload_system()
    assert fake_commands.read_text().splitlines() == [
        "systemctl daemon-reload",
        "udevadm control --reload",
        "udevadm trigger --action=change --subsystem-match=usb --attr-match=idVendor=1050",
    ]
    assert lines == [
        "systemctl daemon-reload",
        "udevadm control --reload",
        "udevadm trigger (YubiKeys already plugged in)",
    ]


def test_a_failing_reload_is_reported_not_raised(fake_commands: Path, tmp_path: Path) -> None:
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    (tmp_path / "fail-systemctl").touch()
    lines = reload_system()
    assert lines[0] == "systemctl daemon-reload failed (exit 1): systemctl: it broke"
    assert lines[1] == "skipped udevadm control --reload: udevd not running"


def installed_console_script() -> Path:
    """The `provisioner` command pip installed into the environment running the tests,
    wherever that environment is (it need not be REPO/.venv)."""
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "provisioner"]
    assert entry.value == "provisioner.cli.main:main"
    script = Path(sysconfig.get_path("scripts")) / entry.name
    assert script.is_file() and os.access(script, os.X_OK), f"pip install -e . makes {script}"
    return script


@pytest.mark.slow
def test_the_installed_unit_verifies_clean(tmp_path: Path) -> None:
    command = str(installed_console_script())
    install(tmp_path, command)
    assert exec_start((tmp_path / UNIT).read_text())[0].startswith(f"ExecStart={command} ")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
