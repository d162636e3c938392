"""The desk's store in SQL: the queue, one record per enrollment, the audit trail; the
queries shared by SQLite (one desk, sqlite_store.py) and PostgreSQL (a fleet,
postgres_store.py), which give it their connections and transactions.

Each enrollment record names its owner, the process doing it (ownership.py), so that
recovery never takes a running enrollment for a crash's leftover. The audit trail is
append-only, enforced by the database itself (SQLite: triggers; PostgreSQL: the desks'
role may only INSERT and SELECT it). Nothing secret is ever stored: users, serials,
ARNs, steps and outcomes. Every write is its own transaction, committed before the call
returns, so after a crash the records say how far each enrollment got. The drivers'
errors become StoreError in the subclasses: nothing outside the adapters knows them.

The SQL is the subset both speak: ``?`` placeholders (PostgreSQL's driver gets ``%s``),
``"user"`` quoted (a reserved word to PostgreSQL), ``INSERT ... RETURNING id``, ``IS NOT
DISTINCT FROM``. Still larger than most modules: writes that touch the queue, a record
and the trail in one transaction (a cancel is audited in the same commit). The port and
its records are in core/store.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from provisioner.core.audit import log_line, record_hash
from provisioner.core.errors import ProvisionerError, QueueFull
from provisioner.core.messages import Outcome
from provisioner.core.ports import Fact
from provisioner.core.roster import Roster
from provisioner.core.store import (
    FACT_STATES,
    AuditRecord,
    CredentialState,
    DeskBeat,
    DeviceState,
    EnrollmentJournal,
    EnrollmentRecord,
    FactEntry,
    InventoryState,
    QueueEntry,
    RecordOwner,
    RequestKind,
    RequestState,
    Row,
    TokenCleanup,
    TokenRecord,
)

audit_log = logging.getLogger("provisioner.audit")

#: The states of a request that counts against the queue's bound.
_OPEN = "state IN ('waiting', 'taken')"
_COUNT_OPEN = f"SELECT COUNT(*) AS n FROM queue WHERE {_OPEN}"  # noqa: S608 - a fixed clause


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the queries need of a driver's connection (sqlite3's, psycopg's, wrapped)."""

    def execute(self, sql: str, params: Any = ..., /) -> Cursor: ...


class SqlStore:
    """The store's queries over a connection the subclass hands out: ``_tx()`` for one
    write transaction, ``_reading()`` for a read.

    ``owner``: the process whose enrollments this store records (None: records without
    an owner, as before owners existed).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        owner: RecordOwner | None = None,
        desk: str = "",
    ) -> None:
        self._clock = clock
        self._owner = owner
        #: This desk: whose hash chain its audit records extend, which requests it may
        #: take, which records it settles ('' for a store without a desk name).
        self._desk = desk

    def _lock_chain(self, db: Connection) -> None:
        """Hold the desk's chain for this transaction (no other writer of the desk's
        records between reading its last hash and writing the next)."""

    #: Appended to a SELECT of waiting requests: skip a row another desk is taking.
    _skip_locked = ""

    def _tx(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _reading(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Connection]:
        """For one statement that is its own transaction: an adapter whose database
        commits such a statement by itself saves the BEGIN and COMMIT round trips."""
        return self._tx()

    def close(self) -> None:
        raise NotImplementedError

    # --- queue ------------------------------------------------------------------------

    def enqueue(
        self,
        user: str,
        requested_by: str,
        serial: int | None = None,
        *,
        kind: RequestKind = RequestKind.ENROLL,
        old_serial: int | None = None,
        followed: bool = False,
        limit: int | None = None,
        accounts: str = "",
        desk: str | None = None,
    ) -> QueueEntry:
        """A new request; QueueFull when ``limit`` requests are already open. For
        ``desk`` only (None: any desk of the fleet); a request a client follows waits for
        this desk, where that client's operator plugs the token in."""
        if kind not in tuple(RequestKind):
            raise ValueError(f"unknown request kind {kind!r}")
        if followed and desk is None:
            desk = self._desk or None
        with self._tx() as db:
            if limit is not None:
                open_now = db.execute(_COUNT_OPEN).fetchone()["n"]  # noqa: S608 - a fixed clause
                if open_now >= limit:
                    raise QueueFull(
                        f"the desk's queue is full: {open_now} requests are waiting "
                        f"(daemon.max_queue = {limit})"
                    )
            entry_id = db.execute(
                'INSERT INTO queue ("user", serial, requested_by, requested_at, kind, old_serial, '
                "followed, accounts, desk) VALUES (?,?,?,?,?,?,?,?,?) RETURNING id",
                (
                    user,
                    serial,
                    requested_by,
                    self._clock(),
                    kind,
                    old_serial,
                    int(followed),
                    accounts,
                    desk,
                ),
            ).fetchone()["id"]
            reason = None if kind is RequestKind.ENROLL else str(kind)
            if accounts:
                reason = "; ".join(filter(None, (reason, f"accounts {accounts}")))
            self._audit(db, requested_by, "queued", user=user, serial=serial, reason=reason)
            row = db.execute("SELECT * FROM queue WHERE id = ?", (entry_id,)).fetchone()
        return QueueEntry.from_row(row)

    def waiting(self, limit: int | None = None) -> list[QueueEntry]:
        """The open requests, oldest first (the first ``limit`` of them, if given)."""
        with self._reading() as db:
            rows = db.execute(
                f"SELECT * FROM queue WHERE {_OPEN} ORDER BY id LIMIT ?",  # noqa: S608 - a fixed clause
                (2**62 if limit is None else limit,),  # "no limit" in both dialects
            ).fetchall()
        return [QueueEntry.from_row(r) for r in rows]

    def queue_length(self, up_to: int | None = None) -> int:
        """How many requests are open (those up to request #``up_to``, if given)."""
        with self._reading() as db:
            if up_to is None:
                count = db.execute(_COUNT_OPEN).fetchone()["n"]
            else:
                count = db.execute(
                    f"SELECT COUNT(*) AS n FROM queue WHERE {_OPEN} AND id <= ?",  # noqa: S608 - a fixed clause
                    (up_to,),
                ).fetchone()["n"]
        return int(count)

    def queue_entry(self, entry_id: int) -> QueueEntry | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM queue WHERE id = ?", (entry_id,)).fetchone()
        return QueueEntry.from_row(row) if row else None

    def take_next(
        self, serial: int | None, *, users: Collection[str] | None = None
    ) -> QueueEntry | None:
        """The oldest waiting request this token may serve: one for its serial first, else
        one for any token; when ``users`` is given, only an enrollment (not a replace) of
        one of them, none if it is empty."""
        # Requests for this desk or for any; a row another desk is taking is skipped
        # (PostgreSQL: SKIP LOCKED; SQLite's writers take turns anyway). One statement:
        # picked and taken at once, one round trip to a fleet's database.
        wanted: list[str] = []
        params: list[Any] = []
        if serial is not None:
            wanted.append("serial = ?")
            params.append(serial)
        if users is None:
            wanted.append("serial IS NULL")
        elif users:
            marks = ",".join("?" for _ in users)
            wanted.append(f"(serial IS NULL AND kind = 'enroll' AND \"user\" IN ({marks}))")
            params.extend(sorted(users))
        if not wanted:
            return None
        pick = (
            "SELECT id FROM queue WHERE state = 'waiting' AND (desk IS NULL OR desk = ?) "  # noqa: S608 - fixed clauses
            f"AND ({' OR '.join(wanted)}) ORDER BY serial IS NULL, id LIMIT 1{self._skip_locked}"
        )
        with self._write() as db:
            row = db.execute(
                f"UPDATE queue SET state = 'taken', taken_by = ? WHERE id = ({pick}) RETURNING *",  # noqa: S608
                (self._desk, self._desk, *params),
            ).fetchone()
        return QueueEntry.from_row(row) if row else None

    def finish_entry(self, entry_id: int, state: RequestState, enrollment_id: int | None) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE queue SET state = ?, enrollment_id = ? WHERE id = ?",
                (state, enrollment_id, entry_id),
            )

    def cancel(self, entry_id: int, actor: str) -> QueueEntry | None:
        return self._close_waiting(entry_id, RequestState.CANCELLED, actor)

    def withdraw(self, entry_id: int) -> QueueEntry | None:
        """Close a waiting request whose client left with the daemon."""
        return self._close_waiting(entry_id, RequestState.WITHDRAWN, "daemon")

    def _close_waiting(self, entry_id: int, state: RequestState, actor: str) -> QueueEntry | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM queue WHERE id = ? AND state = 'waiting'", (entry_id,)
            ).fetchone()
            if row is None:
                return None
            self._close(db, row, state, actor)
        return QueueEntry.from_row(row)

    def _close(self, db: Connection, row: Row, state: RequestState, actor: str) -> None:
        """The request ends unserved, audited as ``state`` (cancelled, withdrawn)."""
        db.execute("UPDATE queue SET state = ? WHERE id = ?", (state, row["id"]))
        reason = None
        if state is RequestState.WITHDRAWN:
            reason = (
                f"request #{row['id']} was followed by {row['requested_by']}, whose command "
                "ended when the daemon stopped"
            )
        self._audit(db, actor, state, user=row["user"], serial=row["serial"], reason=reason)

    def link_entry(self, entry_id: int, enrollment_id: int) -> None:
        """The request's enrollment has started: from now on it is never served twice."""
        with self._write() as db:
            db.execute("UPDATE queue SET enrollment_id = ? WHERE id = ?", (enrollment_id, entry_id))

    def settle_taken(self) -> tuple[int, int]:
        """At start-up, the requests a stopped daemon left open.

        A request a client followed is withdrawn (that client left with the daemon: its
        operator was told the request failed, and it must not take a token now), unless
        its enrollment had started. A taken request whose enrollment had started is
        closed as interrupted (recovery settles the enrollment, the history tells the
        outcome); one whose enrollment had not started waits again.
        Returns (requeued, interrupted)."""
        with self._tx() as db:
            # This desk's: the requests it took, and those followed by its own clients
            # (a followed request waits for this desk: its enroll command runs here).
            orphans = db.execute(
                "SELECT * FROM queue WHERE followed = 1 AND enrollment_id IS NULL "
                "AND state IN ('waiting', 'taken') "
                "AND (desk = ? OR taken_by = ? OR (desk IS NULL AND taken_by IS NULL)) ORDER BY id",
                (self._desk, self._desk),
            ).fetchall()
            for row in orphans:
                self._close(db, row, RequestState.WITHDRAWN, "daemon")
            requeued = db.execute(
                "UPDATE queue SET state = 'waiting', taken_by = NULL WHERE state = 'taken' "
                "AND enrollment_id IS NULL AND (taken_by = ? OR taken_by IS NULL)",
                (self._desk,),
            ).rowcount
            interrupted = db.execute(
                "UPDATE queue SET state = 'interrupted' WHERE state = 'taken' "
                "AND (taken_by = ? OR taken_by IS NULL)",
                (self._desk,),
            ).rowcount
        return requeued, interrupted

    # --- enrollments ------------------------------------------------------------------

    def start_enrollment(
        self,
        user: str,
        serial: int | None,
        reader: str,
        source: str,
        *,
        owner: RecordOwner | None = None,
    ) -> int:
        """A new record, owned by ``owner`` (default: this store's owner)."""
        return self.start_enrollments([("", user)], serial, reader, source, owner=owner)[0]

    def start_enrollments(
        self,
        users: Sequence[tuple[str, str]],
        serial: int | None,
        reader: str,
        source: str,
        *,
        owner: RecordOwner | None = None,
    ) -> list[int]:
        """One record per (account, user; account '' is the desk's own), in one
        transaction; several name the first as their batch: settled together."""
        owner = owner or self._owner
        ids: list[int] = []
        with self._tx() if len(users) > 1 else self._write() as db:
            for account, user in users:
                enrollment_id = db.execute(
                    'INSERT INTO enrollments ("user", serial, reader, source, started_at, step, '
                    "owner, owner_pid, account, batch, desk) "
                    "VALUES (?,?,?,?,?, 'check', ?,?,?,?,?) RETURNING id",
                    (
                        user,
                        serial,
                        reader,
                        source,
                        self._clock(),
                        owner.token if owner else None,
                        owner.pid if owner else None,
                        account,
                        ids[0] if ids else None,
                        self._desk,
                    ),
                ).fetchone()["id"]
                ids.append(int(enrollment_id))
            if len(ids) > 1:
                db.execute("UPDATE enrollments SET batch = ? WHERE id = ?", (ids[0], ids[0]))
        return ids

    def claim_enrollment(
        self, enrollment_id: int, previous: str | None, owner: RecordOwner | None = None
    ) -> bool:
        """Take an unfinished record over from ``previous`` (an owner that has ended), for
        ``owner`` (default: this store's). False if someone else took it first."""
        owner = owner or self._owner
        with self._tx() as db:
            cur = db.execute(
                "UPDATE enrollments SET owner = ?, owner_pid = ? "
                "WHERE id = ? AND finished_at IS NULL AND owner IS NOT DISTINCT FROM ?",
                (
                    owner.token if owner else None,
                    owner.pid if owner else None,
                    enrollment_id,
                    previous,
                ),
            )
            return cur.rowcount == 1

    def release_enrollment(self, enrollment_id: int) -> None:
        """Hand an unfinished record this store's owner took over back: nobody owns it."""
        with self._tx() as db:
            db.execute(
                "UPDATE enrollments SET owner = NULL, owner_pid = NULL "
                "WHERE id = ? AND finished_at IS NULL AND owner IS NOT DISTINCT FROM ?",
                (enrollment_id, self._owner.token if self._owner else None),
            )

    def attach_token(self, enrollment_id: int, serial: int | None, reader: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE enrollments SET serial = ?, reader = ? WHERE id = ?",
                (serial, reader, enrollment_id),
            )

    def record_step(self, enrollment_id: int, step: str, device_arn: str | None = None) -> None:
        with self._write() as db:
            if device_arn is not None:
                db.execute(
                    "UPDATE enrollments SET step = ?, device_arn = ? WHERE id = ?",
                    (step, device_arn, enrollment_id),
                )
            else:
                db.execute("UPDATE enrollments SET step = ? WHERE id = ?", (step, enrollment_id))

    def finish_enrollment(
        self,
        enrollment_id: int,
        *,
        outcome: Outcome,
        actor: str,
        device_arn: str | None = None,
        reason: str | None = None,
    ) -> None:
        with self._tx() as db:
            row = db.execute(
                "UPDATE enrollments SET finished_at = ?, outcome = ?, reason = ?, "
                "device_arn = COALESCE(?, device_arn) WHERE id = ? RETURNING *",
                (self._clock(), outcome, reason, device_arn, enrollment_id),
            ).fetchone()
            if outcome in (Outcome.ENROLLED,) and row["serial"] is not None:
                self._token(db, row["serial"], InventoryState.ENROLLED, row["user"], row["account"])
            self._audit(
                db,
                actor,
                "enrollment",
                user=row["user"],
                serial=row["serial"],
                device_arn=row["device_arn"],
                outcome=outcome,
                reason=reason,
                account=row["account"] or None,
            )

    def journal(self, enrollment_id: int, *, defer_after: bool = False) -> EnrollmentJournal:
        return EnrollmentJournal(self, enrollment_id, defer_after=defer_after)

    def record_fact(
        self,
        enrollment_id: int,
        fact: Fact,
        *,
        device_arn: str | None = None,
        credential_id: str | None = None,
    ) -> None:
        self.record_facts(enrollment_id, [(fact, device_arn, credential_id)])

    def record_facts(self, enrollment_id: int, facts: Sequence[FactEntry]) -> None:
        """One UPDATE: each column as the last of the facts left it."""
        device: DeviceState | None = None
        credential: CredentialState | None = None
        arn = credential_id = None
        for fact, fact_arn, fact_credential in facts:
            state = FACT_STATES[fact]
            if isinstance(state, DeviceState):
                device = state
            else:
                credential = state
            arn, credential_id = fact_arn or arn, fact_credential or credential_id
        if not facts:
            return
        with self._write() as db:
            db.execute(
                "UPDATE enrollments SET device_state = COALESCE(?, device_state), "
                "credential_state = COALESCE(?, credential_state), "
                "device_arn = COALESCE(?, device_arn), "
                "credential_id = COALESCE(?, credential_id) WHERE id = ?",
                (
                    device.value if device else None,
                    credential.value if credential else None,
                    arn,
                    credential_id,
                    enrollment_id,
                ),
            )

    def enrollment(self, enrollment_id: int) -> EnrollmentRecord | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM enrollments WHERE id = ?", (enrollment_id,)).fetchone()
        return EnrollmentRecord.from_row(row) if row else None

    # --- credentials to remove from tokens when they are next seen --------------------

    def add_token_cleanup(
        self, serial: int, credential_id: str, enrollment_id: int | None, reason: str
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO token_cleanups (serial, credential_id, enrollment_id, reason, "
                "created_at) VALUES (?,?,?,?,?)",
                (serial, credential_id, enrollment_id, reason, self._clock()),
            )

    def token_cleanups(self, serial: int | None = None) -> list[TokenCleanup]:
        with self._reading() as db:
            if serial is None:
                rows = db.execute(
                    "SELECT * FROM token_cleanups WHERE done_at IS NULL ORDER BY id"
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM token_cleanups WHERE done_at IS NULL AND serial = ? ORDER BY id",
                    (serial,),
                ).fetchall()
        return [TokenCleanup.from_row(r) for r in rows]

    def finish_token_cleanup(self, cleanup_id: int, actor: str, outcome: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE token_cleanups SET done_at = ? WHERE id = ?", (self._clock(), cleanup_id)
            )
            row = db.execute("SELECT * FROM token_cleanups WHERE id = ?", (cleanup_id,)).fetchone()
            self._token(db, row["serial"], InventoryState.WIPED, only_if=InventoryState.REVOKED)
            self._audit(
                db,
                actor,
                "token cleanup",
                serial=row["serial"],
                outcome=outcome,
                reason=f"{row['credential_id']}: {row['reason']}",
            )

    def left_behind(self) -> set[str]:
        """Devices that ended enrollments (not enrolled) may have left in IAM: a rollback
        that could not delete its device."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT device_arn FROM enrollments WHERE finished_at IS NOT NULL "
                "AND outcome NOT IN ('enrolled', 'already enrolled') AND device_arn IS NOT NULL "
                "AND device_state IN ('maybe', 'created', 'maybe enabled', 'enabled')"
            ).fetchall()
        return {str(r["device_arn"]) for r in rows}

    def unfinished_enrollments(self, desk: str | None = None) -> list[EnrollmentRecord]:
        """This desk's unfinished records (those of ``desk``, a dead desk's, when given;
        records from before desks were named count as this desk's)."""
        whose = self._desk if desk is None else desk
        legacy = " OR desk IS NULL" if whose == self._desk else ""
        with self._reading() as db:
            rows = db.execute(
                "SELECT * FROM enrollments WHERE finished_at IS NULL "  # noqa: S608 - fixed clauses
                f"AND (desk = ?{legacy}) ORDER BY id",
                (whose,),
            ).fetchall()
        return [EnrollmentRecord.from_row(r) for r in rows]

    # --- audit ------------------------------------------------------------------------

    def audit(
        self,
        actor: str,
        event: str,
        *,
        user: str | None = None,
        serial: int | None = None,
        device_arn: str | None = None,
        outcome: str | None = None,
        reason: str | None = None,
        account: str | None = None,
    ) -> None:
        with self._tx() as db:
            if event == "revoked" and serial is not None:
                self._token(db, serial, InventoryState.REVOKED)
            self._audit(
                db,
                actor,
                event,
                user=user,
                serial=serial,
                device_arn=device_arn,
                outcome=outcome,
                reason=reason,
                account=account,
            )

    def audit_resync(
        self,
        actor: str,
        user: str,
        serial: int | None,
        outcome: tuple[str, int] | ProvisionerError,
    ) -> None:
        """A resync's record: ``outcome`` is (device, first time step) or what failed."""
        if isinstance(outcome, ProvisionerError):
            self.audit(
                actor,
                "resync",
                user=user,
                serial=serial,
                outcome=Outcome.FAILED,
                reason=outcome.one_line(),
            )
            return
        device, first_step = outcome
        self.audit(
            actor,
            "resync",
            user=user,
            serial=serial,
            device_arn=device,
            outcome=Outcome.RESYNCED,
            reason=f"time steps {first_step} and {first_step + 1}",
        )

    def _audit(
        self,
        db: Connection,
        actor: str,
        event: str,
        *,
        user: str | None = None,
        serial: int | None = None,
        device_arn: str | None = None,
        outcome: str | None = None,
        reason: str | None = None,
        account: str | None = None,
    ) -> None:
        at = self._clock()
        record = {
            "desk": self._desk,
            "at": at,
            "actor": actor,
            "event": str(event),
            "user": user,
            "serial": serial,
            "device_arn": device_arn,
            "outcome": None if outcome is None else str(outcome),
            "reason": reason,
            "account": account,
        }
        self._lock_chain(db)
        last = db.execute(
            "SELECT hash FROM audit WHERE desk = ? AND hash IS NOT NULL ORDER BY id DESC LIMIT 1",
            (self._desk,),
        ).fetchone()
        prev_hash = last["hash"] if last is not None else None
        db.execute(
            'INSERT INTO audit (at, actor, event, "user", serial, device_arn, outcome, reason, '
            "account, desk, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                at,
                actor,
                record["event"],
                user,
                serial,
                device_arn,
                record["outcome"],
                reason,
                account,
                self._desk,
                prev_hash,
                record_hash(prev_hash, record),
            ),
        )
        audit_log.info(
            "%s",
            log_line(
                {
                    "at": at,
                    "actor": actor,
                    "event": event,
                    "user": user,
                    "serial": serial,
                    "device_arn": device_arn,
                    "outcome": outcome,
                    "reason": reason,
                    **({"account": account} if account else {}),
                }
            ),
        )

    def history(
        self,
        *,
        limit: int = 100,
        since: float | None = None,
        user: str | None = None,
        serial: int | None = None,
        account: str | None = None,
        desk: str | None = None,
    ) -> list[AuditRecord]:
        clauses: list[str] = []
        params: list[object] = []
        if desk is not None:
            clauses.append("desk = ?")
            params.append(desk)
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        if user is not None:
            clauses.append('"user" = ?')
            params.append(user)
        if serial is not None:
            clauses.append("serial = ?")
            params.append(serial)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._reading() as db:
            rows = db.execute(
                f"SELECT * FROM (SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?) AS newest "  # noqa: S608 - fixed clauses
                "ORDER BY id",
                (*params, limit),
            ).fetchall()
        return [AuditRecord.from_row(r) for r in rows]

    def audit_trail(self, after: int = 0, limit: int = 10_000) -> list[AuditRecord]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [AuditRecord.from_row(r) for r in rows]

    # --- the fleet's desks ------------------------------------------------------------

    def heartbeat(
        self, version: str, pid: int, started_at: float, status: str, *, stopped: bool = False
    ) -> None:
        now = self._clock()
        with self._tx() as db:
            changed = db.execute(
                "UPDATE desks SET version = ?, pid = ?, started_at = ?, beat_at = ?, status = ?, "
                "stopped_at = ? WHERE name = ?",
                (version, pid, started_at, now, status, now if stopped else None, self._desk),
            ).rowcount
            if not changed:
                db.execute(
                    "INSERT INTO desks (name, version, pid, started_at, beat_at, status, "
                    "stopped_at) VALUES (?,?,?,?,?,?,?)",
                    (self._desk, version, pid, started_at, now, status, now if stopped else None),
                )

    def desks(self) -> list[DeskBeat]:
        with self._reading() as db:
            rows = db.execute("SELECT * FROM desks ORDER BY name").fetchall()
        return [DeskBeat.from_row(r) for r in rows]

    # --- the fleet's roster -----------------------------------------------------------

    def load_roster(self, roster: Roster, actor: str) -> int:
        with self._tx() as db:
            db.execute("DELETE FROM roster")
            for serial, user in sorted(roster.users_by_serial.items()):
                db.execute(
                    'INSERT INTO roster (serial, "user", accounts) VALUES (?,?,?)',
                    (serial, user, roster.accounts_for(serial)),
                )
            self._audit(
                db,
                actor,
                "roster loaded",
                reason=f"{len(roster)} tokens from {roster.source}",
            )
        return len(roster)

    def take_rostered(self, serial: int) -> tuple[str, str] | None:
        with self._tx() as db:
            taken = db.execute(
                "UPDATE roster SET taken_by = ? WHERE serial = ? "
                "AND (taken_by IS NULL OR taken_by = ?)",
                (self._desk, serial, self._desk),
            ).rowcount
            if not taken:
                return None
            row = db.execute(
                'SELECT "user", accounts FROM roster WHERE serial = ?', (serial,)
            ).fetchone()
        return str(row["user"]), str(row["accounts"])

    def release_rostered(self, serial: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE roster SET taken_by = NULL WHERE serial = ? AND taken_by = ?",
                (serial, self._desk),
            )

    def roster_size(self) -> int:
        with self._reading() as db:
            return int(db.execute("SELECT COUNT(*) AS n FROM roster").fetchone()["n"])

    # --- the token inventory ----------------------------------------------------------

    def _token(
        self,
        db: Connection,
        serial: int,
        state: InventoryState,
        user: str | None = None,
        account: str | None = None,
        *,
        firmware: str | None = None,
        only_if: InventoryState | None = None,
    ) -> None:
        """The token's row: its new state, here and now; the user and account added."""
        now = self._clock()
        row = db.execute("SELECT * FROM tokens WHERE serial = ?", (serial,)).fetchone()
        if row is None:
            if only_if is not None:
                return
            db.execute(
                "INSERT INTO tokens (serial, state, users, accounts, firmware, desk, "
                "changed_at, first_seen_at) VALUES (?,?,?,?,?,?,?,?)",
                (serial, state, user or "", account or "", firmware, self._desk, now, now),
            )
            return
        if only_if is not None and row["state"] != only_if:
            return
        users, accounts = row["users"], row["accounts"]
        if state is InventoryState.ENROLLED:
            users, accounts = _added(users, user), _added(accounts, account)
        if state is InventoryState.BLANK and row["state"] != InventoryState.BLANK:
            state = InventoryState(row["state"])  # seen again: its state is what was done to it
        db.execute(
            "UPDATE tokens SET state = ?, users = ?, accounts = ?, "
            "firmware = COALESCE(?, firmware), desk = ?, changed_at = ? WHERE serial = ?",
            (state, users, accounts, firmware, self._desk, now, serial),
        )

    def token_seen(self, serial: int, firmware: str) -> None:
        with self._tx() as db:
            self._token(db, serial, InventoryState.BLANK, firmware=firmware)

    def mark_lost(self, serial: int, actor: str, reason: str) -> None:
        with self._tx() as db:
            self._token(db, serial, InventoryState.LOST)
            lost = InventoryState.LOST
            self._audit(db, actor, "lost", serial=serial, outcome=lost, reason=reason)

    def inventory(self, *, user: str | None = None, serial: int | None = None) -> list[TokenRecord]:
        with self._reading() as db:
            rows = db.execute("SELECT * FROM tokens ORDER BY serial").fetchall()
        records = [TokenRecord.from_row(r) for r in rows]
        return [
            r
            for r in records
            if (serial is None or r.serial == serial)
            and (user is None or user in r.users.split(";"))
        ]


def _added(listed: str, item: str | None) -> str:
    """``a;b`` with ``item`` added (once)."""
    items = [i for i in listed.split(";") if i]
    if item and item not in items:
        items.append(item)
    return ";".join(items)
