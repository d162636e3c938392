"""Desks as a fleet: each desk's heartbeat in the store, and `provisioner fleet` showing
every desk alive or silent since when, what it does, its last outcome."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from desk_harness import write_config
from provisioner import __version__
from provisioner.adapters.sqlite_store import SqliteStore
from provisioner.cli.inspection import fleet_line
from provisioner.cli.main import main
from provisioner.core.errors import StoreError
from provisioner.core.store import DeskBeat
from provisioner.daemon.heartbeat import Heartbeat, summary

STATUS = {
    "readers": [
        {"name": "reader 0", "card_present": True},
        {"name": "reader 1", "card_present": False},
    ],
    "tokens": [{"reader": "reader 0", "serial": 7, "state": "enrolling"}],
    "in_progress": [{"reader": "reader 0", "user": "alice", "step": "enable"}],
    "queue_total": 2,
    "recent": [{"user": "bob", "outcome": "enrolled", "at": 1_800_000_000.0}],
}


def test_a_beat_says_what_the_desk_does(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", desk="berlin")
    beat = Heartbeat(store, lambda: STATUS, period=3600)
    beat.start()
    [desk] = store.desks()
    assert (desk.name, desk.version, desk.stopped_at) == ("berlin", __version__, None)
    assert json.loads(desk.status) == {**summary(STATUS), "unwritten": 0}
    assert summary(STATUS) == {
        "readers": ["reader 0", "reader 1"],
        "tokens": 1,
        "working": [{"reader": "reader 0", "user": "alice", "step": "enable"}],
        "queue": 2,
        "last_outcome": {"user": "bob", "outcome": "enrolled", "at": 1_800_000_000.0},
    }
    beat.stop()
    [desk] = store.desks()
    assert desk.stopped_at is not None


def test_a_change_of_readers_is_beaten_at_once_not_at_the_next_period(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "p.db", desk="porto")
    status = {"readers": []}
    beat = Heartbeat(store, lambda: status, period=3600)
    beat.start()  # the first beat: no reader seen yet
    try:
        status = {"readers": [{"name": "reader 0"}]}
        beat.soon()
        deadline = time.monotonic() + 10
        while json.loads(store.desks()[0].status)["readers"] == []:
            assert time.monotonic() < deadline, "no beat after soon(): the hour's period waited"
            time.sleep(0.01)
        assert json.loads(store.desks()[0].status)["readers"] == ["reader 0"]
    finally:
        beat.stop()


def test_a_store_that_refuses_a_beat_is_said_once_and_the_desk_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Down:
        calls = 0

        def heartbeat(self, *args: Any, **kw: Any) -> None:
            self.calls += 1
            raise StoreError("the fleet's database is restarting")

    down = Down()
    beat = Heartbeat(down, lambda: STATUS, period=3600)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="provisioner.service"):
        beat.beat()
        beat.beat()
    assert down.calls == 2
    assert [r.getMessage() for r in caplog.records].count(
        "heartbeat not written (the next is tried in 3600 s): the fleet's database is restarting"
    ) == 1


def beat(**kw: Any) -> DeskBeat:
    fields = {
        "name": "lisbon",
        "version": "0.1.0",
        "pid": 42,
        "started_at": 1_800_000_000.0,
        "beat_at": 1_800_000_100.0,
        "status": json.dumps(summary(STATUS)),
    }
    return DeskBeat(**(fields | kw))


def test_alive_silent_and_stopped_desks_are_told_apart() -> None:
    alive = fleet_line(beat(), now=1_800_000_105.0)
    assert alive.startswith("lisbon: alive (beat 5 s ago), version 0.1.0, pid 42")
    assert "2 readers, 1 tokens; working: alice in reader 0 (enable); last: enrolled bob" in alive
    silent = fleet_line(beat(), now=1_800_000_200.0)
    assert silent.startswith("lisbon: SILENT since ")
    stopped = fleet_line(beat(stopped_at=1_800_000_100.0), now=1_800_009_999.0)
    assert stopped.startswith("lisbon: stopped at ")
    # the same three states for scripts (`fleet --json`)
    assert beat().state(1_800_000_130.0) == "alive"
    assert beat().state(1_800_000_131.0) == "silent"
    assert beat(stopped_at=1_800_000_100.0).state(1_800_000_101.0) == "stopped"


def test_provisioner_fleet_lists_every_desk_of_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    path = tmp_path / "state" / "provisioner.db"
    path.parent.mkdir()
    for name in ("berlin", "lisbon"):
        Heartbeat(SqliteStore(path, desk=name), lambda: STATUS, period=3600).beat()
    assert main(["fleet", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["berlin", "lisbon"]
    assert all(": alive (beat" in line for line in lines)
    assert main(["fleet", "--json", "--config", str(config)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["status"]["tokens"], d["state"]) for d in listed] == [(1, "alive"), (1, "alive")]


# --- a dead desk's records settled from another ------------------------------------------


def _recovery(store: SqliteStore, iam: Any, clock: Any, desk: str) -> Any:
    import contextlib

    from provisioner.core.enrollment import Enrollment, EnrollmentSettings
    from provisioner.core.recovery import Recovery

    return Recovery(
        iam,
        store,
        lambda eid: Enrollment(
            iam, clock, EnrollmentSettings(desk=desk), journal=store.journal(eid)
        ),
        lambda serial: contextlib.nullcontext(None),
        device_path="/provisioner/",
        desk=desk,
        now=clock.now,
    )


def test_reconcile_desk_settles_a_dead_desks_records_and_refuses_a_live_ones(
    tmp_path: Path,
) -> None:
    from fakes import FakeClock, FakeIam

    from provisioner.core.errors import InvalidInput
    from provisioner.core.model import DeviceSpec
    from provisioner.core.ports import Fact

    clock = FakeClock()
    iam = FakeIam(clock)
    path = tmp_path / "s.db"
    dead = SqliteStore(path, desk="porto", clock=clock.now)
    eid = dead.start_enrollment("alice", 7, "reader", "roster")
    arn, _ = iam.create_virtual_mfa_device(
        DeviceSpec(
            "alice.yubikey.7",
            "/provisioner/",
            (("provisioner:tool", "provisioner"), ("provisioner:desk", "porto")),
        )
    )
    dead.record_fact(eid, Fact.DEVICE_REQUESTED, device_arn=arn)
    dead.record_fact(eid, Fact.DEVICE_CREATED)
    dead.heartbeat("0.1.0", 1, clock.now(), "{}")
    here = SqliteStore(path, desk="lisbon", clock=clock.now)
    # this desk's own reconcile leaves porto's record alone
    assert _recovery(here, iam, clock, "lisbon").run(delete_orphans=False) == []
    with pytest.raises(InvalidInput, match="desk porto is alive"):
        _recovery(here, iam, clock, "lisbon").run(desk="porto")
    clock.time += 120  # porto goes silent
    actions = _recovery(here, iam, clock, "lisbon").run(desk="porto")
    assert any(f"deleted unassigned device {arn}" in a.text for a in actions)
    assert here.enrollment(eid).outcome == "rolled back"  # type: ignore[union-attr]
    assert iam.devices == {}


def test_writes_the_store_refused_are_kept_in_order_and_written_when_it_is_back() -> None:
    import threading
    from collections import deque

    from provisioner.daemon.state import ServiceState

    class State(ServiceState):
        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._unwritten = deque()

    written: list[str] = []
    down = [True]

    def write(name: str) -> Any:
        def attempt() -> None:
            if down[0]:
                raise StoreError("the fleet's database is restarting")
            written.append(name)

        return attempt

    state = State()
    state._lasting(write("finish #1"))
    down[0] = False
    state._lasting(write("finish #2"))  # waits behind #1: the order is kept
    assert written == []
    down[0] = True
    assert state.retry_unwritten() == 2
    down[0] = False
    assert state.retry_unwritten() == 0
    assert written == ["finish #1", "finish #2"]
    state._lasting(write("finish #3"))
    assert written[-1] == "finish #3"


def test_status_and_watch_desk_show_another_desk_from_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    path = tmp_path / "state" / "provisioner.db"
    path.parent.mkdir()
    for name in ("berlin", "lisbon"):
        Heartbeat(SqliteStore(path, desk=name), lambda: STATUS, period=3600).beat()
    assert main(["status", "--desk", "lisbon", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("lisbon: alive (beat")
    assert main(["watch", "--desk", "all", "--once", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["berlin:", "lisbon:"]
    assert main(["status", "--desk", "porto", "--config", str(config)]) == 2
    assert "no desk 'porto' in the fleet (desks: berlin, lisbon)" in capsys.readouterr().err
