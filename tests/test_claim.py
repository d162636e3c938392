"""Who gets a token, as the policy alone: a queue of the test's own, no token, no store.

The same choices against a real store and emulated keys are in test_service.py.
"""

from __future__ import annotations

from collections.abc import Collection

from provisioner.core.store import QueueEntry, RequestState
from provisioner.daemon.claim import Claim, MayTake, choose, who_may_take


def request(entry_id: int, user: str, serial: int | None = None) -> QueueEntry:
    return QueueEntry(
        id=entry_id,
        user=user,
        serial=serial,
        requested_by="root",
        requested_at=float(entry_id),
        state=RequestState.WAITING,
    )


class Queue:
    """Waiting requests, oldest first; ``take`` takes as the store's take_next does: one
    for this serial first, else one for any token among ``users`` (None: anyone's)."""

    def __init__(self, *entries: QueueEntry) -> None:
        self.waiting = list(entries)
        self.asked: list[tuple[int | None, Collection[str] | None]] = []

    def take(self, serial: int | None, users: Collection[str] | None) -> QueueEntry | None:
        self.asked.append((serial, users))
        mine = [e for e in self.waiting if serial is not None and e.serial == serial]
        anyones = [
            e for e in self.waiting if e.serial is None and (users is None or e.user in users)
        ]
        for entry in mine + anyones:
            self.waiting.remove(entry)
            return entry
        return None


def never_asked() -> MayTake:
    raise AssertionError("the token was looked at, though a request or the roster decided")


def test_a_request_for_this_serial_comes_before_the_roster_and_any_token_requests() -> None:
    alices = request(2, "alice", 7)
    queue = Queue(request(1, "erin"), alices)
    assert choose(7, "dave", queue.take, never_asked) == Claim("alice", alices, "queue:2", "root")
    assert [e.id for e in queue.waiting] == [1]


def test_the_rostered_user_is_served_through_his_any_token_request() -> None:
    queue = Queue(request(1, "erin"), request(2, "dave"))
    claim = choose(7, "dave", queue.take, never_asked)
    assert (claim.user, claim.source) == ("dave", "queue:2")
    assert queue.asked == [(7, ()), (None, ("dave",))]
    assert [e.id for e in queue.waiting] == [1]


def test_the_rostered_user_is_served_with_no_request_at_all() -> None:
    queue = Queue(request(1, "erin"))
    assert choose(7, "dave", queue.take, never_asked) == Claim("dave", None, "roster", "roster")
    assert [e.id for e in queue.waiting] == [1]


def test_an_any_token_request_is_taken_among_the_users_the_token_may_serve() -> None:
    queue = Queue(request(1, "erin"), request(2, "dave"))
    claim = choose(7, None, queue.take, lambda: (frozenset({"dave"}), "holds dave's"))
    assert (claim.user, claim.source, claim.why_not) == ("dave", "queue:2", None)
    anyone = choose(8, None, queue.take, lambda: (None, None))
    assert (anyone.user, anyone.source) == ("erin", "queue:1")


def test_nobody_served_says_why_the_waiting_requests_were_not() -> None:
    queue = Queue(request(1, "erin"))
    claim = choose(7, None, queue.take, lambda: (frozenset(), "holds dave's and erin's"))
    assert claim == Claim(None, why_not="holds dave's and erin's")
    assert [e.id for e in queue.waiting] == [1]
    assert choose(7, None, Queue().take, lambda: (None, None)) == Claim(None)


def test_a_token_without_this_desks_credentials_may_serve_anyone() -> None:
    assert who_may_take({}, 7) == (None, None)
    assert who_may_take({}, None) == (None, None)


def test_a_token_with_one_users_credentials_serves_only_him_and_says_how_to_ask() -> None:
    users, why_not = who_may_take({"AWS:dave@1": "dave", "AWS:dave@2": "dave"}, 7)
    assert users == frozenset({"dave"})
    assert why_not == (
        "holds this desk's credential of dave (AWS:dave@1), dave (AWS:dave@2): "
        "left alone by requests for any token; queue a request for it with --serial 7"
    )


def test_a_token_with_several_or_unnamed_owners_serves_no_any_token_request() -> None:
    users, why_not = who_may_take({"AWS:dave@1": "dave", "AWS:erin@1": "erin"}, 7)
    assert users == frozenset()
    assert why_not is not None and "dave (AWS:dave@1), erin (AWS:erin@1)" in why_not
    users, why_not = who_may_take({"AWS:desk-1": None}, None)
    assert users == frozenset()
    assert why_not is not None and "an unnamed user (AWS:desk-1)" in why_not
    assert why_not.endswith("its serial is hidden: enroll it with provisioner enroll --direct")


def test_the_accounts_go_with_the_claim_from_a_request_or_the_roster() -> None:
    queue = Queue()
    rostered = choose(7, "alice", queue.take, lambda: (None, None), "prod,dev")
    assert (rostered.user, rostered.source, rostered.accounts) == ("alice", "roster", "prod,dev")
    entry = QueueEntry(
        id=3,
        user="bob",
        serial=8,
        requested_by="root",
        requested_at=1.0,
        state=RequestState.WAITING,
        accounts="staging",
    )
    asked = choose(8, None, Queue(entry).take, lambda: (None, None))
    assert (asked.user, asked.accounts) == ("bob", "staging")
    # a request for the rostered user carries its own accounts, not the roster's
    anyone = QueueEntry(**{**entry.as_dict(), "serial": None})
    queued = choose(7, "bob", Queue(anyone).take, lambda: (None, None), "prod")
    assert queued.accounts == "staging"
