"""udev/70-provisioner.rules against YubiKeys emulated by umockdev, through `udevadm test`.

Each check runs `umockdev-run -d <devices> -- udevadm test --action=A SYSPATH` inside a
private mount namespace (`unshare -m`) with tmpfs on /dev, /run and /tmp, so that udevadm's
writes (its database, /dev/char links) and umockdev's testbed land nowhere real, the rule is read from
/run/udev/rules.d, and /etc/group is a copy that has a `provisioner` group (udev resolves
GROUP= when it reads the rules). "Isolated" runs also hide the system's own rules, so that
whatever tag or property shows up comes from our file; the other runs keep them, to see
the outcome on a real Debian rule set (50-udev-default sets MODE 0664 first).

`udevadm test` exits 0 even when the rules have syntax errors: the checks read its output.
Needs root (for unshare), umockdev and udev.
"""

from __future__ import annotations

import grp
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RULE = REPO / "udev" / "70-provisioner.rules"
DATA = Path(__file__).resolve().parent / "data"
RULE_NAME = "70-provisioner.rules"
HUB = "/sys/devices/pci0000:00/0000:00:14.0/usb1"
YUBIKEY5 = f"{HUB}/1-1"
SECURITY_KEY = f"{HUB}/1-2"
KEYBOARD = f"{HUB}/1-3"
DEVICES = ("usb-root-hub", "yubikey5", "security-key", "keyboard")
SYSTEM_RULE_DIRS = ("/etc/udev/rules.d", "/usr/lib/udev/rules.d", "/usr/local/lib/udev/rules.d")

# $1 rules file, $2 group file, $3 "isolated" or "system", $4 data dir, $5 action,
# $6 syspath, then the -d options for umockdev-run.
SCRIPT = r"""
set -eu
rule=$1 group=$2 mode=$3 data=$4 action=$5 syspath=$6
shift 6
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev
if [ "$mode" = isolated ]; then
  for d in $SYSTEM_RULE_DIRS; do
    if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; fi
  done
fi
mount --bind "$group" /etc/group
mkdir -p /run/udev/rules.d
cp "$rule" /run/udev/rules.d/70-provisioner.rules
# Into the data directory first: it may itself live under /tmp (a checkout there).
cd "$data"
mount -t tmpfs tmpfs /tmp  # umockdev's testbed: gone with the namespace, whatever happens
exec umockdev-run "$@" -- udevadm test --action="$action" "$syspath"
"""


@dataclass(frozen=True)
class UdevRun:
    output: str
    #: The device's properties after the rules (the KEY=VALUE block at the end).
    properties: dict[str, str]
    #: What our file did, as udevadm logs it: "GROUP 64123", "MODE 0660", ...
    applied: list[str]
    #: Lines where udevadm complains about our file.
    complaints: list[str]


def free_gid() -> int:
    gid = 64123
    while True:
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
        gid += 1


@pytest.fixture(scope="module")
def gid() -> int:
    return free_gid()


@pytest.fixture(scope="module")
def group_file(tmp_path_factory: pytest.TempPathFactory, gid: int) -> Path:
    path = tmp_path_factory.mktemp("etc") / "group"
    text = Path("/etc/group").read_text()
    path.write_text(text + ("" if text.endswith("\n") else "\n") + f"provisioner:x:{gid}:\n")
    return path


def udevadm_test(
    rule: Path, group_file: Path, syspath: str, *, action: str = "add", isolated: bool = True
) -> UdevRun:
    for tool in ("unshare", "umockdev-run", "udevadm"):
        assert shutil.which(tool), f"{tool} is missing (Debian packages util-linux, umockdev, udev)"
    args = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        SCRIPT,
        "udev-test",
        str(rule),
        str(group_file),
        "isolated" if isolated else "system",
        str(DATA),
        action,
        syspath,
    ]
    for name in DEVICES:
        args += ["-d", f"{name}.umockdev"]
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SYSTEM_RULE_DIRS": " ".join(SYSTEM_RULE_DIRS),
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"udevadm test failed ({result.returncode}):\n{output}"
    assert "This program is for debugging only" in output, f"udevadm test did not run:\n{output}"
    properties: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper() and " " not in key:
            properties[key] = value
    ours = [line for line in output.splitlines() if RULE_NAME in line]
    applied = [
        line.split(f"{RULE_NAME}:", 1)[1].split(" ", 1)[1]
        for line in ours
        if line.split(":", 1)[0] == Path(syspath).name
    ]
    complaints = [
        line
        for line in ours
        if any(
            word in line.lower() for word in ("invalid", "unknown", "ignoring", "error", "failed")
        )
    ]
    return UdevRun(output, properties, applied, complaints)


def test_the_checker_sees_syntax_errors(tmp_path: Path, group_file: Path) -> None:
    # udevadm exits 0 on these: a check that only looked at the exit status would pass.
    bad = tmp_path / RULE_NAME
    bad.write_text(
        RULE.read_text()
        .replace('GROUP="provisioner"', 'GRUP="provisioner"')
        .replace('ATTR{idVendor}!="1050"', 'ATTR{idVendor}=!"1050"')
    )
    run = udevadm_test(bad, group_file, YUBIKEY5)
    assert any("Invalid key 'GRUP'" in line for line in run.complaints), run.output
    assert any("Invalid key/value pair" in line for line in run.complaints), run.output


def test_a_yubikey_is_given_to_the_group_and_wants_the_service(group_file: Path, gid: int) -> None:
    run = udevadm_test(RULE, group_file, YUBIKEY5)
    assert run.complaints == [], run.output
    assert f"GROUP {gid}" in run.applied, run.output
    assert "MODE 0660" in run.applied, run.output
    # The system's rules are hidden: the tag and the wants are ours.
    assert "systemd" in run.properties.get("TAGS", "").split(":"), run.output
    assert run.properties.get("SYSTEMD_WANTS", "").split() == ["provisioner.service"], run.output


def test_a_change_event_applies_the_rule_again(group_file: Path, gid: int) -> None:
    run = udevadm_test(RULE, group_file, YUBIKEY5, action="change")
    assert run.complaints == [], run.output
    assert f"GROUP {gid}" in run.applied and "MODE 0660" in run.applied, run.output
    assert "provisioner.service" in run.properties.get("SYSTEMD_WANTS", ""), run.output


def test_a_fido_only_key_is_matched_too(group_file: Path, gid: int) -> None:
    # The rule matches the vendor; telling the operator a Security Key cannot hold a TOTP
    # credential is the daemon's job, and it must be started to do it.
    run = udevadm_test(RULE, group_file, SECURITY_KEY)
    assert f"GROUP {gid}" in run.applied, run.output
    assert "provisioner.service" in run.properties.get("SYSTEMD_WANTS", ""), run.output


def test_remove_events_are_skipped(group_file: Path) -> None:
    run = udevadm_test(RULE, group_file, YUBIKEY5, action="remove")
    assert run.complaints == [], run.output
    assert run.applied == [], run.output
    assert "SYSTEMD_WANTS" not in run.properties, run.output
    assert "systemd" not in run.properties.get("TAGS", "").split(":"), run.output


def test_other_vendors_are_not_matched(group_file: Path) -> None:
    run = udevadm_test(RULE, group_file, KEYBOARD)
    assert run.complaints == [], run.output
    assert run.properties.get("PRODUCT", "").startswith("4d9/"), run.output  # it ran on it
    assert run.applied == [], run.output
    assert "SYSTEMD_WANTS" not in run.properties, run.output


def test_the_yubikeys_interfaces_are_not_matched(group_file: Path) -> None:
    # Only the usb_device gets the group and starts the service, not each interface.
    run = udevadm_test(RULE, group_file, f"{YUBIKEY5}/1-1:1.2")
    assert run.properties.get("DEVTYPE") == "usb_interface", run.output
    assert run.applied == [], run.output
    assert "SYSTEMD_WANTS" not in run.properties, run.output


def test_with_the_systems_rules_ours_decide_group_and_mode(group_file: Path, gid: int) -> None:
    run = udevadm_test(RULE, group_file, YUBIKEY5, isolated=False)
    assert run.complaints == [], run.output
    modes = [
        line.split()[-1] for line in run.output.splitlines() if line.split()[-2:-1] == ["MODE"]
    ]
    assert modes and modes[-1] == "0660", run.output  # after 50-udev-default's 0664
    assert f"GROUP {gid}" in run.applied, run.output
    assert "provisioner.service" in run.properties.get("SYSTEMD_WANTS", "").split(), run.output
    assert "systemd" in run.properties.get("TAGS", "").split(":"), run.output
