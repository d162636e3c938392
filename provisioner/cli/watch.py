"""`provisioner watch`: the desk at a glance, drawn from the daemon's status updates.

Pure: :func:`render` turns one update (the daemon's status plus the event that caused
it) into the lines of a screen; the CLI owns the terminal. Nothing here is secret: the
status never carries a seed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from provisioner.core.messages import EventKind, TokenState

#: Clears a terminal and puts the cursor home, so each update redraws in place.
CLEAR = "\x1b[H\x1b[2J"


def _clock(epoch: object) -> str:
    if not isinstance(epoch, int | float):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def _token(serial: object) -> str:
    return f"token {serial}" if serial is not None else "token ?"


def _reader_line(reader: Mapping[str, Any], token: Mapping[str, Any] | None) -> str:
    if token is None:
        return f"  {reader['name']}: {'card present' if reader.get('card_present') else 'empty'}"
    what = f"{_token(token.get('serial'))} {token.get('state', '?')}"
    if token.get("detail"):
        what = f"{_token(token.get('serial'))}: {token['detail']}"
    if token.get("user"):
        what += f" for {token['user']}"
    if token.get("state") in (TokenState.ENROLLING, TokenState.RESYNCING) and token.get("step"):
        what += f", step {token['step']}"
    return f"  {reader['name']}: {what}"


def _queue_line(entry: Mapping[str, Any], ahead: Mapping[int, Mapping[str, Any]]) -> str:
    which = _token(entry["serial"]) if entry.get("serial") is not None else "any token"
    kind = "" if entry.get("kind", "enroll") == "enroll" else f"{entry['kind']} "
    accounts = f" in {entry['accounts'].replace(',', ', ')}" if entry.get("accounts") else ""
    ready = ahead.get(entry["id"])
    done = ""
    if ready is not None:  # the work done before its plug
        done = "; device made ahead" if ready.get("device") else "; checked ahead"
    return (
        f"  #{entry['id']} {kind}{entry['user']}{accounts} on {which}, asked by "
        f"{entry.get('requested_by')} at {_clock(entry.get('requested_at'))}{done}"
    )


def _rostered_ahead(ahead: Sequence[Mapping[str, Any]]) -> list[str]:
    """The roster's tokens whose work was done ahead of their plug (one line)."""
    rostered = [
        f"{r.get('serial')} ({r.get('user')}, {'device made' if r.get('device') else 'checked'})"
        for r in ahead
        if r.get("queue") is None
    ]
    return [f"roster, ready ahead: {', '.join(rostered)}"] if rostered else []


def _outcome_line(outcome: Mapping[str, Any]) -> str:
    line = (
        f"  {_clock(outcome.get('at'))}  {outcome.get('user')} on "
        f"{_token(outcome.get('serial'))}: {outcome.get('outcome')}"
    )
    seconds = outcome.get("seconds")
    if isinstance(seconds, int | float):
        line += f" in {seconds * 1000:.0f} ms"
    accounts = outcome.get("accounts")
    if isinstance(accounts, list) and accounts:
        line += (
            " ("
            + ", ".join(f"{a.get('account')}: {a.get('device_arn') or 'already'}" for a in accounts)
            + ")"
        )
    elif outcome.get("device_arn"):
        line += f" ({outcome['device_arn']})"
    elif outcome.get("detail") and not outcome.get("ok"):
        line += f": {outcome['detail']}"
    return line


def describe_event(event: Mapping[str, Any] | None) -> str:
    """One line about what just happened, in the operator's words."""
    if not event:
        return "connected"
    kind = str(event.get("event", "?"))
    who = f" for {event['user']}" if event.get("user") else ""
    where = f" in {event['reader']}" if event.get("reader") else ""
    if kind == EventKind.STEP:
        return f"{event.get('step')}{who}: {event.get('detail', '')}".rstrip(": ")
    if kind == EventKind.OUTCOME:
        return f"{event.get('outcome')}{who}"
    if kind == EventKind.REQUEST_QUEUED:
        return f"request #{event.get('id')} queued{who}"
    detail = f": {event['detail']}" if event.get("detail") else ""
    return f"{kind}{who}{where}{detail}"


def render(update: Mapping[str, Any], *, now: float, width: int = 100) -> list[str]:
    """The screen for one status update, each line cut to ``width`` characters."""
    daemon = update.get("daemon") or {}
    readers: Sequence[Mapping[str, Any]] = update.get("readers") or []
    tokens = {t["reader"]: t for t in update.get("tokens") or []}
    queue: Sequence[Mapping[str, Any]] = update.get("queue") or []
    total = update.get("queue_total")
    waiting = total if isinstance(total, int) and total > len(queue) else len(queue)
    in_progress: Sequence[Mapping[str, Any]] = update.get("in_progress") or []
    recent: Sequence[Mapping[str, Any]] = update.get("recent") or []
    ahead = {r["queue"]: r for r in update.get("ahead") or []}

    lines = [
        f"desk {daemon.get('desk', '?')} at {_clock(now)}: pcscd {daemon.get('pcsc', '?')}, "
        f"IAM {daemon.get('iam', '?')}, roster of {daemon.get('roster', 0)}"
        + (f", accounts {', '.join(daemon['accounts'])}" if daemon.get("accounts") else ""),
        "",
        f"readers ({len(readers)}):" if readers else "readers: none (is a YubiKey plugged in?)",
        *(_reader_line(r, tokens.get(r["name"])) for r in readers),
        "",
        f"in progress ({len(in_progress)}):" if in_progress else "in progress: nothing",
        *(
            f"  {t.get('user')} on {_token(t.get('serial'))} in {t.get('reader')}: "
            f"step {t.get('step') or '?'}"
            for t in in_progress
        ),
        "",
        f"queue ({waiting} waiting):" if queue else "queue: empty",
        *(_queue_line(e, ahead) for e in queue),
        *([f"  … and {waiting - len(queue)} more"] if waiting > len(queue) else []),
        *_rostered_ahead(update.get("ahead") or []),
        "",
        f"last outcomes ({len(recent)}):" if recent else "last outcomes: none yet",
        *(_outcome_line(o) for o in recent),
        "",
        f"last event: {describe_event(update.get('cause'))}",
    ]
    return [line if len(line) <= width else line[: max(width - 1, 1)] + "…" for line in lines]


__all__ = ["CLEAR", "describe_event", "render"]
