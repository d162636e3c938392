"""`provisioner enroll` as a user runs it: a real process, the real pcscd with vpcd readers
holding emulated YubiKeys, the real boto3 against the strict local IAM server."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest

from emulated_yubikey import Capability, EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer

pytestmark = [pytest.mark.pcsc, pytest.mark.iam_server, pytest.mark.slow]

SERIAL = 20_000_001
CRED = "AWS:alice@123456789012"
ARN = f"arn:aws:iam::123456789012:mfa/provisioner/alice.yubikey.{SERIAL}"


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Bench:
    stack: PcscStack
    iam: LocalIamServer
    admin: object
    config: Path
    key: EmulatedYubiKey | None = None

    def plug(self, key: EmulatedYubiKey, slot: int = 0) -> EmulatedYubiKey:
        self.stack.insert(key, slot)
        self.key = key
        return key

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.iam.aws_env())
        env["PROVISIONER_CONFIG"] = str(self.config)
        return env

    def provisioner(self, *args: str, on_line: object = None, timeout: float = 60) -> Run:
        proc = subprocess.Popen(
            [sys.executable, "-m", "provisioner", *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out_lines: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        err_box: list[str] = []
        reader = threading.Thread(target=lambda: err_box.append(proc.stderr.read()))  # type: ignore[union-attr]
        reader.start()
        for line in proc.stdout:
            out_lines.append(line)
            if callable(on_line):
                on_line(line)
        proc.wait(timeout=timeout)
        reader.join()
        return Run(proc.returncode, "".join(out_lines), "".join(err_box))

    def enroll(self, user: str = "alice", *extra: str, **kw: object) -> Run:
        return self.provisioner(
            "enroll",
            "--user",
            user,
            "--reader",
            self.stack.reader_names[0],
            *extra,
            **kw,  # type: ignore[arg-type]
        )

    def unassigned(self) -> list[str]:
        devices = self.admin.list_virtual_mfa_devices(AssignmentStatus="Unassigned")  # type: ignore[attr-defined]
        return [d["SerialNumber"] for d in devices["VirtualMFADevices"]]

    def devices_of(self, user: str) -> list[str]:
        return [d["SerialNumber"] for d in self.admin.list_mfa_devices(UserName=user)["MFADevices"]]  # type: ignore[attr-defined]

    def credentials(self) -> list[str]:
        assert self.key is not None
        return [c.id for c in self.key.credentials()]

    def assert_as_before(self, credentials_before: list[str] | None = None) -> None:
        assert self.unassigned() == []
        assert self.devices_of("alice") == []
        assert self.credentials() == (credentials_before or [])


@pytest.fixture
def bench(
    pcsc_stack: PcscStack, local_iam: LocalIamServer, admin_iam, tmp_path: Path
) -> Iterator[Bench]:  # type: ignore[no-untyped-def]
    config = tmp_path / "provisioner.toml"
    # The desk's state (the one-shot commands record their work there) and socket (no
    # daemon answers on it) of its own, never the machine's.
    config.write_text(
        'desk = "test-desk"\n[enrollment]\nmargin_seconds = 2\n[token]\nreinsert_timeout = 10\n'
        f'[daemon]\nstate_directory = "{tmp_path / "state"}"\n'
        f'socket = "{tmp_path / "run" / "control.sock"}"\n'
    )
    b = Bench(pcsc_stack, local_iam, admin_iam, config)
    yield b
    for slot in (0, 1):
        pcsc_stack.remove(slot, wait=True)


def test_enroll_exits_0_and_the_codes_were_right_at_the_servers_time(bench: Bench) -> None:
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    run = bench.enroll()
    assert run.code == 0, run.text
    for step in ("check", "create device", "program token", "compute codes", "enable", "confirm"):
        assert f" {step} " in run.out
    assert f"enrolled alice: token {SERIAL} is MFA device {ARN}" in run.out
    assert " ms)" in run.out
    assert bench.devices_of("alice") == [ARN]
    assert bench.unassigned() == []
    assert bench.credentials() == [CRED]
    enables = [a for a in bench.iam.attempts() if a.action == "EnableMFADevice"]
    assert len(enables) == 1 and enables[0].accepted
    assert enables[0].step_offset == 0  # the later code is for the server's current step N


def test_the_token_works_for_unmodified_ykman_afterwards(bench: Bench) -> None:
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    assert bench.enroll().code == 0
    ykman = Path(sys.executable).with_name("ykman")
    listed = subprocess.run(
        [str(ykman), "--reader", bench.stack.reader_names[0], "oath", "accounts", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert CRED in listed.stdout


def test_server_clock_skew_is_followed(bench: Bench) -> None:
    bench.iam.set_clock_offset(95.0)
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    run = bench.enroll()
    assert run.code == 0, run.text
    assert "behind AWS's" in run.err  # the skew was logged
    assert bench.devices_of("alice") == [ARN]
    enables = [a for a in bench.iam.attempts() if a.action == "EnableMFADevice"]
    assert enables[-1].accepted and enables[-1].step_offset == 0


def test_already_enrolled_is_nothing_to_do(bench: Bench) -> None:
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    assert bench.enroll().code == 0
    again = bench.enroll()
    assert again.code == 0
    assert "nothing to do" in again.out
    assert bench.iam.call_counts()["CreateVirtualMFADevice"] == 1


@pytest.mark.parametrize(
    ("action", "code", "step"),
    [
        ("GetUser", "AccessDenied", "check"),
        ("ListMFADevices", "ServiceFailure", "check"),
        ("CreateVirtualMFADevice", "AccessDenied", "create device"),
        ("CreateVirtualMFADevice", "ServiceFailure", "create device"),
        ("EnableMFADevice", "InvalidAuthenticationCode", "enable"),
        ("EnableMFADevice", "LimitExceeded", "enable"),
        ("EnableMFADevice", "NoSuchEntity", "enable"),
        ("EnableMFADevice", "ServiceFailure", "enable"),
        ("EnableMFADevice", "EntityTemporarilyUnmodifiable", "enable"),
    ],
)
def test_iam_refusing_a_step_leaves_iam_and_token_as_before(
    bench: Bench, action: str, code: str, step: str
) -> None:
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    bench.iam.inject_fault(action, code=code, count=10)  # more than every retry
    run = bench.enroll()
    assert run.code in (1, 4), run.text
    last = run.err.strip().splitlines()[-1]
    assert last.startswith("provisioner: enrollment of alice on token")
    assert f"failed at step '{step}'" in last
    assert code in last
    assert "nothing left behind" in last
    bench.iam.clear_faults()
    bench.assert_as_before()


def test_a_step_that_cannot_be_undone_is_named_and_exits_5(bench: Bench) -> None:
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    bench.iam.inject_fault("EnableMFADevice", code="InvalidAuthenticationCode")
    bench.iam.inject_fault("DeleteVirtualMFADevice", code="AccessDenied", count=10)
    run = bench.enroll()
    assert run.code == 5, run.text
    assert "NOT fully rolled back" in run.err and "virtual MFA device arn:" in run.err
    bench.iam.clear_faults()
    assert bench.unassigned() != []  # the message told the truth
    assert bench.credentials() == []  # and the token side was still undone


def test_unknown_user(bench: Bench) -> None:
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    run = bench.enroll("mallory")
    assert run.code == 4
    assert "IAM user mallory does not exist" in run.err
    assert "CreateVirtualMFADevice" not in bench.iam.call_counts()


def test_user_with_8_devices_already(bench: Bench) -> None:
    admin = bench.admin
    for i in range(8):
        seed = admin.create_virtual_mfa_device(VirtualMFADeviceName=f"other{i}")["VirtualMFADevice"]  # type: ignore[attr-defined]
        totp = pyotp.TOTP(seed["Base32StringSeed"].decode())
        now = bench.iam.server_time()
        admin.enable_mfa_device(  # type: ignore[attr-defined]
            UserName="alice",
            SerialNumber=seed["SerialNumber"],
            AuthenticationCode1=totp.at(now - 30),
            AuthenticationCode2=totp.at(now),
        )
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    run = bench.enroll()
    assert run.code == 4
    assert "already has 8 MFA devices" in run.err
    assert bench.iam.call_counts().get("CreateVirtualMFADevice", 0) == 8
    assert bench.credentials() == []


def test_device_name_in_use_by_another_user(bench: Bench) -> None:
    bench.config.write_text(bench.config.read_text() + '[iam]\ndevice_name = "token-{serial}"\n')
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    assert bench.enroll("bob").code == 0
    run = bench.enroll("alice")
    assert run.code == 1, run.text  # refused after the check: rolled back
    assert "taken by a device another user has enabled" in run.err
    assert bench.devices_of("bob") == [f"arn:aws:iam::123456789012:mfa/provisioner/token-{SERIAL}"]
    assert bench.devices_of("alice") == []
    assert bench.credentials() == ["AWS:bob@123456789012"]


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (
            lambda: EmulatedYubiKey(
                serial=SERIAL, enabled_capabilities=Capability.FIDO2 | Capability.PIV
            ),
            "no OATH",
        ),
        (
            lambda: EmulatedYubiKey(serial=SERIAL, oath_password="front-desk"),
            "protected by a password",
        ),
        (lambda: EmulatedYubiKey(serial=SERIAL, used_slots=32), "no free OATH slot"),
    ],
    ids=["no OATH", "locked without password", "full applet"],
)
def test_token_refusals_exit_3_and_touch_nothing(bench: Bench, key, fragment: str) -> None:  # type: ignore[no-untyped-def]
    k = bench.plug(key())
    before = [c.id for c in k.credentials()]
    run = bench.enroll()
    assert run.code == 3, run.text
    assert fragment in run.err
    assert "CreateVirtualMFADevice" not in bench.iam.call_counts()
    assert bench.credentials() == before


def test_locked_applet_with_its_password_file(bench: Bench, tmp_path: Path) -> None:
    secret = tmp_path / "oath-password"
    secret.write_text("front-desk\n")
    secret.chmod(0o600)
    bench.config.write_text(
        bench.config.read_text().replace("[token]\n", f'[token]\noath_password_file = "{secret}"\n')
    )
    bench.plug(EmulatedYubiKey(serial=SERIAL, oath_password="front-desk"))
    run = bench.enroll()
    assert run.code == 0, run.text
    assert bench.credentials() == [CRED]


def test_card_pulled_mid_way_and_put_back_when_asked(bench: Bench) -> None:
    key = bench.plug(EmulatedYubiKey(serial=SERIAL))
    # mgmt select, read config, OATH select, list, put, calculate: vanish at the 6th,
    # when the credential is already on the token.
    key.schedule_pull(6)
    asked: list[str] = []

    def operator(line: str) -> None:
        if "put it back" in line:
            asked.append(line)
            bench.stack.insert(key, 0)

    run = bench.enroll(on_line=operator)
    assert run.code == 1, run.text
    pulled = [r for r in key.history if r.sw is None]
    assert [r.ins for r in pulled] == [0xA2]  # it vanished at a CALCULATE
    assert asked, run.text
    assert "removed" in run.err
    assert "nothing left behind" in run.err
    bench.assert_as_before()


def test_no_seed_in_any_output_even_with_debug(bench: Bench) -> None:
    key = bench.plug(EmulatedYubiKey(serial=SERIAL))
    run = bench.enroll("alice", "--debug")
    assert run.code == 0, run.text
    secret = key._oath._credentials[CRED.encode()].secret  # read off the card's memory
    b32 = base64.b32encode(secret).decode()
    for form in (b32, b32.rstrip("="), b32.lower(), secret.hex(), secret.hex().upper()):
        assert form not in run.text
    assert "DEBUG" in run.err  # debug logging was really on


def test_tokens_lists_the_plugged_token(bench: Bench) -> None:
    bench.plug(EmulatedYubiKey(serial=SERIAL, firmware=(5, 7, 1)))
    run = bench.provisioner("tokens")
    assert run.code == 0, run.text
    assert f"YubiKey serial {SERIAL}, firmware 5.7.1" in run.out
    assert "00 01: empty" in run.out


def test_resync_then_revoke_through_the_cli(bench: Bench) -> None:
    key = bench.plug(EmulatedYubiKey(serial=SERIAL))
    assert bench.enroll().code == 0
    resync = bench.provisioner("resync", "--user", "alice", "--reader", bench.stack.reader_names[0])
    assert resync.code == 0, resync.text
    assert f"resynced alice: {ARN} with the codes of time steps" in resync.out
    resyncs = [a for a in bench.iam.attempts() if a.action == "ResyncMFADevice"]
    assert len(resyncs) == 1 and resyncs[0].accepted and resyncs[0].step_offset == 0
    revoke = bench.provisioner("revoke", "--user", "alice")
    assert revoke.code == 0, revoke.text
    assert f"removed {CRED} from token {SERIAL}" in revoke.out
    assert bench.devices_of("alice") == [] and bench.unassigned() == []
    assert [c.id for c in key.credentials()] == []
    # and it was audited: to the log, and in the desk's trail
    assert "event=revoked" in revoke.err and "user=alice" in revoke.err
    again = bench.provisioner("revoke", "--user", "alice")
    assert again.code == 4
    assert "alice has no MFA device enrolled by provisioner" in again.err


def test_replace_through_the_cli(bench: Bench) -> None:
    old_key = bench.plug(EmulatedYubiKey(serial=SERIAL))
    assert bench.enroll().code == 0
    bench.stack.remove(0, wait=True)  # the old token is lost: not plugged in
    new_key = bench.plug(EmulatedYubiKey(serial=SERIAL + 1), slot=1)
    run = bench.provisioner("replace", "--user", "alice", "--reader", bench.stack.reader_names[1])
    assert run.code == 0, run.text
    new_arn = ARN.replace(str(SERIAL), str(SERIAL + 1))
    assert f"replaced alice's token {SERIAL} with token {SERIAL + 1}: {new_arn}" in run.out
    assert f"stays on token {SERIAL} (not plugged in)" in run.out
    assert bench.devices_of("alice") == [new_arn] and bench.unassigned() == []
    assert [c.id for c in new_key.credentials()] == [CRED]
    assert [c.id for c in old_key.credentials()] == [CRED]  # useless now, and said so


def test_enroll_resync_revoke_with_no_daemon_then_history(bench: Bench, tmp_path: Path) -> None:
    """Issue 10.18 as a new user tried it: the daemon never ran here, yet every one-shot
    operation is in the desk's trail, and history reads it without the daemon."""
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    assert not (tmp_path / "state").exists()
    assert bench.enroll().code == 0
    reader = bench.stack.reader_names[0]
    assert bench.provisioner("resync", "--user", "alice", "--reader", reader).code == 0
    assert bench.provisioner("revoke", "--user", "alice").code == 0
    run = bench.provisioner("history", "--format", "json")
    assert run.code == 0, run.text
    records = [(r["event"], r["user"], r["serial"], r["outcome"]) for r in json.loads(run.out)]
    assert records == [
        ("enrollment", "alice", SERIAL, "enrolled"),
        ("resync", "alice", SERIAL, "resynced"),
        ("revoked", "alice", SERIAL, "revoked"),
    ]
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o750


def test_a_one_shot_enroll_parked_at_enable_survives_reconcile(
    bench: Bench, tmp_path: Path
) -> None:
    """Issue 10.2 as it happened: `provisioner reconcile` (or a daemon starting) while a
    one-shot `provisioner enroll` waits on EnableMFADevice must not delete its device."""
    from provisioner.adapters.sqlite_store import Store

    Store(tmp_path / "state" / "provisioner.db").close()  # the desk's daemon ran here once
    bench.plug(EmulatedYubiKey(serial=SERIAL))
    bench.iam.inject_fault("EnableMFADevice", kind="delay", delay=12.0)
    enrolling = threading.Thread(target=lambda: outcome.append(bench.enroll()))
    outcome: list[Run] = []
    enrolling.start()
    deadline = time.monotonic() + 30
    while not bench.iam.call_counts().get("EnableMFADevice") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bench.iam.call_counts().get("EnableMFADevice"), "the enrollment never reached enable"
    reconcile = bench.provisioner("reconcile")
    assert enrolling.is_alive(), "reconcile must have run while EnableMFADevice was parked"
    enrolling.join(60)
    assert reconcile.code == 0, reconcile.text
    assert "left alone" in reconcile.out and "deleted" not in reconcile.out
    assert outcome[0].code == 0, outcome[0].text
    assert bench.devices_of("alice") == [ARN]
