"""The control socket's requests: every op, its fields, their types and ranges, in one table.

A request is checked here as it comes off the socket, before the service sees it: what
passes has only the fields its op knows, each of the right type and in range (a boolean
is not a number, a serial is a YubiKey's, a user name is IAM's); anything else is one
line saying what is wrong, exit status 2. ``null`` means "not given" for optional fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from provisioner.core import validation
from provisioner.core.errors import InvalidInput
from provisioner.core.store import RequestKind

#: YubiKey serials are unsigned 32-bit numbers.
MAX_SERIAL = 2**32 - 1
#: Queue ids are SQLite row ids.
MAX_ID = 2**63 - 1
MAX_HISTORY = 100_000
#: Seconds since 1970; beyond this a float no longer holds whole seconds.
MAX_TIME = 2**53


class _Bad(Exception):
    """What is wrong with one field's value (the table's checks raise it)."""


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(low: int, high: int, what: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        # bool is an int to Python, not to a client that sent true
        if type(value) is not int or not low <= value <= high:
            raise _Bad(f"must be {what} (an integer from {low} to {high})")
        return value

    return check


def _flag(value: object) -> object:
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _user(value: object) -> object:
    if not isinstance(value, str):
        raise _Bad("must be an IAM user name (a string)")
    if len(value) > 64:
        raise _Bad("is not a valid IAM user name (longer than 64 characters)")
    try:
        validation.user_name(value)
    except InvalidInput:
        raise _Bad("is not a valid IAM user name") from None
    return value


def _accounts(value: object) -> object:
    if not isinstance(value, str):
        raise _Bad("must be account names (a string: prod,dev)")
    try:
        return validation.account_names(value)
    except InvalidInput as e:
        raise _Bad(f"is not a list of account names ({e.message})") from None


def _account(value: object) -> object:
    if not isinstance(value, str):
        raise _Bad("must be an account name (a string)")
    try:
        return validation.account_name(value)
    except InvalidInput as e:
        raise _Bad(f"is not an account name ({e.message})") from None


def _desk(value: object) -> object:
    if not isinstance(value, str) or not 0 < len(value) <= 255 or not value.isprintable():
        raise _Bad("must be a desk's name (a string)")
    return value


def _kind(value: object) -> object:
    if value not in tuple(RequestKind):
        raise _Bad(f"must be one of {', '.join(RequestKind)}")
    return value


def _time(value: object) -> object:
    # NaN and infinity fail the range too
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < MAX_TIME:
        raise _Bad("must be a time in seconds since 1970 (a number, not negative)")
    return value


@dataclass(frozen=True)
class Field:
    check: Callable[[object], object]
    required: bool = False


_SERIAL = Field(_integer(1, MAX_SERIAL, "a token serial"))

#: op -> field -> its check. A field not listed for its op is refused.
OPS: Mapping[str, Mapping[str, Field]] = {
    "enroll": {
        "user": Field(_user, required=True),
        "serial": _SERIAL,
        "kind": Field(_kind),
        "old_serial": _SERIAL,
        "wait": Field(_flag),
        "accounts": Field(_accounts),
        "desk": Field(_desk),
    },
    "status": {},
    "queue": {},
    "watch": {},
    "cancel": {"id": Field(_integer(1, MAX_ID, "a queue number"), required=True)},
    "history": {
        "limit": Field(_integer(1, MAX_HISTORY, "a number of records")),
        "user": Field(_user),
        "serial": _SERIAL,
        "since": Field(_time),
        "account": Field(_account),
        "desk": Field(_desk),
    },
    "reconcile": {
        "dry_run": Field(_flag),
        "keep_orphans": Field(_flag),
        "all_desks": Field(_flag),
        "desk": Field(_desk),
    },
    "revoke": {
        "user": Field(_user, required=True),
        "serial": _SERIAL,
        "accounts": Field(_accounts),
    },
}


def valid_request(message: Mapping[str, Any]) -> dict[str, Any]:
    """``message`` itself when every field is what its op takes; else InvalidInput."""
    op = message.get("op")
    if not isinstance(op, str):
        raise InvalidInput('request needs an "op" string')
    fields = OPS.get(op)
    if fields is None:
        raise InvalidInput(f"unknown op {_shown(op)} (known: {', '.join(sorted(OPS))})")
    checked: dict[str, Any] = {"op": op}
    for name, value in message.items():
        if name == "op":
            continue
        field = fields.get(name)
        if field is None:
            known = ", ".join(sorted(fields)) or "none"
            raise InvalidInput(f'op "{op}" takes no field {_shown(name)} (its fields: {known})')
        if value is None:  # "not given"; a required field's absence is said below
            checked[name] = None
            continue
        try:
            checked[name] = field.check(value)
        except _Bad as e:
            raise InvalidInput(f'op "{op}": "{name}" {e}, not {_shown(value)}') from None
    for name, field in fields.items():
        if field.required and checked.get(name) is None:
            raise InvalidInput(f'op "{op}" needs "{name}"')
    return checked
