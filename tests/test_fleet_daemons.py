"""Desks as a fleet, as processes: three desk daemons on one PostgreSQL database, each
serving its own two vpcd readers (the session's PC/SC stack has three banks), through the
real PC/SC stack and the strict local IAM server. A request queued for any desk is served
by the desk where the token is plugged in, once; `provisioner fleet` on any shows all
three; a desk killed mid-enrollment is settled from another with `reconcile --desk`."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desk_harness import Daemon, arn, make_workdir, wait_for, write_config
from emulated_yubikey import EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer
from provisioner.adapters.postgres_store import migrate

pytestmark = [pytest.mark.pcsc, pytest.mark.iam_server, pytest.mark.postgres, pytest.mark.slow]

SERIALS = iter(range(43_000_001, 43_000_100))
DESKS = ("berlin", "lisbon", "porto")


def slots(desk: str) -> tuple[int, int]:
    """The two readers (slots of the session's PC/SC stack) a desk serves."""
    bank = DESKS.index(desk)
    return (2 * bank, 2 * bank + 1)


class Fleet:
    def __init__(self, stack: PcscStack, iam: LocalIamServer, db: Any) -> None:
        migrate(db.owner_url)
        self.stack, self.iam, self.db = stack, iam, db
        self.dirs: list[Path] = []
        self.desks: dict[str, Daemon] = {}
        for name in DESKS:
            workdir = make_workdir()
            self.dirs.append(workdir)
            readers = ", ".join(f'"{stack.reader_names[slot]}"' for slot in slots(name))
            config = write_config(
                workdir, f'readers = [{readers}]\n[store]\nurl = "{db.desk_url}"\n'
            )
            config.write_text(config.read_text().replace('desk = "test-desk"', f'desk = "{name}"'))
            self.desks[name] = Daemon(stack, iam, iam.admin_client("iam"), workdir, config)

    def start(self) -> None:
        for desk in self.desks.values():
            desk.start()

    def close(self) -> None:
        for desk in self.desks.values():
            if desk.proc is not None and desk.proc.poll() is None:
                desk.stop()
        for workdir in self.dirs:
            shutil.rmtree(workdir, ignore_errors=True)

    def records(self) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.db.owner_url, row_factory=dict_row) as conn:
            return list(conn.execute("SELECT * FROM enrollments ORDER BY id").fetchall())


@pytest.fixture
def fleet(pcsc_stack: PcscStack, local_iam: LocalIamServer, pg_db: Any) -> Iterator[Fleet]:
    f = Fleet(pcsc_stack, local_iam, pg_db)
    f.start()
    yield f
    local_iam.clear_faults()
    f.close()
    for slot in range(len(pcsc_stack.reader_names)):
        pcsc_stack.remove(slot, wait=True)


def test_a_request_for_any_desk_is_served_where_the_token_is_plugged_in(fleet: Fleet) -> None:
    berlin, lisbon = fleet.desks["berlin"], fleet.desks["lisbon"]
    queued = berlin.cli("queue", "--user", "alice")
    assert queued.returncode == 0, queued.stderr
    key = EmulatedYubiKey(serial=next(SERIALS))
    fleet.stack.insert(key, slots("lisbon")[1])
    wait_for(lambda: berlin.devices_of("alice") == [arn("alice", key.serial)], what="enrolled")
    [record] = fleet.records()
    assert record["desk"] == "lisbon" and record["outcome"] == "enrolled"
    # every desk sees the whole fleet, and history and the inventory of any desk the same
    for desk in fleet.desks.values():
        listed = desk.cli("fleet", "--json")
        assert listed.returncode == 0, listed.stderr
        beats = {d["name"]: d for d in json.loads(listed.stdout)}
        assert sorted(beats) == sorted(DESKS)
        assert {b["state"] for b in beats.values()} == {"alive"}, beats
        assert beats["porto"]["status"]["readers"] == [
            fleet.stack.reader_names[s] for s in slots("porto")
        ]
        inventory = json.loads(desk.cli("tokens", "--inventory", "--format", "json").stdout)
        [token] = [t for t in inventory if t["serial"] == key.serial]
        assert (token["state"], token["desk"]) == ("enrolled", "lisbon")
    history = lisbon.cli("history", "--verify")
    assert history.returncode == 0, history.stdout + history.stderr
    assert "desk lisbon:" in history.stdout and "chain intact" in history.stdout


def test_one_request_and_tokens_at_three_desks_one_enrollment(fleet: Fleet) -> None:
    berlin = fleet.desks["berlin"]
    assert berlin.cli("queue", "--user", "bob").returncode == 0
    keys = [EmulatedYubiKey(serial=next(SERIALS)) for _ in DESKS]
    for desk, key in zip(DESKS, keys, strict=True):
        fleet.stack.insert(key, slots(desk)[0], wait=False)  # all at once
    wait_for(lambda: len(berlin.devices_of("bob")) == 1, what="one enrollment")
    time.sleep(2.0)  # the other token had every chance
    assert len(berlin.devices_of("bob")) == 1
    assert len([r for r in fleet.records() if r["user"] == "bob"]) == 1


def test_a_desk_killed_mid_enrollment_is_settled_from_another(fleet: Fleet) -> None:
    berlin, lisbon = fleet.desks["berlin"], fleet.desks["lisbon"]
    fleet.iam.inject_fault("EnableMFADevice", kind="delay", delay=4.0, count=3)
    assert berlin.cli("queue", "--user", "alice").returncode == 0
    key = EmulatedYubiKey(serial=next(SERIALS))
    fleet.stack.insert(key, slots("berlin")[0])
    wait_for(lambda: any(r["user"] == "alice" for r in fleet.records()), what="started")
    time.sleep(1.0)
    assert berlin.proc is not None
    berlin.proc.send_signal(signal.SIGKILL)
    berlin.proc.wait(10)
    fleet.iam.clear_faults()
    time.sleep(4.0)
    refused = lisbon.cli("reconcile", "--desk", "berlin")
    assert refused.returncode == 2 and "desk berlin is alive" in refused.stderr
    # berlin's heartbeat goes silent after 30 s; the operator settles it from lisbon then
    import psycopg

    with psycopg.connect(fleet.db.owner_url) as conn:
        conn.execute("UPDATE desks SET beat_at = beat_at - 60 WHERE name = 'berlin'")
    done = lisbon.cli("reconcile", "--desk", "berlin")
    assert done.returncode == 0, done.stderr
    [record] = [r for r in fleet.records() if r["user"] == "alice"]
    assert record["outcome"] != "in progress"
    devices = berlin.devices_of("alice")
    assert (record["outcome"] == "enrolled") == bool(devices)
    assert fleet.iam.unassigned_devices() == []


def test_a_token_revoked_at_one_desk_is_wiped_at_another(fleet: Fleet) -> None:
    berlin, lisbon = fleet.desks["berlin"], fleet.desks["lisbon"]
    key = EmulatedYubiKey(serial=next(SERIALS))
    assert lisbon.cli("queue", "--user", "bob").returncode == 0
    fleet.stack.insert(key, slots("lisbon")[0])  # enrolled at lisbon
    wait_for(lambda: lisbon.devices_of("bob") == [arn("bob", key.serial)], what="enrolled")
    fleet.stack.remove(slots("lisbon")[0], wait=True)
    revoked = berlin.cli("revoke", "--user", "bob")  # from another desk, the token away
    assert revoked.returncode == 0, revoked.stderr
    assert berlin.devices_of("bob") == []
    assert any(c.id.startswith("AWS:bob@") for c in key.credentials())
    fleet.stack.insert(key, slots("berlin")[1])  # seen next at berlin
    wait_for(
        lambda: not any(c.id.startswith("AWS:bob@") for c in key.credentials()),
        what="the credential wiped at berlin",
    )
    inventory = json.loads(lisbon.cli("tokens", "--inventory", "--format", "json").stdout)
    [token] = [t for t in inventory if t["serial"] == key.serial]
    assert token["state"] == "wiped" and token["desk"] == "berlin"


def test_the_database_stopped_mid_run_is_said_and_taken_back(fleet: Fleet) -> None:
    berlin = fleet.desks["berlin"]
    fleet.db.cluster.stop()
    try:
        refused = berlin.cli("queue", "--user", "alice")
        assert refused.returncode != 0
        assert "the fleet's database" in refused.stderr and "\n" not in refused.stderr.strip()
    finally:
        fleet.db.cluster.start()
    # taken back on its own: within a few seconds a request is accepted again
    wait_for(
        lambda: berlin.cli("queue", "--user", "alice").returncode == 0,
        timeout=20,
        what="a request accepted again",
    )
    key = EmulatedYubiKey(serial=next(SERIALS))
    fleet.stack.insert(key, slots("berlin")[0])
    wait_for(lambda: berlin.devices_of("alice") == [arn("alice", key.serial)], what="enrolled")
    wait_for(lambda: any(r["outcome"] == "enrolled" for r in fleet.records()), what="recorded")


def test_an_enrollment_in_flight_when_the_database_stops_finishes_and_loses_nothing(
    fleet: Fleet,
) -> None:
    berlin = fleet.desks["berlin"]
    assert berlin.cli("queue", "--user", "bob").returncode == 0
    fleet.iam.inject_fault("EnableMFADevice", kind="delay", delay=3.0, count=3)
    key = EmulatedYubiKey(serial=next(SERIALS))
    fleet.stack.insert(key, slots("berlin")[0])
    wait_for(
        lambda: any(
            r["user"] == "bob" and r["device_state"] == "maybe enabled" for r in fleet.records()
        ),
        what="inside EnableMFADevice, its 'requested' fact written",
    )
    fleet.db.cluster.stop()
    try:
        # the enrollment needs no database to finish: IAM enables the device
        wait_for(lambda: berlin.devices_of("bob") == [arn("bob", key.serial)], what="enabled")
        time.sleep(8.0)  # longer than a store call waits for a connection: it gives up
    finally:
        fleet.db.cluster.start()
    fleet.iam.clear_faults()
    # what it could not write waits for the database and is written at a heartbeat
    try:
        wait_for(
            lambda: [r["outcome"] for r in fleet.records() if r["user"] == "bob"] == ["enrolled"],
            timeout=40,
            what="the outcome written once the database is back",
        )
    except AssertionError:
        print("\n".join(berlin.log[-40:]))
        raise
    [record] = [r for r in fleet.records() if r["user"] == "bob"]
    assert record["device_state"] == "confirmed" and record["credential_state"] == "written"
    history = berlin.cli("history", "--verify")
    assert history.returncode == 0, history.stdout + history.stderr
