"""The state file across versions: a queue written before request kinds existed."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from provisioner.adapters.sqlite_store import Store
from provisioner.core.errors import StoreError

FIRST_RELEASE_QUEUE = """
CREATE TABLE queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    serial INTEGER,
    requested_by TEXT NOT NULL,
    requested_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',
    enrollment_id INTEGER
);
INSERT INTO queue (user, serial, requested_by, requested_at) VALUES ('alice', 7, 'root', 1.0);
"""


def _first_release(tmp_path: Path) -> Path:
    path = tmp_path / "provisioner.db"
    with sqlite3.connect(path) as db:
        db.executescript(FIRST_RELEASE_QUEUE)
    return path


def test_a_queue_from_the_first_release_keeps_its_requests_as_enrollments(
    tmp_path: Path,
) -> None:
    path = _first_release(tmp_path)
    store = Store(path)
    try:
        (entry,) = store.waiting()
        assert (entry.user, entry.serial, entry.kind, entry.old_serial) == (
            "alice",
            7,
            "enroll",
            None,
        )
        later = store.enqueue("bob", "root", 8, kind="replace", old_serial=6)
        assert (later.kind, later.old_serial) == ("replace", 6)
    finally:
        store.close()
    Store(path).close()  # a second opening finds nothing to add


def test_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "provisioner.db")
    try:
        with pytest.raises(ValueError, match="unknown request kind"):
            store.enqueue("alice", "root", kind="format")
        assert store.waiting() == []
    finally:
        store.close()


def test_a_fresh_state_is_private_under_a_permissive_umask(tmp_path: Path) -> None:
    """The queue holds user names: neither the database nor its WAL and shared-memory
    files, nor the directory listing them, may be readable by others."""
    state = tmp_path / "state"
    old = os.umask(0o022)
    try:
        store = Store(state / "provisioner.db")
        try:
            store.enqueue("alice", "root")  # a user name in the WAL now
            modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
        finally:
            store.close()
    finally:
        os.umask(old)
    assert set(modes) == {"provisioner.db", "provisioner.db-wal", "provisioner.db-shm"}
    assert modes == dict.fromkeys(modes, 0o640)
    assert state.stat().st_mode & 0o777 == 0o750


def test_a_queue_from_an_earlier_release_gains_the_followed_flag_in_place(
    tmp_path: Path,
) -> None:
    store = Store(_first_release(tmp_path))
    try:
        assert store.settle_taken() == (0, 0)  # what a daemon does at start-up
        (entry,) = store.waiting()
        assert (entry.user, entry.followed) == ("alice", False)  # nobody followed it: kept
        followed = store.enqueue("bob", "root", followed=True)
        assert followed.followed is True
    finally:
        store.close()


def test_a_file_that_is_no_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "state" / "provisioner.db"
    path.parent.mkdir(mode=0o750)
    path.write_bytes(b"not a database, but long enough to have a header" * 4)
    with pytest.raises(StoreError) as raised:
        Store(path)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    with pytest.raises(StoreError):
        Store(path, read_only=True)


# --- the journal while the store is away -------------------------------------------------


class _Flaky:
    """A store that refuses writes while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.facts: list[str] = []
        self.writes = 0

    def record_fact(self, enrollment_id: int, fact: object, **_: object) -> None:
        self.record_facts(enrollment_id, [(fact, None, None)])

    def record_facts(self, enrollment_id: int, facts: list[tuple[object, ...]]) -> None:
        from provisioner.core.errors import StoreError

        if self.down:
            raise StoreError("the fleet's database is restarting")
        self.facts.extend(str(f[0]) for f in facts)
        self.writes += 1


def test_facts_of_what_was_done_are_kept_while_the_store_is_away_and_written_in_order() -> None:
    from provisioner.core.ports import Fact
    from provisioner.core.store import EnrollmentJournal

    store = _Flaky()
    journal = EnrollmentJournal(store, 1)
    journal.record(Fact.DEVICE_REQUESTED)
    store.down = True
    journal.record(Fact.DEVICE_CREATED)  # done in IAM: kept, the enrollment goes on
    journal.record(Fact.DEVICE_DELETED)
    assert journal.pending == 2 and store.facts == ["device requested"]
    store.down = False
    journal.record(Fact.CREDENTIAL_DELETED)
    assert journal.pending == 0
    assert store.facts == [
        "device requested",
        "device created",
        "device deleted",
        "credential deleted",
    ]


def test_a_deferring_journal_writes_what_was_done_with_the_next_request_in_one_write() -> None:
    from provisioner.core.ports import Fact
    from provisioner.core.store import EnrollmentJournal

    store = _Flaky()
    journal = EnrollmentJournal(store, 1, defer_after=True)
    journal.record(Fact.DEVICE_REQUESTED)
    journal.record(Fact.DEVICE_CREATED)  # kept until the next "requested"
    assert store.facts == ["device requested"] and journal.pending == 1
    journal.record(Fact.CREDENTIAL_REQUESTED)
    assert store.facts[1:] == ["device created", "credential requested"]
    journal.record(Fact.CREDENTIAL_WRITTEN)
    journal.record(Fact.ENABLE_REQUESTED)
    journal.record(Fact.ENABLED)
    journal.record(Fact.CONFIRMED)
    journal.flush()  # the owner's, at the end
    assert store.facts == [f.value for f in Fact][:7]
    assert store.writes == 4  # seven facts, four writes


def test_a_fact_written_before_its_side_effect_is_never_kept() -> None:
    from provisioner.core.errors import StoreError
    from provisioner.core.ports import Fact
    from provisioner.core.store import EnrollmentJournal

    store = _Flaky()
    journal = EnrollmentJournal(store, 1)
    store.down = True
    for fact in (Fact.DEVICE_REQUESTED, Fact.CREDENTIAL_REQUESTED, Fact.ENABLE_REQUESTED):
        with pytest.raises(StoreError):
            journal.record(fact)
    assert journal.pending == 0
