"""The batch desk's roster: a CSV that says which token serial goes to which IAM user.

    serial,user,accounts
    12345678,alice,prod;dev
    12345679,bob,

A header row is required (columns ``serial`` and ``user``, any order; an optional
``accounts`` column names the desk's [[accounts]] to enroll in, ``;``-separated, empty
for all of them; an optional ``note`` column is ignored). Lines starting with ``#`` and
blank lines are skipped.
Every mistake is reported with its line number, and the whole roster is refused: a desk
must not enroll half a batch from a file it misread.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from provisioner.core import validation
from provisioner.core.errors import ConfigError, InvalidInput

ALLOWED_COLUMNS = {"serial", "user", "accounts", "note"}


@dataclass(frozen=True)
class Roster:
    users_by_serial: dict[int, str]
    source: str
    #: serial -> the accounts to enroll in (``prod,dev``); a serial not here: all of them.
    accounts_by_serial: dict[int, str] = field(default_factory=dict)

    def user_for(self, serial: int | None) -> str | None:
        return self.users_by_serial.get(serial) if serial is not None else None

    def accounts_for(self, serial: int | None) -> str:
        return self.accounts_by_serial.get(serial, "") if serial is not None else ""

    def __len__(self) -> int:
        return len(self.users_by_serial)


def _fields(line: str, where: str) -> list[str]:
    """One line's fields. Each line is read on its own, so a quote left open cannot run
    on into the next lines and every mistake keeps its line number."""
    try:
        return next(csv.reader([line], strict=True))
    except csv.Error as e:
        raise ConfigError(f"{where}: not a CSV line ({e})") from None


def parse(text: str, source: str) -> Roster:
    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        return Roster({}, source)
    first, header_line = lines[0]
    found = _fields(header_line, f"{source}:{first}")
    header = [h.strip().lower() for h in found]
    unknown = [h for h in header if h not in ALLOWED_COLUMNS]
    if unknown or "serial" not in header or "user" not in header:
        shown = ", ".join(found)
        raise ConfigError(
            f"{source}:{first}: the header must name the columns serial and user "
            f"(found {shown[:60] or 'nothing'!r})",
            hint="first line: serial,user",
        )
    if len(set(header)) != len(header):
        raise ConfigError(f"{source}:{first}: a column is named twice")
    s_col, u_col = header.index("serial"), header.index("user")
    a_col = header.index("accounts") if "accounts" in header else None
    users: dict[int, str] = {}
    accounts: dict[int, str] = {}
    seen_users: dict[str, int] = {}
    for number, line in lines[1:]:
        where = f"{source}:{number}"
        row = _fields(line, where)
        if len(row) != len(header):
            raise ConfigError(f"{where}: expected {len(header)} fields, found {len(row)}")
        raw_serial, user = row[s_col].strip(), row[u_col].strip()
        raw_accounts = row[a_col].strip() if a_col is not None else ""
        try:
            serial = validation.token_serial(raw_serial)
            validation.user_name(user)
            if raw_accounts:
                accounts[serial] = validation.account_names(raw_accounts)
        except InvalidInput as e:
            raise ConfigError(f"{where}: {e.message}") from None
        if serial in users:
            raise ConfigError(f"{where}: serial {serial} is listed twice")
        if user in seen_users:
            raise ConfigError(
                f"{where}: user {user} is listed twice (also line {seen_users[user]})",
                hint="one token per user per roster",
            )
        users[serial] = user
        seen_users[user] = number
    return Roster(users, source, accounts)
