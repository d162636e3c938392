"""One plug, several accounts (core/accounts.py): over in-memory directories, one per
account, and the emulated YubiKey through the real token adapter."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import ACCOUNT, FakeClock, FakeIam
from test_enrollment import Recorder

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from emulated_yubikey.oath import INS_CALCULATE, INS_CALCULATE_ALL, INS_PUT
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.accounts import Account, AccountsEnrollment, AccountsResult
from provisioner.core.enrollment import Enrollment, EnrollmentSettings
from provisioner.core.errors import (
    AlreadyEnrolled,
    ChangeInProgress,
    CodesRejected,
    DeviceLimitReached,
    DirectoryUnavailable,
    EnrollmentFailed,
    InvalidInput,
    TokenFull,
    TokenRemoved,
    UserNotFound,
)
from provisioner.core.model import Step
from provisioner.core.ports import Fact

NAMES = ("prod", "dev", "sandbox")
IDS = {name: f"{int(ACCOUNT) + i:012d}" for i, name in enumerate(NAMES)}


class Journal:
    def __init__(self) -> None:
        self.facts: list[Fact] = []

    def record(self, fact: Fact, **_: Any) -> None:
        self.facts.append(fact)


class Desk:
    """Three accounts, each its own directory and journal; one emulated key."""

    def __init__(self, names: tuple[str, ...] = NAMES, **settings: Any) -> None:
        self.clock = FakeClock()
        self.key = EmulatedYubiKey(serial=12345678)
        self.progress = Recorder()
        self.names = names
        self.iam = {n: FakeIam(self.clock, users=("alice", "bob"), account=IDS[n]) for n in names}
        self.journals = {n: Journal() for n in names}
        self.settings = {
            n: EnrollmentSettings(desk="test-desk", issuer=f"AWS {n}", **settings) for n in names
        }

    def token(self) -> YubiKeyToken:
        ticks = iter(range(10**6))
        return YubiKeyToken(
            lambda: EmulatedConnection(self.key),
            "Emulated reader",
            sleep=lambda _: None,
            monotonic=lambda: float(next(ticks)),
        )

    def accounts(self, user: str = "alice") -> list[Account]:
        return [
            Account(
                n,
                user,
                Enrollment(
                    self.iam[n],
                    self.clock,
                    self.settings[n],
                    _Prefixed(self.progress, n),
                    self.journals[n],
                ),
            )
            for n in self.names
        ]

    def enroll(self, user: str = "alice") -> AccountsResult:
        with self.token() as token:
            return AccountsEnrollment(self.accounts(user), self.clock, self.progress).run(
                token, user
            )

    def credential_ids(self) -> list[str]:
        return sorted(c.id for c in self.key.credentials())

    def assert_nothing_anywhere(self) -> None:
        for name, iam in self.iam.items():
            assert iam.devices == {}, name
            assert iam.users["alice"] == [], name
        assert self.credential_ids() == []


class _Prefixed:
    def __init__(self, progress: Recorder, name: str) -> None:
        from provisioner.core.accounts import AccountProgress

        self._inner = AccountProgress(progress, name)

    def step(self, step: Step, detail: str) -> None:
        self._inner.step(step, detail)

    def notice(self, text: str) -> None:
        self._inner.notice(text)


def test_one_plug_enrolls_the_user_in_every_account() -> None:
    desk = Desk()
    result = desk.enroll()
    assert [name for name, _ in result.enrolled] == list(NAMES)
    for name, enrolled in result.enrolled:
        arn = f"arn:aws:iam::{IDS[name]}:mfa/provisioner/alice.yubikey.12345678"
        assert enrolled.device_arn == arn
        assert desk.iam[name].users["alice"] == [arn]
        assert enrolled.credential_id == f"AWS {name}:alice@{IDS[name]}"
        assert desk.journals[name].facts[-1] == Fact.CONFIRMED
    assert desk.credential_ids() == sorted(f"AWS {n}:alice@{IDS[n]}" for n in NAMES)
    assert result.already == ()
    # every line names its account
    checks = [d for s, d in desk.progress.steps if s == Step.CHECK]
    assert any(d.startswith("prod: alice has 0 MFA devices") for d in checks)
    assert any("may be enrolled in prod, dev, sandbox" in d for d in checks)


def test_every_code_is_computed_in_one_pass_on_the_token() -> None:
    desk = Desk()
    count = len(desk.key.history)
    desk.enroll()
    seen = [(r.ins, r.p1) for r in desk.key.history[count:]]
    # two CALCULATE ALL (one per time step: A4 with P1 00; P1 04 is SELECT) for three
    # credentials, and no per-credential CALCULATE
    assert seen.count((INS_CALCULATE_ALL, 0)) == 2
    assert [ins for ins, _ in seen].count(INS_CALCULATE) == 0
    assert [ins for ins, _ in seen].count(INS_PUT) == 3


@pytest.mark.parametrize("failing", NAMES)
@pytest.mark.parametrize(
    "action",
    ["user_account", "list_mfa_devices", "create_virtual_mfa_device", "enable_mfa_device"],
)
def test_a_failure_in_any_account_at_any_step_undoes_every_account(
    failing: str, action: str
) -> None:
    desk = Desk()
    desk.iam[failing].fail(action, DirectoryUnavailable("IAM is down"), times=99)
    with pytest.raises(EnrollmentFailed) as caught:
        desk.enroll()
    assert caught.value.account == failing
    assert f"in account {failing}" in caught.value.message
    assert "nothing left behind" in caught.value.message
    desk.assert_nothing_anywhere()


def test_codes_refused_in_one_account_undo_the_enabled_ones() -> None:
    desk = Desk()
    desk.iam["sandbox"].fail("enable_mfa_device", CodesRejected("codes refused"), times=99)
    with pytest.raises(EnrollmentFailed) as caught:
        desk.enroll()
    assert caught.value.step == Step.ENABLE
    assert caught.value.account == "sandbox"
    assert "rolled back in every account (prod, dev, sandbox)" in caught.value.message
    # prod and dev were enabled, then deactivated and deleted
    assert "deactivate_mfa_device" in desk.iam["prod"].calls
    assert Fact.DEVICE_DEACTIVATED in desk.journals["prod"].facts
    desk.assert_nothing_anywhere()


def test_try_again_in_one_account_retries_there_only() -> None:
    desk = Desk()
    desk.iam["dev"].fail("enable_mfa_device", ChangeInProgress("busy"), times=1)
    result = desk.enroll()
    assert len(result.enrolled) == 3
    assert desk.iam["dev"].calls.count("enable_mfa_device") == 2
    assert desk.iam["prod"].calls.count("enable_mfa_device") == 1


def test_refusals_before_anything_is_created_name_the_account() -> None:
    desk = Desk()
    desk.iam["dev"].users.pop("alice")
    with pytest.raises(EnrollmentFailed) as caught:
        desk.enroll()
    assert isinstance(caught.value.cause, UserNotFound)
    assert caught.value.step == Step.CHECK and caught.value.account == "dev"
    for iam in desk.iam.values():
        assert "create_virtual_mfa_device" not in iam.calls
    assert desk.credential_ids() == []


def test_the_device_limit_in_one_account_refuses_all() -> None:
    desk = Desk()
    desk.iam["sandbox"].users["alice"] = [f"arn:x:{i}" for i in range(8)]
    with pytest.raises(EnrollmentFailed) as caught:
        desk.enroll()
    assert isinstance(caught.value.cause, DeviceLimitReached)
    assert caught.value.account == "sandbox"
    for iam in desk.iam.values():
        assert "create_virtual_mfa_device" not in iam.calls


def test_a_token_without_a_free_slot_for_each_account_is_refused_first() -> None:
    desk = Desk()
    from provisioner.core.model import CredentialSpec
    from provisioner.core.secret import Seed

    with desk.token() as token:
        for i in range(30):  # 32 slots: two left, three needed
            token.put_credential(CredentialSpec("filler", f"c{i}"), Seed(bytes(20)))
    with pytest.raises(EnrollmentFailed) as caught:
        desk.enroll()
    assert isinstance(caught.value.cause, TokenFull)
    assert "2 free OATH slots, 3 are needed" in caught.value.message
    for iam in desk.iam.values():
        assert "create_virtual_mfa_device" not in iam.calls


def test_two_accounts_writing_the_same_credential_are_refused() -> None:
    desk = Desk(names=("prod", "dev"))
    # one issuer for both and an account template without the account id: a clash
    for n in desk.names:
        desk.settings[n] = EnrollmentSettings(desk="d", issuer="AWS", account_name="{user}")
    with pytest.raises(EnrollmentFailed) as caught:
        desk.enroll()
    assert isinstance(caught.value.cause, InvalidInput)
    assert "accounts prod and dev would both write credential AWS:alice" in caught.value.message
    desk.assert_nothing_anywhere()


def test_an_account_already_enrolled_is_left_as_it_is_and_the_rest_added() -> None:
    desk = Desk(names=("prod",))
    desk.enroll()
    first = dict(desk.iam["prod"].devices)
    # the desk now serves two more accounts: the same plug adds them
    more = Desk(names=NAMES)
    more.key, more.iam["prod"], more.clock = desk.key, desk.iam["prod"], desk.clock
    result = more.enroll()
    assert result.already == ("prod",)
    assert [n for n, _ in result.enrolled] == ["dev", "sandbox"]
    assert desk.iam["prod"].devices == first
    assert len(more.credential_ids()) == 3
    with pytest.raises(AlreadyEnrolled):
        more.enroll()


def test_the_token_pulled_between_the_second_and_third_credential() -> None:
    desk = Desk()
    from emulated_yubikey.oath import INS_PUT as PUT

    puts = [0]
    original = desk.key.transmit

    def transmit(apdu: bytes) -> bytes:
        if apdu[1] == PUT:
            puts[0] += 1
            if puts[0] == 3:
                desk.key.remove()
        return original(apdu)

    desk.key.transmit = transmit  # type: ignore[method-assign]
    with pytest.raises(EnrollmentFailed) as caught:
        desk.enroll()
    assert caught.value.step == Step.PROGRAM_TOKEN
    assert isinstance(caught.value.cause, TokenRemoved)
    # every device deleted; the credentials that reached the token are named as left
    for iam in desk.iam.values():
        assert iam.devices == {}
    assert caught.value.leftovers
    assert all("credential" in text for text in caught.value.leftovers)


def test_no_seed_in_the_result_or_the_error() -> None:
    desk = Desk()
    result = desk.enroll()
    seeds = [bytes(d.seed).hex() for iam in desk.iam.values() for d in iam.devices.values()]
    text = repr(result)
    assert seeds and not any(s in text for s in seeds)


def test_every_accounts_checks_run_at_once_while_the_token_is_read() -> None:
    """Two lookups per account and the token's check: all at a barrier together (one
    round trip for every check), where one after another the first would wait in vain."""
    import threading

    desk = Desk()
    met = threading.Barrier(1 + 2 * len(NAMES), timeout=10)
    for name in NAMES:
        desk.iam[name].faults["user_account"] = met.wait
        desk.iam[name].faults["list_mfa_devices"] = met.wait
    with desk.token() as token:
        read = token.oath_state

        def oath_state() -> object:
            met.wait()
            return read()

        token.oath_state = oath_state  # type: ignore[method-assign]
        result = AccountsEnrollment(desk.accounts(), desk.clock).run(token, "alice")
    assert [name for name, _ in result.enrolled] == list(NAMES)


def test_no_account_asks_iam_again_after_a_clean_enable() -> None:
    desk = Desk()
    desk.enroll()
    for name in NAMES:
        calls = desk.iam[name].calls
        assert sorted(calls[:2]) == ["list_mfa_devices", "user_account"], name
        assert calls[2:] == ["create_virtual_mfa_device", "enable_mfa_device"], name


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_token_refusing_any_credential_undoes_every_account(k: int) -> None:
    from provisioner.core.errors import TokenCommandFailed

    desk = Desk()
    with desk.token() as token:
        real_put = token.put_credential
        puts = [0]

        def put(spec: Any, seed: Any) -> None:
            puts[0] += 1
            if puts[0] == k:
                raise TokenCommandFailed("the token refused the credential")
            real_put(spec, seed)

        token.put_credential = put  # type: ignore[method-assign]
        with pytest.raises(EnrollmentFailed) as caught:
            AccountsEnrollment(desk.accounts(), desk.clock, desk.progress).run(token, "alice")
    assert caught.value.step == Step.PROGRAM_TOKEN
    assert caught.value.account == NAMES[k - 1]
    desk.assert_nothing_anywhere()


def test_the_token_failing_the_one_pass_calculation_undoes_every_account() -> None:
    from provisioner.core.errors import TokenCommandFailed

    desk = Desk()
    with desk.token() as token:

        def calculate_many(ids: Any, timestamp: int) -> dict[str, str]:
            raise TokenCommandFailed("CALCULATE ALL failed")

        token.calculate_many = calculate_many  # type: ignore[method-assign]
        with pytest.raises(EnrollmentFailed) as caught:
            AccountsEnrollment(desk.accounts(), desk.clock, desk.progress).run(token, "alice")
    assert caught.value.step == Step.COMPUTE_CODES
    desk.assert_nothing_anywhere()
