"""Least privilege, proven: docs/iam-policy.json is exactly what the tool needs.

The tool's real operations (enroll, resync, revoke, reconcile, the doctor's permission
check) run through the real boto3 against the local IAM server with authorization
enforced, as a principal that holds only that policy, with the emulated YubiKey as the
token. With the whole policy everything works; with any one action taken out, the tool
fails, and the error names that action.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from desk_harness import assert_no_seed
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from local_iam_server import LocalIamServer, Principal
from provisioner.adapters.aws.iam import IamClient
from provisioner.adapters.aws.permissions import (
    PERMISSIONS,
    CallerIdentity,
    Decision,
    Evaluation,
    checks,
    missing,
    policy_source_arn,
    require_all,
)
from provisioner.adapters.sqlite_store import Store
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.clock import AwsClock
from provisioner.core.enrollment import TOOL_TAG, Enrollment, EnrollmentSettings, Leg
from provisioner.core.errors import AccessDenied, EnrollmentFailed, ProvisionerError
from provisioner.core.lifecycle import Lifecycle
from provisioner.core.ports import Fact
from provisioner.core.recovery import Action, Recovery
from provisioner.core.secret import Seed

ACCOUNT = "123456789012"
POLICY = Path(__file__).resolve().parents[1] / "docs" / "iam-policy.json"
DESK = "lp-desk"
ALICE_TOKEN, BOB_TOKEN, DAVE_TOKEN = 31_000_001, 31_000_002, 31_000_003
ORPHAN = f"arn:aws:iam::{ACCOUNT}:mfa/provisioner/carol.yubikey.31000009"


def policy_document(without: str | None = None) -> dict[str, Any]:
    """The shipped policy for the local account, minus one action if asked."""
    document: dict[str, Any] = json.loads(POLICY.read_text().replace("ACCOUNT_ID", ACCOUNT))
    statements = []
    for statement in document["Statement"]:
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        kept = [a for a in actions if a != without]
        if kept:
            statements.append(statement | {"Action": kept})
    document["Statement"] = statements
    return document


def policy_actions() -> list[str]:
    return [a for s in policy_document()["Statement"] for a in s["Action"]]


# --- the table and the policy, without a server --------------------------------------


def test_the_table_and_the_policy_name_exactly_the_same_actions() -> None:
    in_policy = policy_actions()
    in_table = [p.action for p in PERMISSIONS]
    assert len(set(in_policy)) == len(in_policy) and len(set(in_table)) == len(in_table)
    assert sorted(in_policy) == sorted(in_table)


def test_the_policy_grants_each_action_on_the_resource_the_table_names() -> None:
    raw = json.loads(POLICY.read_text())
    wanted = checks(
        account="ACCOUNT_ID",
        device_path="/provisioner/",
        user_arn="arn:aws:iam::ACCOUNT_ID:user/alice",
        principal_arn="arn:aws:iam::ACCOUNT_ID:user/provisioner-desk",
    )
    for action, resource in wanted:
        grants = [
            s["Resource"]
            for s in raw["Statement"]
            if s["Effect"] == "Allow"
            and action in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        ]
        assert len(grants) == 1, action
        assert fnmatch.fnmatchcase(resource, grants[0]), (action, resource, grants[0])
        # Scoped: nothing but ListVirtualMFADevices (which takes no resource) gets "*".
        assert (grants[0] == "*") == (action == "iam:ListVirtualMFADevices")


def test_the_doctors_sid_says_what_the_simulator_is_for() -> None:
    raw = json.loads(POLICY.read_text())
    [statement] = [s for s in raw["Statement"] if s["Action"] == "iam:SimulatePrincipalPolicy"]
    assert statement["Sid"] == "DoctorSimulatesTheDesksOwnPermissions"


def test_an_assumed_role_is_simulated_as_its_role() -> None:
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/provisioner-desk/i-0abc"
    assert policy_source_arn(session) == f"arn:aws:iam::{ACCOUNT}:role/provisioner-desk"
    user = f"arn:aws:iam::{ACCOUNT}:user/desks/front"
    assert policy_source_arn(user) == user
    assert CallerIdentity(ACCOUNT, session, "AROA:i-0abc").principal_arn.endswith(
        ":role/provisioner-desk"
    )


def test_require_all_names_every_missing_permission() -> None:
    evaluations = [
        Evaluation("iam:GetUser", "u", Decision.ALLOWED),
        Evaluation("iam:EnableMFADevice", "u", Decision.IMPLICIT_DENY),
        Evaluation("iam:TagMFADevice", "d", Decision.EXPLICIT_DENY),
    ]
    assert [e.action for e in missing(evaluations)] == ["iam:EnableMFADevice", "iam:TagMFADevice"]
    with pytest.raises(AccessDenied) as info:
        require_all(evaluations)
    assert "iam:EnableMFADevice on u (implicitDeny)" in info.value.message
    assert "iam:TagMFADevice on d (explicitDeny)" in info.value.message
    assert info.value.permission == "iam:EnableMFADevice"
    assert "docs/iam-policy.json" in info.value.one_line()
    require_all(evaluations[:1])  # all allowed: nothing to say


# --- the operations, against IAM with authorization enforced ---------------------------

PHASES = ("enroll", "resync", "revoke", "reconcile", "doctor", "ahead")

# Where a policy without the action must first fail, given the order of PHASES.
FIRST_FAILURE = {
    "iam:GetUser": "enroll",
    "iam:ListMFADevices": "enroll",
    "iam:CreateVirtualMFADevice": "enroll",
    "iam:TagMFADevice": "enroll",
    "iam:EnableMFADevice": "enroll",
    "iam:ResyncMFADevice": "resync",
    "iam:ListVirtualMFADevices": "resync",
    "iam:DeactivateMFADevice": "revoke",
    "iam:DeleteVirtualMFADevice": "revoke",
    "iam:SimulatePrincipalPolicy": "doctor",
}


class Desk:
    """A desk whose AWS principal holds exactly one policy, and a world to work on:
    alice to enroll, bob's enrollment interrupted after his token got its credential,
    and an orphaned device of this desk."""

    def __init__(
        self,
        server: LocalIamServer,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        document: dict[str, Any],
    ) -> None:
        self.server = server
        self.keys = {s: EmulatedYubiKey(serial=s) for s in (ALICE_TOKEN, BOB_TOKEN, DAVE_TOKEN)}
        self.settings = EnrollmentSettings(desk=DESK, margin=1.0)
        self.store = Store(tmp_path / "state.db")
        self.state_file = tmp_path / "state.db"
        admin = server.admin_client("iam")
        admin.create_user(UserName="dave")  # queued at a daemon: his device made ahead
        self.principal: Principal = server.create_principal("provisioner-desk", document)
        self.bob_device = self._interrupted_enrollment(admin)
        admin.create_virtual_mfa_device(
            VirtualMFADeviceName=ORPHAN.rsplit("/", 1)[1],
            Path="/provisioner/",
            Tags=[
                {"Key": "provisioner:tool", "Value": TOOL_TAG},
                {"Key": "provisioner:desk", "Value": DESK},
                {"Key": "provisioner:user", "Value": "carol"},
                {"Key": "provisioner:token-serial", "Value": "31000009"},
            ],
        )
        # From here on only the principal's policy decides.
        server.set_auth_enforced(True)
        for name, value in self.principal.credentials_env().items():
            monkeypatch.setenv(name, value)
        self.clock = AwsClock()
        self.iam = IamClient(self.clock, max_attempts=2, connect_timeout=2.0, read_timeout=5.0)
        self.messages: list[str] = []

    def _interrupted_enrollment(self, admin: Any) -> str:
        """What a killed daemon leaves: bob's device created, its seed on his token."""
        credential, device = self.settings.names("bob", ACCOUNT, BOB_TOKEN)
        eid = self.store.start_enrollment("bob", BOB_TOKEN, "reader", "roster")
        created = admin.create_virtual_mfa_device(
            VirtualMFADeviceName=device.name,
            Path=device.path,
            Tags=[{"Key": k, "Value": v} for k, v in device.tags],
        )["VirtualMFADevice"]
        arn = str(created["SerialNumber"])
        seed = Seed.from_base32(created.pop("Base32StringSeed"))
        journal = self.store.journal(eid)
        journal.record(Fact.DEVICE_REQUESTED, device_arn=arn)
        journal.record(Fact.DEVICE_CREATED, device_arn=arn)
        journal.record(Fact.CREDENTIAL_REQUESTED, credential_id=credential.credential_id)
        with self.token(BOB_TOKEN) as token:
            token.put_credential(credential, seed)
        seed.wipe()
        journal.record(Fact.CREDENTIAL_WRITTEN)
        return arn

    # --- the token ------------------------------------------------------------------

    def token(self, serial: int) -> YubiKeyToken:
        key = self.keys[serial]
        return YubiKeyToken(lambda: EmulatedConnection(key), f"reader {serial}")

    @contextlib.contextmanager
    def find_token(self, serial: int) -> Iterator[YubiKeyToken | None]:
        if serial not in self.keys:
            yield None
            return
        with self.token(serial) as token:
            yield token

    # --- the tool's operations --------------------------------------------------------

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.iam, self.clock, self.settings)

    def enroll(self) -> str:
        with self.token(ALICE_TOKEN) as token:
            return Enrollment(self.iam, self.clock, self.settings).run(token, "alice").device_arn

    def ahead(self) -> str:
        """As the daemon's work ahead does it: dave checked and his device made before his
        token is known, then his token plugged in (the device tagged with its serial)."""
        leg = Leg("dave")
        enrollment = Enrollment(self.iam, self.clock, self.settings)
        enrollment.prepare(leg)
        enrollment.make_device(leg, None, "q1-abc123")
        with self.token(DAVE_TOKEN) as token:
            return enrollment.run_leg(token, leg).device_arn

    def resync(self) -> str:
        with self.token(ALICE_TOKEN) as token:
            return self.lifecycle().resync("alice", token)[0]

    def revoke(self) -> bool:
        return self.lifecycle().revoke("alice", ALICE_TOKEN, self.find_token).credential_removed

    def reconcile(self) -> list[Action]:
        recovery = Recovery(
            self.iam,
            self.store,
            lambda eid: Enrollment(
                self.iam, self.clock, self.settings, journal=self.store.journal(eid)
            ),
            self.find_token,
            device_path=self.settings.device_path,
            desk=DESK,
        )
        actions = recovery.run()
        self.messages += [a.text for a in actions]
        return actions

    def simulate(self) -> list[Evaluation]:
        """Every row of the table, asked of IAM's policy simulator for this principal."""
        me = self.iam.caller_identity()
        return self.iam.simulate(
            me.principal_arn,
            checks(
                account=me.account,
                device_path=self.settings.device_path,
                user_arn=f"arn:aws:iam::{me.account}:user/alice",
                principal_arn=me.principal_arn,
            ),
        )

    def doctor(self) -> list[Evaluation]:
        """The doctor's permission check: the simulation, and an error for any gap."""
        evaluations = self.simulate()
        require_all(evaluations)
        return evaluations

    def run(self) -> tuple[dict[str, Any], tuple[str, ProvisionerError] | None]:
        """The phases in order, until one fails: what each returned, and the failure."""
        done: dict[str, Any] = {}
        for phase in PHASES:
            operation: Callable[[], Any] = getattr(self, phase)
            try:
                done[phase] = operation()
            except ProvisionerError as error:
                self.messages.append(error.one_line())
                return done, (phase, error)
        return done, None

    def secrets(self) -> list[bytes]:
        return [s for key in self.keys.values() for s in key.secrets_for_leak_checks()]


@pytest.fixture
def make_desk(
    local_iam: LocalIamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, Any]], Desk]]:
    yield lambda document: Desk(local_iam, tmp_path, monkeypatch, document)
    local_iam.set_auth_enforced(False)


def access_denied_in(error: BaseException) -> AccessDenied:
    """The AccessDenied an error is, or was caused by."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, AccessDenied):
            return seen
        seen = seen.cause if isinstance(seen, EnrollmentFailed) else seen.__cause__
    raise AssertionError(f"no AccessDenied behind {error!r}")


@pytest.mark.iam_server
def test_with_the_policy_every_operation_works(
    make_desk: Callable[[dict[str, Any]], Desk],
    local_iam: LocalIamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="provisioner")
    desk = make_desk(policy_document())
    done, failure = desk.run()
    assert failure is None, failure[1].one_line() if failure else ""

    alice_device = done["enroll"]
    assert alice_device == f"arn:aws:iam::{ACCOUNT}:mfa/provisioner/alice.yubikey.{ALICE_TOKEN}"
    assert done["resync"] == alice_device
    assert done["revoke"] is True  # the credential left alice's token too
    texts = [a.text for a in done["reconcile"]]
    assert any("finished with the credential on the token" in t for t in texts), texts
    assert any(t.startswith(f"deleted orphaned device {ORPHAN}") for t in texts), texts
    assert not any("could not" in t for t in texts), texts
    evaluations = done["doctor"]
    assert {e.action for e in evaluations} == {p.action for p in PERMISSIONS}
    assert all(e.decision is Decision.ALLOWED for e in evaluations)

    # Every call was judged, and the world is as the operations say.
    assert local_iam.auth_enforced()
    local_iam.set_auth_enforced(False)
    admin = boto3.client("iam", endpoint_url=local_iam.endpoint_url, region_name="us-east-1")
    assert admin.list_mfa_devices(UserName="alice")["MFADevices"] == []
    assert [d["SerialNumber"] for d in admin.list_mfa_devices(UserName="bob")["MFADevices"]] == [
        desk.bob_device
    ]
    dave = f"arn:aws:iam::{ACCOUNT}:mfa/provisioner/dave.yubikey.q1-abc123"
    assert done["ahead"] == dave
    assert sorted(d["serial"] for d in local_iam.virtual_devices()) == [desk.bob_device, dave]
    tags = admin.list_mfa_device_tags(SerialNumber=dave)["Tags"]
    assert {"Key": "provisioner:token-serial", "Value": str(DAVE_TOKEN)} in tags
    assert [c.id for c in desk.keys[ALICE_TOKEN].credentials()] == []
    calls = local_iam.call_counts()
    for action in (
        "CreateVirtualMFADevice",
        "ResyncMFADevice",
        "DeactivateMFADevice",
        "DeleteVirtualMFADevice",
        "SimulatePrincipalPolicy",
        "GetCallerIdentity",
    ):
        assert calls.get(action, 0) >= 1, action

    assert_no_seed(
        desk.secrets(),
        [*desk.messages, caplog.text, local_iam.log_tail(100_000)],
        [desk.state_file],
    )


@pytest.mark.iam_server
@pytest.mark.parametrize("action", policy_actions())
def test_without_any_one_action_the_tool_fails_naming_it(
    make_desk: Callable[[dict[str, Any]], Desk],
    local_iam: LocalIamServer,
    caplog: pytest.LogCaptureFixture,
    action: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="provisioner")
    desk = make_desk(policy_document(without=action))
    _done, failure = desk.run()
    assert failure is not None, f"everything worked without {action}"
    phase, error = failure
    assert action in error.message
    assert access_denied_in(error).permission == action
    assert phase == FIRST_FAILURE[action], error.one_line()

    if action != "iam:SimulatePrincipalPolicy":
        # The doctor's simulation sees the same gap, and only that one.
        evaluations = desk.simulate()
        assert [e.action for e in missing(evaluations)] == [action]
        with pytest.raises(AccessDenied) as info:
            require_all(evaluations)
        assert action in info.value.message and info.value.permission == action

    assert_no_seed(desk.secrets(), [*desk.messages, caplog.text], [desk.state_file])


def test_every_action_of_the_policy_is_tested_and_placed() -> None:
    assert sorted(FIRST_FAILURE) == sorted(policy_actions())
    assert set(FIRST_FAILURE.values()) <= set(PHASES)
