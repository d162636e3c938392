"""`provisioner demo`, as a newcomer runs it: a real process, its own IAM server, its own
emulated tokens (through the pcscd the test session runs, or in-process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from emulated_yubikey import PcscStack
from provisioner.core.totp import time_step

# What the desk says it computed, and what the server says it checked, per enrollment.
COMPUTED = re.compile(r"compute codes  codes for time steps (\d+) and (\d+) computed on the token")
CHECKED = re.compile(
    r"IAM checked both codes against the seed it holds, at its own time: "
    r"steps (.+) \(IAM's step N = (\d+)\)"
)


@dataclass(frozen=True)
class DemoRun:
    process: subprocess.CompletedProcess[str]
    steps: range  # the time steps the demo ran in, by this machine's clock


def run_demo(*args: str) -> DemoRun:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    started = time.time()
    process = subprocess.run(
        [sys.executable, "-m", "provisioner", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return DemoRun(process, range(time_step(started), time_step(time.time()) + 1))


def check(demo: DemoRun, users: list[str]) -> None:
    run = demo.process
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.count("login with a fresh code from the token: accepted") == len(users)
    assert out.count("IAM checked both codes against the seed it holds") == len(users)
    for user in users:
        assert f"  {user:<10} token " in out and "device enabled: yes  ok" in out
        check_steps(section(out, user), demo.steps)
    assert "failed as expected" in out and "rolled back, nothing left behind" in out
    assert "unassigned virtual MFA devices: 0; credentials left on the failed token" in out
    assert "nothing else exists." in out
    # one plug, three accounts: each lists erin's device and takes a fresh code
    for name, account in (
        ("prod", "111111111111"),
        ("staging", "222222222222"),
        ("sandbox", "333333333333"),
    ):
        assert (
            f"  {name}: arn:aws:iam::{account}:mfa/provisioner/erin.yubikey.31000051 listed for "
            f"erin: yes; credential AWS {name}:erin@{account}; login with a fresh code: accepted"
        ) in out
        assert f"  {name}: devices of frank or unassigned: 0" in out
    assert "failed at step 'enable' in account sandbox" in out
    assert "rolled back in every account (prod, staging, sandbox), nothing left behind" in out
    assert "credentials left on token 31000052: 0" in out
    assert out.rstrip().endswith("frank has nothing anywhere.")


def section(out: str, user: str) -> str:
    """The demo's output for one user's enrollment (from "== user:" to the next "==")."""
    (found,) = [s for s in re.split(r"^== ", out, flags=re.M) if s.startswith(f"{user}: ")]
    return found


def check_steps(enrollment: str, steps: range) -> None:
    """The codes were for steps N-1 and N, N being the server's step when it checked them.

    The desk prints the steps it computed; the server's attempt log gives N by its own
    clock (the demo's server runs on this machine's clock, so N lies in ``steps``).
    """
    ((first, second),) = COMPUTED.findall(enrollment)
    ((pair, server_step),) = CHECKED.findall(enrollment)
    assert int(server_step) in steps, (server_step, steps)
    assert (int(first), int(second)) == (int(server_step) - 1, int(server_step)), enrollment
    assert pair == "N-1 and N", enrollment


@pytest.mark.pcsc
@pytest.mark.iam_server
@pytest.mark.slow
def test_demo_through_pcscd(pcsc_stack: PcscStack) -> None:
    demo = run_demo()
    assert (
        "through pcscd, in the vpcd readers Yubico YubiKey OTP+FIDO+CCID 00 00"
        in demo.process.stdout
    )
    check(demo, ["alice", "bob", "carol"])


@pytest.mark.iam_server
@pytest.mark.slow
def test_demo_in_process() -> None:
    demo = run_demo("--in-process", "--users", "ann,ben")
    assert "in-process (no pcscd)" in demo.process.stdout
    check(demo, ["ann", "ben"])
