"""The SQLite store's file: its schema, the columns later versions added, and opening it
(private and migrated for writing, or read-only). The queries are in sqlite_store.py.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from provisioner.adapters.ownership import FILE_MODE, prepare_directory, private_file
from provisioner.core.errors import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    "user" TEXT NOT NULL,
    serial INTEGER,                    -- only this token, if given
    requested_by TEXT NOT NULL,
    requested_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',   -- waiting, taken, done, failed, cancelled,
                                             -- interrupted, withdrawn
    enrollment_id INTEGER,
    kind TEXT NOT NULL DEFAULT 'enroll',     -- enroll, resync, replace
    old_serial INTEGER,                      -- replace: the token to revoke, if given
    followed INTEGER NOT NULL DEFAULT 0,     -- 1: a client waits on it (enroll, not queue)
    accounts TEXT NOT NULL DEFAULT '',       -- enroll in these accounts (a,b); '': all
    desk TEXT,                               -- only this desk may serve it (NULL: any)
    taken_by TEXT                            -- the desk serving it
);
CREATE INDEX IF NOT EXISTS queue_by_state ON queue (state, id);
CREATE TABLE IF NOT EXISTS enrollments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    "user" TEXT NOT NULL,
    serial INTEGER,
    reader TEXT NOT NULL,
    source TEXT NOT NULL,              -- queue:<id> or roster
    started_at REAL NOT NULL,
    finished_at REAL,
    step TEXT NOT NULL,                -- the last step reached
    device_arn TEXT,
    outcome TEXT NOT NULL DEFAULT 'in progress',
    reason TEXT,
    -- the write-ahead journal: what may exist, updated before and after each side effect
    credential_id TEXT,
    device_state TEXT NOT NULL DEFAULT 'none',      -- none, maybe, created, maybe enabled,
                                                    -- enabled, confirmed, deleted
    credential_state TEXT NOT NULL DEFAULT 'none',  -- none, maybe, written, deleted
    owner TEXT,                        -- the owning process's token (ownership.py)
    owner_pid INTEGER,                 -- its pid, for the operator
    account TEXT NOT NULL DEFAULT '',  -- the account's name ('': the desk's own)
    batch INTEGER,                     -- the first record of an enrollment in several
                                       -- accounts: settled together, all or nothing
    desk TEXT                          -- the desk that runs it
);
CREATE TABLE IF NOT EXISTS token_cleanups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    serial INTEGER NOT NULL,
    credential_id TEXT NOT NULL,
    enrollment_id INTEGER,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    done_at REAL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    "user" TEXT,
    serial INTEGER,
    device_arn TEXT,
    outcome TEXT,
    reason TEXT,
    account TEXT,                      -- the account it happened in (NULL: the desk's own)
    desk TEXT,                         -- the desk that wrote it
    prev_hash TEXT,                    -- the hash of that desk's record before it
    hash TEXT                          -- this record's, over it and prev_hash (core/audit.py)
);
CREATE TABLE IF NOT EXISTS roster (
    serial INTEGER PRIMARY KEY,
    "user" TEXT NOT NULL,
    accounts TEXT NOT NULL DEFAULT '',
    taken_by TEXT                      -- the desk serving it
);
CREATE TABLE IF NOT EXISTS tokens (
    serial INTEGER PRIMARY KEY,
    state TEXT NOT NULL,               -- blank, enrolled, revoked, wiped, lost
    users TEXT NOT NULL DEFAULT '',    -- a;b
    accounts TEXT NOT NULL DEFAULT '', -- the accounts it holds credentials of (a;b)
    firmware TEXT,
    desk TEXT,                         -- where it last changed
    changed_at REAL NOT NULL,
    first_seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS desks (
    name TEXT PRIMARY KEY,             -- the desk's name (config: desk)
    version TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    beat_at REAL NOT NULL,             -- its last heartbeat
    status TEXT NOT NULL,              -- JSON: readers, tokens, work, last outcome
    stopped_at REAL                    -- it said it stopped
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


#: The database's name in the state directory.
STATE_FILE = "provisioner.db"
#: At least this umask while SQLite may create files: nothing of the state for others.
PRIVATE_UMASK = 0o027

#: Columns added after the first release: (table, column, declaration).
_ADDED_COLUMNS = (
    ("queue", "kind", "TEXT NOT NULL DEFAULT 'enroll'"),
    ("queue", "old_serial", "INTEGER"),
    ("enrollments", "owner", "TEXT"),
    ("enrollments", "owner_pid", "INTEGER"),
    ("queue", "followed", "INTEGER NOT NULL DEFAULT 0"),
    ("queue", "accounts", "TEXT NOT NULL DEFAULT ''"),
    ("enrollments", "account", "TEXT NOT NULL DEFAULT ''"),
    ("enrollments", "batch", "INTEGER"),
    ("audit", "account", "TEXT"),
    ("audit", "desk", "TEXT"),
    ("queue", "desk", "TEXT"),
    ("enrollments", "desk", "TEXT"),
    ("queue", "taken_by", "TEXT"),
    ("audit", "prev_hash", "TEXT"),
    ("audit", "hash", "TEXT"),
)


def open_database(path: Path) -> sqlite3.Connection:
    """The database for writing, created (0640, in a 0750 directory) and given the
    columns it lacks if an earlier version made it."""
    prepare_directory(path.parent)
    # Made 0640 before SQLite opens it: SQLite gives its -wal and -shm files the
    # database's mode (and, as root, its owner).
    private_file(path)
    old = os.umask(PRIVATE_UMASK)
    os.umask(old | PRIVATE_UMASK)
    try:
        with translated():
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            _add_missing_columns(db)
    finally:
        os.umask(old)
    tighten(path)
    return db


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A state file from an earlier version gets the columns it lacks (queue, journal
    and audit trail are kept)."""
    for table, column, declaration in _ADDED_COLUMNS:
        present = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def tighten(path: Path) -> None:
    """A state file made by an earlier version (0644): 0640, when it is ours to change."""
    for name in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        try:
            st = name.stat()
            if st.st_uid == os.geteuid() and st.st_mode & 0o777 != FILE_MODE:
                name.chmod(FILE_MODE)
        except FileNotFoundError:
            continue


def open_read_only(path: Path) -> sqlite3.Connection:
    """The database, read-only (SQLite's mode=ro), creating and changing nothing."""
    with translated():
        db = _connect_read_only(path)
    db.row_factory = sqlite3.Row
    return db


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A reader who may not write the directory cannot make the
    -wal and -shm files SQLite wants; when there is no -wal (no writer has it open, the
    last one to close folded it in) the file alone is the whole state, read as immutable."""
    uri = f"file:{quote(str(path))}?mode=ro"
    db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        db.close()
        if path.with_name(f"{path.name}-wal").exists():
            raise
        db = sqlite3.connect(
            f"{uri}&immutable=1", uri=True, check_same_thread=False, isolation_level=None
        )
    return db


@contextmanager
def translated() -> Iterator[None]:
    """SQLite's errors as the port's: StoreError, with the cause kept and its text."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(str(e)) from e
