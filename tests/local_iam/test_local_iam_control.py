"""The server's clock, counters, reset, and its life cycle as a process."""

from __future__ import annotations

import email.utils
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError, ParamValidationError

from local_iam_server import LocalIamError, LocalIamServer, aws_env

from .helpers import error_of, step_of

pytestmark = pytest.mark.iam_server


def test_clock_offset_moves_the_date_header_and_server_time(
    iam: Any, iam_server: LocalIamServer
) -> None:
    iam_server.set_clock_offset(3600)
    before = time.time()
    response = iam.list_users()
    date = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    assert abs(date.timestamp() - (before + 3600)) < 3
    assert abs(iam_server.server_time() - (time.time() + 3600)) < 1
    iam_server.set_clock_offset(0)
    response = iam.list_users()
    date = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    assert abs(date.timestamp() - time.time()) < 3


def test_clock_offset_is_what_the_totp_check_uses(
    iam: Any, iam_server: LocalIamServer, new_device: Any, new_user: Any, server_now: float
) -> None:
    user, device = new_user("alice"), new_device()
    local_step = step_of(time.time())
    iam_server.set_clock_offset(iam_server.server_time() - time.time() + 300)  # +10 steps
    server_step = step_of(iam_server.server_time())
    assert server_step - local_step >= 10
    with pytest.raises(ClientError) as excinfo:  # codes of the desk's clock: too old
        iam.enable_mfa_device(
            UserName=user,
            SerialNumber=device.serial,
            AuthenticationCode1=device.code(local_step - 1),
            AuthenticationCode2=device.code(local_step),
        )
    assert error_of(excinfo)[:2] == ("InvalidAuthenticationCode", 403)
    skew = iam_server.attempts()[-1].step_offset
    assert skew is not None and skew <= -10  # the log says how far off the desk is
    iam.enable_mfa_device(
        UserName=user,
        SerialNumber=device.serial,
        AuthenticationCode1=device.code(server_step - 1),
        AuthenticationCode2=device.code(server_step),
    )


def test_call_counts_prove_what_was_sent(iam: Any, iam_server: LocalIamServer) -> None:
    assert iam_server.call_counts() == {}
    iam.create_user(UserName="alice")
    iam.list_mfa_devices(UserName="alice")
    iam.list_mfa_devices(UserName="alice")
    with pytest.raises(ParamValidationError):  # refused by botocore: never sent
        iam.enable_mfa_device(UserName="alice", SerialNumber="s", AuthenticationCode1="1")
    assert iam_server.call_counts() == {"CreateUser": 1, "ListMFADevices": 2}


def test_reset_forgets_everything(
    iam: Any, iam_server: LocalIamServer, new_device: Any, server_now: float
) -> None:
    iam.create_user(UserName="alice")
    new_device()
    iam_server.inject_fault("ListUsers", code="Throttling")
    assert iam_server.server_time() - time.time() > 0.1  # server_now set an offset
    iam_server.reset()
    assert iam_server.call_counts() == {}
    assert iam_server.attempts() == []
    assert iam_server.pending_faults() == []
    assert abs(iam_server.server_time() - time.time()) < 0.5
    assert iam.list_users()["Users"] == []
    assert iam.list_virtual_mfa_devices()["VirtualMFADevices"] == []


def test_moto_reset_endpoint_resets_the_stand_in_too(iam: Any, iam_server: LocalIamServer) -> None:
    iam.create_user(UserName="alice")
    url = iam_server.endpoint_url + "/moto-api/reset"
    request = urllib.request.Request(url, method="POST")  # noqa: S310 - loopback http
    urllib.request.urlopen(request, timeout=5).close()  # noqa: S310
    assert iam_server.call_counts() == {}
    assert iam.list_users()["Users"] == []


def test_unknown_control_route_is_404(iam_server: LocalIamServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(iam_server.endpoint_url + "/_local_iam/nope", timeout=5)  # noqa: S310
    assert excinfo.value.code == 404
    assert "error" in json.loads(excinfo.value.read())


def test_endpoint_and_environment(iam_server: LocalIamServer) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", iam_server.endpoint_url)
    env = iam_server.aws_env()
    assert env["AWS_ENDPOINT_URL_IAM"] == env["AWS_ENDPOINT_URL_STS"] == iam_server.endpoint_url
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("testing", "testing")
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert aws_env("http://x", {"NO_PROXY": "corp"})["NO_PROXY"] == "corp,127.0.0.1,localhost"


# -- the process -----------------------------------------------------------------------------


def test_importing_the_package_does_not_import_moto() -> None:
    probe = "import sys, local_iam_server; print('moto' in sys.modules, 'boto3' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.split() == ["False", "False"]


def test_refuses_a_non_loopback_host_without_the_explicit_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "local_iam_server", "--host", "0.0.0.0"],  # noqa: S104
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "not a loopback address" in done.stderr
    assert done.stdout == ""


def test_a_server_that_cannot_start_is_reported_with_its_stderr(tmp_path: Any) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no module named moto, say' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(LocalIamError, match=r"(?s)status 3.*no module named moto, say"):
        LocalIamServer(python=str(fake), startup_timeout=10).start()


def test_a_server_that_starts_too_slowly_is_reported_and_stopped(tmp_path: Any) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'warming up' >&2\nexec sleep 30\n")
    fake.chmod(0o755)
    server = LocalIamServer(python=str(fake), startup_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(LocalIamError, match=r"(?s)did not start within.*warming up"):
        server.start()
    assert time.monotonic() - started < 5
    assert server.pid is None


@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly() -> None:
    server = LocalIamServer().start()
    pid = server.pid
    assert pid is not None
    status = server.stop()
    assert status == 0
    with pytest.raises(LocalIamError):
        server.endpoint_url  # noqa: B018 - the property raises once stopped


@pytest.mark.slow
def test_sigint_stops_the_server_cleanly_and_it_prints_one_line() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "local_iam_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert re.fullmatch(r"local-iam listening on http://127\.0\.0\.1:\d+\n", line)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert out == ""  # exactly one line on stdout
    assert err == ""  # quiet without --verbose


def test_users_and_devices_for_the_demo(iam_server: LocalIamServer, iam: Any) -> None:
    iam_server.create_user("zed")
    assert [u["UserName"] for u in iam.list_users()["Users"]] == ["zed"]
    device = iam.create_virtual_mfa_device(VirtualMFADeviceName="d1")["VirtualMFADevice"]
    serial = device["SerialNumber"]
    assert iam_server.virtual_devices() == [{"serial": serial, "user": None}]
    assert iam_server.unassigned_devices() == [serial]
    assert device["Base32StringSeed"].decode() not in str(iam_server.virtual_devices())


def test_latency_delays_the_named_actions_until_set_again(local_iam: LocalIamServer) -> None:
    iam = local_iam.admin_client("iam")
    try:
        assert local_iam.set_latency(0.3, ["GetUser"]) == {"seconds": 0.3, "actions": ["GetUser"]}
        local_iam.create_user("lat")
        started = time.monotonic()
        iam.get_user(UserName="lat")
        assert time.monotonic() - started >= 0.3  # at least the round trip asked for
        assert local_iam.latency() == {"seconds": 0.3, "actions": ["GetUser"]}
        with pytest.raises(LocalIamError, match="'seconds' must be a number"):
            local_iam.set_latency(-1)
    finally:
        local_iam.set_latency(0)
    assert local_iam.latency() == {"seconds": 0.0, "actions": None}
