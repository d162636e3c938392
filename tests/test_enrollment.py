"""The enrollment steps over an in-memory IAM and the emulated YubiKey (real yubikit code)."""

from __future__ import annotations

import threading

import pytest
from fakes import FakeClock, FakeIam

from emulated_yubikey import Capability, EmulatedConnection, EmulatedYubiKey
from emulated_yubikey.oath import INS_DELETE, INS_PUT
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.enrollment import Enrollment, EnrollmentSettings
from provisioner.core.errors import (
    AlreadyEnrolled,
    ChangeInProgress,
    CodeMismatch,
    CodesRejected,
    DeviceLimitReached,
    DirectoryUnavailable,
    EnrollmentFailed,
    InvalidInput,
    ServiceFailure,
    TokenCredentialExists,
    TokenFull,
    TokenLocked,
    TokenNoOath,
    TokenRemoved,
    UserNotFound,
)
from provisioner.core.model import CredentialSpec, Step
from provisioner.core.secret import Seed
from provisioner.core.totp import time_step

CRED_ID = "AWS:alice@123456789012"
ARN = "arn:aws:iam::123456789012:mfa/provisioner/alice.yubikey.12345678"


class Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[Step, str]] = []
        self.notices: list[str] = []

    def step(self, step: Step, detail: str) -> None:
        self.steps.append((step, detail))

    def notice(self, text: str) -> None:
        self.notices.append(text)


class Desk:
    """One enrollment desk: fake IAM, fake clock, an emulated key, the real token adapter."""

    def __init__(self, key: EmulatedYubiKey | None = None, **settings: object) -> None:
        self.clock = FakeClock()
        self.iam = FakeIam(self.clock, users=("alice", "bob"))
        self.key = key or EmulatedYubiKey(serial=12345678)
        self.progress = Recorder()
        self.settings = EnrollmentSettings(desk="test-desk", **settings)  # type: ignore[arg-type]
        self.reinsert_on_sleep = False

    def token(self, password: str | None = None) -> YubiKeyToken:
        def sleep(_: float) -> None:
            if self.reinsert_on_sleep and not self.key.present:
                self.key.insert()

        ticks = iter(range(10**6))
        return YubiKeyToken(
            lambda: EmulatedConnection(self.key),
            "Emulated reader",
            oath_password=password,
            sleep=sleep,
            monotonic=lambda: float(next(ticks)),
        )

    def enroll(self, user: str = "alice", password: str | None = None) -> object:
        with self.token(password) as token:
            return Enrollment(self.iam, self.clock, self.settings, self.progress).run(token, user)

    def credential_ids(self) -> list[str]:
        return [c.id for c in self.key.credentials()]

    def assert_nothing_left(self) -> None:
        assert self.iam.unassigned() == []
        assert self.iam.users["alice"] == []
        assert CRED_ID not in self.credential_ids()


def test_enrolls_with_previous_and_current_step() -> None:
    desk = Desk()
    result = desk.enroll()
    assert result.device_arn == ARN  # type: ignore[attr-defined]
    assert desk.iam.users["alice"] == [ARN]
    assert desk.iam.unassigned() == []
    assert desk.credential_ids() == [CRED_ID]
    # codes for N-1 and N, submitted during N, with no wait
    assert desk.iam.enabled_steps == [-1]
    assert desk.clock.slept == []
    assert [s for s, _ in desk.progress.steps] == [
        Step.CHECK,
        Step.CREATE_DEVICE,
        Step.PROGRAM_TOKEN,
        Step.COMPUTE_CODES,
        Step.ENABLE,
        Step.CONFIRM,
    ]
    tags = dict(desk.iam.devices[ARN].tags)
    assert tags["provisioner:token-serial"] == "12345678"
    assert tags["provisioner:desk"] == "test-desk"
    assert tags["provisioner:user"] == "alice"


def test_near_the_end_of_a_step_waits_for_the_next_one_only() -> None:
    desk = Desk()
    desk.clock.time = time_step(desk.clock.time) * 30 + 27.0
    desk.enroll()
    assert len(desk.clock.slept) == 1
    assert 3.0 <= desk.clock.slept[0] <= 3.0 + 2 * desk.clock.uncertainty()
    assert desk.iam.enabled_steps == [-1]
    assert any("waiting" in n for n in desk.progress.notices)


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda d: d.iam.users.pop("alice"), UserNotFound),
        (
            lambda d: d.iam.users.__setitem__("alice", [f"arn:x:{i}" for i in range(8)]),
            DeviceLimitReached,
        ),
        (
            # the limit is the directory's to say, not the core's to know
            lambda d: (
                setattr(d.iam, "device_limit", 2),
                d.iam.users.__setitem__("alice", ["arn:x:1", "arn:x:2"]),
            ),
            DeviceLimitReached,
        ),
    ],
    ids=["unknown user", "8 devices already", "the directory's own limit"],
)
def test_iam_refusals_happen_before_anything_is_created(build, error) -> None:  # type: ignore[no-untyped-def]
    desk = Desk()
    build(desk)
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll()
    assert isinstance(info.value.cause, error)
    assert info.value.step == "check"
    assert "create_virtual_mfa_device" not in desk.iam.calls
    assert desk.credential_ids() == []
    assert "alice" in str(info.value) and "12345678" in str(info.value)


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (
            EmulatedYubiKey(serial=1, enabled_capabilities=Capability.FIDO2 | Capability.PIV),
            TokenNoOath,
        ),
        (EmulatedYubiKey(serial=2, used_slots=32), TokenFull),
        (EmulatedYubiKey(serial=3, firmware=(5, 7, 1), used_slots=64), TokenFull),
        (EmulatedYubiKey(serial=4, oath_password="desk-secret"), TokenLocked),
    ],
    ids=["no OATH", "full fw 5.4", "full fw 5.7", "locked, no password"],
)
def test_token_refusals_happen_before_anything_is_created(key, error) -> None:  # type: ignore[no-untyped-def]
    desk = Desk(key)
    before = desk.credential_ids()
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll()
    assert isinstance(info.value.cause, error)
    assert info.value.step == "check"
    assert "create_virtual_mfa_device" not in desk.iam.calls
    assert desk.credential_ids() == before


def test_not_quite_full_applet_still_enrolls() -> None:
    desk = Desk(EmulatedYubiKey(serial=12345678, used_slots=31))
    desk.enroll()
    assert len(desk.credential_ids()) == 32


def test_password_protected_applet_with_its_password() -> None:
    desk = Desk(EmulatedYubiKey(serial=12345678, oath_password="desk-secret"))
    desk.enroll(password="desk-secret")
    assert desk.iam.users["alice"] == [ARN]


def test_wrong_password_is_a_clear_refusal() -> None:
    desk = Desk(EmulatedYubiKey(serial=12345678, oath_password="desk-secret"))
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll(password="wrong")
    assert isinstance(info.value.cause, TokenLocked)
    assert "wrong OATH password" in str(info.value)
    # IAM was only read (the user looked up while the token was): nothing made or changed
    assert set(desk.iam.calls) <= {"user_account", "list_mfa_devices"}


def test_bad_user_name_is_refused_before_any_call() -> None:
    desk = Desk()
    with pytest.raises(InvalidInput):
        desk.enroll(user="alice smith")
    assert desk.iam.calls == []


@pytest.mark.parametrize(
    "action",
    ["user_account", "list_mfa_devices", "create_virtual_mfa_device", "enable_mfa_device"],
)
def test_an_iam_failure_at_any_step_leaves_nothing(action: str) -> None:
    desk = Desk()
    desk.iam.fail(action, ServiceFailure("IAM failed"))
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll()
    assert info.value.leftovers == ()
    assert "rolled back, nothing left behind" in str(info.value)
    desk.assert_nothing_left()


def test_refused_codes_roll_back() -> None:
    desk = Desk()
    desk.iam.fail("enable_mfa_device", CodesRejected("codes refused"))
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll()
    assert info.value.step == "enable"
    assert isinstance(info.value.cause, CodesRejected)
    desk.assert_nothing_left()


def test_temporarily_unmodifiable_is_retried_with_fresh_codes() -> None:
    desk = Desk()
    desk.iam.fail("enable_mfa_device", ChangeInProgress("busy"), times=2)
    desk.enroll()
    assert desk.iam.calls.count("enable_mfa_device") == 3
    assert desk.iam.users["alice"] == [ARN]


def test_the_checks_ask_iam_side_by_side_while_the_token_is_read() -> None:
    """GetUser, ListMFADevices and the token's own checks at once: each waits at a
    barrier for the other two, so done one after another the first waits in vain."""
    desk = Desk()
    met = threading.Barrier(3, timeout=10)
    threads: set[int] = set()

    def arrive() -> None:
        threads.add(threading.get_ident())
        met.wait()

    desk.iam.faults["user_account"] = arrive
    desk.iam.faults["list_mfa_devices"] = arrive
    with desk.token() as token:
        read = token.oath_state

        def oath_state() -> object:
            arrive()
            return read()

        token.oath_state = oath_state  # type: ignore[method-assign]
        Enrollment(desk.iam, desk.clock, desk.settings, desk.progress).run(token, "alice")
    assert len(threads) == 3
    assert desk.iam.users["alice"] == [ARN]


def test_a_clean_enable_is_the_confirmation_no_call_after_it() -> None:
    desk = Desk()
    desk.enroll()
    checks, after = desk.iam.calls[:2], desk.iam.calls[2:]
    assert sorted(checks) == ["list_mfa_devices", "user_account"]
    assert after == ["create_virtual_mfa_device", "enable_mfa_device"]  # three round trips


def test_a_lost_answer_to_enable_is_checked_not_assumed() -> None:
    desk = Desk()
    real_enable = desk.iam.enable_mfa_device

    def enable_then_lose_answer(*args: str) -> None:
        real_enable(*args)
        raise DirectoryUnavailable("read timeout")

    desk.iam.enable_mfa_device = enable_then_lose_answer  # type: ignore[method-assign]
    desk.enroll()
    assert desk.iam.calls[-1] == "list_mfa_devices"  # asked, since the answer was lost
    assert desk.iam.users["alice"] == [ARN]
    assert desk.credential_ids() == [CRED_ID]


def test_a_lost_answer_to_create_deletes_the_device_it_may_have_made() -> None:
    desk = Desk()
    real_create = desk.iam.create_virtual_mfa_device

    def create_then_lose_answer(spec):  # type: ignore[no-untyped-def]
        real_create(spec)
        raise DirectoryUnavailable("connection dropped")

    desk.iam.create_virtual_mfa_device = create_then_lose_answer  # type: ignore[method-assign]
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll()
    assert info.value.leftovers == ()
    assert desk.iam.devices == {}
    assert desk.credential_ids() == []


def test_a_leftover_unassigned_device_of_that_name_is_replaced() -> None:
    desk = Desk()
    from provisioner.core.model import DeviceSpec

    desk.iam.create_virtual_mfa_device(DeviceSpec("alice.yubikey.12345678", "/provisioner/"))
    desk.enroll()
    assert desk.iam.users["alice"] == [ARN]
    assert any("left from earlier" in n for n in desk.progress.notices)


def test_already_enrolled_is_nothing_to_do() -> None:
    desk = Desk()
    desk.enroll()
    calls = len(desk.iam.calls)
    with pytest.raises(AlreadyEnrolled):
        desk.enroll()
    assert "create_virtual_mfa_device" not in desk.iam.calls[calls:]
    assert desk.iam.users["alice"] == [ARN]
    assert desk.credential_ids() == [CRED_ID]


def test_an_existing_credential_of_that_name_is_never_overwritten() -> None:
    key = EmulatedYubiKey(serial=12345678)
    desk = Desk(key)
    desk.enroll()
    # IAM forgets the device (deleted by someone): the token's credential stays precious
    desk.iam.deactivate_mfa_device("alice", ARN)
    desk.iam.delete_virtual_mfa_device(ARN)
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll()
    assert isinstance(info.value.cause, TokenCredentialExists)
    assert desk.credential_ids() == [CRED_ID]
    assert desk.iam.devices == {}


def test_codes_that_disagree_with_the_seed_abort_before_enable() -> None:
    desk = Desk()

    class CorruptingToken(YubiKeyToken):
        def put_credential(self, spec: CredentialSpec, seed: Seed) -> None:
            super().put_credential(spec, Seed(b"\x00" * 20))

    ticks = iter(range(10**6))
    token = CorruptingToken(
        lambda: EmulatedConnection(desk.key),
        "Emulated reader",
        monotonic=lambda: float(next(ticks)),
    )
    with pytest.raises(EnrollmentFailed) as info:
        Enrollment(desk.iam, desk.clock, desk.settings, desk.progress).run(token, "alice")
    assert isinstance(info.value.cause, CodeMismatch)
    assert "enable_mfa_device" not in desk.iam.calls
    desk.assert_nothing_left()


def _apdus_of_a_full_enrollment() -> int:
    desk = Desk()
    desk.enroll()
    return len(desk.key.history)


@pytest.mark.parametrize("k", range(1, _apdus_of_a_full_enrollment() + 1))
def test_card_pulled_at_each_command_then_put_back(k: int) -> None:
    desk = Desk()
    desk.reinsert_on_sleep = True  # the operator puts it back when asked
    desk.key.schedule_pull(k)
    with pytest.raises((EnrollmentFailed, TokenRemoved)) as info:
        with desk.token() as token:  # opening reads the device info: commands 1 and 2
            Enrollment(desk.iam, desk.clock, desk.settings, desk.progress).run(token, "alice")
    error = info.value
    if isinstance(error, EnrollmentFailed):
        assert isinstance(error.cause, TokenRemoved), error
        assert error.leftovers == ()
    else:
        assert desk.iam.calls == []
    if not desk.key.present:
        desk.key.insert()
    desk.assert_nothing_left()


def test_card_pulled_and_not_put_back_names_what_is_left() -> None:
    desk = Desk(reinsert_timeout=1.0)
    with desk.token() as token:
        # pull at the first CALCULATE: the credential is on the token by then
        count = len(desk.key.history)
        enrollment = Enrollment(desk.iam, desk.clock, desk.settings, desk.progress)
        real_calculate = token.calculate

        def pull_then_calculate(cid: str, ts: int) -> str:
            desk.key.remove()
            return real_calculate(cid, ts)

        token.calculate = pull_then_calculate  # type: ignore[method-assign]
        with pytest.raises(EnrollmentFailed) as info:
            enrollment.run(token, "alice")
    failed = info.value
    # Pulled while computing codes (reported under 'enable', the step that computes them),
    # after the token had stored the credential and before a rollback could delete it.
    assert (failed.step, type(failed.cause)) == (Step.ENABLE, TokenRemoved)
    during = [(record.ins, record.sw) for record in desk.key.history[count:]]
    assert (INS_PUT, 0x9000) in during
    assert INS_DELETE not in [ins for ins, _ in during]
    assert failed.leftovers and CRED_ID in failed.leftovers[0]
    assert "NOT fully rolled back" in str(info.value)
    assert desk.iam.devices == {}  # the IAM side was still undone
    desk.key.insert()
    assert desk.credential_ids() == [CRED_ID]  # and the message told the truth


def test_touch_credential_asks_for_touches_and_works() -> None:
    desk = Desk(touch=True)
    desk.enroll()
    assert desk.key.credentials()[0].touch is True
    assert desk.key.touch_requests == 2
    assert any("touch the token" in n for n in desk.progress.notices)


def test_touch_not_given_is_a_clear_error_and_rolls_back() -> None:
    desk = Desk(touch=True)
    desk.key.user_touches = False
    with pytest.raises(EnrollmentFailed) as info:
        desk.enroll()
    from provisioner.core.errors import TokenTouchTimeout

    assert isinstance(info.value.cause, TokenTouchTimeout)
    assert "not touched in time" in str(info.value)
    desk.assert_nothing_left()


class ListJournal:
    def __init__(self) -> None:
        self.facts: list[tuple[str, str | None, str | None]] = []

    def record(self, fact, *, device_arn=None, credential_id=None) -> None:  # type: ignore[no-untyped-def]
        self.facts.append((fact.value, device_arn, credential_id))


def test_the_journal_is_written_before_and_after_each_side_effect() -> None:
    desk = Desk()
    journal = ListJournal()
    seen_at_call: dict[str, str] = {}
    for action in ("create_virtual_mfa_device", "enable_mfa_device"):
        desk.iam.faults[action] = (
            lambda a=action: seen_at_call.__setitem__(a, journal.facts[-1][0])  # type: ignore[misc]
        )
    with desk.token() as token:
        Enrollment(desk.iam, desk.clock, desk.settings, desk.progress, journal).run(token, "alice")
    assert [f for f, _, _ in journal.facts] == [
        "device requested",
        "device created",
        "credential requested",
        "credential written",
        "enable requested",
        "enabled",
        "confirmed",
    ]
    assert journal.facts[0][1] == ARN  # the expected ARN, before IAM made it
    assert journal.facts[2][2] == CRED_ID
    assert seen_at_call == {
        "create_virtual_mfa_device": "device requested",
        "enable_mfa_device": "enable requested",
    }


def test_the_journal_records_the_rollback() -> None:
    desk = Desk()
    desk.iam.fail("enable_mfa_device", CodesRejected("codes refused"))
    journal = ListJournal()
    with desk.token() as token, pytest.raises(EnrollmentFailed):
        Enrollment(desk.iam, desk.clock, desk.settings, desk.progress, journal).run(token, "alice")
    facts = [f for f, _, _ in journal.facts]
    assert facts[-2:] == ["device deleted", "credential deleted"], facts
    assert "enabled" not in facts


@pytest.mark.parametrize(
    ("ins", "sw", "data", "fragment", "step"),
    [
        (
            0xA1,
            0x9000,
            b"\x72\x05\x21ab",
            "gave a bad answer to list its OATH credentials",
            "check",
        ),
        (0xA4, 0x9000, b"\x79\x01", "gave a bad answer", "check"),  # SELECT OATH, short TLV
        (0x01, 0x6F00, b"", "answered SW=0x6F00 to store credential", "program token"),
        (0xA2, 0x6581, b"", "answered SW=0x6581 to compute a code", "enable"),
    ],
    ids=["garbled LIST", "garbled SELECT", "PUT 6F00", "CALCULATE 6581"],
)
def test_a_token_answering_nonsense_is_a_clear_error(
    ins: int, sw: int, data: bytes, fragment: str, step: str
) -> None:
    desk = Desk()
    p1 = 0x04 if ins == 0xA4 else None
    # skip the Management SELECT (also A4) by opening first, then arming the fault
    with desk.token() as token:
        desk.key.fail_command(ins, sw, data=data, p1=p1)
        with pytest.raises(EnrollmentFailed) as info:
            Enrollment(desk.iam, desk.clock, desk.settings, desk.progress).run(token, "alice")
    assert fragment in str(info.value)
    assert info.value.step == step
    assert info.value.leftovers == ()
    desk.assert_nothing_left()
