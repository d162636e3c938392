"""The CLI's shared pieces: one progress line format, one "through the daemon, or here"."""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path

from provisioner.cli.main import TerminalProgress, progress_line, through_daemon
from provisioner.config import Config, DaemonConfig
from provisioner.core.model import Step


def test_terminal_progress_writes_the_line_the_daemon_follower_writes() -> None:
    out = io.StringIO()
    progress = TerminalProgress(out, prefix="  ")
    progress.step(Step.CREATE_DEVICE, "virtual MFA device created")
    progress.notice("token busy, retrying")
    first, second = out.getvalue().splitlines(keepends=True)
    elapsed = re.match(r"\s*([0-9.]+) ms", first)
    assert elapsed is not None
    assert first == "  " + progress_line(
        float(elapsed[1]), "create device", "virtual MFA device created"
    )
    assert second.startswith("  ") and second.endswith("!              token busy, retrying\n")


def test_work_goes_through_the_daemon_only_when_it_answers(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    config = Config(daemon=DaemonConfig(socket=str(path)))
    assert through_daemon(config) is None  # nothing there: do it here
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        assert through_daemon(config) == path
        assert through_daemon(config, here_only=True) is None  # --direct, --reader
