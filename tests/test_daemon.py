"""The desk daemon as a real process: systemd's notify socket bound by the test, pcscd with
vpcd readers holding emulated YubiKeys (connecting one = plugging it in), the strict local
IAM server, and the operator's CLI over the control socket."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desk_harness import ACCOUNT, Daemon, arn, wait_for, write_config
from emulated_yubikey import Capability, EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer
from provisioner.adapters.control_socket import ControlClient
from provisioner.core.model import Step

pytestmark = [pytest.mark.pcsc, pytest.mark.iam_server, pytest.mark.slow]


@pytest.fixture
def desk(
    pcsc_stack: PcscStack, local_iam: LocalIamServer, admin_iam: Any, workdir: Path
) -> Iterator[Daemon]:
    for user in ("carol", "dave", "erin"):
        admin_iam.create_user(UserName=user)
    config = write_config(workdir, roster="serial,user\n40000001,carol\n40000002,dave\n")
    d = Daemon(pcsc_stack, local_iam, admin_iam, workdir, config)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    for slot in (0, 1):
        pcsc_stack.remove(slot, wait=True)


def test_notify_protocol_ready_status_watchdog_stopping(desk: Daemon) -> None:
    assert desk.notify is not None
    ready = desk.notify.seen("READY", "1")
    assert "listening on" in ready[0].get("STATUS", "")
    wait_for(lambda: len(desk.notify.seen("WATCHDOG", "1")) >= 2, timeout=5, what="two WATCHDOG=1")  # type: ignore[union-attr]
    assert desk.notify.seen("STATUS")
    assert desk.stop() == 0
    assert desk.notify.seen("STOPPING", "1")


def test_operator_enrolls_bob_by_typing_then_plugging(desk: Daemon) -> None:
    proc = desk.cli_background("enroll", "--user", "bob")
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "bob is queued" in first and "plug in a token" in first
    desk.stack.insert(EmulatedYubiKey(serial=40000009), 0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert " enable " in out and " confirm " in out
    assert f"enrolled bob: token 40000009 is MFA device {arn('bob', 40000009)}" in out
    assert desk.devices_of("bob") == [arn("bob", 40000009)]
    events = [(r["event"], r["user"]) for r in desk.history()]
    assert ("queued", "bob") in events and ("enrollment", "bob") in events
    exported = desk.cli("history", "--user", "bob", "--since", "1h", "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["event"], r["outcome"]) for r in rows] == [
        ("queued", ""),
        ("enrollment", "enrolled"),
    ]
    assert rows[1]["device_arn"] == arn("bob", 40000009)
    # and each record went to the daemon's log with stable key=value fields
    assert any(
        "audit " in line
        and "event=enrollment" in line
        and "user=bob" in line
        and "outcome=enrolled" in line
        for line in desk.log
    )


def test_a_rostered_token_is_enrolled_with_nobody_typing(desk: Daemon) -> None:
    key = EmulatedYubiKey(serial=40000001)
    desk.stack.insert(key, 0)
    wait_for(lambda: desk.devices_of("carol"), what="carol enrolled")
    assert desk.devices_of("carol") == [arn("carol", 40000001)]
    assert [c.id for c in key.credentials()] == [f"AWS:carol@{ACCOUNT}"]
    desk.stack.remove(0, wait=True)
    # the next token of the batch, plugged into the same reader
    desk.stack.insert(EmulatedYubiKey(serial=40000002), 0)
    wait_for(lambda: desk.devices_of("dave"), what="dave enrolled")
    # taken out and put back: recognized by its serial, not enrolled twice
    desk.stack.remove(0, wait=True)
    desk.stack.insert(key, 0)
    wait_for(
        lambda: any(r.get("outcome") == "already enrolled" for r in desk.history()),
        what="already enrolled reported",
    )
    assert desk.iam.call_counts()["CreateVirtualMFADevice"] == 2


def test_two_tokens_plugged_at_once_are_both_enrolled(desk: Daemon) -> None:
    desk.stack.insert(EmulatedYubiKey(serial=40000001), 0, wait=False)
    desk.stack.insert(EmulatedYubiKey(serial=40000002), 1, wait=False)
    wait_for(lambda: desk.devices_of("carol") and desk.devices_of("dave"), what="both enrolled")
    # IAM lists a device a moment before the daemon has written its outcome
    wait_for(
        lambda: len([r for r in desk.history() if r["event"] == "enrollment"]) == 2,
        what="both outcomes recorded",
    )
    outcomes = [r for r in desk.history() if r["event"] == "enrollment"]
    assert sorted((r["user"], r["outcome"]) for r in outcomes) == [
        ("carol", "enrolled"),
        ("dave", "enrolled"),
    ]


def test_a_token_nobody_asked_for_is_left_untouched_until_someone_is_queued(desk: Daemon) -> None:
    key = EmulatedYubiKey(serial=40000007)
    desk.stack.insert(key, 0)
    wait_for(
        lambda: any(t["state"] == "idle" for t in desk.ask({"op": "status"})["tokens"]),
        what="idle token",
    )
    assert key.credentials() == []
    assert any(r["event"] == "ignored token" and r["serial"] == 40000007 for r in desk.history())
    run = desk.cli("enroll", "--user", "erin")
    assert run.returncode == 0, run.stdout + run.stderr
    assert desk.devices_of("erin") == [arn("erin", 40000007)]


def test_a_key_without_oath_is_reported_not_ignored(desk: Daemon) -> None:
    desk.stack.insert(EmulatedYubiKey(serial=40000001, enabled_capabilities=Capability.FIDO2), 0)
    wait_for(
        lambda: any(r["event"] == "unsupported token" for r in desk.history()),
        what="unsupported token reported",
    )
    status = desk.cli("status")
    assert "token 40000001: unsupported" in status.stdout
    assert desk.devices_of("carol") == []


def test_status_queue_cancel(desk: Daemon) -> None:
    queued = desk.cli("queue", "--user", "erin")
    assert queued.returncode == 0 and "erin is queued (#1" in queued.stdout
    listing = desk.cli("queue").stdout
    assert "#1 erin: waiting, asked by root" in listing
    status = desk.cli("status")
    assert status.returncode == 0
    assert "desk test-desk: daemon up since" in status.stdout
    assert "Yubico YubiKey OTP+FIDO+CCID 00 00: empty" in status.stdout
    assert "#1 erin" in status.stdout
    cancel = desk.cli("cancel", "1")
    assert cancel.returncode == 0 and "cancelled #1 (erin)" in cancel.stdout
    assert "queue: empty" in desk.cli("queue").stdout
    again = desk.cli("cancel", "1")
    assert again.returncode == 1 and "no waiting request #1" in again.stderr


def test_ctrl_c_on_enroll_withdraws_the_request(desk: Daemon) -> None:
    proc = desk.cli_background("enroll", "--user", "erin")
    assert proc.stdout is not None
    assert "erin is queued" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    wait_for(lambda: desk.ask({"op": "queue"})["queue"] == [], timeout=10, what="queue emptied")
    assert any(r["event"] == "cancelled" and r["user"] == "erin" for r in desk.history())


def _as_nobody(path: Path, groups: tuple[int, ...] = ()) -> dict[str, Any]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups(list(groups))
            os.setgid(65534)
            os.setuid(65534)
            with ControlClient(path) as client:
                answer = client.call({"op": "enroll", "user": "mallory", "wait": False})
            os.write(write, json.dumps(answer).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(write, json.dumps({"child-error": repr(e)}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


def test_an_unprivileged_user_is_refused_and_nothing_happens(desk: Daemon) -> None:
    answer = _as_nobody(desk.socket_path)
    assert answer.get("refused") is True, answer
    assert "not authorized: nobody (uid 65534)" in answer["error"]
    assert "operators' group users" in answer["error"]
    assert desk.ask({"op": "queue"})["queue"] == []
    assert not any(r.get("user") == "mallory" for r in desk.history())


def test_a_restart_keeps_the_queue_and_the_audit_trail(desk: Daemon) -> None:
    assert desk.cli("queue", "--user", "erin").returncode == 0
    before = desk.history()
    assert desk.stop() == 0
    desk.start()
    assert [e["user"] for e in desk.ask({"op": "queue"})["queue"]] == ["erin"]
    after = desk.history()
    assert after[: len(before)] == before  # nothing lost, nothing rewritten
    assert [r["event"] for r in after[len(before) :]][:2] == ["stopped", "started"]
    desk.stack.insert(EmulatedYubiKey(serial=40000008), 0)
    wait_for(lambda: desk.devices_of("erin"), what="erin enrolled after the restart")


def test_hostile_control_lines_get_errors_and_the_daemon_keeps_serving(desk: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(desk.socket_path))
        f = s.makefile("rwb")
        for line in (
            b"not json\n",
            b"[1,2]\n",
            b'{"op": 3}\n',
            b'{"op": "enroll", "user": "x y"}\n',
            b'{"op": "nope"}\n',
            b"\xff\xfe\n",
            b"x" * 70000 + b"\n",
        ):
            f.write(line)
            f.flush()
            answer = json.loads(f.readline())
            assert answer["ok"] is False and answer["final"] is True and answer["error"]
    assert desk.ask({"op": "status"})["ok"] is True


def test_a_member_of_the_operators_group_may_queue(desk: Daemon) -> None:
    import grp

    answer = _as_nobody(desk.socket_path, groups=(grp.getgrnam("users").gr_gid,))
    assert answer.get("ok") is True, answer
    assert [e["user"] for e in desk.ask({"op": "queue"})["queue"]] == ["mallory"]
    assert any(r["event"] == "queued" and r["actor"] == "nobody" for r in desk.history())


def test_a_fido_only_key_on_usb_is_reported_as_unable_to_hold_totp(
    pcsc_stack: PcscStack, local_iam: LocalIamServer, admin_iam: Any, workdir: Path
) -> None:
    # It never reaches PC/SC (no CCID interface): only the USB side can see it.
    data = Path(__file__).parent / "data"
    d = Daemon(pcsc_stack, local_iam, admin_iam, workdir, write_config(workdir))
    d.wrapper = [
        "umockdev-run",
        "-d",
        str(data / "usb-root-hub.umockdev"),
        "-d",
        str(data / "security-key.umockdev"),
        "--",
    ]
    d.start()
    try:
        wait_for(
            lambda: any(r["event"] == "unsupported token" for r in d.history()),
            what="the security key reported",
        )
        [record] = [r for r in d.history() if r["event"] == "unsupported token"]
        assert "1050:0120, FIDO only: no CCID interface" in record["reason"]
        assert "cannot hold a TOTP credential" in record["reason"]
        assert any("cannot hold a TOTP credential" in line for line in d.log)
    finally:
        assert d.stop() == 0


# --- hostile clients -----------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
REQUESTS = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "op": st.sampled_from(
                ["enroll", "status", "queue", "cancel", "history", "reconcile", "x"]
            )
        },
        optional={
            "user": JSON,
            "serial": JSON,
            "id": JSON,
            "limit": JSON,
            "since": JSON,
            "wait": st.just(False),
        },
    ).map(lambda v: json.dumps(v).encode()),
)


def _one_answer(path: Path, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line + b"\n")
        answer = s.makefile("rb").readline()
    assert answer, f"no answer to {line[:60]!r}"
    value = json.loads(answer)
    assert isinstance(value, dict)
    return value


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(line=REQUESTS)
def test_fuzzed_control_lines_always_get_an_answer(desk: Daemon, line: bytes) -> None:
    answer = _one_answer(desk.socket_path, line)
    assert "ok" in answer or "event" in answer


def test_partial_frames_floods_and_the_daemon_keeps_serving(desk: Daemon) -> None:
    # half a line, then the client vanishes
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(desk.socket_path))
            s.sendall(b'{"op": "sta')
    # a flood of clients at once
    clients = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(desk.socket_path))  # blocking: waits while the backlog is full
        s.settimeout(20)
        s.sendall(b'{"op": "status"}\n')
        clients.append(s)
    # Each gets one line: its answer, or (past daemon.max_clients held at once) the
    # one-line "too many clients" refusal; none is left without a word.
    answers = refusals = 0
    for s in clients:
        with s:
            answer = json.loads(s.makefile("rb").readline())
            if answer["ok"]:
                answers += 1
            elif "too many clients" in answer["error"]:
                refusals += 1
    assert answers + refusals == 200
    assert answers >= 64  # the default cap is served in full
    # a flood of requests on one connection
    with ControlClient(desk.socket_path) as client:
        for _ in range(500):
            assert client.call({"op": "queue"})["ok"] is True
    assert desk.proc is not None and desk.proc.poll() is None
    assert desk.ask({"op": "status"})["ok"] is True
    # nothing above asked for an enrollment: the floods left the queue as they found it
    assert desk.ask({"op": "queue"})["queue"] == []


def test_the_daemon_process_cannot_be_dumped() -> None:
    import subprocess
    import sys

    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes; from provisioner.daemon.main import no_core_dumps; "
            "no_core_dumps(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "0"  # PR_GET_DUMPABLE


def _terminal_reader(fd: int, screen: list[str]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        screen.append(chunk.decode("utf-8", "replace"))


def test_watch_redraws_the_desk_in_a_terminal_as_events_arrive(desk: Daemon) -> None:
    import fcntl
    import struct
    import subprocess
    import sys
    import termios
    import threading

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "watch"],
        env=desk.env() | {"TERM": "xterm"},
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    output: list[str] = []
    threading.Thread(target=_terminal_reader, args=(master, output), daemon=True).start()

    def last_frame() -> str:
        return "".join(output).rsplit("\x1b[H\x1b[2J", 1)[-1]

    try:
        wait_for(lambda: "last event: connected" in last_frame(), what="the first frame")
        assert "queue: empty" in last_frame() and "last outcomes: none yet" in last_frame()
        desk.cli("queue", "--user", "erin")
        wait_for(lambda: "#1 erin on any token" in last_frame(), what="erin queued")
        desk.stack.insert(EmulatedYubiKey(serial=40000011), 0)
        wait_for(lambda: "erin on token 40000011: enrolled" in last_frame(), what="the outcome")
        frames = "".join(output).split("\x1b[H\x1b[2J")
        # Each step of the enrollment was drawn as it happened, not sampled.
        steps = [s.value for s in Step if s is not Step.ROLLBACK]
        drawn = [s for s in steps if any(f"last event: {s} for erin" in f for f in frames)]
        assert drawn == steps
        assert "queue: empty" in last_frame()
        assert arn("erin", 40000011) in last_frame()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        os.close(master)
    assert code == 0, proc.stderr.read().decode() if proc.stderr else ""


def test_watch_once_prints_one_view_and_exits(desk: Daemon) -> None:
    desk.cli("queue", "--user", "erin", "--serial", "40000012")
    done = desk.cli("watch", "--once")
    assert done.returncode == 0, done.stderr
    assert "#1 erin on token 40000012" in done.stdout
    assert "\x1b[" not in done.stdout  # not a terminal: no escape codes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def test_metrics_endpoint_counts_outcomes_steps_retries_and_tokens(
    pcsc_stack: PcscStack, local_iam: LocalIamServer, admin_iam: Any, workdir: Path
) -> None:
    port = _free_port()
    config = write_config(workdir, extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    d = Daemon(pcsc_stack, local_iam, admin_iam, workdir, config)
    d.start()
    try:
        before = _scrape(port)
        assert before["provisioner_tokens_present{}"] == 0
        assert before["provisioner_queue_length{}"] == 0
        d.cli("queue", "--user", "alice", "--serial", "40000021")
        d.cli("queue", "--user", "bob", "--serial", "40000022")
        assert _scrape(port)["provisioner_queue_length{}"] == 2
        # alice: one throttled CreateVirtualMFADevice that botocore retries, then success.
        local_iam.inject_fault("CreateVirtualMFADevice", code="Throttling")
        d.stack.insert(EmulatedYubiKey(serial=40000021), 0)
        wait_for(lambda: d.devices_of("alice"), what="alice enrolled")
        # bob: IAM refuses every pair of codes, so the enrollment fails and rolls back.
        local_iam.inject_fault("EnableMFADevice", code="InvalidAuthenticationCode", count=10)
        d.stack.insert(EmulatedYubiKey(serial=40000022), 1)
        wait_for(
            lambda: _scrape(port).get(
                "provisioner_enrollments_total{outcome=failed,reason=InvalidAuthenticationCode}"
            ),
            what="bob's failure counted",
        )
        after = _scrape(port)
        assert after["provisioner_enrollments_total{outcome=enrolled,reason=}"] == 1
        assert after["provisioner_tokens_present{}"] == 2
        assert after["provisioner_queue_length{}"] == 0
        assert after["provisioner_enrollments_in_progress{}"] == 0
        assert after["provisioner_iam_retries_total{action=CreateVirtualMFADevice}"] == 1
        assert after["provisioner_iam_calls_total{action=EnableMFADevice,result=ok}"] == 1
        refused = (
            "provisioner_iam_calls_total{action=EnableMFADevice,result=InvalidAuthenticationCode}"
        )
        assert after[refused] >= 1
        # Every step of alice's enrollment was timed; bob's rollback too.
        for step in ("check", "create device", "program token", "compute codes", "enable"):
            assert after[f"provisioner_enrollment_step_seconds_count{{step={step}}}"] >= 1
        assert after["provisioner_enrollment_step_seconds_count{step=confirm}"] == 1
        assert after["provisioner_enrollment_step_seconds_count{step=rollback}"] >= 1
        assert not [k for k in after if "alice" in k or "bob" in k or "4000002" in k]
    finally:
        d.stop()
        for slot in (0, 1):
            pcsc_stack.remove(slot, wait=True)
    with pytest.raises(OSError):
        _scrape(port)  # the endpoint closed with the daemon


# --- revoke, resync and replace through the running daemon ----------------------------


def _enroll_erin(desk: Daemon, key: EmulatedYubiKey, slot: int = 0) -> None:
    desk.cli("queue", "--user", "erin", "--serial", str(key.serial))
    desk.stack.insert(key, slot)
    wait_for(lambda: desk.devices_of("erin") == [arn("erin", key.serial)], what="erin enrolled")
    wait_for(lambda: desk.ask({"op": "status"})["tokens"][0]["state"] == "enrolled")


def test_revoke_through_the_daemon_clears_the_token_that_is_plugged_in(desk: Daemon) -> None:
    key = EmulatedYubiKey(serial=40000031)
    _enroll_erin(desk, key)
    assert key.credentials()
    done = desk.cli("revoke", "--user", "erin")
    assert done.returncode == 0, done.stderr
    assert f"revoked erin: {arn('erin', 40000031)} (token 40000031)" in done.stdout
    assert desk.devices_of("erin") == []
    assert not desk.iam.virtual_devices()
    wait_for(lambda: not key.credentials(), what="the credential taken off the token")
    revoked = [r for r in desk.history() if r["event"] == "revoked"]
    assert revoked and revoked[0]["user"] == "erin" and revoked[0]["actor"] == "root"


def test_revoke_through_the_daemon_clears_an_absent_token_when_it_comes_back(
    desk: Daemon,
) -> None:
    key = EmulatedYubiKey(serial=40000032)
    _enroll_erin(desk, key)
    desk.stack.remove(0, wait=True)
    done = desk.cli("revoke", "--user", "erin")
    assert done.returncode == 0, done.stderr
    assert "as soon as the token is plugged in here" in done.stdout
    assert desk.devices_of("erin") == [] and key.credentials()
    desk.stack.insert(key, 1)
    wait_for(lambda: not key.credentials(), what="the credential taken off on its return")


def test_revoke_through_the_daemon_refuses_a_user_without_a_token(desk: Daemon) -> None:
    done = desk.cli("revoke", "--user", "erin")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "erin has no MFA device enrolled by provisioner" in done.stderr


def test_resync_through_the_daemon_uses_the_token_already_plugged_in(desk: Daemon) -> None:
    key = EmulatedYubiKey(serial=40000033)
    _enroll_erin(desk, key)
    done = desk.cli("resync", "--user", "erin")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "erin is queued for a resync" in done.stdout and "plug in token 40000033" in done.stdout
    assert f"resynced erin: {arn('erin', 40000033)} with the codes of time steps" in done.stdout
    resyncs = [a for a in desk.iam.attempts() if a.action == "ResyncMFADevice"]
    assert [a.accepted for a in resyncs] == [True]
    assert ("resync", "resynced") in [(r["event"], r["outcome"]) for r in desk.history()]


def test_replace_through_the_daemon_enrolls_the_new_token_then_revokes_the_old(
    desk: Daemon,
) -> None:
    old, new = EmulatedYubiKey(serial=40000034), EmulatedYubiKey(serial=40000035)
    _enroll_erin(desk, old)
    desk.stack.remove(0, wait=True)
    proc = desk.cli_background("replace", "--user", "erin")
    assert proc.stdout is not None
    assert "erin is queued for a new token" in proc.stdout.readline()
    desk.stack.insert(new, 0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert f"replaced erin: token 40000035 is MFA device {arn('erin', 40000035)}" in out
    assert desk.devices_of("erin") == [arn("erin", 40000035)]
    assert [d["serial"] for d in desk.iam.virtual_devices()] == [arn("erin", 40000035)]
    desk.stack.insert(old, 1)  # the old token comes back: its credential goes
    wait_for(lambda: not old.credentials(), what="the old token cleared")
    assert new.credentials()


def test_replace_whose_revocation_fails_leaves_the_user_with_both_and_says_what_to_run(
    desk: Daemon,
) -> None:
    old, new = EmulatedYubiKey(serial=40000036), EmulatedYubiKey(serial=40000037)
    _enroll_erin(desk, old)
    desk.stack.remove(0, wait=True)
    desk.iam.inject_fault("DeactivateMFADevice", code="ServiceFailure", count=20)
    proc = desk.cli_background("replace", "--user", "erin")
    assert proc.stdout is not None
    proc.stdout.readline()
    desk.stack.insert(new, 0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "now has the new token 40000037" in err and "AND still the old device" in err
    assert "provisioner revoke --user erin --serial 40000036" in err
    assert sorted(desk.devices_of("erin")) == [arn("erin", 40000036), arn("erin", 40000037)]
    assert old.credentials() and new.credentials()
    desk.iam.clear_faults()
    assert desk.cli("revoke", "--user", "erin", "--serial", "40000036").returncode == 0
    assert desk.devices_of("erin") == [arn("erin", 40000037)]


# --- a token another program holds (issue 10.5) -------------------------------------------


def test_a_token_held_by_another_program_is_enrolled_once_it_lets_go(
    pcsc_stack: PcscStack, local_iam: LocalIamServer, admin_iam: Any, workdir: Path
) -> None:
    import subprocess

    from provisioner.adapters.yubikey import Pcsc

    admin_iam.create_user(UserName="erin")
    key = EmulatedYubiKey(serial=40000041)
    pcsc_stack.insert(key, 0)
    reader = pcsc_stack.reader_names[0]
    # The holder: this test, exclusively, as gpg's scdaemon would; a process of that name
    # runs beside it, so the desk can name the likely holder the way `doctor` does.
    scdaemon = workdir / "scdaemon"
    shutil.copy("/bin/sleep", scdaemon)
    suspect = subprocess.Popen([str(scdaemon), "120"])
    pcsc = Pcsc()
    holder = pcsc.connect(reader)
    d = Daemon(pcsc_stack, local_iam, admin_iam, workdir, write_config(workdir))
    try:
        d.start()
        assert d.cli("queue", "--user", "erin").returncode == 0

        def held() -> dict[str, Any] | None:
            tokens = d.ask({"op": "status"})["tokens"]
            return next((t for t in tokens if t["state"] == "held"), None)

        token = wait_for(held, what="the token said to be held")
        assert f"scdaemon (pid {suspect.pid}) running" in token["detail"]
        shown = d.cli("status").stdout
        assert f"token ?: held by another program (scdaemon (pid {suspect.pid}) running)" in shown
        assert key.credentials() == [] and d.devices_of("erin") == []
        holder.close()
        wait_for(lambda: d.devices_of("erin"), timeout=30, what="erin enrolled once let go")
        assert d.devices_of("erin") == [arn("erin", 40000041)]
    finally:
        holder.close()
        pcsc.close()
        suspect.kill()
        suspect.wait(10)
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        pcsc_stack.remove(0, wait=True)
