"""Recovery from what the journal says may exist: fake IAM, real store, emulated token."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ACCOUNT, FakeClock, FakeIam

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from provisioner.adapters.ownership import Owner, alive
from provisioner.adapters.sqlite_store import Store
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.enrollment import Enrollment, EnrollmentSettings
from provisioner.core.errors import (
    DirectoryError,
    DirectoryUnavailable,
    ReconcileFailed,
    exit_status,
)
from provisioner.core.model import CredentialSpec, DeviceSpec
from provisioner.core.ports import Fact
from provisioner.core.recovery import Recovery

SERIAL = 12345678
CRED = f"AWS:alice@{ACCOUNT}"
NAME = f"alice.yubikey.{SERIAL}"
ARN = f"arn:aws:iam::{ACCOUNT}:mfa/provisioner/{NAME}"
TAGS = (
    ("provisioner:tool", "provisioner"),
    ("provisioner:desk", "desk-1"),
    ("provisioner:user", "alice"),
    ("provisioner:token-serial", str(SERIAL)),
)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path
        self.clock = FakeClock()
        self.iam = FakeIam(self.clock, users=("alice",))
        self.store = Store(tmp_path / "state.db")
        self.key = EmulatedYubiKey(serial=SERIAL)
        self.token_present = True
        self.settings = EnrollmentSettings(desk="desk-1")

    @contextlib.contextmanager
    def find_token(self, serial: int) -> Iterator[YubiKeyToken | None]:
        if not self.token_present or serial != SERIAL:
            yield None
            return
        with YubiKeyToken(lambda: EmulatedConnection(self.key), "reader") as token:
            yield token

    def recovery(self, min_age: float = 600.0) -> Recovery:
        return Recovery(
            self.iam,
            self.store,
            lambda eid: Enrollment(
                self.iam, self.clock, self.settings, journal=self.store.journal(eid)
            ),
            self.find_token,
            device_path="/provisioner/",
            desk="desk-1",
            owner_alive=lambda token: alive(self.state, token),
            now=self.clock.now,
            min_age=min_age,
        )

    def crashed_after(
        self,
        *facts: Fact,
        create: bool = True,
        write: bool = True,
        enable: bool = False,
        owner: Owner | None = None,
    ) -> int:
        """An enrollment record as a killed daemon leaves it, and the world to match (or,
        with a live ``owner``, as an enrollment still running leaves it)."""
        eid = self.store.start_enrollment("alice", SERIAL, "reader", "roster", owner=owner)
        journal = self.store.journal(eid)
        seed = None
        if create:
            _, seed = self.iam.create_virtual_mfa_device(DeviceSpec(NAME, "/provisioner/", TAGS))
        for fact in facts:
            journal.record(
                fact,
                device_arn=ARN if fact is Fact.DEVICE_REQUESTED else None,
                credential_id=CRED if fact is Fact.CREDENTIAL_REQUESTED else None,
            )
        if write and seed is not None:
            with YubiKeyToken(lambda: EmulatedConnection(self.key), "reader") as token:
                token.put_credential(CredentialSpec("AWS", f"alice@{ACCOUNT}"), seed)
        if enable:
            with YubiKeyToken(lambda: EmulatedConnection(self.key), "reader") as token:
                Enrollment(self.iam, self.clock, self.settings).complete(token, "alice", ARN, CRED)
        return eid

    def credentials(self) -> list[str]:
        return [c.id for c in self.key.credentials()]

    def outcome(self, eid: int) -> str:
        record = self.store.enrollment(eid)
        assert record is not None
        return str(record.outcome)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


UP_TO_WRITTEN = (
    Fact.DEVICE_REQUESTED,
    Fact.DEVICE_CREATED,
    Fact.CREDENTIAL_REQUESTED,
    Fact.CREDENTIAL_WRITTEN,
)


def test_enabled_but_not_recorded_is_recorded_as_done(world: World) -> None:
    eid = world.crashed_after(*UP_TO_WRITTEN, Fact.ENABLE_REQUESTED, enable=True)
    actions = world.recovery().run()
    assert world.outcome(eid) == "enrolled"
    assert "recorded as done" in actions[0].text
    assert world.iam.users["alice"] == [ARN]
    assert world.credentials() == [CRED]


def test_created_and_written_with_the_token_present_is_finished(world: World) -> None:
    eid = world.crashed_after(*UP_TO_WRITTEN)
    actions = world.recovery().run()
    assert world.outcome(eid) == "enrolled"
    assert "finished with the credential on the token" in actions[0].text
    assert world.iam.users["alice"] == [ARN]  # enabled with codes computed on the token
    assert world.iam.enabled_steps == [-1]
    assert world.credentials() == [CRED]


def test_created_and_written_without_the_token_is_undone_and_the_token_cleaned_later(
    world: World,
) -> None:
    world.token_present = False
    eid = world.crashed_after(*UP_TO_WRITTEN)
    actions = world.recovery().run()
    assert world.outcome(eid) == "rolled back"
    assert world.iam.devices == {}
    assert [c.credential_id for c in world.store.token_cleanups(SERIAL)] == [CRED]
    assert any("when it is next plugged in" in a.text for a in actions)


def test_a_device_that_may_never_have_been_created(world: World) -> None:
    eid = world.crashed_after(Fact.DEVICE_REQUESTED, create=False, write=False)
    actions = world.recovery().run()
    assert world.outcome(eid) == "rolled back"
    assert "never created" in actions[0].text


def test_a_created_device_whose_credential_was_never_written(world: World) -> None:
    eid = world.crashed_after(Fact.DEVICE_REQUESTED, Fact.DEVICE_CREATED, write=False)
    world.recovery().run()
    assert world.outcome(eid) == "rolled back"
    assert world.iam.devices == {}
    assert world.credentials() == []


def test_a_maybe_written_credential_is_removed_when_the_token_is_present(world: World) -> None:
    eid = world.crashed_after(Fact.DEVICE_REQUESTED, Fact.DEVICE_CREATED, Fact.CREDENTIAL_REQUESTED)
    world.iam.devices.clear()  # say the device side was lost too
    world.recovery().run()
    assert world.outcome(eid) == "rolled back"
    assert world.credentials() == []
    assert world.store.token_cleanups(SERIAL) == []


def test_dry_run_changes_nothing(world: World) -> None:
    eid = world.crashed_after(*UP_TO_WRITTEN)
    actions = world.recovery().run(dry_run=True)
    assert actions and all("would" in a.text for a in actions)
    assert world.outcome(eid) == "in progress"
    assert ARN in world.iam.devices
    assert world.iam.users["alice"] == []


def test_sweep_removes_this_desks_tagged_orphans_only(world: World) -> None:
    mine = world.iam.create_virtual_mfa_device(DeviceSpec("a1", "/provisioner/", TAGS))[0]
    other_desk = world.iam.create_virtual_mfa_device(
        DeviceSpec(
            "a2",
            "/provisioner/",
            tuple((k, "desk-2" if k == "provisioner:desk" else v) for k, v in TAGS),
        )
    )[0]
    untagged = world.iam.create_virtual_mfa_device(DeviceSpec("a3", "/provisioner/"))[0]
    elsewhere = world.iam.create_virtual_mfa_device(DeviceSpec("a4", "/other/", TAGS))[0]
    busy = world.iam.create_virtual_mfa_device(DeviceSpec("a5", "/provisioner/", TAGS))[0]
    recovery = world.recovery()
    assert [d.serial_number for d in recovery.orphans(busy=frozenset({busy}))] == [mine]
    eid = world.store.start_enrollment("bob", 1, "reader", "roster")
    world.store.record_fact(eid, Fact.DEVICE_REQUESTED, device_arn=busy)
    recovery.run(busy=frozenset({eid}))
    assert sorted(world.iam.devices) == sorted([other_desk, untagged, elsewhere, busy])
    recovery.run(all_desks=True, busy=frozenset({eid}))
    assert sorted(world.iam.devices) == sorted([untagged, elsewhere, busy])


def test_orphans_can_be_listed_and_kept(world: World) -> None:
    mine = world.iam.create_virtual_mfa_device(DeviceSpec("a1", "/provisioner/", TAGS))[0]
    kept = world.recovery().run(delete_orphans=False)
    assert [a.text for a in kept] == [
        f"orphaned device {mine} (alice on token {SERIAL}, desk desk-1): kept"
    ]
    dry = world.recovery().run(dry_run=True)
    assert dry[0].text.endswith(": would delete")
    assert mine in world.iam.devices


def _created(epoch: float) -> tuple[str, str]:
    return ("provisioner:created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)))


def test_an_enrollment_whose_owner_runs_is_left_alone_and_said_so(world: World) -> None:
    with Owner.claim(world.state) as owner:
        eid = world.crashed_after(*UP_TO_WRITTEN, owner=owner)
        world.clock.time += 3600  # its device is old: only its owner's lock keeps it
        dry = world.recovery().run(dry_run=True)
        done = world.recovery().run()
        assert world.outcome(eid) == "in progress"
        assert ARN in world.iam.devices and world.iam.users["alice"] == []
        assert world.credentials() == [CRED]
        expected = (
            f"enrollment #{eid} of alice on token {SERIAL}: in progress in process "
            f"{os.getpid()}; left alone"
        )
        assert [a.text for a in dry] == [expected]
        assert [a.text for a in done] == [expected]
        assert world.store.history(user="alice") == []  # nothing was done: nothing audited
    # Its owner is gone (as a killed one would be): now it is what a crash left.
    world.recovery().run()
    assert world.outcome(eid) == "enrolled"
    assert world.iam.users["alice"] == [ARN]


def test_an_owner_that_ended_without_finishing_its_record_is_recovered(world: World) -> None:
    with Owner.claim(world.state) as owner:
        pass
    eid = world.crashed_after(Fact.DEVICE_REQUESTED, Fact.DEVICE_CREATED, owner=owner, write=False)
    world.recovery().run()
    assert world.outcome(eid) == "rolled back"
    assert world.iam.devices == {}


def test_a_record_another_recovery_took_is_left_to_it(world: World) -> None:
    eid = world.crashed_after(*UP_TO_WRITTEN)
    with Owner.claim(world.state) as other:
        assert world.store.claim_enrollment(eid, None, other)
        actions = world.recovery().run()
        assert world.outcome(eid) == "in progress"
        assert actions[0].text.endswith(f"in progress in process {os.getpid()}; left alone")
        assert not world.store.claim_enrollment(eid, None, other)  # not twice


def test_young_orphans_are_kept_old_and_untimed_ones_deleted(world: World) -> None:
    now = world.clock.now()

    def device(name: str, *extra: tuple[str, str]) -> str:
        return world.iam.create_virtual_mfa_device(
            DeviceSpec(name, "/provisioner/", (*TAGS, *extra))
        )[0]

    young = device("young", _created(now - 599))
    old = device("old", _created(now - 601))
    device("untimed")  # from before devices carried their creation time
    device("garbled", ("provisioner:created", "yesterday"))
    actions = world.recovery(min_age=600).run()
    assert sorted(world.iam.devices) == [young]
    assert f"deleted orphaned device {old} (alice on token {SERIAL}, desk desk-1)" in [
        a.text for a in actions
    ]
    assert (
        f"orphaned device {young} (alice on token {SERIAL}, desk desk-1): kept, created "
        "599 s ago (younger than 600 s: it may still be enrolling)"
    ) in [a.text for a in actions]
    world.clock.time += 2
    world.recovery(min_age=600).run()
    assert world.iam.devices == {}


def test_an_enrollment_tags_its_device_with_its_creation_time(world: World) -> None:
    created = world.clock.now()  # the fake clock moves only when the enrollment sleeps
    with YubiKeyToken(lambda: EmulatedConnection(world.key), "reader") as token:
        result = Enrollment(world.iam, world.clock, world.settings).run(token, "alice")
    tags = dict(world.iam.devices[result.device_arn].tags)
    assert tags["provisioner:created"] == _created(created)[1]


def test_a_record_whose_recovery_failed_half_way_is_handed_back_for_the_next(
    world: World,
) -> None:
    """The daemon takes a record over and IAM fails mid-way: `provisioner reconcile`
    through that same (running) daemon must still be able to settle it later."""
    eid = world.crashed_after(*UP_TO_WRITTEN)
    with Owner.claim(world.state) as daemon:
        world.store = Store(world.state / "state.db", owner=daemon)
        world.iam.fail("list_mfa_devices", DirectoryUnavailable("IAM is unreachable"))
        with pytest.raises(ReconcileFailed) as info:
            world.recovery().run()
        assert isinstance(info.value.__cause__, DirectoryUnavailable)
        assert world.outcome(eid) == "in progress"
        world.recovery().run()
        assert world.outcome(eid) == "enrolled"


def test_a_young_device_its_own_finished_record_left_behind_is_swept_at_once(
    world: World,
) -> None:
    """A rollback that could not delete its device says so and names `reconcile`: that
    device is known to be a leftover (its enrollment has ended), young or not."""
    young = (*TAGS, _created(world.clock.now() - 5))
    arn = world.iam.create_virtual_mfa_device(DeviceSpec(NAME, "/provisioner/", young))[0]
    kept = world.iam.create_virtual_mfa_device(DeviceSpec("other", "/provisioner/", young))[0]
    eid = world.store.start_enrollment("alice", SERIAL, "reader", "roster")
    world.store.record_fact(eid, Fact.DEVICE_REQUESTED, device_arn=arn)
    world.store.record_fact(eid, Fact.DEVICE_CREATED)
    world.store.finish_enrollment(
        eid, outcome="failed, NOT rolled back", actor="root", reason="delete refused"
    )
    actions = world.recovery(min_age=600).run()
    assert sorted(world.iam.devices) == [kept]
    assert f"deleted orphaned device {arn} (alice on token {SERIAL}, desk desk-1)" in [
        a.text for a in actions
    ]


def test_iam_failing_midway_names_the_step_the_cause_and_what_was_done(world: World) -> None:
    eid = world.crashed_after(*UP_TO_WRITTEN, Fact.ENABLE_REQUESTED, enable=True)
    world.iam.fail(
        "list_virtual_mfa_devices", DirectoryError("cannot reach IAM to ListVirtualMFADevices")
    )
    with pytest.raises(ReconcileFailed) as info:
        world.recovery().run()
    line = info.value.one_line()
    assert line.startswith(
        "reconcile failed at step 'sweep orphaned devices': cannot reach IAM to "
        f"ListVirtualMFADevices; done before it: enrollment #{eid} of alice on token {SERIAL}: "
    )
    assert exit_status(info.value) == 4  # an IAM problem, as the cause says
    # what was done before the failure stays done, and in the audit trail
    assert world.outcome(eid) == "enrolled"
    reasons = [r.reason for r in world.store.history(limit=10) if r.event == "recovered"]
    assert reasons == [info.value.done[0]]


def test_iam_failing_on_an_enrollment_names_that_enrollment(world: World) -> None:
    eid = world.crashed_after(*UP_TO_WRITTEN)
    world.iam.fail("list_mfa_devices", DirectoryError("cannot reach IAM to ListMFADevices"))
    with pytest.raises(ReconcileFailed) as info:
        world.recovery().run()
    assert info.value.one_line().startswith(
        f"reconcile failed at step 'settle enrollment #{eid} of alice': cannot reach IAM"
    )
    assert info.value.one_line().endswith("; nothing done before it")
