"""What every command shares: the config, logging, the progress line, the exit status
text, and "through the daemon, or here".
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from provisioner.adapters.control_socket import daemon_reachable
from provisioner.config import Config, load, override
from provisioner.core.accounts import AccountsResult
from provisioner.core.errors import (
    DaemonNotRunning,
    DaemonRefused,
    ExitStatus,
)
from provisioner.core.model import EnrollmentResult, Step

log = logging.getLogger("provisioner")


EXIT_CODES_HELP = ExitStatus.help_text()


def progress_line(elapsed_ms: float, tag: str, text: str) -> str:
    """One line of an enrollment's progress, the same whether this process does the work
    (TerminalProgress) or follows the daemon doing it: elapsed time, step (or !), detail."""
    return f"{elapsed_ms:7.1f} ms  {tag:<14} {text}\n"


def through_daemon(config: Config, *, here_only: bool = False) -> Path | None:
    """Where to send a command that the running daemon or this process can do: the
    daemon's socket when it answers (it owns the tokens and the store while it runs), or
    None to do the work here. ``here_only`` (--direct, --reader) keeps it here."""
    socket_path = config.daemon.socket_path()
    if here_only or not daemon_reachable(socket_path):
        return None
    return socket_path


class TerminalProgress:
    """Progress lines as the enrollment goes: elapsed time, step, what happened. The
    enrollment's Progress when this process does the work; the lines of the daemon's
    step and notice events when it follows the daemon doing it."""

    def __init__(self, out: TextIO, prefix: str = "") -> None:
        self._out = out
        self._prefix = prefix
        self._start = time.monotonic()

    def restart(self) -> None:
        self._start = time.monotonic()

    def line(self, tag: str, text: str) -> None:
        elapsed = (time.monotonic() - self._start) * 1000
        self._out.write(self._prefix + progress_line(elapsed, tag, text))
        self._out.flush()

    def step(self, step: Step, detail: str) -> None:
        self.line(step.value, detail)

    def notice(self, text: str) -> None:
        self.line("!", text)


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    from provisioner.adapters.aws.iam import guard_vendor_logging as guard_boto
    from provisioner.adapters.yubikey import guard_vendor_logging as guard_yubikit

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=stream,
        format="%(levelname)s %(name)s: %(message)s",
    )
    guard_boto()
    guard_yubikit()
    if level != "debug":
        # Their INFO lines ("Found credentials in environment variables") are noise at a desk.
        for name in ("botocore", "boto3", "urllib3", "yubikit", "ykman"):
            logging.getLogger(name).setLevel(logging.WARNING)


def load_config(args: argparse.Namespace) -> Config:
    config = load(args.config)
    if getattr(args, "debug", False):
        config = override(config, log_level="debug")
    return config


def ask(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """The desk daemon's answer to a command only it can do."""
    return ask_daemon(running_daemon(args), request)


def ask_daemon(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """The answer of the daemon on ``path`` (from ``through_daemon``); DaemonRefused when
    it says no."""
    from provisioner.adapters.control_socket import ControlClient

    try:
        with ControlClient(path) as client:
            answer = client.call(request)
    except (ConnectionError, FileNotFoundError) as e:  # it stopped while we talked
        raise DaemonNotRunning(
            f"lost the desk daemon on {path} ({e})", hint="systemctl status provisioner"
        ) from e
    if not answer.get("ok"):
        raise DaemonRefused.answered(answer)
    return answer


def running_daemon(args: argparse.Namespace) -> Path:
    """The control socket of the desk daemon, which must be answering on it."""
    path = load_config(args).daemon.socket_path()
    if not daemon_reachable(path):
        raise DaemonNotRunning(
            f"the desk daemon is not running (no answer on {path})",
            hint="systemctl start provisioner, or run provisioner daemon",
        )
    return path


def when(epoch: object) -> str:
    if not isinstance(epoch, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def print_result(out: TextIO, result: EnrollmentResult) -> None:
    out.write(
        f"enrolled {result.user}: token {result.token_serial} is MFA device "
        f"{result.device_arn} ({result.seconds * 1000:.0f} ms)\n"
    )


def print_accounts_result(out: TextIO, result: AccountsResult) -> None:
    """Every account's device, one line each, after the summary line."""
    names = ", ".join(name for name, _ in result.enrolled)
    out.write(
        f"enrolled {result.user} in {names}: token {result.token_serial} "
        f"({result.seconds * 1000:.0f} ms)\n"
    )
    for name, enrolled in result.enrolled:
        out.write(
            f"  {name}: MFA device {enrolled.device_arn} (credential {enrolled.credential_id})\n"
        )
    for name in result.already:
        out.write(f"  {name}: already enrolled with this token; left as it was\n")
