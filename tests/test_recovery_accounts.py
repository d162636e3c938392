"""Recovery of an enrollment in several accounts, killed midway: settled all or nothing,
in every account (fake directories, the real SQLite store, the emulated token)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import ACCOUNT, FakeClock, FakeIam

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from provisioner.adapters.sqlite_store import Store
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.enrollment import Enrollment, EnrollmentSettings
from provisioner.core.messages import Outcome
from provisioner.core.ports import Fact
from provisioner.core.recovery import AccountDirectory, Recovery

SERIAL = 12345678
NAMES = ("prod", "dev", "sandbox")
IDS = {name: f"{int(ACCOUNT) + i:012d}" for i, name in enumerate(NAMES)}
WRITTEN = (
    Fact.DEVICE_REQUESTED,
    Fact.DEVICE_CREATED,
    Fact.CREDENTIAL_REQUESTED,
    Fact.CREDENTIAL_WRITTEN,
)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.store = Store(tmp_path / "state.db")
        self.key = EmulatedYubiKey(serial=SERIAL)
        self.token_present = True
        self.iam = {n: FakeIam(self.clock, users=("alice",), account=IDS[n]) for n in NAMES}
        self.settings = {n: EnrollmentSettings(desk="desk-1", issuer=f"AWS {n}") for n in NAMES}
        self.arns: dict[str, str] = {}
        self.creds: dict[str, str] = {}

    def token(self) -> YubiKeyToken:
        return YubiKeyToken(lambda: EmulatedConnection(self.key), "reader")

    @contextlib.contextmanager
    def find_token(self, serial: int) -> Iterator[YubiKeyToken | None]:
        if not self.token_present or serial != SERIAL:
            yield None
            return
        with self.token() as token:
            yield token

    def enrollment(self, name: str, eid: int | None = None) -> Enrollment:
        journal = self.store.journal(eid) if eid is not None else None
        return Enrollment(self.iam[name], self.clock, self.settings[name], journal=journal)

    def recovery(self) -> Recovery:
        accounts = {
            n: AccountDirectory(
                self.iam[n], "/provisioner/", lambda eid, n=n: self.enrollment(n, eid)
            )
            for n in NAMES
        }
        own = FakeIam(self.clock)
        return Recovery(
            own,
            self.store,
            lambda eid: Enrollment(
                own, self.clock, EnrollmentSettings(), journal=self.store.journal(eid)
            ),
            self.find_token,
            device_path="/provisioner/",
            desk="desk-1",
            accounts=accounts,
        )

    def crashed(
        self, states: dict[str, tuple[Fact, ...]], enabled: tuple[str, ...] = ()
    ) -> dict[str, int]:
        """A batch as a killed desk leaves it: each account's journal up to its facts,
        devices created and credentials written to match, ``enabled`` accounts enabled."""
        ids = dict(
            zip(
                NAMES,
                self.store.start_enrollments(
                    [(n, "alice") for n in NAMES], SERIAL, "reader", "roster"
                ),
                strict=True,
            )
        )
        for name in NAMES:
            credential, device = self.settings[name].names("alice", IDS[name], SERIAL)
            arn = self.iam[name].device_id(IDS[name], device.path, device.name)
            self.arns[name], self.creds[name] = arn, credential.credential_id
            journal = self.store.journal(ids[name])
            facts = states[name]
            for fact in facts:
                journal.record(
                    fact,
                    device_arn=arn if fact is Fact.DEVICE_REQUESTED else None,
                    credential_id=credential.credential_id
                    if fact is Fact.CREDENTIAL_REQUESTED
                    else None,
                )
            if Fact.DEVICE_CREATED in facts:
                _, seed = self.iam[name].create_virtual_mfa_device(device)
                if Fact.CREDENTIAL_WRITTEN in facts:
                    with self.token() as token:
                        token.put_credential(credential, seed)
            if name in enabled:
                with self.token() as token:
                    self.enrollment(name).complete(token, "alice", arn, credential.credential_id)
        return ids

    def outcomes(self, ids: dict[str, int]) -> dict[str, str]:
        return {n: str(self.store.enrollment(eid).outcome) for n, eid in ids.items()}  # type: ignore[union-attr]

    def credentials(self) -> list[str]:
        return sorted(c.id for c in self.key.credentials())


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# Killed during the second account's EnableMFADevice: the first enabled, the second's
# answer lost, the third's enable not sent yet.
KILLED_IN_SECOND_ENABLE = {
    "prod": (*WRITTEN, Fact.ENABLE_REQUESTED),
    "dev": (*WRITTEN, Fact.ENABLE_REQUESTED),
    "sandbox": WRITTEN,
}


def test_killed_mid_enable_with_the_token_present_is_finished_in_every_account(
    world: World,
) -> None:
    ids = world.crashed(KILLED_IN_SECOND_ENABLE, enabled=("prod",))
    actions = world.recovery().run()
    assert world.outcomes(ids) == {n: Outcome.ENROLLED for n in NAMES}
    for name in NAMES:
        assert world.iam[name].users["alice"] == [world.arns[name]]
    assert world.credentials() == sorted(world.creds.values())
    assert any("finished in every account" in a.text for a in actions)
    trail = [(r.event, r.outcome, r.account) for r in world.store.history()]
    assert sorted(a for e, o, a in trail if o == Outcome.ENROLLED) == sorted(NAMES)


def test_killed_mid_enable_without_the_token_is_undone_in_every_account(world: World) -> None:
    ids = world.crashed(KILLED_IN_SECOND_ENABLE, enabled=("prod",))
    world.token_present = False
    world.recovery().run()
    assert world.outcomes(ids) == {n: Outcome.ROLLED_BACK for n in NAMES}
    for name in NAMES:
        assert world.iam[name].devices == {}, name  # prod's deactivated, then deleted
        assert world.iam[name].users["alice"] == []
    assert "deactivate_mfa_device" in world.iam["prod"].calls
    # every credential is removed when the token is next seen
    assert sorted(c.credential_id for c in world.store.token_cleanups(SERIAL)) == sorted(
        world.creds.values()
    )


def test_every_account_enabled_is_recorded_as_done(world: World) -> None:
    ids = world.crashed({n: (*WRITTEN, Fact.ENABLE_REQUESTED) for n in NAMES}, enabled=NAMES)
    world.token_present = False
    world.recovery().run()
    assert world.outcomes(ids) == {n: Outcome.ENROLLED for n in NAMES}


def test_killed_before_the_third_device_was_created_is_undone_everywhere(world: World) -> None:
    ids = world.crashed(
        {"prod": WRITTEN[:2], "dev": WRITTEN[:2], "sandbox": (Fact.DEVICE_REQUESTED,)}
    )
    world.recovery().run()
    assert world.outcomes(ids) == {n: Outcome.ROLLED_BACK for n in NAMES}
    for name in NAMES:
        assert world.iam[name].devices == {}
    assert world.credentials() == []


def test_a_batch_another_recovery_holds_is_left_alone_whole(world: World) -> None:
    ids = world.crashed(KILLED_IN_SECOND_ENABLE, enabled=("prod",))
    # one record of the batch taken by someone else first: none is settled here
    assert world.store.claim_enrollment(ids["dev"], None)
    actions = world.recovery().run(busy=frozenset({ids["dev"]}))
    assert world.outcomes(ids) == {n: Outcome.IN_PROGRESS for n in NAMES}
    assert [a for a in actions if a.done] == []


def test_the_sweep_covers_every_account(world: World) -> None:
    for name in NAMES:
        _, device = world.settings[name].names("alice", IDS[name], SERIAL, created=0.0)
        world.iam[name].create_virtual_mfa_device(device)
    actions = world.recovery().run()
    assert all(iam.devices == {} for iam in world.iam.values())
    assert sum("deleted orphaned device" in a.text for a in actions) == 3


def test_an_account_that_cannot_be_listed_does_not_stop_the_sweep_of_the_others(
    world: World,
) -> None:
    from provisioner.core.errors import AccessDenied

    for name in NAMES:
        _, device = world.settings[name].names("alice", IDS[name], SERIAL, created=0.0)
        world.iam[name].create_virtual_mfa_device(device)
    world.iam["dev"].fail("list_virtual_mfa_devices", AccessDenied("role refused"), times=9)
    actions = world.recovery().run()
    assert world.iam["prod"].devices == {} and world.iam["sandbox"].devices == {}
    assert len(world.iam["dev"].devices) == 1
    failed = [a.text for a in actions if a.failed]
    assert [t.split(" (")[0] for t in failed] == ["could not sweep account dev: role refused"]


def test_finishing_again_after_the_store_refused_half_closes_each_record_once(
    world: World,
) -> None:
    from provisioner.core.accounts import AccountPlan, RecordedAccounts
    from provisioner.core.errors import StoreError
    from provisioner.core.model import TokenInfo

    store = world.store
    info = TokenInfo("reader", SERIAL, (5, 7, 1), "keychain", True)
    records = RecordedAccounts(store, [AccountPlan(n, "alice") for n in NAMES], info, "roster")
    real = store.finish_enrollment
    calls = [0]

    def second_refused(*args: object, **kw: object) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise StoreError("the fleet's database is restarting")
        real(*args, **kw)  # type: ignore[arg-type]

    store.finish_enrollment = second_refused  # type: ignore[method-assign]
    failure = StoreError("nothing was created")
    with pytest.raises(StoreError):
        records.finish(failure, "desk")
    records.finish(failure, "desk")  # the retry at the next heartbeat
    closed = [r.account for r in store.history() if r.event == "enrollment"]
    assert sorted(closed) == sorted(NAMES)  # each once
