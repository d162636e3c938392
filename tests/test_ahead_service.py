"""Work ahead in the desk service (fake IAM, emulated keys through the real token adapter,
a real SQLite store): a queued user's device made before the plug, used by the plug, and
deleted when the request goes away, expires or the desk stops. The daemon as a process
(SIGKILL, restart) is in test_ahead_daemon.py."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service import Bench, arn

from emulated_yubikey import EmulatedYubiKey
from provisioner.adapters.sqlite_store import Store
from provisioner.config import DaemonConfig
from provisioner.core.messages import Outcome
from provisioner.daemon.ahead import WorkAhead

AHEAD = "arn:aws:iam::123456789012:mfa/provisioner/{user}.yubikey.q{entry}-cafe01"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def work_ahead(bench: Bench, desk: Any = None, **kw: Any) -> WorkAhead:
    """The work ahead of ``bench``'s service (or of ``desk`` over its store), its clock
    and the rest from ``kw``."""
    return WorkAhead(
        desk or bench.service.desk, bench.store, bench.service._active, bench.service._lock, **kw
    )


def desk_ahead(
    tmp_path: Path, roster: dict[int, str] | None = None
) -> Iterator[tuple[Bench, WorkAhead, Clock]]:
    """A desk whose work ahead checks 3 and makes 2 devices, on a clock of the test's."""
    daemon = DaemonConfig(checks_ahead=3, devices_ahead=2, ahead_ttl=300, ahead_refresh=60)
    bench = Bench(tmp_path, daemon=daemon, roster=roster)
    clock = Clock()
    suffixes = iter(f"cafe{i:02d}" for i in range(1, 100))
    ahead = work_ahead(
        bench, clock=clock, unique=lambda: next(suffixes), roster=lambda: bench.service.roster
    )
    bench.service.ahead = ahead
    yield bench, ahead, clock
    bench.service.stop(5)
    bench.store.close()


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[tuple[Bench, WorkAhead, Clock]]:
    yield from desk_ahead(tmp_path)


def test_a_queued_users_device_is_made_ahead_and_the_plug_only_enables(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, _ = desk
    entry = bench.queue("alice")["id"]
    ahead.tick()
    made = AHEAD.format(user="alice", entry=entry)
    assert bench.iam.unassigned() == [made]
    [ready] = bench.service.status()["ahead"]
    assert ready["user"] == "alice" and ready["device"] == made
    bench.iam.calls.clear()
    bench.plug("reader 0", EmulatedYubiKey(serial=11111111))
    bench.settle()
    assert bench.iam.calls == ["enable_mfa_device", "tag_device"]
    assert bench.iam.users["alice"] == [made]
    assert dict(bench.iam.devices[made].tags)["provisioner:token-serial"] == "11111111"
    [record] = bench.store.unfinished_enrollments() or [None]
    assert record is None  # the one record, finished
    enrolled = [r for r in bench.events("enrollment") if r["user"] == "alice"]
    assert [(r["outcome"], r["serial"]) for r in enrolled] == [(Outcome.ENROLLED, 11111111)]
    assert bench.service.status()["ahead"] == []


def test_a_cancelled_requests_device_is_deleted_and_its_record_says_not_used(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, _ = desk
    entry = bench.queue("alice")["id"]
    ahead.tick()
    assert len(bench.iam.unassigned()) == 1
    bench.ask({"op": "cancel", "id": entry})
    ahead.tick()
    assert bench.iam.devices == {}
    [record] = [r for r in bench.events("enrollment") if r["user"] == "alice"]
    assert record["outcome"] == Outcome.NOT_USED
    assert "deleted unused: its request is no longer waiting" in record["reason"]
    assert bench.store.unfinished_enrollments() == []


def test_a_device_unused_past_its_ttl_is_deleted_and_made_again(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, clock = desk
    bench.queue("alice")
    ahead.tick()
    first = bench.iam.unassigned()
    clock.now += 301
    ahead.tick()  # the old one goes
    ahead.tick()  # and a fresh one is made
    assert len(bench.iam.unassigned()) == 1 and bench.iam.unassigned() != first
    outcomes = [r["outcome"] for r in bench.events("enrollment")]
    assert outcomes == [Outcome.NOT_USED]
    assert "unused for 300 s (ahead_ttl)" in bench.events("enrollment")[0]["reason"]


def test_stopping_the_desk_deletes_every_device_made_ahead(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, _ = desk
    bench.queue("alice")
    bench.queue("bob")
    ahead.tick()
    assert len(bench.iam.unassigned()) == 2
    bench.service.stop(5)
    assert bench.iam.devices == {}
    assert bench.store.unfinished_enrollments() == []
    reasons = [r["reason"] for r in bench.events("enrollment")]
    assert len(reasons) == 2 and all("the desk is stopping" in r for r in reasons)


def test_only_the_next_few_get_a_device_the_rest_are_checked(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, _ = desk
    for user in ("alice", "bob", "dave", "erin"):
        bench.queue(user)
    ahead.tick()
    users = sorted(d.split("/")[-1].split(".")[0] for d in bench.iam.unassigned())
    assert users == ["alice", "bob"]  # devices_ahead = 2
    ready = {r["user"]: r["device"] for r in bench.service.status()["ahead"]}
    assert sorted(ready) == ["alice", "bob", "dave"]  # checks_ahead = 3
    assert ready["dave"] is None
    bench.iam.calls.clear()
    # dave's token first: his check was made, his device was not
    bench.ask({"op": "cancel", "id": 1})
    bench.ask({"op": "cancel", "id": 2})
    bench.plug("reader 0", EmulatedYubiKey(serial=22222222))
    bench.settle()
    assert bench.iam.users["dave"] != []
    assert "user_account" not in bench.iam.calls and "list_mfa_devices" not in bench.iam.calls


def test_a_check_made_ahead_is_made_again_before_it_goes_stale(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, clock = desk
    bench.queue("alice")
    ahead.tick()
    bench.iam.calls.clear()
    clock.now += 30
    ahead.tick()
    assert bench.iam.calls == []  # fresh enough
    clock.now += 31
    ahead.tick()
    assert sorted(bench.iam.calls) == ["list_mfa_devices", "user_account"]
    # a user deleted meanwhile: their device made ahead goes, the request waits on
    bench.iam.users.pop("alice")
    clock.now += 61
    ahead.tick()
    assert bench.iam.devices == {}
    assert bench.waiting() == ["alice"]
    assert "its user's check failed" in bench.events("enrollment")[0]["reason"]


def test_a_request_another_desk_took_loses_its_device_here(
    desk: tuple[Bench, WorkAhead, Clock], tmp_path: Path
) -> None:
    bench, ahead, _ = desk
    bench.queue("alice")
    ahead.tick()
    other = Store(tmp_path / "provisioner.db", desk="lisbon")
    try:
        assert other.take_next(None) is not None  # lisbon's token came first
    finally:
        other.close()
    ahead.tick()
    assert bench.iam.devices == {}


def test_a_user_no_token_could_enroll_gets_no_device_and_is_tried_later(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, clock = desk
    bench.iam.users["alice"] = [f"arn:x:{i}" for i in range(8)]  # at IAM's limit
    bench.queue("alice")
    ahead.tick()
    assert bench.iam.devices == {} and bench.store.history(limit=10)  # audited, nothing made
    assert bench.events("enrollment") == []  # no record: nothing was made
    bench.iam.calls.clear()
    ahead.tick()
    assert bench.iam.calls == []  # not asked again at once
    clock.now += 61
    ahead.tick()
    assert bench.iam.calls != []


def test_no_seed_made_ahead_is_written_or_said_anywhere(
    desk: tuple[Bench, WorkAhead, Clock], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bench, ahead, _ = desk
    with caplog.at_level(logging.DEBUG):
        bench.queue("alice")
        bench.queue("bob")
        ahead.tick()
        bench.plug("reader 0", EmulatedYubiKey(serial=33333333))
        bench.settle()
        bench.service.stop(5)  # bob's device deleted
    seeds = [d.seed for d in bench.iam.devices.values()] + [
        bytes(range(1, 41))  # FakeIam's seeds (every device of one account has it)
    ]
    said = caplog.text + repr(bench.service.status()) + repr(ahead.status())
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for seed in seeds:
        text = base64.b32encode(seed).decode()
        assert seed not in stored and text.encode() not in stored
        assert text not in said and text.rstrip("=") not in said


def test_the_service_wakes_the_work_ahead_when_a_request_is_queued(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, _ = desk
    woken = threading.Event()
    ahead.wake = woken.set  # type: ignore[method-assign]
    bench.queue("alice")
    assert woken.is_set()


def test_an_idle_desk_keeps_its_connection_to_iam_warm(tmp_path: Path) -> None:
    bench = Bench(tmp_path, daemon=DaemonConfig(checks_ahead=3, devices_ahead=0))
    clock = Clock()
    pings: list[float] = []
    ahead = work_ahead(bench, clock=clock, keep_warm=lambda: pings.append(clock.now))
    try:
        ahead.tick()
        assert pings == []  # just talked to IAM (started)
        clock.now += 29
        ahead.tick()
        assert pings == []
        clock.now += 2
        ahead.tick()
        assert pings == [clock.now]
        bench.queue("alice")
        clock.now += 20
        ahead.tick()  # alice checked: a call, so no ping needed for a while
        clock.now += 20
        ahead.tick()
        assert len(pings) == 1
    finally:
        bench.service.stop(5)
        bench.store.close()


def test_in_a_fleet_only_a_request_for_this_desk_gets_a_device_made_ahead(
    tmp_path: Path,
) -> None:
    from provisioner.config import Config, StoreConfig
    from provisioner.desk import Desk

    daemon = DaemonConfig(checks_ahead=3, devices_ahead=2)
    bench = Bench(tmp_path, daemon=daemon)
    fleet = Config(desk="test-desk", daemon=daemon, store=StoreConfig(url="postgresql://db/x"))
    ahead = work_ahead(bench, Desk(fleet, bench.clock, bench.iam), clock=Clock())  # type: ignore[arg-type]
    try:
        bench.queue("alice")  # for any desk of the fleet
        bench.ask({"op": "enroll", "user": "bob", "wait": False, "desk": "test-desk"})
        ahead.tick()
        assert [d.split("/")[-1].split(".")[0] for d in bench.iam.unassigned()] == ["bob"]
        assert sorted(r["user"] for r in ahead.status()) == ["alice", "bob"]  # both checked
    finally:
        ahead.stop(5)
        bench.service.stop(5)
        bench.store.close()


# --- rostered tokens -----------------------------------------------------------------


@pytest.fixture
def batch(tmp_path: Path) -> Iterator[tuple[Bench, WorkAhead, Clock]]:
    """A batch desk: a roster of three tokens (one user each)."""
    yield from desk_ahead(tmp_path, {50000001: "alice", 50000002: "bob", 50000003: "dave"})


def test_a_rostered_tokens_device_is_made_ahead_under_its_own_name(
    batch: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, _ = batch
    ahead.tick()
    # the first two of the roster: devices, named with their serials (known); dave checked
    assert sorted(bench.iam.unassigned()) == [arn("alice", 50000001), arn("bob", 50000002)]
    assert sorted(r["user"] for r in ahead.status()) == ["alice", "bob", "dave"]
    bench.iam.calls.clear()
    bench.plug("reader 0", EmulatedYubiKey(serial=50000002))  # bob's token first
    bench.settle()
    assert bench.iam.calls == ["enable_mfa_device"]  # no tag owed: the serial was known
    assert bench.iam.users["bob"] == [arn("bob", 50000002)]
    [record] = [r for r in bench.events("enrollment") if r["user"] == "bob"]
    assert (record["outcome"], record["serial"]) == (Outcome.ENROLLED, 50000002)


def test_a_rostered_token_already_enrolled_gets_nothing_ahead(
    batch: tuple[Bench, WorkAhead, Clock],
) -> None:
    bench, ahead, _ = batch
    bench.plug("reader 0", EmulatedYubiKey(serial=50000001))  # alice's, before any work ahead
    bench.settle()
    ahead.tick()  # alice's check finds her enrolled with it: nothing for her from now on
    ahead.tick()  # so the next look gives the devices to bob and dave
    assert sorted(bench.iam.unassigned()) == [arn("bob", 50000002), arn("dave", 50000003)]
    assert sorted(r["user"] for r in ahead.status()) == ["bob", "dave"]


def test_a_roster_reloaded_without_a_token_loses_its_device(
    batch: tuple[Bench, WorkAhead, Clock],
) -> None:
    from provisioner.core.roster import Roster

    bench, ahead, _ = batch
    ahead.tick()
    bench.service.reload_roster(Roster({50000003: "dave"}, "test"))
    ahead.tick()
    assert bench.iam.unassigned() == [arn("dave", 50000003)]
    reasons = [r["reason"] for r in bench.events("enrollment")]
    assert len(reasons) == 2 and all("no longer on the roster" in r for r in reasons)


def test_a_device_a_plug_took_meanwhile_is_never_dropped_by_the_work_ahead(
    desk: tuple[Bench, WorkAhead, Clock],
) -> None:
    """The work ahead decides a device has expired while a plug takes it: the plug's."""
    bench, ahead, clock = desk
    entry = bench.queue("alice")["id"]
    ahead.tick()
    clock.now += 301  # expired...
    real_forget = ahead._forget

    def plug_takes_it_first(key: str, each: Any) -> bool:
        assert ahead.take(key) is each  # ...but a plug took it just then
        return real_forget(key, each)

    ahead._forget = plug_takes_it_first  # type: ignore[method-assign]
    ahead.tick()
    assert AHEAD.format(user="alice", entry=entry) in bench.iam.unassigned()  # not deleted


def test_a_roster_reloaded_with_another_user_for_a_serial_never_gets_the_old_users_device(
    batch: tuple[Bench, WorkAhead, Clock],
) -> None:
    from provisioner.core.roster import Roster

    bench, ahead, _ = batch
    ahead.tick()  # alice's device made for token 50000001
    bench.service.reload_roster(Roster({50000001: "erin"}, "test"))  # before any tick
    bench.plug("reader 0", EmulatedYubiKey(serial=50000001))
    bench.settle()
    assert bench.iam.users["erin"] == [arn("erin", 50000001)]
    assert bench.iam.users["alice"] == []
