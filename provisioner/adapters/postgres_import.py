"""`provisioner store import-sqlite FILE`: a desk's SQLite history moved into the fleet's
database, without duplicates however often it runs.

What moves: the audit trail (appended to the desk's hash chain in the fleet, each record
with its own time, actor and outcome; the file's own chain checked first: a broken one
is refused), the finished enrollments, the credentials still to be removed from tokens,
and the waiting requests. Each imported row remembers where it came from
(``sqlite:<desk>:<table>:<id>``, unique), so a second run adds nothing. Unfinished
enrollments are refused: settle them first (``provisioner reconcile`` on that desk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.adapters.postgres_store import PostgresStore
from provisioner.adapters.sqlite_store import SqliteStore
from provisioner.core.audit import ChainWalk, record_hash
from provisioner.core.errors import StoreError


@dataclass
class Imported:
    """How many rows of each kind were added (those already there are not counted)."""

    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        added = ", ".join(f"{n} {kind}" for kind, n in self.counts.items())
        again = sum(self.skipped.values())
        return f"imported {added}" + (f"; {again} already there" if again else "")


_ENROLLMENT_COLUMNS = (
    "user", "serial", "reader", "source", "started_at", "finished_at", "step", "device_arn",
    "outcome", "reason", "credential_id", "device_state", "credential_state", "account", "batch",
)  # fmt: skip
_QUEUE_COLUMNS = (
    "user", "serial", "requested_by", "requested_at", "state", "kind", "old_serial",
    "followed", "accounts",
)  # fmt: skip
_CLEANUP_COLUMNS = ("serial", "credential_id", "enrollment_id", "reason", "created_at")


def import_sqlite(fleet: PostgresStore, path: Path, desk: str) -> Imported:
    """Move ``path``'s history into ``fleet`` as desk ``desk``'s."""
    source = SqliteStore(path, read_only=True)
    try:
        return _import(fleet, source, path, desk)
    finally:
        source.close()


def _import(fleet: PostgresStore, source: SqliteStore, path: Path, desk: str) -> Imported:
    with source._reading() as db:  # noqa: SLF001 - every desk's, not only a named one's
        unfinished = db.execute(
            "SELECT COUNT(*) AS n FROM enrollments WHERE finished_at IS NULL"
        ).fetchone()["n"]
    if unfinished:
        raise StoreError(
            f"{path} holds unfinished enrollments",
            hint="settle them first: provisioner reconcile on that desk",
        )
    trail = _all(source)
    walk = ChainWalk()
    for record in trail:
        walk.see(record)
    if walk.broken:
        first = next(iter(walk.broken.values()))
        raise StoreError(f"{path}: its audit trail is not intact: {first.line()}")
    done = Imported()
    with source._reading() as db:  # noqa: SLF001 - the importer reads the file's own rows
        enrollments = db.execute(
            "SELECT * FROM enrollments WHERE finished_at IS NOT NULL ORDER BY id"
        ).fetchall()
        cleanups = db.execute(
            "SELECT * FROM token_cleanups WHERE done_at IS NULL ORDER BY id"
        ).fetchall()
        waiting = db.execute("SELECT * FROM queue WHERE state = 'waiting' ORDER BY id").fetchall()
    origin = f"sqlite:{desk}:"
    with fleet._tx() as pg:  # noqa: SLF001 - one transaction: all of it or nothing
        fleet._lock_chain(pg)  # noqa: SLF001
        _rows(pg, done, "enrollments", enrollments, _ENROLLMENT_COLUMNS, origin, {"desk": desk})
        _rows(pg, done, "token_cleanups", cleanups, _CLEANUP_COLUMNS, origin, {})
        _rows(pg, done, "queue", waiting, _QUEUE_COLUMNS, origin, {})
        _audit(pg, done, trail, origin, desk)
    return done


def _all(source: SqliteStore) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    after = 0
    while page := source.audit_trail(after=after):
        records += [r.as_dict() for r in page]
        after = page[-1].id
    return records


def _rows(
    pg: Any,
    done: Imported,
    table: str,
    rows: list[Any],
    columns: tuple[str, ...],
    origin: str,
    extra: dict[str, Any],
) -> None:
    names = [*columns, *extra, "origin"]
    quoted = ", ".join(f'"{n}"' for n in names)
    marks = ", ".join("?" for _ in names)
    sql = f"INSERT INTO {table} ({quoted}) VALUES ({marks}) ON CONFLICT (origin) DO NOTHING"  # noqa: S608 - fixed names
    added = 0
    for row in rows:
        values = [row[c] for c in columns] + list(extra.values()) + [f"{origin}{table}:{row['id']}"]
        added += pg.execute(sql, values).rowcount
    done.counts[table] = added
    done.skipped[table] = len(rows) - added


def _audit(pg: Any, done: Imported, trail: list[dict[str, Any]], origin: str, desk: str) -> None:
    """The file's records appended to the desk's chain in the fleet, each hashed anew."""
    seen = {
        r["origin"]
        for r in pg.execute(
            "SELECT origin FROM audit WHERE origin LIKE ?", (origin + "%",)
        ).fetchall()
    }
    last = pg.execute(
        "SELECT hash FROM audit WHERE desk = ? ORDER BY id DESC LIMIT 1", (desk,)
    ).fetchone()
    prev = last["hash"] if last is not None else None
    added = 0
    for record in trail:
        where = f"{origin}audit:{record['id']}"
        if where in seen:
            continue
        moved = {**record, "desk": desk}
        digest = record_hash(prev, moved)
        pg.execute(
            'INSERT INTO audit (at, actor, event, "user", serial, device_arn, outcome, reason, '
            "account, desk, prev_hash, hash, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                moved["at"], moved["actor"], moved["event"], moved["user"], moved["serial"],
                moved["device_arn"], moved["outcome"], moved["reason"], moved["account"],
                desk, prev, digest, where,
            ),
        )  # fmt: skip
        prev = digest
        added += 1
    done.counts["audit records"] = added
    done.skipped["audit records"] = len(trail) - added
