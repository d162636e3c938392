"""The desk's store in PostgreSQL: a fleet of desks on one database (``[store] url``).

psycopg 3 with a small connection pool: the daemon's token workers each take a
connection for one transaction and give it back. The queries are sql_store.py's, shared
with SQLite; the schema and its grants are postgres_schema.py's, applied by the database's
owner (``provisioner store migrate``), never by a desk. psycopg's errors become StoreError
here (the cause kept); nothing outside the adapter knows psycopg. A password never
appears in a message: the URL is shown without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from provisioner.adapters.postgres_schema import (
    DESK_ROLE,
    GRANTS,
    MIGRATIONS,
    SCHEMA_VERSION,
    desk_role_name,
    installed_version,
)
from provisioner.adapters.sql_store import Connection, Cursor, SqlStore
from provisioner.core.errors import StoreError
from provisioner.core.store import RecordOwner

log = logging.getLogger("provisioner.store")
_T = TypeVar("_T")

#: Seconds one connection attempt may take (libpq's connect_timeout).
CONNECT_TIMEOUT = 5.0
#: Seconds a call waits for a connection from the pool before saying the database is
#: away: short, so that a control request answers within its client's patience.
POOL_WAIT = 2.0
#: Seconds after a call found the database away during which calls fail at once.
RETRY_AFTER = 3.0


def shown(url: str) -> str:
    """The URL as a message may show it: without a password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


@contextmanager
def translated(url: str) -> Iterator[None]:
    """psycopg's errors as the port's: StoreError, naming the database, the cause kept."""
    try:
        yield
    except PoolTimeout as e:
        raise StoreError(
            f"no connection to the fleet's database {shown(url)} within {POOL_WAIT:.0f} s",
            hint="check that PostgreSQL runs and the desk may reach it ([store] url)",
        ) from e
    except psycopg.Error as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"the fleet's database {shown(url)}: {detail}") from e


class _Lent:
    """A connection lent by the pool, replaced once if the server had cut it while it
    waited there (a restart, a failover, an administrator): its first statement then
    fails before the server did anything with it, and is sent again on a fresh one. No
    check before lending (a round trip for every statement otherwise)."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        self._pool = pool
        self.connection = pool.getconn()
        self.used = False
        self._given_back = False

    def cut(self, error: psycopg.OperationalError) -> bool:
        """Whether ``error``, on the first statement, says the server had cut this
        connection: then it is replaced (and the pool's other idle ones checked: a
        restart cuts them all)."""
        if self.used or not self.connection.broken:
            return False
        log.info("a pooled connection the server had cut is replaced: %s", error)
        self._pool.putconn(self.connection)  # a closed connection is thrown away, not pooled
        self._given_back = True
        self._pool.check()
        self.connection = self._pool.getconn()  # the database away: PoolTimeout, said so
        self._given_back = False
        return True

    def give_back(self) -> None:
        if not self._given_back:
            self._pool.putconn(self.connection)

    def send(
        self, call: Callable[[psycopg.Connection[Any]], _T], counted: Callable[[], None]
    ) -> _T:
        """``call`` on this connection (a round trip, ``counted``); the first one sent
        again, on a fresh connection, if the server had cut this one."""
        counted()
        try:
            return call(self.connection)
        except psycopg.OperationalError as e:
            if not self.cut(e):
                raise
            counted()
            return call(self.connection)
        finally:
            self.used = True


class _Qmark:
    """A lent connection that takes the shared queries' ``?`` placeholders, counting
    the statements it sends (round trips to the database: the bench reports them)."""

    def __init__(self, lent: _Lent, count: Callable[[], None]) -> None:
        self._lent = lent
        self._count = count

    def execute(self, sql: str, params: Any = (), /) -> Cursor:
        query = sql.replace("?", "%s")
        cursor: Cursor = self._lent.send(lambda c: c.execute(query, params or None), self._count)
        return cursor


class PostgresStore(SqlStore):
    """The store on a PostgreSQL database whose schema ``migrate`` made; refuses one of
    another version (StoreError saying the command to run)."""

    def __init__(
        self,
        url: str,
        clock: Callable[[], float] = time.time,
        *,
        owner: RecordOwner | None = None,
        password: str | None = None,
        desk: str = "",
        min_size: int = 1,
        max_size: int = 8,
    ) -> None:
        super().__init__(clock, owner=owner, desk=desk)
        self.url = url
        #: Statements sent so far (with each transaction's BEGIN and COMMIT).
        self.round_trips = 0
        self._away_since = self._away_until = 0.0
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={
                "row_factory": dict_row,
                # a statement outside `_tx` is its own transaction: no BEGIN/COMMIT (or a
                # ROLLBACK when a read's connection goes back to the pool) around it
                "autocommit": True,
                "connect_timeout": int(CONNECT_TIMEOUT),
                **({"password": password} if password else {}),
            },
            timeout=POOL_WAIT,
            open=False,
            name="provisioner-store",
        )
        with translated(url):
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        try:
            self._check_version()
        except BaseException:
            self._pool.close()
            raise

    def _check_version(self) -> None:
        with self._reading() as db:
            version = installed_version(lambda sql: next(iter(db.execute(sql).fetchone().values())))
        if version != SCHEMA_VERSION:
            what = "no schema" if version == 0 else f"schema version {version}"
            raise StoreError(
                f"the fleet's database {shown(self.url)} has {what}; this provisioner "
                f"needs version {SCHEMA_VERSION}",
                hint="as the database's owner: provisioner store migrate --url OWNER_URL"
                if version < SCHEMA_VERSION
                else "upgrade provisioner on this desk to the fleet's version",
            )

    def close(self) -> None:
        self._pool.close()

    def _counted(self) -> None:
        self.round_trips += 1

    @contextmanager
    def _lent(self) -> Iterator[_Lent]:
        with self._reachable():
            lent = _Lent(self._pool)
            try:
                yield lent
            finally:
                lent.give_back()

    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def _lock_chain(self, db: Connection) -> None:
        db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"audit {self._desk}",))

    @contextmanager
    def _tx(self) -> Iterator[_Qmark]:
        """One write transaction on a connection of the pool (its BEGIN the first
        statement: sent again on a fresh connection if the server had cut this one)."""
        with self._lent() as lent, ExitStack() as stack:
            lent.send(lambda c: stack.enter_context(c.transaction()), self._counted)  # BEGIN
            self.round_trips += 1  # and COMMIT
            yield _Qmark(lent, self._counted)

    @contextmanager
    def _reading(self) -> Iterator[_Qmark]:
        with self._lent() as lent:
            yield _Qmark(lent, self._counted)

    _write = _reading  # autocommit: one statement, one round trip

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """``translated``, and fail fast: after a call found the database away, the next
        ones for ``RETRY_AFTER`` seconds say so at once instead of each waiting for a
        connection (a desk's steps must not stall while the database restarts)."""
        now = self._clock()
        if now < self._away_until:
            raise StoreError(
                f"the fleet's database {shown(self.url)} is unreachable (tried "
                f"{now - self._away_since:.0f} s ago; tried again in "
                f"{self._away_until - now:.0f} s)",
                hint="check that PostgreSQL runs and the desk may reach it ([store] url)",
            )
        try:
            with translated(self.url):
                yield
        except StoreError as e:
            if isinstance(e.__cause__, PoolTimeout | psycopg.OperationalError):
                self._away_since, self._away_until = now, self._clock() + RETRY_AFTER
            raise


def migrate(owner_url: str, desk_role: str = DESK_ROLE) -> tuple[int, int]:
    """Create or upgrade the schema as the database's owner, and grant ``desk_role`` what
    desks need. Returns (version before, version after)."""
    with (
        translated(owner_url),
        psycopg.connect(owner_url, connect_timeout=int(CONNECT_TIMEOUT)) as conn,
    ):
        with conn.transaction():
            # one migration at a time, whoever else runs it
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('provisioner migrate'))")
            before = installed_version(lambda sql: conn.execute(sql).fetchone()[0])  # type: ignore[index]
            if before > SCHEMA_VERSION:
                raise StoreError(
                    f"the database has schema version {before}, newer than this "
                    f"provisioner's {SCHEMA_VERSION}",
                    hint="migrate with the newest provisioner of the fleet",
                )
            for version in range(before + 1, SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[version])
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            role = sql.Identifier(desk_role_name(desk_role))
            for grant in GRANTS:
                conn.execute(sql.SQL(grant).format(role=role))
    return before, SCHEMA_VERSION
