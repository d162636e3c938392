"""The tamper-evident audit trail: each record holds the hash of its desk's record
before it; `provisioner history --verify` walks every chain and names the first record
changed or missing. On SQLite here (the database's owner may drop the append-only
triggers); PostgreSQL's grants are tested in test_postgres_store.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from desk_harness import write_config
from provisioner.adapters.sqlite_store import SqliteStore
from provisioner.cli.main import main
from provisioner.core.audit import ChainWalk, record_hash


def trail(path: Path, desk: str = "berlin", n: int = 4) -> SqliteStore:
    store = SqliteStore(path, desk=desk)
    for i in range(n):
        store.audit("root", "queued", user=f"user{i}", serial=i + 1)
    return store


def walk(store: SqliteStore) -> ChainWalk:
    w = ChainWalk()
    for record in store.audit_trail():
        w.see(record.as_dict())
    return w


def tamper(path: Path, sql: str) -> None:
    """What the database's owner can do: drop the triggers, then change the rows."""
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute(sql)
    db.commit()
    db.close()


def test_each_record_holds_the_hash_of_the_one_before(tmp_path: Path) -> None:
    store = trail(tmp_path / "s.db")
    records = store.audit_trail()
    assert records[0].prev_hash is None
    for before, record in zip(records, records[1:], strict=False):
        assert record.prev_hash == before.hash
        assert record.hash == record_hash(record.prev_hash, record.as_dict())
    w = walk(store)
    assert w.checked == {"berlin": 4} and w.broken == {}


def test_two_desks_keep_two_chains(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a, b = SqliteStore(path, desk="a"), SqliteStore(path, desk="b")
    for i in range(3):
        a.audit("root", "queued", user=f"a{i}")
        b.audit("root", "queued", user=f"b{i}")
    w = walk(a)
    assert w.checked == {"a": 3, "b": 3} and w.broken == {}


@pytest.mark.parametrize(
    ("sql", "record", "why"),
    [
        ("UPDATE audit SET \"user\" = 'mallory' WHERE id = 2", 2, "was changed"),
        ("UPDATE audit SET at = at + 1 WHERE id = 3", 3, "was changed"),
        ("DELETE FROM audit WHERE id = 2", 3, "does not follow"),
        ("UPDATE audit SET hash = NULL WHERE id = 3", 3, "has lost its hash"),
    ],
)
def test_a_record_changed_or_missing_is_named(
    tmp_path: Path, sql: str, record: int, why: str
) -> None:
    path = tmp_path / "s.db"
    store = trail(path)
    tamper(path, sql)
    [broken] = walk(store).broken.values()
    assert (broken.desk, broken.record) == ("berlin", record)
    assert why in broken.line()


def test_records_from_before_the_chain_are_counted_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = trail(path, n=2)
    tamper(path, "UPDATE audit SET hash = NULL, prev_hash = NULL, desk = NULL")
    store.audit("root", "queued", user="later")
    w = walk(store)
    assert w.unchained == 2 and w.checked == {"berlin": 1} and w.broken == {}


def test_history_verify_says_intact_or_names_the_break_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    path = tmp_path / "state" / "provisioner.db"
    path.parent.mkdir()
    trail(path, desk="test-desk").close()
    assert main(["history", "--verify", "--config", str(config)]) == 0
    assert "desk test-desk: 4 records, chain intact" in capsys.readouterr().out
    tamper(path, "UPDATE audit SET reason = 'nothing to see' WHERE id = 2")
    assert main(["history", "--verify", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "provisioner: BROKEN: desk test-desk: record #2 was changed after it was written"
    )
