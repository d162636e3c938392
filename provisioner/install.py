"""`provisioner install`: put the service, the udev rule and the users in place.

Writes, under ``root`` (``/`` for the machine itself, a directory for an image):
- etc/systemd/system/provisioner.service, with ExecStart pointing at this installation;
- etc/udev/rules.d/70-provisioner.rules (YubiKeys to the daemon's group; start the daemon);
- usr/lib/sysusers.d/provisioner.conf, then the user and groups it names;
- etc/provisioner/provisioner.toml from the reference example, only if there is none: an
  operator's configuration is never overwritten.
On the machine itself it then reloads systemd and udev, when they run. Every step says what
it did, in one line; running it twice changes nothing.

The shipped files are read from the package's data directory when installed from a wheel,
else from the checkout (systemd/, udev/, provisioner.toml.example).
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from provisioner.adapters.ownership import SERVICE_USER
from provisioner.core.errors import ConfigError, InstallError

CHECKOUT = Path(__file__).resolve().parent.parent

#: name in the package's data directory -> where it is in a checkout.
SHIPPED = {
    "provisioner.service": CHECKOUT / "systemd" / "provisioner.service",
    "70-provisioner.rules": CHECKOUT / "udev" / "70-provisioner.rules",
    "provisioner.sysusers": CHECKOUT / "systemd" / "provisioner.sysusers",
    "provisioner.toml.example": CHECKOUT / "provisioner.toml.example",
}

UNIT_PATH = Path("etc/systemd/system/provisioner.service")
RULE_PATH = Path("etc/udev/rules.d/70-provisioner.rules")
SYSUSERS_PATH = Path("usr/lib/sysusers.d/provisioner.conf")
CONFIG_PATH = Path("etc/provisioner/provisioner.toml")

GROUPS = ("provisioner", "provisioner-operators")
STATE_DIRECTORY = "/var/lib/provisioner"
#: ProtectHome=yes hides these from the service: its command cannot live there.
_HIDDEN_FROM_SERVICE = (Path("/home"), Path("/root"), Path("/run/user"))
_TIMEOUT = 60.0
#: What sd_booted() checks: systemd is the init system and running.
SYSTEMD_RUNNING = Path("/run/systemd/system")
#: udevd's control socket: udevd is running.
UDEV_CONTROL = Path("/run/udev/control")


def shipped_text(name: str) -> str:
    """A file shipped with provisioner: package data (wheel), else the checkout."""
    packaged = resources.files("provisioner").joinpath("data", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    path = SHIPPED[name]
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise InstallError(
            f"cannot read {name} (neither in the package's data nor at {path}): {e.strerror}",
            hint="reinstall provisioner, or run it from its checkout",
        ) from e


def current_executable() -> str:
    """The `provisioner` command being run, or the one beside this Python, or on PATH."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "provisioner" and argv0.is_file():
        return str(argv0.resolve())
    # `python -m provisioner` in a virtual environment: its console script is next to it
    # (sys.executable unresolved: the venv's python is a symlink out of the venv).
    beside = Path(sys.executable).parent / "provisioner"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.resolve())
    found = shutil.which("provisioner")
    if found:
        return str(Path(found).resolve())
    raise ConfigError(
        "cannot tell where the provisioner command is installed",
        hint="pass the path of the provisioner command to install (--executable)",
    )


def _unit_quote(path: str) -> str:
    """A path as one word of ExecStart= (systemd.service(5) quoting and specifiers)."""
    escaped = path.replace("%", "%%").replace("$", "$$")
    if re.search(r'[\s"\'\\]', escaped):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def render_unit(executable: str, template: str | None = None) -> str:
    """The unit with ExecStart= running ``executable`` (an absolute path)."""
    if not os.path.isabs(executable):
        raise ConfigError(f"the service's command must be an absolute path, not {executable!r}")
    text = shipped_text("provisioner.service") if template is None else template
    pattern = re.compile(r"^(ExecStart=)(\S+)(.*)$", re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise InstallError("the shipped unit does not have exactly one ExecStart= line")
    return pattern.sub(lambda m: m[1] + _unit_quote(executable) + m[3], text)


def _check_command(executable: str, root: Path) -> None:
    """The service must be able to run it: it exists (on this machine), outside homes."""
    path = Path(executable)
    if root == Path("/") and not (path.is_file() and os.access(path, os.X_OK)):
        raise ConfigError(f"the service's command {executable} is not an executable file")
    for hidden in _HIDDEN_FROM_SERVICE:
        if path == hidden or hidden in path.parents:
            raise ConfigError(
                f"{executable} is under {hidden}, which the service cannot see (ProtectHome=yes)",
                hint="install provisioner outside home directories, e.g. in /opt or /usr/local",
            )


def _write(root: Path, relative: Path, content: str, mode: int) -> str:
    """Write if different, atomically; one line saying what happened."""
    target = root / relative
    shown = "/" + str(relative)
    try:
        if target.is_file() and target.read_text(encoding="utf-8") == content:
            if (target.stat().st_mode & 0o7777) != mode:
                target.chmod(mode)
            return f"unchanged {shown}"
        existed = target.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
            os.chmod(temp, mode)
            os.replace(temp, target)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as e:
        raise InstallError(f"cannot write {target}: {e.strerror or e}") from e
    return f"{'updated' if existed else 'wrote'} {shown}"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)


def _failure(what: str, result: subprocess.CompletedProcess[str]) -> str:
    detail = (result.stderr or result.stdout).strip().splitlines()
    return f"{what} failed (exit {result.returncode}): {detail[-1] if detail else 'no output'}"


def _create_users(root: Path) -> list[str]:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers:
        # A bare name is looked up in <root>/usr/lib/sysusers.d; a path would be the host's.
        result = _run([sysusers, f"--root={root}", SYSUSERS_PATH.name])
        if result.returncode != 0:
            raise InstallError(_failure("systemd-sysusers", result))
        output = (result.stdout + result.stderr).splitlines()
        created = [
            "created" + line.strip()[len("Creating") :].rstrip(".")
            for line in output
            if line.startswith("Creating")
        ]
        return created or [f"user {SERVICE_USER} and groups {', '.join(GROUPS)} already exist"]
    if root != Path("/"):
        return [
            "skipped creating the users: systemd-sysusers is not available; "
            f"the image must run it for {SYSUSERS_PATH.name} at boot"
        ]
    return _create_users_with_shadow_utils()


def _create_users_with_shadow_utils() -> list[str]:
    lines = []
    for group in GROUPS:
        try:
            grp.getgrnam(group)
            lines.append(f"group {group} already exists")
            continue
        except KeyError:
            pass
        result = _run(["groupadd", "--system", group])
        if result.returncode != 0:
            raise InstallError(_failure(f"groupadd {group}", result))
        lines.append(f"created group {group}")
    result = _run(["id", "-u", SERVICE_USER])
    if result.returncode == 0:
        lines.append(f"user {SERVICE_USER} already exists")
        return lines
    result = _run(
        [
            "useradd",
            "--system",
            "--gid",
            SERVICE_USER,
            "--home-dir",
            STATE_DIRECTORY,
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "YubiKey enrollment desk daemon",
            SERVICE_USER,
        ]
    )
    if result.returncode != 0:
        raise InstallError(_failure(f"useradd {SERVICE_USER}", result))
    lines.append(f"created user {SERVICE_USER}")
    return lines


def _install_config(root: Path) -> str:
    target = root / CONFIG_PATH
    if target.exists():
        return f"kept /{CONFIG_PATH} (an existing configuration is never overwritten)"
    # 0644: operators run `provisioner` commands that read it too; secrets live elsewhere
    # (the OATH password file, AWS credentials in /etc/provisioner/environment).
    line = _write(root, CONFIG_PATH, shipped_text("provisioner.toml.example"), 0o644)
    return f"{line} from provisioner.toml.example"


def reload_system() -> list[str]:
    """Make systemd and udev read the new files, when they run; never fails."""
    lines = []
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        lines.append("skipped systemctl daemon-reload: systemctl not found")
    elif not SYSTEMD_RUNNING.is_dir():
        lines.append("skipped systemctl daemon-reload: systemd not running")
    else:
        result = _run([systemctl, "daemon-reload"])
        lines.append(
            "systemctl daemon-reload"
            if result.returncode == 0
            else _failure("systemctl daemon-reload", result)
        )
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        lines.append("skipped udevadm control --reload: udevadm not found")
    elif not UDEV_CONTROL.exists():
        lines.append("skipped udevadm control --reload: udevd not running")
    else:
        result = _run([udevadm, "control", "--reload"])
        if result.returncode != 0:
            lines.append(_failure("udevadm control --reload", result))
        else:
            lines.append("udevadm control --reload")
            # YubiKeys already plugged in get the new group and mode now.
            result = _run(
                [
                    udevadm,
                    "trigger",
                    "--action=change",
                    "--subsystem-match=usb",
                    "--attr-match=idVendor=1050",
                ]
            )
            lines.append(
                "udevadm trigger (YubiKeys already plugged in)"
                if result.returncode == 0
                else _failure("udevadm trigger", result)
            )
    return lines


def install(
    root: Path = Path("/"), executable: str | None = None, *, reload: bool = True
) -> list[str]:
    """Install the unit, the udev rule, the users and a first configuration under ``root``.

    ``executable`` is the command ExecStart= runs (default: this installation's
    `provisioner`). Returns one line per step, for the operator.
    """
    root = Path(root)
    command = executable if executable is not None else current_executable()
    unit = render_unit(command)
    _check_command(command, root)
    lines = [
        _write(root, UNIT_PATH, unit, 0o644) + f" (ExecStart={command})",
        _write(root, RULE_PATH, shipped_text("70-provisioner.rules"), 0o644),
        _write(root, SYSUSERS_PATH, shipped_text("provisioner.sysusers"), 0o644),
    ]
    lines += _create_users(root)
    lines.append(_install_config(root))
    if root == Path("/") and reload:
        lines += reload_system()
    elif reload:
        lines.append(f"not reloading systemd or udev: installed into {root}, not this machine")
    return lines


def uninstall(root: Path = Path("/"), *, reload: bool = True) -> list[str]:
    """Remove the unit and the udev rule; keep the state, the configuration and the users."""
    root = Path(root)
    lines = []
    for relative in (UNIT_PATH, RULE_PATH):
        target = root / relative
        try:
            target.unlink()
            lines.append(f"removed /{relative}")
        except FileNotFoundError:
            lines.append(f"already absent /{relative}")
        except OSError as e:
            raise InstallError(f"cannot remove {target}: {e.strerror or e}") from e
    lines.append(
        f"kept /{CONFIG_PATH}, {STATE_DIRECTORY}, /{SYSUSERS_PATH} and the users "
        "(remove them by hand if nothing is to be kept)"
    )
    if root == Path("/") and reload:
        lines += reload_system()
    return lines
