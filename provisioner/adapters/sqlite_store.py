"""The desk's store in SQLite: one desk's state in its StateDirectory (/var/lib/provisioner),
surviving restarts, readable by nobody but its owner and group (0640, in a 0750 directory:
the queue names users).

One connection and one lock; every write a transaction flushed before the call returns
(synchronous=FULL). The queries are sql_store.py's, shared with PostgreSQL; the schema,
the columns later versions added and the opening of the file are in sqlite_schema.py.
SQLite's own errors become StoreError here (the cause kept).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from provisioner.adapters.sql_store import SqlStore
from provisioner.adapters.sqlite_schema import open_database, open_read_only, translated
from provisioner.core.store import RecordOwner


class SqliteStore(SqlStore):
    """Thread-safe access to the state database (one connection, one lock).

    ``read_only``: open an existing database to read it (SQLite's mode=ro), creating and
    changing nothing.
    """

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        *,
        owner: RecordOwner | None = None,
        read_only: bool = False,
        desk: str = "",
    ) -> None:
        super().__init__(clock, owner=owner, desk=desk)
        self.path = path
        self._lock = threading.Lock()
        self._db = open_read_only(path) if read_only else open_database(path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, under the lock."""
        with self._lock, translated():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read, under the lock."""
        with self._lock, translated():
            yield self._db


#: The name the tests and the bench have long used.
Store = SqliteStore
