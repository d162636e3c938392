"""The fleet's PostgreSQL store against a real server (a private cluster the session
starts): the schema made by its owner and refused when unknown, the desks' role kept to
its grants (the audit trail append-only by the database), the owner's tampering found by
the hash chain, one request never served twice, and a cut connection or a restarted
server survived. The store port's own contract runs on it in test_store_contract.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from provisioner.adapters.postgres_schema import SCHEMA_VERSION
from provisioner.adapters.postgres_store import RETRY_AFTER, PostgresStore, migrate
from provisioner.cli.main import main
from provisioner.core.audit import ChainWalk
from provisioner.core.errors import StoreError
from provisioner.core.store import RequestState

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def fleet(pg_db: Any) -> Iterator[Any]:
    migrate(pg_db.owner_url)
    opened: list[PostgresStore] = []

    def desk(name: str) -> PostgresStore:
        store = PostgresStore(pg_db.desk_url, desk=name)
        opened.append(store)
        return store

    yield desk
    for store in opened:
        store.close()


def test_a_desk_refuses_a_database_without_the_schema_and_says_the_command(pg_db: Any) -> None:
    with pytest.raises(StoreError) as caught:
        PostgresStore(pg_db.desk_url, desk="a")
    assert "has no schema; this provisioner needs version" in caught.value.one_line()
    assert "provisioner store migrate --url OWNER_URL" in caught.value.one_line()


def test_store_migrate_makes_the_schema_once_and_again_changes_nothing(
    pg_db: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["store", "migrate", "--url", pg_db.owner_url]) == 0
    assert f"schema version 0 -> {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["store", "migrate", "--url", pg_db.owner_url]) == 0
    assert f"schema version {SCHEMA_VERSION} already" in capsys.readouterr().out
    PostgresStore(pg_db.desk_url, desk="a").close()


def test_a_newer_schema_is_refused(pg_db: Any) -> None:
    migrate(pg_db.owner_url)
    pg_db.cluster.psql("INSERT INTO schema_version (version) VALUES (99)", database=pg_db.name)
    with pytest.raises(StoreError, match="schema version 99"):
        PostgresStore(pg_db.desk_url, desk="a")
    with pytest.raises(StoreError, match="newer than this provisioner"):
        migrate(pg_db.owner_url)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit SET reason = 'nothing happened'",
        "DELETE FROM audit",
        "TRUNCATE audit",
        "ALTER TABLE audit DISABLE TRIGGER ALL",
        "CREATE TABLE mine (x int)",
    ],
)
def test_the_desks_role_may_not_change_the_trail_or_the_schema(
    fleet: Any, pg_db: Any, sql: str
) -> None:
    fleet("a").audit("root", "queued", user="alice")
    with psycopg.connect(pg_db.desk_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)


def test_a_row_the_owner_changed_is_named_by_the_chain(fleet: Any, pg_db: Any) -> None:
    a, b = fleet("berlin"), fleet("lisbon")
    for i in range(3):
        a.audit("root", "queued", user=f"a{i}")
        b.audit("root", "queued", user=f"b{i}")
    with psycopg.connect(pg_db.owner_url) as conn:
        (target,) = conn.execute(
            "SELECT id FROM audit WHERE desk = 'lisbon' ORDER BY id OFFSET 1 LIMIT 1"
        ).fetchone()  # type: ignore[misc]
        conn.execute("UPDATE audit SET \"user\" = 'mallory' WHERE id = %s", (target,))
    walk = ChainWalk()
    for record in a.audit_trail():
        walk.see(record.as_dict())
    assert walk.checked["berlin"] == 3
    [broken] = walk.broken.values()
    assert (broken.desk, broken.record) == ("lisbon", target)


def test_one_request_is_served_once_whichever_desks_see_tokens_at_once(fleet: Any) -> None:
    desks = [fleet(f"desk{i}") for i in range(3)]
    desks[0].enqueue("alice", "root")
    start = threading.Barrier(len(desks))
    taken: list[Any] = []

    def take(store: PostgresStore) -> None:
        start.wait()
        entry = store.take_next(None)
        if entry is not None:
            taken.append(entry)

    threads = [threading.Thread(target=take, args=(d,)) for d in desks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(taken) == 1 and taken[0].user == "alice"


def test_a_request_for_one_desk_waits_for_it(fleet: Any) -> None:
    berlin, lisbon = fleet("berlin"), fleet("lisbon")
    berlin.enqueue("alice", "root", desk="lisbon")
    assert berlin.take_next(None) is None
    entry = lisbon.take_next(None)
    assert entry is not None and entry.taken_by == "lisbon"


def test_the_steps_of_an_enrollment_are_one_statement_each(fleet: Any) -> None:
    """Round trips, counted: taking a request, starting the record and each journal fact
    send one statement each, no BEGIN/COMMIT around them, no read after the write, and
    no check of the connection before it is lent."""
    from provisioner.core.ports import Fact

    store = fleet("a")
    store.enqueue("alice", "root")
    spent = []
    for step in (
        lambda: store.take_next(12345678),
        lambda: store.start_enrollment("alice", 12345678, "reader", "queue:1"),
        lambda: store.record_fact(1, Fact.DEVICE_REQUESTED),
        lambda: store.finish_entry(1, RequestState.DONE, 1),
    ):
        before = store.round_trips
        step()
        spent.append(store.round_trips - before)
    assert spent == [1, 1, 1, 1]
    assert store.queue_entry(1).state == RequestState.DONE  # type: ignore[union-attr]


def test_a_cut_connection_is_replaced_and_nothing_is_lost(fleet: Any, pg_db: Any) -> None:
    store = fleet("a")
    store.enqueue("alice", "root")
    assert pg_db.cluster.terminate_connections("provisioner_desk") >= 1
    assert store.queue_length() == 1  # a new connection, the same data
    store.enqueue("bob", "root")
    assert [e.user for e in store.waiting()] == ["alice", "bob"]


def test_the_database_stopped_is_one_line_and_its_return_is_taken_up(
    fleet: Any, pg_db: Any
) -> None:
    store = fleet("a")
    store.enqueue("alice", "root")
    pg_db.cluster.stop()
    try:
        with pytest.raises(StoreError) as caught:
            store.enqueue("bob", "root")
        assert "\n" not in caught.value.one_line()
        assert "the fleet's database postgresql://provisioner_desk@" in caught.value.one_line()
    finally:
        pg_db.cluster.start()
    time.sleep(RETRY_AFTER)  # calls fail at once for a moment after one found it away
    store.enqueue("bob", "root")
    assert [e.user for e in store.waiting()] == ["alice", "bob"]


def test_no_password_in_a_message(pg_db: Any, tmp_path: Path) -> None:
    url = pg_db.desk_url.replace("provisioner_desk@", "provisioner_desk:s3cret-pw@")
    with pytest.raises(StoreError) as caught:
        PostgresStore(url, desk="a")
    assert "s3cret-pw" not in caught.value.one_line()


def test_every_desk_beats_into_one_fleet(fleet: Any) -> None:
    for name in ("berlin", "lisbon", "porto"):
        fleet(name).heartbeat("0.1.0", 100, 1.0, '{"tokens": 0}')
    fleet("lisbon").heartbeat("0.1.0", 101, 2.0, '{"tokens": 1}', stopped=True)
    desks = {d.name: d for d in fleet("any").desks()}
    assert sorted(desks) == ["berlin", "lisbon", "porto"]
    assert desks["lisbon"].pid == 101 and desks["lisbon"].stopped_at is not None
    assert desks["berlin"].stopped_at is None


# --- a desk's SQLite history moved into the fleet ----------------------------------------


def _sqlite_history(path: Path) -> None:
    from provisioner.adapters.sqlite_store import SqliteStore
    from provisioner.core.messages import Outcome

    old = SqliteStore(path, desk="berlin")
    old.enqueue("carol", "root")
    eid = old.start_enrollment("alice", 7, "reader", "roster")
    old.finish_enrollment(eid, outcome=Outcome.ENROLLED, actor="roster", device_arn="arn:a")
    old.add_token_cleanup(8, "AWS:bob@123456789012", None, "revoked")
    old.audit("root", "revoked", user="bob", serial=8)
    old.close()


def test_import_sqlite_moves_a_desks_history_once(
    fleet: Any, pg_db: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from desk_harness import write_config

    path = tmp_path / "old.db"
    _sqlite_history(path)
    fleet("berlin").audit("root", "started")  # the desk already wrote to the fleet
    config = write_config(tmp_path, f'[store]\nurl = "{pg_db.desk_url}"\n')
    args = ["store", "import-sqlite", str(path), "--desk", "berlin", "--config", str(config)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "imported 1 enrollments, 1 token_cleanups, 1 queue, 3 audit records" in out
    assert main(args) == 0
    assert (
        "imported 0 enrollments, 0 token_cleanups, 0 queue, 0 audit records; 6 already there"
        in (capsys.readouterr().out)
    )
    store = fleet("berlin")
    walk = ChainWalk()
    for record in store.audit_trail():
        walk.see(record.as_dict())
    assert walk.broken == {} and walk.checked == {"berlin": 4}
    assert [e.user for e in store.waiting()] == ["carol"]
    assert [c.serial for c in store.token_cleanups()] == [8]


def test_import_sqlite_refuses_a_broken_trail_or_unfinished_work(
    fleet: Any, tmp_path: Path
) -> None:
    import sqlite3

    from provisioner.adapters.postgres_import import import_sqlite
    from provisioner.adapters.sqlite_store import SqliteStore

    path = tmp_path / "old.db"
    _sqlite_history(path)
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET actor = 'mallory' WHERE id = 1")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="its audit trail is not intact: desk berlin: record #1"):
        import_sqlite(fleet("berlin"), path, "berlin")
    busy = tmp_path / "busy.db"
    SqliteStore(busy, desk="porto").start_enrollment("dave", 9, "reader", "roster")
    with pytest.raises(StoreError, match="holds unfinished enrollments"):
        import_sqlite(fleet("porto"), busy, "porto")


def test_two_desks_claiming_one_rostered_serial_one_wins(fleet: Any) -> None:
    from provisioner.core.roster import parse

    berlin, lisbon = fleet("berlin"), fleet("lisbon")
    berlin.load_roster(parse("serial,user\n7,alice\n", "r.csv"), "root")
    start = threading.Barrier(2)
    got: dict[str, Any] = {}

    def take(name: str, store: PostgresStore) -> None:
        start.wait()
        got[name] = store.take_rostered(7)

    threads = [
        threading.Thread(target=take, args=item)
        for item in (("berlin", berlin), ("lisbon", lisbon))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(v is None for v in got.values()) == [False, True]
    winner = next(name for name, v in got.items() if v is not None)
    loser = fleet("berlin" if winner == "lisbon" else "lisbon")
    fleet(winner).release_rostered(7)  # its enrollment failed: free again
    assert loser.take_rostered(7) == ("alice", "")


def test_while_the_database_is_away_calls_fail_at_once_then_it_is_tried_again(
    pg_db: Any,
) -> None:
    import time as clock_time

    migrate(pg_db.owner_url)
    now = [1_000.0]
    store = PostgresStore(pg_db.desk_url, lambda: now[0], desk="a")
    try:
        store.enqueue("alice", "root")
        pg_db.cluster.stop()
        try:
            with pytest.raises(StoreError):
                store.queue_length()  # finds it away (after waiting for a connection)
            started = clock_time.monotonic()
            with pytest.raises(StoreError, match="is unreachable"):
                store.queue_length()
            assert clock_time.monotonic() - started < 0.5  # at once, not 5 s
        finally:
            pg_db.cluster.start()
        with pytest.raises(StoreError, match="is unreachable"):
            store.queue_length()  # not tried again yet
        now[0] += 10
        assert store.queue_length() == 1
    finally:
        store.close()
