"""Work ahead of the plug, as a daemon process through the real PC/SC stack and the
strict local IAM server: a queued user's device made before the plug and used by it (only
EnableMFADevice and the serial's tag after the plug); deleted on cancel, on SIGTERM, and
after a SIGKILL by the restarted daemon's recovery."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from itertools import count

import pytest

from desk_harness import Daemon, assert_no_seed, make_workdir, wait_for, write_config
from emulated_yubikey import EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer

pytestmark = [pytest.mark.pcsc, pytest.mark.iam_server, pytest.mark.slow]

_serials = count(46_000_001)


@pytest.fixture
def desk(pcsc_stack: PcscStack, local_iam: LocalIamServer) -> Iterator[Daemon]:
    workdir = make_workdir()
    config = write_config(workdir, "devices_ahead = 1\n", ahead=True)
    daemon = Daemon(pcsc_stack, local_iam, local_iam.admin_client("iam"), workdir, config)
    daemon.start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop()
    pcsc_stack.remove(0, wait=True)
    shutil.rmtree(workdir, ignore_errors=True)


def made_ahead(desk: Daemon) -> list[str]:
    return [d for d in desk.iam.unassigned_devices() if ".yubikey.q" in d]


def queued(desk: Daemon, user: str) -> str:
    done = desk.cli("queue", "--user", user)
    assert done.returncode == 0, done.stderr
    [device] = wait_for(lambda: made_ahead(desk), what=f"{user}'s device made ahead")
    return str(device)


def test_the_plug_finds_the_device_made_ahead_and_only_enables_it(desk: Daemon) -> None:
    device = queued(desk, "alice")
    before = desk.iam.call_counts()
    key = EmulatedYubiKey(serial=next(_serials))
    desk.stack.insert(key, 0)
    # waited for through the desk's trail: a listing of alice's devices here would count
    wait_for(
        lambda: any(r["outcome"] == "enrolled" for r in desk.history() if r["user"] == "alice"),
        what="enrolled",
    )
    after = desk.iam.call_counts()
    spent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    # nothing asked or made after the plug but the enable and the serial's tag (and
    # perhaps the idle desk's keep-warm listing)
    spent.pop("ListVirtualMFADevices", None)
    assert spent == {"EnableMFADevice": 1, "TagMFADevice": 1}
    assert desk.devices_of("alice") == [device]
    tags = desk.admin.list_mfa_device_tags(SerialNumber=device)["Tags"]
    assert {"Key": "provisioner:token-serial", "Value": str(key.serial)} in tags
    [record] = [r for r in desk.history() if r["event"] == "enrollment"]
    assert (record["outcome"], record["serial"]) == ("enrolled", key.serial)
    # the seed, held in memory from the queueing to the plug: in no log, answer or file
    assert_no_seed(
        key.secrets_for_leak_checks(),
        [*desk.log, json.dumps(desk.history()), json.dumps(desk.ask({"op": "status"}))],
        sorted((desk.workdir / "state").iterdir()),
    )


def test_a_cancelled_request_loses_its_device(desk: Daemon) -> None:
    queued(desk, "alice")
    [entry] = desk.ask({"op": "status"})["queue"]
    assert desk.cli("cancel", str(entry["id"])).returncode == 0
    wait_for(lambda: made_ahead(desk) == [], what="the device deleted")
    [record] = [r for r in desk.history() if r["event"] == "enrollment"]
    assert record["outcome"] == "not used"


def test_sigterm_deletes_the_device_made_ahead(desk: Daemon) -> None:
    queued(desk, "alice")
    assert desk.stop() == 0
    assert made_ahead(desk) == []


def test_after_a_sigkill_the_restarted_desk_deletes_the_device_and_makes_another(
    desk: Daemon,
) -> None:
    first = queued(desk, "alice")
    assert desk.proc is not None
    desk.proc.send_signal(signal.SIGKILL)
    desk.proc.wait(10)
    assert made_ahead(desk) == [first]  # left by the dead process, journaled
    desk.start()
    # recovery deletes it; the request still waits, so the desk makes a fresh one
    wait_for(lambda: first not in made_ahead(desk) and len(made_ahead(desk)) == 1, what="made anew")
    outcomes = [r["outcome"] for r in desk.history() if r["event"] == "enrollment"]
    assert "rolled back" in outcomes, outcomes
    key = EmulatedYubiKey(serial=next(_serials))
    desk.stack.insert(key, 0)
    wait_for(lambda: [d for d in desk.devices_of("alice") if ".yubikey.q" in d], what="enrolled")


def test_status_says_what_is_ready_ahead(desk: Daemon) -> None:
    device = queued(desk, "alice")
    [ready] = desk.ask({"op": "status"})["ahead"]
    assert ready["user"] == "alice" and ready["device"] == device
