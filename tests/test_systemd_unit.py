"""systemd/provisioner.service and provisioner.sysusers: what systemd-analyze says, and the
settings the daemon relies on.

`systemd-analyze verify` exits 0 on unknown keys and bad values (it only prints them), so the
check is "no output at all". verify also checks that ExecStart's binary exists: it runs on a
copy whose ExecStart is this checkout's console script.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "provisioner.service"
SYSUSERS = REPO / "systemd" / "provisioner.sysusers"
MAX_EXPOSURE = 2.0


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value, in order (keys like SystemCallFilter= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNIT_SETTINGS = parse_unit(UNIT.read_text())
SERVICE = UNIT_SETTINGS["Service"]


def one(key: str, section: str = "Service") -> str:
    values = UNIT_SETTINGS[section].get(key, [])
    assert len(values) == 1, f"{section}.{key}: {values}"
    return values[0]


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing (Debian package systemd)"
    return path


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart exists on this machine."""
    command = Path(sys.executable).parent / "provisioner"
    assert command.is_file(), f"{command} is missing: pip install -e . makes it"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={command}", UNIT.read_text(), flags=re.M)
    path = tmp_path / "provisioner.service"
    path.write_text(text)
    return path


def exposure(unit: Path, *extra: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    result = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", *extra, str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, f"no exposure level in:\n{result.stdout}{result.stderr}"
    return float(found[1]), result


# --- systemd-analyze --------------------------------------------------------------------------


def test_verify_prints_nothing(runnable_unit: Path) -> None:
    result = subprocess.run(
        [analyze(), "verify", str(runnable_unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_output_is_what_catches_mistakes(runnable_unit: Path) -> None:
    # The reason the check above looks at the output: here verify still exits 0.
    runnable_unit.write_text(runnable_unit.read_text().replace("WatchdogSec=30", "WatchdogSecs=30"))
    result = subprocess.run(
        [analyze(), "verify", str(runnable_unit)], capture_output=True, text=True, timeout=60
    )
    assert "WatchdogSecs" in result.stdout + result.stderr


def test_security_exposure_is_at_most_2(runnable_unit: Path) -> None:
    level, result = exposure(runnable_unit)
    assert level <= MAX_EXPOSURE, result.stdout
    _level, result = exposure(runnable_unit, f"--threshold={int(MAX_EXPOSURE * 10)}")
    assert result.returncode == 0, result.stdout


def test_the_exposure_check_tells_a_bare_unit_apart(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nType=notify\nExecStart={sys.executable}\n")
    level, _result = exposure(bare)
    assert level > MAX_EXPOSURE
    _level, result = exposure(bare, f"--threshold={int(MAX_EXPOSURE * 10)}")
    assert result.returncode != 0


# --- what the daemon and the lead's decisions need ------------------------------------------------


def test_notify_service_with_a_watchdog() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "on-failure"


def test_runs_the_daemon_with_the_system_config() -> None:
    assert one("ExecStart") == (
        "/usr/local/bin/provisioner daemon --config /etc/provisioner/provisioner.toml"
    )
    assert one("EnvironmentFile") == "-/etc/provisioner/environment"  # optional: "-"


def test_wants_and_follows_pcscd_and_the_network() -> None:
    unit = UNIT_SETTINGS["Unit"]
    for key in ("Wants", "After"):
        names = " ".join(unit[key]).split()
        assert "pcscd.socket" in names and "network-online.target" in names, key


def test_own_user_and_directories() -> None:
    assert (one("User"), one("Group")) == ("provisioner", "provisioner")
    assert one("RuntimeDirectory") == "provisioner"
    assert one("StateDirectory") == "provisioner"
    assert one("StateDirectoryMode") == "0750"
    # Operators (another group) must reach /run/provisioner/control.sock.
    assert int(SERVICE.get("RuntimeDirectoryMode", ["0755"])[0], 8) & 0o005 == 0o005


def test_enough_descriptors_for_the_control_sockets_clients() -> None:
    # Each control client holds one descriptor; the desk needs others (pcscd, IAM, SQLite,
    # netlink). The default soft limit (1024) ran out under 1100 idle clients.
    example = tomllib.loads((REPO / "provisioner.toml.example").read_text())
    soft = int(one("LimitNOFILE").split(":")[0])
    assert soft >= 4096
    assert soft >= 8 * example["daemon"]["max_clients"]


def test_no_core_dumps_and_logs_to_the_journal() -> None:
    assert one("LimitCORE") == "0"
    assert SERVICE.get("StandardError", ["journal"]) == ["journal"]


def test_stop_leaves_time_to_finish_or_roll_back() -> None:
    assert one("KillSignal") == "SIGTERM"
    example = tomllib.loads((REPO / "provisioner.toml.example").read_text())
    needed = example["daemon"]["shutdown_timeout"] + example["token"]["reinsert_timeout"]
    assert float(one("TimeoutStopSec")) > needed


def test_only_the_socket_families_it_needs() -> None:
    assert set(one("RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }


def test_sandbox_keeps_what_the_control_socket_needs() -> None:
    # PrivateUsers=yes would map every operator to "nobody" in SO_PEERCRED. Other users'
    # processes are hidden: the control socket reads groups from SO_PEERGROUPS instead.
    assert SERVICE.get("PrivateUsers", ["no"]) == ["no"]
    assert one("ProtectProc") == "invisible"
    assert one("ProtectSystem") == "strict"  # writes only to its State/RuntimeDirectory
    assert "ReadWritePaths" not in SERVICE


def test_sysusers_declares_the_user_and_both_groups() -> None:
    entries = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kinds = {(e[0], e[1]) for e in entries}
    assert ("u", "provisioner") in kinds  # "u" also makes the group provisioner
    assert ("g", "provisioner-operators") in kinds
    [user] = [line for line in SYSUSERS.read_text().splitlines() if line.startswith("u ")]
    assert user.endswith("/var/lib/provisioner")


# --- MemoryDenyWriteExecute=yes --------------------------------------------------------------------

# Under MemoryDenyWriteExecute=yes a mapping both writable and executable, or mprotect()
# adding PROT_EXEC, fails. ctypes and cffi *callbacks* need exactly that; calling C through
# ctypes (the daemon's prctl) or pyscard's SWIG module does not.
DAEMON_IMPORTS = """
import ctypes
ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
import provisioner.cli, provisioner.daemon, provisioner.adapters.usb, provisioner.adapters.yubikey
import provisioner.adapters.aws.iam, provisioner.install
import boto3, yubikit.oath
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
PBKDF2HMAC(hashes.SHA1(), 16, b"salt", 1000).derive(b"password")
boto3.client("iam", region_name="us-east-1", endpoint_url="http://127.0.0.1:9")
"""

CALLBACK = """
import ctypes
ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x)
"""


def write_execute_mappings(code: str, tmp_path: Path) -> list[str]:
    strace = shutil.which("strace")
    assert strace, "strace is missing (Debian package strace)"
    log = tmp_path / "trace"
    result = subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "-e",
            "trace=mmap,mprotect,pkey_mprotect",
            "-o",
            str(log),
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = []
    for line in log.read_text().splitlines():
        if "PROT_EXEC" not in line:
            continue
        if "mprotect(" in line or "PROT_WRITE" in line:
            found.append(line)
    return found


@pytest.mark.slow
def test_the_daemons_code_needs_no_writable_executable_memory(tmp_path: Path) -> None:
    assert SERVICE.get("MemoryDenyWriteExecute") == ["yes"]
    assert write_execute_mappings(DAEMON_IMPORTS, tmp_path) == []


@pytest.mark.slow
def test_the_write_execute_check_sees_a_ctypes_callback(tmp_path: Path) -> None:
    assert write_execute_mappings(CALLBACK, tmp_path) != []


def test_a_configuration_error_is_not_restarted_in_a_loop() -> None:
    # exit 2 is a bad configuration, roster or password file (provisioner daemon names the
    # file and line): restarting every RestartSec cannot fix it, only the operator can.
    assert one("RestartPreventExitStatus").split() == ["2"]
