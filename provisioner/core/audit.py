"""The audit trail as people read it: a log line per record, and exports.

Each record also goes to the log (the journal) with stable ``key=value`` fields, so the
security team's log tooling can pick it up without asking the daemon. ``history`` renders
records as a table, JSON or CSV.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from provisioner.core import validation
from provisioner.core.errors import InvalidInput

FIELDS = ("at", "actor", "event", "user", "serial", "device_arn", "outcome", "reason")
#: With the account each record happened in: a desk that serves [[accounts]].
ACCOUNT_FIELDS = ("at", "actor", "event", "user", "account", *FIELDS[4:])


def columns(records: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The columns to show: the account's only where a record names one, so a desk that
    serves its own account alone shows its trail as it always did."""
    fields = ACCOUNT_FIELDS if any(r.get("account") for r in records) else FIELDS
    if len({r.get("desk") for r in records if r.get("desk")}) > 1:
        fields = (fields[0], "desk", *fields[1:])
    return fields


#: Kept in the store, not shown: the chain is what `history --verify` checks.
_HIDDEN = frozenset({"prev_hash", "hash"})


_PLAIN = re.compile(r"[\w.:/@+=,-]+")
_RELATIVE = re.compile(r"([0-9]+)\s*([smhd])", re.ASCII)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: How far back --since may reach: further is a typo, and a float cannot hold all of it.
_MAX_DAYS_BACK = 36500
#: A spreadsheet evaluates a cell that starts with one of these (OWASP: CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


#: What a record's hash covers, in this order (with the hash of the desk's record before).
CHAINED = (
    "desk",
    "at",
    "actor",
    "event",
    "user",
    "serial",
    "device_arn",
    "outcome",
    "reason",
    "account",
)


def record_hash(prev_hash: str | None, record: Mapping[str, Any]) -> str:
    """The hash that chains ``record`` to the desk's record before it: SHA-256 over a
    canonical encoding (JSON, fixed order; the time as Python's exact float text)."""
    values: list[Any] = [prev_hash or ""]
    for key in CHAINED:
        value = record.get(key)
        values.append(repr(float(value or 0)) if key == "at" else value)
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    """The first record of a desk's chain that is not what was written."""

    desk: str
    record: int
    why: str

    def line(self) -> str:
        return f"desk {self.desk}: record #{self.record} {self.why}"


@dataclass
class ChainWalk:
    """Walks the trail in order, one chain per desk; records from before the chain
    (written by a version without it: no hash) are counted, not checked."""

    last: dict[str, str] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)
    unchained: int = 0
    broken: dict[str, ChainBreak] = field(default_factory=dict)

    def see(self, record: Mapping[str, Any]) -> None:
        desk = str(record.get("desk") or "")
        if desk in self.broken:
            return
        stored = record.get("hash")
        if stored is None:
            if desk in self.last:  # a record without a hash inside a chain
                self.broken[desk] = ChainBreak(desk, int(record["id"]), "has lost its hash")
            else:
                self.unchained += 1
            return
        before = self.last.get(desk)
        if record.get("prev_hash") != before and before is not None:
            self.broken[desk] = ChainBreak(
                desk,
                int(record["id"]),
                "does not follow the desk's record before it: a record is missing or was changed",
            )
            return
        if record_hash(record.get("prev_hash"), record) != stored:
            self.broken[desk] = ChainBreak(
                desk, int(record["id"]), "was changed after it was written"
            )
            return
        self.last[desk] = str(stored)
        self.checked[desk] = self.checked.get(desk, 0) + 1


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_line(record: Mapping[str, Any]) -> str:
    """``event=enrollment actor=root user=alice ...``: stable keys, values quoted if needed."""
    parts = []
    for key in ACCOUNT_FIELDS:
        value = record.get(key)
        if value is None:
            continue
        text = _iso(value) if key == "at" else str(value)
        if not _PLAIN.fullmatch(text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return "audit " + " ".join(parts)


def parse_since(text: str, now: float | None = None) -> float:
    """``24h``, ``7d``, ``30m`` ago, or an ISO date/time (UTC unless it says otherwise).

    The messages name the text, not the option: argparse says "argument --since:"."""
    now = time.time() if now is None else now
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        unit = _UNITS[match.group(2)]
        try:
            amount = validation.whole_number(
                match.group(1), "an amount", maximum=_MAX_DAYS_BACK * 86400 // unit
            )
        except InvalidInput:
            raise InvalidInput(
                f"{text!r}: at most {_MAX_DAYS_BACK} days back ({_MAX_DAYS_BACK}d)"
            ) from None
        return now - amount * unit
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{text!r}: give a time like 2026-11-01, 2026-11-01T09:30 or 24h, 7d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def spreadsheet_safe(value: object) -> object:
    """A CSV cell no spreadsheet evaluates: text that would start a formula gets a ``'``
    in front (OWASP). IAM user names may start with = + - @; a reason may start with
    anything. Numbers are left alone: -5 is a number to a spreadsheet, not a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def render(records: Sequence[Mapping[str, Any]], fmt: str) -> str:
    fields = columns(records)
    if fmt == "json":
        shown = [
            {
                k: v
                for k, v in {**r, "at": _iso(r["at"])}.items()
                if k not in _HIDDEN and (k not in ("account", "desk") or k in fields)
            }
            for r in records
        ]
        return json.dumps(
            shown,
            indent=2,
        )
    if fmt == "csv":
        out = io.StringIO()
        # RFC 4180's CRLF: the writer then quotes a cell holding a lone CR too, which
        # would otherwise end the row there and start the next with what follows it.
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: spreadsheet_safe(v) for k, v in {**r, "at": _iso(r["at"])}.items()})
        return out.getvalue().rstrip("\r\n")
    if fmt == "table":
        rows = [[_iso(r["at"]), *(str(r.get(k) or "") for k in fields[1:])] for r in records]
        header = list(fields)
        widths = [
            max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
            for i, h in enumerate(header)
        ]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        return "\n".join(line.rstrip() for line in lines)
    raise InvalidInput(f"unknown format {fmt!r}: table, json or csv")
