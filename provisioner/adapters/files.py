"""Files the desk trusts: its configuration, the roster, the OATH password file.

Whoever can write one of them decides which token goes to which user, where IAM is, or
what password unlocks the tokens. So each must be owned by root or by the user running
this process (the service's user, or the operator of a one-shot command) and writable by
nobody else; the password file must also be unreadable by others (its group may read).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from provisioner.core import roster
from provisioner.core.errors import ConfigError
from provisioner.core.roster import Roster


def trusted_owners() -> tuple[int, ...]:
    """root, and the user this process runs as."""
    return (0, os.geteuid())


def read_trusted(
    path: Path,
    what: str,
    *,
    secret: bool = False,
    owners: Iterable[int] | None = None,
) -> bytes:
    """The bytes of ``path`` (``what`` names it: "the roster"); ConfigError, with the fix,
    when someone else could have written it; OSError when it cannot be read. Checked on
    the open file, so a rename between the check and the read changes nothing."""
    with path.open("rb") as f:
        info = os.fstat(f.fileno())
        _check(path, what, info, secret, tuple(owners if owners is not None else trusted_owners()))
        return f.read()


def _check(
    path: Path, what: str, info: os.stat_result, secret: bool, owners: tuple[int, ...]
) -> None:
    if info.st_uid not in owners:
        raise ConfigError(
            f"{what} {path} is owned by uid {info.st_uid}, not by root or this service's user",
            hint=f"chown root {path}, or use a file only root may change",
        )
    mode = stat.S_IMODE(info.st_mode)
    if secret and mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
        raise ConfigError(
            f"{what} {path} is readable or writable by others (mode {mode:04o})",
            hint=f"chmod 600 {path} (or 640 with the service's group)",
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{what} {path} is writable by others (mode {mode:04o})",
            hint=f"chmod go-w {path}",
        )


def load_roster(path: Path) -> Roster:
    """The roster file, read as the desk trusts it (see read_trusted), then parsed."""
    try:
        data = read_trusted(path, "the roster")
    except OSError as e:
        raise ConfigError(f"cannot read the roster {path}: {e.strerror}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"the roster {path} is not UTF-8 (byte {e.start})",
            hint="save it as UTF-8 CSV",
        ) from None
    return roster.parse(text, str(path))
