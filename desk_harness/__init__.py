"""A desk daemon as a real process, for the tests: systemd's notify socket bound by the
test, the operator's CLI over the control socket, the state it leaves behind."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulated_yubikey import PcscStack
from local_iam_server import LocalIamServer
from provisioner.adapters.control_socket import ControlClient

ACCOUNT = "123456789012"


def arn(user: str, serial: int) -> str:
    return f"arn:aws:iam::{ACCOUNT}:mfa/provisioner/{user}.yubikey.{serial}"


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class NotifyListener:
    """What systemd would receive on $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        #: When each message came (time.time()), beside it in ``messages``.
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.times.append(time.time())
            self.messages.append(fields)

    def seen(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [m for m in list(self.messages) if key in m and (value is None or m[key] == value)]

    def first_at(self, key: str, value: str) -> float | None:
        """When the first message with ``key=value`` came (None: none yet)."""
        for at, message in zip(list(self.times), list(self.messages), strict=False):
            if message.get(key) == value:
                return at
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@dataclass
class Daemon:
    stack: PcscStack
    iam: LocalIamServer
    admin: Any
    workdir: Path
    config: Path
    proc: subprocess.Popen[str] | None = None
    notify: NotifyListener | None = None
    log: list[str] = field(default_factory=list)
    #: A command the daemon runs under (umockdev-run -d ... --), for emulated USB.
    wrapper: list[str] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.workdir / "run" / "control.sock"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "NOTIFY_", "WATCHDOG_"))
        }
        env.update(self.iam.aws_env())
        env["PROVISIONER_CONFIG"] = str(self.config)
        return env

    def start(self) -> None:
        self.notify = NotifyListener(self.workdir / f"notify-{time.monotonic_ns()}.sock")
        env = self.env() | {"NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": "1000000"}
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "provisioner", "daemon"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        wait_for(
            lambda: self.notify.seen("READY", "1") or self.proc.poll() is not None,  # type: ignore[union-attr]
            what="READY=1",
        )
        assert self.proc.poll() is None, "\n".join(self.log)

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log.append(line.rstrip())

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None and self.notify is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Stuck: get every thread's stack (SIGUSR1), then make sure it is gone.
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait(10)
            self.notify.close()
            stacks = "\n".join(self.log[-200:])
            raise AssertionError(f"the daemon did not stop on SIGTERM:\n{stacks}") from None
        time.sleep(0.1)
        self.notify.close()
        return code

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env(), *args, timeout=timeout)

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "provisioner", *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        with ControlClient(self.socket_path) as client:
            return client.call(request)

    def devices_of(self, user: str) -> list[str]:
        return [d["SerialNumber"] for d in self.admin.list_mfa_devices(UserName=user)["MFADevices"]]

    def history(self) -> list[dict[str, Any]]:
        return self.ask({"op": "history", "limit": 1000})["history"]  # type: ignore[no-any-return]


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``provisioner ARGS`` as an operator runs it, with ``env`` as its whole environment."""
    return subprocess.run(
        [sys.executable, "-m", "provisioner", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def seed_forms(secret: bytes) -> list[str]:
    """A seed as it could leak: base32 (AWS's form) with or without padding, any case; hex."""
    b32 = base64.b32encode(secret).decode()
    forms = {
        b32,
        b32.rstrip("="),
        b32.lower(),
        b32.rstrip("=").lower(),
        secret.hex(),
        secret.hex().upper(),
    }
    return sorted(forms)


def assert_no_seed(secrets: list[bytes], texts: list[str], files: list[Path]) -> None:
    """No seed in any of ``texts`` (logs, output, messages) or ``files`` (raw bytes too)."""
    assert secrets, "no secret to look for: the check would prove nothing"
    blobs = {str(f): f.read_bytes() for f in files if f.is_file()}
    for secret in secrets:
        forms = seed_forms(secret)
        for i, text in enumerate(texts):
            for form in forms:
                assert form not in text, f"a seed leaked into text #{i}"
        for name, blob in blobs.items():
            assert secret not in blob, f"a raw seed leaked into {name}"
            for form in forms:
                assert form.encode() not in blob, f"a seed leaked into {name}"


def make_workdir() -> Path:
    """Not pytest's tmp_path: an unprivileged client must be able to reach the socket."""
    path = Path(tempfile.mkdtemp(prefix="provisioner-daemon-"))
    path.chmod(0o755)
    return path


def write_config(
    workdir: Path, extra: str = "", roster: str | None = None, *, ahead: bool = False
) -> Path:
    """A desk's configuration for a test: ``extra`` is appended (inside [daemon] unless it
    opens a table). Work ahead of plugs is off unless ``ahead``: a test that counts IAM
    calls or devices then sees only what the plug does."""
    config = workdir / "provisioner.toml"
    roster_line = ""
    if roster is not None:
        (workdir / "roster.csv").write_text(roster)
        roster_line = f'roster = "{workdir / "roster.csv"}"\n'
    config.write_text(
        'desk = "test-desk"\n'
        "[enrollment]\nmargin_seconds = 2\n"
        f'[daemon]\nstate_directory = "{workdir / "state"}"\n'
        f'socket = "{workdir / "run" / "control.sock"}"\n'
        # An existing group stands in for provisioner-operators (the tests create none).
        'operators_group = "users"\n'
        f"{roster_line}shutdown_timeout = 10\n"
        + ("" if ahead else "checks_ahead = 0\ndevices_ahead = 0\n")
        + extra
    )
    return config
