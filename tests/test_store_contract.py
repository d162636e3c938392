"""What every adapter of the store port must do: the daemon, the CLI's direct mode and
recovery rely on exactly this. A new adapter (a fleet's database) is one more entry in
ADAPTERS, and must pass all of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.adapters.sqlite_store import SqliteStore
from provisioner.core.errors import QueueFull, StoreError, TokenNotFound
from provisioner.core.messages import Outcome
from provisioner.core.ports import Fact
from provisioner.core.store import (
    CredentialState,
    DeskStore,
    DeviceState,
    EnrollmentRecord,
    QueueEntry,
    RequestKind,
    RequestState,
)

ARN = "arn:aws:iam::123456789012:mfa/provisioner/alice.yubikey.1"


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _sqlite(tmp_path: Path, clock: Callable[[], float]) -> DeskStore:
    store: DeskStore = SqliteStore(tmp_path / "state" / "provisioner.db", clock)
    return store


def _postgres(request: pytest.FixtureRequest, clock: Callable[[], float]) -> DeskStore:
    """A fresh database of the session's private PostgreSQL cluster, migrated by its
    owner, opened as the desks' role."""
    from provisioner.adapters.postgres_store import PostgresStore, migrate

    db = request.getfixturevalue("pg_db")
    migrate(db.owner_url)
    store: DeskStore = PostgresStore(db.desk_url, clock, desk="test-desk")
    return store


ADAPTERS = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeskStore]:
    if request.param == "sqlite":
        opened = _sqlite(tmp_path, _Clock())
    else:
        opened = _postgres(request, _Clock())
    yield opened
    opened.close()


def test_requests_are_served_oldest_first_and_typed(store: DeskStore) -> None:
    first = store.enqueue("alice", "root")
    store.enqueue("bob", "root", 7, kind=RequestKind.RESYNC)
    assert isinstance(first, QueueEntry)
    assert first.state is RequestState.WAITING and first.kind is RequestKind.ENROLL
    assert store.queue_length() == 2
    taken = store.take_next(None)
    assert taken is not None and taken.user == "alice"
    again = store.queue_entry(taken.id)
    assert again is not None and again.state is RequestState.TAKEN
    assert [e.user for e in store.waiting()] == ["alice", "bob"]  # open: waiting or taken
    store.finish_entry(taken.id, RequestState.DONE, None)
    assert [e.user for e in store.waiting()] == ["bob"]


def test_a_request_for_one_token_waits_for_that_token(store: DeskStore) -> None:
    store.enqueue("bob", "root", 7)
    assert store.take_next(8) is None
    entry = store.take_next(7)
    assert entry is not None and entry.serial == 7


def test_the_queue_is_bounded(store: DeskStore) -> None:
    store.enqueue("alice", "root", limit=1)
    with pytest.raises(QueueFull):
        store.enqueue("bob", "root", limit=1)


def test_a_cancelled_request_is_never_served(store: DeskStore) -> None:
    entry = store.enqueue("alice", "root")
    cancelled = store.cancel(entry.id, "root")
    assert cancelled is not None and cancelled.id == entry.id
    assert store.take_next(None) is None
    assert store.cancel(entry.id, "root") is None


def test_the_journal_moves_the_record_through_its_states(store: DeskStore) -> None:
    eid = store.start_enrollment("alice", 1, "reader 0", "roster")
    record = store.enrollment(eid)
    assert isinstance(record, EnrollmentRecord)
    assert record.outcome == Outcome.IN_PROGRESS and not record.enrolled
    assert record.device_state is DeviceState.NONE
    journal = store.journal(eid)
    journal.record(Fact.DEVICE_REQUESTED, device_arn=ARN)
    journal.record(Fact.CREDENTIAL_WRITTEN, credential_id="AWS:alice@1")
    record = store.enrollment(eid)
    assert record is not None
    assert record.device_state is DeviceState.MAYBE and record.device_state.may_exist
    assert record.credential_state is CredentialState.WRITTEN
    assert (record.device_arn, record.credential_id) == (ARN, "AWS:alice@1")
    assert [r.id for r in store.unfinished_enrollments()] == [eid]
    journal.record(Fact.CONFIRMED)
    store.finish_enrollment(eid, outcome=Outcome.ENROLLED, actor="desk", device_arn=ARN)
    record = store.enrollment(eid)
    assert record is not None and record.enrolled and record.finished_at is not None
    assert store.unfinished_enrollments() == []
    assert store.enrollment(eid + 100) is None


def test_facts_written_together_leave_the_record_as_written_one_by_one(
    store: DeskStore,
) -> None:
    eid = store.start_enrollment("alice", 1, "reader 0", "queue:1")
    store.record_facts(
        eid,
        [
            (Fact.DEVICE_REQUESTED, ARN, None),
            (Fact.DEVICE_CREATED, None, None),
            (Fact.CREDENTIAL_REQUESTED, None, "AWS:alice@1"),
            (Fact.CREDENTIAL_WRITTEN, None, None),
            (Fact.ENABLE_REQUESTED, None, None),
        ],
    )
    record = store.enrollment(eid)
    assert record is not None
    assert record.device_state is DeviceState.MAYBE_ENABLED
    assert record.credential_state is CredentialState.WRITTEN
    assert (record.device_arn, record.credential_id) == (ARN, "AWS:alice@1")


def test_a_record_started_before_its_plug_learns_its_token(store: DeskStore) -> None:
    eid = store.start_enrollment("alice", None, "", "queue:1")
    store.record_fact(eid, Fact.DEVICE_CREATED, device_arn=ARN)
    store.attach_token(eid, 12345678, "reader 0")
    record = store.enrollment(eid)
    assert record is not None
    assert (record.serial, record.reader, record.device_arn) == (12345678, "reader 0", ARN)


def test_a_device_a_failed_rollback_left_is_remembered(store: DeskStore) -> None:
    eid = store.start_enrollment("alice", 1, "reader 0", "roster")
    store.record_fact(eid, Fact.DEVICE_CREATED, device_arn=ARN)
    store.finish_enrollment(eid, outcome=Outcome.FAILED_NOT_ROLLED_BACK, actor="desk")
    assert store.left_behind() == {ARN}


@dataclass
class _Owner:
    token: str
    pid: int


def test_a_record_is_taken_over_once(store: DeskStore) -> None:
    eid = store.start_enrollment("alice", 1, "reader 0", "roster", owner=_Owner("dead", 1))
    record = store.enrollment(eid)
    assert record is not None and (record.owner, record.owner_pid) == ("dead", 1)
    assert store.claim_enrollment(eid, "dead", _Owner("recovery", 2))
    assert not store.claim_enrollment(eid, "dead", _Owner("another", 3))  # not twice
    record = store.enrollment(eid)
    assert record is not None and record.owner == "recovery"


def test_token_cleanups_wait_for_their_token(store: DeskStore) -> None:
    store.add_token_cleanup(1, "AWS:alice@1", None, "its device was removed")
    assert store.token_cleanups(2) == []
    (cleanup,) = store.token_cleanups(1)
    assert (cleanup.serial, cleanup.credential_id) == (1, "AWS:alice@1")
    store.finish_token_cleanup(cleanup.id, "desk", "removed")
    assert store.token_cleanups() == []
    assert store.history(limit=1)[0].event == "token cleanup"


def test_the_audit_trail_answers_in_order_with_filters(store: DeskStore) -> None:
    store.audit("root", "queued", user="alice")
    store.audit("desk", "enrolled", user="bob", serial=2, outcome=Outcome.ENROLLED)
    records = store.history(limit=10)
    assert [r.user for r in records] == ["alice", "bob"]
    assert [r.user for r in store.history(limit=10, user="alice")] == ["alice"]
    assert [r.serial for r in store.history(limit=10, serial=2)] == [2]
    assert records[1].as_dict()["outcome"] == "enrolled"


def test_the_queue_answers_its_length_and_its_head(store: DeskStore) -> None:
    first = store.enqueue("alice", "root")
    store.enqueue("bob", "root")
    store.enqueue("carol", "root")
    assert store.queue_length(up_to=first.id) == 1
    assert store.queue_length(up_to=first.id + 1) == 2
    assert [e.user for e in store.waiting(limit=2)] == ["alice", "bob"]


def test_a_roster_token_serves_only_its_users_enrollments(store: DeskStore) -> None:
    store.enqueue("alice", "root", kind=RequestKind.REPLACE)
    store.enqueue("bob", "root")
    store.enqueue("carol", "root")
    assert store.take_next(None, users=()) is None
    entry = store.take_next(None, users={"alice", "carol"})
    assert entry is not None and entry.user == "carol"  # alice's is a replace
    entry = store.take_next(None)
    assert entry is not None and entry.user == "alice" and entry.kind is RequestKind.REPLACE


def test_a_served_request_ends_as_it_went(store: DeskStore) -> None:
    entry = store.enqueue("alice", "root")
    store.take_next(None)
    store.finish_entry(entry.id, RequestState.FAILED, None)
    ended = store.queue_entry(entry.id)
    assert ended is not None and ended.state is RequestState.FAILED
    assert store.cancel(entry.id, "root") is None  # only a waiting request is cancelled
    assert store.queue_entry(entry.id + 100) is None


def test_a_restart_settles_what_the_stopped_daemon_left_open(store: DeskStore) -> None:
    started = store.enqueue("alice", "root")
    unstarted = store.enqueue("bob", "root")
    followed = store.enqueue("carol", "carol", followed=True)
    queued = store.enqueue("dave", "root")
    for _ in range(3):
        store.take_next(None)
    store.link_entry(started.id, store.start_enrollment("alice", 1, "reader 0", "queue"))
    assert store.settle_taken() == (1, 1)
    states = {e: store.queue_entry(e.id) for e in (started, unstarted, followed, queued)}
    assert {e.user: s.state for e, s in states.items() if s is not None} == {
        "alice": RequestState.INTERRUPTED,
        "bob": RequestState.WAITING,
        "carol": RequestState.WITHDRAWN,
        "dave": RequestState.WAITING,
    }
    withdrawn = store.history(limit=1)[0]
    assert (withdrawn.event, withdrawn.user, withdrawn.actor) == ("withdrawn", "carol", "daemon")


def test_a_followed_request_is_withdrawn_once(store: DeskStore) -> None:
    entry = store.enqueue("alice", "alice", followed=True)
    assert entry.followed
    withdrawn = store.withdraw(entry.id)
    assert withdrawn is not None and withdrawn.id == entry.id
    assert store.withdraw(entry.id) is None
    again = store.queue_entry(entry.id)
    assert again is not None and again.state is RequestState.WITHDRAWN


def test_a_record_taken_over_can_be_handed_back(store: DeskStore) -> None:
    eid = store.start_enrollment("alice", 1, "reader 0", "roster", owner=_Owner("dead", 1))
    assert store.claim_enrollment(eid, "dead")  # for the store's own owner: none here
    store.release_enrollment(eid)
    record = store.enrollment(eid)
    assert record is not None and (record.owner, record.owner_pid) == (None, None)
    assert store.claim_enrollment(eid, None, _Owner("recovery", 2))


def test_a_finished_record_is_never_taken_over(store: DeskStore) -> None:
    eid = store.start_enrollment("alice", 1, "reader 0", "roster", owner=_Owner("dead", 1))
    store.record_step(eid, "create", device_arn=ARN)
    store.finish_enrollment(eid, outcome=Outcome.ROLLED_BACK, actor="reconcile", reason="why")
    assert not store.claim_enrollment(eid, "dead", _Owner("recovery", 2))
    record = store.enrollment(eid)
    assert record is not None
    assert (record.step, record.device_arn, record.outcome, record.reason) == (
        "create",
        ARN,
        Outcome.ROLLED_BACK,
        "why",
    )
    assert not record.enrolled
    trail = store.history(limit=1)[0]
    assert (trail.event, trail.actor, trail.device_arn, trail.outcome) == (
        "enrollment",
        "reconcile",
        ARN,
        "rolled back",
    )


def test_a_resync_is_audited_as_it_ended(store: DeskStore) -> None:
    store.audit_resync("root", "alice", 1, (ARN, 7))
    store.audit_resync("root", "bob", 2, TokenNotFound("no token 2"))
    done, failed = store.history(limit=2)
    assert (done.event, done.outcome, done.device_arn, done.reason) == (
        "resync",
        "resynced",
        ARN,
        "time steps 7 and 8",
    )
    assert (failed.outcome, failed.user) == ("failed", "bob")
    assert failed.reason is not None and failed.reason.startswith("no token 2")


def test_the_audit_trail_answers_the_latest_since_a_time(store: DeskStore) -> None:
    for user in ("alice", "bob", "carol"):
        store.audit("root", "queued", user=user)
    first, *_ = store.history()
    assert [r.user for r in store.history(limit=2)] == ["bob", "carol"]
    assert [r.user for r in store.history(since=first.at + 0.5)] == ["bob", "carol"]


def test_a_store_that_cannot_answer_says_so_in_the_ports_error(store: DeskStore) -> None:
    store.close()
    with pytest.raises(StoreError):
        store.queue_length()
    with pytest.raises(StoreError):
        store.enqueue("alice", "root")


def test_the_inventory_follows_what_the_store_records(store: DeskStore) -> None:
    from provisioner.core.store import InventoryState

    store.token_seen(7, "5.7.1")
    [blank] = store.inventory()
    assert (blank.serial, blank.state, blank.firmware, blank.users) == (
        7,
        InventoryState.BLANK,
        "5.7.1",
        "",
    )
    eid = store.start_enrollment("alice", 7, "reader", "roster")
    store.finish_enrollment(eid, outcome=Outcome.ENROLLED, actor="roster", device_arn=ARN)
    store.token_seen(7, "5.7.1")  # seen again: still enrolled
    [enrolled] = store.inventory(user="alice")
    assert enrolled.state is InventoryState.ENROLLED and enrolled.users == "alice"
    assert store.inventory(user="bob") == [] and store.inventory(serial=8) == []
    store.audit("root", "revoked", user="alice", serial=7, device_arn=ARN)
    assert store.inventory()[0].state is InventoryState.REVOKED
    store.add_token_cleanup(7, "AWS:alice@123456789012", eid, "revoked")
    [cleanup] = store.token_cleanups(7)
    store.finish_token_cleanup(cleanup.id, "desk", "removed")
    assert store.inventory()[0].state is InventoryState.WIPED
    store.mark_lost(7, "root", "reported by alice")
    assert store.inventory()[0].state is InventoryState.LOST
    assert store.history()[-1].event == "lost"


def test_a_rostered_serial_is_served_by_one_desk_only(store: DeskStore) -> None:
    from provisioner.core.roster import parse

    assert (
        store.load_roster(parse("serial,user,accounts\n7,alice,prod\n8,bob,\n", "r.csv"), "root")
        == 2
    )
    assert store.roster_size() == 2
    assert store.take_rostered(7) == ("alice", "prod")
    assert store.take_rostered(7) == ("alice", "prod")  # the same desk, plugged again
    assert store.take_rostered(9) is None
    assert store.history()[-1].event == "roster loaded"
