"""Who gets a token, in-process: the desk service over a real SQLite store, the in-memory
IAM and emulated YubiKeys (the real yubikit code), reader events sent by the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import ACCOUNT, FakeClock, FakeIam

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from provisioner.adapters.reader_watch import ReaderEvent, ReaderEventKind
from provisioner.adapters.sqlite_store import Store
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.cli.watch import render
from provisioner.config import Config, DaemonConfig, parse
from provisioner.core.errors import ConfigError, QueueFull, TokenBusy
from provisioner.core.model import CredentialSpec
from provisioner.core.roster import Roster
from provisioner.core.secret import Seed
from provisioner.daemon.service import Backoff, DeskService
from provisioner.desk import Desk

USERS = ("alice", "bob", "dave", "erin", "y1", "y2")
#: Tries at a held token in quick succession: the tests wait for outcomes, not time.
QUICK = Backoff(first=0.01, factor=2.0, cap=0.02)


def arn(user: str, serial: int) -> str:
    return f"arn:aws:iam::{ACCOUNT}:mfa/provisioner/{user}.yubikey.{serial}"


class Iam(FakeIam):
    endpoint_url = "https://iam.example"


class Bench:
    """One desk: its service, its store, the keys in its readers (a reader name -> key)."""

    def __init__(
        self,
        path: Path,
        *,
        roster: dict[int, str] | None = None,
        max_queue: int = 1000,
        holders: tuple[str, ...] = (),
        backoff: Backoff = QUICK,
        daemon: DaemonConfig | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.iam = Iam(self.clock, users=USERS)
        self.store = Store(path / "provisioner.db")
        self.keys: dict[str, EmulatedYubiKey] = {}
        self.held: set[str] = set()
        self.opened: list[str] = []
        self.busy_seen = threading.Event()
        config = Config(desk="test-desk", daemon=daemon or DaemonConfig(max_queue=max_queue))
        self.service = DeskService(
            Desk(config, self.clock, self.iam),  # type: ignore[arg-type]
            self.store,
            open_token=self.open,
            is_yubikey_reader=lambda reader: True,
            roster=Roster(roster, "test") if roster is not None else None,
            card_holders=lambda: list(holders),
            backoff=backoff,
        )

    @contextlib.contextmanager
    def open(self, reader: str) -> Iterator[YubiKeyToken]:
        self.opened.append(reader)
        if reader in self.held:
            self.busy_seen.set()
            raise TokenBusy(f"the card in {reader} is in use by another program")
        key = self.keys[reader]
        with YubiKeyToken(lambda: EmulatedConnection(key), reader) as token:
            yield token

    def plug(self, reader: str, key: EmulatedYubiKey) -> None:
        self.keys[reader] = key
        self.service.on_reader_event(ReaderEvent(ReaderEventKind.CARD_INSERTED, reader))

    def pull(self, reader: str) -> None:
        self.service.on_reader_event(ReaderEvent(ReaderEventKind.CARD_REMOVED, reader))

    def settle(self) -> None:
        """Every worker has finished."""
        while True:
            workers = [w for w in list(self.service._workers.values()) if w.is_alive()]
            if not workers:
                return
            for worker in workers:
                worker.join(30)
                assert not worker.is_alive(), f"{worker.name} still running"

    def ask(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        answers = list(self.service.handle(request, "root"))
        self.settle()
        return answers

    def queue(self, user: str, serial: int | None = None) -> dict[str, Any]:
        (answer,) = self.ask({"op": "enroll", "user": user, "serial": serial, "wait": False})
        return answer

    def token(self, reader: str) -> dict[str, Any]:
        (token,) = [t for t in self.service.status()["tokens"] if t["reader"] == reader]
        return token

    def waiting(self) -> list[str]:
        return [e.user for e in self.store.waiting()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.store.history(limit=1000) if r.event == event]


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path)
    yield b
    b.service.stop(5)
    b.store.close()


# --- issue 10.17: a bounded queue, a status that stays small --------------------------


def test_the_queue_refuses_a_request_past_its_bound_with_one_line(tmp_path: Path) -> None:
    b = Bench(tmp_path, max_queue=3)
    try:
        for user in ("alice", "bob", "dave"):
            assert b.queue(user)["ok"]
        refused = b.ask({"op": "enroll", "user": "erin", "wait": False})
        assert refused == [
            {
                "ok": False,
                "final": True,
                "error": "the desk's queue is full: 3 requests are waiting (daemon.max_queue "
                "= 3) (cancel requests nobody needs (provisioner queue, provisioner cancel N), "
                "or raise daemon.max_queue)",
                "exit": 6,
            }
        ]
        assert b.waiting() == ["alice", "bob", "dave"]
        b.ask({"op": "cancel", "id": 1})
        assert b.queue("erin")["ok"]
    finally:
        b.service.stop(5)
        b.store.close()


def test_the_store_counts_only_waiting_requests_against_the_bound(tmp_path: Path) -> None:
    store = Store(tmp_path / "provisioner.db")
    try:
        first = store.enqueue("alice", "root", limit=2)
        store.enqueue("bob", "root", limit=2)
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            store.enqueue("dave", "root", limit=2)
        store.finish_entry(first.id, "done", None)
        store.enqueue("dave", "root", limit=2)
        assert store.queue_length() == 2
    finally:
        store.close()


def test_status_lists_the_first_entries_and_counts_them_all(bench: Bench) -> None:
    for i in range(60):
        bench.store.enqueue("alice", "root", 50000000 + i)
    status = bench.service.status()
    assert len(status["queue"]) == 50 and status["queue_total"] == 60
    assert status["queue"][0]["serial"] == 50000000
    (listing,) = bench.ask({"op": "queue"})
    assert len(listing["queue"]) == 50 and listing["queue_total"] == 60
    screen = render(status, now=0.0)
    assert "queue (60 waiting):" in screen
    assert "  … and 10 more" in screen


def test_the_cli_listing_says_how_many_more_wait(capsys: pytest.CaptureFixture[str]) -> None:
    from provisioner.cli.main import print_queue as _print_queue

    entry = {
        "id": 1,
        "user": "alice",
        "serial": None,
        "state": "waiting",
        "requested_by": "root",
        "requested_at": 0.0,
    }
    _print_queue([entry], total=11)
    out = capsys.readouterr().out
    assert "#1 alice: waiting" in out and "and 10 more" in out


def test_the_queue_bound_is_a_configuration_key() -> None:
    assert Config().daemon.max_queue == 1000
    assert parse("[daemon]\nmax_queue = 20\n", "test").daemon.max_queue == 20
    with pytest.raises(ConfigError, match="daemon.max_queue must be a whole number from 1"):
        parse("[daemon]\nmax_queue = 0\n", "test")


# --- issue 10.7: a request whose follower is gone does not outlive a restart -----------

_CRASHING_DAEMON = """
import os, signal, sys
from provisioner.config import Config
from provisioner.desk import Desk
from provisioner.daemon.service import DeskService
from provisioner.adapters.sqlite_store import Store
from pathlib import Path

store = Store(Path(sys.argv[1]))
service = DeskService(
    Desk(Config(desk="test-desk"), None, None), store,
    open_token=None, is_yubikey_reader=lambda r: True,
)
for _ in service.handle({"op": "enroll", "user": "y2", "wait": False}, "root"):
    pass
followed = service.handle({"op": "enroll", "user": "y1"}, "root")
print(next(followed)["detail"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_followed_request_is_withdrawn_when_the_daemon_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "provisioner.db"
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_DAEMON, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert "y1 is queued (#2" in crashed.stdout
    store = Store(path)
    try:
        store.settle_taken()  # what the daemon does at start-up
        assert [(e.user, e.followed) for e in store.waiting()] == [("y2", False)]
        (withdrawn,) = [r for r in store.history() if r.event == "withdrawn"]
        assert (withdrawn.user, withdrawn.actor) == ("y1", "daemon")
        assert "followed by root" in (withdrawn.reason or "")
        assert store.queue_entry(2).state == "withdrawn"  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_request_followed_through_a_clean_stop_is_withdrawn_and_the_client_told(
    bench: Bench,
) -> None:
    follow = bench.service.handle({"op": "enroll", "user": "y1"}, "root")
    assert next(follow)["event"] == "queued"
    bench.service.stop(1)
    answers = list(follow)
    assert answers[-1]["final"] and answers[-1]["exit"] == 1
    assert "request #1 for y1 is withdrawn" in answers[-1]["detail"]
    assert bench.waiting() == []
    assert [r["user"] for r in bench.events("withdrawn")] == ["y1"]


def test_fire_and_forget_requests_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "provisioner.db"
    store = Store(path)
    store.enqueue("y2", "root")
    store.enqueue("y1", "root", followed=True)
    taken = store.take_next(None)
    assert taken is not None and taken.user == "y2"
    store.close()
    store = Store(path)
    try:
        assert store.settle_taken() == (1, 0)
        assert [e.user for e in store.waiting()] == ["y2"]
    finally:
        store.close()


def holding(serial: int, *credentials: str) -> EmulatedYubiKey:
    """A key that already holds TOTP credentials of these ids."""
    key = EmulatedYubiKey(serial=serial)
    with YubiKeyToken(lambda: EmulatedConnection(key), "setup") as token:
        for credential in credentials:
            issuer, _, account = credential.partition(":")
            token.put_credential(CredentialSpec(issuer, account), Seed(os.urandom(20)))
    return key


# --- issue 10.6: a new request is offered the idle tokens at once ----------------------


def test_queueing_without_waiting_serves_an_idle_token_at_once(bench: Bench) -> None:
    bench.plug("r0", EmulatedYubiKey(serial=40000007))
    bench.settle()
    assert bench.token("r0")["state"] == "idle"
    answer = bench.queue("y1")
    assert answer["ok"] and answer["final"]
    assert bench.iam.users["y1"] == [arn("y1", 40000007)]
    assert bench.waiting() == []
    assert bench.token("r0")["state"] == "enrolled"


def test_a_request_for_a_serial_takes_its_idle_token_before_any_token_requests(
    bench: Bench,
) -> None:
    bench.plug("r0", holding(40000008, f"AWS:dave@{ACCOUNT}"))
    bench.settle()
    bench.queue("erin")  # any token: this one holds dave's credential, so it waits
    bench.queue("alice", 40000008)
    assert bench.iam.users["alice"] == [arn("alice", 40000008)]
    assert bench.waiting() == ["erin"]


# --- issue 10.8: "any token" takes only a token blank of this desk's credentials -------


def test_an_any_token_request_leaves_a_token_with_another_users_credential_alone(
    bench: Bench,
) -> None:
    bench.queue("erin")
    key = holding(40000009, f"AWS:dave@{ACCOUNT}")
    bench.plug("r0", key)
    bench.settle()
    assert bench.iam.users["erin"] == []
    assert [c.id for c in key.credentials()] == [f"AWS:dave@{ACCOUNT}"]
    assert bench.waiting() == ["erin"]
    token = bench.token("r0")
    assert token["state"] == "idle"
    assert "dave" in token["detail"] and "--serial 40000009" in token["detail"]
    reports = [r for r in bench.events("ignored token") if "dave" in (r["reason"] or "")]
    assert reports and reports[-1]["serial"] == 40000009
    screen = "\n".join(render(bench.service.status(), now=0.0, width=300))
    assert f"token 40000009: holds this desk's credential of dave (AWS:dave@{ACCOUNT})" in screen


def test_the_owner_of_the_desk_credential_may_take_the_token_for_any_token(
    bench: Bench,
) -> None:
    key = EmulatedYubiKey(serial=40000010)
    bench.plug("r0", key)
    bench.settle()
    bench.queue("dave", 40000010)
    assert bench.iam.users["dave"] == [arn("dave", 40000010)]
    bench.pull("r0")
    bench.queue("erin")  # any token: dave's credential is on it
    bench.plug("r0", key)
    bench.settle()
    assert bench.waiting() == ["erin"]
    bench.queue("dave")  # any token, and it is his: reported as done, not enrolled twice
    assert bench.waiting() == ["erin"]
    assert bench.service.status()["recent"][0]["outcome"] == "already enrolled"
    assert bench.iam.users["dave"] == [arn("dave", 40000010)]


def test_the_look_before_claiming_adds_no_command_to_the_enrollment(bench: Bench) -> None:
    bench.queue("erin")
    key = EmulatedYubiKey(serial=40000016)
    bench.plug("r0", key)
    bench.settle()
    assert bench.iam.users["erin"] == [arn("erin", 40000016)]
    # The flow the fault tests pull the token in: SELECT and READ_CONFIG (management),
    # SELECT and one LIST (OATH), PUT, two CALCULATEs.
    assert [r.ins for r in key.history] == [0xA4, 0x1D, 0xA4, 0xA1, 0x01, 0xA2, 0xA2]


def test_an_unreadable_token_is_left_to_the_enrollment_to_refuse(bench: Bench) -> None:
    bench.queue("erin")
    key = EmulatedYubiKey(serial=40000017, oath_password="not-configured")
    bench.plug("r0", key)
    bench.settle()
    (outcome,) = bench.service.status()["recent"]
    assert outcome["outcome"] == "failed" and "password" in outcome["detail"]
    assert bench.iam.devices == {}


def test_credentials_not_named_like_this_desks_do_not_make_a_token_taken(bench: Bench) -> None:
    bench.queue("erin")
    key = holding(40000011, "GitHub:erin@example.com", "AWS:erin-personal")
    bench.plug("r0", key)
    bench.settle()
    assert bench.iam.users["erin"] == [arn("erin", 40000011)]


def test_a_token_rostered_for_the_user_serves_that_users_any_token_request(
    tmp_path: Path,
) -> None:
    b = Bench(tmp_path, roster={40000012: "dave"})
    try:
        b.queue("dave")
        b.plug("r0", holding(40000012, f"AWS:erin@{ACCOUNT}"))
        b.settle()
        assert b.iam.users["dave"] == [arn("dave", 40000012)]
        assert b.waiting() == []  # his request was served, not left to take the next token
        assert b.store.queue_entry(1).state == "done"  # type: ignore[union-attr]
    finally:
        b.service.stop(5)
        b.store.close()


def test_desk_credentials_are_recognised_by_the_configured_naming() -> None:
    settings = Config(desk="front").enrollment_settings()
    owners = settings.credential_owners(
        [
            f"AWS:dave@{ACCOUNT}",
            "AWS:a.b+c=d,e@f-g@999999999999",
            "AWS:dave",
            "GitHub:dave@example.com",
            f"aws:dave@{ACCOUNT}",
        ],
        serial=7,
    )
    assert owners == {
        f"AWS:dave@{ACCOUNT}": "dave",
        "AWS:a.b+c=d,e@f-g@999999999999": "a.b+c=d,e@f-g",
    }
    named = parse(
        'desk = "front"\n[token]\nissuer = "{desk}"\naccount_name = "{user}/{serial}"\n', "test"
    ).enrollment_settings()
    assert named.credential_owners(["front:x/7", "front:x/8", "back:x/7"], serial=7) == {
        "front:x/7": "x"
    }
    assert named.credential_owners(["front:x/noserial"], serial=None) == {"front:x/noserial": "x"}
    anonymous = parse('[token]\naccount_name = "desk-{account}"\n', "test").enrollment_settings()
    assert anonymous.credential_owners([f"AWS:desk-{ACCOUNT}", "AWS:desk-1"], serial=7) == {
        f"AWS:desk-{ACCOUNT}": None
    }


def test_a_token_kept_for_its_owner_serves_his_enrollment_not_his_replace(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "provisioner.db")
    try:
        store.enqueue("dave", "root", kind="replace")
        store.enqueue("erin", "root")
        assert store.take_next(None, users=("dave",)) is None
        assert store.take_next(None, users=()) is None
        store.enqueue("dave", "root")
        taken = store.take_next(None, users=("dave",))
        assert taken is not None and (taken.id, taken.kind) == (3, "enroll")
        any_token = store.take_next(None)
        assert any_token is not None and any_token.id == 1
    finally:
        store.close()


# --- issue 10.5: a token held by another program is tried again while it is in -----------


def test_a_held_token_is_said_with_its_holder_and_served_once_released(tmp_path: Path) -> None:
    b = Bench(tmp_path, holders=("scdaemon (pid 4242)",))
    try:
        b.queue("erin")
        b.held.add("r0")
        with b.service.events.subscribe(lambda e: e.get("event") == "token-held") as said:
            b.plug("r0", EmulatedYubiKey(serial=40000013))
            said.get(timeout=10)
        token = b.token("r0")
        assert token["state"] == "held"
        assert "held by another program (scdaemon (pid 4242) running)" in token["detail"]
        assert b.waiting() == ["erin"]
        assert any(r["serial"] is None for r in b.events("held token"))
        b.held.discard("r0")
        b.settle()
        assert b.iam.users["erin"] == [arn("erin", 40000013)]
        assert b.opened.count("r0") >= 2
    finally:
        b.service.stop(5)
        b.store.close()


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Bench]:
    """A desk whose next try at a held token is an hour away."""
    b = Bench(tmp_path, backoff=Backoff(first=3600.0))
    yield b
    b.service.stop(5)
    b.store.close()


def test_a_held_token_is_no_longer_tried_once_it_is_pulled(patient: Bench) -> None:
    bench = patient
    bench.held.add("r0")
    with bench.service.events.subscribe(lambda e: e.get("event") == "token-held") as said:
        bench.plug("r0", EmulatedYubiKey(serial=40000014))
        detail = said.get(timeout=10)["detail"]
    # No suspect visible to the daemon (other users' programs are hidden from it).
    assert detail.startswith("held by another program (provisioner doctor, run as the")
    (worker,) = bench.service._workers.values()
    bench.pull("r0")
    worker.join(30)  # woken by the pull, not an hour later
    assert not worker.is_alive()
    tries = len(bench.opened)
    assert bench.service.status()["tokens"] == []
    bench.held.discard("r0")
    bench.plug("r0", bench.keys["r0"])  # plugged in again, now free: served at once
    bench.settle()
    assert len(bench.opened) == tries + 1
    assert bench.token("r0")["state"] == "idle"


def test_a_held_token_is_no_longer_tried_once_the_daemon_stops(patient: Bench) -> None:
    bench = patient
    bench.held.add("r0")
    bench.plug("r0", EmulatedYubiKey(serial=40000015))
    assert bench.busy_seen.wait(10)
    (worker,) = bench.service._workers.values()
    bench.service.stop(30)  # its pause ends at once, not an hour later
    assert not worker.is_alive()
