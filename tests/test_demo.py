"""`provisioner demo`, as a newcomer runs it: a real process, its own IAM server, its own
emulated tokens (through the pcscd the test session runs, or in-process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from provisioner.emulator import PcscStack


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [sys.executable, "-m", "provisioner", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def check(run: subprocess.CompletedProcess[str], users: list[str]) -> None:
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.count("login with a fresh code from the token: accepted") == len(users)
    assert out.count("IAM checked both codes against the seed it holds") == len(users)
    for user in users:
        assert f"  {user:<10} token " in out and "device enabled: yes  ok" in out
    assert "failed as expected" in out and "rolled back, nothing left behind" in out
    assert "unassigned virtual MFA devices: 0; credentials left on the failed token" in out
    assert out.rstrip().endswith("nothing else exists.")


@pytest.mark.pcsc
@pytest.mark.iam_server
@pytest.mark.slow
def test_demo_through_pcscd(pcsc_stack: PcscStack) -> None:
    run = run_demo()
    assert "through pcscd, in the vpcd readers Yubico YubiKey OTP+FIDO+CCID 00 00" in run.stdout
    check(run, ["alice", "bob", "carol"])


@pytest.mark.iam_server
@pytest.mark.slow
def test_demo_in_process() -> None:
    run = run_demo("--in-process", "--users", "ann,ben")
    assert "in-process (no pcscd)" in run.stdout
    check(run, ["ann", "ben"])
